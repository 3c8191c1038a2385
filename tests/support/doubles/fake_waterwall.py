#!/usr/bin/python3
"""Test double of WaterWall (github.com/radkesvat/WaterWall), for machines without it
(no registry here ships it).

Faithful to the interface meduza relies on, read from WaterWall's sources
(core/main.c, core/core_settings.c, core/readme.md, ww/node_builder/config_file.c,
ww/managers/node_manager.c, tunnels/{TcpListener,TcpConnector,EncryptionClient,
EncryptionServer}/instance/create.c and their description.md):

* argv: none. ``-v``/``-version``/``--version``/``--v``/``version`` as the first
  argument prints the version and exits 0; other arguments are ignored.
* ``core.json`` is read from the working directory (missing: ``Could not read core
  settings file "core.json"``, exit 1). Checked like ``parseCoreSettings``: top-level
  ``domain-strategy`` refused; ``log`` (``path``, per-logger ``loglevel`` one of
  VERBOSE DEBUG INFO WARN ERROR FATAL SILENT, ``file``, ``console`` boolean);
  ``misc`` must be an object when present (``workers`` whole number, ``ram-profile``
  one of server/client/client-larger/minimal/ultralow or 0-6, ``mtu`` 68-65535,
  ``try-enabling-bbr`` boolean, ``libs-path`` string); ``dns`` an object;
  ``configs`` a non-empty array of strings.
* Each config file (path relative to the working directory; ``//`` and ``/* */``
  comments stripped): ``name`` non-empty string, ``nodes`` non-empty array; every node
  has a string ``name`` (unique) and ``type``; ``next`` must name a node of the file;
  no cycles. Node settings checked as the node's ``create.c`` does:
  - TcpListener: ``settings`` a non-empty object, ``address`` string, ``port`` a
    port number (or an array of them), not both ``port`` and ``port-range``;
    ``nodelay`` boolean; must have ``next``.
  - TcpConnector: ``address`` non-empty string, ``port`` 1-65535 (or the
    ``src_context->``/``dest_context->`` forms, not supported by this double).
  - EncryptionClient/EncryptionServer: ``password`` non-empty string, ``algorithm``
    ``chacha20-poly1305`` or ``aes-gcm``, ``kdf-iterations`` 1-1000000,
    ``max-frame-size`` 1-16356.
  Any other node type is refused: real types (Socks5Server, TlsClient, ...) because
  this double does not implement them, unknown ones as ``library could not be loaded``.
* The log directory (``log.path``) is created; log lines
  ``YYYY-MM-DD HH:MM:SS.mmm LEVEL message`` go to the logger's file and, when
  ``console`` is true, to stdout (WARN and above to stderr). Startup failures exit 1.
* Behaviour: every chain ``TcpListener -> [EncryptionClient|EncryptionServer] ->
  TcpConnector`` runs: accepted connections are relayed to the connector's address.
  The Encryption nodes do NOT speak WaterWall's AEAD record format: the client side
  opens with an HMAC preamble keyed by PBKDF2-SHA256(password, salt, kdf-iterations)
  and the algorithm, the server side checks it and closes (logging an error) on a
  mismatch; the bytes after it are relayed as they are (tunnel_wire.py).
* SIGINT/SIGTERM: exit 0.
"""

import hashlib
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time

# No __pycache__ in the source tree (the shared module is imported from here).
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tunnel_wire  # noqa: E402

VERSION = "1.41-fake"
LOG_LEVELS = ["VERBOSE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL", "SILENT"]
RAM_PROFILES = ["server", "client", "client-larger", "minimal", "ultralow"]
MAGIC = b"WWE1"
MAX_FRAME = 16356
# Node types of WaterWall's tunnels/ directory this double does not run.
OTHER_TYPES = {
    "AuthenticationClient", "AuthenticationServer", "Bgp4Client", "Bgp4Server", "BlackHole",
    "Bridge", "ConnectionFisherClient", "ConnectionFisherServer", "ConnectionToPackets",
    "Disturber", "HalfDuplexClient", "HalfDuplexServer", "HeaderClient", "HeaderServer",
    "HttpClient", "HttpServer", "IpManipulator", "IpOverrider", "JunkDatagramSender",
    "KeepAliveClient", "KeepAliveServer", "MuxClient", "MuxServer", "ObfuscatorClient",
    "ObfuscatorServer", "PacketReceiver", "PacketSender", "PacketSplitStream",
    "PacketsToConnection", "PacketsToStream", "PingClient", "PingServer", "RawSocket",
    "RealityClient", "RealityServer", "ReverseClient", "ReverseServer", "Router",
    "SniffRouter", "Socks5Client", "Socks5Server", "SoftIpLimiter", "SpeedLimit",
    "SpeedTestClient", "SpeedTestServer", "StreamToPackets", "TcpOverUdpClient",
    "TcpOverUdpServer", "TcpUdpConnector", "TcpUdpListener", "TesterClient", "TesterServer",
    "TlsClient", "TlsServer", "TrojanClient", "TrojanServer", "TunDevice", "UdpConnector",
    "UdpListener", "UdpOverTcpClient", "UdpOverTcpServer", "UdpStatelessSocket",
    "VlessClient", "VlessServer", "WireGuardDevice",
}


