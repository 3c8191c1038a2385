//! The generated tinc and OpenVPN configurations work with Debian's real programs:
//! two network namespaces joined by a veth pair play gw-a and gw-b of the example;
//! tincd (1.0) must activate the meta connection with the generated keys and hosts
//! files, and two OpenVPN 2.6 instances (static key, tcp-server / tcp-client) must
//! complete their initialization. Needs root; fails, never skips, when a program is
//! missing. Namespaces carry the pid and are removed by a guard even on failure.

use crate::common;

use meduza_generators::render::{render_node, Domain, DomainOutput};
use meduza_generators::Config;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const IP: &str = "/usr/sbin/ip";
const TINCD: &str = "/usr/sbin/tincd";
const OPENVPN: &str = "/usr/sbin/openvpn";

fn run(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", argv[0]));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces `a` and `b` with a veth pair: a=203.0.113.10, b=198.51.100.20
/// (the example's public tinc addresses).
struct Netns {
    a: String,
    b: String,
    children: Vec<Child>,
}

impl Netns {
    fn new(tag: &str) -> Self {
        let pid = std::process::id();
        let n = Self {
            a: format!("mdz-{tag}a-{pid}"),
            b: format!("mdz-{tag}b-{pid}"),
            children: Vec::new(),
        };
        run(&[IP, "netns", "add", &n.a]);
        run(&[IP, "netns", "add", &n.b]);
        let (va, vb) = (format!("v{tag}a{pid}"), format!("v{tag}b{pid}"));
        let (va, vb) = (&va[..va.len().min(15)], &vb[..vb.len().min(15)]);
        run(&[
            IP, "link", "add", va, "netns", &n.a, "type", "veth", "peer", "name", vb, "netns", &n.b,
        ]);
        for (ns, dev, me, other) in [
            (&n.a, va, "203.0.113.10/32", "198.51.100.20/32"),
            (&n.b, vb, "198.51.100.20/32", "203.0.113.10/32"),
        ] {
            run(&[IP, "-n", ns, "link", "set", "lo", "up"]);
            run(&[IP, "-n", ns, "addr", "add", me, "dev", dev]);
            run(&[IP, "-n", ns, "link", "set", dev, "up"]);
            run(&[IP, "-n", ns, "route", "add", other, "dev", dev]);
        }
        n
    }

    fn spawn(&mut self, ns: &str, argv: &[String], log: &Path) {
        let log = std::fs::File::create(log).expect("log file");
        let child = Command::new(IP)
            .args(["netns", "exec", ns])
            .args(argv)
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {argv:?}: {e}"));
        self.children.push(child);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.a, &self.b] {
            let _ = Command::new(IP).args(["netns", "del", ns]).status();
        }
    }
}

/// `argv` run to completion inside the namespace `ns`.
fn in_netns(ns: &str, argv: &[&str]) -> Output {
    Command::new(IP)
        .args(["netns", "exec", ns])
        .args(argv)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {argv:?} in {ns}: {e}"))
}

/// Write a domain's files under `root` (the daemon's MEDUZA_ROOT).
fn write_files(root: &Path, d: &DomainOutput, edit: impl Fn(&str) -> String) {
    use std::os::unix::fs::PermissionsExt as _;
    for f in &d.files {
        let p = root.join(f.path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, edit(&f.content)).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode)).expect("chmod");
    }
}

