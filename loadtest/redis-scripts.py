#!/usr/bin/env python3
"""Redis CPU per task of the result store's Lua scripts, next to plain
commands doing the same writes.

Starts its own redis-server on a free loopback port, loads the scripts from
engine/src/results/redis/scripts/ (each with the prelude, as the store does),
pipes the writes of N tasks through `redis-cli --pipe` for each variant, and
divides the server's CPU time (INFO cpu) by N. Pipelining keeps socket work
out of the figure, so what is left is what the server does per task. The
start and end scripts, and the one that records a short first attempt
whole, take many tasks per call; they are measured with one and with 100.

Usage: loadtest/redis-scripts.py [N]   (default 100000; needs redis-server
and redis-cli on PATH)
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "engine", "src", "results", "redis", "scripts")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
# Tasks per batch submit, and per start or end call of a busy worker.
BATCH = 100


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resp(*args):
    out = [f"*{len(args)}\r\n"]
    for a in args:
        b = str(a).encode()
        out.append(f"${len(b)}\r\n")
        out.append(str(a))
        out.append("\r\n")
    return "".join(out)


class Server:
    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if self.cli("ping") == "PONG":
                return
            time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def cli(self, *args):
        r = subprocess.run(["redis-cli", "-p", str(self.port), *map(str, args)],
                           capture_output=True, text=True)
        return r.stdout.strip()

    def cpu(self):
        info = dict(line.split(":", 1) for line in self.cli("info", "cpu").split()
                    if ":" in line)
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def per_call(self, commands, calls):
        with tempfile.NamedTemporaryFile("w", suffix=".resp", delete=False) as f:
            f.write(commands)
            path = f.name
        try:
            before = self.cpu()
            with open(path, "rb") as stdin:
                subprocess.run(["redis-cli", "-p", str(self.port), "--pipe"], stdin=stdin,
                               stdout=subprocess.DEVNULL, check=True)
            return (self.cpu() - before) / calls * 1e6
        finally:
            os.unlink(path)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def main():
    prelude = open(os.path.join(SCRIPTS, "prelude.lua")).read()
    server = Server()
    try:
        def load(name):
            body = open(os.path.join(SCRIPTS, name)).read()
            return server.cli("script", "load", prelude + "\n" + body)

        create, start, end = load("create.lua"), load("start_attempt.lua"), load("end_attempt.lua")
        empty = server.cli("script", "load", "return 1")
        ids = [str(uuid.uuid4()) for _ in range(N)]
        at = "2026-12-04T21:00:00.000Z"
        created_ms, cutoff, ttl = 1_764_882_000_000, 1_764_000_000_000, 86_400
        # A new record's hash as the store writes it (record::encode).
        message = json.dumps({
            "schema_version": 1, "id": ids[0], "prompt": "echo this back",
            "priority": 5, "timeout_ms": None, "max_attempts": 3, "metadata": {},
            "created_at": at})
        fields = ["message", message, "state", "queued", "created_ms", created_ms,
                  "queued_at", at]
        result = json.dumps({"output": "echo this back", "executor": "echo", "duration_ms": 0})

        rows = []

        def measure(label, build):
            prefix = f"b{len(rows)}:"
            text = "".join(build(prefix, i) for i in ids)
            rows.append((label, server.per_call(text, N)))

        create_args = lambda p, i: [p, i, "", ttl, created_ms, cutoff, "queued", *fields]
        measure("EVALSHA of an empty script, no arguments",
                lambda p, i: resp("EVALSHA", empty, 0))
        measure("EVALSHA of an empty script, create's arguments",
                lambda p, i: resp("EVALSHA", empty, 1, f"{p}task:{i}", *create_args(p, i)))
        measure("create.lua",
                lambda p, i: resp("EVALSHA", create, 1, f"{p}task:{i}", *create_args(p, i)))
        plain = lambda p, i: (resp("HSET", f"{p}task:{i}", *fields)
                              + resp("EXPIRE", f"{p}task:{i}", ttl)
                              + resp("ZADD", f"{p}index", created_ms, i)
                              + resp("PUBLISH", f"{p}events:{i}",
                                     json.dumps({"id": i, "state": "queued"})))
        measure("create's writes as plain commands (HSET EXPIRE ZADD PUBLISH)", plain)
        # What the store sends for a single submit without an idempotency key.
        measure("the same in MULTI/EXEC, one task each",
                lambda p, i: resp("MULTI") + plain(p, i) + resp("EXEC"))

        def chunks(part):
            return [part[b:b + BATCH] for b in range(0, len(part), BATCH)]

        # What the store sends for a batch submit: one MULTI/EXEC for the
        # batch, one ZADD for all its tasks.
        def plain_batch(p, part):
            out = []
            for chunk in chunks(part):
                out.append(resp("MULTI"))
                for i in chunk:
                    out.append(resp("HSET", f"{p}task:{i}", *fields)
                               + resp("EXPIRE", f"{p}task:{i}", ttl)
                               + resp("PUBLISH", f"{p}events:{i}",
                                      json.dumps({"id": i, "state": "queued"})))
                members = [x for i in chunk for x in (created_ms, i)]
                out.append(resp("ZADD", f"{p}index", *members) + resp("EXEC"))
            return "".join(out)
        p = f"b{len(rows)}:"
        rows.append((f"the same for batches of {BATCH}, one MULTI/EXEC and one ZADD each",
                     server.per_call(plain_batch(p, ids), N)))

        # start and end take rows (`rows` in prelude.lua): measured with one
        # task per call, and with BATCH tasks per call as a busy worker
        # sends them. They run on the records written just above.
        written = p
        def row_calls(sha, shared, row, part, per_call):
            out = []
            for b in range(0, len(part), per_call):
                chunk = part[b:b + per_call]
                argv = [x for i in chunk for x in row(i)]
                out.append(resp("EVALSHA", sha, len(chunk),
                                *[f"{written}task:{i}" for i in chunk], *shared, *argv))
            return "".join(out)
        start_row = lambda i: [i, at, "", created_ms]
        end_row = lambda i: [i, 1, "succeeded", at, result, ""]
        half = N // 2
        for per_call, part in [(1, ids[:half]), (BATCH, ids[half:])]:
            tasks = "task" if per_call == 1 else "tasks"
            rows.append((f"start_attempt.lua, {per_call} {tasks} per call", server.per_call(
                row_calls(start, [written, ttl, cutoff, "worker-1"], start_row, part, per_call),
                len(part))))
            rows.append((f"end_attempt.lua (succeeded), {per_call} {tasks} per call",
                         server.per_call(row_calls(end, [written, ttl, cutoff], end_row, part,
                                                   per_call), len(part))))
        # A short first attempt, started and ended in one row
        # (`record_unstarted_attempt.lua`), on records created afresh.
        p = f"b{len(rows)}:"
        server.per_call(plain_batch(p, ids), N)
        written = p
        unstarted = load("record_unstarted_attempt.lua")
        unstarted_row = lambda i: [i, at, "succeeded", at, result, ""]
        for per_call, part in [(1, ids[:half]), (BATCH, ids[half:])]:
            tasks = "task" if per_call == 1 else "tasks"
            rows.append((f"record_unstarted_attempt.lua (succeeded), {per_call} {tasks} per call",
                         server.per_call(row_calls(unstarted, [written, ttl, cutoff, "worker-1"],
                                                   unstarted_row, part, per_call), len(part))))
        # What that row costs beyond its commands: the same writes as plain
        # commands, and the rows machinery around a row that does nothing.
        empty_row = server.cli("script", "load", prelude + "\nreturn rows(function() return {1} end, 4, 6)")
        rows.append((f"an empty row, {BATCH} tasks per call", server.per_call(
            row_calls(empty_row, [written, ttl, cutoff, "worker-1"], unstarted_row, ids, BATCH), N)))
        attempt = json.dumps({"number": 1, "worker_id": "worker-1", "started_at": at,
                              "finished_at": at, "outcome": "succeeded"})
        p = f"b{len(rows)}:"
        server.per_call(plain_batch(p, ids), N)
        def plain_unstarted(i):
            key = f"{p}task:{i}"
            return (resp("HMGET", key, "state", "created_ms", "attempts", "result", "error",
                         "finished_at", "worker_id", "started_at")
                    + resp("HSET", key, "state", "succeeded", "attempts", 1,
                           "worker_id", "worker-1", "started_at", at, "updated_at", at,
                           "attempt:1", attempt, "result", result, "finished_at", at)
                    + resp("EXPIRE", key, ttl)
                    + resp("PUBLISH", f"{p}events:{i}", json.dumps({"id": i, "state": "running"}))
                    + resp("PUBLISH", f"{p}events:{i}",
                           json.dumps({"id": i, "state": "succeeded"})))
        rows.append(("its commands sent plainly (HMGET HSET EXPIRE 2x PUBLISH)",
                     server.per_call("".join(plain_unstarted(i) for i in ids), N)))
        width = max(len(label) for label, _ in rows)
        print(f"Redis CPU per task, {N} tasks each, pipelined ({server.cli('info', 'server').split('redis_version:')[1].split()[0]}):")
        for label, us in rows:
            print(f"  {label:<{width}}  {us:6.2f} µs")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
