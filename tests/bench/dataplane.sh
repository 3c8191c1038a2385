#!/usr/bin/env bash
# Benchmark of the data plane's apply (DESIGN §7; issue: dataplane).
#
# In a throwaway network namespace, times:
#   ours     `Dataplane::apply` on an empty namespace, timed inside meduza as the
#            daemon calls it (`meduza dataplane bench`): the installed-table probe,
#            one nf_tables netlink transaction (encoded by meduza, no nft process)
#            and the four policy-routing items over rtnetlink
#   ours_cli the same through the CLI, `meduza dataplane apply --plan P`, wall clock
#            (adds meduza's own process start)
#   noop     a second apply that finds everything in place, by the same instance (the
#            daemon's case: the table is known while the ruleset generation is unmoved)
#   listed   the same by a fresh instance (the CLI, a restarted daemon): one
#            `nft -j list` of the table and the comparison
#   nft      `nft -f R` of the same ruleset as text (R = `meduza dataplane ruleset`),
#            wall clock: the anchor; ratio ours/nft, target <= 1.2
#   iptables the predecessor's approach: one iptables/ip6tables/ip call per rule
#            (iptables-nft), wall clock; ratio iptables/ours, target >= 20
# for a small plan (the test plan) and for 10,000 source CIDRs.
# Each figure is the median of REPS runs (the iptables one of IPT_REPS runs);
# clean-up between runs is not timed.
#
# Usage: tests/bench/dataplane.sh            (builds target/release/meduza)
#        MEDUZA=path/to/meduza REPS=15 IPT_REPS=1 tests/bench/dataplane.sh
#        IPT_REPS=0 ...   (skip the slow iptables runs: about 2-5 min for 10,000)
# Needs root, nft, iptables, ip6tables, ip.
set -euo pipefail

REPS=${REPS:-11}
IPT_REPS=${IPT_REPS:-1}
BIG=${BIG:-10000}

if [ "${1:-}" != "--inside" ]; then
    if [ -z "${MEDUZA:-}" ]; then
        cargo build --release --quiet --bin meduza
        MEDUZA="${CARGO_TARGET_DIR:-target}/release/meduza"
    fi
    MEDUZA=$(readlink -f "$MEDUZA")
    for tool in nft iptables ip6tables ip; do
        command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
    done
    NS="mdzbench$$"
    WORK=$(mktemp -d)
    cleanup() { ip netns del "$NS" 2>/dev/null || true; rm -rf "$WORK"; }
    trap cleanup EXIT
    ip netns add "$NS"
    ip -n "$NS" link set lo up
    MEDUZA="$MEDUZA" WORK="$WORK" REPS="$REPS" IPT_REPS="$IPT_REPS" BIG="$BIG" \
        ip netns exec "$NS" "$0" --inside
    exit $?
fi

# ---- inside the namespace -------------------------------------------------

now_ns() { date +%s%N; }

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# Plans. Small: the integration test's plan. Big: BIG non-adjacent /24s (so nothing
# aggregates) plus the small plan's exclusions.
small="$WORK/small.json"
big="$WORK/big.json"
cat >"$small" <<'JSON'
{"proxy_src":["192.168.50.0/24","fd00:50::/64","192.168.70.0/24","fd00:70::/64"],
 "bypass_dst":["192.168.50.0/24","fd00:50::/64"],"exclude_src":["192.168.50.254"],
 "exclude_ifaces":["mesh0"],"exclude_ports":[5555],"port":7893,"mark":1,"table":100}
JSON
awk -v n="$BIG" 'BEGIN {
    printf "{\"proxy_src\":[";
    for (i = 0; i < n; i++) {
        if (i) printf ",";
        printf "\"10.%d.%d.0/24\"", int(i / 128), (i % 128) * 2;
    }
    printf "],\"bypass_dst\":[\"192.168.50.0/24\",\"fd00:50::/64\"],\"exclude_src\":[\"192.168.50.254\"],";
    printf "\"exclude_ifaces\":[\"mesh0\"],\"exclude_ports\":[5555],\"port\":7893,\"mark\":1,\"table\":100}\n";
}' >"$big"

reset_ours() { "$MEDUZA" dataplane remove >/dev/null; }
reset_nft() { nft delete table inet meduza 2>/dev/null || true; }

time_ours() { # plan -> median ms
    local plan=$1 out=() t0 t1
    for _ in $(seq "$REPS"); do
        reset_ours
        t0=$(now_ns); "$MEDUZA" dataplane apply --plan "$plan" >/dev/null; t1=$(now_ns)
        out+=($(( (t1 - t0) / 1000 )))
    done
    reset_ours
    printf '%s\n' "${out[@]}" | median
}

