#!/usr/bin/env python3
"""Benchmarks for steve-jobs: every figure side by side with its baseline, in one run.

    .venv/bin/python bench_steve_jobs.py [engine] [api] [fan-out]   (as root; default: all)

engine: start overhead, write-to-follower latency, server memory while following 1 GiB.
        With --against OLD/steve_jobs.py (another checkout's script, e.g. `git worktree add
        /tmp/old HEAD~5`): starts of that engine and ours taken in turn, for a change that
        must leave the start path as it was.
api:    CLI round trip vs ssh, streaming throughput vs ssh and a pipe, 1,000 followers
        (beside a do-nothing grpc.aio server), start rate, restart with running jobs.
fan-out: only the 1,000 followers, twice each way (api needs openssh-server; this does not).
cli:    the installed `steve-jobs` command, `python steve_jobs.py` and `ssh localhost true`
        round trips; `run -f` of 256 MiB (live) vs ssh; List server time with 10,000 jobs.
sessions: keystroke echo latency in `run -it cat` vs `ssh -tt localhost cat`; `run -i` of
        1 GiB vs ssh; a start's cost with tracing exported (OpenTelemetry, in-process
        collector) vs without.
faults: server RSS with 1,000 stalled followers at distinct offsets; status latency with
        20,000 idle connections open vs none; time from a supervisor's death to `unknown`.
files:  cp in and out of a job's folder, 1 GiB as one file and 20,000 small files, vs
        tar over ssh and scp -r on loopback; exec ID true vs run -f true and ssh localhost
        true (needs openssh-server).
network: egress jobs against a remote host in a namespace of our own (198.51.100.2, a
        veth away): bulk TCP throughput from a job vs from the host itself; connect p50
        through egress vs direct; start p50 of an egress job vs a default job; the helper's
        memory (PSS).
tenants: mrarsenal's `status` p50/p99 and the server's RSS while alice floods stops, runs 8
        huge tails, reads a 1-byte-interleaved job in full (with runs, and a run a chunk as
        an old client), holds 10 stuck Inputs, beside
        no load; server CPU to read that job in full vs one of its size on one stream.
batch:  --max-jobs 50: 2,000 `true` jobs by 4 users queued vs started one by one with
        client retries (total time, queue wait p50/p99 per user, slot-free-to-start p99);
        Start and Status p99 with 10,000 jobs queued vs none; restart to listening with
        10,000 queued; slot freed to the next queued job's exec, one slot at a time and 50
        together; Start p50 with the metrics endpoint scraped every second vs off.
scale:  a probe of one supervisor for K jobs (memory per job for K = 1, 8, 16, 32); 200
        and 2,000 sleeping jobs through a real server: our memory per job (PSS, USS),
        Start p50 beside none running (before and after), Status and List p99, server
        RSS, restart with all re-adopted, stop all with the CLI (a call each, then one
        call); then starts/s from 10 clients vs unshare(1).
scale-start: Start p50 with 2,000 sleeping jobs running vs none, and the rate they start
        at; with --against OLD/steve_jobs.py, that checkout's server in turn.
scale-ksm: 200 and 2,000 sleeping jobs: our memory per job (PSS, USS) with the host's KSM
        as it is, then with KSM turned on until it has merged what it will (the host's KSM
        settings put back after), ksmd's CPU meanwhile and at the kernel's default rate,
        Start p50 with the supervisors merged vs before; then, unmerged, merged again at the
        rate the kernel's advisor picks (6.9 and later).
scale-floors: what the scale goals leave a CLI call and a start (CPU on this machine's cores)
        beside what a bare Python process, importing grpc, compiling the script, a mutual-TLS
        grpc call, a fork of a process the spawner's size and unshare(1) cost alone.
Timing on a shared machine is noisy: read medians and ratios, not single numbers.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid

import steve_jobs as sj
from steve_jobs_harness import (HERE, REMOTE_ADDRESS, REMOTE_PORT, SCRIPT, SINK_PORT,
                                RemoteHost, SpanCollector, bearer, free_port, grpc,
                                make_cert_set, pb, pb_grpc, remove_egress_firewall,
                                remove_state_dir, user_channel, user_credentials)

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


def load_script(path, name):
    """Another checkout's steve_jobs.py as a module of its own name (its spawner is its own
    file, run as that file)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # typing.NamedTuple and dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class BenchEngine:
    """An engine (of module sj, or another checkout's) on a scratch state dir and cgroup
    root, removed afterwards."""

    def __init__(self, module=sj, **config):
        self.sj, self.config = module, config

    def __enter__(self):
        sj = self.sj
        self.state_dir = tempfile.mkdtemp(prefix="steve-jobs-bench-", dir="/var/tmp")
        self.engine = sj.Engine(sj.EngineConfig(
            state_dir=self.state_dir, cgroup_root=f"steve-jobs-bench-{uuid.uuid4().hex[:6]}",
            output_cap=2 * sj.GiB, **self.config)).open()
        return self.engine

    def __exit__(self, *exc):
        self.engine.close(stop_jobs=True)
        remove_egress_firewall(self.state_dir)
        remove_state_dir(self.state_dir)


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


def bench_start_against(engine, other, label):
    """Start call to exec, ours and another version's engine in turn (the same load on
    both); their ratio is the figure."""
    ours, theirs = [], []
    for i in range(RUNS * 2):
        for first, samples in ((engine, ours), (other, theirs))[::1 if i % 2 else -1]:
            time.sleep(0.03)   # a job start, not a burst: the warm shim is ready again
            t = time.perf_counter()
            job_id = first.start("bench", ["true"])
            samples.append((time.perf_counter() - t) * 1000)
            first.wait(job_id, 10)
    report("start (call -> exec), this checkout", ours, {label: theirs})


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


###############################################################################
# API benchmarks: a real server, the real CLI, and OpenSSH as the baseline
###############################################################################

