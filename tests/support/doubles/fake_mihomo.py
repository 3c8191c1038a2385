#!/usr/bin/python3
"""Test double of mihomo (MetaCubeX/mihomo), for machines without it (Debian ships none).

Faithful to the interface meduza relies on (docs: shared/reference/child-interfaces.md §1):

* argv: ``-d DIR -f FILE [-ext-ctl ADDR] [-secret S] [-t] [-v]`` (Go ``flag`` style;
  ``--flag`` and ``-flag=value`` work too). An unknown flag exits 2 like Go's flag package.
* The YAML config keys ``mixed-port``, ``tproxy-port``, ``allow-lan``, ``bind-address``,
  ``external-controller``, ``secret``, ``routing-mark``, ``dns.{enable,listen}``,
  ``proxies``, ``proxy-groups`` (``select``/``url-test``/``fallback``/``load-balance``,
  with ``proxies`` and ``use``) and ``proxy-providers`` (members read from ``path`` when a
  config is applied, not when the file changes; listed in ``GET /proxies`` with their
  ``provider-name``, like mihomo's ``ProxiesWithProviders``).
* REST API with ``Authorization: Bearer <secret>`` (401 ``{"message":"Unauthorized"}``
  otherwise): ``GET /``, ``GET /version``, ``GET /proxies``, ``GET|PUT /proxies/{name}``,
  ``GET|PUT /configs`` (``PUT`` with ``{"payload"}`` or ``{"path"}``: 400 on a parse
  error or a relative path, else 204 even when applying fails), ``GET /traffic`` (one
  JSON line per second, never ends), ``GET|DELETE /connections``.
* SIGHUP re-reads the ``-f`` file ("Parse config error" and keep running on failure);
  SIGTERM/SIGINT exit 0.
* Listeners: the mixed port (HTTP CONNECT, plain HTTP proxy, SOCKS5 CONNECT) really
  forwards; the TPROXY port (TCP, IPv4 and IPv6) sets IP_TRANSPARENT and relays to the
  original destination (``getsockname()``); DNS (UDP and TCP) on ``dns.listen``
  answers every A query with a fixed address.

Double-only knobs (environment, never flags, so the argv stays mihomo's):

* ``FAKE_MIHOMO_CONTROL=/path/control.json`` — polled every 20 ms; write it atomically.
  Keys: ``"groups": {"<URLTest group>": "REJECT" | "" | "healthy" | "<member>"}``,
  ``"reject_all": true`` (every URLTest group ``now: "REJECT"``), ``"stall_api": true``
  (accept API connections, never answer while set), ``"fail_apply": true`` (``PUT
  /configs`` answers 204 but applies nothing), ``"exit": <code>`` (exit at once with
  that code), ``"tproxy_marker": true`` (answer TPROXY'd connections with
  ``fake-mihomo tproxy <orig-dst>\\n`` instead of relaying).
* ``FAKE_MIHOMO_OUTBOUND_BIND=127.0.0.2`` — source address of every outgoing connection,
  so a test server on loopback can tell a proxied request from a direct one.
* ``FAKE_MIHOMO_DNS_ANSWER=198.18.0.1`` — the address every A query gets.
* ``FAKE_MIHOMO_FETCH_PROVIDERS=1`` — an ``http`` provider whose ``path`` file is
  missing is downloaded from its ``url`` (directly, as mihomo's first fetch of a
  provider does) and saved there before it is loaded, as real mihomo does at start.
  Off by default: the namespace tests give the double its provider files themselves.

Plain HTTP proxying adds ``Via: 1.1 fake-mihomo`` to the forwarded request.
Python 3 standard library plus PyYAML (Debian ``python3-yaml``).
"""

import ipaddress
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import ThreadingMixIn, TCPServer, BaseRequestHandler

import yaml

VERSION = "v1.19.0-fake"
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SO_MARK = 36
DEFAULT_TEST_URL = "https://www.gstatic.com/generate_204"