class Fatal(Exception):
    pass


class Logger:
    """One of WaterWall's four loggers (internal, core, network, dns)."""

    def __init__(self, path, level, console):
        self.level = LOG_LEVELS.index(level)
        self.console = console
        self.fh = open(path, "a", encoding="utf-8") if path else None
        self.lock = threading.Lock()

    def log(self, level, msg):
        if LOG_LEVELS.index(level) < self.level:
            return
        now = time.time()
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
        line = f"{ts} {level:<5} {msg}\n"
        with self.lock:
            if self.fh:
                self.fh.write(line)
                self.fh.flush()
            if self.console:
                out = sys.stderr if LOG_LEVELS.index(level) >= LOG_LEVELS.index("WARN") else sys.stdout
                out.write(line)
                out.flush()


def boot_error(msg):
    """printError before the loggers exist: stderr."""
    print(msg, file=sys.stderr, flush=True)


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()


def parse_core(text):
    try:
        core = json.loads(text)
    except json.JSONDecodeError as err:
        raise Fatal(f"CoreSettings: could not parse core json: {err}") from None
    if not isinstance(core, dict):
        raise Fatal("CoreSettings: core json is not an object")
    if "domain-strategy" in core:
        raise Fatal("CoreSettings: domain-strategy is not a top-level option; use dns.domain-strategy")
    log = core.get("log")
    loggers = {}
    path = "log/"
    defaults = {"internal": "internal.log", "core": "core.log", "network": "network.log", "dns": "dns.log"}
    if isinstance(log, dict) and log:
        p = log.get("path", path)
        if not isinstance(p, str) or not p:
            raise Fatal("CoreSettings: log.path must be a non-empty string")
        path = p
    for name, file in defaults.items():
        o = log.get(name) if isinstance(log, dict) else None
        level, console = "INFO", True
        if isinstance(o, dict) and o:
            level = o.get("loglevel", level)
            file = o.get("file", file)
            console = o.get("console", console)
            if not isinstance(level, str) or level.upper() not in LOG_LEVELS:
                raise Fatal(f"CoreSettings: log.{name}.loglevel must be one of {', '.join(LOG_LEVELS)}")
            if not isinstance(file, str) or not file:
                raise Fatal(f"CoreSettings: log.{name}.file must be a non-empty string")
            if not isinstance(console, bool):
                raise Fatal(f"CoreSettings: log.{name}.console must be a boolean")
        loggers[name] = (file, level.upper(), console)
    misc = core.get("misc")
    if misc is not None:
        if not isinstance(misc, dict):
            raise Fatal("CoreSettings: \"misc\" must be an object")
        if "workers" in misc and not (is_int(misc["workers"]) and -2**31 <= misc["workers"] < 2**31):
            raise Fatal("CoreSettings: \"workers\" must be a whole number")
        if "ram-profile" in misc:
            rp = misc["ram-profile"]
            if isinstance(rp, str):
                if rp not in RAM_PROFILES:
                    raise Fatal(f"CoreSettings: ram-profile \"{rp}\" is not one of {', '.join(RAM_PROFILES)}")
            elif not (is_int(rp) and 0 <= rp <= 6):
                raise Fatal("CoreSettings: ram-profile must be a whole number between 0 and 6")
        if "mtu" in misc and not (is_int(misc["mtu"]) and 68 <= misc["mtu"] <= 65535):
            raise Fatal("CoreSettings: \"mtu\" must be a whole number between 68 and 65535")
        if "try-enabling-bbr" in misc and not isinstance(misc["try-enabling-bbr"], bool):
            raise Fatal("CoreSettings: \"try-enabling-bbr\" must be a boolean")
        if "libs-path" in misc and not isinstance(misc["libs-path"], str):
            raise Fatal("CoreSettings: \"libs-path\" must be a string")
    if "dns" in core and not isinstance(core["dns"], dict):
        raise Fatal("CoreSettings: dns must be an object")
    configs = core.get("configs")
    if not isinstance(configs, list) or not configs or not all(isinstance(c, str) for c in configs):
        raise Fatal("Error: \"configs\" array in core json is empty or invalid ")
    return path, loggers, configs


