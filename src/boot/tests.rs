//! Tests of the boot duties against the fake OS.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;

const REL: &str = "6.1.0-test";

fn settings(node: &str) -> Settings {
    let l = SettingsLayer {
        node_id: Some(node.into()),
        boot: Some(true),
        ..Default::default()
    };
    let none = SettingsLayer::default();
    resolve_settings(&l, &none, &none, &none, None).expect("valid settings")
}

fn ext4_head(label: &str) -> Vec<u8> {
    let mut b = vec![0u8; 2048];
    b[1024 + 0x38] = 0x53;
    b[1024 + 0x39] = 0xEF;
    b[1024 + 0x78..1024 + 0x78 + label.len()].copy_from_slice(label.as_bytes());
    b
}

/// A freshly booted firmware: only `/` mounted (read-only squashfs), modules on disk,
/// a disk with boot, root and state partitions.
fn fresh_firmware() -> FakeState {
    let mut s = FakeState {
        kernel_release: REL.into(),
        hostname: "(none)".into(),
        ..Default::default()
    };
    s.read_only.insert(PathBuf::from("/"));
    for d in [
        "/",
        "/proc",
        "/sys",
        "/dev",
        "/run",
        "/etc",
        "/var/lib/meduza",
    ] {
        s.dirs.insert(PathBuf::from(d));
    }
    let dep: String = [
        "kernel/net/netfilter/nf_tables.ko:",
        "kernel/net/netfilter/nft_tproxy.ko: kernel/net/ipv4/netfilter/nf_tproxy_ipv4.ko kernel/net/ipv6/netfilter/nf_tproxy_ipv6.ko kernel/net/netfilter/nf_tables.ko",
        "kernel/net/ipv4/netfilter/nf_tproxy_ipv4.ko:",
        "kernel/net/ipv6/netfilter/nf_tproxy_ipv6.ko:",
        "kernel/net/netfilter/nft_socket.ko: kernel/net/ipv4/netfilter/nf_socket_ipv4.ko kernel/net/ipv6/netfilter/nf_socket_ipv6.ko",
        "kernel/net/ipv4/netfilter/nf_socket_ipv4.ko:",
        "kernel/net/ipv6/netfilter/nf_socket_ipv6.ko:",
        "kernel/net/netfilter/nft_fib_inet.ko: kernel/net/ipv4/netfilter/nft_fib_ipv4.ko",
        "kernel/net/netfilter/nft_chain_nat.ko: kernel/net/netfilter/nf_nat.ko",
        "kernel/net/netfilter/nft_redir.ko: kernel/net/netfilter/nf_nat.ko",
        "kernel/net/netfilter/nft_reject_inet.ko: kernel/net/netfilter/nft_reject.ko",
        "kernel/drivers/net/wireguard/wireguard.ko:",
        "kernel/drivers/net/tun.ko:",
        "kernel/drivers/net/veth.ko:",
    ]
    .join("\n");
    let lib = format!("/lib/modules/{REL}");
    s.files.insert(
        PathBuf::from(format!("{lib}/modules.dep")),
        dep.into_bytes(),
    );
    s.files.insert(
        PathBuf::from(format!("{lib}/modules.builtin")),
        b"kernel/drivers/virtio/virtio.ko\n".to_vec(),
    );
    let deps: BTreeMap<&str, &[&str]> = [
        ("nf_tables", &[][..]),
        (
            "nft_tproxy",
            &["nf_tproxy_ipv4", "nf_tproxy_ipv6", "nf_tables"][..],
        ),
        ("nf_tproxy_ipv4", &[][..]),
        ("nf_tproxy_ipv6", &[][..]),
        ("nft_socket", &["nf_socket_ipv4", "nf_socket_ipv6"][..]),
        ("nf_socket_ipv4", &[][..]),
        ("nf_socket_ipv6", &[][..]),
        ("nft_fib_inet", &["nft_fib_ipv4"][..]),
        ("nft_chain_nat", &["nf_nat"][..]),
        ("nft_redir", &["nf_nat"][..]),
        ("nft_reject_inet", &["nft_reject"][..]),
        ("wireguard", &[][..]),
        ("tun", &[][..]),
        ("veth", &[][..]),
    ]
    .into_iter()
    .collect();
    s.available_modules = deps
        .into_iter()
        .map(|(m, d)| (m.to_string(), d.iter().map(|x| x.to_string()).collect()))
        .collect();
    for (name, partname, head) in [
        ("vda", None, vec![0u8; 2048]),
        ("vda1", Some("boot"), vec![0u8; 2048]),
        ("vda2", Some("rootfs-a"), vec![0u8; 2048]),
        ("vda3", Some("meduza-state"), ext4_head("meduza-state")),
    ] {
        let mut uevent = format!("MAJOR=254\nDEVNAME={name}\nDEVTYPE=partition\n");
        if let Some(p) = partname {
            uevent.push_str(&format!("PARTNAME={p}\n"));
        }
        s.files.insert(
            PathBuf::from(format!("/sys/class/block/{name}/uevent")),
            uevent.into_bytes(),
        );
        s.files.insert(PathBuf::from(format!("/dev/{name}")), head);
    }
    s
}

