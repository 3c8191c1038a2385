//! Parsing of the kernel command line (`/proc/cmdline`) into meduza's provisioning
//! parameters (`meduza.node_id=`, `meduza.etcd=`, ...).
//!
//! Owns: the tokenizer (the kernel's quoting rules) and the `meduza.*` namespace.
//! Must not: read files or interpret values; typing and validation happen in
//! `settings`, which turns a [`KernelCmdline`] into a settings layer.

use std::collections::BTreeMap;

/// Prefix of every parameter meduza reads from the kernel command line.
pub const PREFIX: &str = "meduza.";

/// Keys meduza understands after the `meduza.` prefix (dashes are read as underscores).
pub const KNOWN_KEYS: &[&str] = &[
    "node_id",
    "etcd",
    "etcd_ca",
    "etcd_cert",
    "etcd_key",
    "etcd_user",
    "etcd_pass",
    "default_gw",
    "root",
    "state",
    "state_dir",
    "dns_listen",
    "api_listen",
    "dataplane",
    "boot",
    "watchdog",
    "watchdog_timeout",
    "resolv_conf",
];

/// The `meduza.*` parameters of one kernel command line. A key given twice keeps the
/// last value, as the kernel does for `__setup` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCmdline {
    params: BTreeMap<String, String>,
}

impl KernelCmdline {
    /// Value of `meduza.<key>`, if present. A bare `meduza.<key>` has the value `""`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    /// Every `meduza.*` key present, without the prefix.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.params.keys().map(String::as_str)
    }

    /// Keys present that meduza does not understand (typos on a provisioning line).
    pub fn unknown_keys(&self) -> Vec<String> {
        self.params
            .keys()
            .filter(|k| !KNOWN_KEYS.contains(&k.as_str()))
            .cloned()
            .collect()
    }

    /// True when no `meduza.*` parameter was given.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
}

/// Parse a kernel command line. Pure: the caller reads `/proc/cmdline`.
///
/// Follows the kernel's `next_arg()` (lib/cmdline.c): parameters are separated by
/// whitespace, double quotes group whitespace and are removed (`a="b c"` and
/// `"a=b c"` both give `a` = `b c`), and everything after a lone `--` belongs to init.
pub fn parse_cmdline(line: &str) -> KernelCmdline {
    let mut params = BTreeMap::new();
    for token in tokenize(line) {
        if token == "--" {
            break;
        }
        let (name, value) = match token.split_once('=') {
            Some((n, v)) => (n, v),
            None => (token.as_str(), ""),
        };
        let Some(key) = name.strip_prefix(PREFIX) else {
            continue;
        };
        if key.is_empty() {
            continue;
        }
        // The kernel treats '-' and '_' in parameter names alike (parameq()).
        params.insert(key.replace('-', "_"), value.to_string());
    }
    KernelCmdline { params }
}

fn tokenize(line: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut in_quote = false;
    let mut has_token = false;
    for c in line.chars() {
        match c {
            '"' => {
                in_quote = !in_quote;
                has_token = true;
            }
            c if c.is_whitespace() && !in_quote => {
                if has_token {
                    tokens.push(std::mem::take(&mut current));
                    has_token = false;
                }
            }
            c => {
                current.push(c);
                has_token = true;
            }
        }
    }
    if has_token {
        tokens.push(current);
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_node_id_and_etcd_among_kernel_params() {
        let c = parse_cmdline(
            "BOOT_IMAGE=/vmlinuz root=/dev/vda2 ro console=ttyS0 meduza.node_id=gw-7 \
             meduza.etcd=http://10.0.2.2:2379,https://etcd.example:2379 quiet\n",
        );
        assert_eq!(c.get("node_id"), Some("gw-7"));
        assert_eq!(
            c.get("etcd"),
            Some("http://10.0.2.2:2379,https://etcd.example:2379")
        );
        assert_eq!(c.get("root"), None, "non-meduza params are ignored");
        assert_eq!(c.keys().count(), 2);
    }

    #[test]
    fn quotes_group_whitespace_and_are_removed() {
        let c = parse_cmdline(r#"meduza.dns_listen="0.0.0.0:53, [::]:53" "meduza.node_id=a b""#);
        assert_eq!(c.get("dns_listen"), Some("0.0.0.0:53, [::]:53"));
        assert_eq!(c.get("node_id"), Some("a b"));
    }

    #[test]
    fn last_value_wins_and_dashes_are_underscores() {
        let c = parse_cmdline("meduza.node-id=first meduza.node_id=second");
        assert_eq!(c.get("node_id"), Some("second"));
    }

    #[test]
    fn bare_key_has_empty_value_and_init_args_are_not_read() {
        let c = parse_cmdline("meduza.boot console=ttyS0 -- meduza.node_id=for-init");
        assert_eq!(c.get("boot"), Some(""));
        assert_eq!(c.get("node_id"), None);
    }

    #[test]
    fn value_may_contain_equals_sign() {
        let c = parse_cmdline("meduza.etcd_pass=a=b==");
        assert_eq!(c.get("etcd_pass"), Some("a=b=="));
    }

    #[test]
    fn unknown_keys_are_reported() {
        let c = parse_cmdline("meduza.nodeid=x meduza.etcd=http://e:2379 meduza.=y");
        assert_eq!(c.unknown_keys(), vec!["nodeid".to_string()]);
        assert!(!c.is_empty());
        assert!(parse_cmdline("console=ttyS0").is_empty());
    }

    #[test]
    fn empty_quoted_value_is_kept() {
        let c = parse_cmdline(r#"meduza.node_id="" meduza.dataplane=off"#);
        assert_eq!(c.get("node_id"), Some(""));
        assert_eq!(c.get("dataplane"), Some("off"));
    }
}