def strip_comments(text):
    """config_file.c strips // and /* */ comments outside strings."""
    out, i, n = [], 0, len(text)
    in_str = False
    while i < n:
        c = text[i]
        if in_str:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
            out.append(c)
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
            continue
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise Fatal("unterminated comment")
            i = end + 2
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def port_value(v):
    return is_int(v) and 1 <= v <= 65535


def check_node(node, path):
    t, s = node["type"], node.get("settings")
    if t in OTHER_TYPES:
        raise Fatal(f"NodeManager: node type \"{t}\" is not implemented by this double")
    if t not in ("TcpListener", "TcpConnector", "EncryptionClient", "EncryptionServer"):
        raise Fatal(f"NodeManager: node creation failure: library \"{t}\" (hash: 0) could not be loaded ")
    if not isinstance(s, dict) or not s:
        raise Fatal(f"JSON Error: {t}->settings (object field) : The object was empty or invalid")
    if t == "TcpListener":
        if "nodelay" in s and not isinstance(s["nodelay"], bool):
            raise Fatal("JSON Error: TcpListener->settings->nodelay (boolean field) : The data was empty or invalid")
        if not isinstance(s.get("address"), str) or not s["address"]:
            raise Fatal("JSON Error: TcpListener->settings->address (string field) : The data was empty or invalid")
        if "port" in s and "port-range" in s:
            raise Fatal("JSON Error: TcpListener->settings : use either \"port\" or \"port-range\", not both")
        if "port-range" in s:
            raise Fatal("TcpListener: port-range is not implemented by this double")
        port = s.get("port")
        ports = port if isinstance(port, list) else [port]
        if not ports or not all(port_value(p) for p in ports):
            raise Fatal("JSON Error: TcpListener->settings->port (positive-integer port or array of "
                        "positive-integer ports field) : The data was empty or invalid")
        if not node.get("next"):
            raise Fatal(f"NodeManager: TcpListener \"{node['name']}\" is a chain head and needs a next node")
    elif t == "TcpConnector":
        addr = s.get("address")
        if not isinstance(addr, str) or not addr:
            raise Fatal("JSON Error: TcpConnector->settings->address (string field) : The vaule was empty or invalid")
        if addr.startswith(("src_context->", "dest_context->")) or str(s.get("port", "")).startswith(("src_context->", "dest_context->")):
            raise Fatal("TcpConnector: context-based destinations are not implemented by this double")
        if not port_value(s.get("port")):
            raise Fatal("JSON Error: TcpConnector->settings->port (number field) : expected a valid port number")
    else:
        alg = s.get("algorithm", s.get("method", "chacha20-poly1305"))
        if alg not in ("chacha20-poly1305", "aes-gcm"):
            raise Fatal(f"{t}: 'algorithm'/'method' is unsupported. Use chacha20-poly1305 or aes-gcm")
        pw = s.get("password")
        if not isinstance(pw, str):
            raise Fatal(f"{t}: 'password' not set")
        if not pw:
            raise Fatal(f"{t}: 'password' must not be empty")
        salt = s.get("salt", "waterwall-encryption")
        if not isinstance(salt, str):
            raise Fatal(f"{t}: 'salt' must be a string")
        it = s.get("kdf-iterations", 12000)
        if not (is_int(it) and 1 <= it <= 1_000_000):
            raise Fatal(f"{t}: 'kdf-iterations' must be in range [1, 1000000]")
        mfs = s.get("max-frame-size", MAX_FRAME)
        if not (is_int(mfs) and 1 <= mfs <= MAX_FRAME):
            raise Fatal(f"{t}: 'max-frame-size' must be in range [1, {MAX_FRAME}]")


