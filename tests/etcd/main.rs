//! Tests against a real etcd (one member, TLS and auth, or a 3-member cluster losing
//! members), and the `meduza` CLI run as a program: the etcd client, watch and status
//! publisher, `meduza commit`, the children's environment, `-o json`, the node API's
//! upstream CRUD and the fleet manager over TLS and in Chromium.

mod api_upstreams;
mod child_env;
mod cli_output;
mod commit_cli;
mod etcd_auth_tls;
mod etcd_cluster;
mod etcd_kv;
mod etcd_reconnect;
mod etcd_status;
mod etcd_watch;
mod fleet_tls;
mod fleet_web;
