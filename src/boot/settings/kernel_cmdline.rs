//! The kernel command line layer of the settings (`meduza.node_id=`, `meduza.etcd=`,
//! ...). Must not: read `/proc/cmdline` (the caller parses it with
//! [`crate::boot::cmdline`]).

use std::collections::BTreeMap;

use super::values::*;
use super::{Origin, SettingsError, SettingsLayer};
use crate::boot::cmdline::KernelCmdline;

impl SettingsLayer {
    /// The kernel command line layer (`meduza.node_id=`, `meduza.etcd=`, ...). Unknown
    /// `meduza.*` keys are not errors here (see [`KernelCmdline::unknown_keys`]): a typo
    /// on a provisioning line must not stop a remote box from coming up.
    pub fn from_cmdline(c: &KernelCmdline) -> Result<Self, SettingsError> {
        /// `meduza.<key>` through `parse`, or `None` when the key is absent.
        fn field<T>(
            c: &KernelCmdline,
            key: &str,
            parse: impl Fn(Origin, &str, &str) -> Result<T, SettingsError>,
        ) -> Result<Option<T>, SettingsError> {
            c.get(key)
                .map(|v| parse(Origin::Cmdline, &format!("meduza.{key}"), v))
                .transpose()
        }
        let text = |_: Origin, _: &str, v: &str| Ok(v.to_string());
        Ok(SettingsLayer {
            node_id: field(c, "node_id", parse_node_id)?,
            etcd_endpoints: field(c, "etcd", |o, k, v| parse_endpoints(o, k, v.split(',')))?,
            etcd_ca: field(c, "etcd_ca", parse_abs_path)?,
            etcd_cert: field(c, "etcd_cert", parse_abs_path)?,
            etcd_key: field(c, "etcd_key", parse_abs_path)?,
            etcd_user: field(c, "etcd_user", text)?,
            etcd_pass: field(c, "etcd_pass", text)?,
            default_gw: field(c, "default_gw", parse_ip)?,
            root: field(c, "root", parse_abs_path)?,
            state_dir: field(c, "state_dir", parse_abs_path)?,
            state_device: field(c, "state", parse_state_device)?,
            dns_listen: field(c, "dns_listen", |o, k, v| parse_sockets(o, k, v.split(',')))?,
            api_listen: field(c, "api_listen", parse_socket)?,
            api_tls_cert: None,
            api_tls_key: None,
            dataplane: field(c, "dataplane", parse_dataplane)?,
            // A bare `meduza.boot` means yes.
            boot: field(
                c,
                "boot",
                |o, k, v| Ok(v.is_empty() || parse_bool(o, k, v)?),
            )?,
            bins: BTreeMap::new(),
            watchdog: field(c, "watchdog", parse_watchdog)?,
            watchdog_timeout: field(c, "watchdog_timeout", parse_watchdog_timeout)?,
            resolv_conf: field(c, "resolv_conf", parse_resolv_conf)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::cmdline::parse_cmdline;
    use std::path::PathBuf;

    #[test]
    fn cmdline_state_and_bare_boot() {
        let c = SettingsLayer::from_cmdline(&parse_cmdline(
            "meduza.state=PARTLABEL=state meduza.boot meduza.state_dir=/data",
        ))
        .unwrap();
        assert_eq!(c.state_device.as_deref(), Some("PARTLABEL=state"));
        assert_eq!(c.boot, Some(true));
        assert_eq!(c.state_dir, Some(PathBuf::from("/data")));
    }
}