#[test]
fn fresh_firmware_gets_every_duty_done_in_order() {
    let os = FakeBootOs::new(fresh_firmware());
    let report = run_boot_duties(&os, &settings("qemu1"));
    assert_eq!(report.failures().count(), 0, "{report:#?}");
    for duty in [
        Duty::Mount("/proc".into()),
        Duty::Mount("/sys".into()),
        Duty::Mount("/dev".into()),
        Duty::Mount("/run".into()),
        Duty::EtcOverlay,
        Duty::StatePartition,
        Duty::Loopback,
        Duty::Hostname,
        Duty::Subreaper,
    ] {
        assert!(
            matches!(report.outcome(&duty), Some(Outcome::Done(_))),
            "{duty}: {:?}",
            report.outcome(&duty)
        );
    }
    let st = os.state();
    assert_eq!(st.mounts[Path::new("/proc")].fstype, "proc");
    assert_eq!(st.mounts[Path::new("/dev")].fstype, "devtmpfs");
    assert_eq!(st.mounts[Path::new("/run")].fstype, "tmpfs");
    let etc = &st.mounts[Path::new("/etc")];
    assert_eq!(etc.fstype, "overlay");
    assert_eq!(
        etc.data.as_deref(),
        Some("lowerdir=/etc,upperdir=/run/meduza/etc-overlay/upper,workdir=/run/meduza/etc-overlay/work")
    );
    let state = &st.mounts[Path::new("/var/lib/meduza")];
    assert_eq!(
        (state.source.as_str(), state.fstype.as_str()),
        ("/dev/vda3", "ext4")
    );
    assert!(state.opts.nodev && state.opts.nosuid && state.opts.noexec);
    for m in DATAPLANE_MODULES {
        assert!(st.loaded_modules.contains(*m), "{m} not loaded");
    }
    assert!(st.loopback_up);
    assert_eq!(st.hostname, "qemu1");
    assert!(st.subreaper);

    // /proc and /sys come first: modules and the state device are found through them.
    let pos = |c: &str| st.calls.iter().position(|x| x == c).unwrap_or(usize::MAX);
    assert!(pos("mount /proc proc") < pos("modprobe nf_tables"));
    assert!(pos("mount /run tmpfs") < pos("mount /etc overlay"));
    assert!(pos("mount /sys sysfs") < pos("mount /var/lib/meduza ext4"));
}

#[test]
fn second_run_changes_nothing() {
    let os = FakeBootOs::new(fresh_firmware());
    let s = settings("qemu1");
    let first = run_boot_duties(&os, &s);
    assert!(!first.is_noop());
    let calls_after_first = os.state().calls.len();
    let second = run_boot_duties(&os, &s);
    assert!(second.is_noop(), "{second:#?}");
    assert_eq!(second.failures().count(), 0);
    assert_eq!(
        os.state().calls.len(),
        calls_after_first,
        "no OS change on rerun"
    );
    // Modules pulled in as dependencies by an earlier modprobe are not probed again.
    let probes = os
        .state()
        .calls
        .iter()
        .filter(|c| c.as_str() == "modprobe nf_tproxy_ipv4")
        .count();
    assert_eq!(probes, 0, "nf_tproxy_ipv4 came with nft_tproxy");
}