class BenchServer:
    """steve_jobs.py server on a free loopback port, with its own certificates and state."""

    def __init__(self, env=None, extra=(), users=(), script=SCRIPT):
        self.env, self.extra = {**os.environ, **(env or {})}, list(extra)
        self.users = users   # USER:ROLE of the certificates made (default: gen_certs.sh's)
        self.script = script   # (another checkout's, for a side-by-side)

    def __enter__(self):
        self.dir = tempfile.mkdtemp(prefix="steve-jobs-bench-", dir="/var/tmp")
        os.chmod(self.dir, 0o711)   # jobs (other uids) must reach state/work/ID inside it
        self.certs = os.path.join(self.dir, "certs")
        make_cert_set(self.certs, users=self.users)   # (): mrarsenal:admin, alice:user
        self.address = f"127.0.0.1:{free_port()}"
        self.cgroup_root = f"steve-jobs-bench-{uuid.uuid4().hex[:6]}"
        self.log = open(os.path.join(self.dir, "server.log"), "ab")
        try:
            self.start()
        except BaseException:   # (a server that did not start: nothing of it is left)
            self.log.close()
            remove_state_dir(self.dir)
            raise
        return self

    def start(self, state="state"):
        """Start the server process; returns seconds until it listens."""
        t = time.perf_counter()
        mark = self.log.tell()
        self.proc = subprocess.Popen(
            [sys.executable, self.script, "server", "--listen", self.address, "--certs", self.certs,
             "--state-dir", os.path.join(self.dir, state), "--output-cap", "2G",
             "--cgroup-root", self.cgroup_root, "--stop-jobs-on-exit",
             "--insecure-dev-certs", *self.extra],   # a throwaway set: its CA key is beside it
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 60
        while b"listening on" not in open(self.log.name, "rb").read()[mark:]:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(open(self.log.name).read())
            time.sleep(0.005)
        return time.perf_counter() - t

    def crash(self):
        """SIGKILL the server: its jobs keep running."""
        self.proc.kill()
        self.proc.wait(30)

    def cli(self, *args, stdout=subprocess.PIPE):
        return subprocess.run([sys.executable, self.script, "--server", self.address, "--certs",
                               self.certs, *args], stdout=stdout, check=True)

    def start_job(self, script):
        return self.cli("run", script).stdout.decode().strip()

    def wait_ended(self, job_id):
        import json
        while json.loads(self.cli("--json", "status", job_id).stdout)["state"] == "running":
            time.sleep(0.2)

    def rss_mb(self, field="VmRSS"):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def threads(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()
        remove_state_dir(self.dir)   # (with the working folders mounted in its state)


class BenchSSHD:
    """An OpenSSH server of our own on a free loopback port, key login only."""

    def __enter__(self):
        self.dir = tempfile.mkdtemp(prefix="steve-jobs-sshd-")
        d = self.dir
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/host"],
                       check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/client"],
                       check=True)
        shutil.copy(f"{d}/client.pub", f"{d}/authorized_keys")
        self.port = free_port()
        with open(f"{d}/sshd_config", "w") as f:
            f.write(f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {d}/host\n"
                    f"AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n"
                    f"KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                    f"PermitRootLogin prohibit-password\nPidFile {d}/sshd.pid\n"
                    f"Subsystem sftp internal-sftp\n")   # (scp speaks sftp)
        self.made_run_dir = not os.path.isdir("/run/sshd")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # privilege separation dir
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", f"{d}/sshd_config",
                                      "-E", f"{d}/sshd.log"])
        deadline = time.monotonic() + 10
        while subprocess.run(self.argv("true"), capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit("sshd did not start: " + open(f"{d}/sshd.log").read())
            time.sleep(0.1)
        return self

    def argv(self, command):
        return ["ssh", "-p", str(self.port), "-i", f"{self.dir}/client", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "root@127.0.0.1", command]

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)
        if self.made_run_dir:
            shutil.rmtree("/run/sshd", ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def timed(argv, **kw):
    t = time.perf_counter()
    subprocess.run(argv, check=True, **kw)
    return (time.perf_counter() - t) * 1000


def bench_round_trip(server, sshd, runs=15):
    job_id = server.start_job("true")
    cli = [sys.executable, SCRIPT, "--server", server.address, "--certs", server.certs,
           "status", job_id]
    ours, ssh = [], []
    for _ in range(runs):
        ours.append(timed(cli, stdout=subprocess.DEVNULL))
        ssh.append(timed(sshd.argv("true"), stdout=subprocess.DEVNULL))
    report("CLI status round trip (target x0.5)", ours, {"ssh true": ssh})


def bench_streaming(server, sshd, runs=3):
    size = sj.GiB
    job_id = server.start_job(f"head -c {size} /dev/zero")
    server.wait_ended(job_id)
    stream = [sys.executable, SCRIPT, "--server", server.address, "--certs", server.certs,
              "stream", job_id]
    rates = {"steve-jobs stream": [], "ssh head -c 1G": [], "pipe head | cat": []}
    for _ in range(runs):
        for label, argv in (("steve-jobs stream", stream),
                            ("ssh head -c 1G", sshd.argv(f"head -c {size} /dev/zero")),
                            ("pipe head | cat", ["sh", "-c", f"head -c {size} /dev/zero | cat"])):
            ms = timed(argv, stdout=subprocess.DEVNULL)
            rates[label].append(size / sj.MiB / (ms / 1000))
    report_rates("stream 1 GiB (target >= x1.5 ssh)", rates, "steve-jobs stream")


def make_file_trees(top):
    """{label: path}: one 1 GiB file (random bytes: nothing to compress) and 20,000 files
    of 4 KiB in 100 folders (78 MiB), under top."""
    big, small = os.path.join(top, "one-file"), os.path.join(top, "small-files")
    os.makedirs(big)
    subprocess.run(["head", "-c", str(sj.GiB), "/dev/urandom"], check=True,
                   stdout=open(os.path.join(big, "blob"), "wb"))
    block = os.urandom(4 * sj.KiB)
    for i in range(20_000):
        folder = os.path.join(small, f"d{i % 100:02d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"f{i}"), "wb") as f:
            f.write(block)
    return {"1 GiB as one file": big, "20,000 files of 4 KiB": small}


def tree_mib(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path)
               for f in fs) / sj.MiB


def bench_files(server, sshd, runs=3):
    """cp in and out of a job's folder vs tar over ssh and scp -r on loopback, both ways,
    every side on a tmpfs (the job's folder is one; so are the trees, the ssh side's and
    the local side's folders)."""
    top = tempfile.mkdtemp(prefix="steve-jobs-bench-files-", dir="/var/tmp")
    sj.mount("tmpfs", top, "tmpfs", 0, "size=6g")   # (a disk's journal: noise at 20,000 files)
    remote, local_out = os.path.join(top, "remote"), os.path.join(top, "out")
    os.makedirs(remote)   # what ssh writes into (a tmpfs, as a job's folder)
    os.makedirs(local_out)   # what both write out into
    cli = [sys.executable, SCRIPT, "--server", server.address, "--certs", server.certs]
    ssh = sshd.argv("")[:-1]
    scp = ["scp", "-q", "-r", "-P", str(sshd.port)] + ssh[3:-1]
    try:
        for label, tree in make_file_trees(top).items():
            name, mib = os.path.basename(tree), tree_mib(tree)
            rates = {way: {} for way in ("in", "out")}
            for _ in range(runs):
                job = server.start_job("sleep 100000")
                ways = {
                    "in": {"steve-jobs cp": cli + ["cp", tree, f"{job}:{name}"],
                           "tar | ssh tar x": ["sh", "-c", f"tar c -C {top} {name} | "
                                               f"{' '.join(ssh)} 'tar x -C {remote}'"],
                           "scp -r": scp + [tree, f"root@127.0.0.1:{remote}/scp-{name}"]},
                    "out": {"steve-jobs cp": cli + ["cp", f"{job}:{name}", local_out],
                            "ssh tar c | tar x": ["sh", "-c", f"{' '.join(ssh)} 'tar c -C "
                                                  f"{remote} {name}' | tar x -C {local_out}"],
                            "scp -r": scp + [f"root@127.0.0.1:{remote}/{name}", local_out]}}
                for way in ("in", "out"):
                    for tool, argv in ways[way].items():
                        subprocess.run(["sh", "-c", f"rm -rf {local_out}/*"], check=True)
                        ms = timed(argv, stdout=subprocess.DEVNULL)
                        rates[way].setdefault(tool, []).append(mib / (ms / 1000))
                server.cli("stop", "--grace", "0", job)
                server.cli("rm", job)
                subprocess.run(["sh", "-c", f"rm -rf {remote}/*"], check=True)
            for way in ("in", "out"):
                report_rates(f"cp {way}, {label} (goal >= x1 ssh)", rates[way], "steve-jobs cp")
    finally:
        sj.umount_lazy(top)
        shutil.rmtree(top, ignore_errors=True)


def bench_exec(server, sshd, runs=21):
    """exec JOB true round trip, beside run -f true and ssh localhost true, in turn."""
    cli = [sys.executable, SCRIPT, "--server", server.address, "--certs", server.certs]
    job = server.start_job("sleep 100000")
    samples = {"exec": [], "run -f": [], "ssh": []}
    try:
        for _ in range(runs):
            for label, argv in (("exec", cli + ["exec", job, "--", "true"]),
                                ("run -f", cli + ["run", "-f", "--", "true"]),
                                ("ssh", sshd.argv("true"))):
                samples[label].append(timed(argv, stdout=subprocess.DEVNULL))
    finally:
        server.cli("stop", "--grace", "0", job)
    report("exec ID true, round trip (goal <= x1 run -f)", samples["exec"],
           {"run -f true": samples["run -f"], "ssh localhost true": samples["ssh"]})


def report_rates(name, rates, ours_label):
    """One line: our median rate, then each baseline's and our ratio to it."""
    ours = statistics.median(rates[ours_label])
    line = f"{name:38s} {ours:7.0f} MiB/s"
    for label, samples in rates.items():
        if label != ours_label:
            base = statistics.median(samples)
            line += f" | {label} {base:6.0f} MiB/s (x{ours / base:.2f})"
    print(line, flush=True)


class InstalledCommand:
    """`pip install .` of this folder into a scratch target: the `steve-jobs` command."""

    def __enter__(self):
        self.dir = tempfile.mkdtemp(prefix="steve-jobs-pip-")
        src = os.path.join(self.dir, "src")
        os.mkdir(src)
        for name in ("steve_jobs.py", "jobs_pb2.py", "jobs_pb2_grpc.py", "pyproject.toml",
                     "README.md"):
            shutil.copy(os.path.join(HERE, name), src)
        self.site = os.path.join(self.dir, "site")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "--target", self.site, src], check=True)
        self.env = {**os.environ, "PYTHONPATH": self.site}
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)   # pip compiled it; let Python use it
        return self

    def argv(self, server, *args):
        return [sys.executable, os.path.join(self.site, "bin", "steve-jobs"), "--server",
                server.address, "--certs", server.certs, *args]

    def __exit__(self, *exc):
        shutil.rmtree(self.dir, ignore_errors=True)


def bench_cli_round_trip(server, sshd, installed, runs=21):
    job_id = server.start_job("true")
    script = [sys.executable, SCRIPT, "--server", server.address, "--certs", server.certs,
              "status", job_id]
    timings = {"installed": [], "script": [], "ssh": []}
    for _ in range(runs):   # interleaved: the machine's noise hits all three alike
        timings["installed"].append(timed(installed.argv(server, "status", job_id),
                                          stdout=subprocess.DEVNULL, env=installed.env))
        timings["script"].append(timed(script, stdout=subprocess.DEVNULL))
        timings["ssh"].append(timed(sshd.argv("true"), stdout=subprocess.DEVNULL))
    report("steve-jobs status (installed; goal x0.5)", timings["installed"],
           {"ssh true": timings["ssh"]})
    report("python steve_jobs.py status", timings["script"], {"ssh true": timings["ssh"]})


def bench_run_follow(server, sshd, runs=5, size=256 * sj.MiB):
    """run -f of a job writing size bytes, live, end to end (start, follow, exit) vs ssh;
    and following the same output once the job has ended."""
    run = [sys.executable, SCRIPT, "--server", server.address, "--certs", server.certs,
           "run", "-f", f"head -c {size} /dev/zero"]
    rates = {"run -f": [], "ssh": [], "stream ended": []}
    for _ in range(runs):
        rates["run -f"].append(size / sj.MiB / timed(run, stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.PIPE) * 1000)
        rates["ssh"].append(size / sj.MiB / timed(sshd.argv(f"head -c {size} /dev/zero"),
                                                  stdout=subprocess.DEVNULL) * 1000)
    job_id = server.start_job(f"head -c {size} /dev/zero")
    server.wait_ended(job_id)
    stream = [sys.executable, SCRIPT, "--server", server.address, "--certs", server.certs,
              "stream", job_id]
    for _ in range(runs):
        rates["stream ended"].append(size / sj.MiB / timed(stream, stdout=subprocess.DEVNULL)
                                     * 1000)
    report_rates("run -f 256 MiB live (goal >= x1.5 ssh)", rates, "run -f")


class PtySession:
    """A command on a pty of ours, as a terminal emulator runs it: raw keystrokes in,
    echoes out."""

    def __init__(self, argv):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(["setsid", "-c", *argv], stdin=slave, stdout=slave,
                                     stderr=slave)
        os.close(slave)

    def echo_ms(self, key=b"x", timeout=10):
        """Write one key; milliseconds until its echo is back."""
        import select
        t = time.perf_counter()
        os.write(self.master, key)
        seen = b""
        while key not in seen:
            if not select.select([self.master], [], [], timeout)[0]:
                raise SystemExit(f"no echo from {self.proc.args}")
            seen += os.read(self.master, 4096)
        return (time.perf_counter() - t) * 1000

    def ready(self, timeout=30):
        """Wait until keys are echoed (the session is up)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.echo_ms(b"r", timeout=0.5)
            except SystemExit:
                if time.monotonic() > deadline:
                    raise

    def close(self):
        self.proc.kill()
        self.proc.wait()
        os.close(self.master)


class FloorEcho:
    """A key's round trip through grpc alone, as the CLI makes it (grpc's sync client: Input
    sends, Output receives) to FloorServer, which echoes it in memory: the floor under any
    client and server written with grpc's Python API on this machine."""

    def __init__(self, floor, certs):
        import queue
        self.client = sj.Client(floor.address, certs, "mrarsenal")
        self.keys = queue.Queue()
        pb = self.client.pb

        def messages():
            yield pb.InputMessage(job_id="echo")
            while (key := self.keys.get()) is not None:
                yield pb.InputMessage(data=key)
        self.input = self.client.input(messages())
        self.output = iter(self.client.output(pb.OutputRequest(job_id="echo", follow=True)))

    def echo_ms(self, key=b"x"):
        t = time.perf_counter()
        self.keys.put(key)
        seen = b""
        while key not in seen:
            seen += bytes(next(self.output).data)
        return (time.perf_counter() - t) * 1000

    def close(self):
        self.keys.put(None)
        self.input.cancel()
        self.client.close()


def bench_keystroke_echo(server, sshd, keys=300):
    """run -it cat vs ssh -tt cat: each key goes to the remote pty, whose echo comes back
    (cat itself waits for a line); sessions side by side, keys interleaved, with grpc's own
    round trip (FloorEcho) beside them."""
    ours = PtySession([sys.executable, SCRIPT, "--server", server.address, "--certs",
                       server.certs, "run", "-it", "cat"])
    ssh = PtySession(["ssh", "-tt", *sshd.argv("cat")[1:]])
    grpc_floor = None
    with FloorServer(server.certs) as floor:
        try:
            grpc_floor = FloorEcho(floor, server.certs)
            ours.ready()
            ssh.ready()
            grpc_floor.echo_ms()
            sessions = {"ours": ours, "ssh": ssh, "grpc floor": grpc_floor}
            timings = {label: [] for label in sessions}
            for i in range(keys):
                if i % 60 == 59:   # a line now and then: cat's line buffer stays small
                    ours.echo_ms(b"\r")
                    ssh.echo_ms(b"\r")
                for label, session in sessions.items():
                    timings[label].append(session.echo_ms())
                time.sleep(0.005)   # a fast typist: keys 5 ms apart, not back to back
            for label, samples in timings.items():
                print(f"  {label:10s} keystroke echo p50 {pct(samples, 50):6.2f} ms  "
                      f"p99 {pct(samples, 99):6.2f} ms", flush=True)
            report("run -it cat keystroke echo (goal p99<=ssh)", timings["ours"],
                   {"ssh -tt cat": timings["ssh"], "grpc floor": timings["grpc floor"]})
            for label in ("ssh", "grpc floor"):
                print(f"{'':38s} p99 ratio to {label}: "
                      f"x{pct(timings['ours'], 99) / pct(timings[label], 99):.2f}", flush=True)
        finally:
            ours.close()
            ssh.close()
            if grpc_floor is not None:
                grpc_floor.close()


