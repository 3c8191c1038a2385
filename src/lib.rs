//! The meduza daemon and CLI as a library (the binary wires these modules; integration
//! tests use them directly).

pub mod api;
pub mod backoff;
pub mod boot;
pub mod clash;
pub mod commit;
pub mod daemon;
pub mod dataplane;
pub mod dns;
pub mod etcd;
pub mod files;
pub mod fleet;
pub mod offline;
pub mod output;
pub mod reconcile;
pub mod supervise;
pub mod tls;
pub mod watchdog;