#[test]
fn builtin_and_missing_modules_are_skipped_and_failures_do_not_stop_boot() {
    let mut st = fresh_firmware();
    let lib = format!("/lib/modules/{REL}");
    st.files.insert(
        PathBuf::from(format!("{lib}/modules.builtin")),
        b"kernel/drivers/net/tun.ko\nkernel/net/netfilter/nf_tables.ko\n".to_vec(),
    );
    st.files.insert(
        PathBuf::from(format!("{lib}/modules.dep")),
        b"kernel/drivers/net/veth.ko:\nkernel/drivers/net/wireguard/wireguard.ko:\n".to_vec(),
    );
    st.failing.insert("modprobe:wireguard".into());
    st.failing.insert("mount:/sys".into());
    let os = FakeBootOs::new(st);
    let r = run_boot_duties(&os, &settings("n1"));

    assert_eq!(
        r.outcome(&Duty::Module("tun".into())),
        Some(&Outcome::Skipped("built into the kernel".into()))
    );
    assert!(matches!(
        r.outcome(&Duty::Module("nft_tproxy".into())),
        Some(Outcome::Skipped(why)) if why.contains("modules.dep")
    ));
    assert!(matches!(
        r.outcome(&Duty::Module("wireguard".into())),
        Some(Outcome::Failed(why)) if why.contains("modprobe wireguard")
    ));
    assert_eq!(
        r.outcome(&Duty::Module("veth".into())),
        Some(&Outcome::Done("loaded".into()))
    );
    assert!(matches!(
        r.outcome(&Duty::Mount("/sys".into())),
        Some(Outcome::Failed(_))
    ));
    // Without /sys no device can be found; boot still goes on.
    assert!(matches!(
        r.outcome(&Duty::StatePartition),
        Some(Outcome::Skipped(_))
    ));
    assert_eq!(
        r.outcome(&Duty::Hostname),
        Some(&Outcome::Done("hostname n1".into()))
    );
    let failed: Vec<String> = r.failures().map(|(d, _)| d.to_string()).collect();
    assert_eq!(failed, vec!["mount /sys", "module wireguard"]);
}

#[test]
fn developer_machine_with_everything_in_place_is_left_alone() {
    let mut st = fresh_firmware();
    st.read_only.clear();
    for (p, fs) in [
        ("/proc", "proc"),
        ("/sys", "sysfs"),
        ("/dev", "devtmpfs"),
        ("/run", "tmpfs"),
    ] {
        st.mounts.insert(
            PathBuf::from(p),
            MountRequest {
                source: fs.into(),
                target: p.into(),
                fstype: fs.into(),
                opts: MountOpts::default(),
                data: None,
            },
        );
    }
    // No state partition on this machine.
    st.files.retain(|p, _| !p.starts_with("/sys/class/block"));
    st.loaded_modules = DATAPLANE_MODULES.iter().map(|m| m.to_string()).collect();
    st.loopback_up = true;
    st.hostname = "dev1".into();
    st.subreaper = true;
    let os = FakeBootOs::new(st);
    let r = run_boot_duties(&os, &settings("dev1"));
    assert!(r.is_noop(), "{r:#?}");
    assert_eq!(
        r.outcome(&Duty::EtcOverlay),
        Some(&Outcome::Skipped("root filesystem is writable".into()))
    );
    assert_eq!(
        r.outcome(&Duty::StatePartition),
        Some(&Outcome::Skipped(
            "no block device matches LABEL=meduza-state; state stays on the root filesystem".into()
        ))
    );
    assert!(os.state().calls.is_empty(), "{:?}", os.state().calls);
}

#[test]
fn explicit_state_device_missing_fails_and_falls_back_to_tmpfs_on_readonly_root() {
    let os = FakeBootOs::new(fresh_firmware());
    let mut s = settings("n1");
    s.state_device = Some("PARTLABEL=nope".into());
    let r = run_boot_duties(&os, &s);
    assert!(matches!(
        r.outcome(&Duty::StatePartition),
        Some(Outcome::Failed(why)) if why.contains("PARTLABEL=nope") && why.contains("tmpfs mounted instead")
    ));
    assert_eq!(
        os.state().mounts[Path::new("/var/lib/meduza")].fstype,
        "tmpfs"
    );
}