def bench_stdin_throughput(server, sshd, runs=3, size=sj.GiB):
    """head -c 1G /dev/zero | run -i 'cat > /dev/null', end to end, vs the same into ssh."""
    feed = f"head -c {size} /dev/zero | "
    run = (f"{sys.executable} {SCRIPT} --server {server.address} --certs {server.certs} "
           f"run -i 'cat > /dev/null'")
    ssh = " ".join(f"'{a}'" for a in sshd.argv("cat > /dev/null"))
    rates = {"run -i": [], "ssh": []}
    for _ in range(runs):
        for label, command in (("run -i", run), ("ssh", ssh)):
            ms = timed(["sh", "-c", feed + command], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
            rates[label].append(size / sj.MiB / (ms / 1000))
    report_rates("run -i 1 GiB to cat (goal >= x1 ssh)", rates, "run -i")


def bench_tracing_cost(runs=RUNS):
    """Start calls to a server exporting spans to an OTLP collector (in this process) vs
    one exporting nothing, interleaved; the calls carry a traceparent either way."""
    collector = SpanCollector()
    try:
        env = collector.env()
        del env["OTEL_BSP_SCHEDULE_DELAY"]   # (the tests' 50 ms): the default 5 s, as deployed
        with BenchServer(env) as traced, BenchServer() as plain:
            clients = {label: sj.Client(server.address, server.certs, "mrarsenal")
                       for label, server in (("traced", traced), ("plain", plain))}
            timings = {"traced": [], "plain": []}
            for i in range(runs + 5):
                for label, client in clients.items():
                    t = time.perf_counter()
                    client.call("Start", client.pb.StartRequest(argv=["true"]))
                    if i >= 5:   # the first calls warm up connections and imports
                        timings[label].append((time.perf_counter() - t) * 1000)
            for client in clients.values():
                client.close()
        spans = len(collector.spans)   # (the servers flushed their batches as they stopped)
        cost = statistics.median(timings["traced"]) - statistics.median(timings["plain"])
        report(f"Start, spans exported (p50 cost {cost:+.2f} ms; goal <= 1)",
               timings["traced"], {"not exported": timings["plain"]})
        print(f"{'':38s} spans the collector received: {spans}", flush=True)
    finally:
        collector.close()


def bench_list_many(server, jobs=10_000, runs=30):
    """List's server time (its log line's duration_ms) with `jobs` ended jobs: records
    copied from one real ended job (a restart adopts them), then pages of 100."""
    import json
    import re
    template = server.start_job("true")
    server.wait_ended(template)
    server.proc.terminate()
    server.proc.wait(60)
    state = os.path.join(server.dir, "state", "jobs")
    spec = json.load(open(os.path.join(state, template, sj.SPEC_FILE)))
    for i in range(jobs):
        job_id = str(uuid.uuid4())
        d = os.path.join(state, job_id)
        shutil.copytree(os.path.join(state, template), d)
        json.dump({**spec, "id": job_id, "created_at": spec["created_at"] + i / 1000,
                   "uid": 0}, open(os.path.join(d, sj.SPEC_FILE), "w"))
    server.start()
    mark = os.path.getsize(server.log.name)
    for _ in range(2):
        server.cli("--json", "list", stdout=subprocess.DEVNULL)   # every page, twice
    log = open(server.log.name).read()[mark:]
    ms = [float(m) for m in re.findall(r"method=List job=- result=OK duration_ms=([\d.]+)", log)]
    print(f"{'List page of 100, ' + str(jobs) + ' jobs kept':38s} server time p50 "
          f"{statistics.median(ms):6.2f} ms p90 {pct(ms, 90):6.2f} ms over {len(ms)} pages "
          f"(goal p50 < 50 ms)", flush=True)


def read_file(certs, name):
    with open(os.path.join(certs, name), "rb") as f:
        return f.read()


class TenantClient:
    """A stub of user's on the bench server, on a channel of its own."""

    def __init__(self, server, user):
        self.pb = pb
        self.channel = user_channel(server.certs, server.address, user)
        self.md = bearer(server.certs, user)
        self.stub = pb_grpc.JobServiceStub(self.channel)

    def start(self, argv, **fields):
        return self.stub.Start(self.pb.StartRequest(argv=argv, **fields), metadata=self.md,
                               timeout=60).job_id

    def wait(self, job_id):
        return self.stub.Wait(self.pb.JobRef(job_id=job_id), metadata=self.md, timeout=600)

    def read_all(self, job_id, **request):
        return sum(len(c.data) for c in self.stub.Output(self.pb.OutputRequest(
            job_id=job_id, **request), metadata=self.md, timeout=600))


def server_cpu(server):
    """The server's CPU seconds so far, to the nanosecond: the sum of its threads'
    schedstat (/proc/PID/stat counts in 10 ms ticks, too coarse for a read of 10 MB)."""
    total = 0
    for task in os.listdir(f"/proc/{server.proc.pid}/task"):
        try:
            with open(f"/proc/{server.proc.pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:   # a thread that has just ended
            pass
    return total / 1e9


def under_load(server, admin, job_id, seconds=8.0):
    """mrarsenal's Status samples (ms) every ~10 ms for seconds, and the server's peak RSS."""
    samples, peak, until = [], server.rss_mb(), time.monotonic() + seconds
    while time.monotonic() < until:
        t = time.perf_counter()
        admin.stub.Status(admin.pb.JobRef(job_id=job_id), metadata=admin.md, timeout=60)
        samples.append((time.perf_counter() - t) * 1000)
        peak = max(peak, server.rss_mb())
        time.sleep(0.01)
    return samples, peak


ALTERNATING_WRITER = ("import os, time\n"
                      "end = time.monotonic() + {seconds}\n"
                      "while time.monotonic() < end:\n"
                      "    for _ in range(1000):\n"
                      "        os.write(1, b'a'); os.write(2, b'b')\n")


EGRESS = sj.JobOptions(egress=True)
SEND_SCRIPT = """
import socket, sys, time
size, chunk = int(sys.argv[1]), bytes(1 << 20)
t = time.perf_counter()
with socket.create_connection((sys.argv[2], int(sys.argv[3]))) as s:
    for _ in range(size >> 20):
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    assert int(s.recv(64)) == size
print(time.perf_counter() - t)
"""
CONNECT_SCRIPT = """
import json, socket, sys, time
samples = []
for _ in range(int(sys.argv[1])):
    t = time.perf_counter()
    socket.create_connection((sys.argv[2], int(sys.argv[3]))).close()
    samples.append((time.perf_counter() - t) * 1000)
print(json.dumps(samples))
"""


def job_output(engine, argv, options=EGRESS):
    """Run argv as a job; its output, once it has ended."""
    job_id = engine.start("bench", argv, options=options)
    status = engine.wait(job_id, 600)
    out = b"".join(engine.follow(job_id))
    if status.exit_code != 0:
        raise RuntimeError(f"{argv[:3]}: {status.state} {status.error}: {out[-500:]!r}")
    return out


def bench_network(engine, runs=3, size=512 * sj.MiB):
    """Egress against the remote host, each figure beside the host's own."""
    job_rates, host_rates = [], []
    for _ in range(runs):
        seconds = float(job_output(engine, ["python3", "-c", SEND_SCRIPT, str(size),
                                            REMOTE_ADDRESS, str(SINK_PORT)]))
        job_rates.append(size / sj.MiB / seconds)
        done = subprocess.run([sys.executable, "-c", SEND_SCRIPT, str(size), REMOTE_ADDRESS,
                               str(SINK_PORT)], capture_output=True, check=True)
        host_rates.append(size / sj.MiB / float(done.stdout))
    ours, direct = statistics.median(job_rates), statistics.median(host_rates)
    print(f"{'TCP bulk send, egress job vs the host':38s} {ours:7.0f} MiB/s | host "
          f"{direct:7.0f} MiB/s (x{ours / direct:.2f}; goal >= 0.5)  runs "
          f"{', '.join(f'{r:.0f}' for r in job_rates)} vs "
          f"{', '.join(f'{r:.0f}' for r in host_rates)}", flush=True)
    connects = 200
    job_samples = json.loads(job_output(engine, ["python3", "-c", CONNECT_SCRIPT, str(connects),
                                                 REMOTE_ADDRESS, str(REMOTE_PORT)]))
    done = subprocess.run([sys.executable, "-c", CONNECT_SCRIPT, str(connects), REMOTE_ADDRESS,
                           str(REMOTE_PORT)], capture_output=True, check=True)
    host_samples = json.loads(done.stdout)
    report("connect, egress job (goal <= +1 ms)", job_samples, {"host": host_samples})
    def timed_start(options):
        time.sleep(0.05)   # a start, not a burst: the warm shim is ready again
        t = time.perf_counter()
        job_id = engine.start("bench", ["true"], options=options)
        took = (time.perf_counter() - t) * 1000
        engine.wait(job_id, 30)
        return took
    # While starts ask for egress, warm shims have it ready; the first after
    # sj.EGRESS_MEMORY default starts finds none and makes its own (cold).
    warm, mixed_plain, cold, plain = [], [], [], []
    for _ in range(RUNS):
        warm.append(timed_start(EGRESS))
        mixed_plain.append(timed_start(sj.JobOptions()))
    for _ in range(max(3, RUNS // 6)):
        plain.extend(timed_start(sj.JobOptions()) for _ in range(sj.EGRESS_MEMORY + 2))
        cold.append(timed_start(EGRESS))
    report("start, egress job (goal <= +10 ms)", warm, {"default job": mixed_plain})
    report("start, egress job, first after idle", cold, {"default job": plain})
    job_id = engine.start("bench", ["sleep", "60"], options=EGRESS)
    try:
        time.sleep(0.5)
        helper = engine._get(job_id).shim["egress_pid"]
        with open(f"/proc/{helper}/smaps_rollup") as f:
            pss = next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        print(f"{'egress helper (slirp4netns) PSS':38s} {pss / 1024:7.2f} MiB", flush=True)
    finally:
        engine.stop(job_id, grace=0)


def bench_tenants(server):
    """mrarsenal's status while alice runs each hostile load, beside no load (goal: p99 <=
    20 ms under each), the server's RSS before, at the peak and after; and the server's
    CPU to read a 1-byte-interleaved job in full vs a job of its size on one stream."""
    admin, alice = TenantClient(server, "mrarsenal"), TenantClient(server, "alice")
    pb, mine = alice.pb, admin.start(["sleep", "3600"])
    stuck = threading.Event()
    big = alice.start(["sh", "-c", "yes '' | head -c 20000000"])
    mixed = alice.start(["python3", "-c", ALTERNATING_WRITER.format(seconds=10)],
                        limits=pb.Limits(cpu=0.5))
    alice.wait(big), alice.wait(mixed)
    size = alice.read_all(mixed)
    plain = alice.start(["head", "-c", str(size), "/dev/zero"])
    alice.wait(plain)
    used = {}
    for label, job, runs in (("one stream", plain, True), ("1-byte interleaved", mixed, True),
                             ("1-byte interleaved, a run a chunk", mixed, False)):
        cpu = server_cpu(server)
        for _ in range(5 if runs else 1):
            alice.read_all(job, runs=runs)
        used[label] = (server_cpu(server) - cpu) / (5 if runs else 1)
        print(f"{'full read, ' + label:38s} {size / 1e6:.1f} MB: server CPU "
              f"{used[label] * 1000:.1f} ms ({used[label] / used['one stream']:.1f}x one "
              f"stream; goal <= 2x)", flush=True)

    def repeat(job, **request):   # a load: 8 reads over and over, until told to stop
        # In a process of their own: reading in this one, they would slow the samples
        # through its GIL, not through the server.
        reader = subprocess.Popen([sys.executable, __file__, "_reader", server.address,
                                   server.certs, job, json.dumps(request)])
        return lambda: (reader.kill(), reader.wait())

    def stop_flood():
        job = alice.start(["sh", "-c", "trap '' TERM; sleep 600"])
        calls = [alice.stub.Stop.future(pb.StopRequest(job_id=job, grace_seconds=20),
                                        metadata=alice.md, timeout=60) for _ in range(64)]
        return lambda: (admin.stub.Stop(pb.StopRequest(job_id=job, grace_seconds=0),
                                        metadata=admin.md, timeout=60),
                        [c.exception() for c in calls])

    def stuck_inputs():
        def held(job):
            yield pb.InputMessage(job_id=job, data=b"x" * sj.MiB)
            stuck.wait()
        jobs = [alice.start(["sleep", "600"], stdin=True) for _ in range(10)]
        calls = [alice.stub.Input.future(held(j), metadata=alice.md, timeout=600)
                 for j in jobs]
        return lambda: (stuck.set(), [c.cancel() for c in calls],
                        [admin.stub.Stop(pb.StopRequest(job_id=j, grace_seconds=0),
                                         metadata=admin.md, timeout=60) for j in jobs])

    loads = {"no load": lambda: (lambda: None),
             "64 stops of grace 20": stop_flood,
             "8 tails of 2**63 lines of 20 MB": lambda: repeat(big, tail_lines=2**63 - 1),
             "8 full reads, 1-byte interleaved": lambda: repeat(mixed, runs=True),
             "8 full reads, a run a chunk": lambda: repeat(mixed, runs=False),
             "10 stuck Inputs of 1 MiB": stuck_inputs}
    for label, load in loads.items():
        before = server.rss_mb()
        end = load()
        samples, peak = under_load(server, admin, mine)
        end()
        time.sleep(1)
        print(f"{'status, ' + label:38s} p50 {statistics.median(samples):7.2f} ms  p99 "
              f"{pct(samples, 99):7.2f} ms (goal <= 20) | RSS {before:.0f} -> peak "
              f"{peak:.0f} -> {server.rss_mb():.0f} MB", flush=True)
    admin.channel.close()
    alice.channel.close()


def reader_main(address, certs, job_id, request):
    """bench_tenants' load (`_reader` mode): alice reads the job in 8 threads over and over
    (request: the OutputRequest's other fields, JSON), until killed."""
    server = types.SimpleNamespace(address=address, certs=certs)
    alice = TenantClient(server, "alice")
    request = json.loads(request)

    def read_forever():
        while True:
            alice.read_all(job_id, **request)
    threads = [threading.Thread(target=read_forever, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    threads[0].join()


FAN_OUT_PIECES, FAN_OUT_PIECE_BYTES, FAN_OUT_GAP = 8, 12500, 0.5
FAN_OUT_WRITER = ("import os, sys, time\n"
                  f"for i in range({FAN_OUT_PIECES}):\n"
                  f"    sys.stdout.buffer.write(os.urandom({FAN_OUT_PIECE_BYTES}))\n"
                  "    sys.stdout.flush()\n"
                  f"    time.sleep({FAN_OUT_GAP})\n")


class FloorServer:
    """The baseline for fan-out and keystrokes: a grpc.aio server with the same TLS, service
    and messages that does nothing else (no auth, no engine, no files). Its Start begins a
    clock that makes a piece of FAN_OUT_PIECE_BYTES available every FAN_OUT_GAP seconds, as
    the job does; Output streams the pieces available, then each as it comes. Output of job
    "echo" streams back what Input receives, as a terminal's echo (one session at a time)."""

    def __init__(self, certs):
        self.certs = certs

    def __enter__(self):
        self.address = f"127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen([sys.executable, __file__, "_floor", self.certs,
                                      self.address], stdout=subprocess.PIPE)
        if self.proc.stdout.readline() != b"listening\n":
            raise SystemExit("the floor server did not start")
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait(10)

    @staticmethod
    def main(certs, address):
        import asyncio
        read = lambda name: read_file(certs, name)

        class Floor(pb_grpc.JobServiceServicer):
            def __init__(self):
                self.pieces, self.ready = [], asyncio.Condition()
                self.echoes = asyncio.Queue()

            async def Input(self, request_iterator, context):
                async for message in request_iterator:
                    if message.data:
                        self.echoes.put_nowait(message.data)
                return pb.InputSummary()

            async def Start(self, request, context):
                async def clock():
                    for _ in range(FAN_OUT_PIECES):
                        async with self.ready:
                            self.pieces.append(os.urandom(FAN_OUT_PIECE_BYTES))
                            self.ready.notify_all()
                        await asyncio.sleep(FAN_OUT_GAP)
                self.pieces, self.clock = [], asyncio.ensure_future(clock())
                return pb.JobStatus(job_id="floor")

            async def Output(self, request, context):
                offset, sent = 0, 0
                while request.job_id == "echo":
                    await context.write(pb.OutputChunk(data=await self.echoes.get()))
                while sent < FAN_OUT_PIECES:
                    if sent < len(self.pieces):
                        await context.write(pb.OutputChunk(data=self.pieces[sent], offset=offset))
                        offset += FAN_OUT_PIECE_BYTES
                        sent += 1
                    elif not request.follow:
                        return
                    else:
                        async with self.ready:
                            await self.ready.wait_for(lambda: sent < len(self.pieces))

        async def serve():
            server = grpc.aio.server()
            pb_grpc.add_JobServiceServicer_to_server(Floor(), server)
            server.add_secure_port(address, grpc.ssl_server_credentials(
                [(read("server.key"), read("server.crt"))], read("ca.crt"), True))
            await server.start()
            print("listening", flush=True)
            await server.wait_for_termination()

        asyncio.run(serve())


def follow_all(address, certs, followers, channels, spread, sample_rss):
    """Start the fan-out job at address, then follow it with `followers` streams over
    `channels` connections, attaching over `spread` seconds (0: all at once).

    Returns (first-byte latencies in ms, stream digests, full output digest, size, peak RSS).
    """
    import asyncio
    import hashlib
    creds, md = user_credentials(certs)

    async def run():
        chans = [grpc.aio.secure_channel(address, creds) for _ in range(channels)]
        stubs = [pb_grpc.JobServiceStub(c) for c in chans]
        for stub in stubs:   # connect first: measure streams, not TLS handshakes
            await stub.Output(pb.OutputRequest(job_id="none"), metadata=md).code()
        st = await stubs[0].Start(pb.StartRequest(argv=["python3", "-c", FAN_OUT_WRITER]),
                                  metadata=md)
        first, digests = [], []

        async def follow(i):
            await asyncio.sleep(spread * i / followers)
            t = time.perf_counter()
            h, got_first = hashlib.sha256(), False
            async for chunk in stubs[i % channels].Output(
                    pb.OutputRequest(job_id=st.job_id, follow=True), metadata=md):
                if not got_first:
                    first.append((time.perf_counter() - t) * 1000)
                    got_first = True
                h.update(chunk.data)
            digests.append(h.hexdigest())

        peak = [0.0]

        async def sample():
            while True:
                peak[0] = max(peak[0], sample_rss())
                await asyncio.sleep(0.05)

        sampler = asyncio.ensure_future(sample())
        await asyncio.gather(*(follow(i) for i in range(followers)))
        sampler.cancel()
        full = b"".join([c.data async for c in stubs[0].Output(
            pb.OutputRequest(job_id=st.job_id), metadata=md)])
        for c in chans:
            await c.close()
        return first, digests, hashlib.sha256(full).hexdigest(), len(full), peak[0]

    return asyncio.run(run())


def bench_fan_out(server, followers=1000, channels=10, spread=0.0):
    """1,000 followers of one job: every byte to each, first-byte latency, server memory;
    beside the same client against FloorServer, what grpc.aio itself costs on this machine.

    spread: seconds over which the followers attach (0: all at once).
    """
    rss_before, threads_before = server.rss_mb(), server.threads()
    first, digests, expected, size, peak = follow_all(
        server.address, server.certs, followers, channels, spread, server.rss_mb)
    complete = sum(d == expected for d in digests)
    with FloorServer(server.certs) as floor:
        floor_first, floor_digests, floor_expected, _, _ = follow_all(
            floor.address, server.certs, followers, channels, spread, lambda: 0.0)
    assert all(d == floor_expected for d in floor_digests), "the floor server lost bytes"
    label = f"fan-out: {followers:,} followers{f' over {spread:g}s' if spread else ', at once'}"
    p99, floor_p99 = pct(first, 99), pct(floor_first, 99)
    print(f"{label:38s} first byte p50 {statistics.median(first):7.2f} ms"
          f"  p99 {p99:7.2f} ms (target p99 <= 100) | grpc.aio do-nothing server p50 "
          f"{statistics.median(floor_first):.2f} p99 {floor_p99:.2f} ms (x{p99 / floor_p99:.2f})"
          f"; {complete}/{len(digests)} got all {size} bytes; server RSS {rss_before:.0f} -> "
          f"peak {peak:.0f} MB (target <= 300); threads {threads_before} -> "
          f"{server.threads()}", flush=True)


def bench_start_rate(server, clients=10, jobs_per_client=20):
    """Jobs started per second by 10 concurrent clients, each on its own connection."""
    creds, md = user_credentials(server.certs)
    stubs = [pb_grpc.JobServiceStub(grpc.secure_channel(server.address, creds))
             for _ in range(clients)]
    for stub in stubs:
        stub.List(pb.ListRequest(), metadata=md)   # connect first: measure starts only

    def ours(stub):
        for _ in range(jobs_per_client):
            stub.Start(pb.StartRequest(argv=["true"]), metadata=md, timeout=60)

    def unshare(_):
        for _ in range(jobs_per_client):
            subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--net", "--uts",
                            "--ipc", "true"], check=True)

    rates = {}
    for label, work, args in (("steve-jobs Start", ours, stubs), ("unshare(1)", unshare, stubs)):
        threads = [threading.Thread(target=work, args=(a,)) for a in args]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        rates[label] = clients * jobs_per_client / (time.perf_counter() - t)
    print(f"{'jobs started/s, 10 concurrent clients':38s} {rates['steve-jobs Start']:7.1f} /s"
          f"  | unshare(1) whole runs {rates['unshare(1)']:.1f} /s "
          f"(x{rates['steve-jobs Start'] / rates['unshare(1)']:.2f})", flush=True)


def bench_readopt(server, jobs=100):
    """Time from server start to listening with 100 running jobs to re-adopt, beside the
    same start with an empty state directory."""
    for _ in range(jobs):
        server.start_job("sleep 1000")
    server.crash()
    with_jobs = server.start()
    import json
    running = [j for j in json.loads(server.cli("--json", "list").stdout)
               if j["state"] == "running"]
    assert len(running) == jobs, len(running)
    server.proc.terminate()   # --stop-jobs-on-exit: stops the 100
    server.proc.wait(120)
    empty = server.start(state="empty-state")
    print(f"{'restart re-adopting 100 running jobs':38s} {with_jobs * 1000:7.0f} ms to listen"
          f"  | empty state {empty * 1000:.0f} ms (x{with_jobs / empty:.2f}); "
          f"all {len(running)} running after it", flush=True)


def bench_supervisor_death(engine, runs=20):
    """Time from SIGKILL of a job's supervisor to the job's state `unknown` (goal <= 1 s),
    beside the time a job that exits normally takes to be seen as ended."""
    import signal
    dead, ended = [], []
    for _ in range(runs):
        job_id = engine.start("bench", ["sleep", "1000"])
        job = engine._get(job_id)
        t = time.perf_counter()
        os.kill(job.shim["shim_pid"], signal.SIGKILL)
        job.ended.wait(30)
        dead.append((time.perf_counter() - t) * 1000)
        assert engine.status(job_id).state == sj.UNKNOWN
        engine.remove(job_id)
        job_id = engine.start("bench", ["sleep", "0.05"])
        t = time.perf_counter()
        engine._get(job_id).ended.wait(30)
        ended.append((time.perf_counter() - t) * 1000 - 50)
        engine.remove(job_id)
    report("supervisor SIGKILL -> state unknown", dead,
           {"a normal end seen (less its 50 ms)": ended})


def bench_stalled_followers(server, followers=1000, connections=50):
    """Server RSS before, at the peak and after 1,000 followers that each take one chunk at
    a distinct offset of a 1 GB job and then stop reading (goal: peak <= 300 MB, after <=
    before + 50 MB)."""
    import asyncio
    creds, md = user_credentials(server.certs)
    job_id = server.start_job(f"head -c {1000 * (sj.MiB + 4099)} /dev/urandom")
    server.wait_ended(job_id)
    before = server.rss_mb()

    async def stall():
        channels = [grpc.aio.secure_channel(server.address, creds) for _ in range(connections)]
        calls = [pb_grpc.JobServiceStub(channels[i % connections]).Output(
            pb.OutputRequest(job_id=job_id, offset=i * (sj.MiB + 4099), follow=True),
            metadata=md) for i in range(followers)]
        for call in calls:
            await call.read()
        peak = 0.0
        for _ in range(50):
            peak = max(peak, server.rss_mb())
            await asyncio.sleep(0.1)
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()
        return peak

    peak = asyncio.run(stall())
    time.sleep(2)
    print(f"{f'{followers:,} stalled followers, distinct offsets':38s} server RSS {before:.0f} MB"
          f" -> peak {peak:.0f} MB (goal <= 300) -> after {server.rss_mb():.0f} MB "
          f"(goal <= {before + 50:.0f})", flush=True)
    server.cli("rm", job_id)


def bench_idle_connections(server, runs=20):
    """`status` round trips of a certified user (new connection, TLS, call) with idle
    connections open that never send a byte, beside the same calls with none open."""
    import resource
    import socket
    creds, md = user_credentials(server.certs)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    count = min(20000, hard - 4096)   # what both ends can hold under the hard limit

    def status_calls():
        samples = []
        for _ in range(runs):
            t = time.perf_counter()
            channel = grpc.secure_channel(server.address, creds)
            try:
                pb_grpc.JobServiceStub(channel).Status(pb.JobRef(job_id="none"), metadata=md,
                                                       timeout=30)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e
            channel.close()
            samples.append((time.perf_counter() - t) * 1000)
        return samples

    quiet = status_calls()
    idle = [socket.create_connection(("127.0.0.1", int(server.address.rsplit(":", 1)[1])))
            for _ in range(count)]
    try:
        crowded = status_calls()
    finally:
        for sock in idle:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print(f"{f'status with {count:,} idle connections':38s} p50 {statistics.median(crowded):7.2f}"
          f" ms  p99 {pct(crowded, 99):7.2f} ms (goal p99 <= 2000) | none open p50 "
          f"{statistics.median(quiet):.2f} ms p99 {pct(quiet, 99):.2f} ms "
          f"(x{pct(crowded, 99) / pct(quiet, 99):.2f})", flush=True)


# -- batch: the queue, its fairness, its cost, and the metrics endpoint's -----------------

BATCH_USERS = ("u1:user", "u2:user", "u3:user", "u4:user")


def stubs_of(server, users):
    """{user: (stub, metadata)}, each on its own connection, connected."""
    out = {}
    for user in users:
        creds, md = user_credentials(server.certs, user)
        stub = pb_grpc.JobServiceStub(grpc.secure_channel(server.address, creds))
        stub.List(pb.ListRequest(), metadata=md)
        out[user] = (stub, md)
    return out


def wait_all_ended(stub, md, job_ids, timeout=600):
    """Statuses of job_ids once every one has ended."""
    deadline, ended = time.monotonic() + timeout, {}
    pending = list(job_ids)
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} jobs did not end"
        for job_id in list(pending):
            st = stub.Status(pb.JobRef(job_id=job_id), metadata=md)
            if sj.PB_TO_STATE.get(st.state) in sj.ENDED_STATES:
                ended[job_id] = st
                pending.remove(job_id)
            else:
                break
        time.sleep(0.05)
    return ended


def jobs_in_state(stub, md, state):
    """How many of the caller's jobs List finds in state, page by page."""
    count, request = 0, pb.ListRequest(states=[sj.STATE_TO_PB[state]], page_size=1000)
    while True:
        page = stub.List(request, metadata=md)
        count += len(page.jobs)
        if not page.next_page_token:
            return count
        request.page_token = page.next_page_token


def seconds(timestamp):
    return timestamp.ToNanoseconds() / 1e9


def bench_queue_burst(server, jobs=2000, argv=("true",)):
    """2,000 jobs (argv) by 4 users at once at --max-jobs 50: queued (one Start each) vs
    started one by one at the cap, each refusal retried after 20 ms, as a client without a
    queue must. Queue waits per user (fairness), and how soon a freed slot is taken."""
    users = [u.split(":")[0] for u in BATCH_USERS]
    stubs = stubs_of(server, users)
    per_user = jobs // len(users)

    def submit(user, queue, made):
        stub, md = stubs[user]
        for _ in range(per_user):
            while True:
                try:
                    made.append((user, stub.Start(pb.StartRequest(argv=argv, queue=queue),
                                                  metadata=md, timeout=60).job_id))
                    break
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or queue:
                        raise
                    time.sleep(0.02)
    totals, statuses = {}, {}
    for label, queue in (("retries", False), ("queue", True)):
        made = []
        threads = [threading.Thread(target=submit, args=(u, queue, made)) for u in users]
        began = time.time()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        ended = {}
        for user in users:
            ended.update(wait_all_ended(*stubs[user], [j for u, j in made if u == user]))
        totals[label] = max(seconds(st.end_time) for st in ended.values()) - began
        statuses[label] = ended
        for job_id in ended:
            stubs[ended[job_id].owner][0].Remove(pb.JobRef(job_id=job_id),
                                                metadata=stubs[ended[job_id].owner][1])
    title = f"2,000 {' '.join(argv)} jobs, 4 users"
    print(f"{title + ', --max-jobs 50':38s} queued {totals['queue']:6.1f} s"
          f"  | one by one with retries {totals['retries']:.1f} s "
          f"(x{totals['queue'] / totals['retries']:.2f})", flush=True)
    queued = statuses["queue"].values()
    medians = []
    for user in users:
        waits = [(seconds(st.start_time) - seconds(st.create_time)) * 1000
                 for st in queued if st.owner == user]
        medians.append(statistics.median(waits))
        print(f"  queue wait of {user:31s} p50 {medians[-1]:7.0f} ms  "
              f"p99 {pct(waits, 99):7.0f} ms", flush=True)
    print(f"  {'fairness: users medians, max/min':36s} x{max(medians) / min(medians):.2f} "
          f"(goal <= 2)", flush=True)
    ends = sorted(seconds(st.end_time) for st in queued)
    import bisect
    gaps = []
    for st in queued:
        start = seconds(st.start_time)
        at = bisect.bisect_left(ends, start)
        if at and start - seconds(st.create_time) > 0.05:   # (it waited: a slot freed it)
            gaps.append((start - ends[at - 1]) * 1000)
    if not gaps:
        print(f"  {'slot freed -> next queued job started':36s} (no job waited for a slot: "
              f"starts came slower than slots freed)", flush=True)
        return
    print(f"  {'slot freed -> next queued job started':36s} p50 {statistics.median(gaps):6.1f}"
          f" ms  p99 {pct(gaps, 99):6.1f} ms (goal p99 <= 50; {len(gaps)} starts)", flush=True)


def bench_slot_to_start(slots, jobs, argv):
    """In the engine: from a job's end (its supervisor's record) to the dispatcher taking
    the next queued job, and from there to that job's exec, with `slots` slots and `jobs`
    queued jobs of argv (1 slot: slots free one at a time; 50 with sleep 1: together)."""
    import bisect
    with BenchEngine(max_running_jobs=slots, max_jobs_per_user=slots) as engine:
        ids = [engine.start("bench", list(argv), queue=sj.QueueRequest(wanted=True))
               for _ in range(jobs)]
        for job_id in ids:
            engine.wait(job_id, 600)
        done = [engine._jobs[job_id] for job_id in ids]
        ends = sorted(job.result["ended_at"] for job in done)
        taken, started = [], []
        for job in done:
            at = job.spec.get("dispatched_at")
            if at and at - job.spec["created_at"] > 0.05:   # (it waited for a slot)
                taken.append((at - ends[bisect.bisect_left(ends, at) - 1]) * 1000)
                started.append((job.shim["exec_at"] - at) * 1000)
    total = [a + b for a, b in zip(taken, started)]
    print(f"{f'slot freed -> queued job exec, {slots} slot(s)':38s} p50 "
          f"{statistics.median(total):6.1f} ms  p99 {pct(total, 99):6.1f} ms (goal p99 <= 50):"
          f" taken p50 {statistics.median(taken):.1f} p99 {pct(taken, 99):.1f}, its start "
          f"p50 {statistics.median(started):.1f} p99 {pct(started, 99):.1f} ms; "
          f"{len(total)} starts", flush=True)


def bench_many_queued(server, queued=10_000, runs=200):
    """Start and Status p50/p99 of another user's with 10,000 jobs queued vs none, then the
    server's restart to listening with them (and 50 running) vs an empty state."""
    stubs = stubs_of(server, ("u1", "u2"))
    (filler, fmd), (stub, md) = stubs["u1"], stubs["u2"]

    def latencies():
        starts, statuses = [], []
        for _ in range(runs):
            t = time.perf_counter()
            job_id = stub.Start(pb.StartRequest(argv=["true"]), metadata=md, timeout=60).job_id
            starts.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            stub.Status(pb.JobRef(job_id=job_id), metadata=md)
            statuses.append((time.perf_counter() - t) * 1000)
        return starts, statuses
    none = latencies()
    for _ in range(50):   # u1's cap: what follows waits
        filler.Start(pb.StartRequest(argv=["sleep", "1000"]), metadata=fmd)
    t = time.perf_counter()
    for _ in range(queued):
        filler.Start(pb.StartRequest(argv=["true"], queue=True), metadata=fmd, timeout=60)
    print(f"{'10,000 Starts that queue':38s} {(time.perf_counter() - t):7.1f} s", flush=True)
    many = latencies()
    for name, i in (("Start", 0), ("Status", 1)):
        print(f"{name + ' p99, 10,000 queued':38s} p50 {statistics.median(many[i]):6.2f} ms"
              f"  p99 {pct(many[i], 99):6.2f} ms | none queued p99 {pct(none[i], 99):6.2f} ms"
              f" (x{pct(many[i], 99) / pct(none[i], 99):.2f}, goal <= 2)", flush=True)
    server.crash()   # (its 50 jobs run on: the restart re-adopts them)
    with_queue = server.start()
    left = jobs_in_state(*stubs_of(server, ("u1",))["u1"], sj.QUEUED)
    assert left == queued, left
    server.proc.terminate()
    server.proc.wait(120)
    empty = server.start(state="empty-state")
    print(f"{'restart with 10,000 queued, 50 running':38s} {with_queue * 1000:7.0f} ms to "
          f"listen  | empty state {empty * 1000:.0f} ms (goal <= 2000 ms)", flush=True)


def bench_metrics_cost(runs=RUNS * 8):
    """What the metrics endpoint costs a start: Start p50 on a server whose metrics are
    scraped every second vs one without, taken in turn, beside the same two plain servers
    (A/A: the noise of such a comparison); then, precisely, in one process: the hooks a
    start calls (on_rpc, on_job_event) and a scrape (generate_latest), timed alone."""
    import urllib.request
    metrics = f"127.0.0.1:{free_port()}"

    def start_p50s(extra_b, scrape):
        with BenchServer() as plain, BenchServer(extra=extra_b) as other:
            done = threading.Event()

            def scraper():
                while not done.wait(1.0):
                    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
                        r.read()
            thread = threading.Thread(target=scraper)
            if scrape:
                thread.start()
            try:
                clients = []
                for server in (plain, other):
                    creds, md = user_credentials(server.certs)
                    stub = pb_grpc.JobServiceStub(grpc.secure_channel(server.address, creds))
                    stub.List(pb.ListRequest(), metadata=md)
                    clients.append((stub, md))
                samples = ([], [])
                for n in range(runs):
                    for i in ((0, 1) if n % 2 else (1, 0)):
                        stub, md = clients[i]
                        t = time.perf_counter()
                        stub.Start(pb.StartRequest(argv=["true"]), metadata=md)
                        samples[i].append((time.perf_counter() - t) * 1000)
            finally:
                done.set()
                if scrape:
                    thread.join()
        return samples
    same = start_p50s([], False)
    scraped = start_p50s(["--metrics-listen", metrics], True)
    report("Start, metrics scraped every second", scraped[1], {"no metrics": scraped[0]})
    report("  A/A: Start, two plain servers", same[1], {"the other": same[0]})
    with BenchEngine() as engine:
        m = sj.Metrics(engine, lambda: {"output": 0, "input": 0, "events": 0})
        job_id = engine.start("tester", ["true"])
        engine.wait(job_id, 30)
        job = engine._jobs[job_id]
        record = {**job.spec, "shim": job.shim, "stop_at": 0}
        st = sj.StatusOnDemand(lambda: engine._status(job, live=False))
        n = 20_000
        t = time.perf_counter()
        for _ in range(n):
            m.on_rpc("Start", "OK", 0.004)
            m.on_job_event("started", st, record)
        hooks = (time.perf_counter() - t) / n * 1e6
        t = time.perf_counter()
        for _ in range(50):
            import prometheus_client
            prometheus_client.generate_latest(m.registry)
        scrape = (time.perf_counter() - t) / 50 * 1e3
    print(f"  {'metrics hooks of one start':36s} {hooks:6.1f} us; a scrape {scrape:.2f} ms "
          f"of the server's time (once a second) (goal: start + <= 0.2 ms)", flush=True)



# -- scale: what each running job costs, and how the server bears many -----------------

def smaps_kib(pid):
    """(Pss, USS) of a process, KiB; (0, 0) if it is gone."""
    pss = uss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                name, value = line.split()[:2]
                if name == "Pss:":
                    pss = int(value)
                elif name in ("Private_Clean:", "Private_Dirty:"):
                    uss += int(value)
    except (OSError, ValueError):
        pass
    return pss, uss


def our_processes_of_jobs(state_dir, job_ids):
    """The pids of every process of ours that runs because these jobs run: each job's
    supervisor, init and egress helper (from its record)."""
    pids = []
    for job_id in job_ids:
        with open(os.path.join(state_dir, "jobs", job_id, sj.SPEC_FILE)) as f:
            shim = json.load(f).get("shim") or {}
        pids += [shim[k] for k in ("shim_pid", "init_pid", "egress_pid") if shim.get(k)]
    return sorted(set(pids))   # (the shim is the job's init: one process)


def timed_calls(call, runs):
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t) * 1000)
    return samples


