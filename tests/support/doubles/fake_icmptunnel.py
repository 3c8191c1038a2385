#!/usr/bin/python3
"""Test double of ICMPTunnel (github.com/Qteam-official/ICMPTunnel, v1.1.0, the build
the predecessor installed), for machines without it (no registry here ships it; the
project publishes binaries only, so its documented interface is all there is).

Faithful to that interface (README.md's configuration table and examples, install.sh's
``config.json`` and systemd units, the predecessor's icmptunnel_*_setup.sh):

* argv: Go's ``flag`` package with one flag, ``-config FILE`` (``--config``,
  ``-config=FILE`` too), default ``config.json`` in the working directory. An unknown
  flag prints ``flag provided but not defined: -x`` and the usage and exits 2; ``-h``
  prints the usage and exits 0.
* ``config.json`` is decoded like Go's ``encoding/json`` into the README's fields:
  unknown fields are ignored, a value of the wrong JSON type is fatal
  (``json: cannot unmarshal number into Go struct field Config.api_port of type
  string``). Types: ``type``, ``listen_port_socks``, ``server``, ``dns``,
  ``api_port``, ``encrypt_data_key``, ``block_country`` strings; ``timeout``, ``key``
  whole numbers; ``encrypt_data`` boolean.
* Refused (exit 1): ``type`` other than ``server``/``client``; no ``key``; ``timeout``
  not > 0; ``api_port`` not a port; ``dns`` not an IP; a client without an IPv4
  ``server`` or without a ``listen_port_socks`` port; ``encrypt_data`` true with an
  empty ``encrypt_data_key``. (The README's accepted values, read as requirements: the
  binary's own checks cannot be read.)
* Behaviour: both roles serve the statistics API on ``0.0.0.0:<api_port>``
  (``GET /stats?key=<key>``; a wrong key is 403). A client serves SOCKS5 on
  ``0.0.0.0:<listen_port_socks>`` and carries every CONNECT to the server, which
  connects to the target. The carrier between the two doubles is NOT ICMP: it is TCP
  to ``server`` port 40101 (WIRE_PORT), opened with an HMAC preamble keyed by ``key``,
  ``encrypt_data`` and ``encrypt_data_key``, so ends that disagree on any of them
  refuse each other (tunnel_wire.py), and the server logs the refusal as an error.
* Log lines: Go's ``log`` (``YYYY/MM/DD HH:MM:SS msg``) on stdout.
* SIGINT/SIGTERM: exit 0.
"""

import hashlib
import ipaddress
import json
import os
import signal
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# No __pycache__ in the source tree (the shared module is imported from here).
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tunnel_wire  # noqa: E402

WIRE_PORT = 40101
MAGIC = b"ICD1"
FIELDS = {
    "type": str,
    "listen_port_socks": str,
    "server": str,
    "timeout": int,
    "dns": str,
    "key": int,
    "api_port": str,
    "encrypt_data": bool,
    "encrypt_data_key": str,
    "block_country": str,
}
GO_TYPES = {str: "string", int: "int", bool: "bool"}
STATS = {"streams": 0, "rx": 0, "tx": 0}


def log(msg):
    print(time.strftime("%Y/%m/%d %H:%M:%S ") + msg, flush=True)


def fatal(msg):
    print(time.strftime("%Y/%m/%d %H:%M:%S ") + msg, file=sys.stderr, flush=True)
    sys.exit(1)


def usage(out):
    print("Usage of icmptunnel:\n  -config string\n    \tpath to config.json (default \"config.json\")", file=out)


def parse_args(argv):
    config = "config.json"
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "-help", "--h", "--help"):
            usage(sys.stdout)
            sys.exit(0)
        if a in ("-config", "--config"):
            if i + 1 >= len(argv):
                print(f"flag needs an argument: {a}", file=sys.stderr)
                usage(sys.stderr)
                sys.exit(2)
            config, i = argv[i + 1], i + 2
        elif a.startswith(("-config=", "--config=")):
            config, i = a.split("=", 1)[1], i + 1
        elif a == "--":
            break
        elif a.startswith("-") and a != "-":
            print(f"flag provided but not defined: {a.split('=')[0]}", file=sys.stderr)
            usage(sys.stderr)
            sys.exit(2)
        else:
            break  # Go's flag stops at the first non-flag argument.
    return config


