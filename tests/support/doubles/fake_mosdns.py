#!/usr/bin/python3
"""Test double of MosDNS v5 (IrineSistiana/mosdns), for machines without it.

Faithful to the interface meduza relies on (shared/reference/child-interfaces.md §2):

* argv: ``mosdns start -c <config> -d <workdir>`` (``--config``/``--dir`` too);
  ``-d`` changes the working directory *before* the config is loaded, so relative
  paths resolve against it; without ``-c`` it looks for ``config.{yaml,yml,json}``.
  ``mosdns version`` prints a version.
* The config is decoded strictly, like viper with ``ErrorUnused=true``: an unknown key
  at the top level, in a plugin entry or in the args of a plugin type this double
  knows is fatal (exit 1). Top level: ``log``, ``include``, ``plugins``, ``api``.
  Plugin tags must be unique and defined before they are referenced (``$tag`` in a
  sequence, ``entry:``, ``sets:``), and every rule file a ``domain_set``/``ip_set``
  (``files:``) or a sequence match (``&/path``) references must exist and parse
  (domain rules ``full:``/``domain:``/``regexp:``/``keyword:``; IP/CIDR lines).
* ``udp_server``/``tcp_server`` ``listen`` addresses are opened (a bind failure is
  fatal) and answer A queries: a name matched by a loaded ``domain_set`` gets
  ``FAKE_MOSDNS_MATCH_ANSWER`` (default 198.51.100.1), any other name
  ``FAKE_MOSDNS_ANSWER`` (default 198.51.100.2). Sequences are not executed; this
  is enough for a test to tell that the rule files were read.
* Only SIGINT and SIGTERM are handled (clean exit 0). There is no reload signal: SIGHUP
  keeps its default action and kills the process, as for the Go program.

Python 3 standard library plus PyYAML (Debian ``python3-yaml``).
"""

import ipaddress
import json
import os
import re
import signal
import socket
import sys
import threading
import time

import yaml

VERSION = "v5.3.4-fake"
TOP_KEYS = {"log", "include", "plugins", "api"}
PLUGIN_KEYS = {"tag", "type", "args"}
ARG_KEYS = {
    "forward": {"upstreams", "concurrent"},
    "cache": {"size", "lazy_cache_ttl", "dump_file", "dump_interval"},
    "domain_set": {"exps", "sets", "files"},
    "ip_set": {"ips", "sets", "files"},
    "udp_server": {"entry", "listen"},
    "tcp_server": {"entry", "listen", "cert", "key", "idle_timeout"},
    "hosts": {"entries", "files"},
    "fallback": {"primary", "secondary", "threshold", "always_standby"},
}
UPSTREAM_KEYS = {
    "tag", "addr", "dial_addr", "trusted", "socks5", "idle_timeout", "enable_pipeline",
    "enable_http3", "insecure_skip_verify", "so_mark", "bind_to_device", "bootstrap",
    "bootstrap_version", "max_conns",
}
OTHER_TYPES = {
    "sequence", "arbitrary", "black_hole", "ecs_handler", "forward_edns0opt", "ipset",
    "nftset", "query_summary", "redirect", "reverse_lookup", "ttl", "dual_selector",
    "metrics_collector", "http_server", "quic_server", "drop_resp", "debug_print", "sleep",
    "qname", "qtype", "qclass", "client_ip", "resp_ip", "ptr_ip", "cname", "mark", "env",
    "random", "has_resp", "has_wanted_ans", "rcode", "string_exp",
}
QUICK_SETUP = {
    "accept", "reject", "return", "goto", "jump", "mark", "drop_resp", "forward", "cache",
    "ttl", "sleep", "debug_print", "query_summary", "black_hole", "ecs", "ipset",
    "nftset", "qname", "qtype", "qclass", "client_ip", "resp_ip", "ptr_ip", "cname",
    "has_resp", "has_wanted_ans", "rcode", "random", "env", "string_exp", "_true", "_false",
}


class Fatal(Exception):
    pass


def log(level, msg, **fields):
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    extra = f"\t{json.dumps(fields)}" if fields else ""
    print(f"{ts}\t{level}\t{msg}{extra}", flush=True)


def load_file(path):
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except OSError as err:
        raise Fatal(f"failed to read config: {err}") from err
    except yaml.YAMLError as err:
        raise Fatal(f"failed to parse config {path}: {err}") from err
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise Fatal(f"config {path} is not a mapping")
    unknown = sorted(set(doc) - TOP_KEYS)
    if unknown:
        raise Fatal(f"failed to decode config {path}: '' has invalid keys: {', '.join(unknown)}")
    plugins = []
    for inc in doc.get("include") or []:
        plugins.extend(load_file(inc))
    own = doc.get("plugins") or []
    if not isinstance(own, list):
        raise Fatal(f"config {path}: plugins is not a list")
    plugins.extend(own)
    return plugins