def timed_follow_ends(stub, md, runs):
    """ms from a job's last act (it prints the time, then exits) until its follower's stream
    ends, for `runs` jobs one after another."""
    samples = []
    for _ in range(runs):
        job_id = stub.Start(pb.StartRequest(argv=["sh", "-c", "sleep 0.2; date +%s.%N"]),
                            metadata=md).job_id
        data = b"".join(c.data for c in stub.Output(
            pb.OutputRequest(job_id=job_id, follow=True), metadata=md, timeout=60))
        seen = time.time()
        samples.append((seen - float(data.split()[-1])) * 1000)
        stub.Remove(pb.JobRef(job_id=job_id), metadata=md)
    return samples


# A probe of the design the scale issue's memory goal needs (README, "One process of ours a
# job"), not of the product: one supervisor of K jobs, each job a pid 1 that is an exec'd
# sleep (SIGCHLD ignored, so the kernel reaps its orphans; an unprivileged uid) and a
# command, the supervisor's child, in that pid namespace; a thread per job copies its
# output with the product's copy_output, and one reaper waits for every child. Run in a
# fresh interpreter that loads steve_jobs as the spawner does (no fork of this threaded,
# grpc-holding process). It does none of a start's records, replies or cgroups: its
# figures are a floor for that design. argv: HERE K SUPERVISORS; prints JSON.
SUPERVISOR_PROBE = r"""
import json, os, signal, sys, tempfile, threading, time, types, importlib.machinery as m
sj = sys.modules["steve_jobs"] = types.ModuleType("steve_jobs")
sj.__file__ = os.path.join(sys.argv[1], "steve_jobs.py")
m.SourceFileLoader("steve_jobs", sj.__file__).exec_module(sj)
K, N = int(sys.argv[2]), int(sys.argv[3])

def fork_init(host):
    sj.unshare(sj.CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # (kept across exec)
            uid = 0x70000000 + sj.own_host_pid()
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.closerange(3, 1 << 16)
            os.execve("/bin/sleep", ["steve-init", "infinity"], {})
        finally:
            os._exit(127)
    sj.setns(host, sj.CLONE_NEWPID)
    return pid

def fork_command(init, host, out_w):
    ns = os.open(f"/proc/{init}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    sj.setns(ns, sj.CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:
        os.dup2(out_w, 1)
        os.execv("/bin/sh", ["sh", "-c", "echo started; exec sleep 1000000"])
    sj.setns(host, sj.CLONE_NEWPID)
    os.close(ns)
    return pid

def supervisor(folder, report_w):
    host = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    slots = []
    for i in range(K):   # every fork before the first thread
        init = fork_init(host)
        r, w = os.pipe2(os.O_CLOEXEC)
        fork_command(init, host, w)
        os.close(w)
        slots.append((init, r))

    def job(i, r):
        out = os.open(f"{folder}/{os.getpid()}.{i}", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC)
        index = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        sj.copy_output({r: sj.STDOUT}, out, index, 1 << 30)
    for i, (_, r) in enumerate(slots):
        threading.Thread(target=job, args=(i, r), daemon=True).start()
    said = json.dumps([os.getpid(), [init for init, _ in slots]]) + "\n"
    os.write(report_w, said.encode())
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:   # the one reaper
        sj.wait_readable(wake_r, 1.0)
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            os._exit(0)

folder = tempfile.mkdtemp(prefix="steve-jobs-probe-", dir="/var/tmp")
report_r, report_w = os.pipe()
supervisors, inits = [], []
try:
    for _ in range(N):
        pid = os.fork()
        if pid == 0:
            try:
                supervisor(folder, report_w)
            finally:
                os._exit(1)
        supervisors.append(pid)
    lines = os.fdopen(report_r)
    for _ in range(N):
        inits += json.loads(lines.readline())[1]
    time.sleep(2)   # (settled: every command has written its line)
    def kib(pid, keys):
        return sum(int(l.split()[1]) for l in open(f"/proc/{pid}/smaps_rollup")
                   if l.startswith(keys))
    written = sorted(set(open(os.path.join(folder, f)).read() for f in os.listdir(folder)))
    print(json.dumps({"k": K, "jobs": K * N, "outputs": written,
                      "supervisor": [kib(p, "Pss:") for p in supervisors],
                      "supervisor_uss": [kib(p, ("Private_Clean:", "Private_Dirty:"))
                                         for p in supervisors],
                      "init": [kib(p, "Pss:") for p in inits],
                      "init_uss": [kib(p, ("Private_Clean:", "Private_Dirty:"))
                                   for p in inits]}))
finally:
    for pid in inits + supervisors:   # (a pid 1 outlives its supervisor: killed first)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in supervisors:
        os.waitpid(pid, 0)
    import shutil
    shutil.rmtree(folder, ignore_errors=True)
"""