#[test]
fn state_device_by_partlabel_path_or_disabled() {
    let os = FakeBootOs::new(fresh_firmware());
    let mut s = settings("n1");
    s.state_device = Some("PARTLABEL=meduza-state".into());
    let r = run_boot_duties(&os, &s);
    assert!(matches!(
        r.outcome(&Duty::StatePartition),
        Some(Outcome::Done(_))
    ));
    assert_eq!(
        os.state().mounts[Path::new("/var/lib/meduza")].source,
        "/dev/vda3"
    );

    // On a read-only root the mount point must come with the image.
    let mut st = fresh_firmware();
    st.dirs.insert(PathBuf::from("/data"));
    let os = FakeBootOs::new(st);
    s.state_device = Some("/dev/vda3".into());
    s.state_dir = PathBuf::from("/data");
    let r = run_boot_duties(&os, &s);
    assert!(matches!(
        r.outcome(&Duty::StatePartition),
        Some(Outcome::Done(_))
    ));
    assert_eq!(os.state().mounts[Path::new("/data")].source, "/dev/vda3");

    let os = FakeBootOs::new(fresh_firmware());
    s.state_device = None;
    let r = run_boot_duties(&os, &s);
    assert!(matches!(
        r.outcome(&Duty::StatePartition),
        Some(Outcome::Skipped(_))
    ));
    assert!(!os.state().mounts.contains_key(Path::new("/data")));
}

#[test]
fn boot_duties_need_request_and_init_parent() {
    let mut s = settings("n1");
    assert!(boot_duties_wanted(&s, 300, 1));
    assert!(boot_duties_wanted(&s, 1, 0));
    assert!(!boot_duties_wanted(&s, 300, 299), "started from a shell");
    s.boot = false;
    assert!(!boot_duties_wanted(&s, 300, 1), "not requested");
}

#[test]
fn module_names_and_states() {
    assert_eq!(
        module_name("kernel/net/netfilter/nft_fib_inet.ko.xz"),
        "nft_fib_inet"
    );
    assert_eq!(module_name("nf-tables"), "nf_tables");
    assert_eq!(module_name("veth"), "veth");
    let procm = "nf_tables 385024 2 nft_tproxy, Live 0x0\ntun 61440 0 - Live 0x0\n";
    let dep = "kernel/drivers/net/veth.ko.zst:\nkernel/net/netfilter/nft_socket.ko: x.ko\n";
    assert_eq!(
        module_state("nf_tables", Some(procm), None, Some(dep)),
        ModuleState::Loaded
    );
    assert_eq!(
        module_state(
            "wireguard",
            Some(procm),
            Some("kernel/drivers/net/wireguard/wireguard.ko\n"),
            Some(dep)
        ),
        ModuleState::BuiltIn
    );
    assert_eq!(
        module_state("veth", Some(procm), None, Some(dep)),
        ModuleState::Loadable
    );
    assert_eq!(
        module_state("nft_tproxy", Some(procm), None, Some(dep)),
        ModuleState::NotAvailable
    );
    assert_eq!(
        module_state("nft_tproxy", None, None, None),
        ModuleState::Loadable
    );
}

#[test]
fn ext_labels_and_uevent_fields() {
    assert_eq!(
        ext_label(&ext4_head("meduza-state")).as_deref(),
        Some("meduza-state")
    );
    assert_eq!(ext_label(&ext4_head("")), None, "unlabelled");
    assert_eq!(ext_label(&[0u8; 2048]), None, "not ext");
    assert_eq!(ext_label(&[0u8; 100]), None, "short read");
    let full = ext4_head("exactly16charsxx");
    assert_eq!(ext_label(&full).as_deref(), Some("exactly16charsxx"));
    let u = "MAJOR=8\nMINOR=3\nDEVNAME=sda3\nDEVTYPE=partition\nPARTN=3\nPARTNAME=meduza-state\n";
    assert_eq!(uevent_field(u, "DEVNAME"), Some("sda3"));
    assert_eq!(uevent_field(u, "PARTNAME"), Some("meduza-state"));
    assert_eq!(uevent_field(u, "PARTN"), Some("3"));
    assert_eq!(uevent_field(u, "DISKSEQ"), None);
}