def read_domain_rules(path):
    rules = []
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as err:
        raise Fatal(f"failed to load domain file {path}: {err}") from err
    for num, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        rules.append(parse_rule(line, path, num))
    return rules


def parse_rule(line, where, num):
    kind, sep, value = line.partition(":")
    if not sep or kind not in ("full", "domain", "regexp", "keyword"):
        kind, value = "domain", line
    value = value.strip()
    if kind == "regexp":
        try:
            return (kind, re.compile(value))
        except re.error as err:
            raise Fatal(f"{where}:{num}: invalid regexp {value!r}: {err}") from err
    return (kind, value.lower().rstrip("."))


def read_ip_rules(path):
    nets = []
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as err:
        raise Fatal(f"failed to load ip file {path}: {err}") from err
    for num, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            nets.append(ipaddress.ip_network(line, strict=False))
        except ValueError as err:
            raise Fatal(f"{path}:{num}: invalid ip or cidr {line!r}") from err
    return nets


def domain_match(rules, name):
    name = name.lower().rstrip(".")
    for kind, value in rules:
        if kind == "full" and name == value:
            return True
        if kind == "domain" and (name == value or name.endswith("." + value)):
            return True
        if kind == "keyword" and value in name:
            return True
        if kind == "regexp" and value.search(name):
            return True
    return False


def check_refs(tag, tokens, defined):
    for token in tokens:
        word = token.lstrip("!")
        if word.startswith("$") and word[1:] not in defined:
            raise Fatal(f"plugin {tag}: plugin tag {word[1:]!r} not found (define it earlier)")


def build(plugins):
    """Validate plugins in file order and collect what the servers need."""
    defined = {}
    domain_rules = []
    servers = []
    for idx, plugin in enumerate(plugins):
        if not isinstance(plugin, dict):
            raise Fatal(f"plugin #{idx} is not a mapping")
        unknown = sorted(set(plugin) - PLUGIN_KEYS)
        if unknown:
            raise Fatal(f"plugin #{idx}: has invalid keys: {', '.join(unknown)}")
        tag = plugin.get("tag") or ""
        typ = plugin.get("type") or ""
        args = plugin.get("args")
        if not tag:
            raise Fatal(f"plugin #{idx}: missing tag")
        if tag in defined:
            raise Fatal(f"duplicated plugin tag {tag}")
        if typ not in ARG_KEYS and typ not in OTHER_TYPES:
            raise Fatal(f"plugin {tag}: unknown plugin type {typ!r}")
        if typ in ARG_KEYS:
            if args is None:
                args = {}
            if not isinstance(args, dict):
                raise Fatal(f"plugin {tag}: args is not a mapping")
            unknown = sorted(set(args) - ARG_KEYS[typ])
            if unknown:
                raise Fatal(f"plugin {tag}: failed to decode args: '' has invalid keys: {', '.join(unknown)}")
        if typ == "forward":
            ups = args.get("upstreams") or []
            if not ups:
                raise Fatal(f"plugin {tag}: no upstream")
            for up in ups:
                bad = sorted(set(up) - UPSTREAM_KEYS)
                if bad:
                    raise Fatal(f"plugin {tag}: upstream has invalid keys: {', '.join(bad)}")
                if not up.get("addr"):
                    raise Fatal(f"plugin {tag}: upstream addr is required")
        elif typ == "domain_set":
            check_refs(tag, ["$" + s for s in args.get("sets") or []], defined)
            rules = [parse_rule(str(e), f"plugin {tag} exps", 0) for e in args.get("exps") or []]
            for path in args.get("files") or []:
                rules.extend(read_domain_rules(path))
            for sub in args.get("sets") or []:
                rules.extend(defined[sub].get("rules", []))
            domain_rules.extend(rules)
            defined[tag] = {"type": typ, "rules": rules}
            log("info", "domain set loaded", tag=tag, rules=len(rules))
            continue
        elif typ == "ip_set":
            check_refs(tag, ["$" + s for s in args.get("sets") or []], defined)
            for ip in args.get("ips") or []:
                try:
                    ipaddress.ip_network(str(ip), strict=False)
                except ValueError as err:
                    raise Fatal(f"plugin {tag}: invalid ip {ip!r}") from err
            for path in args.get("files") or []:
                read_ip_rules(path)
        elif typ in ("udp_server", "tcp_server"):
            entry = args.get("entry") or ""
            if not entry:
                raise Fatal(f"plugin {tag}: missing entry")
            check_refs(tag, ["$" + entry.lstrip("$")], defined)
            if not args.get("listen"):
                raise Fatal(f"plugin {tag}: missing listen")
            servers.append((typ, str(args["listen"])))
        elif typ == "sequence":
            if not isinstance(args, list):
                raise Fatal(f"plugin {tag}: sequence args must be a list")
            for rule in args:
                if not isinstance(rule, dict) or set(rule) - {"matches", "exec"}:
                    raise Fatal(f"plugin {tag}: invalid sequence rule {rule!r}")
                matches = rule.get("matches") or []
                if isinstance(matches, str):
                    matches = [matches]
                for match in matches:
                    words = str(match).split()
                    check_refs(tag, words, defined)
                    for word in words[1:]:
                        if word.startswith("&"):
                            domain_rules.extend(read_domain_rules(word[1:]))
                exec_ = str(rule.get("exec") or "")
                words = exec_.split()
                if words:
                    check_refs(tag, words[:1], defined)
                    if not words[0].startswith("$") and words[0] not in QUICK_SETUP:
                        raise Fatal(f"plugin {tag}: unknown quick setup {words[0]!r}")
        defined[tag] = {"type": typ}
        log("info", "plugin loaded", tag=tag, type=typ)
    return domain_rules, servers


