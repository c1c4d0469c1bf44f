#!/usr/bin/env python3
"""Probe a limit_req limiter with exact bursts (stdlib only; 127.0.0.1 only).

  burst.py --port P burst N          open N keep-alive connections, then write one POST on
                                     each in one tight loop (well under a millisecond), and
                                     count the answers: {"200": a, "429": b}
  burst.py --port P steady RPS SECS [--bin-ms MS] [--at S --cmd "SHELL COMMAND"]
                                     offer RPS requests/s for SECS seconds (spread evenly over
                                     the connections) and report admitted per second (and per
                                     --bin-ms bin); --at/--cmd runs a command (e.g.
                                     nginx-limiter.sh rate ...) S seconds in, without waiting.
                                     A connection the server closes (a reload) is reopened.
  burst.py --port P reload CMD...    does limit_req's state survive a reload? A burst of 100
                                     (B + 1 pass), then CMD (e.g. nginx-limiter.sh rate --port P
                                     --rate R), then at once another burst of 100 on new
                                     connections: the refill since the first burst passes if
                                     the state survived, B + 1 if it was reset
  burst.py --port P sequence         the checks the README records: first burst after start,
                                     burst after idle, refill after 100 ms, steady admission
                                     while over-offered, and whether rejected requests count

Each result is one JSON line on stdout.
"""
import argparse
import json
import selectors
import socket
import subprocess
import sys
import time

BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"burst probe"}]}'


def request(port):
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\nAuthorization: Bearer sk-test\r\n"
        b"Content-Length: %d\r\n\r\n" % (port, len(BODY))
    ) + BODY


class Conn:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def read_response(self):
        """Blocking read of one HTTP/1.1 response with Content-Length; returns the status."""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        head, rest = self.buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v.strip())
        while len(rest) < length:
            chunk = self.s.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            rest += chunk
        self.buf = rest[length:]
        return status


def burst(port, n, conns=None):
    conns = conns or [Conn(port) for _ in range(n)]
    req = request(port)
    t0 = time.perf_counter()
    for c in conns[:n]:
        c.s.sendall(req)
    sent_ms = (time.perf_counter() - t0) * 1000
    counts = {}
    for c in conns[:n]:
        st = str(c.read_response())
        counts[st] = counts.get(st, 0) + 1
    return {"burst": n, "send_ms": round(sent_ms, 3), "status": dict(sorted(counts.items()))}, conns