BUILTINS = [
    ("DIRECT", "Direct", True),
    ("REJECT", "Reject", True),
    ("REJECT-DROP", "RejectDrop", True),
    ("COMPATIBLE", "Compatible", True),
    ("PASS", "Pass", True),
]
GROUP_TYPES = {
    "select": "Selector",
    "url-test": "URLTest",
    "fallback": "Fallback",
    "load-balance": "LoadBalance",
    "relay": "Relay",
}
PROXY_TYPES = {
    "ss": "Shadowsocks",
    "ssr": "ShadowsocksR",
    "vmess": "Vmess",
    "vless": "Vless",
    "trojan": "Trojan",
    "socks5": "Socks5",
    "http": "Http",
    "snell": "Snell",
    "hysteria": "Hysteria",
    "hysteria2": "Hysteria2",
    "tuic": "Tuic",
    "wireguard": "WireGuard",
    "direct": "Direct",
}


def log(level, msg):
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    print(f'time="{ts}" level={level} msg="{msg}"', flush=True)


def iso_now():
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())


class ConfigError(Exception):
    pass


def parse_config(text):
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"unmarshal config: {err}") from err
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise ConfigError("config is not a mapping")
    for key in ("proxies", "proxy-groups"):
        if key in cfg and cfg[key] is not None and not isinstance(cfg[key], list):
            raise ConfigError(f"{key} is not a list")
    names = set(n for n, _, _ in BUILTINS)
    for proxy in cfg.get("proxies") or []:
        if not isinstance(proxy, dict) or "name" not in proxy or "type" not in proxy:
            raise ConfigError(f"proxy {proxy!r}: missing name or type")
        names.add(proxy["name"])
    groups = cfg.get("proxy-groups") or []
    providers = cfg.get("proxy-providers") or {}
    if not isinstance(providers, dict):
        raise ConfigError("proxy-providers is not a mapping")
    group_names = set()
    for group in groups:
        if not isinstance(group, dict) or "name" not in group or "type" not in group:
            raise ConfigError(f"proxy group {group!r}: missing name or type")
        if group["type"] not in GROUP_TYPES:
            raise ConfigError(f"proxy group {group['name']}: unsupported type {group['type']}")
        group_names.add(group["name"])
    names |= group_names
    for group in groups:
        for member in group.get("proxies") or []:
            if member not in names:
                raise ConfigError(f"proxy group[{group['name']}]: '{member}' not found")
        for provider in group.get("use") or []:
            if provider not in providers:
                raise ConfigError(f"proxy group[{group['name']}]: proxy provider {provider} not found")
    return cfg


def split_hostport(addr, default_host="127.0.0.1"):
    addr = str(addr)
    if addr.startswith("["):
        host, _, port = addr[1:].partition("]:")
    else:
        host, _, port = addr.rpartition(":")
    if host in ("", "*"):
        host = default_host
    return host, int(port)


