//! Shared helpers of the integration tests.

pub mod etcd;
pub mod ports;
