//! Shared helpers of the integration tests.

pub mod etcd;
pub mod etcd_args;
pub mod pki;
pub mod ports;