def port_of(field, value, allow_zero=False):
    try:
        p = int(value)
    except ValueError:
        fatal(f"invalid {field} {value!r}: not a port number")
    if not (0 if allow_zero else 1) <= p <= 65535:
        fatal(f"invalid {field} {value!r}: port out of range")
    return p


def load(path):
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except OSError as err:
        fatal(f"failed to read config file {path}: open {path}: {err.strerror.lower()}")
    except json.JSONDecodeError as err:
        fatal(f"failed to parse config file {path}: {err}")
    if not isinstance(doc, dict):
        fatal(f"json: cannot unmarshal {type(doc).__name__} into Go value of type main.Config")
    for field, kind in FIELDS.items():
        if field not in doc or doc[field] is None:
            continue
        v = doc[field]
        ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
        if kind is int and isinstance(v, float) and v.is_integer():
            ok = True
        if not ok:
            jt = {str: "string", bool: "bool", int: "number", float: "number", list: "array", dict: "object"}.get(type(v), "value")
            if kind is int and isinstance(v, float):
                fatal(f"json: cannot unmarshal number {v} into Go struct field Config.{field} of type int")
            fatal(f"json: cannot unmarshal {jt} into Go struct field Config.{field} of type {GO_TYPES[kind]}")
    cfg = {k: doc.get(k) for k in FIELDS}
    if cfg["type"] not in ("server", "client"):
        fatal(f"invalid type {cfg['type']!r}: must be \"server\" or \"client\"")
    if cfg["key"] is None:
        fatal("key is required")
    if (cfg["timeout"] or 0) <= 0:
        fatal("timeout must be an integer value > 0")
    cfg["api_port"] = port_of("api_port", cfg["api_port"] or "", allow_zero=True)
    try:
        ipaddress.ip_address(cfg["dns"] or "")
    except ValueError:
        fatal(f"invalid dns {cfg['dns']!r}: expected an IP address")
    if cfg["encrypt_data"] and not cfg["encrypt_data_key"]:
        fatal("encrypt_data is true but encrypt_data_key is empty")
    if cfg["type"] == "client":
        try:
            cfg["server"] = str(ipaddress.IPv4Address(cfg["server"] or ""))
        except ValueError:
            fatal(f"invalid server {cfg['server'] or ''!r}: expected the server's IPv4 address")
        cfg["listen_port_socks"] = port_of("listen_port_socks", cfg["listen_port_socks"] or "", allow_zero=True)
    return cfg


def serve_api(port, key):
    class Api(BaseHTTPRequestHandler):
        def do_GET(self):
            url = urllib.parse.urlparse(self.path)
            given = urllib.parse.parse_qs(url.query).get("key", [""])[0]
            if url.path != "/stats":
                self.send_error(404)
                return
            if given != str(key):
                self.send_error(403, "invalid key")
                return
            body = json.dumps(STATS).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("0.0.0.0", port), Api)
    threading.Thread(target=srv.serve_forever, daemon=True).start()


def main(argv):
    cfg = load(parse_args(argv))
    material = f"{cfg['key']}|{bool(cfg['encrypt_data'])}|{cfg['encrypt_data_key'] or ''}"
    secret = hashlib.sha256(material.encode()).digest()

    def wire_log(level, msg):
        log(f"[{level.upper()}] {msg}")

    try:
        serve_api(cfg["api_port"], cfg["key"])
        log(f"API listening on 0.0.0.0:{cfg['api_port']}")
        if cfg["type"] == "server":
            listener = tunnel_wire.listen_tcp("0.0.0.0", WIRE_PORT)
            tunnel_wire.serve_wire(listener, secret, MAGIC, wire_log, timeout=cfg["timeout"])
            log("server mode: waiting for ICMP tunnel clients")
        else:
            def open_stream(host, port):
                STATS["streams"] += 1
                return tunnel_wire.dial_wire(
                    (cfg["server"], WIRE_PORT), secret, MAGIC, host, port, timeout=cfg["timeout"]
                )

            listener = tunnel_wire.listen_tcp("0.0.0.0", cfg["listen_port_socks"])
            tunnel_wire.serve_socks5(listener, open_stream, wire_log)
            log(f"client mode: SOCKS5 listening on 0.0.0.0:{cfg['listen_port_socks']}, server {cfg['server']}")
    except OSError as err:
        fatal(f"listen: {err}")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.2):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
