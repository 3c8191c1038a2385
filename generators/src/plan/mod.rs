//! Plans: the structured outputs the daemon consumes, as plain data.
//!
//! Generators turn the typed model into files *and* into these plans. The daemon's
//! runtime modules (data plane, DNS frontend, supervisor) take a plan and make the
//! system match it; they never read etcd keys themselves. Plans derive `PartialEq`
//! so "did anything change?" is a comparison, and `Serialize` so `--dry-run` and the
//! node API can print them.

pub mod dns;
pub mod service;
pub mod tproxy;
pub mod wireguard;
