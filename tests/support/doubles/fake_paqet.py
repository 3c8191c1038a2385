#!/usr/bin/python3
"""Test double of paqet (github.com/hanselime/paqet, v1.0.0-alpha), for machines
without it (no registry here ships it).

Faithful to the interface meduza relies on, read from paqet's sources
(cmd/main.go, cmd/run/*.go, internal/conf/*.go, internal/flog/flog.go):

* argv: ``paqet run [-c|--config FILE]`` (cobra; ``-c=FILE``, ``--config=FILE`` too),
  default ``config.yaml``; ``paqet version``. An unknown command or flag is an error
  (exit 1). ``dump``, ``ping`` and ``secret`` exist upstream but not in this double.
* The YAML is decoded like ``conf.LoadFromFile``: ``role`` must be ``client`` or
  ``server``; defaults are applied (log level ``none``, KCP mode ``fast``, MTU 1350,
  windows, block ``aes``, buffers, TCP flags ``PA``); then every check of
  ``Conf.validate`` runs and all failures are reported together as
  ``validation failed:\\n  - ...``: log level, socks5/forward addresses, network
  interface (required, at most 15 characters, must exist in this network namespace),
  an IPv4 or IPv6 block with ``addr`` and ``router_mac`` (a MAC), matching ports,
  pcap sockbuf, TCP flag letters, transport protocol ``kcp`` with a ``kcp`` block,
  ``conn`` 1-256, KCP mode/MTU/windows/block, a key unless the block is none/null,
  smux buffers; a server needs ``listen.addr``; a client needs ``server.addr`` and an
  address block of the server's family. Unknown keys are ignored (go-yaml is not
  strict); a value of the wrong type is refused.
* A fatal error is printed by Go's ``log.Fatalf`` (``YYYY/MM/DD HH:MM:SS msg`` on
  stderr) and exits 1. Without CAP_NET_RAW pcap cannot open the interface: refused.
* Log lines go to stdout as ``YYYY-MM-DD HH:MM:SS.mmm [LEVEL] msg`` at or above
  ``log.level``.
* Behaviour: a client serves SOCKS5 on each ``socks5[].listen`` (username/password
  when set) and carries every CONNECT to the server; a server receives on
  ``network.ipv4.addr`` (the address and port paqet's pcap filter uses; the double
  binds it, so it must be an address of this host) and connects to the requested
  target. The carrier between the two doubles is NOT paqet's (KCP over crafted TCP
  packets): it is TCP from ``network.ipv4.addr``'s IP to ``server.addr``, opened with
  an HMAC preamble keyed by paqet's own key derivation (PBKDF2-SHA256 of ``key``,
  salt ``paqet``, 100000 rounds, 32 bytes) and the block name, so ends with different
  keys or blocks refuse each other (tunnel_wire.py).
* SIGINT/SIGTERM: ``shutdown signal received, shutting down...``, exit 0.
"""

import hashlib
import ipaddress
import os
import re
import signal
import socket
import sys
import threading
import time

import yaml

# No __pycache__ in the source tree (the shared module is imported from here).
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tunnel_wire  # noqa: E402

VERSION = "v1.0.0-alpha.21-fake"
LEVELS = {"none": -1, "debug": 0, "info": 1, "warn": 2, "error": 3, "fatal": 4}
LEVEL_NAMES = ["DEBUG", "INFO", "WARN", "ERROR", "FATAL"]
KCP_MODES = ["normal", "fast", "fast2", "fast3", "manual"]
BLOCKS = ["aes", "aes-128", "aes-128-gcm", "aes-192", "salsa20", "blowfish", "twofish",
          "cast5", "3des", "tea", "xtea", "xor", "sm4", "none", "null"]
MAGIC = b"PQD1"
LOG_LEVEL = 1