class State:
    def __init__(self, home, config_path, ext_ctl, secret_override):
        self.lock = threading.RLock()
        self.home = home
        self.config_path = config_path
        self.ext_ctl = ext_ctl
        self.secret_override = secret_override
        self.cfg = {}
        # Provider name -> its proxies (mappings), loaded when a config is applied.
        self.providers = {}
        self.control = {}
        self.up_total = 0
        self.down_total = 0
        self.conns = {}
        self.next_conn = 0
        self.controller = None
        self.controller_addr = None
        self.listeners = {}

    # ---- configuration -------------------------------------------------------------
    def secret(self):
        if self.secret_override is not None:
            return self.secret_override
        return str(self.cfg.get("secret") or "")

    def controller_address(self):
        return self.ext_ctl or self.cfg.get("external-controller") or ""

    def listen_host(self):
        if self.cfg.get("allow-lan"):
            bind = str(self.cfg.get("bind-address", "*"))
            return "0.0.0.0" if bind in ("*", "") else bind
        return "127.0.0.1"

    def load_provider(self, name, provider):
        """A provider's proxies as mihomo's fetcher loads them when a config is applied:
        from the local ``path`` file; a file without a ``proxies`` list loads nothing
        ("file must have a `proxies` field"). Later changes to the file are not seen
        until the next apply (SIGHUP or ``PUT /configs``)."""
        path = (provider or {}).get("path")
        if not path:
            return []
        if not os.path.isabs(path):
            path = os.path.join(self.home, path)
        url = (provider or {}).get("url")
        fetch = os.environ.get("FAKE_MIHOMO_FETCH_PROVIDERS") == "1"
        if fetch and url and provider.get("type") == "http" and not os.path.exists(path):
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    body = resp.read()
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path + ".tmp", "wb") as fh:
                    fh.write(body)
                os.replace(path + ".tmp", path)
            except OSError as err:
                log("warning", f"[Provider] {name} pull error: {err}")
        try:
            with open(path, encoding="utf-8") as fh:
                doc = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as err:
            log("warning", f"[Provider] {name} load error: {err}")
            return []
        if not isinstance(doc, dict) or not isinstance(doc.get("proxies"), list):
            log("error", f"[Provider] {name} initial error: file must have a `proxies` field")
            return []
        proxies = [p for p in doc["proxies"] if isinstance(p, dict) and "name" in p and "type" in p]
        log("info", f"[Provider] {name} loaded {len(proxies)} proxies from {path}")
        return proxies

    def provider_members(self, name):
        return [p["name"] for p in self.providers.get(name) or []]

    def group_members(self, group):
        members = list(group.get("proxies") or [])
        for provider in group.get("use") or []:
            members.extend(self.provider_members(provider))
        if not members:
            members = ["COMPATIBLE"]
        return members

    def urltest_now(self, group, members):
        forced = (self.control.get("groups") or {}).get(group["name"])
        if self.control.get("reject_all"):
            forced = "REJECT"
        if forced is None or forced == "healthy":
            return members[0]
        return forced

    def proxies_json(self):
        with self.lock:
            out = {}
            history = [{"time": iso_now(), "delay": 42}]
            for name, typ, udp in BUILTINS:
                out[name] = base_entry(name, typ, udp, [])
            for proxy in self.cfg.get("proxies") or []:
                typ = PROXY_TYPES.get(str(proxy["type"]).lower(), str(proxy["type"]).capitalize())
                out[proxy["name"]] = base_entry(proxy["name"], typ, bool(proxy.get("udp")), history)
            # Provider proxies too (mihomo's tunnel.ProxiesWithProviders).
            for provider, members in self.providers.items():
                for proxy in members:
                    typ = PROXY_TYPES.get(str(proxy["type"]).lower(), str(proxy["type"]).capitalize())
                    entry = base_entry(proxy["name"], typ, bool(proxy.get("udp")), history)
                    entry["provider-name"] = provider
                    out[proxy["name"]] = entry
            group_names = []
            for group in self.cfg.get("proxy-groups") or []:
                typ = GROUP_TYPES[group["type"]]
                members = self.group_members(group)
                entry = base_entry(group["name"], typ, True, history)
                entry.update({"all": members, "hidden": bool(group.get("hidden")), "icon": ""})
                if typ != "LoadBalance" and typ != "Relay":
                    entry["now"] = members[0]
                if typ in ("URLTest", "Fallback"):
                    entry["testUrl"] = group.get("url", DEFAULT_TEST_URL)
                    entry["fixed"] = ""
                    entry["expectedStatus"] = "*"
                if typ == "URLTest":
                    entry["now"] = self.urltest_now(group, members)
                    if entry["now"] in ("", "REJECT"):
                        entry["alive"] = False
                        entry["history"] = [{"time": iso_now(), "delay": 0}]
                out[group["name"]] = entry
                group_names.append(group["name"])
            all_names = [n for n, _, _ in BUILTINS] + group_names
            all_names += [p["name"] for p in self.cfg.get("proxies") or []]
            glob = base_entry("GLOBAL", "Selector", True, [])
            glob.update({"all": all_names, "now": "DIRECT", "hidden": True, "icon": ""})
            out["GLOBAL"] = glob
            return {"proxies": out}

    def configs_json(self):
        with self.lock:
            dns = self.cfg.get("dns") or {}
            return {
                "port": 0,
                "socks-port": 0,
                "redir-port": 0,
                "tproxy-port": int(self.cfg.get("tproxy-port") or 0),
                "mixed-port": int(self.cfg.get("mixed-port") or 0),
                "allow-lan": bool(self.cfg.get("allow-lan")),
                "bind-address": str(self.cfg.get("bind-address", "*")),
                "mode": str(self.cfg.get("mode", "rule")).lower(),
                "log-level": str(self.cfg.get("log-level", "info")),
                "ipv6": bool(self.cfg.get("ipv6")),
                "dns": {"enable": bool(dns.get("enable")), "listen": str(dns.get("listen", ""))},
            }

    def apply(self, cfg, source):
        """ApplyConfig: swap the config and re-open listeners whose address changed.

        Listener failures are only logged, as in mihomo (the API still answers 204)."""
        providers = {
            name: self.load_provider(name, provider)
            for name, provider in (cfg.get("proxy-providers") or {}).items()
        }
        with self.lock:
            self.cfg = cfg
            self.providers = providers
        host = self.listen_host()
        wanted = {}
        if cfg.get("mixed-port"):
            wanted["mixed"] = (host, int(cfg["mixed-port"]))
        if cfg.get("tproxy-port"):
            wanted["tproxy"] = (host, int(cfg["tproxy-port"]))
            if cfg.get("allow-lan"):
                wanted["tproxy6"] = ("::", int(cfg["tproxy-port"]))
        dns = cfg.get("dns") or {}
        if dns.get("enable") and dns.get("listen"):
            wanted["dns"] = split_hostport(dns["listen"], "0.0.0.0")
        for kind in list(self.listeners):
            addr, closers = self.listeners[kind]
            if wanted.get(kind) != addr:
                for close in closers:
                    close()
                del self.listeners[kind]
        for kind, addr in wanted.items():
            if kind in self.listeners:
                continue
            try:
                closers = START[kind](self, addr)
                self.listeners[kind] = (addr, closers)
                log("info", f"{LABEL[kind]} listening at: {fmt_addr(addr)}")
            except OSError as err:
                log("error", f"Start {LABEL[kind]} server error: {err}")
        log("info", f"Configuration applied from {source}")

    def restart_controller(self):
        addr = self.controller_address()
        if addr == self.controller_addr and self.controller is not None:
            return
        if self.controller is not None:
            self.controller.shutdown()
            self.controller.server_close()
            self.controller = None
        self.controller_addr = addr
        if not addr:
            return
        host, port = split_hostport(addr, "0.0.0.0")
        server_cls = ApiServer6 if ":" in host else ApiServer
        try:
            server = server_cls((host, port), ApiHandler)
        except OSError as err:
            log("error", f"External controller listen error: {err}")
            return
        server.state = self
        self.controller = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        log("info", f"RESTful API listening at: {fmt_addr((host, port))}")

    # ---- traffic accounting --------------------------------------------------------
    def open_conn(self, meta):
        with self.lock:
            self.next_conn += 1
            cid = f"fake-{self.next_conn:08d}"
            self.conns[cid] = {
                "id": cid,
                "metadata": meta,
                "upload": 0,
                "download": 0,
                "start": iso_now(),
                "chains": ["DIRECT"],
                "rule": "Match",
                "rulePayload": "",
            }
            return cid

    def count(self, cid, up, down):
        with self.lock:
            self.up_total += up
            self.down_total += down
            conn = self.conns.get(cid)
            if conn is not None:
                conn["upload"] += up
                conn["download"] += down

    def close_conn(self, cid):
        with self.lock:
            self.conns.pop(cid, None)


