"""Shared plumbing of the tunnel doubles (fake_paqet.py, fake_icmptunnel.py,
fake_waterwall.py): a SOCKS5 server (RFC 1928, with RFC 1929 username/password), a
byte relay, and the doubles' own wire between a client double and a server double.

The wire is NOT the real programs' protocol (paqet: KCP over crafted TCP packets;
ICMPTunnel: ICMP echo; WaterWall's EncryptionClient: AEAD records). It is plain TCP
opened with an authenticated preamble: a random nonce and an HMAC-SHA256 over it under
a key derived from the configured secret, so two ends configured with different keys
(or different cipher settings) refuse each other, as the real ones would. After the
preamble the bytes are relayed as they are.

Python 3 standard library only.
"""

import hashlib
import hmac
import os
import socket
import struct
import threading

NONCE_LEN = 16
MAC_LEN = 32


class WireRefused(Exception):
    """The other end does not hold the same secret, or refused the target."""


def has_effective_cap(bit):
    """Whether capability number `bit` is in this process's effective set
    (CAP_NET_ADMIN 12, CAP_NET_RAW 13, CAP_NET_BIND_SERVICE 10)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise WireRefused("connection closed during the preamble")
        buf += chunk
    return buf


def _mac(secret, magic, nonce, extra):
    return hmac.new(secret, magic + nonce + extra, hashlib.sha256).digest()


def send_preamble(sock, secret, magic, extra=b""):
    """Client side: magic, nonce, HMAC(secret, magic|nonce|extra), then `extra`."""
    nonce = os.urandom(NONCE_LEN)
    sock.sendall(magic + nonce + _mac(secret, magic, nonce, extra) + extra)


def recv_preamble(sock, secret, magic, read_extra=None):
    """Server side: check the preamble; returns what `read_extra(sock)` read (the part
    covered by the MAC after it). Raises WireRefused on a wrong magic or MAC."""
    got = recv_exact(sock, len(magic))
    if got != magic:
        raise WireRefused("unexpected protocol preamble")
    nonce = recv_exact(sock, NONCE_LEN)
    mac = recv_exact(sock, MAC_LEN)
    extra = read_extra(sock) if read_extra else b""
    if not hmac.compare_digest(mac, _mac(secret, magic, nonce, extra)):
        raise WireRefused("authentication failed: the peer's key does not match")
    return extra


def encode_target(host, port):
    raw = host.encode("idna")
    return bytes([len(raw)]) + raw + struct.pack("!H", port)


def read_target(sock):
    n = recv_exact(sock, 1)
    host = recv_exact(sock, n[0])
    port = recv_exact(sock, 2)
    return n + host + port


def decode_target(raw):
    n = raw[0]
    return raw[1 : 1 + n].decode("idna"), struct.unpack("!H", raw[1 + n : 3 + n])[0]


def dial_wire(server, secret, magic, host, port, source_ip=None, timeout=10):
    """Open a tunnel stream to `host:port` through the server double at `server`
    ((ip, port)). Returns the connected socket; raises OSError or WireRefused."""
    sock = socket.create_connection(
        server, timeout=timeout, source_address=(source_ip, 0) if source_ip else None
    )
    try:
        send_preamble(sock, secret, magic, encode_target(host, port))
        status = recv_exact(sock, 1)
        if status != b"\x00":
            raise WireRefused(f"server could not reach {host}:{port}")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


def serve_wire(listener, secret, magic, log, timeout=10):
    """Accept tunnel streams on `listener` forever (in threads): check the preamble,
    connect to the requested target, answer one status byte, relay."""

    def handle(conn, peer):
        with conn:
            try:
                conn.settimeout(timeout)
                raw = recv_preamble(conn, secret, magic, read_target)
            except (WireRefused, OSError) as err:
                log("error", f"rejected stream from {peer[0]}:{peer[1]}: {err}")
                return
            host, port = decode_target(raw)
            try:
                upstream = socket.create_connection((host, port), timeout=timeout)
            except OSError as err:
                log("warn", f"failed to connect to {host}:{port}: {err}")
                conn.sendall(b"\x01")
                return
            log("debug", f"stream from {peer[0]}:{peer[1]} to {host}:{port}")
            conn.sendall(b"\x00")
            conn.settimeout(None)
            upstream.settimeout(None)
            relay(conn, upstream)

    def loop():
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn, peer), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def relay(a, b):
    """Copy both ways until both directions ended (half-close passed on)."""

    def pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    t = threading.Thread(target=pump, args=(b, a), daemon=True)
    t.start()
    pump(a, b)
    t.join()
    a.close()
    b.close()


def listen_tcp(host, port, backlog=128):
    """A listening TCP socket on host:port (IPv4 or IPv6 literal, "" = any IPv4)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def serve_socks5(listener, open_stream, log, username="", password=""):
    """A SOCKS5 server (RFC 1928) on `listener`: CONNECT only (other commands answer
    0x07), IPv4/IPv6/domain targets, username/password (RFC 1929) when `username` is
    set. `open_stream(host, port)` returns a connected socket or raises."""

    def reply(conn, code):
        conn.sendall(bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0]))

    def handle(conn):
        with conn:
            try:
                conn.settimeout(10)
                ver, n = recv_exact(conn, 2)
                methods = recv_exact(conn, n)
                if ver != 5:
                    return
                want = 2 if username else 0
                if want not in methods:
                    conn.sendall(b"\x05\xff")
                    return
                conn.sendall(bytes([5, want]))
                if want == 2:
                    _, ulen = recv_exact(conn, 2)
                    user = recv_exact(conn, ulen).decode(errors="replace")
                    plen = recv_exact(conn, 1)[0]
                    pw = recv_exact(conn, plen).decode(errors="replace")
                    ok = user == username and pw == password
                    conn.sendall(b"\x01\x00" if ok else b"\x01\x01")
                    if not ok:
                        return
                _, cmd, _, atyp = recv_exact(conn, 4)
                if atyp == 1:
                    host = socket.inet_ntop(socket.AF_INET, recv_exact(conn, 4))
                elif atyp == 4:
                    host = socket.inet_ntop(socket.AF_INET6, recv_exact(conn, 16))
                elif atyp == 3:
                    host = recv_exact(conn, recv_exact(conn, 1)[0]).decode("idna")
                else:
                    reply(conn, 8)
                    return
                port = struct.unpack("!H", recv_exact(conn, 2))[0]
                if cmd != 1:
                    reply(conn, 7)
                    return
                try:
                    upstream = open_stream(host, port)
                except (OSError, WireRefused) as err:
                    log("warn", f"SOCKS5 CONNECT {host}:{port} failed: {err}")
                    reply(conn, 5)
                    return
                reply(conn, 0)
                conn.settimeout(None)
                relay(conn, upstream)
            except (OSError, WireRefused):
                return

    def loop():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
