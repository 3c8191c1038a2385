//! The netlink apply path against its oracle, in network namespaces (needs root and
//! `nft`): a table applied through `Dataplane` (nf_tables netlink) must list exactly
//! like the same ruleset loaded with `nft -f` from `meduza dataplane ruleset`, and the
//! idempotence check must hold either way (a second apply finds it equal and sends
//! nothing). Also: a rejected transaction names the failing message and changes
//! nothing, and removal over netlink deletes only our table.

use meduza_test_support::netns;

use std::io::Write;

use meduza::dataplane::nft::Transaction;
use meduza::dataplane::{
    nfnl, ruleset, Dataplane, DataplaneError, NetlinkNft, Nft, NftChange, RtnlRouting,
};
use meduza_generators::plan::tproxy::TproxyPlan;
use netns::Netns;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn dataplane() -> Dataplane<NetlinkNft, RtnlRouting> {
    Dataplane::new(NetlinkNft::from_env(), RtnlRouting::new().unwrap())
}

fn small_plan() -> TproxyPlan {
    let mut p = TproxyPlan::empty();
    p.proxy_src = [
        "192.168.50.0/24",
        "fd00:50::/64",
        "192.168.70.0/24",
        "fd00:70::/64",
    ]
    .iter()
    .map(|c| c.parse().unwrap())
    .collect();
    p.bypass_dst = vec![
        "192.168.50.0/24".parse().unwrap(),
        "fd00:50::/64".parse().unwrap(),
    ];
    p.exclude_src = vec!["192.168.50.254".parse().unwrap()];
    p.exclude_ifaces = vec!["mesh0".into()];
    p.exclude_ports = vec![5555];
    p
}

/// Intervals at both ends of the address spaces (nft's leading "end" element at 0
/// and its open last interval), adjacent prefixes that do not aggregate, a whole
/// family, the largest mark, several interface names and ports.
fn edge_plan() -> TproxyPlan {
    let mut p = TproxyPlan::empty();
    p.proxy_src = [
        "0.0.0.0/8",
        "10.0.1.0/24",
        "10.0.2.0/24",
        "255.255.255.0/24",
        "::/0",
    ]
    .iter()
    .map(|c| c.parse().unwrap())
    .collect();
    p.bypass_dst = ["0.0.0.0/0", "fd00::/8", "ffff::/16"]
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    p.exclude_src = vec!["192.168.50.254".parse().unwrap(), "::1".parse().unwrap()];
    p.exclude_ifaces = vec!["mesh0".into(), "wg-abcdefghijkl".into(), "tinc0".into()];
    p.exclude_ports = vec![5555, 1, 65535];
    p.port = 65535;
    p.mark = u32::MAX;
    p
}

/// The benchmark's big plan: 10,000 non-adjacent /24s (several element messages of
/// 64 KiB each) plus 1,000 IPv6 prefixes.
fn big_plan() -> TproxyPlan {
    let mut p = small_plan();
    p.proxy_src = (0..10_000u32)
        .map(|i| {
            let a = std::net::Ipv4Addr::new(10, (i / 128) as u8, ((i % 128) * 2) as u8, 0);
            ipnet::IpNet::new(a.into(), 24).unwrap()
        })
        .chain((0..1_000u16).map(|i| {
            let a = std::net::Ipv6Addr::new(0xfd10, i * 2, 0, 0, 0, 0, 0, 0);
            ipnet::IpNet::new(a.into(), 32).unwrap()
        }))
        .collect();
    p
}

fn write_plan(plan: &TproxyPlan) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(serde_json::to_string(plan).unwrap().as_bytes())
        .unwrap();
    f
}

fn list(ns: &Netns) -> String {
    ns.exec(&["nft", "list", "table", "inet", "meduza"])
}