def base_entry(name, typ, udp, history):
    return {
        "name": name,
        "type": typ,
        "udp": udp,
        "xudp": False,
        "tfo": False,
        "mptcp": False,
        "smux": False,
        "alive": True,
        "history": list(history),
        "extra": {},
        "id": "",
        "interface": "",
        "dialer-proxy": "",
        "routing-mark": 0,
        "provider-name": "",
    }


def fmt_addr(addr):
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- REST API ----------------------------------------------------------------------
class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class ApiServer6(ApiServer):
    address_family = socket.AF_INET6


class ApiHandler(BaseHTTPRequestHandler):
    server_version = "mihomo"
    sys_version = ""

    def log_message(self, fmt, *args):
        pass

    def reply(self, code, body=None):
        data = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        self.send_response(code)
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body_json(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        return json.loads(raw)

    def gate(self):
        state = self.server.state
        while state.control.get("stall_api"):
            time.sleep(0.02)
        secret = state.secret()
        if not secret:
            return True
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        if self.headers.get("Upgrade", "").lower() == "websocket" and query.get("token") == [secret]:
            return True
        if self.headers.get("Authorization") == f"Bearer {secret}":
            return True
        self.reply(401, {"message": "Unauthorized"})
        return False

    def route(self):
        parts = urllib.parse.urlsplit(self.path)
        segs = [urllib.parse.unquote(s) for s in parts.path.split("/") if s]
        query = urllib.parse.parse_qs(parts.query)
        return segs, query

    def do_GET(self):
        if not self.gate():
            return
        state = self.server.state
        segs, _ = self.route()
        if not segs:
            return self.reply(200, {"hello": "mihomo"})
        if segs == ["version"]:
            return self.reply(200, {"meta": True, "version": VERSION})
        if segs == ["proxies"]:
            return self.reply(200, state.proxies_json())
        if len(segs) == 2 and segs[0] == "proxies":
            entry = state.proxies_json()["proxies"].get(segs[1])
            if entry is None:
                return self.reply(404, {"message": "resource not found"})
            return self.reply(200, entry)
        if segs == ["configs"]:
            return self.reply(200, state.configs_json())
        if segs == ["connections"]:
            with state.lock:
                snap = {
                    "downloadTotal": state.down_total,
                    "uploadTotal": state.up_total,
                    "connections": [dict(c) for c in state.conns.values()],
                    "memory": 0,
                }
            return self.reply(200, snap)
        if segs == ["traffic"]:
            return self.stream_traffic()
        return self.reply(404, {"message": "resource not found"})

    def stream_traffic(self):
        state = self.server.state
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        with state.lock:
            last_up, last_down = state.up_total, state.down_total
        try:
            while True:
                time.sleep(1)
                with state.lock:
                    up, down = state.up_total, state.down_total
                line = json.dumps({"up": up - last_up, "down": down - last_down}) + "\n"
                last_up, last_down = up, down
                self.wfile.write(line.encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return

    def do_PUT(self):
        if not self.gate():
            return
        state = self.server.state
        segs, _ = self.route()
        try:
            body = self.body_json()
        except (json.JSONDecodeError, ValueError):
            return self.reply(400, {"message": "Body invalid"})
        if segs == ["configs"]:
            return self.put_configs(state, body)
        if len(segs) == 2 and segs[0] == "proxies":
            group = next((g for g in state.cfg.get("proxy-groups") or [] if g["name"] == segs[1]), None)
            if group is None:
                return self.reply(404, {"message": "resource not found"})
            if group["type"] != "select":
                return self.reply(400, {"message": "Must be a Selector"})
            return self.reply(204)
        return self.reply(404, {"message": "resource not found"})

    def put_configs(self, state, body):
        payload = body.get("payload") or ""
        path = body.get("path") or ""
        if payload:
            text, source = payload, "payload"
        else:
            if path == "":
                path = state.config_path
            elif not os.path.isabs(path):
                return self.reply(400, {"message": "path is not a absolute path"})
            home = os.path.realpath(state.home)
            real = os.path.realpath(path)
            if os.environ.get("SKIP_SAFE_PATH_CHECK") != "1" and not real.startswith(home + os.sep):
                return self.reply(400, {"message": "path is not subpath of home directory"})
            try:
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
            except OSError as err:
                return self.reply(400, {"message": str(err)})
            source = path
        try:
            cfg = parse_config(text)
        except ConfigError as err:
            return self.reply(400, {"message": str(err)})
        if state.control.get("fail_apply"):
            log("error", "apply config failed (fail_apply set by the test)")
        else:
            state.apply(cfg, source)
        return self.reply(204)

    def do_DELETE(self):
        if not self.gate():
            return
        segs, _ = self.route()
        if segs and segs[0] == "connections":
            return self.reply(204)
        return self.reply(404, {"message": "resource not found"})


# ---- relays and outbound -----------------------------------------------------------
def dial(state, host, port):
    bind = os.environ.get("FAKE_MIHOMO_OUTBOUND_BIND")
    source = (bind, 0) if bind else None
    sock = socket.create_connection((host, port), timeout=10, source_address=source)
    mark = state.cfg.get("routing-mark")
    if mark:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, int(mark))
        except OSError as err:
            log("warning", f"set routing-mark: {err}")
    sock.settimeout(None)
    return sock


def relay(state, cid, client, upstream, first_up=b""):
    if first_up:
        upstream.sendall(first_up)
        state.count(cid, len(first_up), 0)
    socks = [client, upstream]
    try:
        while True:
            readable, _, _ = select.select(socks, [], [], 60)
            if not readable:
                return
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    return
                if sock is client:
                    upstream.sendall(data)
                    state.count(cid, len(data), 0)
                else:
                    client.sendall(data)
                    state.count(cid, 0, len(data))
    except OSError:
        return
    finally:
        state.close_conn(cid)
        for sock in socks:
            try:
                sock.close()
            except OSError:
                pass


class ThreadedTCP(ThreadingMixIn, TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class MixedHandler(BaseRequestHandler):
    def handle(self):
        state = self.server.state
        first = self.request.recv(1, socket.MSG_PEEK)
        if not first:
            return
        if first[0] == 5:
            return self.socks5(state)
        return self.http(state)

    def socks5(self, state):
        conn = self.request
        head = recv_exact(conn, 2)
        recv_exact(conn, head[1])
        conn.sendall(b"\x05\x00")
        ver, cmd, _, atyp = recv_exact(conn, 4)
        if atyp == 1:
            host = socket.inet_ntoa(recv_exact(conn, 4))
        elif atyp == 3:
            host = recv_exact(conn, recv_exact(conn, 1)[0]).decode()
        elif atyp == 4:
            host = socket.inet_ntop(socket.AF_INET6, recv_exact(conn, 16))
        else:
            return
        port = int.from_bytes(recv_exact(conn, 2), "big")
        if ver != 5 or cmd != 1:
            conn.sendall(b"\x05\x07\x00\x01" + bytes(6))
            return
        try:
            upstream = dial(state, host, port)
        except OSError as err:
            log("warning", f"[TCP] dial {host}:{port} error: {err}")
            conn.sendall(b"\x05\x05\x00\x01" + bytes(6))
            return
        conn.sendall(b"\x05\x00\x00\x01" + bytes(6))
        cid = state.open_conn(meta(self.client_address, host, port, "SOCKS5"))
        log("info", f"[TCP] {fmt_addr(self.client_address)} --> {host}:{port} match Match using DIRECT")
        relay(state, cid, conn, upstream)

    def http(self, state):
        conn = self.request
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = conn.recv(4096)
            if not chunk:
                return
            raw += chunk
            if len(raw) > 65536:
                return
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            return
        if method == "CONNECT":
            host, port = split_hostport(target)
            try:
                upstream = dial(state, host, port)
            except OSError as err:
                log("warning", f"[TCP] dial {target} error: {err}")
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\n")
                return
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            cid = state.open_conn(meta(self.client_address, host, port, "HTTPS"))
            log("info", f"[TCP] {fmt_addr(self.client_address)} --> {target} match Match using DIRECT")
            return relay(state, cid, conn, upstream, rest)
        url = urllib.parse.urlsplit(target)
        if url.scheme != "http" or not url.hostname:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            return
        port = url.port or 80
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        headers = []
        for line in lines[1:]:
            name = line.split(":", 1)[0].strip().lower()
            if name in ("proxy-connection", "proxy-authorization", "connection", "keep-alive"):
                continue
            headers.append(line)
        headers += ["Connection: close", "Via: 1.1 fake-mihomo"]
        request = f"{method} {path} {version}\r\n" + "\r\n".join(headers) + "\r\n\r\n"
        try:
            upstream = dial(state, url.hostname, port)
        except OSError as err:
            log("warning", f"[TCP] dial {url.hostname}:{port} error: {err}")
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\n")
            return
        cid = state.open_conn(meta(self.client_address, url.hostname, port, "HTTP"))
        log("info", f"[TCP] {fmt_addr(self.client_address)} --> {url.hostname}:{port} match Match using DIRECT")
        relay(state, cid, conn, upstream, request.encode("latin-1") + rest)


def recv_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("short read")
        data += chunk
    return data


def meta(src, host, port, typ):
    return {
        "network": "tcp",
        "type": typ,
        "sourceIP": src[0],
        "sourcePort": str(src[1]),
        "destinationIP": host,
        "destinationPort": str(port),
        "host": host,
    }


def start_mixed(state, addr):
    server = ThreadedTCP(addr, MixedHandler)
    server.state = state
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return [server.shutdown, server.server_close]


def start_tproxy(state, addr, family=socket.AF_INET):
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.bind(addr)
    sock.listen(128)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, peer = sock.accept()
            except OSError:
                return
            threading.Thread(target=tproxy_conn, args=(state, conn, peer), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()

    def close():
        stop.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    return [close]


def tproxy_conn(state, conn, peer):
    orig = conn.getsockname()
    host, port = orig[0], orig[1]
    log("info", f"[TCP] {fmt_addr(peer)} --> {fmt_addr((host, port))} match Match using DIRECT (tproxy)")
    cid = state.open_conn(meta(peer, host, port, "TProxy"))
    if state.control.get("tproxy_marker"):
        data = f"fake-mihomo tproxy {fmt_addr((host, port))}\n".encode()
        try:
            conn.sendall(data)
            state.count(cid, 0, len(data))
        finally:
            state.close_conn(cid)
            conn.close()
        return
    try:
        upstream = dial(state, host, port)
    except OSError as err:
        log("warning", f"[TCP] dial {fmt_addr((host, port))} error: {err}")
        state.close_conn(cid)
        conn.close()
        return
    relay(state, cid, conn, upstream)


def start_tproxy6(state, addr):
    return start_tproxy(state, addr, socket.AF_INET6)


# ---- DNS ---------------------------------------------------------------------------
def dns_answer(query):
    if len(query) < 12:
        return None
    qd = int.from_bytes(query[4:6], "big")
    if qd != 1:
        return query[:2] + b"\x81\x81" + query[4:12]  # FORMERR-ish: NOTIMP
    pos = 12
    while pos < len(query) and query[pos] != 0:
        pos += query[pos] + 1
    pos += 1
    if pos + 4 > len(query):
        return None
    qtype = int.from_bytes(query[pos : pos + 2], "big")
    question = query[12 : pos + 4]
    answer = b""
    if qtype == 1:
        addr = ipaddress.IPv4Address(os.environ.get("FAKE_MIHOMO_DNS_ANSWER", "198.18.0.1"))
        answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x01\x00\x04" + addr.packed
    header = query[:2] + b"\x81\x80" + b"\x00\x01" + (b"\x00\x01" if answer else b"\x00\x00") + b"\x00\x00\x00\x00"
    return header + question + answer


def start_dns(state, addr):
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.bind(addr)
    tcp = socket.socket(family, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(addr)
    tcp.listen(64)

    def serve_udp():
        while True:
            try:
                data, peer = udp.recvfrom(4096)
            except OSError:
                return
            reply = dns_answer(data)
            if reply:
                try:
                    udp.sendto(reply, peer)
                except OSError:
                    pass

    def serve_tcp_conn(conn):
        try:
            while True:
                size = int.from_bytes(recv_exact(conn, 2), "big")
                reply = dns_answer(recv_exact(conn, size))
                if not reply:
                    return
                conn.sendall(len(reply).to_bytes(2, "big") + reply)
        except (OSError, ConnectionError):
            return
        finally:
            conn.close()

    def serve_tcp():
        while True:
            try:
                conn, _ = tcp.accept()
            except OSError:
                return
            threading.Thread(target=serve_tcp_conn, args=(conn,), daemon=True).start()

    threading.Thread(target=serve_udp, daemon=True).start()
    threading.Thread(target=serve_tcp, daemon=True).start()

    def close():
        for sock in (udp, tcp):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    return [close]


START = {"mixed": start_mixed, "tproxy": start_tproxy, "tproxy6": start_tproxy6, "dns": start_dns}
LABEL = {"mixed": "Mixed(http+socks)", "tproxy": "TProxy", "tproxy6": "TProxy(v6)", "dns": "DNS"}


# ---- control file ------------------------------------------------------------------
def watch_control(state, path):
    last = None
    while True:
        try:
            st = os.stat(path)
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            if key != last:
                with open(path, encoding="utf-8") as fh:
                    control = json.load(fh)
                last = key
                state.control = control
                if "exit" in control:
                    log("warning", f"exiting with code {control['exit']} (control file)")
                    os._exit(int(control["exit"]))
        except FileNotFoundError:
            state.control = {}
            last = None
        except (OSError, ValueError):
            pass
        time.sleep(0.02)


# ---- main --------------------------------------------------------------------------
def parse_args(argv):
    opts = {"d": None, "f": None, "ext-ctl": None, "secret": None, "t": False, "v": False}
    takes_value = {"d", "f", "ext-ctl", "secret", "config", "ext-ctl-unix", "ext-ui", "m"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            break
        name = arg.lstrip("-")
        value = None
        if "=" in name:
            name, value = name.split("=", 1)
        if name in ("t", "v"):
            opts[name] = True
        elif name in takes_value:
            if value is None:
                i += 1
                if i >= len(argv):
                    print(f"flag needs an argument: -{name}", file=sys.stderr)
                    sys.exit(2)
                value = argv[i]
            opts[name] = value
        else:
            print(f"flag provided but not defined: -{name}", file=sys.stderr)
            sys.exit(2)
        i += 1
    return opts


def main(argv):
    opts = parse_args(argv)
    if opts["v"]:
        print(f"Mihomo Meta {VERSION} linux amd64 (fake double)")
        return 0
    home = opts["d"] or os.environ.get("CLASH_HOME_DIR") or os.path.expanduser("~/.config/mihomo")
    if not os.path.isabs(home):
        home = os.path.abspath(home)
    config_path = opts["f"] or os.path.join(home, "config.yaml")
    if not os.path.isabs(config_path):
        config_path = os.path.abspath(config_path)
    try:
        with open(config_path, encoding="utf-8") as fh:
            text = fh.read()
        cfg = parse_config(text)
    except (OSError, ConfigError) as err:
        if opts["t"]:
            print(f"configuration file {config_path} test failed: {err}")
            return 1
        log("fatal", f"Parse config error: {err}")
        return 1
    if opts["t"]:
        print(f"configuration file {config_path} test is successful")
        return 0

    state = State(home, config_path, opts["ext-ctl"], opts["secret"])
    control_path = os.environ.get("FAKE_MIHOMO_CONTROL")
    if control_path:
        try:
            with open(control_path, encoding="utf-8") as fh:
                state.control = json.load(fh)
        except (OSError, ValueError):
            state.control = {}
        threading.Thread(target=watch_control, args=(state, control_path), daemon=True).start()

    reload_requested = threading.Event()
    stop_requested = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    signal.signal(signal.SIGINT, lambda *_: stop_requested.set())

    log("info", f"Start initial configuration in progress (home {home})")
    state.apply(cfg, config_path)
    state.restart_controller()
    log("info", "Initial configuration complete")

    while not stop_requested.is_set():
        if reload_requested.wait(0.05):
            reload_requested.clear()
            log("info", "Receive SIGHUP, reloading config")
            try:
                with open(config_path, encoding="utf-8") as fh:
                    new_cfg = parse_config(fh.read())
            except (OSError, ConfigError) as err:
                log("error", f"Parse config error: {err}")
                continue
            state.apply(new_cfg, config_path)
            state.restart_controller()
    log("warning", "Shutting down")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
