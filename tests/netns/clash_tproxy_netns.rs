//! The mihomo double's TPROXY listener inside network namespaces: a client namespace
//! connects through a gateway namespace whose nftables TPROXY rule (DESIGN §7 shape)
//! sends the connection to the double, which answers with the original destination.
//! Proves the double runs under `ip netns exec` and really sets IP_TRANSPARENT.
//! Needs root, iproute2, nftables and socat (all in scripts/test's list).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run(args: &[&str], stdin: Option<&str>) {
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..]).stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
    }
    let status = child.wait().expect("wait");
    assert!(status.success(), "{args:?} failed: {status}");
}

/// Deletes the namespaces (and with them the veth pair) even when the test fails.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Kills the double on drop.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tproxy_listener_receives_original_destination() {
    let pid = std::process::id();
    let gw = format!("mdzc-gw-{pid}");
    let cl = format!("mdzc-cl-{pid}");
    let _guard = Namespaces(vec![gw.clone(), cl.clone()]);
    let (vg, vc) = (format!("vg{pid}"), format!("vc{pid}"));
    run(&["ip", "netns", "add", &gw], None);
    run(&["ip", "netns", "add", &cl], None);
    run(
        &[
            "ip", "link", "add", &vg, "type", "veth", "peer", "name", &vc,
        ],
        None,
    );
    run(&["ip", "link", "set", &vg, "netns", &gw], None);
    run(&["ip", "link", "set", &vc, "netns", &cl], None);
    let exec = |ns: &str, args: &[&str]| {
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(args);
        run(&full, None);
    };
    exec(&gw, &["ip", "link", "set", "lo", "up"]);
    exec(&gw, &["ip", "addr", "add", "10.77.0.1/24", "dev", &vg]);
    exec(&gw, &["ip", "link", "set", &vg, "up"]);
    exec(&cl, &["ip", "link", "set", "lo", "up"]);
    exec(&cl, &["ip", "addr", "add", "10.77.0.2/24", "dev", &vc]);
    exec(&cl, &["ip", "link", "set", &vc, "up"]);
    exec(&cl, &["ip", "route", "add", "default", "via", "10.77.0.1"]);
    run(
        &["ip", "netns", "exec", &gw, "nft", "-f", "-"],
        Some(
            "table inet meduza_test {\n chain prerouting {\n  type filter hook prerouting priority mangle; policy accept;\n  \
             ip saddr 10.77.0.0/24 fib daddr type local return\n  \
             ip saddr 10.77.0.0/24 meta l4proto tcp tproxy ip to 127.0.0.1:7893 meta mark set 0x1 accept\n }\n}\n",
        ),
    );
    exec(
        &gw,
        &["ip", "rule", "add", "fwmark", "0x1", "lookup", "100"],
    );
    exec(
        &gw,
        &[
            "ip", "route", "add", "local", "default", "dev", "lo", "table", "100",
        ],
    );

    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "mixed-port: 7890\ntproxy-port: 7893\nallow-lan: true\nbind-address: '*'\n\
         external-controller: 127.0.0.1:9090\nsecret: s\n",
    )
    .expect("config");
    let control = dir.path().join("control.json");
    std::fs::write(&control, r#"{"tproxy_marker": true}"#).expect("control");
    let double = meduza_test_support::doubles::doubles_dir().join("fake_mihomo.py");
    let _mihomo = Proc(
        Command::new("ip")
            .args(["netns", "exec", &gw])
            .arg(&double)
            .arg("-d")
            .arg(dir.path())
            .arg("-f")
            .arg(&config)
            .env("FAKE_MIHOMO_CONTROL", &control)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn double"),
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &cl,
                "socat",
                "-T2",
                "-",
                "TCP:203.0.113.7:80,connect-timeout=1",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("socat");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if !text.is_empty() || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(reply, "fake-mihomo tproxy 203.0.113.7:80\n");
}