/// Loads `meduza dataplane ruleset --plan P` into `ns` with `nft -f`.
fn load_with_nft_f(ns: &Netns, plan: &TproxyPlan) {
    let plan_file = write_plan(plan);
    let text = netns::run(&[
        env!("CARGO_BIN_EXE_meduza"),
        "dataplane",
        "ruleset",
        "--plan",
        plan_file.path().to_str().unwrap(),
    ]);
    let mut rf = tempfile::NamedTempFile::new().unwrap();
    rf.write_all(text.as_bytes()).unwrap();
    ns.exec(&["nft", "-f", rf.path().to_str().unwrap()]);
}

/// What `nft -f` of `meduza dataplane ruleset --plan P` installs, as listed.
fn oracle_listing(ns: &Netns, plan: &TproxyPlan) -> String {
    load_with_nft_f(ns, plan);
    let listed = list(ns);
    ns.exec(&["nft", "delete", "table", "inet", "meduza"]);
    listed
}

/// Apply `plan` through netlink twice in `ns`: the listing after the first apply,
/// both changes, and the generations around the second apply.
fn apply_twice(ns: &Netns, plan: &TproxyPlan) -> (String, NftChange, NftChange, u32, u32) {
    let p = plan.clone();
    let (first, second, g1, g2) = ns.run_in(move || {
        rt().block_on(async {
            let dp = dataplane();
            let first = dp.apply(&p).await.unwrap().nft;
            let g1 = nfnl::generation().unwrap();
            let t = std::time::Instant::now();
            let second = dp.apply(&p).await.unwrap().nft;
            let known = t.elapsed();
            // A fresh instance does not know the table: it lists and compares.
            let t = std::time::Instant::now();
            let third = dataplane().apply(&p).await.unwrap().nft;
            let listed = t.elapsed();
            assert_eq!(third, NftChange::Unchanged, "a listed equal table is left alone");
            let g2 = nfnl::generation().unwrap();
            eprintln!(
                "no-op apply of {} source CIDRs: {known:?} with the table known, {listed:?} listing it",
                p.proxy_src.len()
            );
            (first, second, g1, g2)
        })
    });
    (list(ns), first, second, g1, g2)
}

fn remove(ns: &Netns) -> NftChange {
    ns.run_in(|| rt().block_on(async { dataplane().remove().await.unwrap().nft }))
}

fn check_plan_against_nft_f(tag: &str, plan: &TproxyPlan) {
    let ns = Netns::new(tag);
    let oracle = oracle_listing(&ns, plan);
    let (ours, first, second, g1, g2) = apply_twice(&ns, plan);
    assert_eq!(first, NftChange::Created);
    assert_eq!(
        second,
        NftChange::Unchanged,
        "second apply must send nothing"
    );
    assert_eq!(g1, g2, "second apply bumped the generation");
    if ours != oracle {
        let diff = similar::TextDiff::from_lines(&oracle, &ours)
            .unified_diff()
            .header("nft -f", "netlink")
            .to_string();
        panic!("netlink table lists differently from nft -f:\n{diff}");
    }
    assert_eq!(remove(&ns), NftChange::Deleted);
    assert!(!ns.try_exec(&["nft", "list", "table", "inet", "meduza"]));
}

#[test]
fn small_plan_lists_exactly_like_nft_f() {
    check_plan_against_nft_f("nfs", &small_plan());
}

/// DNS hijack (the nat chain) and every bypass block (docs/dns.md): redirect and
/// reject encode like nft's, and list back equal to the desired view.
#[test]
fn dns_guard_plan_lists_exactly_like_nft_f() {
    let mut p = small_plan();
    p.dns_hijack_port = Some(53);
    p.block_quic = true;
    p.block_dot = true;
    p.block_doh = vec![
        "1.1.1.1".parse().unwrap(),
        "2606:4700::1111".parse().unwrap(),
    ];
    check_plan_against_nft_f("nfg", &p);
}

