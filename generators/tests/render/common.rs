//! Shared fixtures: the documented example snapshot and a fixed render environment.

use meduza_generators::render::{Bins, RenderEnv};
use meduza_generators::{Config, Snapshot};
use std::path::PathBuf;

/// `docs/examples/three-nodes.json`.
pub fn example_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/three-nodes.json")
}

pub fn example_snapshot() -> Snapshot {
    let text = std::fs::read_to_string(example_path()).expect("example snapshot readable");
    Snapshot::from_json(&text).expect("example snapshot is a flat JSON object")
}

/// The example with the overlay switched to EasyTier (its keys are in the example too).
pub fn example_easytier_snapshot() -> Snapshot {
    let mut s = example_snapshot();
    s.0.insert("/global/mesh_type".into(), "easytier".into());
    s
}

pub fn parse(s: &Snapshot) -> Config {
    match Config::parse(s) {
        Ok(c) => c,
        Err(e) => panic!("example must validate: {e}"),
    }
}

pub fn env() -> RenderEnv {
    RenderEnv {
        default_gw: Some("192.168.0.1".parse().expect("literal")),
        clash_secret: "env-generated-secret-0123456789".into(),
        bins: Bins::default(),
    }
}