def steady(port, rps, secs, nconn=64, bin_ms=0, at=None, cmd=None):
    """Open-loop-ish: each connection sends its next request at its own schedule (rps/nconn
    per connection), and only after its previous answer (so at most nconn in flight). A
    connection the server closes (nginx's old worker after a reload) is reopened; the request
    it carried counts as "closed"."""
    conns = [Conn(port) for _ in range(nconn)]
    req = request(port)
    sel = selectors.DefaultSelector()
    interval = nconn / rps
    start = time.perf_counter() + 0.01
    nxt = [start + i * interval / nconn for i in range(nconn)]
    busy = [False] * nconn
    per_sec = {}
    per_bin = {}
    total = {}
    reconnects = 0
    proc = None
    cmd_at = None
    for i, c in enumerate(conns):
        c.s.setblocking(True)
        sel.register(c.s, selectors.EVENT_READ, i)

    def count(st):
        t = time.perf_counter() - start
        d = per_sec.setdefault(int(t), {})
        d[st] = d.get(st, 0) + 1
        total[st] = total.get(st, 0) + 1
        if bin_ms and st == "200":
            b = int(t * 1000 // bin_ms)
            per_bin[b] = per_bin.get(b, 0) + 1

    def reopen(i):
        nonlocal reconnects
        sel.unregister(conns[i].s)
        conns[i].s.close()
        conns[i] = Conn(port)
        sel.register(conns[i].s, selectors.EVENT_READ, i)
        reconnects += 1
        busy[i] = False

    end = start + secs
    while True:
        now = time.perf_counter()
        if now >= end and not any(busy):
            break
        if cmd and proc is None and at is not None and now >= start + at:
            cmd_at = now - start
            proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(nconn):
            if not busy[i] and nxt[i] <= now and now < end:
                try:
                    conns[i].s.sendall(req)
                    busy[i] = True
                except OSError:
                    count("closed")
                    reopen(i)
                nxt[i] += interval
                if nxt[i] < now - interval:  # fell behind: do not build up a backlog
                    nxt[i] = now
        wake = min([t for i, t in enumerate(nxt) if not busy[i]] + [end]) - time.perf_counter()
        for key, _ in sel.select(timeout=max(0.0, min(wake, 0.005)) if wake > 0 else 0):
            i = key.data
            if not busy[i]:  # an idle connection became readable: the server closed it
                reopen(i)
                continue
            try:
                st = str(conns[i].read_response())
                busy[i] = False
            except OSError:
                st = "closed"
                reopen(i)
            count(st)
    for c in conns:
        c.s.close()
    out = {
        "steady_offered_rps": rps,
        "seconds": secs,
        "status": dict(sorted(total.items())),
        "reconnects": reconnects,
        "admitted_per_second": [per_sec.get(s, {}).get("200", 0) for s in range(int(secs) + 1)],
    }
    if bin_ms:
        out["bin_ms"] = bin_ms
        out["admitted_per_bin"] = [per_bin.get(b, 0) for b in range(int(secs * 1000 // bin_ms) + 1)]
    if proc is not None:
        text, _ = proc.communicate()
        out["cmd"] = {"at_s": round(cmd_at, 3), "exit": proc.returncode, "output": text.strip()}
    return out


def reload_check(port, cmd):
    """Burst, CMD (a reload), burst again at once: did the limiter keep its state?"""
    r1, conns = burst(port, 100)
    t1 = time.perf_counter()
    for c in conns:
        c.s.close()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t_cmd = time.perf_counter()
    r2, conns = burst(port, 100)
    t2 = time.perf_counter()
    for c in conns:
        c.s.close()
    return {
        "first": r1["status"],
        "cmd": " ".join(cmd),
        "cmd_exit": p.returncode,
        "cmd_output": p.stdout.strip(),
        "cmd_ms": round((t_cmd - t1) * 1000, 1),
        "second_after_ms": round((t2 - t1) * 1000, 1),
        "second": r2["status"],
        "reading": "state survived if the second burst got about the refill since the first "
                   "(old rate until the reload, new rate after), not B + 1",
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("burst")
    b.add_argument("n", type=int)
    s = sub.add_parser("steady")
    s.add_argument("rps", type=float)
    s.add_argument("secs", type=float)
    s.add_argument("--bin-ms", type=int, default=0, help="also count admitted per bin of this many ms")
    s.add_argument("--at", type=float, help="seconds into the run at which to start --cmd")
    s.add_argument("--cmd", dest="at_cmd", help="shell command to start at --at (not waited for until the end)")
    s.add_argument("--conns", type=int, default=64)
    rl = sub.add_parser("reload")
    rl.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("sequence")
    a = ap.parse_args()
    if a.cmd == "burst":
        print(json.dumps(burst(a.port, a.n)[0]))
    elif a.cmd == "steady":
        print(json.dumps(steady(a.port, a.rps, a.secs, a.conns, a.bin_ms, a.at, a.at_cmd)))
    elif a.cmd == "reload":
        if not a.command:
            ap.error("reload needs a command")
        print(json.dumps(reload_check(a.port, a.command)))
    else:
        out = lambda label, d: print(json.dumps({"check": label, **d}), flush=True)
        r, conns = burst(a.port, 100)
        out("burst of 100 (first ever, if the limiter was just started)", r)
        time.sleep(1.0)
        r, conns = burst(a.port, 100, conns)
        out("burst of 100 after 1 s idle", r)
        time.sleep(0.1)
        r, conns = burst(a.port, 100, conns)
        out("burst of 100 after 100 ms", r)
        # Rejections do not count: hammer with 429s for 50 ms right after a burst, then wait
        # 100 ms from the end of the first burst. If rejections counted, the third burst
        # would admit ~0; if not, ~20 (100 ms at 200/s) minus what the hammer got through.
        time.sleep(1.0)
        r1, conns = burst(a.port, 100, conns)
        t_end = time.perf_counter()
        hammer = {}
        while time.perf_counter() - t_end < 0.05:
            r, conns = burst(a.port, 100, conns)
            for k, v in r["status"].items():
                hammer[k] = hammer.get(k, 0) + v
        time.sleep(max(0.0, 0.1 - (time.perf_counter() - t_end)))
        r2, conns = burst(a.port, 100, conns)
        out("rejections do not count: burst 100, then 50 ms of bursts (hammer), then burst 100 "
            "at +100 ms", {"first": r1["status"], "hammer_50ms": hammer, "at_100ms": r2["status"]})
        for c in conns:
            c.s.close()
        time.sleep(1.0)
        out("steady over-offer 1000 req/s for 5 s over 64 connections", steady(a.port, 1000, 5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