def fatal(msg):
    """Go's log.Fatalf."""
    ts = time.strftime("%Y/%m/%d %H:%M:%S")
    print(f"{ts} {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def flog(level, msg):
    lv = LEVELS[level]
    if LOG_LEVEL == -1 or lv < LOG_LEVEL:
        return
    now = time.time()
    ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
    print(f"{ts} [{LEVEL_NAMES[lv]}] {msg}", flush=True)


class Bad(Exception):
    pass


def typed(doc, path, kind, default=None):
    """doc[path...] checked against `kind` (str, int, bool, list, dict)."""
    cur = doc
    for p in path:
        if not isinstance(cur, dict) or p not in cur or cur[p] is None:
            return default
        cur = cur[p]
    want = {str: "string", int: "integer", bool: "boolean", list: "sequence", dict: "mapping"}[kind]
    ok = isinstance(cur, kind) and not (kind is int and isinstance(cur, bool))
    if not ok:
        raise Bad(f"cannot unmarshal {type(cur).__name__} into field {'.'.join(path)} of type {want}")
    return cur


def resolve_addr(addr, need_port):
    """net.ResolveUDPAddr("udp", addr) + the port check of conf.validateAddr."""
    if not addr:
        raise Bad("address is required")
    m = re.fullmatch(r"\[([^\]]*)\]:(\d*)|([^:\[\]]*):(\d*)", addr)
    if not m:
        raise Bad(f"invalid address '{addr}': missing port in address")
    host = m.group(1) if m.group(1) is not None else m.group(3)
    port_s = m.group(2) if m.group(1) is not None else m.group(4)
    try:
        port = int(port_s) if port_s else 0
        if port > 65535:
            raise ValueError
    except ValueError:
        raise Bad(f"invalid address '{addr}': invalid port") from None
    ip = None
    if host:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            try:
                ip = ipaddress.ip_address(socket.gethostbyname(host))
            except OSError as err:
                raise Bad(f"invalid address '{addr}': {err}") from None
    if need_port and not 1 <= port <= 65535:
        raise Bad("port must be between 1-65535")
    return ip, port


def parse_mac(mac):
    """net.ParseMAC: 6, 8 or 20 octets with ':' or '-', or dotted groups of four."""
    if re.fullmatch(r"([0-9A-Fa-f]{2}[:-]){5}[0-9A-Fa-f]{2}", mac or "") or re.fullmatch(
        r"([0-9A-Fa-f]{2}[:-]){7}[0-9A-Fa-f]{2}", mac or ""
    ) or re.fullmatch(r"([0-9A-Fa-f]{2}[:-]){19}[0-9A-Fa-f]{2}", mac or "") or re.fullmatch(
        r"([0-9A-Fa-f]{4}\.){2}[0-9A-Fa-f]{4}", mac or ""
    ):
        return mac
    raise Bad(f"invalid Router MAC address '{mac}': address {mac}: invalid MAC address")


def load(path):
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except OSError as err:
        raise Bad(f"open {path}: {err.strerror.lower()}") from None
    except yaml.YAMLError as err:
        raise Bad(str(err)) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise Bad("the configuration is not a mapping")
    role = typed(doc, ["role"], str, "")
    if role not in ("client", "server"):
        raise Bad("role must be 'client' or 'server'")
    return validate(doc, role)


def validate(doc, role):
    errs = []
    cfg = {"role": role}

    level = typed(doc, ["log", "level"], str, "") or "none"
    if level not in LEVELS:
        errs.append(f"invalid logging level '{level}': must be one of none, debug, info, warn, error, fatal")
    cfg["level"] = LEVELS.get(level, -1)

    socks = typed(doc, ["socks5"], list, [])
    cfg["socks5"] = []
    for i, s in enumerate(socks):
        if not isinstance(s, dict):
            raise Bad(f"socks5[{i}] is not a mapping")
        try:
            ip, port = resolve_addr(typed(s, ["listen"], str, ""), True)
            cfg["socks5"].append((str(ip or "0.0.0.0"), port, typed(s, ["username"], str, ""),
                                  typed(s, ["password"], str, "")))
        except Bad as err:
            errs.append(f"socks5[{i}] {err}")
    for i, f in enumerate(typed(doc, ["forward"], list, [])):
        errs.append(f"forward[{i}] port forwarding is not implemented by this double")
    if role == "client" and not socks:
        flog("warn", "client mode enabled but no SOCKS5 or forward configurations found")

    iface = typed(doc, ["network", "interface"], str, "")
    if not iface:
        errs.append("network interface is required")
    if len(iface) > 15:
        errs.append(f"network interface name too long (max 15 characters): '{iface}'")
    try:
        socket.if_nametoindex(iface)
    except OSError:
        errs.append(f"failed to find network interface {iface}: route ip+net: no such network interface")
    fams = {}
    for fam in ("ipv4", "ipv6"):
        addr = typed(doc, ["network", fam, "addr"], str, "")
        if addr:
            try:
                ip, port = resolve_addr(addr, False)
                fams[fam] = (ip, port)
            except Bad as err:
                errs.append(str(err))
            mac = typed(doc, ["network", fam, "router_mac"], str, "")
            if not mac:
                errs.append("router MAC address is required")
            try:
                parse_mac(mac)
            except Bad as err:
                errs.append(str(err))
    if not typed(doc, ["network", "ipv4", "addr"], str, "") and not typed(doc, ["network", "ipv6", "addr"], str, ""):
        errs.append("at least one address family (IPv4 or IPv6) must be configured")
    if "ipv4" in fams and "ipv6" in fams and fams["ipv4"][1] != fams["ipv6"][1]:
        errs.append(f"IPv4 port ({fams['ipv4'][1]}) and IPv6 port ({fams['ipv6'][1]}) must match when both are configured")
    cfg["local"] = fams.get("ipv4") or fams.get("ipv6")
    sockbuf = typed(doc, ["network", "pcap", "sockbuf"], int, 0) or (8 << 20 if role == "server" else 4 << 20)
    if sockbuf < 1024:
        errs.append("PCAP sockbuf must be >= 1024 bytes")
    if sockbuf > 100 << 20:
        errs.append("PCAP sockbuf too large (max 100MB)")
    for side in ("local_flag", "remote_flag"):
        flags = typed(doc, ["network", "tcp", side], list, []) or ["PA"]
        for f in flags:
            bad = [c for c in str(f) if c not in "FSRPAUECN"]
            if bad:
                errs.append(f"invalid TCP flag '{bad[0]}' in combination")
        if len(flags) > 64:
            errs.append(f"{side} exceeds max 64")

    proto = typed(doc, ["transport", "protocol"], str, "")
    if proto != "kcp":
        errs.append("transport protocol must be one of: [kcp]")
    conn = typed(doc, ["transport", "conn"], int, 0) or 1
    if not 1 <= conn <= 256:
        errs.append("KCP conn must be between 1-256 connections")
    kcp = typed(doc, ["transport", "kcp"], dict, None)
    cfg["block"], cfg["key"] = "aes", ""
    if proto == "kcp" and kcp is None:
        errs.append("transport.kcp configuration is required")
    elif kcp is not None:
        mode = typed(kcp, ["mode"], str, "") or "fast"
        if mode not in KCP_MODES:
            errs.append(f"KCP mode must be one of: [{' '.join(KCP_MODES)}]")
        mtu = typed(kcp, ["mtu"], int, 0) or 1350
        if not 50 <= mtu <= 1500:
            errs.append("KCP MTU must be between 50-1500 bytes")
        for w, dflt in (("rcvwnd", 1024 if role == "server" else 512), ("sndwnd", 1024 if role == "server" else 128)):
            v = typed(kcp, [w], int, 0) or dflt
            if not 1 <= v <= 32768:
                errs.append(f"KCP {w} must be between 1-32768")
        block = typed(kcp, ["block"], str, "") or "aes"
        if block not in BLOCKS:
            errs.append(f"KCP encryption block must be one of: [{' '.join(BLOCKS)}]")
        key = typed(kcp, ["key"], str, "")
        if block not in ("none", "null") and not key:
            errs.append("KCP encryption key is required")
        for b, dflt in (("smuxbuf", 4 << 20), ("streambuf", 2 << 20)):
            if (typed(kcp, [b], int, 0) or dflt) < 1024:
                errs.append(f"KCP {b} must be >= 1024 bytes")
        cfg["block"], cfg["key"] = block, key

    if role == "server":
        try:
            _, cfg["listen_port"] = resolve_addr(typed(doc, ["listen", "addr"], str, ""), True)
        except Bad as err:
            errs.append(str(err))
    else:
        try:
            ip, port = resolve_addr(typed(doc, ["server", "addr"], str, ""), True)
            cfg["server"] = (str(ip), port)
            fam = "ipv4" if ip.version == 4 else "ipv6"
            if fam not in fams:
                errs.append(f"server address is {fam[:2].upper()}{fam[2:]}, but the {fam[:2].upper()}{fam[2:]} interface is not configured")
        except Bad as err:
            errs.append(str(err))
        if conn > 1 and cfg["local"] and cfg["local"][1] != 0:
            errs.append("only one connection is allowed when a client port is explicitly set")
    if errs:
        raise Bad("validation failed:\n  - " + "\n  - ".join(errs))
    return cfg


def parse_args(argv):
    """cobra: `run` with -c/--config; `version`."""
    if not argv:
        print("paqet is a bidirectional packet-level proxy using KCP and raw socket transport with encryption.\n\n"
              "Usage:\n  paqet [command]\n\nAvailable Commands:\n  dump\n  ping\n  run\n  secret\n  version")
        sys.exit(0)
    cmd, rest = argv[0], argv[1:]
    if cmd == "version":
        print(f"paqet {VERSION}")
        sys.exit(0)
    if cmd in ("dump", "ping", "secret"):
        fatal(f"the `{cmd}` command is not implemented by this double")
    if cmd != "run":
        print(f'Error: unknown command "{cmd}" for "paqet"', file=sys.stderr)
        fatal(f'unknown command "{cmd}" for "paqet"')
    config = "config.yaml"
    i = 0
    while i < len(rest):
        a = rest[i]
        if a in ("-c", "--config"):
            if i + 1 >= len(rest):
                print(f"Error: flag needs an argument: {a!r}", file=sys.stderr)
                fatal(f"flag needs an argument: {a!r}")
            config, i = rest[i + 1], i + 2
        elif a.startswith("--config="):
            config, i = a[len("--config="):], i + 1
        elif a.startswith("-c") and not a.startswith("--"):
            config, i = a[2:].removeprefix("="), i + 1
        elif a.startswith("-"):
            print(f"Error: unknown flag: {a}", file=sys.stderr)
            fatal(f"unknown flag: {a}")
        else:
            # cobra accepts stray positional arguments for `run` (no Args validator).
            i += 1
    return config


def main(argv):
    global LOG_LEVEL
    config = parse_args(argv)
    try:
        cfg = load(config)
    except Bad as err:
        fatal(f"failed to parse configuration: {err}")
    LOG_LEVEL = cfg["level"]
    if not tunnel_wire.has_effective_cap(13):
        who = "client" if cfg["role"] == "client" else "server"
        fatal(f"failed to initialize {who}: failed to create send handle: "
              "socket: operation not permitted (pcap needs CAP_NET_RAW)")
    # paqet's key derivation (internal/conf/kcp_block.go), bound to the block type.
    secret = hashlib.pbkdf2_hmac("sha256", cfg["key"].encode(), b"paqet", 100_000, 32)
    secret = hashlib.sha256(secret + cfg["block"].encode()).digest()
    local_ip, local_port = cfg["local"]
    local_ip = str(local_ip) if local_ip else ""
    try:
        if cfg["role"] == "server":
            listener = tunnel_wire.listen_tcp(local_ip, local_port)
            tunnel_wire.serve_wire(listener, secret, MAGIC, flog)
            flog("info", f"server listening for packets on :{cfg['listen_port']}")
        else:
            def open_stream(host, port):
                return tunnel_wire.dial_wire(cfg["server"], secret, MAGIC, host, port, local_ip or None)

            for host, port, user, pw in cfg["socks5"]:
                listener = tunnel_wire.listen_tcp(host, port)
                tunnel_wire.serve_socks5(listener, open_stream, flog, user, pw)
                flog("info", f"SOCKS5 server listening on {host}:{port}")
    except OSError as err:
        fatal(f"{cfg['role']} encountered an error: {err}")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.2):
        pass
    print(time.strftime("%Y/%m/%d %H:%M:%S") + " shutdown signal received, shutting down...",
          file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