/// Fake-IP fail-fast (`TproxyPlan::while_down`): the exclusions and the fake-range
/// rejects, IPv4 and IPv6, encode like nft's and list back equal to the desired view.
#[test]
fn fake_ip_plan_while_down_lists_exactly_like_nft_f() {
    let mut p = small_plan();
    p.fake_ip = vec![
        "198.18.0.0/16".parse().unwrap(),
        "fdfe:dcba:9876::/64".parse().unwrap(),
    ];
    check_plan_against_nft_f("nff", &p.while_down().expect("fake-ip mode"));
}

#[test]
fn edge_plan_lists_exactly_like_nft_f() {
    check_plan_against_nft_f("nfe", &edge_plan());
}

#[test]
fn big_plan_lists_exactly_like_nft_f() {
    check_plan_against_nft_f("nfb", &big_plan());
}

#[test]
fn table_loaded_by_nft_f_is_unchanged_and_replace_converges() {
    let ns = Netns::new("nfr");
    // Loaded by nft itself: our comparison finds it equal and sends nothing.
    load_with_nft_f(&ns, &small_plan());
    let oracle = list(&ns);
    ns.exec(&["nft", "add", "table", "inet", "fw4_standin"]);
    ns.exec(&[
        "nft",
        "add",
        "set",
        "inet",
        "fw4_standin",
        "s",
        "{ type ipv4_addr; }",
    ]);
    let foreign = ns.exec(&["nft", "list", "table", "inet", "fw4_standin"]);
    let (small, big) = (small_plan(), big_plan());
    let (changes, g) = ns.run_in(move || {
        rt().block_on(async {
            let dp = dataplane();
            let g0 = nfnl::generation().unwrap();
            let a = dp.apply(&small).await.unwrap().nft;
            let g1 = nfnl::generation().unwrap();
            // A different plan replaces the table in one transaction.
            let b = dp.apply(&big).await.unwrap().nft;
            let g2 = nfnl::generation().unwrap();
            let c = dp.apply(&big).await.unwrap().nft;
            let d = dp.apply(&small).await.unwrap().nft;
            ((a, b, c, d), (g0, g1, g2))
        })
    });
    assert_eq!(
        changes,
        (
            NftChange::Unchanged,
            NftChange::Replaced,
            NftChange::Unchanged,
            NftChange::Replaced
        )
    );
    assert_eq!(g.0, g.1, "an equal table must not be re-sent");
    assert_eq!(
        g.2,
        g.1.wrapping_add(1),
        "a replace is exactly one transaction"
    );
    assert_eq!(list(&ns), oracle);
    assert_eq!(
        ns.exec(&["nft", "list", "table", "inet", "fw4_standin"]),
        foreign
    );
    assert_eq!(remove(&ns), NftChange::Deleted);
    assert_eq!(remove(&ns), NftChange::Absent);
    assert_eq!(
        ns.exec(&["nft", "list", "table", "inet", "fw4_standin"]),
        foreign
    );
}

#[test]
fn rejected_transaction_names_the_message_and_changes_nothing() {
    let ns = Netns::new("nfx");
    // A table of ours whose set has another type: creating our set of the same name
    // is refused by the kernel (EEXIST), which aborts the whole transaction.
    ns.exec(&["nft", "add", "table", "inet", "meduza"]);
    ns.exec(&[
        "nft",
        "add",
        "set",
        "inet",
        "meduza",
        "proxy_src4",
        "{ type ipv6_addr; }",
    ]);
    let before = list(&ns);
    let rs = ruleset::build(&small_plan());
    let err = ns.run_in(move || {
        rt().block_on(async {
            NetlinkNft::from_env()
                .apply(Transaction::Create(&rs))
                .await
                .unwrap_err()
        })
    });
    let text = err.to_string();
    assert!(
        matches!(err, DataplaneError::NfTables(_)),
        "unexpected error kind: {err:?}"
    );
    assert!(text.contains("add set proxy_src4"), "{text}");
    assert!(text.contains("File exists"), "{text}");
    assert_eq!(list(&ns), before, "a failed transaction changed the table");
}