def load_config(path):
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        raise Fatal(f"File Error: config file \"{path}\" could not be read") from None
    try:
        doc = json.loads(strip_comments(text))
    except json.JSONDecodeError as err:
        raise Fatal(f"JSON Error: config file \"{path}\" could not be parsed ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str) or not doc["name"]:
        raise Fatal(f"JSON Error: config file \"{path}\" -> name (string field) the value was empty or invalid")
    nodes = doc.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise Fatal(f"JSON Error: config file \"{path}\" -> nodes (array field) the array was empty or invalid")
    by_name = {}
    for node in nodes:
        if not isinstance(node, dict) or not isinstance(node.get("name"), str) or not node["name"]:
            raise Fatal(f"JSON Error: config file \"{path}\" -> nodes[x]->name (string field) was empty or invalid")
        if not isinstance(node.get("type"), str) or not node["type"]:
            raise Fatal(f"JSON Error: config file \"{path}\" -> nodes[x]->type (string field) was empty or invalid")
        if node["name"] in by_name:
            raise Fatal(f"NodeManager: duplicate node \"{node['name']}\" (hash: 0) ")
        by_name[node["name"]] = node
    for node in nodes:
        nxt = node.get("next")
        if nxt is not None and (not isinstance(nxt, str) or nxt not in by_name):
            raise Fatal(f"Node Map Failure: node \"{node['name']}\" could not find it's next node \"{nxt}\"")
        check_node(node, path)
    chains = []
    for head in (n for n in nodes if n["type"] == "TcpListener"):
        chain, seen, cur = [head], {head["name"]}, head
        while cur.get("next"):
            cur = by_name[cur["next"]]
            if cur["name"] in seen:
                raise Fatal("Node Map Failure: circular reference deteceted")
            seen.add(cur["name"])
            chain.append(cur)
        middle = [n["type"] for n in chain[1:-1]]
        if chain[-1]["type"] != "TcpConnector" or any(
            m not in ("EncryptionClient", "EncryptionServer") for m in middle
        ) or len(middle) > 1:
            raise Fatal("chain shape not implemented by this double: "
                        + " -> ".join(n["type"] for n in chain))
        chains.append(chain)
    if not chains:
        raise Fatal("NodeMap: detecetd 0 chainhead nodes")
    return doc["name"], chains


def enc_secret(settings):
    alg = settings.get("algorithm", settings.get("method", "chacha20-poly1305"))
    key = hashlib.pbkdf2_hmac(
        "sha256", settings["password"].encode(), settings.get("salt", "waterwall-encryption").encode(),
        int(settings.get("kdf-iterations", 12000)), 32,
    )
    return hashlib.sha256(key + alg.encode()).digest()


def run_chain(chain, net):
    listener_node, connector = chain[0], chain[-1]
    middle = chain[1] if len(chain) == 3 else None
    secret = enc_secret(middle["settings"]) if middle else None
    ls, cs = listener_node["settings"], connector["settings"]
    ports = ls["port"] if isinstance(ls["port"], list) else [ls["port"]]

    def handle(conn, peer):
        try:
            if middle and middle["type"] == "EncryptionServer":
                conn.settimeout(10)
                tunnel_wire.recv_preamble(conn, secret, MAGIC)
                conn.settimeout(None)
            upstream = socket.create_connection((cs["address"], int(cs["port"])), timeout=10)
            upstream.settimeout(None)
            if middle and middle["type"] == "EncryptionClient":
                tunnel_wire.send_preamble(upstream, secret, MAGIC)
        except tunnel_wire.WireRefused as err:
            net.log("ERROR", f"{middle['name']}: connection from {peer[0]}:{peer[1]} dropped: {err}")
            conn.close()
            return
        except OSError as err:
            net.log("WARN", f"TcpConnector: connection to {cs['address']}:{cs['port']} failed: {err}")
            conn.close()
            return
        net.log("DEBUG", f"TcpListener: accepted {peer[0]}:{peer[1]}")
        tunnel_wire.relay(conn, upstream)

    def loop(sock):
        while True:
            try:
                conn, peer = sock.accept()
            except OSError:
                return
            if ls.get("nodelay"):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=handle, args=(conn, peer), daemon=True).start()

    for port in ports:
        addr = ls["address"]
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            raise Fatal(f"TcpListener: could not bind {addr}:{port}: not an IP address") from None
        try:
            sock = tunnel_wire.listen_tcp(addr, int(port))
        except OSError as err:
            raise Fatal(f"TcpListener: could not bind {addr}:{port}: {err.strerror}") from None
        threading.Thread(target=loop, args=(sock,), daemon=True).start()
        net.log("INFO", f"TcpListener: listening on {addr}:{port}")


def main(argv):
    if argv and argv[0] in ("-v", "-version", "--version", "--v", "version"):
        print(f"Waterwall version {VERSION}")
        return 0
    try:
        with open("core.json", encoding="utf-8") as fh:
            core_text = fh.read()
    except OSError:
        boot_error(f"Waterwall version {VERSION}\nCould not read core settings file \"core.json\" ")
        return 1
    try:
        log_path, loggers, configs = parse_core(core_text)
        os.makedirs(log_path, exist_ok=True)
        made = {}
        for name, (file, level, console) in loggers.items():
            made[name] = Logger(os.path.join(log_path, file), level, console)
        core, net = made["core"], made["network"]
    except Fatal as err:
        boot_error(str(err))
        return 1
    except OSError as err:
        boot_error(f"CoreSettings: cannot create the log directory: {err}")
        return 1
    core.log("INFO", f"Waterwall version {VERSION}")
    try:
        for path in configs:
            name, chains = load_config(path)
            core.log("INFO", f"parsing config file \"{path}\" ({name}): {len(chains)} chain(s)")
            for chain in chains:
                run_chain(chain, net)
    except Fatal as err:
        core.log("FATAL", str(err))
        return 1
    core.log("INFO", "Waterwall is running")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.2):
        pass
    core.log("INFO", "shutting down")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