def bench_supervisor_of_many(jobs=128):
    """Memory per job of the probe above (SUPERVISOR_PROBE) for K jobs a supervisor, the
    same number of jobs each time; K=1 is today's one supervisor a job, in that shape."""
    for k in (1, 8, 16, 32):
        done = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", SUPERVISOR_PROBE, HERE,
                               str(k), str(jobs // k)], capture_output=True, check=True)
        got = json.loads(done.stdout)
        assert got["outputs"] == ["started\n"], got["outputs"]   # every job's output copied
        pss = (sum(got["supervisor"]) + sum(got["init"])) / got["jobs"] / 1024
        uss = (sum(got["supervisor_uss"]) + sum(got["init_uss"])) / got["jobs"] / 1024
        print(f"{f'probe: {k} jobs a supervisor, ours per job':38s} PSS {pss:5.2f} MiB  USS "
              f"{uss:5.2f} MiB ({got['jobs']} sleeping jobs; a pid 1: PSS "
              f"{statistics.median(got['init']):.0f} KiB)", flush=True)


def bench_scale(jobs, clients=10):
    """With `jobs` sleeping jobs running through a real server: our memory per job (PSS and
    USS of supervisors, inits, helpers), start p50 beside none running, Status and List p99,
    the server's RSS, its restart with every job re-adopted, and stopping them all with the
    CLI, 10 at a time."""
    cap = ["--max-jobs", str(jobs + 100), "--max-jobs-per-user", str(jobs + 100)]
    with BenchServer(extra=cap) as server:
        creds, md = user_credentials(server.certs)
        stubs = [pb_grpc.JobServiceStub(grpc.secure_channel(server.address, creds))
                 for _ in range(clients)]
        stub = stubs[0]
        stub.List(pb.ListRequest(), metadata=md)
        start = lambda: stub.Start(pb.StartRequest(argv=["true"]), metadata=md)
        idle = timed_calls(start, 60)
        made, rate = start_sleeping_jobs(stubs, md, jobs)
        time.sleep(2)   # (settled)
        state = os.path.join(server.dir, "state")
        sizes = [smaps_kib(pid) for pid in our_processes_of_jobs(state, made)]
        pss, uss = (sum(s[i] for s in sizes) / len(made) / 1024 for i in (0, 1))
        busy = timed_calls(start, 60)
        status = timed_calls(lambda: stub.Status(pb.JobRef(job_id=made[len(made) // 2]),
                                                 metadata=md), 100)
        listing = timed_calls(lambda: stub.List(pb.ListRequest(page_size=100),
                                                metadata=md), 100)
        ends = timed_follow_ends(stub, md, 30)
        rss = server.rss_mb()
        print(f"{f'{jobs} sleeping jobs: ours per job':38s} PSS {pss:5.2f} MiB  USS {uss:5.2f}"
              f" MiB (goal PSS <= 1.0); {len(sizes) / len(made):.1f} processes a job; "
              f"started at {rate:.0f}/s from {clients} clients", flush=True)
        report(f"  Start with {jobs} running", busy, {"none running": idle})
        print(f"  {'Status p99 / List (100) p99':36s} {pct(status, 99):6.1f} ms / "
              f"{pct(listing, 99):6.1f} ms (goal <= 50); server RSS {rss:.0f} MB "
              f"(goal <= 300)", flush=True)
        print(f"  {'a job exits, its follower sees the end':36s} p50 {pct(ends, 50):6.1f} ms, "
              f"p99 {pct(ends, 99):6.1f} ms (goal p99 <= 50)", flush=True)
        server.crash()
        restart = server.start()
        stub = pb_grpc.JobServiceStub(grpc.secure_channel(server.address, creds))
        running = jobs_in_state(stub, md, sj.RUNNING)
        t = time.perf_counter()
        pending, lock = list(made), threading.Lock()

        def stopper():
            while True:
                with lock:
                    if not pending:
                        return
                    job_id = pending.pop()
                server.cli("stop", "--grace", "0", job_id, stdout=subprocess.DEVNULL)
        stoppers = [threading.Thread(target=stopper) for _ in range(10)]
        for th in stoppers:
            th.start()
        for th in stoppers:
            th.join()
        stopped = time.perf_counter() - t
        print(f"  {'restart, every job re-adopted':36s} {restart * 1000:6.0f} ms to listen "
              f"({running} of {len(made)} running after it; goal <= 3 s); stop all with the "
              f"CLI, 10 at a time: {stopped:.1f} s (goal <= 30)", flush=True)
        made, _ = start_sleeping_jobs(stubs, md, jobs)
        t = time.perf_counter()
        server.cli("stop", "--grace", "0", *made, stdout=subprocess.DEVNULL)
        print(f"  {'as many again, stopped in one call':36s} {time.perf_counter() - t:6.1f} s "
              f"(stop ID...)", flush=True)
        # The host drifts in a run this long: none running measured again, at its end.
        time.sleep(5)
        again = statistics.median(timed_calls(start, 60))
        print(f"  {'Start with none running again':36s} p50 {again:7.2f} ms: with {jobs} "
              f"running x{statistics.median(busy) / again:.2f} of it (goal <= 2)", flush=True)


def kernel_threads_cpu_seconds(name):
    """{pid: CPU seconds so far (user + system)} of the kernel threads whose name starts
    with name ("kworker": the work queues', where the kernel removes cgroups)."""
    found = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit() and sj.read_file(f"/proc/{pid}/comm", "").startswith(name):
            try:
                fields = sj.read_file(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
            except OSError:
                continue   # (gone meanwhile)
            found[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


def kworkers_cpu_during(work):
    """Run work(); returns (its result, the CPU seconds the kernel's kworker threads took
    meanwhile: those alive at both ends)."""
    before = kernel_threads_cpu_seconds("kworker")
    result = work()
    after = kernel_threads_cpu_seconds("kworker")
    return result, sum(after[pid] - before[pid] for pid in after.keys() & before.keys())


def bench_scale_starts(jobs, against=None, runs=2):
    """Start p50 with `jobs` sleeping jobs running beside none (before and after), and the
    rate they were started at from 10 clients; with against (another checkout's
    steve_jobs.py), its server in turn, run by run."""
    scripts = [("ours", SCRIPT)] + ([(f"against {against}", against)] if against else [])
    cap = ["--max-jobs", str(jobs + 100), "--max-jobs-per-user", str(jobs + 100)]
    for _ in range(runs):
        for name, script in scripts:
            with BenchServer(extra=cap, script=script) as server:
                creds, md = user_credentials(server.certs)
                stubs = [pb_grpc.JobServiceStub(grpc.secure_channel(server.address, creds))
                         for _ in range(10)]
                stubs[0].List(pb.ListRequest(), metadata=md)
                start = lambda: stubs[0].Start(pb.StartRequest(argv=["true"]), metadata=md)
                idle = statistics.median(timed_calls(start, 60))
                made, rate = start_sleeping_jobs(stubs, md, jobs)
                time.sleep(2)   # (settled)
                samples, kworkers = kworkers_cpu_during(lambda: timed_calls(start, 60))
                busy = statistics.median(samples)
                server.cli("stop", "--grace", "0", *made, stdout=subprocess.DEVNULL)
                time.sleep(3)
                again = statistics.median(timed_calls(start, 60))
                print(f"  {name}: {jobs} started at {rate:.0f}/s from 10 clients; Start p50 "
                      f"{busy:.2f} ms with them running, none {idle:.2f} / {again:.2f} ms "
                      f"(before / after): x{busy / idle:.2f} / x{busy / again:.2f} "
                      f"(goal <= 2); the kernel's kworkers meanwhile {kworkers / 60 * 1000:.1f} "
                      f"ms of CPU a start (a job's end removes its cgroups)", flush=True)


KSM = os.path.dirname(sj.KSM_RUN)   # (/sys/kernel/mm/ksm)
KSM_SETTINGS = ("run", "advisor_mode", "pages_to_scan", "sleep_millisecs")   # (put back so)
KSM_FAST = {"pages_to_scan": 5000, "sleep_millisecs": 20}   # the rate the bench merges at


def ksm_read(name):
    """A KSM setting's value ("" if this kernel has no such file; of a choice, the one
    chosen: "[none] scan-time" is "none")."""
    try:
        with open(os.path.join(KSM, name)) as f:
            value = f.read().strip()
    except FileNotFoundError:
        return ""
    chosen = [word[1:-1] for word in value.split() if word.startswith("[")]
    return chosen[0] if chosen else value


def ksm_write(name, value):
    with open(os.path.join(KSM, name), "w") as f:
        f.write(str(value))


def ksmd_cpu_seconds():
    """ksmd's CPU time so far (user + system), in seconds."""
    for seconds in kernel_threads_cpu_seconds("ksmd").values():
        return seconds
    raise RuntimeError("no ksmd: this kernel has no KSM")


def ksm_merge_until_settled(settings, limit=900):
    """Turn KSM on with settings ({name: value}); wait until two full scans in a row
    merged less than 1% more (at most limit seconds). Returns (seconds, ksmd's share of a
    core meanwhile)."""
    for name, value in settings.items():
        ksm_write(name, value)
    cpu, t = ksmd_cpu_seconds(), time.monotonic()
    ksm_write("run", 1)
    scans, sharing, calm = int(ksm_read("full_scans")), 0, 0
    while calm < 2 and time.monotonic() - t < limit:
        time.sleep(1)
        if (now := int(ksm_read("full_scans"))) > scans:
            scans, before, sharing = now, sharing, int(ksm_read("pages_sharing"))
            calm = calm + 1 if sharing <= before * 1.01 else 0
    took = time.monotonic() - t
    return took, (ksmd_cpu_seconds() - cpu) / took


def bench_scale_ksm(jobs, clients=10):
    """Our memory per job with `jobs` sleeping jobs, with the host's KSM as it is and then
    on (see the group's line); puts the host's KSM settings back, whatever happens."""
    if not os.path.isdir(KSM):
        print(f"{'scale-ksm':38s} skipped: this kernel has no KSM", flush=True)
        return
    saved = {name: ksm_read(name) for name in KSM_SETTINGS}
    cap = ["--max-jobs", str(jobs + 100), "--max-jobs-per-user", str(jobs + 100)]
    try:
        with BenchServer(extra=cap) as server:
            creds, md = user_credentials(server.certs)
            stubs = [pb_grpc.JobServiceStub(grpc.secure_channel(server.address, creds))
                     for _ in range(clients)]
            start = lambda: stubs[0].Start(pb.StartRequest(argv=["true"]), metadata=md)
            stubs[0].List(pb.ListRequest(), metadata=md)
            made, _ = start_sleeping_jobs(stubs, md, jobs)
            time.sleep(2)   # (settled)
            state = os.path.join(server.dir, "state")
            pids = our_processes_of_jobs(state, made)
            per_job = lambda: [sum(smaps_kib(pid)[i] for pid in pids) / len(made) / 1024
                               for i in (0, 1)]
            (pss, uss), before = per_job(), timed_calls(start, 60)
            took, share = ksm_merge_until_settled(KSM_FAST)
            merged_pss, merged_uss = per_job()
            ksm_write("pages_to_scan", 100)   # the kernel's default rate, settled
            cpu, t = ksmd_cpu_seconds(), time.monotonic()
            time.sleep(10)
            idle_share = (ksmd_cpu_seconds() - cpu) / (time.monotonic() - t)
            merged = timed_calls(start, 60)   # (warm shims merged too, KSM still on)
            print(f"{f'{jobs} sleeping jobs: ours per job':38s} PSS {pss:5.2f} MiB  USS "
                  f"{uss:5.2f} MiB with KSM {'on' if saved['run'] == '1' else 'off'}; merged: "
                  f"PSS {merged_pss:5.2f} MiB  USS {merged_uss:5.2f} MiB (goal PSS <= 1.0)",
                  flush=True)
            rate = f"{KSM_FAST['pages_to_scan']:,} pages/{KSM_FAST['sleep_millisecs']} ms"
            print(f"  {f'KSM: until merged ({rate})':36s} {took:6.0f} s, ksmd "
                  f"{share * 100:4.0f}% of a core; then at 100 pages/20 ms "
                  f"{idle_share * 100:4.1f}%", flush=True)
            report(f"  Start, {jobs} merged supervisors", merged,
                   {"before KSM ran": before})
            if ksm_read("advisor_mode"):   # (kernels 6.9 and later pick the rate)
                ksm_write("run", 2)        # (all unmerged, then again with the advisor)
                took, share = ksm_merge_until_settled({"advisor_mode": "scan-time"})
                pss, uss = per_job()
                print(f"  {'KSM again, advisor_mode scan-time':36s} {took:6.0f} s, ksmd "
                      f"{share * 100:4.0f}% of a core: PSS {pss:5.2f} MiB  USS {uss:5.2f} MiB "
                      f"a job", flush=True)
            server.cli("stop", "--grace", "0", *made, stdout=subprocess.DEVNULL)
    finally:
        ksm_write("run", 2 if saved["run"] != "1" else 1)   # (2: unmerge what it merged)
        for name in KSM_SETTINGS:
            if saved[name]:
                ksm_write(name, saved[name])


# A process loaded as the spawner is (SPAWNER_BOOT's way), what every job's processes are
# forked from: how much CPU a fork of it costs, against what unshare(1) does a whole run in.
FORK_FLOOR = r"""
import gc, json, os, resource, statistics, sys, types, importlib.machinery as m
mod = sys.modules["steve_jobs"] = types.ModuleType("steve_jobs")
mod.__file__ = sys.argv[1]
m.SourceFileLoader("steve_jobs", sys.argv[1]).exec_module(mod)
gc.freeze()

def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

def fork_exit():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

def fork_exec_true():
    pid = os.fork()
    if pid == 0:
        os.execv("/bin/true", ["true"])
    os.waitpid(pid, 0)

def unshare_true():
    os.waitpid(os.posix_spawn("/usr/bin/unshare", ["unshare", "--pid", "--fork",
               "--mount-proc", "--net", "--uts", "--ipc", "true"], os.environ), 0)

got = {}
for _ in range(5):   # (interleaved rounds: what drifts, drifts for all three)
    for work in (fork_exit, fork_exec_true, unshare_true):
        before = cpu()
        for _ in range(100):
            work()
        got.setdefault(work.__name__, []).append((cpu() - before) / 100 * 1000)
rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
print(json.dumps({"rss_mib": rss / 2**20, **{k: statistics.median(v) for k, v in got.items()}}))
"""


def child_cpu_ms(argv, runs=15):
    """Median CPU (user + system, ms) of a process running argv to its end, from HERE."""
    import resource
    took = []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(argv, cwd=HERE, check=True, stdout=subprocess.DEVNULL)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        took.append((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
                    * 1000)
    return statistics.median(took)


def mtls_call_cpu_ms(calls=4000, clients=10):
    """CPU (ms, both ends) of a unary grpc call over mutual TLS with the development
    certificates, a server and 10 client threads in this process: no engine, no auth."""
    from concurrent import futures
    certs = os.path.join(HERE, "certs")
    server = grpc.server(futures.ThreadPoolExecutor(clients))
    echo = grpc.unary_unary_rpc_method_handler(lambda request, _context: request)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("floor.Echo",
                                                                          {"Call": echo})])
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(read_file(certs, "server.key"), read_file(certs, "server.crt"))],
        read_file(certs, "ca.crt"), True))
    server.start()
    creds = grpc.ssl_channel_credentials(read_file(certs, "ca.crt"),
                                         read_file(certs, "mrarsenal.key"),
                                         read_file(certs, "mrarsenal.crt"))
    ready = threading.Barrier(clients + 1)

    def client():
        channel = grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[
            ("grpc.ssl_target_name_override", "localhost")])
        call = channel.unary_unary("/floor.Echo/Call")
        call(b"x" * 200, timeout=30)   # (connected and handshaken before the clock)
        ready.wait()
        for _ in range(calls // clients):
            call(b"x" * 200, timeout=30)
        channel.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait()
    before = os.times()
    for thread in threads:
        thread.join()
    after = os.times()
    server.stop(0)
    return (after.user - before.user + after.system - before.system) / calls * 1000


def bench_scale_floors(jobs=2000, clients=10):
    """The CPU the scale goals leave a CLI call and a start, on this machine's cores, beside
    what the parts a Python tool cannot do without cost alone (medians): the floors."""
    cores = os.cpu_count()
    py = sys.executable
    bare = child_cpu_ms([py, "-c", "pass"])
    imports = child_cpu_ms([py, "-c", "import grpc, jobs_pb2_grpc"])
    script = child_cpu_ms([py, SCRIPT, "--version"])
    budget = 30.0 * cores / jobs * 1000
    print(f"{'a CLI process, CPU (goal: 2,000 in 30 s)':38s} budget {budget:5.1f} ms a call on "
          f"{cores} cores | python -c pass {bare:5.1f} ms; import grpc and the stubs "
          f"{imports:5.1f} ms; `python steve_jobs.py --version` (compiles the script) "
          f"{script:5.1f} ms: {jobs:,} calls >= {jobs * imports / cores / 1000:.0f} s, "
          f">= {jobs * script / cores / 1000:.0f} s as a script", flush=True)
    call = mtls_call_cpu_ms(clients=clients)
    done = subprocess.run([py, "-I", "-S", "-B", "-c", FORK_FLOOR, SCRIPT],
                          capture_output=True, check=True)
    forks = json.loads(done.stdout)
    print(f"{'a start, CPU (goal: >= 0.5x unshare(1))':38s} budget "
          f"{2 * forks['unshare_true']:5.2f} ms (2x an unshare(1) whole run, "
          f"{forks['unshare_true']:.2f} ms, sequential; kernel threads not counted) | a "
          f"unary mTLS grpc call {call:.2f} ms; fork and exit of a process the spawner's "
          f"size ({forks['rss_mib']:.0f} MiB) {forks['fork_exit']:.2f} ms; fork and exec "
          f"true {forks['fork_exec_true']:.2f} ms", flush=True)


def start_sleeping_jobs(stubs, md, jobs):
    """Start jobs sleeping jobs, a share from each stub at once. Returns (their ids,
    starts per second)."""
    made, lock = [], threading.Lock()

    def fill(s, count):
        for _ in range(count):
            job_id = s.Start(pb.StartRequest(argv=["sleep", "1000000"]), metadata=md,
                             timeout=120).job_id
            with lock:
                made.append(job_id)
    threads = [threading.Thread(target=fill, args=(s, jobs // len(stubs))) for s in stubs]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return made, len(made) / (time.perf_counter() - t)


def main(argv):
    if argv[:1] == ["_floor"]:
        return FloorServer.main(*argv[1:])
    if argv[:1] == ["_reader"]:
        return reader_main(*argv[1:])
    against = None
    if "--against" in argv:
        i = argv.index("--against")
        against, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    groups = argv or ["engine", "api"]
    if os.geteuid() != 0:
        sys.exit("bench_steve_jobs.py: run as root (it starts real jobs)")
    print(f"steve-jobs benchmarks, {RUNS} runs each, {os.cpu_count()} cores", flush=True)
    if "engine" in groups and against:
        with BenchEngine() as engine, BenchEngine(load_script(against, "other_sj")) as other:
            bench_start_against(engine, other, against)
    if "engine" in groups:
        with BenchEngine() as engine:
            bench_start(engine)
            bench_follow_latency(engine)
            bench_follow_memory(engine)
    if "api" in groups:
        with BenchServer() as server, BenchSSHD() as sshd:
            bench_round_trip(server, sshd)
            bench_streaming(server, sshd)
            bench_fan_out(server)
            bench_fan_out(server, spread=2.0)
            bench_start_rate(server)
            bench_readopt(server)
    if "cli" in groups:
        with BenchServer() as server, BenchSSHD() as sshd, InstalledCommand() as installed:
            bench_cli_round_trip(server, sshd, installed)
            bench_run_follow(server, sshd)
            bench_list_many(server)
    if "sessions" in groups or "keystrokes" in groups:
        with BenchServer() as server, BenchSSHD() as sshd:
            bench_keystroke_echo(server, sshd)
            if "sessions" in groups:
                bench_stdin_throughput(server, sshd)
    if "sessions" in groups:
        bench_tracing_cost()
    if "faults" in groups:
        with BenchEngine() as engine:
            bench_supervisor_death(engine)
        with BenchServer() as server:
            bench_stalled_followers(server)
            bench_idle_connections(server)
    if "tenants" in groups:
        with BenchServer() as server:
            bench_tenants(server)
    if "network" in groups:
        with RemoteHost(), BenchEngine(egress_dns=(REMOTE_ADDRESS,)) as engine:
            bench_network(engine)
    if "files" in groups:
        with BenchServer(extra=["--workdir-size", "3G", "--files-quota", "0"]) as server, \
                BenchSSHD() as sshd:
            bench_exec(server, sshd)
            bench_files(server, sshd)
    if "batch" in groups:
        cap = ["--max-jobs", "50", "--max-jobs-per-user", "50"]
        with BenchServer(extra=cap, users=BATCH_USERS) as server:
            bench_queue_burst(server)
            bench_queue_burst(server, argv=("sleep", "1"))   # (the queue fills)
        with BenchServer(extra=["--max-jobs", "60", "--max-jobs-per-user", "50",
                                "--max-queued-per-user", "10000"],
                         users=BATCH_USERS) as server:   # (u1: 50 running, 10,000 queued)
            bench_many_queued(server)
        bench_slot_to_start(1, 60, ("sleep", "0.1"))
        bench_slot_to_start(50, 300, ("sleep", "1"))
        bench_metrics_cost()
    if "scale" in groups:
        bench_supervisor_of_many()
        bench_scale(200)
        bench_scale(2000)
        with BenchServer() as server:
            bench_start_rate(server)
    if "scale-start" in groups:
        bench_scale_starts(2000, against)
    if "scale-floors" in groups:
        bench_scale_floors()
    if "scale-ksm" in groups:
        bench_scale_ksm(200)
        bench_scale_ksm(2000)
    if "fan-out" in groups:
        with BenchServer() as server:
            for spread in (0.0, 2.0, 0.0, 2.0):
                bench_fan_out(server, spread=spread)


if __name__ == "__main__":
    main(sys.argv[1:])
