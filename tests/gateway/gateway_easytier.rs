//! Two gateways, each the real `meduza run` in its own network namespace against a
//! real etcd, with `/global/mesh_type = easytier`: the real `easytier-core` 2.0.3
//! (built from crates.io by `scripts/install-deps`; `scripts/easytier-path`) forms the
//! mesh from the generated `config.toml` alone, OSPF comes up over the mesh device,
//! each gateway learns the other's LAN and a ping to it crosses.
//!
//! Each generated setting is shown to be the one easytier-core acts on:
//! - `listeners`, `[[peer]]` and `ipv4`: the overlay addresses answer over `et0`;
//! - `network_secret`: an easytier-core of the same network with another secret is
//!   not admitted, one with the right secret is (the control);
//! - `private_mode` (2.0.3's `foreign_network_whitelist = ""`): a node of another
//!   network is refused while it is on, and served as a foreign network once it is off;
//! - `[[proxy_network]]` and `routes = []`: the route to the other LAN is FRR's OSPF
//!   route, and easytier-core carries the packets it is given;
//! - `dhcp` (gw1 only, gw0 the fixed hub): gw1 takes a free address of gw0's subnet;
//! - `mapped_listeners`, which 2.0.3 does not have, is refused naming the key while
//!   the mesh keeps running.
//!
//! Needs root, etcd, FRR, busybox and the cached EasyTier; a missing one fails the test.

use meduza_test_support::{gateway, mesh};

use gateway::{commit, lan, Gateway};
use meduza_generators::gen::easytier::toml_str;
use mesh::{ns_try, wait_for, Mesh, NsEtcd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NETWORK: &str = "meduza-mesh";
const SECRET: &str = "mesh s3cret \"quoted\"";
const PORT: u16 = 11010;

/// `easytier-core` or `easytier-cli`: in `MEDUZA_TEST_EASYTIER_DIR`, else in the bin
/// directory of `scripts/easytier-path` (the path's one owner).
fn easytier_bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("MEDUZA_TEST_EASYTIER_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let out = Command::new("bash")
                .arg("-c")
                .arg(". scripts/easytier-path && printf %s \"$EASYTIER_DIR/bin\"")
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .expect("bash");
            PathBuf::from(String::from_utf8_lossy(&out.stdout).to_string())
        }
    };
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} missing: run scripts/install-deps (it builds EasyTier once)",
        bin.display()
    );
    bin
}

/// The overlay address of gateway `i`.
fn et_ip(i: usize) -> String {
    format!("10.144.144.{}", i + 1)
}

fn seed(etcd: &NsEtcd) {
    etcd.put("/global/mesh_type", "easytier");
    etcd.put("/global/internal_routing_system", "ospf");
    etcd.put("/global/easytier/network_name", NETWORK);
    etcd.put("/global/easytier/network_secret", SECRET);
    etcd.put("/global/easytier/private_mode", "true");
    for i in 0..2 {
        let node = format!("/nodes/gw{i}");
        etcd.put(&format!("{node}/lan"), &lan(i));
        etcd.put(&format!("{node}/easytier/enable"), "true");
        etcd.put(
            &format!("{node}/easytier/ipv4"),
            &format!("{}/24", et_ip(i)),
        );
        etcd.put(&format!("{node}/easytier/listeners"), &PORT.to_string());
        etcd.put(&format!("{node}/ospf/enable"), "true");
        etcd.put(
            &format!("{node}/ospf/router_id"),
            &format!("10.255.0.{}", i + 1),
        );
    }
    // gw1 dials gw0 over TCP on the shared WAN; gw0 only listens.
    etcd.put(
        "/nodes/gw1/easytier/peers",
        &format!("tcp://{}:{PORT}", Mesh::gw_ip(0)),
    );
}

fn ping_from(ns: &str, dst: &str) -> bool {
    ns_try(ns, &["busybox", "ping", "-c", "1", "-W", "1", dst])
        .status
        .success()
}

