//! One gateway in network namespaces (needs root): the data plane's nftables and
//! routing with real traffic, TPROXY, and the namespace lab (`gateway_lab`: `meduza run`
//! with the real mihomo or its double, etcd, a LAN client and an internet side) for
//! Clash failover, subscription refresh, DNS hijack and fake-IP.

mod clash_gateway_netns;
mod clash_refresh_netns;
mod clash_tproxy_netns;
mod dataplane_netns;
mod dataplane_nfnl;
mod dns_hijack_netns;
mod fake_ip_netns;