fn wait_for_log(path: &Path, needle: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

fn render(cfg: &Config, id: &str, d: &Domain) -> DomainOutput {
    render_node(cfg, id, &common::env())
        .expect("renders")
        .domains
        .remove(d)
        .unwrap_or_else(|| panic!("{id} renders {}", d.label()))
}

#[test]
fn tincd_connects_with_generated_config() {
    let cfg = common::parse(&common::example_snapshot());
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut ns = Netns::new("t");
    for (id, netns) in [("gw-a", ns.a.clone()), ("gw-b", ns.b.clone())] {
        let root: PathBuf = tmp.path().join(id);
        let d = render(&cfg, id, &Domain::Tinc);
        write_files(&root, &d, str::to_string);
        // The generated argv names the config dir and pid file (the daemon re-roots
        // them under MEDUZA_ROOT); here the files live under the test root.
        let argv = d.services[0].argv.clone();
        assert_eq!(
            argv[1..],
            [
                "-n",
                "mesh",
                "-c",
                "/etc/tinc/mesh",
                "--pidfile",
                "/var/run/tinc.mesh.pid",
                "-D"
            ]
        );
        let conf = root.join("etc/tinc/mesh");
        let argv: Vec<String> = vec![
            TINCD.into(),
            "-D".into(),
            "-d1".into(),
            "-c".into(),
            conf.display().to_string(),
            "--pidfile".into(),
            root.join("tinc.pid").display().to_string(),
        ];
        ns.spawn(&netns, &argv, &root.join("tincd.log"));
    }
    let log = tmp.path().join("gw-a/tincd.log");
    let ok = wait_for_log(&log, "Connection with gw_b", Duration::from_secs(15))
        && wait_for_log(&log, "activated", Duration::from_secs(5));
    assert!(
        ok,
        "tinc meta connection not activated:\n{}\n--- gw-b ---\n{}",
        std::fs::read_to_string(&log).unwrap_or_default(),
        std::fs::read_to_string(tmp.path().join("gw-b/tincd.log")).unwrap_or_default()
    );
    // tinc-up ran: the overlay address is on the device.
    let out = Command::new(IP)
        .args(["-n", &ns.a, "addr", "show", "dev", "tnc0"])
        .output()
        .expect("ip addr");
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.200.0.1/24"));
}

#[test]
fn openvpn_static_key_pair_comes_up() {
    // gw-b gets the other end of gw-a's isp1 link: tcp-client, same static key.
    let mut snap = common::example_snapshot();
    let secret = snap.0["/nodes/gw-a/openvpn/isp1/secret"].clone();
    for (k, v) in [
        ("enable", "true"),
        ("dev", "ovpn-toa"),
        ("proto", "tcp-client"),
        ("remote", "203.0.113.10 1194"),
        ("ifconfig", "172.31.0.2 172.31.0.1"),
        ("keepalive", "10 60"),
        ("cipher", "AES-256-CBC"),
        ("secret", secret.as_str()),
    ] {
        snap.0
            .insert(format!("/nodes/gw-b/openvpn/toa/{k}"), v.into());
    }
    let cfg = common::parse(&snap);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut ns = Netns::new("o");
    for (id, inst, netns) in [
        ("gw-a", "isp1", ns.a.clone()),
        ("gw-b", "toa", ns.b.clone()),
    ] {
        let root = tmp.path().join(id);
        let d = render(&cfg, id, &Domain::Openvpn(inst.into()));
        // The management socket lives under /var/run/meduza on a node; here under the root.
        let sock = root.join(format!("openvpn-{inst}.sock"));
        write_files(&root, &d, |c| c.to_string());
        let conf = root.join(format!("etc/openvpn/{inst}.conf"));
        let mut argv = d.services[0].argv.clone();
        assert_eq!(
            argv[1..],
            [
                "--config",
                &format!("/etc/openvpn/{inst}.conf"),
                "--management",
                &format!("/var/run/meduza/openvpn-{inst}.sock"),
                "unix"
            ]
        );
        argv[0] = OPENVPN.into();
        argv[2] = conf.display().to_string();
        argv[4] = sock.display().to_string();
        ns.spawn(&netns, &argv, &root.join("openvpn.log"));
    }
    for id in ["gw-a", "gw-b"] {
        let log = tmp.path().join(id).join("openvpn.log");
        assert!(
            wait_for_log(
                &log,
                "Initialization Sequence Completed",
                Duration::from_secs(20)
            ),
            "{id}: openvpn did not come up:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    assert!(
        tmp.path().join("gw-a/openvpn-isp1.sock").exists(),
        "management socket"
    );
}

const WIREGUARD_GO: &str = "/usr/bin/wireguard-go";
const WG: &str = "/usr/bin/wg";

/// Removes wireguard-go's UAPI socket (left behind when the process is killed).
struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn wg_setconf_accepts_generated_config() {
    // This kernel may lack WireGuard: use the userspace implementation's device.
    let cfg = common::parse(&common::example_snapshot());
    let d = render(&cfg, "gw-b", &Domain::Wireguard("partner".into()));
    let tmp = tempfile::tempdir().expect("tempdir");
    write_files(tmp.path(), &d, str::to_string);
    let conf = tmp.path().join("etc/wireguard/wg-partner.conf");
    let mut ns = Netns::new("w");
    let dev = format!("wgt{}", std::process::id());
    let sock = SocketGuard(PathBuf::from(format!("/var/run/wireguard/{dev}.sock")));
    ns.spawn(
        &ns.a.clone(),
        &[WIREGUARD_GO.into(), "-f".into(), dev.clone()],
        &tmp.path().join("wg.log"),
    );
    let start = Instant::now();
    while !sock.0.exists() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let conf_arg = conf.display().to_string();
    let setconf = in_netns(&ns.a, &[WG, "setconf", &dev, &conf_arg]);
    assert!(
        setconf.status.success(),
        "wg setconf refused the file: {}\n{}",
        String::from_utf8_lossy(&setconf.stderr),
        std::fs::read_to_string(&conf).unwrap_or_default()
    );
    let show = in_netns(&ns.a, &[WG, "show", &dev, "dump"]);
    let dump = String::from_utf8_lossy(&show.stdout);
    let plan = &render_node(&cfg, "gw-b", &common::env())
        .expect("renders")
        .wireguard[0];
    assert!(dump.contains(&plan.peers[0].public_key), "{dump}");
    assert!(dump.contains("51820"), "{dump}");
    assert!(dump.contains("172.30.0.0/30,10.77.0.0/16"), "{dump}");
    assert!(dump.contains("192.0.2.50:51820"), "{dump}");
}