time_nft() { # plan -> median ms of nft -f of the same ruleset
    local plan=$1 text="$WORK/ruleset.nft" out=() t0 t1
    "$MEDUZA" dataplane ruleset --plan "$plan" >"$text"
    for _ in $(seq "$REPS"); do
        reset_nft
        t0=$(now_ns); nft -f "$text"; t1=$(now_ns)
        out+=($(( (t1 - t0) / 1000 )))
    done
    reset_nft
    printf '%s\n' "${out[@]}" | median
}

# The predecessor's tproxy.sh shape: a CLASH_TPROXY chain in mangle PREROUTING,
# one RETURN rule per exclusion, one TPROXY rule per source CIDR and protocol,
# one iptables process per rule, then ip rule/route.
ipt_script() { # plan json -> commands on stdout (one per line)
    python3 - "$1" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
for fam, cmd, any_ in (("4", "iptables", "0.0.0.0/0"), ("6", "ip6tables", "::/0")):
    v6 = fam == "6"
    mine = lambda nets: [n for n in nets if (":" in n) == v6]
    print(f"{cmd} -t mangle -N CLASH_TPROXY")
    for d in mine(p["bypass_dst"]):
        print(f"{cmd} -t mangle -A CLASH_TPROXY -d {d} -j RETURN")
    for s in mine(p["exclude_src"]):
        print(f"{cmd} -t mangle -A CLASH_TPROXY -s {s} -j RETURN")
    for i in p["exclude_ifaces"]:
        print(f"{cmd} -t mangle -A CLASH_TPROXY -i {i} -j RETURN")
    for port in p["exclude_ports"]:
        for proto in ("tcp", "udp"):
            print(f"{cmd} -t mangle -A CLASH_TPROXY -p {proto} --dport {port} -j RETURN")
    ip = "::1" if v6 else "127.0.0.1"
    for s in mine(p["proxy_src"]):
        for proto in ("tcp", "udp"):
            print(f"{cmd} -t mangle -A CLASH_TPROXY -s {s} -p {proto} -j TPROXY "
                  f"--on-port 7893 --on-ip {ip} --tproxy-mark 0x1/0x1")
    print(f"{cmd} -t mangle -A PREROUTING -j CLASH_TPROXY")
    print(f"ip -{fam} rule add fwmark 1 lookup 100")
    print(f"ip -{fam} route add local default dev lo table 100")
PY
}

reset_ipt() {
    for cmd in iptables ip6tables; do
        $cmd -t mangle -F 2>/dev/null || true
        $cmd -t mangle -X 2>/dev/null || true
    done
    for fam in 4 6; do
        ip -$fam rule del fwmark 1 lookup 100 2>/dev/null || true
        ip -$fam route flush table 100 2>/dev/null || true
    done
}

time_ipt() { # plan -> median ms
    local plan=$1 cmds="$WORK/ipt.txt" out=() t0 t1 line
    ipt_script "$plan" >"$cmds"
    if [ "$IPT_REPS" -eq 0 ]; then echo 0; return; fi
    for _ in $(seq "$IPT_REPS"); do
        reset_ipt
        t0=$(now_ns)
        while IFS= read -r line; do
            # shellcheck disable=SC2086 # one command line per rule, split on spaces
            $line
        done <"$cmds"
        t1=$(now_ns)
        out+=($(( (t1 - t0) / 1000 )))
    done
    reset_ipt
    printf '%s\n' "${out[@]}" | median
}

ms() { awk -v us="$1" 'BEGIN { printf "%.1f ms", us / 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

echo "# dataplane apply benchmark ($(date -u +%Y-%m-%dT%H:%MZ), $(nft --version), kernel $(uname -r))"
echo "# medians of $REPS runs (iptables: $IPT_REPS), wall clock, in a fresh network namespace; load: $(cut -d' ' -f1-3 /proc/loadavg)"
for name in small big; do
    plan="$WORK/$name.json"
    rules=$(wc -l < <(ipt_script "$plan"))
    read -r o noop listed < <("$MEDUZA" dataplane bench --reps "$REPS" --plan "$plan" \
        | sed -E 's/apply_us=([0-9]+) noop_us=([0-9]+) listed_us=([0-9]+)/\1 \2 \3/')
    cli=$(time_ours "$plan")
    n=$(time_nft "$plan")
    i=$(time_ipt "$plan")
    echo "plan=$name  ours=$(ms "$o")  ours_cli=$(ms "$cli")  noop=$(ms "$noop")  listed=$(ms "$listed")  nft_f=$(ms "$n")  iptables($rules calls)=$(ms "$i")"
    echo "plan=$name  ours/nft=$(ratio "$o" "$n") (target <= 1.2)  ours_cli/nft=$(ratio "$cli" "$n")  iptables/ours=$(ratio "$i" "$o") (target >= 20; 0 = skipped)  load=$(cut -d' ' -f1 /proc/loadavg)"
done
