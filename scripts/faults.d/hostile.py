#!/usr/bin/env python3
"""A hostile LAN host, for scripts/faults: what a student PC can send to the
boot server, its tracker and every peer. Each mode runs until its count or
its time is spent (every flood is bounded), then prints one JSON line of
what it did.

  hostile.py nonreaders  PEER INFO_HASH [--count 8] [--secs 60]
      peers that handshake, ask for blocks and never read a byte
  hostile.py reqflood    PEER INFO_HASH [--count 6000000] [--secs 60]
      one connection sending block requests as fast as it can, never reading
  hostile.py announces   URL INFO_HASH [--count 5000] [--secs 60]
      tracker announces with made-up peer ids, ports, ip= and origin-like ids
  hostile.py slowloris   HOST:PORT [--count 500] [--secs 60]
      HTTP connections that send half a header, a byte at a time
  hostile.py reports     URL MAC... [--count 200] [--secs 60]
      status reports for other hosts' MACs: done, huge error strings
  hostile.py corrupt     --listen IP:PORT INFO_HASH PIECES PIECE_LEN TOTAL
                         [--announce URL] [--secs 600]
      a peer that claims every piece and serves garbage for each block

PEER is IP:PORT of a BitTorrent peer (the server's seed). Only the
addresses given are ever contacted.
"""

import argparse
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse
import urllib.request


# SIGTERM ends a mode early, which still prints what it did.
STOP = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: STOP.set())


def over(deadline):
    return STOP.is_set() or time.monotonic() >= deadline


def hexbytes(h):
    b = bytes.fromhex(h)
    assert len(b) == 20, "info hash must be 40 hex digits"
    return b