def answer(query, rules):
    if len(query) < 12 or int.from_bytes(query[4:6], "big") != 1:
        return None
    pos = 12
    labels = []
    while pos < len(query) and query[pos] != 0:
        size = query[pos]
        labels.append(query[pos + 1 : pos + 1 + size].decode("latin-1"))
        pos += size + 1
    pos += 1
    if pos + 4 > len(query):
        return None
    qtype = int.from_bytes(query[pos : pos + 2], "big")
    question = query[12 : pos + 4]
    body = b""
    if qtype == 1:
        if domain_match(rules, ".".join(labels)):
            addr = os.environ.get("FAKE_MOSDNS_MATCH_ANSWER", "198.51.100.1")
        else:
            addr = os.environ.get("FAKE_MOSDNS_ANSWER", "198.51.100.2")
        body = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + ipaddress.IPv4Address(addr).packed
    header = query[:2] + b"\x81\x80\x00\x01" + (b"\x00\x01" if body else b"\x00\x00") + b"\x00\x00\x00\x00"
    return header + question + body


def parse_listen(listen):
    if listen.startswith("["):
        host, _, port = listen[1:].partition("]:")
    else:
        host, _, port = listen.rpartition(":")
    return (host or "0.0.0.0"), int(port)


def serve(kind, listen, rules):
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if kind == "udp_server":
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((host, port))

        def loop():
            while True:
                data, peer = sock.recvfrom(4096)
                reply = answer(data, rules)
                if reply:
                    sock.sendto(reply, peer)

    else:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)

        def conn_loop(conn):
            try:
                while True:
                    head = conn.recv(2)
                    if len(head) < 2:
                        return
                    size = int.from_bytes(head, "big")
                    data = b""
                    while len(data) < size:
                        chunk = conn.recv(size - len(data))
                        if not chunk:
                            return
                        data += chunk
                    reply = answer(data, rules)
                    if not reply:
                        return
                    conn.sendall(len(reply).to_bytes(2, "big") + reply)
            except OSError:
                return
            finally:
                conn.close()

        def loop():
            while True:
                conn, _ = sock.accept()
                threading.Thread(target=conn_loop, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    log("info", f"{kind} started", addr=listen)


def parse_start_args(argv):
    opts = {"c": None, "d": None}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, _, value = arg.partition("=")
        key = {"-c": "c", "--config": "c", "-d": "d", "--dir": "d"}.get(name)
        if key is None:
            print(f'Error: unknown flag: {arg}', file=sys.stderr)
            sys.exit(1)
        if not value:
            i += 1
            if i >= len(argv):
                print(f"Error: flag needs an argument: {arg}", file=sys.stderr)
                sys.exit(1)
            value = argv[i]
        opts[key] = value
        i += 1
    return opts


def main(argv):
    if not argv or argv[0] not in ("start", "version"):
        print("Usage:\n  mosdns [command]\n\nAvailable Commands:\n  start\n  version", file=sys.stderr)
        return 1
    if argv[0] == "version":
        print(VERSION)
        return 0
    opts = parse_start_args(argv[1:])
    # Like mosdns: chdir to -d first, so a relative -c resolves against the workdir.
    config = opts["c"]
    # Before any server answers: a client that saw an answer may signal at once.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        if opts["d"]:
            os.chdir(opts["d"])
        if not config:
            config = next((c for c in ("config.yaml", "config.yml", "config.json") if os.path.exists(c)), None)
            if config is None:
                raise Fatal("failed to find config file config.* in working dir")
        log("info", "main config loaded", file=config)
        rules, servers = build(load_file(config))
        if not servers:
            log("warn", "no server plugin is loaded")
        for kind, listen in servers:
            serve(kind, listen, rules)
    except Fatal as err:
        log("fatal", "failed to start mosdns", error=str(err))
        return 1
    except OSError as err:
        log("fatal", "failed to start mosdns", error=str(err))
        return 1

    while not stop.wait(0.2):
        pass
    log("info", "mosdns exited", signal="terminated")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
