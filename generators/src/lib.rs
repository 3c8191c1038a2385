//! meduza-generators: the typed etcd model and one pure generator per tool.
//!
//! Owns: parsing a flat etcd snapshot (`{"/key": "value"}`) into typed, validated
//! configuration, and rendering that configuration into files and plans.
//! Must not: do I/O, spawn, sleep, read the clock or depend on tokio. Everything a
//! generator needs (node id, generated secrets, environment such as `DEFAULT_GW`)
//! comes in as an argument, so the same input always renders the same output.

pub mod error;
pub mod gen;
pub mod legacy;
pub mod model;
pub mod output;
pub mod parse;
pub mod plan;
pub mod render;
pub mod snapshot;

pub use error::{ValidationError, ValidationErrors};
pub use model::Config;
pub use parse::Warning;
pub use render::{render_node, Domain, DomainOutput, FileOut, RenderEnv, Rendered};
pub use snapshot::Snapshot;