def addr(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


def handshake(info_hash, peer_id):
    return b"\x13BitTorrent protocol" + bytes(8) + info_hash + peer_id


def peer_id(prefix=b"-XX0001-"):
    return prefix + bytes(random.choice(b"0123456789") for _ in range(20 - len(prefix)))


def request(index, begin, length=16384):
    return struct.pack(">IBIII", 13, 6, index, begin, length)


def connect(peer, timeout=10):
    s = socket.create_connection(peer, timeout=timeout)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return s


def nonreaders(a):
    """Each connection asks for the first block of many pieces and never
    reads: the seed's writes to it block as soon as its socket fills."""
    socks, asked = [], 0
    deadline = time.monotonic() + a.secs
    for _ in range(a.count):
        try:
            s = connect(addr(a.peer))
            s.sendall(handshake(hexbytes(a.info_hash), peer_id()))
            s.sendall(struct.pack(">IB", 1, 2))  # interested
            reqs = b"".join(request(i, 0) for i in range(64))
            s.sendall(reqs)
            asked += 64
            socks.append(s)
        except OSError:
            pass
    while not over(deadline):
        time.sleep(1)
    for s in socks:
        s.close()
    return {"connections": len(socks), "requests": asked}


def reqflood(a):
    sent, err = 0, None
    deadline = time.monotonic() + a.secs
    try:
        s = connect(addr(a.peer))
        s.settimeout(5)
        s.sendall(handshake(hexbytes(a.info_hash), peer_id()))
        s.sendall(struct.pack(">IB", 1, 2))
        batch = b"".join(request(i % 16, 0) for i in range(4096))
        while sent < a.count and not over(deadline):
            s.sendall(batch)
            sent += 4096
    except OSError as e:
        err = str(e)
    return {"requests_sent": sent, "ended_by": err or "count or time"}


def announces(a):
    ih = urllib.parse.quote_from_bytes(hexbytes(a.info_hash))
    done, failures, full = 0, 0, 0
    deadline = time.monotonic() + a.secs
    while done < a.count and not over(deadline):
        # Every tenth claims to be the origin (the old peer-id prefix).
        pid = peer_id(b"-BS0ORIGIN-" if done % 10 == 0 else b"-BS0100-")
        q = (f"info_hash={ih}&peer_id={urllib.parse.quote_from_bytes(pid)}"
             f"&port={1024 + done % 60000}&uploaded=0&downloaded=0&left=1&compact=1"
             f"&ip=10.{random.randint(0, 255)}.{random.randint(0, 255)}.{random.randint(1, 254)}")
        try:
            with urllib.request.urlopen(f"{a.url}?{q}", timeout=5) as r:
                body = r.read()
            if b"full" in body:
                full += 1
        except OSError:
            failures += 1
        done += 1
    return {"announces": done, "http_failures": failures, "swarm_full_answers": full}


def slowloris(a):
    host, port = addr(a.target)
    socks = []
    for _ in range(a.count):
        try:
            s = socket.create_connection((host, port), timeout=5)
            s.settimeout(None)  # blocking: MSG_DONTWAIT then means what it says
            s.sendall(b"GET /api/v1/deployment HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        except OSError:
            break
    opened = len(socks)
    deadline = time.monotonic() + a.secs
    closed_by_server = 0
    while not over(deadline) and socks:
        alive = []
        for s in socks:
            try:
                s.sendall(b"X")
                # The server's FIN shows as an empty read.
                if s.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
                    raise ConnectionResetError
                alive.append(s)
            except BlockingIOError:
                alive.append(s)
            except OSError:
                closed_by_server += 1
                s.close()
        socks = alive
        STOP.wait(2)
    for s in socks:
        s.close()
    return {"opened": opened, "closed_by_server": closed_by_server, "still_open_at_end": len(socks)}


def reports(a):
    sent, accepted = 0, 0
    deadline = time.monotonic() + a.secs
    big = "x" * (2 << 20)
    while sent < a.count and not over(deadline):
        mac = a.macs[sent % len(a.macs)]
        body = {
            "mac": mac, "state": "done", "deployment": 1, "image": "lab", "target": "/dev/sda",
            "done_bytes": 1, "total_bytes": 1, "uploaded_bytes": 0, "down_bps": 0.0, "up_bps": 0.0,
            "peers": 0, "finished": True, "error": big if sent % 10 == 0 else None,
            "elapsed_s": 1.0, "token": "forged" if sent % 2 else "",
        }
        req = urllib.request.Request(f"{a.url}/api/v1/status", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                accepted += r.status == 200
        except OSError:
            pass
        sent += 1
    return {"reports": sent, "accepted": accepted}


def corrupt(a):
    """Serves every block it is asked for, filled with garbage."""
    ih = hexbytes(a.info_hash)
    me = peer_id(b"-BS0100-")
    bits = bytearray((a.pieces + 7) // 8)
    for i in range(a.pieces):
        bits[i // 8] |= 0x80 >> (i % 8)
    served = {"blocks": 0, "connections": 0}
    lock = threading.Lock()

    def serve(c):
        try:
            c.settimeout(30)
            hs = b""
            while len(hs) < 68:
                d = c.recv(68 - len(hs))
                if not d:
                    return
                hs += d
            if hs[28:48] != ih:
                return
            c.sendall(handshake(ih, me))
            c.sendall(struct.pack(">IB", 1 + len(bits), 5) + bits)
            c.sendall(struct.pack(">IB", 1, 1))  # unchoke
            buf = b""
            while True:
                d = c.recv(65536)
                if not d:
                    return
                buf += d
                while len(buf) >= 4:
                    n = struct.unpack(">I", buf[:4])[0]
                    if len(buf) < 4 + n:
                        break
                    m, buf = buf[4:4 + n], buf[4 + n:]
                    if n == 13 and m[0] == 6:
                        index, begin, length = struct.unpack(">III", m[1:])
                        c.sendall(struct.pack(">IBII", 9 + length, 7, index, begin) + os.urandom(length))
                        with lock:
                            served["blocks"] += 1
        except OSError:
            return

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(addr(a.listen))
    srv.listen(64)
    srv.settimeout(1)
    deadline = time.monotonic() + a.secs
    last_announce = 0.0
    while not over(deadline):
        if a.announce and time.monotonic() - last_announce > 2:
            last_announce = time.monotonic()
            q = (f"info_hash={urllib.parse.quote_from_bytes(ih)}&peer_id={urllib.parse.quote_from_bytes(me)}"
                 f"&port={addr(a.listen)[1]}&uploaded=0&downloaded={a.total}&left=0&compact=1")
            try:
                urllib.request.urlopen(f"{a.announce}?{q}", timeout=5).read()
            except OSError:
                pass
        try:
            c, _ = srv.accept()
        except socket.timeout:
            continue
        with lock:
            served["connections"] += 1
        threading.Thread(target=serve, args=(c,), daemon=True).start()
    return served


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("nonreaders")
    p.add_argument("peer"); p.add_argument("info_hash")
    p.add_argument("--count", type=int, default=8); p.add_argument("--secs", type=float, default=60)
    p = sub.add_parser("reqflood")
    p.add_argument("peer"); p.add_argument("info_hash")
    p.add_argument("--count", type=int, default=6_000_000); p.add_argument("--secs", type=float, default=60)
    p = sub.add_parser("announces")
    p.add_argument("url"); p.add_argument("info_hash")
    p.add_argument("--count", type=int, default=5000); p.add_argument("--secs", type=float, default=60)
    p = sub.add_parser("slowloris")
    p.add_argument("target")
    p.add_argument("--count", type=int, default=500); p.add_argument("--secs", type=float, default=60)
    p = sub.add_parser("reports")
    p.add_argument("url"); p.add_argument("macs", nargs="+")
    p.add_argument("--count", type=int, default=200); p.add_argument("--secs", type=float, default=60)
    p = sub.add_parser("corrupt")
    p.add_argument("--listen", required=True); p.add_argument("info_hash")
    p.add_argument("pieces", type=int); p.add_argument("piece_len", type=int); p.add_argument("total", type=int)
    p.add_argument("--announce"); p.add_argument("--secs", type=float, default=600)
    a = ap.parse_args()
    out = globals()[a.mode](a)
    print(json.dumps({"mode": a.mode, **out}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