/// The IPv4 addresses of `dev` in `ns`.
fn addrs(ns: &str, dev: &str) -> Vec<String> {
    let out = ns_try(ns, &["ip", "-4", "-o", "addr", "show", "dev", dev]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.position(|t| t == "inet")?;
            w.next().map(str::to_string)
        })
        .collect()
}

/// `show ip route` of `gw` has `prefix` as a selected OSPF route over the mesh device.
fn ospf_route(gw: &Gateway, prefix: &str) -> bool {
    gw.vtysh("show ip route")
        .lines()
        .any(|l| l.starts_with("O>*") && l.contains(prefix) && l.contains("et0"))
}

/// `easytier-cli peer` against the easytier-core of namespace `ns`.
fn peers(ns: &str) -> String {
    let cli = easytier_bin("easytier-cli");
    let out = ns_try(ns, &[cli.to_str().expect("utf-8 path"), "peer"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An easytier-core started by hand (not by meduza) in a namespace: a visitor to the
/// mesh. Killed on drop.
struct Visitor {
    child: Child,
    log: PathBuf,
}

impl Visitor {
    fn start(ns: &str, dir: &Path, name: &str, network: &str, secret: &str, ip: &str) -> Self {
        let conf = dir.join(format!("{name}.toml"));
        let log = dir.join(format!("{name}.log"));
        std::fs::write(
            &conf,
            format!(
                "instance_name = \"{name}\"\nhostname = \"{name}\"\nipv4 = \"{ip}/24\"\n\
                 dhcp = false\nlisteners = []\n\n[network_identity]\n\
                 network_name = {}\nnetwork_secret = {}\n\n\
                 [[peer]]\nuri = \"tcp://{}:{PORT}\"\n\n[flags]\ndev_name = \"et9\"\n",
                toml_str(network),
                toml_str(secret),
                Mesh::gw_ip(0)
            ),
        )
        .expect("visitor config");
        let out = std::fs::File::create(&log).expect("visitor log");
        let err = out.try_clone().expect("log fd");
        let core = easytier_bin("easytier-core");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(core)
            .arg("-c")
            .arg(&conf)
            // It writes easytier-panic.log into its working directory when it panics.
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn easytier-core");
        Self { child, log }
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }
}

impl Drop for Visitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn easytier_mesh_carries_ospf_and_lan_traffic() {
    let t0 = Instant::now();
    // Namespace 2 holds the visitors (no meduza there).
    let mesh = Mesh::new(3);
    let etcd = NsEtcd::start(&mesh.hub, Mesh::HUB_IP, 2379, &mesh.path("etcd"));
    seed(&etcd);
    let rev = commit(&etcd);
    let core = easytier_bin("easytier-core");
    let mut gws: Vec<Gateway> = (0..2)
        .map(|i| {
            let mut g = Gateway::new(&mesh, i, &etcd.endpoint);
            g.env
                .push(("MEDUZA_BIN_EASYTIER".into(), core.display().to_string()));
            g
        })
        .collect();
    gateway::start_all(&mut gws, &etcd, rev);
    let (g0, g1) = (&gws[0], &gws[1]);

    // The generated file is what easytier-core runs with (one process, `-c`).
    let conf = std::fs::read_to_string(g0.file("/etc/easytier/config.toml")).expect("config");
    assert!(conf.contains("foreign_network_whitelist = \"\""), "{conf}");
    g0.wait_pid("easytier-core", Duration::from_secs(5));
    let argv = g0
        .procs()
        .into_iter()
        .find(|(_, cmd)| cmd.contains("easytier-core"))
        .map(|(_, cmd)| cmd)
        .unwrap_or_default();
    assert!(
        argv.contains("/etc/easytier/config.toml"),
        "easytier-core runs with the generated file: {argv:?}\n{}",
        g0.run_log()
    );

    // The mesh from the generated configs: each node's address on et0, and they answer.
    for (i, g) in gws.iter().enumerate() {
        wait_for("et0 address", Duration::from_secs(20), || {
            addrs(&g.ns, "et0")
                .contains(&format!("{}/24", et_ip(i)))
                .then_some(())
        });
    }
    wait_for(
        "gw0 to reach gw1 over EasyTier",
        Duration::from_secs(30),
        || ping_from(&g0.ns, &et_ip(1)).then_some(()),
    );
    let mesh_up = t0.elapsed();
    assert!(
        ping_from(&g1.ns, &et_ip(0)),
        "gw1 reaches gw0 over EasyTier"
    );
    assert!(peers(&g0.ns).contains(&et_ip(1)), "{}", peers(&g0.ns));

    // OSPF over the mesh device, the LANs redistributed and learned.
    wait_for("OSPF adjacency over et0", Duration::from_secs(90), || {
        g0.vtysh("show ip ospf neighbor")
            .lines()
            .any(|l| l.starts_with("10.255.0.2") && l.contains("Full") && l.contains("et0"))
            .then_some(())
    });
    let adjacency = t0.elapsed();
    wait_for(
        "gw0 to learn gw1's LAN over OSPF",
        Duration::from_secs(30),
        || ospf_route(g0, &lan(1)).then_some(()),
    );
    wait_for(
        "gw1 to learn gw0's LAN over OSPF",
        Duration::from_secs(30),
        || ospf_route(g1, &lan(0)).then_some(()),
    );
    // `routes = []`: the only route into the mesh for the other LAN is FRR's.
    let kernel =
        String::from_utf8_lossy(&ns_try(&g0.ns, &["ip", "-4", "route", "show", &lan(1)]).stdout)
            .into_owned();
    assert!(
        kernel.contains("proto ospf") && kernel.contains("dev et0"),
        "gw0's route to gw1's LAN: {kernel}"
    );
    assert!(
        !kernel.contains("proto kernel") && !kernel.contains("proto boot"),
        "{kernel}"
    );
    // A ping to the other LAN crosses the mesh ([[proxy_network]] tells easytier-core
    // which peer owns it).
    wait_for("gw0 to reach gw1's LAN", Duration::from_secs(20), || {
        ping_from(&g0.ns, "10.51.0.1").then_some(())
    });
    assert!(ping_from(&g1.ns, "10.50.0.1"), "gw1 reaches gw0's LAN");
    eprintln!(
        "mesh up {:.1}s, OSPF full {:.1}s, LAN ping {:.1}s after start",
        mesh_up.as_secs_f64(),
        adjacency.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );

    // network_secret: the same network with another secret is not admitted; the right
    // secret is (so the secret, not something else, decides).
    let visitors = &mesh.gateways[2];
    let dir = mesh.path("visitors");
    std::fs::create_dir_all(&dir).expect("visitors dir");
    {
        let wrong = Visitor::start(
            visitors,
            &dir,
            "wrong",
            NETWORK,
            "not-the-secret",
            "10.144.144.9",
        );
        std::thread::sleep(Duration::from_secs(8));
        assert!(
            !ping_from(visitors, &et_ip(0)),
            "a wrong secret reached gw0"
        );
        assert!(!peers(&g0.ns).contains("10.144.144.9"), "{}", peers(&g0.ns));
        drop(wrong);
        let right = Visitor::start(visitors, &dir, "right", NETWORK, SECRET, "10.144.144.8");
        wait_for(
            "the right secret to be admitted",
            Duration::from_secs(30),
            || ping_from(visitors, &et_ip(0)).then_some(()),
        );
        drop(right);
    }

    // private_mode on: a node of another network is refused; off: it is served.
    let other = Visitor::start(visitors, &dir, "foreign1", "other-net", "x", "10.7.7.1");
    wait_for(
        "gw0 to refuse the foreign node",
        Duration::from_secs(30),
        || {
            g0.run_log()
                .contains("network other-net not in whitelist")
                .then_some(())
        },
    );
    assert!(!other.log().contains("new peer added"), "{}", other.log());
    drop(other);
    etcd.put("/global/easytier/private_mode", "false");
    let rev = commit(&etcd);
    for g in &gws {
        g.wait_applied(&etcd, rev, Duration::from_secs(20));
    }
    let conf = std::fs::read_to_string(g0.file("/etc/easytier/config.toml")).expect("config");
    assert!(!conf.contains("foreign_network_whitelist"), "{conf}");
    let other = Visitor::start(visitors, &dir, "foreign2", "other-net", "x", "10.7.7.1");
    wait_for(
        "gw0 to serve the foreign node",
        Duration::from_secs(30),
        || other.log().contains("new peer added").then_some(()),
    );
    drop(other);
    // The restart for the changed file took the mesh down; OSPF brings the LAN back.
    let restarted = Instant::now();
    wait_for(
        "gw0 to reach gw1's LAN again",
        Duration::from_secs(90),
        || ping_from(&g0.ns, "10.51.0.1").then_some(()),
    );
    eprintln!(
        "LAN reachable again {:.1}s after the restart for private_mode",
        restarted.elapsed().as_secs_f64()
    );

    // mapped_listeners does not exist in 2.0.3: refused naming the key, nothing changes.
    let pid = g0.wait_pid("easytier-core", Duration::from_secs(5));
    etcd.put(
        "/nodes/gw0/easytier/mapped_listeners",
        &format!("tcp://203.0.113.10:{PORT}"),
    );
    commit(&etcd);
    wait_for(
        "the mapped_listeners error",
        Duration::from_secs(10),
        || {
            g0.status(&etcd, "errors")
                .filter(|e| e.contains("/nodes/gw0/easytier/mapped_listeners"))
        },
    );
    assert_eq!(
        g0.pid_of("easytier-core"),
        Some(pid),
        "easytier kept running"
    );
    assert!(
        ping_from(&g0.ns, "10.51.0.1"),
        "the mesh keeps carrying traffic"
    );
    etcd.ctl(&["del", "/nodes/gw0/easytier/mapped_listeners"]);

    // easytier-core prints its config, secret included, at every start: meduza's log
    // has the lines with the secret cut out.
    for g in &gws {
        let log = g.log_text();
        assert!(
            log.contains("[easytier] network_secret = "),
            "the config dump is logged"
        );
        assert!(
            !log.contains("mesh s3cret"),
            "the network secret reached {}'s log",
            g.node
        );
    }

    // DHCP: gw1 picks its own address (easytier-core's, not meduza's) from the subnet
    // of gw0, which keeps its fixed one (docs/testing.md, "EasyTier DHCP": two nodes
    // taking the first address at once is a 2.0.3 bug that strands both).
    etcd.put("/nodes/gw1/easytier/dhcp", "true");
    let rev = commit(&etcd);
    gateway::wait_all_applied(&gws, &etcd, rev);
    let conf = std::fs::read_to_string(g1.file("/etc/easytier/config.toml")).expect("config");
    assert!(
        conf.contains("dhcp = true") && !conf.contains("ipv4 ="),
        "{conf}"
    );
    let conf = std::fs::read_to_string(g0.file("/etc/easytier/config.toml")).expect("config");
    assert!(conf.contains("dhcp = false"), "{conf}");
    let dhcp = Instant::now();
    let picked: Vec<String> = wait_for(
        "a DHCP address of gw0's subnet on gw1's et0",
        Duration::from_secs(60),
        || {
            let a: Vec<String> = gws
                .iter()
                .filter_map(|g| addrs(&g.ns, "et0").into_iter().next())
                .collect();
            (a.len() == 2 && a[0] != a[1] && a[1].starts_with("10.144.144.")).then_some(a)
        },
    );
    assert_eq!(
        picked[0],
        format!("{}/24", et_ip(0)),
        "gw0 kept its address"
    );
    eprintln!(
        "DHCP address {:.1}s after both applied the commit",
        dhcp.elapsed().as_secs_f64()
    );
    let ip1 = picked[1].split('/').next().expect("address");
    wait_for(
        "gw0 to reach gw1 at its DHCP address",
        Duration::from_secs(30),
        || ping_from(&g0.ns, ip1).then_some(()),
    );
    eprintln!(
        "DHCP addresses {picked:?}; done after {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
