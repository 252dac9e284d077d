"""Tests for steve-jobs, in fourteen groups: each test carries its group's mark
(@pytest.mark.kernel..., registered in conftest.py), to run some of them (pytest -m "kernel
or e2e", as .ci/run does):

  unit    no root needed: parsing, validation, the cgroup v2 path against a fake cgroupfs tree
  kernel  the job engine against the real kernel: real cgroups, namespaces, processes
  e2e     a real server process over real mutual TLS on loopback
  security  every way in: certificates, tokens, roles, `openssl s_client` probes
  faults  full disks, killed supervisors and servers, two servers on one state folder, file
          handle limits, idle connections, stalled followers (real kernel and servers)
  tenants what a hostile user (alice, role user) can do to other users and to the host
  hosts   where the server and its jobs go in a delegated (systemd) or a container's cgroup,
          what old kernels lack (on pure cgroup v2 only .ci/v2vm's kernel enforces the rules)
  api     the v1 API and CLI as docker, kubectl and ssh users use them
  sessions  stdin, terminals, attach, recordings, traces and logs
  newcomer  a fresh clone's Quickstart verbatim, two servers on one host, the bundled keys,
          wrong addresses and the other mistakes of a first hour
  files   a job's working folder kept after it ends, cp in and out, run --copy and exec, as
          a build host's users and as hostile tenants (real kernel, real server)
  batch   the queue, dependencies, deadlines, removal, metrics, events
  network egress networks against a remote host of the test's own, in a namespace
  scale   hundreds of jobs at once through a real server: each one's exact end, restarts

Every time budget is multiplied by STEVE_JOBS_TIME_SCALE (default 1; e.g. 10 in an emulated
VM), through scaled(), and so are the server's own waits.

Tests that need root, cgroups or namespaces (all but the unit tests and a few others) skip
without them, unless STEVE_JOBS_MUST_WORK=1, under which they fail instead. The harness they
share with the benchmarks is steve_jobs_harness.py. Every test removes the cgroups,
processes and mounts it makes.
"""

import concurrent.futures
import contextlib
import errno
import fcntl
import glob
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest.mock
import uuid

import hypothesis
import hypothesis.strategies
import pytest

import steve_jobs as sj
from steve_jobs_harness import (DENIED_ADDRESS, DENIED_RANGE, HERE, HOST_SIDE,
                                METADATA_ADDRESS, PYTHON, REMOTE_ADDRESS, REMOTE_PORT, SCRIPT,
                                RemoteHost, SpanCollector, bearer, free_port, grpc,
                                make_cert_set, mounts_under, pb, pb_grpc,
                                remove_egress_firewall, remove_state_dir, scaled, user_channel,
                                user_credentials)

MUST_WORK = os.environ.get("STEVE_JOBS_MUST_WORK") == "1"


###############################################################################
# Helpers
###############################################################################

def _kernel_unavailable():
    """Why kernel tests cannot run here, or '' if they can."""
    if os.geteuid() != 0:
        return "needs root"
    try:
        layout = sj.CgroupLayout.detect()
    except sj.Error as e:
        return str(e)
    if layout.missing():
        return f"cgroup controllers missing: {layout.missing()}"
    pid = os.fork()
    if pid == 0:
        try:
            sj.unshare(sj.CLONE_NEWPID | sj.CLONE_NEWNS | sj.CLONE_NEWNET | sj.CLONE_NEWUTS
                       | sj.CLONE_NEWIPC | sj.CLONE_NEWCGROUP)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return "" if status == 0 else "cannot unshare namespaces"


KERNEL_UNAVAILABLE = _kernel_unavailable()


def require_kernel():
    if KERNEL_UNAVAILABLE:
        if MUST_WORK:
            pytest.fail(f"STEVE_JOBS_MUST_WORK=1 but: {KERNEL_UNAVAILABLE}")
        pytest.skip(KERNEL_UNAVAILABLE)


def host_folder_for_jobs():
    """A folder on the host that jobs may write to (as --workdir): not under a folder
    they get a private copy of (/tmp, /var/tmp). The caller removes it."""
    folder = tempfile.mkdtemp(prefix="steve-jobs-test-", dir="/var/lib")
    os.chmod(folder, 0o777)
    return folder


def new_state_dir():
    # Not under /tmp: jobs get a private /tmp, so they could not see their working folder.
    return tempfile.mkdtemp(prefix="steve-jobs-test-", dir="/var/tmp")


@contextlib.contextmanager
def running_engine(**config):
    """An open Engine with its own state dir and cgroup root; afterwards nothing is left."""
    require_kernel()
    root = config.pop("cgroup_root", None) or f"steve-jobs-test-{uuid.uuid4().hex[:8]}"
    state_dir = config.pop("state_dir", None) or new_state_dir()
    engine = sj.Engine(sj.EngineConfig(state_dir=state_dir, cgroup_root=root, **config))
    engine.open()
    try:
        yield engine
    finally:
        engine.close(stop_jobs=True)
        leftovers = remove_cgroups(engine.layout, root)
        remove_state_dir(state_dir)
        assert not leftovers, f"cgroups left behind: {leftovers}"
        assert not mounts_under(state_dir)


def remove_cgroups(layout, root):
    """Kill and remove every cgroup under root (a safety net); returns what existed."""
    names = sj.JobCgroup.names(layout, root)
    for name in names:
        cg = sj.JobCgroup(layout, root, name)
        with contextlib.suppress(OSError, sj.Error):
            cg.kill()
        cg.remove(timeout=scaled(5))
    sj.JobCgroup.remove_root(layout, root)
    return names


@pytest.fixture(scope="module")
def engine():
    with running_engine() as e:
        yield e


def run(engine, argv, limits=sj.Limits(), timeout=scaled(60), **options):
    """Start argv, wait for its end; returns (status, output bytes)."""
    job_id = engine.start("tester", argv, limits, sj.JobOptions(**options))
    status = engine.wait(job_id, timeout)
    assert status.state in sj.ENDED_STATES, f"job did not end in {timeout}s: {status}"
    return status, b"".join(engine.follow(job_id))


def sh(engine, script, **kw):
    return run(engine, ["sh", "-c", script], **kw)


def job_cgroup_dirs(engine, job_id):
    job = engine._get(job_id)
    return [d for d in job.cgroup.dirs() if os.path.exists(d)] if job.cgroup else []


def pids_of_uid(uid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    found.append(int(entry))
    return found


###############################################################################
# Unit tests (no root)
###############################################################################

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V1_COMOUNT_MOUNTINFO = """\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
"""


@pytest.mark.unit
def test_layout_hybrid_uses_v1_controllers_and_the_unified_tree():
    layout = sj.CgroupLayout.from_mountinfo(HYBRID_MOUNTINFO, read=lambda p, d=None: "")
    assert layout.unified == "/sys/fs/cgroup/unified"
    assert layout.v1["memory"] == "/sys/fs/cgroup/memory"
    assert layout.v1["freezer"] == "/sys/fs/cgroup/freezer"
    assert layout.v2 == () and layout.missing() == []


@pytest.mark.unit
def test_egress_settings_are_checked_and_the_firewall_refuses_what_it_must():
    assert sj.parse_egress_cidrs(["10.0.0.0/8", "192.168.1.7", " 10.1.2.3/16 ", "fd00::/8"]) == [
        "10.0.0.0/8", "192.168.1.7/32", "10.1.0.0/16", "fd00::/8"]
    for bad in ("10.0.0.0/33", "example.com", "", "10.0.0.0/8,10.1.0.0/16"):
        with pytest.raises(ValueError, match="is not a CIDR"):
            sj.parse_egress_cidrs([bad])
    with pytest.raises(ValueError, match="not an IPv4 address"):
        sj.egress_resolvers(["dns.example"])
    with pytest.raises(ValueError, match="an address of this host"):
        sj.egress_resolvers(["127.0.0.53"])   # (systemd-resolved's stub: egress cannot reach it)
    assert sj.egress_resolvers(["198.51.100.53"]) == ["198.51.100.53"]
    assert all(not sj.is_host_address(a) for a in sj.egress_resolvers([]))
    rules = sj.EgressFirewall("/var/lib/steve-jobs", 4242, ["169.254.0.0/16", "fd00::/8"])
    text = rules.ruleset()
    assert re.fullmatch(r"inet steve_jobs_[0-9a-f]{8}", rules.table)
    # Only the helpers' group is filtered, behind one rule: the resets the kernel sends
    # have no socket and must pass (a rule of their own matching by socket would drop them).
    assert [line for line in text.splitlines() if line.startswith("add rule") and (
        " output " in line or " before_nat " in line)] == [
        f"add rule {rules.table} before_nat meta skgid 4242 jump helper",   # (before DNAT)
        f"add rule {rules.table} output meta skgid 4242 jump helper"]       # (and after)
    for refused in ("fib daddr type { local, broadcast, multicast, anycast } jump deny",
                    "ip daddr @deny4 jump deny", "meta nfproto ipv6 jump deny"):
        assert f"add rule {rules.table} helper {refused}" in text
    assert f"add element {rules.table} deny4 {{ 169.254.0.0/16 }}" in text   # (v6: all denied)
    assert "flush set" in text and "add set" in text and "delete" not in text   # counts kept


@pytest.mark.unit
def test_run_network_takes_a_mode_and_alone_still_means_the_hosts():
    def parsed(*words):
        args = sj.parse_command_line(["run", *words])
        return args.network, sj.command_argv(args.cmd)
    sh = lambda text: ["/bin/sh", "-c", text]
    assert parsed("--network", "egress", "make") == ("egress", sh("make"))
    assert parsed("--network=egress", "--", "ls", "-l") == ("egress", ["ls", "-l"])
    assert parsed("--network", "none", "ls") == ("", sh("ls"))
    assert parsed("ls") == ("", sh("ls"))
    # As before --network took a MODE: alone, the host's; a word after it, the command's.
    assert parsed("--network", "make", "-j4") == ("host", sh("make -j4"))
    assert parsed("--network", "--", "ls") == ("host", ["ls"])
    assert parsed("--cpu", "1", "--network", "ls", "--network", "x") == (
        "host", sh("ls --network x"))
    assert parsed("ls", "--network") == ("", sh("ls --network"))   # the command's own word
    with pytest.raises(sj.ClientError, match="nothing to run"):
        parsed("--network", "egress")
    with pytest.raises(sj.ClientError, match="--network takes none, host, egress, not 'egres'"):
        parsed("--network=egres", "ls")


@pytest.mark.unit
def test_a_double_dash_after_exec_id_runs_the_argv_without_a_shell():
    def argv_of(*words):
        return sj.command_argv(sj.parse_command_line(list(words)).cmd)
    assert argv_of("exec", "ID", "--", "bash", "-c", "x y") == ["bash", "-c", "x y"]
    assert argv_of("exec", "-i", "ID", "--", "ls", "-l") == ["ls", "-l"]
    assert argv_of("run", "--", "bash", "-c", "x y") == ["bash", "-c", "x y"]
    assert argv_of("exec", "ID", "echo", "--", "x") == ["/bin/sh", "-c", "echo -- x"]
    assert argv_of("exec", "ID", "echo x") == ["/bin/sh", "-c", "echo x"]


@pytest.mark.unit
def test_layout_pure_v2_reads_offered_controllers():
    layout = sj.CgroupLayout.from_mountinfo(
        V2_MOUNTINFO, read=lambda p, d=None: "cpuset cpu io memory hugetlb pids rdma\n")
    assert layout.unified == "/sys/fs/cgroup" and layout.v1 == {}
    assert layout.v2 == ("cpu", "memory", "io", "pids") and layout.missing() == []


@pytest.mark.unit
def test_layout_v1_comounted_controllers_share_a_folder():
    layout = sj.CgroupLayout.from_mountinfo(V1_COMOUNT_MOUNTINFO)
    assert layout.v1["cpu"] == layout.v1["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct"
    cg = sj.JobCgroup(layout, "steve-jobs", "j-1")
    assert len(cg.dirs()) == 4   # cpu,cpuacct once; memory; blkio; pids
    assert layout.missing() == []


@pytest.mark.unit
def test_layout_without_pids_reports_it_missing():
    layout = sj.CgroupLayout.from_mountinfo(V2_MOUNTINFO, read=lambda p, d=None: "cpu memory io")
    assert layout.missing() == ["pids"]


V2_FILES = ("cgroup.procs", "cgroup.subtree_control", "cgroup.events", "cgroup.freeze",
            "cgroup.kill", "cpu.max", "cpu.stat", "memory.max", "memory.swap.max",
            "memory.current", "memory.peak", "memory.events", "io.max", "io.stat", "pids.max",
            "pids.current")


@pytest.fixture
def fake_v2(tmp_path, monkeypatch):
    """A fake cgroup2 mount: like the kernel, mkdir in it makes the interface files."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    real_mkdir = os.mkdir

    def mkdir(path, mode=0o777, **kw):
        real_mkdir(path, mode, **kw)
        if str(path).startswith(str(root)):
            for name in V2_FILES:
                (tmp_path / path / name).write_text("")
    monkeypatch.setattr(sj.os, "mkdir", mkdir)
    layout = sj.CgroupLayout.from_mountinfo(f"1 1 0:1 / {root} rw - cgroup2 cgroup2 rw\n")
    return root, layout


@pytest.mark.unit
def test_a_supervisor_gives_up_a_record_whose_folder_is_gone(tmp_path):
    """Reproduction: a job's folder removed under its running supervisor (the state folder
    deleted) left the supervisor retrying its result for ever."""
    folder = tmp_path / "job"
    folder.mkdir()
    assert sj.write_json_until_written(str(folder / "result.json"), {"a": 1})
    folder.joinpath("result.json").unlink()
    folder.rmdir()
    done = []
    writer = threading.Thread(target=lambda: done.append(
        sj.write_json_until_written(str(folder / "result.json"), {"a": 1})), daemon=True)
    writer.start()
    writer.join(5)
    assert done == [False]


@pytest.mark.unit
def test_waits_work_on_descriptors_past_1023():
    """Reproduction: with 2,000 jobs running the server held more than 1,024 descriptors,
    and a start's wait for its supervisor's reply (select) failed: INTERNAL."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    r, w = os.pipe()
    try:
        high = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 2000)
        try:
            os.write(w, b'{"ok": true}')
            assert sj._read_reply(high, time.monotonic() + 1) == {"ok": True}
            assert not sj.wait_readable(high, 0)
            os.write(w, b"more")
            assert sj.wait_readable(high, 1)
        finally:
            os.close(high)
    finally:
        os.close(r)
        os.close(w)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.unit
def test_read_file_reads_a_file_whole_whatever_its_reads_hand_out(tmp_path):
    """read_file reads until the end: procfs hands out a page a read, and a file may be
    longer than one read; missing, it is the default or OSError; its bytes are decoded as
    file names are (what is not UTF-8 is kept)."""
    big = tmp_path / "big"
    big.write_text("é" * 100_000 + "\nend\n", encoding="utf-8")   # 200 KB: several reads
    assert sj.read_file(str(big)) == big.read_text(encoding="utf-8")
    fifo = tmp_path / "fifo"   # (each read takes what one write put in: short reads)
    os.mkfifo(fifo)

    def write_in_pieces():
        with open(fifo, "wb", buffering=0) as f:
            for piece in (b"one ", b"two ", b"three"):
                f.write(piece)
                time.sleep(0.05)
    writer = threading.Thread(target=write_in_pieces)
    writer.start()
    try:
        assert sj.read_file(str(fifo)) == "one two three"
    finally:
        writer.join(10)
    assert sj.read_file(str(tmp_path / "none"), "dflt") == "dflt"
    with pytest.raises(FileNotFoundError):
        sj.read_file(str(tmp_path / "none"))
    assert sj.read_file(str(tmp_path), "dflt") == "dflt"   # (a folder: EISDIR at the read)
    (tmp_path / "latin1").write_bytes(b"\xe9t\xe9")   # not UTF-8: kept as a file name is
    assert os.fsencode(sj.read_file(str(tmp_path / "latin1"))) == b"\xe9t\xe9"


@pytest.mark.unit
def test_mountinfo_paths_are_unescaped_and_keep_every_other_byte():
    assert sj.mountinfo_path(r"/a\040b\011c\012d\134e") == "/a b\tc\nd\\e"
    assert sj.mountinfo_path("/caf\u00e9") == "/caf\u00e9"   # (UTF-8: was mojibake)
    assert os.fsencode(sj.mountinfo_path(os.fsdecode(b"/caf\xe9"))) == b"/caf\xe9"
    layout = sj.CgroupLayout.from_mountinfo(   # (the cgroup tree's mount point too)
        "35 24 0:30 / /sys/fs/my\\040cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n",
        read=lambda p, d=None: "memory\n")
    assert layout.unified == "/sys/fs/my cgroup" and layout.v2 == ("memory",)


@pytest.mark.unit
def test_v2_job_cgroup_writes_limits_and_delegates_controllers(fake_v2):
    root, layout = fake_v2
    cg = sj.JobCgroup(layout, "steve-jobs", "j-1")
    cg.create()
    cg.apply(sj.Limits(cpu=0.5, memory=64 * sj.MiB, pids=10, io_read_bps=1000000,
                       io_write_bps=0, io_device="8:0"))
    job = root / "steve-jobs" / "j-1"
    assert (root / "cgroup.subtree_control").read_text() == "+cpu +memory +io +pids"
    assert (root / "steve-jobs" / "cgroup.subtree_control").read_text() == "+cpu +memory +io +pids"
    assert (job / "cpu.max").read_text() == "50000 100000"
    assert (job / "memory.max").read_text() == str(64 * sj.MiB)
    assert (job / "memory.swap.max").read_text() == "0"
    assert (job / "pids.max").read_text() == "10"          # (its init, the shim, is outside)
    assert (job / "io.max").read_text() == "8:0 rbps=1000000 wbps=max"
    assert cg.dirs() == [str(job)]


@pytest.mark.unit
def test_v2_job_cgroup_kill_freeze_and_usage(fake_v2):
    root, layout = fake_v2
    cg = sj.JobCgroup(layout, "steve-jobs", "j-2")
    cg.create()
    job = root / "steve-jobs" / "j-2"
    cg.kill()
    assert (job / "cgroup.kill").read_text() == "1"
    cg.freeze()
    assert (job / "cgroup.freeze").read_text() == "1"
    cg.thaw()
    assert (job / "cgroup.freeze").read_text() == "0"
    (job / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    (job / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 2\noom_kill 1\n")
    (job / "memory.peak").write_text("1048576\n")
    (job / "memory.current").write_text("4096\n")
    (job / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    (job / "pids.current").write_text("3\n")
    (job / "io.stat").write_text("8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n"
                                 "259:0 rbytes=1 wbytes=2 rios=1 wios=1 dbytes=0 dios=0\n")
    assert cg.usage() == {"cpu_seconds": 2.5, "memory_bytes": 4096,
                          "peak_memory_bytes": 1048576, "oom_kills": 1, "pids": 3,
                          "io_read_bytes": 4097, "io_write_bytes": 8194}
    assert cg.populated()


@pytest.mark.unit
def test_v1_live_usage_reads_pids_and_block_io_as_v2_does(tmp_path):
    mountinfo = V1_COMOUNT_MOUNTINFO.replace("/sys/fs/cgroup", str(tmp_path))
    cg = sj.JobCgroup(sj.CgroupLayout.from_mountinfo(mountinfo), "steve-jobs", "j-1")
    for folder in cg.dirs():
        os.makedirs(folder)
    (tmp_path / "pids/steve-jobs/j-1/pids.current").write_text("4\n")
    (tmp_path / "blkio/steve-jobs/j-1/blkio.throttle.io_service_bytes").write_text(
        "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\n8:0 Total 12288\n"
        "259:0 Read 1\n259:0 Write 2\nTotal 12291\n")
    assert cg.live_usage() == {"pids": 4, "io_read_bytes": 4097, "io_write_bytes": 8194}


@pytest.mark.unit
def test_v1_limit_writes_are_parallel_to_v2():
    layout = sj.CgroupLayout.from_mountinfo(HYBRID_MOUNTINFO, read=lambda p, d=None: "")
    cg = sj.JobCgroup(layout, "steve-jobs", "j-3")
    writes = dict(cg.limit_writes(sj.Limits(cpu=0.25, memory=32 * sj.MiB, pids=5,
                                             io_write_bps=4096, io_device="254:0")))
    assert writes == {
        "/sys/fs/cgroup/cpu/steve-jobs/j-3/cpu.cfs_period_us": "100000",
        "/sys/fs/cgroup/cpu/steve-jobs/j-3/cpu.cfs_quota_us": "25000",
        "/sys/fs/cgroup/memory/steve-jobs/j-3/memory.limit_in_bytes": str(32 * sj.MiB),
        "/sys/fs/cgroup/memory/steve-jobs/j-3/memory.memsw.limit_in_bytes": str(32 * sj.MiB),
        "/sys/fs/cgroup/pids/steve-jobs/j-3/pids.max": "5",
        "/sys/fs/cgroup/blkio/steve-jobs/j-3/blkio.throttle.write_bps_device": "254:0 4096",
    }


def _placement(own, cgroup_root="", true_root=("",), delegated=(), unified="/sys/fs/cgroup"):
    layout = sj.CgroupLayout(unified=unified, v2=("cpu", "memory", "io", "pids"))
    return sj.place_jobs(layout, cgroup_root, own, lambda rel: rel in true_root,
                         lambda rel: rel in delegated)


@pytest.mark.unit
def test_placement_in_the_true_root_keeps_the_old_layout():
    p = _placement("/")
    assert (p.layout.v2_base, p.root, p.supervisor) == ("", "steve-jobs", "")
    assert "root cgroup" in p.why


@pytest.mark.unit
def test_placement_in_a_containers_namespace_root_moves_into_a_leaf():
    p = _placement("/", true_root=())
    assert (p.layout.v2_base, p.root) == ("", "jobs")
    assert p.supervisor == "/sys/fs/cgroup/supervisor" and "container" in p.why
    # A second start (or a test's second engine) finds itself in the leaf already.
    assert _placement("/supervisor", true_root=()) == p


@pytest.mark.unit
def test_placement_under_systemd_keeps_to_the_delegated_service_cgroup():
    service = "system.slice/steve-jobs.service"
    p = _placement("/" + service, delegated=(service,))
    assert (p.layout.v2_base, p.root) == (service, "jobs")
    assert p.supervisor == f"/sys/fs/cgroup/{service}/supervisor" and "Delegate=yes" in p.why
    # DelegateSubgroup=supervisor starts the server in the leaf: the same place.
    assert _placement(f"/{service}/supervisor", delegated=(service,)) == p
    assert _placement("/" + service, "ci", delegated=(service,)).root == "ci"


@pytest.mark.unit
def test_placement_in_a_cgroup_not_delegated_uses_the_root_and_says_why():
    p = _placement("/user.slice/user-0.slice/session-4.scope")
    assert (p.layout.v2_base, p.root, p.supervisor) == ("", "steve-jobs", "")
    assert "not delegated" in p.why and "Delegate=yes" in p.why


@pytest.mark.unit
def test_placement_at_an_explicit_path_moves_nothing():
    p = _placement("/system.slice/x.service", "/batch/jobs", delegated=("system.slice/x.service",))
    assert (p.layout.v2_base, p.root, p.supervisor) == ("", "batch/jobs", "")
    assert _placement("/", unified="").root == "steve-jobs"   # v1 only


@pytest.mark.unit
def test_v2_delegated_cgroup_enables_controllers_only_in_its_subtree(fake_v2):
    root, layout = fake_v2
    (root / "svc").mkdir()
    layout = layout._replace(v2_base="svc")
    cg = sj.JobCgroup(layout, "jobs", "j-1")
    cg.create()
    assert cg.dirs() == [str(root / "svc" / "jobs" / "j-1")]
    assert (root / "cgroup.subtree_control").read_text() == ""   # not ours to write
    assert (root / "svc" / "cgroup.subtree_control").read_text() == "+cpu +memory +io +pids"
    assert (root / "svc/jobs/cgroup.subtree_control").read_text() == "+cpu +memory +io +pids"
    assert sj.JobCgroup.names(layout, "jobs") == {"j-1"}
    assert sj.CgroupLayout.from_dict(layout.to_dict()) == layout


def fake_job_cgroup_without(fake_v2, name, missing_file):
    """A job's cgroup in the fake tree, as an older kernel makes it (without a file)."""
    root, layout = fake_v2
    cg = sj.JobCgroup(layout, "steve-jobs", name)
    cg.create()
    (root / "steve-jobs" / name / missing_file).unlink()
    return cg, root / "steve-jobs" / name


@pytest.mark.unit
def test_v2_without_memory_peak_samples_the_peak(fake_v2):
    cg, job = fake_job_cgroup_without(fake_v2, "j-4", "memory.peak")   # kernels before 5.19
    assert cg.needs_peak_sampling()
    (job / "memory.current").write_text("5000\n")
    stopped = threading.Event()
    sampler = threading.Thread(target=cg.sample_peak_memory, args=(stopped, 0.001))
    sampler.start()
    deadline = time.monotonic() + scaled(5)
    while cg.sampled_peak < 5000 and time.monotonic() < deadline:
        time.sleep(0.005)
    (job / "memory.current").write_text("100\n")
    stopped.set()
    sampler.join()
    assert cg.usage()["peak_memory_bytes"] == 5000 and cg.usage()["memory_bytes"] == 100


@pytest.mark.unit
def test_v2_without_cgroup_kill_freezes_and_signals(fake_v2):
    cg, job = fake_job_cgroup_without(fake_v2, "j-5", "cgroup.kill")   # kernels before 5.14
    cg.kill()
    assert not (job / "cgroup.kill").exists()
    assert (job / "cgroup.freeze").read_text() == "0"   # frozen, then thawed


@pytest.mark.unit
def test_the_start_log_names_what_an_old_kernel_lacks_and_the_fallback(fake_v2):
    root, layout = fake_v2
    layout = layout._replace(v2=("cpu", "memory", "pids"))
    os.mkdir(root / "steve-jobs")
    assert sj.kernel_fallbacks(layout, "steve-jobs") == ["no io controller offered to the server: requests for IO "
                                   "limits are refused (FAILED_PRECONDITION)"]
    (root / "steve-jobs" / "cgroup.kill").unlink()
    (root / "steve-jobs" / "memory.peak").unlink()
    said = " / ".join(sj.kernel_fallbacks(layout, "steve-jobs"))
    assert "no cgroup.kill (kernel < 5.14): jobs are killed by freezing" in said
    assert "no memory.peak (kernel < 5.19): peak memory is sampled" in said


@pytest.mark.unit
def test_a_host_without_an_io_controller_refuses_io_limits_not_jobs():
    layout = sj.CgroupLayout.from_mountinfo(V2_MOUNTINFO, read=lambda p, d=None: "cpu memory pids")
    assert layout.missing() == [] and not layout.has_io()
    with pytest.raises(sj.FailedPreconditionError, match="no io controller"):
        _unopened_engine().start("tester", ["true"], sj.Limits(io_write_bps=1 << 20))


@pytest.mark.unit
def test_the_systemd_unit_is_the_readmes_and_starts_the_server_it_documents():
    unit = open(os.path.join(HERE, "steve-jobs.service")).read()
    readme = open(os.path.join(HERE, "README.md")).read()
    assert "```ini\n" + unit + "```" in readme           # verbatim
    lines = dict(line.split("=", 1) for line in unit.splitlines()
                 if "=" in line and not line.startswith("#"))
    assert lines["Delegate"] == "yes" and lines["KillMode"] == "process"
    assert lines["DelegateSubgroup"] == sj.SUPERVISOR_LEAF
    assert lines["After"] == "network.target" and lines["TasksMax"] == "infinity"
    argv = lines["ExecStart"].split()
    assert argv[1].endswith("/steve_jobs.py") and argv[2] == "server"
    args = sj.build_parser().parse_args(argv[2:])
    # The folder the README's install command fills with the server's files:
    assert f"install -m 600 ca.crt server.crt server.key jwt-signing.pub {args.certs}/" in readme
    assert "\ninstall -m 644 /opt/steve-jobs/steve-jobs.service /etc/systemd/system/" in readme


def _unopened_engine(**config):
    return sj.Engine(sj.EngineConfig(**config), layout=sj.CgroupLayout(unified="/x"))


@pytest.mark.unit
@pytest.mark.parametrize("limits, message", [
    (sj.Limits(cpu=-1), "cpu"),
    (sj.Limits(cpu=float("nan")), "cpu"),
    (sj.Limits(cpu=1e9), "cpu"),
    (sj.Limits(memory=1), "memory"),
    (sj.Limits(memory=1 << 60), "memory"),
    (sj.Limits(pids=-5), "pids"),
    (sj.Limits(pids=10**9), "pids"),
    (sj.Limits(io_read_bps=-1), "io_read_bps"),
    (sj.Limits(io_write_bps=10), "io_write_bps"),
    (sj.Limits(io_device="sda"), "io_device"),
    (sj.Limits(memory="lots"), "numbers"),
])
def test_out_of_range_limits_are_clear_errors(limits, message):
    with pytest.raises(sj.InvalidArgumentError, match=message):
        _unopened_engine().effective_limits(limits)


@pytest.mark.unit
def test_limits_default_and_cap_from_config():
    engine = _unopened_engine(default_limits=sj.Limits(cpu=0.5, memory=64 * sj.MiB, pids=7),
                              max_limits=sj.Limits(cpu=1, memory=128 * sj.MiB, pids=10,
                                                   io_write_bps=8192))
    assert engine.effective_limits(sj.Limits()) == sj.Limits(cpu=0.5, memory=64 * sj.MiB, pids=7)
    with pytest.raises(sj.InvalidArgumentError):
        engine.effective_limits(sj.Limits(io_write_bps=8193))


@pytest.mark.unit
def test_adding_a_limit_follows_the_checklist():
    """The README's checklist for a new limit: a field in both Limits, a row of LIMITS, a
    cgroup write, run's flag (in the README's usage) and the server's flags."""
    proto_fields = [f.name for f in pb.Limits.DESCRIPTOR.fields]
    assert sorted(proto_fields) == sorted(spec.proto for spec in sj.LIMITS), \
        "every field of jobs.proto's Limits needs a row in LIMITS"
    assert list(sj.Limits._fields) == [spec.name for spec in sj.LIMITS], \
        "every row of LIMITS needs a field of the engine's Limits, in the same order"
    for spec in sj.LIMITS:   # each row written by its own writes, or by a peer's on its controller
        assert spec.writes or any(other.writes for other in sj.LIMITS
                                  if other.controller == spec.controller), spec.name
    readme = open(os.path.join(HERE, "README.md")).read()
    usage = readme[readme.index("  run [-f]"):readme.index("  status ID")]
    args = sj.build_parser().parse_args(["run", "true"])
    server = sj.build_parser().parse_args(["server"])
    for spec in sj.LIMITS:
        assert f"[{spec.flag} " in usage, f"{spec.flag} is missing from the README's run usage"
        assert hasattr(args, sj.flag_dest(spec.flag)), spec.flag
        if spec in sj.SERVER_LIMITS:
            for side in ("default", "max"):
                assert hasattr(server, sj.flag_dest(f"--{side}-{spec.flag[2:]}")), (side, spec)
    # Conversions carry every field: a Limits with each field set survives the proto and back.
    some = sj.Limits(cpu=0.5, memory=64 * sj.MiB, pids=9, io_read_bps=8192, io_write_bps=16384,
                     io_device="8:0")
    assert all(getattr(some, name) for name in sj.Limits._fields), "give the new field a value"
    service = sj.JobService.__new__(sj.JobService)
    service.pb = pb
    message = service.limits_pb(some)
    assert {f.name for f, _ in message.ListFields()} == set(proto_fields)


@pytest.mark.unit
@pytest.mark.parametrize("argv", [[], [""], ["echo", "a\0b"], "echo hi", [1, 2],
                                  ["x" * (sj.MAX_ARGV_BYTES + 1)], ["\udcff"]])
def test_bad_argv_is_rejected(argv):
    with pytest.raises(sj.InvalidArgumentError):
        sj.validate_argv(argv)


@pytest.mark.unit
@pytest.mark.parametrize("workdir", ["relative", "/a\0b", "/tmp/x", "/dev/shm/x", "/tmp/../tmp/x",
                                     "/tmp//x"])
def test_bad_workdir_is_rejected(workdir):
    with pytest.raises(sj.InvalidArgumentError):
        sj.validate_workdir(workdir)


@pytest.mark.unit
@pytest.mark.parametrize("workdir", ["", "/", "/tmp", "/tmp/", "/tmpdir/x", "/srv/build"])
def test_good_workdir_is_accepted(workdir):
    sj.validate_workdir(workdir)


@pytest.mark.unit
@pytest.mark.parametrize("env", [[("1BAD", "x")], [("A=B", "x")], [("OK", "a\0b")]])
def test_bad_env_is_rejected(env):
    with pytest.raises(sj.InvalidArgumentError):
        sj.validate_env(env)


@pytest.mark.unit
def test_copy_output_keeps_cap_and_drains_the_rest(tmp_path):
    r, w = os.pipe()
    err_r, err_w = os.pipe()
    os.close(err_w)
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    index = os.open(tmp_path / "idx", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    payload = os.urandom(300_000)
    writer = threading.Thread(target=lambda: (sj._write_all(w, payload), os.close(w)))
    writer.start()
    written, indexed, truncated, error = sj.copy_output({r: sj.STDOUT, err_r: sj.STDERR},
                                                        out, index, cap=100_000)
    writer.join()
    os.close(out)
    os.close(index)
    assert (truncated, error) == (True, "") and written + indexed == 100_000   # cap shared
    assert indexed == os.path.getsize(tmp_path / "idx") and 0 < indexed < 1000
    assert (tmp_path / "out").read_bytes() == payload[:written]


def copied_output(tmp_path, writes):
    """Run copy_output on writes [(stream, bytes, pause)], one writer thread for both
    pipes so that their order is known; returns an OutputIndex on what it recorded."""
    pipes = {sj.STDOUT: os.pipe(), sj.STDERR: os.pipe()}
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    index = os.open(tmp_path / "idx", os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def write():
        for stream, data, pause in writes:
            sj._write_all(pipes[stream][1], data)
            time.sleep(pause)
        for _, w in pipes.values():
            os.close(w)
    writer = threading.Thread(target=write)
    writer.start()
    sj.copy_output({r: stream for stream, (r, _) in pipes.items()}, out, index, cap=1 << 20)
    writer.join()
    os.close(out)
    os.close(index)
    return sj.OutputIndex(str(tmp_path / "idx"))


@pytest.mark.unit
def test_output_index_keeps_streams_apart_in_their_merged_order(tmp_path):
    writes = [(sj.STDOUT, b"out 1\n", 0.05), (sj.STDERR, b"err 1\n", 0.05),
              (sj.STDOUT, b"out 2\nout 3\n", 0.05), (sj.STDERR, b"err 2\n", 0)]
    index = copied_output(tmp_path, writes)
    merged = (tmp_path / "out").read_bytes()
    assert merged == b"".join(data for _, data, _ in writes)
    path, end = str(tmp_path / "out"), len(merged)
    pieces, pos = [], 0
    while pos < len(merged):
        runs = sj.read_runs(index, path, pos, end, sj.CHUNK, most_runs=1)
        pieces.append((runs.streams[0], runs.data))
        pos = runs.after
    assert pieces == [(stream, data) for stream, data, _ in writes]
    times = sj.read_runs(index, path, 0, end, sj.CHUNK, by_time=True).times
    assert times == sorted(times) and times[-1] - times[0] >= 0.1

    def tail(stream, lines=0, nbytes=0):
        start = sj.tail_start(index, path, end, stream, lines, nbytes)
        return b"".join(data for (s, data), at in zip(pieces, itertools.accumulate(
            [0] + [len(d) for _, d in pieces])) if not stream or s == stream
            for data in [data[max(0, start - at):]])
    assert tail(0, lines=2) == b"out 3\nerr 2\n"
    assert tail(sj.STDOUT, lines=2) == b"out 2\nout 3\n"
    assert tail(sj.STDERR, lines=1) == b"err 2\n"
    assert tail(sj.STDERR, lines=5) == b"err 1\nerr 2\n"
    assert tail(sj.STDOUT, nbytes=8) == b"2\nout 3\n"
    assert tail(0, lines=1, nbytes=3) == b" 2\n"
    assert index.first_written_at(times[1], end) == len(b"out 1\n")
    assert index.first_written_at(times[-1] + 1, end) == end


def written_output(folder, runs, extra):
    """An output file and its index as copy_output writes them, for runs [(stream, data)]:
    a record at each run's start, and at the offsets in extra (INDEX_GRANULE's records);
    returns (OutputIndex, path of the output, the merged output)."""
    merged, records, times = b"", [], itertools.count(1_000_000)
    starts = list(itertools.accumulate([0] + [len(d) for _, d in runs]))
    for (stream, data), start in zip(runs, starts):
        cuts = sorted({start} | {start + x % len(data) for x in extra if data})
        records += [sj.INDEX_RECORD.pack(at, next(times) / 100, stream) for at in cuts]
        merged += data
    (folder / "out").write_bytes(merged)
    (folder / "idx").write_bytes(b"".join(records))
    return sj.OutputIndex(str(folder / "idx")), str(folder / "out"), merged


@pytest.mark.unit
@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(runs=hypothesis.strategies.lists(hypothesis.strategies.tuples(
                      hypothesis.strategies.sampled_from([1, 2]),
                      hypothesis.strategies.binary(min_size=1, max_size=9)), max_size=40),
                  extra=hypothesis.strategies.lists(hypothesis.strategies.integers(0, 99),
                                                    max_size=5),
                  size=hypothesis.strategies.integers(1, 30),
                  most_runs=hypothesis.strategies.integers(1, 5),
                  stream=hypothesis.strategies.sampled_from([0, 1, 2]),
                  by_time=hypothesis.strategies.booleans())
def test_runs_read_in_any_sizes_are_each_stream_in_merged_order(tmp_path_factory, runs, extra,
                                                                 size, most_runs, stream,
                                                                 by_time):
    """read_runs however it is cut (bytes, runs, records a read takes: RECORDS_PER_READ)
    gives every byte of the streams asked for once, in order, each run of one stream
    and where it lies in the merged output."""
    index, path, merged = written_output(tmp_path_factory.mktemp("runs"), runs, extra)
    got, pos, reads = [], 0, 0
    with unittest.mock.patch.object(sj, "RECORDS_PER_READ", 3):
        while True:
            r = sj.read_runs(index, path, pos, len(merged), size, stream, by_time, most_runs)
            assert len(r.data) <= size and 0 < len(r.sizes) <= most_runs or not r.data
            assert len(r.offsets) == len(r.sizes) == len(r.streams) == len(r.times)
            assert r.after > pos or r.after == len(merged) and not r.data
            at = 0
            for offset, n, s, t in zip(r.offsets, r.sizes, r.streams, r.times):
                assert r.data[at:at + n] == merged[offset:offset + n] and n > 0
                got.append((offset, s, r.data[at:at + n], t))
                at += n
            assert at == len(r.data)
            pos, reads = r.after, reads + 1
            if not r.data and pos >= len(merged):
                break
    expected = b"".join(d for s, d in runs if stream in (0, s))
    assert b"".join(data for _, _, data, _ in got) == expected
    stream_of = [s for s, d in runs for _ in d]   # each byte's
    for offset, s, data, t in got:
        assert set(stream_of[offset:offset + len(data)]) == {s} and (t > 0) == by_time
    records = os.path.getsize(index.path) // sj.INDEX_RECORD.size   # (each may be a run)
    assert reads <= 2 * (records + len(merged) // size) + 2


@pytest.mark.unit
def test_the_index_is_read_where_it_lies_not_held_in_memory(tmp_path):
    """Reproduction: a read at the end of a 1-byte-interleaved job's output took the whole
    index into memory (+15 MB for 614k runs, kept as long as the job), in one go on the
    event loop (214 ms)."""
    import tracemalloc
    runs = [(1 + i % 2, b"ab"[i % 2:][:1]) for i in range(200_000)]
    index, path, merged = written_output(tmp_path, runs, [])
    tracemalloc.start()
    try:
        for pos in (len(merged) - 1, 0, len(merged) // 2):
            r = sj.read_runs(index, path, pos, len(merged), sj.CHUNK)
            assert r.offsets[0] == pos and r.data[:1] == merged[pos:pos + 1]
            assert 0 < len(r.sizes) <= sj.RECORDS_PER_READ
            del r   # (what a read returns is the caller's)
        tail = sj.tail_start(index, path, len(merged), sj.STDERR, 0, 3)
        since = index.first_written_at(10_000 + 1.5, len(merged))
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tail, since) == (len(merged) - 5, 150) and kept < 64 * sj.KiB, kept
    assert peak < 20 * sj.RECORDS_PER_READ * sj.INDEX_RECORD.size, peak   # (~4 MB)


@pytest.mark.unit
@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(text=hypothesis.strategies.text("ab\n", max_size=60),
                  lines=hypothesis.strategies.integers(1, 1 << 63),
                  block=hypothesis.strategies.integers(1, 9))
def test_a_tail_of_both_streams_is_what_splitting_lines_says(tmp_path_factory, text, lines,
                                                              block):
    """tail_start's block-wise counting, across block bounds, against str.splitlines."""
    path = tmp_path_factory.mktemp("tail") / "out"
    path.write_text(text)
    with unittest.mock.patch.object(sj, "TAIL_BLOCK", block):
        start = sj.tail_start(None, str(path), len(text), 0, lines, 0)
    assert text[start:] == "".join(text.splitlines(keepends=True)[-lines:])


@pytest.mark.unit
@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(data=hypothesis.strategies.binary(max_size=300),
                  offset=hypothesis.strategies.integers(0, 1 << 63),
                  stream=hypothesis.strategies.sampled_from([0, 1, 2]),
                  when=hypothesis.strategies.one_of(hypothesis.strategies.none(),
                                                    hypothesis.strategies.integers(1, 1 << 40)))
def test_the_chunk_coders_read_and_write_what_protobuf_does(data, offset, stream, when):
    chunk = pb.OutputChunk(data=data, offset=offset, stream=stream)
    if when is not None:
        chunk.time.FromNanoseconds(when * 1000)
    if data:   # (the server never sends an empty chunk)
        mine = sj.encode_output_chunk(sj.OutputPiece(offset, data, stream, (when or 0) / 1e6),
                                      with_time=True)
        assert pb.OutputChunk.FromString(mine) == chunk
    piece = sj.decode_output_chunk(chunk.SerializeToString())
    assert (bytes(piece.data), piece.offset, piece.stream) == (data, offset, stream)
    assert piece.time == (0.0 if not when else pytest.approx(when / 1e6, abs=1e-6))
    with pytest.raises(ValueError):
        sj.decode_output_chunk(chunk.SerializeToString()[:-1] if data else b"\x0a\x05ab")


def _job_with(result, stop=False, paused=False):
    job = sj.Job("id", {"owner": "o", "uid": 1}, "/nonexistent")
    job.result, job.stop_requested, job.paused = result, stop, paused
    return job


@pytest.mark.unit
@pytest.mark.parametrize("result, stop, state", [
    (None, False, sj.RUNNING),
    ({"exit_code": 0}, False, sj.EXITED),
    ({"exit_code": 3}, False, sj.EXITED),
    ({"signal": 15}, False, sj.KILLED),
    ({"signal": 9}, True, sj.STOPPED),
    ({"signal": 9, "oom_kills": 1}, False, sj.OOM_KILLED),
    ({"exit_code": 137, "oom_kills": 1}, False, sj.OOM_KILLED),
    ({"exit_code": 1, "oom_kills": 1}, False, sj.EXITED),
    ({"exit_code": 127, "failed": True}, False, sj.FAILED),
    ({"unknown": True}, False, sj.UNKNOWN),
])
def test_derive_state(result, stop, state):
    assert sj.derive_state(_job_with(result, stop)) == state


@pytest.mark.unit
def test_whole_disk_of_names_a_disk_or_nothing():
    dev = sj.whole_disk_of("/")
    assert dev == "" or (dev.count(":") == 1 and not os.path.exists(
        f"/sys/dev/block/{dev}/partition"))
    assert sj.whole_disk_of("/proc") == ""


###############################################################################
# Kernel tests: the engine on the real kernel
###############################################################################

@pytest.mark.kernel
def test_output_and_exit_code(engine):
    status, out = sh(engine, "printf hello; printf ' world' >&2; exit 3")
    assert (status.state, status.exit_code, status.signal) == (sj.EXITED, 3, None)
    assert out == b"hello world"
    assert status.output_bytes == len(out)
    assert status.ended_at >= status.started_at >= status.created_at - 1


@pytest.mark.kernel
def test_output_is_binary_exact(engine):
    script = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 4000)"
    status, out = run(engine, ["python3", "-c", script])
    assert status.exit_code == 0 and out == bytes(range(256)) * 4000


@pytest.mark.kernel
def test_command_not_found_fails_with_127(engine):
    status, out = run(engine, ["no-such-command-here"])
    assert (status.state, status.exit_code) == (sj.FAILED, 127)
    assert "command not found" in status.error and b"command not found" in out


@pytest.mark.kernel
def test_not_executable_fails_with_126(engine):
    status, _ = run(engine, ["/etc/passwd"])
    assert (status.state, status.exit_code) == (sj.FAILED, 126)
    assert "Permission denied" in status.error


@pytest.mark.kernel
def test_missing_workdir_fails_to_start(engine):
    status, _ = run(engine, ["true"], workdir="/nonexistent/dir")
    assert status.state == sj.FAILED and "working directory" in status.error


@pytest.mark.kernel
@pytest.mark.parametrize("argv, limits", [
    ([], sj.Limits()), (["echo", "a\0b"], sj.Limits()), (["true"], sj.Limits(cpu=-1)),
    (["true"], sj.Limits(memory=1)), (["true"], sj.Limits(pids=1 << 40)),
])
def test_bad_input_changes_nothing(engine, argv, limits):
    jobs_dir = os.path.join(engine.config.state_dir, "jobs")
    before = (set(os.listdir(jobs_dir)), len(engine.list()))
    with pytest.raises(sj.InvalidArgumentError):
        engine.start("tester", argv, limits)
    assert (set(os.listdir(jobs_dir)), len(engine.list())) == before


@pytest.mark.kernel
def test_unknown_job_id_is_not_found(engine):
    for call in (lambda: engine.status("nope"), lambda: engine.stop("nope"),
                 lambda: engine.read_output("nope"), lambda: list(engine.follow("nope")),
                 lambda: engine.pause("nope"), lambda: engine.status(None)):
        with pytest.raises(sj.NotFoundError):
            call()


@pytest.mark.kernel
def test_environment_is_small_and_hides_server_secrets(engine, monkeypatch):
    monkeypatch.setenv("STEVE_TEST_SECRET", "hunter2")
    status, out = run(engine, ["env"], env=(("EXTRA", "yes"),))
    names = {line.split("=", 1)[0] for line in out.decode().splitlines()}
    assert names == {"PATH", "HOME", "LANG", "EXTRA"} and b"hunter2" not in out


@pytest.mark.kernel
def test_root_jobs_need_the_server_to_allow_them(engine):
    with pytest.raises(sj.PermissionDeniedError):
        engine.start("tester", ["id"], options=sj.JobOptions(as_root=True))


@pytest.mark.kernel
def test_memory_hog_is_oom_killed_and_reported(engine):
    hog = "x = b'x' * (256 << 20); print('survived')"
    status, out = run(engine, ["python3", "-c", hog], limits=sj.Limits(memory=64 * sj.MiB))
    assert status.state == sj.OOM_KILLED, status
    assert status.oom_kills >= 1 and status.signal == signal.SIGKILL
    assert b"survived" not in out
    assert status.peak_memory_bytes <= 64 * sj.MiB + 1 * sj.MiB


@pytest.mark.kernel
def test_fork_bomb_is_contained_by_pids_limit(engine):
    bomb = ("import os, time\n"
            "n = 0\n"
            "try:\n"
            "    while n < 10000:\n"
            "        if os.fork() == 0:\n"
            "            time.sleep(60); os._exit(0)\n"
            "        n += 1\n"
            "except OSError as e:\n"
            "    print('forked', n, 'then', e.errno, flush=True)\n")
    status, out = run(engine, ["python3", "-c", bomb], limits=sj.Limits(pids=20))
    words = out.split()
    assert words[:1] == [b"forked"], out
    assert int(words[1]) < 20 and int(words[3]) == errno.EAGAIN
    assert status.exit_code == 0   # the leftover sleepers die with the job's init


@pytest.mark.kernel
def test_cpu_limit_holds_a_busy_loop_near_its_share(engine):
    busy = "import time\nt = time.time()\nwhile time.time() - t < 3: pass\n"
    status, _ = run(engine, ["python3", "-c", busy], limits=sj.Limits(cpu=0.2))
    share = status.cpu_seconds / (status.ended_at - status.started_at)
    assert 0.12 < share < 0.26, f"cpu share {share:.3f} with a 0.2 limit"


@pytest.mark.kernel
def test_io_limit_throttles_direct_io_writes(engine):
    limit = 8 * sj.MiB
    script = ("import os, time\n"
              "buf = __import__('mmap').mmap(-1, 1 << 20); buf.write(b'x' * (1 << 20))\n"
              "fd = os.open('data', os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)\n"
              "t = time.monotonic()\n"
              "for _ in range(24): os.write(fd, buf)\n"
              "os.fsync(fd); print(time.monotonic() - t)\n")
    status, out = run(engine, ["python3", "-c", script], limits=sj.Limits(io_write_bps=limit))
    assert status.exit_code == 0, out
    rate = 24 * sj.MiB / float(out)
    assert rate < 1.5 * limit, f"wrote {rate / sj.MiB:.1f} MiB/s with an 8 MiB/s limit"
    assert engine.status(engine.list()[-1].id).limits.io_device


@pytest.fixture
def host_listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.kernel
def test_job_network_has_only_loopback_and_cannot_reach_the_host(engine, host_listener):
    script = f"ls /sys/class/net; echo > /dev/tcp/127.0.0.1/{host_listener} && echo REACHED"
    status, out = run(engine, ["bash", "-c", script])
    lines = out.decode().splitlines()
    assert lines[0] == "lo" and "REACHED" not in lines, out
    assert "Connection refused" in out.decode()


# -- network: egress jobs against a remote host of the test's own (RemoteHost) ------------


@pytest.fixture(scope="module")
def remote_host():
    """The remote host's namespace, its veth pair and its services; all removed after."""
    require_kernel()
    with RemoteHost() as netns:
        yield netns


@pytest.fixture(scope="module")
def egress_server(certs, remote_host):
    require_kernel()
    with Server(certs, extra=["--stop-jobs-on-exit", "--egress-dns", REMOTE_ADDRESS,
                              "--egress-deny", DENIED_RANGE]) as srv:
        yield srv


def reach_script(*targets):
    """A job's python: for each (label, host, port), a line: "label reached" (the remote
    echoed), "label refused" (refused or unreachable, within a second) or "label <error>"."""
    return ("import errno, socket, time\n"
            "REFUSED = (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH)\n"
            f"for label, host, port in {list(targets)!r}:\n"
            "    t = time.monotonic()\n"
            "    try:\n"
            "        with socket.create_connection((host, port), timeout=5) as s:\n"
            "            s.sendall(b'ping'); assert s.recv(4) == b'ping'\n"
            "        print(label, 'reached', flush=True)\n"
            "    except OSError as e:\n"
            "        fast = e.errno in REFUSED and time.monotonic() - t < 1\n"
            "        print(label, 'refused' if fast else f'{type(e).__name__} {e}', flush=True)\n")


@pytest.fixture
def open_host_listener():
    """A listener on every address of the host (0.0.0.0) that echoes: the host's services."""
    with socket.create_server(("0.0.0.0", 0)) as s:
        def serve():
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = s.accept()
                    with conn:
                        conn.sendall(conn.recv(4))
        threading.Thread(target=serve, daemon=True).start()
        yield s.getsockname()[1]


PUBLISHED_PORT = 7799


@pytest.fixture
def published_port():
    """A port of the host's address HOST_SIDE that DNAT sends to the remote host's echo, as
    Docker publishes a container's port (nat output): it is the host's, to egress jobs too."""
    table = f"ip sjtest_dnat_{uuid.uuid4().hex[:6]}"
    subprocess.run(["nft", "-f", "-"], check=True, text=True, input="\n".join([
        f"add table {table}",
        f"add chain {table} output {{ type nat hook output priority -100; }}",
        f"add rule {table} output ip daddr {HOST_SIDE} tcp dport {PUBLISHED_PORT} "
        f"dnat ip to {REMOTE_ADDRESS}:{REMOTE_PORT}", ""]))
    try:
        yield PUBLISHED_PORT
    finally:
        subprocess.run(["nft", "delete", "table", *table.split()], check=True)


@pytest.mark.network
def test_an_egress_job_reaches_the_remote_host_and_nothing_of_the_hosts(
        egress_server, open_host_listener, published_port):
    # The test itself (the host) reaches each address: only the firewall stands between.
    for address, port in ((REMOTE_ADDRESS, REMOTE_PORT), (METADATA_ADDRESS, REMOTE_PORT),
                          (DENIED_ADDRESS, REMOTE_PORT), (HOST_SIDE, published_port)):
        socket.create_connection((address, port), timeout=5).close()
    script = reach_script(
        ("remote", REMOTE_ADDRESS, REMOTE_PORT), ("by-name", "build-deps.test", REMOTE_PORT),
        ("server-port", "10.0.2.2", egress_server.port),     # (slirp's alias of the host)
        ("own-loopback", "127.0.0.1", egress_server.port),
        ("host-address", HOST_SIDE, open_host_listener),
        ("published", HOST_SIDE, published_port),     # (the host's, though DNAT sends it on)
        ("metadata", METADATA_ADDRESS, REMOTE_PORT), ("denied-range", DENIED_ADDRESS, REMOTE_PORT))
    done = cli(egress_server, "run", "-f", "--name", "reach", "--network", "egress", "--",
               "python3", "-c", script, user="alice")
    assert done.returncode == 0, done.stderr
    said = dict(line.split(" ", 1) for line in done.stdout.decode().splitlines())
    assert said == {"remote": "reached", "by-name": "reached", "server-port": "refused",
                    "own-loopback": "refused", "host-address": "refused", "published": "refused",
                    "metadata": "refused", "denied-range": "refused"}, said
    deadline = time.monotonic() + scaled(10)   # (the counts are read once a second)
    while int((st := cli_json(egress_server, "status", "reach", user="alice")).get(
            "egress_denied", 0)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert st["network"] == "egress" and int(st["egress_denied"]) >= 3, st   # (SYNs refused)
    shown = cli(egress_server, "status", "reach", user="alice").stdout.decode()
    assert re.search(r"network  egress \(\d+ packets refused\)", shown), shown



def job_record(server, job_id):
    with open(os.path.join(server.state_dir, "jobs", job_id, "job.json")) as f:
        return json.load(f)


def shim_pid_of(server, job_id):
    """The job's supervisor's pid, once its record names it: the supervisor writes the
    record after its start's reply."""
    def named():
        with contextlib.suppress(FileNotFoundError):
            return "shim" in job_record(server, job_id)
    wait_for(named)
    return job_record(server, job_id)["shim"]["shim_pid"]


def wait_for_output(server, job_id, text, user="alice"):
    deadline = time.monotonic() + scaled(20)
    while text not in (out := cli(server, "output", job_id, user=user).stdout):
        assert time.monotonic() < deadline, out
        time.sleep(0.05)
    return out


WAIT_FOR_GO = ("import os, socket, time\n"
               "def reach():\n"
               "    try:\n"
               f"        socket.create_connection(({REMOTE_ADDRESS!r}, {REMOTE_PORT}), "
               "timeout=5).close(); return 'reached'\n"
               "    except OSError as e:\n"
               "        return type(e).__name__\n"
               "print('before', reach(), flush=True)\n"
               "while not os.path.exists('go'): time.sleep(0.05)\n"
               "print('after', reach(), flush=True)\n")


@pytest.fixture
def restartable_egress_server(certs, remote_host):
    """As egress_server, without --stop-jobs-on-exit: its jobs outlive a restart."""
    require_kernel()
    with Server(certs, extra=["--egress-dns", REMOTE_ADDRESS]) as srv:
        yield srv


@pytest.mark.network
def test_egress_survives_a_server_restart_and_a_dead_helper_is_said(
        restartable_egress_server, tmp_path):
    egress_server = restartable_egress_server
    go = tmp_path / "go"
    go.write_text("")
    kept = start_job(egress_server, f"python3 -c {sj.shell_quote(WAIT_FOR_GO)}",
                     user="alice", network="egress")
    lost = start_job(egress_server, f"python3 -c {sj.shell_quote(WAIT_FOR_GO)}",
                     user="alice", network="egress")
    try:
        for job_id in (kept, lost):
            wait_for_output(egress_server, job_id, b"before reached\n")
        # The helper: a uid of its own (no root), in the job's pid namespace (a child of
        # the shim, the job's pid 1) but out of the job's reach, in the job's cgroup (moved
        # there once the job started).
        helper = job_record(egress_server, lost)["shim"]["egress_pid"]
        status = open(f"/proc/{helper}/status").read()
        uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
        assert uid >= sj.EngineConfig().uid_base and uid != job_record(egress_server, lost)[
            "uid"], status
        inner = re.search(r"^NSpid:\s+\d+\s+(\d+)$", status, re.M)   # (host's, job's)
        assert inner, status
        kill = cli(egress_server, "exec", lost, f"kill -9 {inner.group(1)}", user="alice")
        assert kill.returncode != 0 and b"not permitted" in kill.stderr, kill
        cgroup_name = job_record(egress_server, lost)["shim"]["cgroup"]
        assert cgroup_name in open(f"/proc/{helper}/cgroup").read()
        assert cli_json(egress_server, "status", lost, user="alice")["network_state"] == "up"
        os.kill(helper, signal.SIGKILL)
        deadline = time.monotonic() + scaled(10)
        while not (state := cli_json(egress_server, "status", lost, user="alice")[
                "network_state"]).startswith("down"):
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
        egress_server.restart()
        assert cli_json(egress_server, "status", kept, user="alice")["network_state"] == "up"
        inside = cli(egress_server, "exec", kept, "--", "python3", "-c", reach_script(
            ("exec", REMOTE_ADDRESS, REMOTE_PORT)), user="alice")   # (exec: the job's network)
        assert inside.stdout == b"exec reached\n", inside
        for job_id in (kept, lost):
            done = cli(egress_server, "cp", str(go), f"{job_id}:go", user="alice")
            assert done.returncode == 0, done.stderr
            assert cli(egress_server, "wait", job_id, user="alice").returncode == 0
        assert cli(egress_server, "output", kept, user="alice").stdout == (
            b"before reached\nafter reached\n")
        out = cli(egress_server, "output", lost, user="alice").stdout   # (it went on)
        assert out.startswith(b"before reached\nafter ") and b"reached" not in out[15:], out
        st = cli_json(egress_server, "status", lost, user="alice")
        assert st["state"] == "exited" and st["network_state"].startswith(
            "down: the network helper ended (killed by signal 9"), st
        # A default job of the same server still has loopback alone.
        only = cli(egress_server, "run", "-f", "ls /sys/class/net", user="alice")
        assert only.stdout == b"lo\n", only
    finally:
        for job_id in (kept, lost):
            cli(egress_server, "stop", "--grace", "0", job_id, user="alice")


def egress_helpers(server):
    """Pids of server's egress helpers (slirp4netns), by the uid range of helpers, and the
    cgroup (its jobs', or one of its warm shims') they are in."""
    config = sj.EngineConfig()
    first = config.uid_base + config.uid_count
    helpers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            uid = os.stat(f"/proc/{pid}").st_uid
            if (first <= uid < first + sj.EGRESS_UIDS and "slirp4netns" in os.readlink(
                    f"/proc/{pid}/exe") and f"/{server.cgroup_root}/" in open(
                    f"/proc/{pid}/cgroup").read()):
                helpers.append(int(pid))
    return helpers


@pytest.mark.network
def test_egress_helpers_are_made_ready_while_asked_for_and_none_outlives_its_job(
        certs, remote_host):
    require_kernel()
    with Server(certs, extra=["--egress-dns", REMOTE_ADDRESS]) as srv:
        warm = []
        for _ in range(4):   # the first cold; then warm shims get theirs ready ahead
            done = cli(srv, "run", "-f", "--name", f"e{len(warm)}", "--network", "egress",
                       "--", "python3", "-c", reach_script(("r", REMOTE_ADDRESS, REMOTE_PORT)),
                       user="alice")
            assert done.stdout == b"r reached\n", done
            st = cli_json(srv, "status", f"e{len(warm)}", user="alice")
            warm.append(job_record(srv, st["job_id"])["shim"]["egress_warm"])
            time.sleep(0.3)   # (a quiet moment: the spawner refills)
        assert warm[0] is False and True in warm[1:], warm
        # A default job on a shim made ready for egress: no network, and its helper goes.
        assert cli(srv, "run", "-f", "ls /sys/class/net", user="alice").stdout == b"lo\n"
        helpers = egress_helpers(srv)
        assert 0 < len(helpers) <= sj.WARM_SHIMS, helpers   # (the warm shims' alone)
        srv.terminate()   # its warm shims go, and their helpers with them
        deadline = time.monotonic() + scaled(10)
        while any(os.path.exists(f"/proc/{pid}") for pid in helpers):
            assert time.monotonic() < deadline, helpers
            time.sleep(0.05)


@pytest.mark.network
def test_a_removed_egress_firewall_is_put_back_and_a_stop_is_no_lost_network(egress_server):
    job = start_job(egress_server, "trap '' HUP; exec sleep 1000", user="alice",
                    network="egress")
    try:
        table = sj.EgressFirewall(egress_server.state_dir, 0, ()).table
        listed = lambda: subprocess.run(["nft", "list", "table", *table.split()],
                                        capture_output=True).returncode == 0
        assert listed()
        subprocess.run(["nft", "flush", "table", *table.split()], check=True)
        subprocess.run(["nft", "delete", "table", *table.split()], check=True)
        deadline = time.monotonic() + scaled(3 * sj.EGRESS_CHECK_INTERVAL)
        while not listed():   # (the server checks every EGRESS_CHECK_INTERVAL seconds)
            assert time.monotonic() < deadline, "the firewall was not put back"
            time.sleep(0.2)
        assert "is gone" in egress_server.read_log()
        # kill --all signals the job's processes, not its network helper.
        assert cli(egress_server, "kill", "--all", "-s", "HUP", job, user="alice").returncode == 0
        time.sleep(0.2)
        assert cli_json(egress_server, "status", job, user="alice")["network_state"] == "up"
    finally:
        cli(egress_server, "stop", "--grace", "0", job, user="alice")
    # Its stop killed its cgroup, the helper with it: not a network lost.
    st = cli_json(egress_server, "status", job, user="alice")
    assert st["state"] == "stopped" and st["network_state"] == "", st


@pytest.mark.network
def test_egress_is_refused_in_one_line_where_the_host_or_the_role_cannot_have_it(certs):
    require_kernel()
    # A host without slirp4netns (not on the server's PATH), egress for admins only.
    with Server(certs, prefix=["env", "PATH=/usr/sbin:/sbin"],
                extra=["--egress-role", "admin"]) as srv:
        denied = cli(srv, "run", "--network", "egress", "true", user="alice")
        assert denied.returncode == 6 and b"--egress-role" in denied.stderr, denied
        missing = cli(srv, "run", "--network", "egress", "true")
        assert missing.returncode == 5, missing
        assert missing.stderr.count(b"\n") == 1 and b"slirp4netns package" in missing.stderr
        assert cli(srv, "run", "-f", "true", user="alice").returncode == 0   # the rest works
    # A bad --egress-deny: the server does not start, and says why in one line.
    srv = Server(certs, extra=["--egress-deny", "10.0.0.0/8", "10.1.0.0/33"])
    try:
        with pytest.raises(AssertionError, match="server did not start"):
            srv.start()
        log = srv.read_log().strip()
        assert log.splitlines()[-1].endswith("cannot start: --egress-deny '10.1.0.0/33' is "
                                             "not a CIDR (as 10.0.0.0/8) or an address"), log
        assert "Traceback" not in log
    finally:
        srv.cleanup()

@pytest.mark.kernel
def test_host_network_option_shares_the_host_network(engine, host_listener):
    script = f"echo > /dev/tcp/127.0.0.1/{host_listener} && echo REACHED"
    status, out = run(engine, ["bash", "-c", script], host_network=True)
    assert b"REACHED" in out, out


@pytest.mark.kernel
def test_a_command_that_ends_at_once_ends_its_job_and_what_it_left(engine):
    """The shim is the job's pid 1: when the command ends, it kills what the command left,
    even a command that ended before the shim watched for it (a background process holding
    its output open would otherwise keep the job running)."""
    for _ in range(5):
        began = time.monotonic()
        status, out = sh(engine, "sleep 30 & echo left; exit 4", timeout=scaled(20))
        assert (status.state, status.exit_code, out) == (sj.EXITED, 4, b"left\n"), status
        assert time.monotonic() - began < scaled(10)
        assert not pids_of_uid(status.uid)


@pytest.mark.kernel
def test_ps_inside_shows_only_the_job(engine):
    status, out = run(engine, ["ps", "-e", "-o", "pid=,comm="])
    procs = [line.split() for line in out.decode().splitlines()]
    assert procs[0] == ["1", "steve-init"], out
    assert [p[1] for p in procs[1:]] == ["ps"], out
    _, cmdline = run(engine, ["cat", "/proc/1/cmdline"])
    assert cmdline.rstrip(b"\0") == b"steve-init", cmdline[:200]   # no host paths, no settings


@pytest.mark.kernel
def test_hostname_is_the_job_id(engine):
    job_id = engine.start("tester", ["hostname"])
    engine.wait(job_id, scaled(30))
    assert b"".join(engine.follow(job_id)).decode().strip() == job_id


@pytest.mark.kernel
def test_job_is_unprivileged_and_cannot_leave_its_cgroup(engine):
    script = ("id -u; cat /proc/self/cgroup | tail -1;"
              "echo $$ > /sys/fs/cgroup/cgroup.procs && echo MOVED;"
              "mount -t cgroup2 none /mnt 2>/dev/null && echo MOUNTED;"
              "kill -0 1 2>/dev/null || echo CANNOT-SIGNAL-INIT")
    status, out = sh(engine, script)
    lines = out.decode().splitlines()
    assert int(lines[0]) >= engine.config.uid_base
    assert lines[1] == "0::/"   # the cgroup namespace: its own cgroup is its root
    assert "MOVED" not in lines and "MOUNTED" not in lines
    assert "CANNOT-SIGNAL-INIT" in lines


@pytest.mark.kernel
def test_ended_job_leaves_no_cgroup_and_no_process(engine):
    job_id = engine.start("tester", ["sh", "-c", "sleep 0.2 & sleep 0.1"])
    dirs = job_cgroup_dirs(engine, job_id)
    assert dirs, "a running job has cgroup folders"
    status = engine.wait(job_id, scaled(30))
    assert status.state == sj.EXITED
    assert not [d for d in dirs if os.path.exists(d)]
    assert not pids_of_uid(status.uid)


@pytest.mark.kernel
def test_stop_kills_a_tree_that_traps_sigterm_and_daemonizes(engine):
    script = ("trap '' TERM; "
              "setsid sh -c \"trap '' TERM; sleep 1000\" & "
              "(sh -c \"trap '' TERM; sleep 1000\" &) ; "
              "echo ready; while :; do sleep 1; done")
    job_id = engine.start("tester", ["sh", "-c", script])
    for _ in engine.follow(job_id):
        break   # 'ready': the tree exists
    uid = engine.status(job_id).uid
    deadline = time.monotonic() + scaled(10)
    while len(pids_of_uid(uid)) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)   # the daemons' own forks may still be under way
    assert len(pids_of_uid(uid)) >= 4
    dirs = job_cgroup_dirs(engine, job_id)
    status = engine.stop(job_id, grace=0.5)
    assert status.state == sj.STOPPED and status.signal == signal.SIGKILL
    assert not pids_of_uid(uid)
    assert not [d for d in dirs if os.path.exists(d)]
    assert engine.stop(job_id) == engine.status(job_id)   # stopping it again: its status


@pytest.mark.kernel
def test_stop_with_sigterm_ends_a_polite_job_at_once(engine):
    job_id = engine.start("tester", ["sleep", "1000"])
    status = engine.stop(job_id, grace=30)
    assert status.state == sj.STOPPED and status.signal == signal.SIGTERM
    assert status.ended_at - status.started_at < 10


@pytest.mark.kernel
def test_twenty_followers_attaching_at_different_moments_get_every_byte(engine):
    writer = ("import os, sys, time, hashlib\n"
              "h = hashlib.sha256()\n"
              "for i in range(50):\n"
              "    chunk = os.urandom(1000000)\n"
              "    h.update(chunk)\n"
              "    sys.stdout.buffer.write(chunk); sys.stdout.flush()\n"
              "    time.sleep(0.02)\n"
              "open('digest', 'w').write(h.hexdigest())\n")
    # A folder of the test's: the default working folder is a tmpfs that ends with the job.
    workdir = host_folder_for_jobs()
    job_id = engine.start("tester", ["python3", "-c", writer], options=sj.JobOptions(
        workdir=workdir))
    digests, errors = [None] * 20, []

    def follow(i):
        try:
            time.sleep(i * 0.08)   # some attach early, some late, some after the end
            h = hashlib.sha256()
            for chunk in engine.follow(job_id):
                h.update(chunk)
            digests[i] = h.hexdigest()
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    status = engine.wait(job_id, scaled(60))
    assert status.exit_code == 0 and not errors
    expected = open(os.path.join(workdir, "digest")).read()
    shutil.rmtree(workdir)
    assert digests == [expected] * 20
    assert status.output_bytes == 50_000_000


def output_on_disk(engine, job_id):
    """(bytes of the job's output, bytes of its index) as its folder holds them."""
    folder = engine._get(job_id).dir
    return tuple(os.path.getsize(os.path.join(folder, name))
                 for name in (sj.OUTPUT_FILE, sj.OUTPUT_INDEX_FILE))


@pytest.mark.kernel
def test_output_cap_keeps_the_first_bytes_and_lets_the_job_finish():
    with running_engine(output_cap=100_000) as engine:
        job_id = engine.start("tester", ["sh", "-c", "head -c 300000 /dev/zero; echo done >&2"])
        status = engine.wait(job_id, scaled(60))
        out = b"".join(engine.follow(job_id))
        output, index = output_on_disk(engine, job_id)
    assert status.exit_code == 0 and status.output_truncated
    # The cap is what the output and its index take together: a record or two of index.
    assert 0 < index <= 16 * sj.INDEX_RECORD.size and output + index == 100_000
    assert out == b"\0" * output and status.output_bytes == output


@pytest.mark.kernel
def test_a_job_alternating_its_streams_takes_no_more_disk_than_its_cap():
    # 1-byte writes to each stream in turn: an index record a byte, which counts too.
    script = 'i=0; while [ $i -lt 40000 ]; do printf a; printf b >&2; i=$((i+1)); done'
    with running_engine(output_cap=64 * sj.KiB) as engine:
        job_id = engine.start("tester", ["sh", "-c", script])
        status = engine.wait(job_id, scaled(120))
        output, index = output_on_disk(engine, job_id)
        assert status.exit_code == 0 and status.output_truncated
        assert output == status.output_bytes and output + index <= 64 * sj.KiB, (output, index)
        assert engine._get(job_id).result["index_bytes"] == index
        # Retention counts both: a total just below them removes the job.
        assert engine.prune(max_bytes=output + index) == []
        assert engine.prune(max_bytes=output + index - 1) == [job_id]


@pytest.mark.kernel
def test_starts_past_the_maximum_of_running_jobs_are_refused():
    with running_engine(max_running_jobs=4, max_jobs_per_user=2) as engine:
        first = [engine.start("tester", ["sleep", "1000"]) for _ in range(2)]
        with pytest.raises(sj.ResourceExhaustedError, match="tester has 2 jobs running"):
            engine.start("tester", ["true"])
        # One user at the cap leaves room for the others, up to the server's maximum.
        others = [engine.start(user, ["sleep", "1000"]) for user in ("alice", "bob")]
        with pytest.raises(sj.ResourceExhaustedError, match="4 jobs are running"):
            engine.start("carol", ["true"])
        engine.stop(first[0], grace=0)
        engine.wait(engine.start("tester", ["true"]), 30)   # room again
        for job_id in first[1:] + others:
            engine.stop(job_id, grace=0)


@pytest.mark.kernel
def test_a_user_job_cap_defaults_to_a_quarter_of_the_maximum():
    assert sj.EngineConfig(max_running_jobs=1024).user_job_cap() == 256
    assert sj.EngineConfig(max_running_jobs=2).user_job_cap() == 1
    assert sj.EngineConfig(max_running_jobs=8, max_jobs_per_user=8).user_job_cap() == 8


@pytest.mark.kernel
def test_a_dead_spawner_is_replaced_at_the_next_start():
    with running_engine() as engine:
        before = engine.start("tester", ["sleep", "1000"])
        engine._spawner._proc.kill()
        engine._spawner._proc.wait()
        ids = [engine.start("tester", ["true"]) for _ in range(4)]   # past the warm ones
        assert [engine.wait(i, scaled(30)).exit_code for i in ids] == [0] * 4
        assert engine.status(before).state == sj.RUNNING   # its job did not notice
        engine.stop(before, grace=0)


@pytest.mark.kernel
def test_pause_freezes_and_resume_thaws(engine):
    counter = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done"
    job_id = engine.start("tester", ["sh", "-c", counter])
    time.sleep(scaled(0.3))
    assert engine.pause(job_id).state == sj.PAUSED
    time.sleep(scaled(0.1))   # let the freeze settle
    size, cpu = engine.status(job_id).output_bytes, engine.status(job_id).cpu_seconds
    time.sleep(scaled(0.5))
    paused = engine.status(job_id)
    assert (paused.output_bytes, paused.cpu_seconds) == (size, cpu)
    assert engine.resume(job_id).state == sj.RUNNING
    time.sleep(scaled(0.3))
    assert engine.status(job_id).output_bytes > size
    assert engine.resume(job_id).state == sj.RUNNING   # resuming a running job: a no-op
    engine.pause(job_id)
    assert engine.pause(job_id).state == sj.PAUSED     # pausing a paused one: likewise
    assert engine.stop(job_id, grace=1).state == sj.STOPPED   # stopping a paused job works
    with pytest.raises(sj.FailedPreconditionError):
        engine.pause(job_id)                            # an ended job cannot be paused


@contextlib.contextmanager
def engine_that_goes_away(state_dir=None, **config):
    """An engine whose server goes away afterwards without stopping its jobs.

    Yields (engine, state_dir, cgroup_root); reopen them with running_engine().
    """
    require_kernel()
    state_dir = state_dir or new_state_dir()
    root = f"steve-jobs-test-{uuid.uuid4().hex[:8]}"
    engine = sj.Engine(sj.EngineConfig(state_dir=state_dir, cgroup_root=root, **config)).open()
    try:
        yield engine, state_dir, root
    finally:
        engine.close()   # without stop_jobs: as a server that exits


@pytest.mark.kernel
def test_jobs_survive_an_engine_restart():
    with engine_that_goes_away() as (first, state_dir, root):
        done = first.start("tester", ["sh", "-c", "echo finished; exit 4"])
        first.wait(done, scaled(30))
        live = first.start("tester", ["sh", "-c", "echo started; sleep 1000"])
        for _ in first.follow(live):
            break
        first.pause(live)
    with running_engine(state_dir=state_dir, cgroup_root=root) as second:
        assert second.status(done).exit_code == 4
        assert b"".join(second.follow(done)) == b"finished\n"
        assert second.status(live).state == sj.PAUSED   # paused before the restart
        second.resume(live)
        assert second.read_output(live) == b"started\n"
        assert second.stop(live, grace=5).state == sj.STOPPED
        assert b"".join(second.follow(live)) == b"started\n"


@pytest.mark.kernel
def test_a_timeout_stops_the_job_and_holds_across_a_restart():
    with engine_that_goes_away(stop_grace=1.0) as (first, state_dir, root):
        quick = first.start("alice", ["sleep", "1000"], options=sj.JobOptions(timeout=0.5))
        st = first.wait(quick, scaled(30))
        assert (st.state, st.timed_out, st.options.timeout) == (sj.STOPPED, True, 0.5), st
        assert st.ended_at - st.created_at < scaled(10)
        later = first.start("alice", ["sleep", "1000"], options=sj.JobOptions(timeout=3))
        untimed = first.start("alice", ["sleep", "1000"])
        done = first.start("alice", ["true"], options=sj.JobOptions(timeout=1))
        first.wait(done, scaled(30))
    # Its deadline passes while no server runs: the next one acts on it at once.
    time.sleep(3)
    with running_engine(state_dir=state_dir, cgroup_root=root) as second:
        st = second.wait(later, scaled(30))
        assert (st.state, st.timed_out) == (sj.STOPPED, True), st
        assert second.status(quick).timed_out   # (recorded: after a restart too)
        assert second.status(untimed).state == sj.RUNNING
        assert not second.status(done).timed_out and second.status(done).exit_code == 0
        second.stop(untimed, grace=0)
    with pytest.raises(sj.InvalidArgumentError, match="timeout"):
        with running_engine() as engine:
            engine.start("alice", ["true"], options=sj.JobOptions(timeout=-1))


@pytest.mark.unit
@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("1.5m", 90),
                                           ("1h30m", 5400), ("2d", 172800), (" 10M ", 600)])
def test_durations_parse(text, seconds):
    assert sj.parse_duration(text) == seconds


@pytest.mark.unit
@pytest.mark.parametrize("text", ["", "0", "0s", "-5", "5x", "m", "1h-5m", "ten", "1e3"])
def test_bad_durations_are_one_clear_error(text):
    with pytest.raises(ValueError, match="invalid duration"):
        sj.parse_duration(text)


@pytest.mark.kernel
def test_a_jobs_files_outlive_it_until_it_is_removed():
    with engine_that_goes_away(workdir_size=1 * sj.MiB) as (first, state_dir, root):
        job = first.start("alice", ["sh", "-c", "mkdir src && echo built > src/out.bin && "
                                   "head -c 2M /dev/zero > big; echo $?"])
        first.wait(job, scaled(30))
        assert first.read_output(job).startswith(b"head: error writing")   # ENOSPC inside
        workdir = os.path.join(state_dir, "work", job)
    # After the job's end and a restart of the server, its files are where the host keeps
    # them, its uid's, within its folder's size.
    with running_engine(state_dir=state_dir, cgroup_root=root) as second:
        assert open(os.path.join(workdir, "src", "out.bin")).read() == "built\n"
        st = os.stat(os.path.join(workdir, "src", "out.bin"))
        assert st.st_uid == second._get(job).spec["uid"] != 0
        used = os.statvfs(workdir)
        assert (used.f_blocks - used.f_bfree) * used.f_frsize <= 1 * sj.MiB
        assert workdir in mounts_under(state_dir)
        second.remove(job)
        assert not os.path.exists(workdir) and workdir not in mounts_under(state_dir)


@pytest.mark.kernel
def test_the_working_folder_of_no_job_is_swept_at_start():
    """rm removes a job's record, then its files: a server that died between left files
    (and a tmpfs) of no job, which the next start removes; other jobs' stay."""
    with engine_that_goes_away() as (first, state_dir, root):
        gone, kept = (first.start("alice", ["sh", "-c", "echo x > f"]) for _ in range(2))
        first.wait(gone, scaled(30))
        first.wait(kept, scaled(30))
    shutil.rmtree(os.path.join(state_dir, "jobs", gone))   # as a rm cut short
    workdir = os.path.join(state_dir, "work", gone)
    assert workdir in mounts_under(state_dir)
    with running_engine(state_dir=state_dir, cgroup_root=root) as second:
        assert not os.path.exists(workdir) and workdir not in mounts_under(state_dir)
        assert os.path.exists(os.path.join(state_dir, "work", kept, "f"))
        assert [s.id for s in second.list()] == [kept]


@pytest.mark.kernel
def test_a_users_kept_files_are_bounded_by_the_files_quota_and_counted_by_retention():
    with running_engine(workdir_size=4 * sj.MiB, files_quota=3 * sj.MiB) as engine:
        full = engine.start("alice", ["sh", "-c", "head -c 3M /dev/zero > f"])
        engine.wait(full, scaled(30))
        with pytest.raises(sj.ResourceExhaustedError, match="files-quota") as refused:
            engine.start("alice", ["true"])
        assert refused.value.reason == "FILES_QUOTA"
        engine.wait(engine.start("bob", ["true"]), scaled(30))   # others are not held back
        # Retention counts the files: 3 MiB of them are over a 1 MiB budget of output.
        assert engine.prune(max_bytes=1 * sj.MiB) == [full]
        engine.wait(engine.start("alice", ["true"]), scaled(30))


@pytest.mark.kernel
def test_a_jobs_working_folders_are_mounted_where_nothing_else_sees_them(engine):
    """They live in the host's mount namespace, but in a folder that propagates no mount:
    other namespaces that share the host's mounts (systemd's services) do not get them."""
    job = engine.start("alice", ["true"])
    engine.wait(job, scaled(30))
    work = os.path.realpath(os.path.join(engine.config.state_dir, "work"))
    fields = {line.split()[4]: line.split(" - ")[0].split()[6:]
              for line in open("/proc/self/mountinfo")}
    assert fields[work] == [] and fields[os.path.join(work, job)] == [], fields   # private


@pytest.mark.kernel
def test_engine_refuses_a_state_dir_jobs_cannot_reach(tmp_path):
    require_kernel()
    hidden = tempfile.mkdtemp(prefix="steve-jobs-test-", dir="/var/tmp")   # mode 0700
    try:
        engine = sj.Engine(sj.EngineConfig(state_dir=os.path.join(hidden, "state"),
                                           cgroup_root="steve-jobs-test-unused"))
        with pytest.raises(sj.UnavailableError, match="not searchable"):
            engine.open()
    finally:
        shutil.rmtree(hidden)


@pytest.mark.kernel
def test_reopening_drops_starts_that_never_reached_a_supervisor():
    with engine_that_goes_away() as (engine, state_dir, root):
        kept = engine.start("tester", ["true"])
        engine.wait(kept, scaled(30))
    for name, age in (("old", sj.SPAWN_TIMEOUT + 60), ("new", sj.SPAWN_TIMEOUT - 1)):
        for sub in ("jobs", "work"):
            os.makedirs(os.path.join(state_dir, sub, name))
        then = time.time() - age
        os.utime(os.path.join(state_dir, "jobs", name), (then, then))
    opened = time.monotonic()
    with running_engine(state_dir=state_dir, cgroup_root=root) as engine:
        # "new" may be a start under way: its record was awaited (a second), then it went.
        assert time.monotonic() - opened >= 0.9
        assert [s.id for s in engine.list()] == [kept]
        for name in ("old", "new"):
            assert not os.path.exists(os.path.join(state_dir, "jobs", name))
            assert not os.path.exists(os.path.join(state_dir, "work", name))


@pytest.mark.kernel
def test_many_quick_jobs_all_report_their_exit(engine):
    ids = [engine.start("tester", ["sh", "-c", f"exit {i % 7}"]) for i in range(30)]
    statuses = [engine.wait(i, scaled(30)) for i in ids]
    assert [s.exit_code for s in statuses] == [i % 7 for i in range(30)]
    assert {s.state for s in statuses} == {sj.EXITED}


@pytest.mark.kernel
@pytest.mark.parametrize("memory", ["64M", "1G", "3G"])
def test_any_memory_limit_starts_from_a_warm_cgroup(engine, memory):
    status, out = run(engine, ["sh", "-c", "echo ok"],
                      limits=sj.Limits(memory=sj.parse_size(memory)))
    assert (status.state, status.exit_code, out) == (sj.EXITED, 0, b"ok\n"), status
    job_id = engine.start("tester", ["sleep", "30"], sj.Limits(memory=sj.parse_size(memory)))
    try:
        version, folder = engine._get(job_id).cgroup._dir("memory")
        name = "memory.limit_in_bytes" if version == 1 else "memory.max"
        assert int(sj.read_file(os.path.join(folder, name))) == sj.parse_size(memory)
    finally:
        engine.stop(job_id, grace=0)


@pytest.mark.kernel
def test_an_io_device_that_is_no_disk_is_refused_at_start(engine):
    for device in ("4095:4095", *(("8:0",) if not os.path.exists("/sys/dev/block/8:0") else ())):
        with pytest.raises(sj.InvalidArgumentError, match="io_device"):
            engine.start("tester", ["true"], sj.Limits(io_write_bps=1 << 20, io_device=device))


###############################################################################
# End-to-end tests: a real server process, real mutual TLS on loopback
###############################################################################

@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        if MUST_WORK:
            pytest.fail("openssl is needed to make test certificates")
        pytest.skip("no openssl")
    return make_cert_set(str(tmp_path_factory.mktemp("certs")))


@pytest.fixture(scope="session")
def other_ca_certs(tmp_path_factory):
    return make_cert_set(str(tmp_path_factory.mktemp("other-ca")), users=("mrarsenal:admin",))


def server_only(certs_dir):
    """What an operator puts on the job host: certs_dir without the keys that mint users
    and tokens (the server refuses to start beside them). A folder beside certs_dir."""
    if not os.path.exists(os.path.join(certs_dir, "ca.key")):
        return certs_dir
    target = certs_dir.rstrip("/") + ".server"
    if not os.path.isdir(target):
        os.makedirs(target + ".tmp", exist_ok=True)
        for name in ("ca.crt", "server.crt", "server.key", "jwt-signing.pub"):
            shutil.copy2(os.path.join(certs_dir, name), os.path.join(target + ".tmp", name))
        os.rename(target + ".tmp", target)
    return target


def copy_server_certs(certs_dir, to):
    """A copy of the server's files only, to change (keys written mode 0600)."""
    shutil.copytree(server_only(certs_dir), to)
    return to


class Server:
    """A real `steve_jobs.py server` process on a free loopback port."""

    def __init__(self, certs_dir, state_dir=None, cgroup_root=None, extra=(), prefix=()):
        self.certs = certs_dir                        # the clients'
        self.server_certs = server_only(certs_dir)    # the server's
        self.prefix = list(prefix)   # e.g. prlimit: how the operator starts it
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.state_dir = state_dir or new_state_dir()
        self.cgroup_root = cgroup_root or f"steve-jobs-test-{uuid.uuid4().hex[:8]}"
        self.extra = list(extra)
        self.proc = None
        self.log_path = os.path.join(self.state_dir, "server.log")

    def start(self):
        self.log = open(self.log_path, "ab")
        self.log_start = self.log.tell()   # a restarted server appends to the same log
        self.proc = subprocess.Popen(
            [*self.prefix, PYTHON, SCRIPT, "server", "--listen", self.address,
             "--certs", self.server_certs,
             "--state-dir", self.state_dir, "--cgroup-root", self.cgroup_root, *self.extra],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + scaled(30)
        while time.monotonic() < deadline:
            if "listening on" in self.read_log():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"server did not start:\n{self.read_log()}")

    def read_log(self):
        with open(self.log_path, "rb") as f:
            f.seek(getattr(self, "log_start", 0))
            return f.read().decode(errors="replace")

    def terminate(self, sig=signal.SIGTERM, timeout=scaled(30)):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout)
        if self.proc:
            self.log.close()
        return self.proc.returncode if self.proc else None

    def restart(self):
        """A new server process on the same state and cgroup root (a new port)."""
        self.terminate()
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        return self.start()

    def cleanup(self):
        """Stop every job this server's state knows of, then remove what is left (its
        egress firewall too, which outlives a server as its jobs do)."""
        self.terminate()
        with running_engine(state_dir=self.state_dir, cgroup_root=self.cgroup_root):
            pass   # opening re-adopts the jobs; closing with stop_jobs stops them
        remove_egress_firewall(self.state_dir)

    def __enter__(self):
        """`with Server(...) as srv:` starts it, and cleans up after it however the block
        ends, or if it does not start. (Inside, terminate() and restart() work as ever.)"""
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc):
        self.cleanup()


def serving(certs):
    """A Server for a fixture: started, then cleaned up."""
    require_kernel()
    with Server(certs, extra=["--stop-jobs-on-exit"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def server(certs):
    yield from serving(certs)


def cli(server, *args, user="mrarsenal", timeout=scaled(60), **kw):
    """Run the CLI as a user would; returns CompletedProcess with bytes stdout/stderr.
    Its stdin is /dev/null unless given (input=, stdin=)."""
    if "input" not in kw:
        kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([PYTHON, SCRIPT, "--server", server.address, "--certs", server.certs,
                           "--user", user, *args], capture_output=True, timeout=timeout, **kw)


def cli_json(server, *args, **kw):
    done = cli(server, "--json", *args, **kw)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def start_job(server, script, user="mrarsenal", network="", *flags):
    done = cli(server, "run", *(["--network", network] if network else []), *flags, script,
               user=user)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().strip()


@pytest.mark.e2e
def test_cli_run_prints_an_id_and_status_shows_the_job(server):
    job_id = start_job(server, "echo hi; exit 3")
    st = cli_json(server, "status", job_id)
    deadline = time.monotonic() + scaled(10)
    while st["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
        st = cli_json(server, "status", job_id)
    assert (st["state"], st["exit_code"], st["owner"]) == ("exited", 3, "mrarsenal")
    assert st["signal"] is None and st["output_bytes"] == 3 and st["limits"]["pids"] > 0
    assert st["argv"] == ["/bin/sh", "-c", "echo hi; exit 3"]
    text = cli(server, "status", job_id).stdout.decode()
    assert "state    exited" in text and "exit     3" in text


@pytest.mark.e2e
def test_cli_run_follow_streams_and_exits_with_the_job_code(server):
    done = cli(server, "run", "-f", "echo out; echo err >&2; exit 7")
    assert done.returncode == 7 and done.stdout == b"out\n"   # stdout and stderr apart
    assert done.stderr.startswith(b"job ") and done.stderr.endswith(b"\nerr\n")
    # (the id goes to stderr, never into the output bytes)


@pytest.mark.e2e
def test_cli_run_timeout_stops_the_job_and_status_says_so(server):
    done = cli(server, "run", "--timeout", "1s", "-f", "echo started; exec sleep 1000")
    assert done.returncode == 128 + 15 and done.stdout == b"started\n", done   # (SIGTERM)
    job_id = done.stderr.decode().split()[1]
    st = cli_json(server, "status", job_id)
    assert (st["state"], st["timed_out"], st["timeout_seconds"]) == ("stopped", True, 1.0)
    assert b"(reached: it was stopped)" in cli(server, "status", job_id).stdout
    for bad in ("0", "ten", "-1s"):
        refused = cli(server, "run", f"--timeout={bad}", "true")
        assert refused.returncode == 2 and b"invalid duration" in refused.stderr, refused
        assert refused.stderr.count(b"\n") <= 3   # (argparse's usage line, then ours)


@pytest.mark.e2e
def test_cli_run_rm_removes_the_job_and_its_files_once_its_output_has_come(server):
    done = cli(server, "run", "-f", "--rm", "echo hi > kept; cat kept; exit 3")
    assert done.returncode == 3 and done.stdout == b"hi\n", done   # every byte, its code
    job_id = done.stderr.decode().split()[1]
    gone = cli(server, "status", job_id)
    assert gone.returncode == 3 and gone.stderr.count(b"\n") == 1, gone   # NOT_FOUND
    for folder in ("jobs", "work"):
        assert not os.path.exists(os.path.join(server.state_dir, folder, job_id))
    for _ in range(2):   # its name is free again at once
        assert cli(server, "run", "-f", "--rm", "--name", "once", "true").returncode == 0
    # Without -f: kept for a late follower, then removed by the server itself.
    job_id = start_job(server, "echo late", "mrarsenal", "", "--rm")
    deadline = time.monotonic() + scaled(10)
    while cli(server, "output", job_id).stdout != b"late\n":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert cli_json(server, "status", job_id)["remove_when_ended"] is True
    deadline = time.monotonic() + sj.REMOVE_GRACE + scaled(10)
    while cli(server, "status", job_id).returncode != 3:
        assert time.monotonic() < deadline, "a run --rm job was not removed"
        time.sleep(0.2)
    assert not os.path.exists(os.path.join(server.state_dir, "work", job_id))


@pytest.mark.kernel
def test_a_remove_when_ended_job_waits_for_its_followers(engine):
    with unittest.mock.patch.object(sj, "REMOVE_GRACE", 0.3):
        job_id = engine.start("tester", ["true"], options=sj.JobOptions(remove=True))
        unsubscribe = engine.subscribe(job_id, lambda: None)   # (an output stream's)
        engine.wait(job_id, scaled(30))
        time.sleep(1.0)
        assert engine.status(job_id).options.remove   # still there: it is followed
        unsubscribe()
        deadline = time.monotonic() + scaled(10)
        while any(j.id == job_id for j in engine.list()):
            assert time.monotonic() < deadline, "not removed once nobody followed it"
            time.sleep(0.05)


@pytest.mark.e2e
def test_stats_and_status_show_a_running_jobs_usage_now(server):
    busy = start_job(server, "yes > /dev/null & yes > /dev/null & wait", user="alice")
    try:
        done = cli(server, "--json", "stats", "--no-stream", busy, user="alice")
        assert done.returncode == 0, done.stderr
        row = json.loads(done.stdout)
        assert row["job_id"] == busy and row["cpu_percent"] > 30, row   # (its limit: 1 core)
        assert 3 <= row["pids"] <= row["pids_limit"], row   # (sh and two yes)
        assert 0 < row["memory_bytes"] <= row["memory_limit_bytes"], row
        table = cli(server, "stats", "--no-stream", user="alice").stdout.decode()
        assert table.splitlines()[0].split()[:3] == ["JOB", "NAME", "CPU"], table
        assert busy[:12] in table   # (alice's running jobs, without an ID)
        shown = cli(server, "status", busy, user="alice").stdout.decode()
        assert re.search(r"usage    cpu=\S+ memory=\S+ pids=[3-9]", shown), shown
        assert cli(server, "stats", "--no-stream", "no-such-job",
                   user="alice").returncode == 3   # (NOT_FOUND, one line)
    finally:
        cli(server, "stop", "--grace", "0", busy, user="alice")


@pytest.mark.e2e
def test_cli_run_argv_without_shell_and_signal_exit_code(server):
    done = cli(server, "run", "-f", "--", "printf", "%s|", "a b", "$HOME")
    assert done.returncode == 0 and done.stdout == b"a b|$HOME|"
    killed = cli(server, "run", "-f", "kill -9 $$")
    assert killed.returncode == 128 + 9


@pytest.mark.e2e
def test_cli_output_is_binary_exact(server):
    script = "head -c 300000 /dev/urandom > blob; cat blob; sha256sum blob >&2"
    done = cli(server, "run", "-f", script)
    job_id = done.stderr.decode().split()[1]   # "job ID" on stderr
    out = cli(server, "output", job_id)
    assert out.stdout == done.stdout and len(out.stdout) == 300000   # stdout alone
    assert hashlib.sha256(out.stdout).hexdigest().encode() in out.stderr   # stderr apart


@pytest.mark.e2e
def test_cli_output_into_a_closed_pipe_ends_quietly(server):
    # `steve_jobs.py output ID | head -n 1`: the reader goes away early; the CLI must end
    # at once with code 0 and no traceback, like cat does.
    job_id = start_job(server, "seq 1 300000")
    while cli_json(server, "status", job_id)["state"] == "running":
        time.sleep(0.05)
    reader = subprocess.Popen(["head", "-n", "1"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    done = subprocess.run([PYTHON, SCRIPT, "--server", server.address, "--certs",
                           server.certs, "output", job_id], stdout=reader.stdin,
                          stderr=subprocess.PIPE, timeout=scaled(60))
    reader.stdin.close()
    assert reader.stdout.read() == b"1\n" and reader.wait(30) == 0
    assert done.returncode == 0 and done.stderr == b"", done.stderr


@pytest.mark.e2e
def test_cli_stream_from_a_late_follower_gets_everything(server):
    job_id = start_job(server, "for i in $(seq 1 40); do echo line $i; sleep 0.02; done")
    time.sleep(scaled(0.3))   # attach mid-run
    mid = cli(server, "stream", job_id)
    late = cli(server, "stream", job_id)   # after the end
    expected = b"".join(b"line %d\n" % i for i in range(1, 41))
    assert mid.returncode == 0 and mid.stdout == expected
    assert late.stdout == expected


@pytest.mark.e2e
def test_cli_stop_pause_resume_rm_and_list(server):
    job_id = start_job(server, "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done")
    assert cli_json(server, "pause", job_id)["state"] == "paused"
    assert cli_json(server, "resume", job_id)["state"] == "running"
    assert cli(server, "rm", job_id).returncode == 5           # FAILED_PRECONDITION: running
    st = cli_json(server, "stop", "--grace", "1", job_id)
    assert st["state"] == "stopped" and st["signal"] == 15
    assert cli_json(server, "stop", job_id) == st              # already ended: its status
    assert cli(server, "pause", job_id).returncode == 5         # FAILED_PRECONDITION: ended
    assert job_id in [j["job_id"] for j in cli_json(server, "list")]
    assert cli(server, "list").stdout.count(job_id.encode()) == 1
    assert cli_json(server, "rm", job_id) == {"removed": job_id}
    assert job_id not in [j["job_id"] for j in cli_json(server, "list")]
    assert cli(server, "status", job_id).returncode == 3        # NOT_FOUND


@pytest.mark.e2e
def test_cli_errors_are_one_line_with_distinct_exit_codes(server):
    cases = [(("status", "no-such-job"), 3), (("run", "--cpu", "-1", "true"), 4),
             (("run", "--memory", "1", "true"), 4), (("run",), 2),
             (("run", "--workdir", "/tmp/build", "true"), 4)]
    for args, code in cases:
        done = cli(server, *args)
        assert done.returncode == code, (args, done.stderr)
        assert b"Traceback" not in done.stderr and done.stderr.count(b"\n") == 1, done.stderr
    unreachable = subprocess.run([PYTHON, SCRIPT, "--server", f"127.0.0.1:{free_port()}",
                                  "--certs", server.certs, "status", "x"],
                                 capture_output=True, timeout=scaled(60))
    assert unreachable.returncode == 8 and b"cannot reach the server" in unreachable.stderr
    nocerts = cli(server, "--certs", "/nonexistent", "status", "x")
    assert nocerts.returncode == 2 and b"Traceback" not in nocerts.stderr


@pytest.mark.e2e
def test_cli_ctrl_c_while_following_detaches_without_stopping(server):
    job_id = start_job(server, "echo started; sleep 1000")
    proc = subprocess.Popen([PYTHON, SCRIPT, "--server", server.address, "--certs",
                             server.certs, "stream", job_id],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"started\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=scaled(30))
    assert proc.returncode == 130 and b"keeps running" in err
    assert cli_json(server, "status", job_id)["state"] == "running"
    cli(server, "stop", "--grace", "0", job_id)


@pytest.mark.e2e
def test_another_users_job_is_not_found_word_for_word(server):
    job_id = start_job(server, "sleep 1000", user="mrarsenal")
    try:
        for args in (("status", job_id), ("output", job_id), ("stream", job_id),
                     ("stop", job_id), ("pause", job_id), ("rm", job_id)):
            theirs = cli(server, *args, user="alice")
            missing = cli(server, args[0], "00000000-0000-4000-8000-000000000000", user="alice")
            assert theirs.returncode == missing.returncode == 3, (args, theirs.stderr)
            assert theirs.stderr.replace(job_id.encode(), b"ID") == \
                missing.stderr.replace(b"00000000-0000-4000-8000-000000000000", b"ID")
        assert job_id not in cli(server, "list", user="alice").stdout.decode()
        assert cli(server, "list", "--all", user="alice").returncode == 6
        assert job_id in [j["job_id"] for j in cli_json(server, "list", "--all")]
        assert job_id in [j["job_id"] for j in cli_json(server, "list", "--all", user="rita")]
    finally:
        cli(server, "stop", "--grace", "0", job_id)


@pytest.mark.e2e
def test_server_refuses_to_start_without_certificates(tmp_path):
    require_kernel()
    srv = Server(str(tmp_path / "missing"))
    with pytest.raises(AssertionError, match="cannot read"):
        srv.start()
    assert srv.proc.returncode == 1
    log = srv.read_log().strip()
    assert "Traceback" not in log and len(log.splitlines()) == 1, log
    remove_state_dir(srv.state_dir)


@pytest.mark.e2e
def test_server_certificates_rotate_without_a_restart(certs, tmp_path):
    require_kernel()
    rotating = copy_server_certs(certs, tmp_path / "rotating")
    with Server(str(rotating)) as srv:
        srv.certs = certs   # the clients' folder
        def served_serial():
            out, _ = s_client(srv, certs, "-showcerts", *with_client_cert(certs))
            pem = out[out.index("-----BEGIN CERTIFICATE-----"):
                      out.index("-----END CERTIFICATE-----") + 25]
            done = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=pem.encode(),
                                  capture_output=True, check=True)
            return done.stdout.strip()
        before = served_serial()
        cert, key = forged_client_cert(certs, "steve-jobs server", server_auth=True,
                                       san="127.0.0.1")
        (rotating / "server.key").write_bytes(key)
        (rotating / "server.crt").write_bytes(cert)
        after = served_serial()
        assert before != after
        assert "TLS certificates reloaded" in srv.read_log()
        assert cli(srv, "list").returncode == 0   # clients still get in


@pytest.mark.e2e
def test_health_service_answers(server, certs):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    channel = user_channel(certs, server.address, "mrarsenal")
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="steve_jobs.v1.JobService"), timeout=scaled(10))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


@pytest.mark.e2e
def test_generated_stubs_are_current(tmp_path):
    pytest.importorskip("grpc_tools")
    subprocess.run([PYTHON, "-m", "grpc_tools.protoc", f"-I{HERE}", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", os.path.join(HERE, "jobs.proto")],
                   check=True)
    for name in ("jobs_pb2.py", "jobs_pb2_grpc.py"):
        with open(os.path.join(HERE, name)) as ours, open(tmp_path / name) as fresh:
            assert ours.read() == fresh.read(), f"{name} is stale: regenerate it"


@pytest.mark.e2e
def test_graceful_shutdown_ends_streams_and_keeps_jobs_running(certs):
    require_kernel()
    with Server(certs) as srv:
        job_id = start_job(srv, "echo before; sleep 1000")
        follower = subprocess.Popen([PYTHON, SCRIPT, "--server", srv.address, "--certs",
                                     certs, "stream", job_id],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert follower.stdout.readline() == b"before\n"
        assert srv.terminate() == 0
        _, err = follower.communicate(timeout=scaled(30))
        assert follower.returncode == 8 and b"shutting down" in err, err
        assert "server stopped" in srv.read_log()
        # The job outlived the server; a new server re-adopts it.
        srv.restart()
        assert cli_json(srv, "status", job_id)["state"] == "running"
        st = cli_json(srv, "stop", "--grace", "1", job_id)
        assert st["state"] == "stopped"
        assert cli(srv, "output", job_id).stdout == b"before\n"


###############################################################################
# Security tests: every way in
###############################################################################

def call(certs_dir, address, method, request, user="mrarsenal", token=None, **chan):
    """One RPC; returns (status code name, response or None). token: user's by default, ""
    for none; chan: user_channel()'s ca_dir, cert and key."""
    if token is None:
        token = open(os.path.join(certs_dir, f"{user}.jwt")).read().strip()
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    channel = user_channel(certs_dir, address, user, **chan)
    try:
        stub = pb_grpc.JobServiceStub(channel)
        if isinstance(request, list):   # a client-streaming call's messages
            request = iter(request)
        reply = getattr(stub, method)(request, metadata=metadata, timeout=scaled(20))
        if pb.DESCRIPTOR.services_by_name["JobService"].methods_by_name[method].server_streaming:
            reply = list(reply)   # (its status comes with its messages)
        return "OK", reply
    except grpc.RpcError as e:
        return e.code().name, None
    finally:
        channel.close()


def jwt_claims(certs_dir, user, **overrides):
    der = __import__("ssl").PEM_cert_to_DER_cert(open(os.path.join(certs_dir,
                                                                   f"{user}.crt")).read())
    now = int(time.time())
    claims = {"iss": "steve-jobs", "aud": "steve-jobs", "sub": user, "role": "admin",
              "iat": now, "exp": now + 600, "cnf": {"x5t#S256": sj.certificate_thumbprint(der)}}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def signed(certs_dir, claims, key=None, algorithm="ES256"):
    import jwt
    key = key or open(os.path.join(certs_dir, "jwt-signing.key"), "rb").read()
    return jwt.encode(claims, key, algorithm=algorithm)


def b64url(data):
    import base64
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rpc_requests():
    """One request for every RPC of the service."""
    some = "00000000-0000-4000-8000-000000000000"
    return {"Start": pb.StartRequest(argv=["true"]), "Stop": pb.StopRequest(job_id=some),
            "Status": pb.JobRef(job_id=some), "Output": pb.OutputRequest(job_id=some),
            "List": pb.ListRequest(), "Pause": pb.JobRef(job_id=some),
            "Resume": pb.JobRef(job_id=some), "Remove": pb.JobRef(job_id=some),
            "Wait": pb.JobRef(job_id=some), "Signal": pb.SignalRequest(job_id=some, signal=15),
            "Input": [pb.InputMessage(job_id=some, data=b"x")],
            "CopyOut": pb.CopyOutRequest(job_id=some),
            "CopyIn": [pb.CopyInMessage(job_id=some, data=b"x")],
            "StartWithFiles": [pb.StartWithFilesMessage(start=pb.StartRequest(argv=["true"]))],
            "Exec": [pb.ExecInput(job_id=some, argv=["true"])],
            "Events": pb.EventsRequest(job_id=some)}


@pytest.mark.security
def test_the_request_table_covers_every_rpc_of_the_service():
    methods = set(pb.DESCRIPTOR.services_by_name["JobService"].methods_by_name)
    assert methods == set(rpc_requests()) == set(sj.RPC_ACTIONS)


@pytest.mark.security
def test_adding_an_rpc_follows_the_checklist():
    """The README's checklist for a new RPC: its action, JOB_RPCS if it names a job, a
    JobService method, a request in rpc_requests() and its name in the README's API section."""
    service = pb.DESCRIPTOR.services_by_name["JobService"]
    readme = open(os.path.join(HERE, "README.md")).read()
    api = readme[readme.index("### For programs: the API"):readme.index("### What a job gets")]
    for method in service.methods:
        name = method.name
        assert sj.RPC_ACTIONS.get(name) in ("read", "write"), f"{name}: add it to RPC_ACTIONS"
        assert callable(getattr(sj.JobService, name, None)), f"{name}: add JobService.{name}"
        assert name in rpc_requests(), f"{name}: add a request to rpc_requests()"
        assert re.search(rf"\b{name}\b", api), f"{name}: name it in the README's API section"
        names_a_job = (method.input_type.name in ("JobRef", f"{name}Request") and
                       "job_id" in method.input_type.fields_by_name)
        if names_a_job and not method.client_streaming:   # Input names it in its first message
            assert name in sj.JOB_RPCS, f"{name}: add it to JOB_RPCS"


@pytest.mark.unit
def test_the_state_and_view_numbers_are_jobs_protos():
    """STATE_TO_PB and VIEW_SUMMARY are written out so that the CLI needs no protobuf."""
    assert sj.STATE_TO_PB == {state: pb.State.Value(f"STATE_{state.upper()}")
                              for state in sj.STATE_TO_PB}
    assert set(pb.State.keys()) - {"STATE_UNSPECIFIED"} == \
        {f"STATE_{state.upper()}" for state in sj.STATE_TO_PB}
    assert sj.VIEW_SUMMARY == pb.VIEW_SUMMARY


@pytest.mark.security
def test_every_rpc_refuses_a_missing_token_a_wrong_user_and_a_wrong_role(server, certs):
    jobs_before = len(cli_json(server, "list", "--all"))
    alice_token_with_admin_cert = open(os.path.join(certs, "alice.jwt")).read().strip()
    for method, request in rpc_requests().items():
        assert call(certs, server.address, method, request, token="")[0] == "UNAUTHENTICATED"
        wrong_user = call(certs, server.address, method, request,
                          token=alice_token_with_admin_cert, user="mrarsenal")
        assert wrong_user[0] == "UNAUTHENTICATED", method
        if sj.RPC_ACTIONS[method] == "write":   # the reader role may not write
            assert call(certs, server.address, method, request, user="rita")[0] == \
                "PERMISSION_DENIED", method
    assert len(cli_json(server, "list", "--all")) == jobs_before   # nothing started


BAD_TOKENS = {
    "malformed": lambda c: "not.a.jwt",
    "expired": lambda c: signed(c, jwt_claims(c, "mrarsenal", iat=int(time.time()) - 7200,
                                              exp=int(time.time()) - 3600)),
    "other key": lambda c: signed(c, jwt_claims(c, "mrarsenal"), key=_other_ec_key()),
    "alg none": lambda c: (b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode()) + "." +
                           b64url(json.dumps(jwt_claims(c, "mrarsenal")).encode()) + "."),
    "HS256 with the public key": lambda c: _hs256_with_public_key(c),
    "wrong aud": lambda c: signed(c, jwt_claims(c, "mrarsenal", aud="someone-else")),
    "wrong iss": lambda c: signed(c, jwt_claims(c, "mrarsenal", iss="someone-else")),
    "no exp": lambda c: signed(c, jwt_claims(c, "mrarsenal", exp=None)),
    "no role": lambda c: signed(c, jwt_claims(c, "mrarsenal", role=None)),
    "unknown role": lambda c: signed(c, jwt_claims(c, "mrarsenal", role="root")),
    "user A's token with B's certificate": lambda c: open(os.path.join(c, "alice.jwt")).read(),
    "cnf thumbprint mismatch": lambda c: signed(c, jwt_claims(
        c, "mrarsenal", cnf={"x5t#S256": b64url(b"\0" * 32)})),
    "no cnf": lambda c: signed(c, jwt_claims(c, "mrarsenal", cnf=None)),
    "role not a string": lambda c: signed(c, jwt_claims(c, "mrarsenal", role=["admin"])),
    "role an object": lambda c: signed(c, jwt_claims(c, "mrarsenal", role={"admin": 1})),
    "sub not a string": lambda c: signed(c, jwt_claims(c, "mrarsenal", sub=["mrarsenal"])),
    "cnf thumbprint a list": lambda c: signed(c, jwt_claims(
        c, "mrarsenal", cnf={"x5t#S256": ["x"]})),
}


def _other_ec_key():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def _hs256_with_public_key(certs_dir):
    import hmac
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(jwt_claims(certs_dir, "mrarsenal")).encode())
    secret = open(os.path.join(certs_dir, "jwt-signing.pub"), "rb").read()
    sig = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64url(sig)}"


@pytest.mark.security
@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
def test_bad_tokens_are_unauthenticated_and_start_nothing(server, certs, kind):
    before = len(cli_json(server, "list", "--all"))
    token = BAD_TOKENS[kind](certs).strip()
    code, _ = call(certs, server.address, "Start", pb.StartRequest(argv=["true"]), token=token)
    assert code == "UNAUTHENTICATED"
    assert len(cli_json(server, "list", "--all")) == before


@pytest.mark.security
def test_a_good_token_made_the_same_way_is_accepted(server, certs):
    # The control for the table above: the test's own token factory does make valid tokens.
    token = signed(certs, jwt_claims(certs, "mrarsenal"))
    code, reply = call(certs, server.address, "List", pb.ListRequest(), token=token)
    assert code == "OK"


@pytest.mark.security
def test_user_role_limits_root_and_caps(server, certs):
    for request in (pb.StartRequest(argv=["id"], as_root=True),
                    pb.StartRequest(argv=["true"], limits=pb.Limits(memory_bytes=8 * sj.GiB)),
                    pb.StartRequest(argv=["true"], limits=pb.Limits(cpu=2))):
        assert call(certs, server.address, "Start", request, user="alice")[0] == \
            "PERMISSION_DENIED"
    # The host's network reaches the server's port and the host's loopback services.
    assert call(certs, server.address, "Start", pb.StartRequest(argv=["true"],
                host_network=True), user="alice")[0] == "PERMISSION_DENIED"
    assert call(certs, server.address, "Start", pb.StartRequest(argv=["true"],
                rw_host=True), user="alice")[0] == "PERMISSION_DENIED"
    code, st = call(certs, server.address, "Start", pb.StartRequest(argv=["id", "-u"],
                                                                   as_root=True))
    assert code == "OK" and st.as_root   # an admin may
    time.sleep(0.5)
    assert cli(server, "output", st.job_id).stdout == b"0\n"


@pytest.mark.security
def test_connections_without_a_valid_client_certificate_are_refused(server, certs,
                                                                    other_ca_certs):
    req = pb.ListRequest()
    # No client certificate at all.
    creds = grpc.ssl_channel_credentials(root_certificates=open(f"{certs}/ca.crt", "rb").read())
    channel = grpc.secure_channel(server.address, creds)
    with pytest.raises(grpc.RpcError) as e:
        pb_grpc.JobServiceStub(channel).List(req, timeout=scaled(10))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
    # A certificate (and a token for it) from another CA.
    token = open(f"{other_ca_certs}/mrarsenal.jwt").read().strip()
    assert call(other_ca_certs, server.address, "List", req, token=token,
                ca_dir=certs)[0] == "UNAVAILABLE"
    # An expired certificate from the right CA.
    cert, key = forged_client_cert(certs, "mrarsenal", expired=True)
    assert call(certs, server.address, "List", req, cert=cert, key=key)[0] == "UNAVAILABLE"


def forged_client_cert(certs_dir, cn, expired=False, server_auth=False, san=None):
    """A certificate signed by the test CA, with the given defects. Returns (pem, key pem)."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    ca_key = serialization.load_pem_private_key(open(f"{certs_dir}/ca.key", "rb").read(), None)
    ca = x509.load_pem_x509_certificate(open(f"{certs_dir}/ca.crt", "rb").read())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = ((now - datetime.timedelta(days=30), now - datetime.timedelta(days=1))
                  if expired else (now - datetime.timedelta(days=1),
                                   now + datetime.timedelta(days=30)))
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(ca.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.SERVER_AUTH if server_auth
                    else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if san:
        import ipaddress
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(san))]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@pytest.mark.security
def test_a_client_certificate_cannot_serve_as_the_server_certificate(certs, tmp_path):
    require_kernel()
    # A server whose certificate has the right SAN but only clientAuth key usage.
    bad = copy_server_certs(certs, tmp_path / "bad-server")
    cert, key = forged_client_cert(certs, "steve-jobs server", san="127.0.0.1")
    (bad / "server.crt").write_bytes(cert)
    (bad / "server.key").write_bytes(key)
    with Server(str(bad)) as srv:
        assert call(certs, srv.address, "List", pb.ListRequest())[0] == "UNAVAILABLE"


def s_client(server, certs, *args):
    """openssl s_client against the server, stdin closed; returns (output, exit code)."""
    done = subprocess.run(
        ["openssl", "s_client", "-connect", server.address, "-servername", "localhost",
         "-CAfile", f"{certs}/ca.crt", "-alpn", "h2", *args],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=scaled(30))
    return (done.stdout + done.stderr).decode(errors="replace"), done.returncode


def with_client_cert(certs):
    return ["-cert", f"{certs}/mrarsenal.crt", "-key", f"{certs}/mrarsenal.key"]


@pytest.mark.security
@pytest.mark.parametrize("args", [
    ("-tls1", "-cipher", "DEFAULT:@SECLEVEL=0"),      # the client would; the server must not
    ("-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"),
    ("-tls1_2", "-cipher", "AES256-SHA256"),           # no forward secrecy, no AEAD
    ("-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"),
])
def test_tls_old_versions_and_weak_suites_are_refused(server, certs, args):
    out, code = s_client(server, certs, *args, *with_client_cert(certs))
    assert code != 0 and "Cipher is (NONE)" in out, out


@pytest.mark.security
@pytest.mark.parametrize("args, cipher", [
    (("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"), "ECDHE-ECDSA-AES128-GCM-SHA256"),
    (("-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384"), "ECDHE-ECDSA-AES256-GCM-SHA384"),
    (("-tls1_3",), "TLS_AES_"),
])
def test_tls_strong_suites_are_accepted(server, certs, args, cipher):
    out, code = s_client(server, certs, *args, *with_client_cert(certs))
    assert code == 0 and f"Cipher is {cipher}" in out and "ALPN protocol: h2" in out, out


def tls_first_bytes(server, certs, version, client_cert):
    """Handshake with Python's ssl, send the HTTP/2 preface, return what the server says."""
    import ssl
    ctx = ssl.create_default_context(cafile=f"{certs}/ca.crt")
    ctx.minimum_version = ctx.maximum_version = version
    ctx.set_alpn_protocols(["h2"])
    if client_cert:
        ctx.load_cert_chain(f"{certs}/mrarsenal.crt", f"{certs}/mrarsenal.key")
    with socket.create_connection(("127.0.0.1", server.port), timeout=scaled(10)) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            # TLS 1.3 ends the client's side of the handshake before the server has judged
            # the certificate: only reading from the connection tells the outcome.
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            return tls.recv(1024)


@pytest.mark.security
@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_no_tls_session_carries_data_without_a_client_certificate(server, certs, version):
    import ssl
    version = getattr(ssl.TLSVersion, version)
    assert tls_first_bytes(server, certs, version, client_cert=True)   # the control
    with pytest.raises((ssl.SSLError, ConnectionError)):
        data = tls_first_bytes(server, certs, version, client_cert=False)
        if not data:
            raise ConnectionError("closed without a word")


###############################################################################
# Restarts, faults, retention and load
###############################################################################

@pytest.mark.faults
def test_retention_removes_old_then_oldest_ended_jobs_never_running_ones(engine):
    for st in engine.list():   # earlier tests' jobs would blur the byte count
        if st.state in sj.ENDED_STATES:
            engine.remove(st.id)
    ids = []
    for i in range(4):   # one after the other: they end in this order
        ids.append(engine.start("tester", ["head", "-c", str(1000 * (i + 1)), "/dev/zero"]))
        engine.wait(ids[-1], scaled(30))
    live = engine.start("tester", ["sleep", "1000"])
    try:
        ended = [engine.status(i).ended_at for i in ids]
        now = ended[0] + 100
        max_age = 100 - (ended[1] - ended[0]) / 2   # only the first is older than this
        assert engine.prune(max_age=max_age, now=now) == [ids[0]]
        assert not os.path.exists(os.path.join(engine.config.state_dir, "jobs", ids[0]))
        assert not os.path.exists(os.path.join(engine.config.state_dir, "work", ids[0]))
        # 2,000 + 3,000 + 4,000 bytes left, and a few 24-byte index records each; keep at
        # most 7,300: the oldest goes.
        assert engine.prune(max_bytes=7300) == [ids[1]]
        assert {s.id for s in engine.list()} == {ids[2], ids[3], live}
        assert engine.prune(max_age=0, max_bytes=0) == [ids[2], ids[3]]
        assert engine.status(live).state == sj.RUNNING
    finally:
        engine.stop(live, grace=0)


@pytest.mark.faults
def test_a_job_that_ends_while_no_server_runs_keeps_its_result(certs):
    require_kernel()
    with Server(certs) as srv:
        job_id = start_job(srv, "echo begin; sleep 1; echo end; exit 5")
        srv.terminate(signal.SIGKILL)   # a crash, not a shutdown
        time.sleep(scaled(2))                   # the job ends while nothing serves
        srv.restart()
        st = cli_json(srv, "status", job_id)
        assert (st["state"], st["exit_code"]) == ("exited", 5)
        assert cli(srv, "stream", job_id).stdout == b"begin\nend\n"


@pytest.mark.faults
def test_a_job_whose_supervisor_died_is_reported_unknown_and_cleaned_up():
    with engine_that_goes_away() as (first, state_dir, root):
        job_id = first.start("tester", ["sleep", "1000"])
        shim_pid, uid = first._get(job_id).shim["shim_pid"], first.status(job_id).uid
    os.kill(shim_pid, signal.SIGKILL)
    time.sleep(0.2)
    with running_engine(state_dir=state_dir, cgroup_root=root) as second:
        st = second.status(job_id)
        assert st.state == sj.UNKNOWN and "unknown" in st.error
        assert not pids_of_uid(uid)                       # the orphaned job was killed
        assert not sj.JobCgroup.names(second.layout, root)   # and its cgroup swept


MISBEHAVING = {
    "closes its stdout": ("exec 1>&- 2>&-; sleep 0.2; exit 3", sj.EXITED, 3),
    "writes binary garbage": ("head -c 1000000 /dev/urandom", sj.EXITED, 0),
    # The shell gives up (exit 2, "Cannot fork") at the pids limit.
    "forks 10,000 processes": ("for i in $(seq 10000); do sleep 5 & done", sj.EXITED, 2),
    "allocates past its limit": ("python3 -c \"b = b'x' * (1 << 30)\"", sj.OOM_KILLED, None),
    "setsid and double-forks": ("setsid sh -c '(sleep 1000 &)'; echo done", sj.EXITED, 0),
}


@pytest.mark.faults
@pytest.mark.parametrize("kind", sorted(MISBEHAVING))
def test_misbehaving_jobs_are_contained_and_reported(engine, kind):
    script, state, code = MISBEHAVING[kind]
    status, out = sh(engine, script, limits=sj.Limits(memory=64 * sj.MiB, pids=64))
    assert status.state == state, (status, out[-300:])
    if code is not None:
        assert status.exit_code == code
    assert not pids_of_uid(status.uid)
    assert engine.status(engine.start("tester", ["true"])).state in (sj.RUNNING, sj.EXITED)


@pytest.mark.faults
def test_a_job_that_ignores_sigterm_is_killed_after_the_grace(engine):
    job_id = engine.start("tester", ["sh", "-c", "trap '' TERM; echo ready; sleep 1000 & wait"])
    next(engine.follow(job_id))
    t = time.monotonic()
    st = engine.stop(job_id, grace=0.5)
    assert st.state == sj.STOPPED and st.signal == signal.SIGKILL
    assert time.monotonic() - t >= 0.5


@pytest.mark.faults
def test_a_fast_writer_is_not_slowed_by_a_reader_that_stops_reading(server, certs):
    job_id = start_job(server, "head -c 200000000 /dev/zero")
    channel = user_channel(certs, server.address, "mrarsenal")
    stalled = pb_grpc.JobServiceStub(channel).Output(
        pb.OutputRequest(job_id=job_id, follow=True), metadata=bearer(certs))
    next(stalled)   # take one chunk, then stop reading
    deadline = time.monotonic() + scaled(60)
    st = cli_json(server, "status", job_id)
    while st["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        st = cli_json(server, "status", job_id)
    assert st["state"] == "exited" and st["output_bytes"] == 200_000_000
    # Another reader gets everything meanwhile; then the stalled one disconnects.
    assert len(cli(server, "output", job_id).stdout) == 200_000_000
    stalled.cancel()
    channel.close()


@pytest.mark.faults
def test_many_clients_and_followers_with_disconnects_lose_nothing_and_leak_nothing(certs):
    require_kernel()
    import random
    with Server(certs, extra=["--stop-jobs-on-exit"]) as srv:
        md = bearer(certs)
        writer = "for i in $(seq 1 20); do echo \"$i $(head -c 300 /dev/zero | tr '\\0' x)\"; " \
                 "sleep 0.05; done"
        expected = b"".join(b"%d %s\n" % (i, b"x" * 300) for i in range(1, 21))

        def fds():
            return len(os.listdir(f"/proc/{srv.proc.pid}/fd"))

        def threads():
            return len(os.listdir(f"/proc/{srv.proc.pid}/task"))

        def rss_mb():
            with open(f"/proc/{srv.proc.pid}/status") as f:
                return int(next(l for l in f if l.startswith("VmRSS:")).split()[1]) / 1024

        warm = cli(srv, "run", "-f", "true")   # let the server reach its steady state
        assert warm.returncode == 0
        before = (fds(), threads(), rss_mb())
        job_ids, errors, results = [], [], []
        lock = threading.Lock()

        def client(n):
            channel = user_channel(certs, srv.address, "mrarsenal")
            stub = pb_grpc.JobServiceStub(channel)
            try:
                for _ in range(10):   # 20 clients x 10 jobs = 200 jobs
                    st = stub.Start(pb.StartRequest(argv=["sh", "-c", writer]), metadata=md,
                                    timeout=scaled(60))
                    with lock:
                        job_ids.append(st.job_id)
                for _ in range(50):   # 20 x 50 = 1,000 followers
                    with lock:
                        job_id = random.choice(job_ids)
                    stream = stub.Output(pb.OutputRequest(job_id=job_id, follow=True),
                                         metadata=md, timeout=scaled(120))
                    if random.random() < 0.3:   # a follower that disconnects mid-stream
                        next(stream, None)
                        stream.cancel()
                        continue
                    data = b"".join(c.data for c in stream)
                    with lock:
                        results.append(data)
            except Exception as e:
                errors.append(e)
            finally:
                channel.close()

        threads_ = [threading.Thread(target=client, args=(n,)) for n in range(20)]
        for t in threads_:
            t.start()
        for t in threads_:
            t.join(300)
        assert not errors, errors[:3]
        assert len(job_ids) == 200 and results
        assert all(r == expected for r in results), "a follower that stayed lost bytes"
        # Afterwards: every job ended and left nothing; the server holds what it held.
        deadline = time.monotonic() + scaled(60)
        while any(j["state"] == "running" for j in cli_json(srv, "list")):
            assert time.monotonic() < deadline
            time.sleep(0.5)
        time.sleep(1)
        assert fds() <= before[0] + 2, (before, fds())
        assert threads() <= before[1] + 16, (before, threads())   # pools may have grown
        assert rss_mb() <= before[2] + 64, (before, rss_mb())   # back near where it was
        layout = sj.CgroupLayout.detect()
        assert len(sj.JobCgroup.names(layout, srv.cgroup_root)) <= sj.WARM_SHIMS   # warm ones


@pytest.mark.faults
def test_followers_at_different_offsets_sharing_chunks_each_get_their_exact_bytes(server):
    # Followers of one job share the server's cached chunks: each must still get exactly the
    # bytes from its own offset on, across chunk boundaries and a pause in the output.
    script = "seq 1 300000; sleep 0.5; seq 300001 600000"
    expected = subprocess.run(["sh", "-c", script], capture_output=True, check=True).stdout
    md = bearer(server.certs)
    job_id = start_job(server, script)
    offsets = [0, 0, 0, 1, 7, 100_000, sj.CHUNK - 1, sj.CHUNK, sj.CHUNK + 1, 3 * sj.CHUNK,
               len(expected) - 1, len(expected)]
    results, errors = {}, []

    def follow(i, offset):
        channel = user_channel(server.certs, server.address, "mrarsenal")
        try:
            stream = pb_grpc.JobServiceStub(channel).Output(
                pb.OutputRequest(job_id=job_id, offset=offset, follow=True), metadata=md,
                timeout=scaled(60))
            results[i] = b"".join(c.data for c in stream)
        except Exception as e:
            errors.append(e)
        finally:
            channel.close()

    threads = [threading.Thread(target=follow, args=item) for item in enumerate(offsets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors[:3]
    for i, offset in enumerate(offsets):
        assert results[i] == expected[offset:], (offset, len(results[i]))


@pytest.mark.faults
def test_random_malformed_requests_get_a_clear_status_and_never_hurt_the_server(server, certs):
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings, strategies as st
    channel = user_channel(certs, server.address, "alice")
    stub = pb_grpc.JobServiceStub(channel)
    md = bearer(certs, "alice")
    clear = {"OK", "INVALID_ARGUMENT", "PERMISSION_DENIED", "NOT_FOUND", "FAILED_PRECONDITION"}
    started = []

    @settings(max_examples=80, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(argv=st.lists(st.text(max_size=40), max_size=4) | st.just(["x" * 200_000]),
           cpu=st.floats(), memory=st.integers(0, 2**64 - 1), pids=st.integers(0, 2**32 - 1),
           io=st.integers(0, 2**64 - 1), device=st.text(max_size=12),
           env=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
           workdir=st.text(max_size=20), job_id=st.text(max_size=40),
           offset=st.integers(0, 2**64 - 1), grace=st.floats())
    def check(argv, cpu, memory, pids, io, device, env, workdir, job_id, offset, grace):
        calls = [
            ("Start", pb.StartRequest(argv=argv, env=env, workdir=workdir, limits=pb.Limits(
                cpu=cpu, memory_bytes=memory, pids=pids, io_read_bps=io, io_write_bps=io,
                io_device=device))),
            ("Status", pb.JobRef(job_id=job_id)),
            ("Stop", pb.StopRequest(job_id=job_id, grace_seconds=grace)),
            ("Output", pb.OutputRequest(job_id=job_id, offset=offset)),
        ]
        for method, request in calls:
            try:
                reply = getattr(stub, method)(request, metadata=md, timeout=scaled(30))
                if method == "Output":
                    list(reply)
                if method == "Start":
                    started.append(reply.job_id)
            except grpc.RpcError as e:
                assert e.code().name in clear, (method, e.code(), e.details())

    try:
        check()
        # Bytes that are not even a valid message (invalid UTF-8 in a string field).
        raw = channel.unary_unary("/steve_jobs.v1.JobService/Start")
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\x0a\x02\xff\xfe", metadata=md, timeout=scaled(10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed" in e.value.details() and "protobuf" not in e.value.details()
        assert cli(server, "list").returncode == 0   # still healthy
    finally:
        for job_id in started:
            with contextlib.suppress(grpc.RpcError):
                stub.Stop(pb.StopRequest(job_id=job_id, grace_seconds=0), metadata=md, timeout=scaled(30))
        channel.close()


@pytest.mark.faults
def test_a_server_killed_under_load_loses_nothing_after_a_restart(certs):
    require_kernel()
    with Server(certs, extra=["--stop-jobs-on-exit"]) as srv:
        md = bearer(certs)
        writer = "for i in $(seq 1 30); do echo line $i; sleep 0.1; done"
        expected = b"".join(b"line %d\n" % i for i in range(1, 31))
        job_ids, lock, followers_done, following = [], threading.Lock(), [], []

        def client():
            channel = user_channel(certs, srv.address, "mrarsenal")
            stub = pb_grpc.JobServiceStub(channel)
            try:
                for _ in range(5):
                    st = stub.Start(pb.StartRequest(argv=["sh", "-c", writer]), metadata=md,
                                    timeout=scaled(60))
                    with lock:
                        job_ids.append(st.job_id)
                stream = stub.Output(pb.OutputRequest(job_id=st.job_id, follow=True),
                                     metadata=md, timeout=scaled(120))
                following.append(st.job_id)
                try:
                    for _ in stream:
                        pass
                except grpc.RpcError as e:   # the server died under this follower
                    followers_done.append(e.code())
            finally:
                channel.close()

        clients = [threading.Thread(target=client) for _ in range(10)]
        for t in clients:
            t.start()
        deadline = time.monotonic() + scaled(60)   # every client started its jobs, follows
        while len(following) < len(clients) and time.monotonic() < deadline:
            time.sleep(0.05)
        srv.terminate(signal.SIGKILL)
        for t in clients:
            t.join(120)
        assert followers_done and all(c == grpc.StatusCode.UNAVAILABLE for c in followers_done)
        srv.restart()
        listed = {j["job_id"] for j in cli_json(srv, "list")}
        assert len(job_ids) >= 10 and set(job_ids) <= listed
        for job_id in listed:   # every job that started goes on to the end, nothing lost
            assert cli(srv, "stream", job_id).stdout == expected, job_id
            st = cli_json(srv, "status", job_id)
            assert (st["state"], st["exit_code"]) == ("exited", 0)
        layout = sj.CgroupLayout.detect()
        assert len(sj.JobCgroup.names(layout, srv.cgroup_root)) <= sj.WARM_SHIMS


###############################################################################
# Fault tests: full disks, dead supervisors, shared state folders, file handles,
# stream memory (real kernel and real servers, as root)
###############################################################################

@contextlib.contextmanager
def small_filesystem(size):
    """A tmpfs of size (e.g. '64m') mounted on a fresh folder; unmounted afterwards."""
    require_kernel()
    path = tempfile.mkdtemp(prefix="steve-jobs-test-fs-", dir="/var/tmp")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)
        os.rmdir(path)


def job_folders(folder):
    """The jobs' folders in folder (jobs/ or work/), not the spare ones made ahead."""
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


@contextlib.contextmanager
def stopping_leftovers():
    """Yields a list of (state_dir, cgroup_root); if the block fails, the jobs they still
    hold are stopped and their cgroups removed, so a failing test leaves nothing running."""
    places = []
    try:
        yield places
    except BaseException:
        for state_dir, root in places:
            with contextlib.suppress(Exception):
                with running_engine(state_dir=state_dir, cgroup_root=root):
                    pass
        raise


@pytest.mark.faults
def test_a_full_state_disk_jams_no_job_and_no_restart():
    with small_filesystem("64m") as fs, stopping_leftovers() as leftovers:
        state_dir = os.path.join(fs, "state")
        with engine_that_goes_away(state_dir=state_dir) as (engine, _, root):
            leftovers.append((state_dir, root))
            sleeper = engine.start("tester", ["sleep", "1000"])
            later = engine.start("tester", ["sh", "-c", "sleep 1; echo done; exit 3"])
            filler = engine.start("tester", ["head", "-c", "200M", "/dev/zero"])
            st = engine.wait(filler, scaled(60))
            assert (st.state, st.exit_code, st.output_truncated) == (sj.EXITED, 0, True), st
            st = engine.wait(later, scaled(30))   # its "done" found no room; its end did
            assert (st.state, st.exit_code) == (sj.EXITED, 3), st
            jobs_before = sorted(os.listdir(os.path.join(state_dir, "jobs")))
            with pytest.raises(sj.ResourceExhaustedError, match=f"{state_dir} is full"):
                engine.start("tester", ["true"])
            assert sorted(os.listdir(os.path.join(state_dir, "jobs"))) == jobs_before
            assert job_folders(os.path.join(state_dir, "work")) == jobs_before   # kept
            # A supervisor killed while the disk is full: its job's end is recorded too.
            os.kill(engine._get(sleeper).shim["shim_pid"], signal.SIGKILL)
            assert engine.wait(sleeper, scaled(10)).state == sj.UNKNOWN
        # A restart on the full disk: serves every job.
        with running_engine(state_dir=state_dir, cgroup_root=root) as second:
            assert second.status(later).exit_code == 3
            assert second.status(sleeper).state == sj.UNKNOWN
            assert second.stop(sleeper).state == sj.UNKNOWN
            assert len(second.read_output(filler)) == sj.CHUNK
            second.remove(sleeper)
            second.remove(filler)   # room again: starts work again
            st = second.wait(second.start("tester", ["sh", "-c", "echo back"]), scaled(30))
            assert st.exit_code == 0 and st.output_bytes == 5


@pytest.mark.faults
def test_a_start_below_the_free_space_reserve_is_refused_and_leaves_nothing():
    with running_engine(min_free=1 << 60) as engine:
        with pytest.raises(sj.ResourceExhaustedError, match="is full"):
            engine.start("tester", ["true"])
        for sub in ("jobs", "work"):
            assert job_folders(os.path.join(engine.config.state_dir, sub)) == []
        assert engine.list() == []


@pytest.mark.faults
def test_the_working_folder_is_a_bounded_tmpfs():
    with running_engine(workdir_size=4 * sj.MiB) as engine:
        st, out = sh(engine, "head -c 8M /dev/zero > big; echo $?; df -k . | tail -1")
        lines = out.decode().splitlines()
        assert lines[0] != "0" and "tmpfs" in lines[-1], out
        assert int(lines[-1].split()[1]) == 4096   # 4 MiB, in KiB
        workdir = os.path.join(engine.config.state_dir, "work", st.id)
        # Kept after the job, on the same tmpfs: the host's disk got nothing.
        assert os.stat(workdir).st_dev != os.stat(os.path.dirname(workdir)).st_dev
        assert sj.folder_bytes(workdir) <= 4 * sj.MiB


@pytest.mark.faults
def test_a_killed_supervisor_is_noticed_at_once_and_its_job_cleaned_up(engine):
    job_id = engine.start("tester", ["sleep", "1000"])
    job = engine._get(job_id)
    uid, dirs = job.spec["uid"], job_cgroup_dirs(engine, job_id)
    os.kill(job.shim["shim_pid"], signal.SIGKILL)
    st = engine.wait(job_id, scaled(5))
    assert st.state == sj.UNKNOWN and "supervisor" in st.error, st
    assert not pids_of_uid(uid) and not [d for d in dirs if os.path.exists(d)]
    assert engine.stop(job_id, grace=0).state == sj.UNKNOWN   # at once, no error
    engine.remove(job_id)


@pytest.mark.faults
def test_a_second_engine_on_the_same_state_folder_is_refused_and_harms_nothing():
    with running_engine() as first:
        second = sj.Engine(sj.EngineConfig(state_dir=first.config.state_dir,
                                           cgroup_root=first.config.cgroup_root))
        with pytest.raises(sj.UnavailableError, match=f"another server \\(pid {os.getpid()}\\)"):
            second.open()
        # The first one's warm supervisors were not swept: its next jobs run normally.
        ids = [first.start("tester", ["sh", "-c", "exit 7"]) for _ in range(3)]
        assert [first.wait(i, scaled(30)).exit_code for i in ids] == [7] * 3


@pytest.mark.faults
def test_a_second_server_on_the_same_state_folder_exits_with_one_line(certs):
    require_kernel()
    with Server(certs) as first:
        second = Server(certs, state_dir=first.state_dir, cgroup_root=first.cgroup_root)
        try:
            second.log_path = os.path.join(first.state_dir, "second.log")
            with pytest.raises(AssertionError, match="another server"):
                second.start()
            assert second.proc.wait(30) == 1
            log = second.read_log().strip()
            assert f"pid {first.proc.pid}" in log and "Traceback" not in log, log
            assert len([line for line in log.splitlines() if "another server" in line]) == 1
            job_id = start_job(first, "exit 5")
            assert cli_json(first, "stop", job_id)["exit_code"] == 5
        finally:
            if second.proc:
                second.terminate(signal.SIGKILL)   # if it started after all: not its state


def hard_open_files_limit():
    import resource
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def raise_own_open_files_limit(n):
    """Let this test process hold n descriptors (at most its hard limit: raising that needs
    CAP_SYS_RESOURCE, which containers often withhold from root)."""
    import resource
    hard = hard_open_files_limit()
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


def at_a_1024_soft_limit():
    """How systemd starts a service by default: soft 1024, hard as high as allowed."""
    return ["prlimit", f"--nofile=1024:{hard_open_files_limit()}", "--"]


def server_rss_mb(srv):
    with open(f"/proc/{srv.proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.faults
def test_more_followers_than_a_1024_file_limit_each_on_its_own_connection(certs):
    require_kernel()
    import asyncio
    raise_own_open_files_limit(8192)
    with Server(certs, prefix=at_a_1024_soft_limit(),
                extra=["--stop-jobs-on-exit", "--max-streams-per-user", "2000"]) as srv:
        assert f"open files limit raised from 1024 to {hard_open_files_limit()}" in srv.read_log()
        assert cli(srv, "run", "-f", "ulimit -n").stdout == b"1024\n"   # jobs keep the usual
        job_id = start_job(srv, "echo first; sleep 1000")
        creds, md = user_credentials(certs)

        async def follow_each_on_its_own_connection(n):
            channels = [grpc.aio.secure_channel(srv.address, creds) for _ in range(n)]
            attached = asyncio.Semaphore(0)

            async def follow(channel):
                call = pb_grpc.JobServiceStub(channel).Output(
                    pb.OutputRequest(job_id=job_id, follow=True), metadata=md,
                    timeout=scaled(180))
                got = b""
                async for chunk in call:
                    got += chunk.data
                    attached.release()
                return got
            try:
                followers = asyncio.gather(*map(follow, channels), return_exceptions=True)
                for _ in range(n):   # every one of them holds its connection now
                    await asyncio.wait_for(attached.acquire(), scaled(120))
                # ... and the server still has handles for another user's call, and a stop.
                stop = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: cli(srv, "--json", "stop", "--grace", "0", job_id))
                return stop, await followers
            finally:
                for channel in channels:
                    await channel.close()

        stop, outputs = asyncio.run(follow_each_on_its_own_connection(1200))
        assert stop.returncode == 0 and json.loads(stop.stdout)["state"] == "stopped", stop
        failed = [o for o in outputs if o != b"first\n"]
        assert not failed, f"{len(failed)} of 1200 followers failed, e.g. {failed[0]!r:.300}"


@pytest.mark.faults
def test_idle_connections_neither_starve_certified_users_nor_stay(certs):
    require_kernel()
    raise_own_open_files_limit(1 << 20)
    # 20,000, or what the hard limit on file handles lets both ends hold (with room for
    # the server's own files: it caps connections below its limit).
    count = max(1000, min(20000, hard_open_files_limit() - 4096))
    idle = []
    with Server(certs, prefix=at_a_1024_soft_limit(),
                extra=["--handshake-timeout", str(scaled(3))]) as srv:
        try:
            for _ in range(count):   # connections that never send a byte
                idle.append(socket.create_connection(("127.0.0.1", srv.port),
                                                     timeout=scaled(10)))
            channel = user_channel(certs, srv.address, "mrarsenal")
            stub = pb_grpc.JobServiceStub(channel)
            with pytest.raises(grpc.RpcError) as e:   # a full round trip, TLS handshake included
                stub.Status(pb.JobRef(job_id="no-such-job"), metadata=bearer(certs),
                            timeout=scaled(2))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value
            channel.close()
            # Past the handshake timeout the server has closed them: recv sees EOF.
            time.sleep(scaled(3) + 2)
            sample = idle[::500]
            for sock in sample:
                sock.settimeout(scaled(10))
            assert [sock.recv(1) for sock in sample] == [b""] * len(sample)
        finally:
            for sock in idle:
                sock.close()


@pytest.mark.faults
def test_stalled_followers_at_distinct_offsets_stay_within_the_memory_budget(certs):
    require_kernel()
    import asyncio
    with Server(certs, extra=["--stop-jobs-on-exit"]) as srv:
        job_id = start_job(srv, "head -c 400M /dev/urandom")
        deadline = time.monotonic() + scaled(60)
        while cli_json(srv, "status", job_id)["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        alices = start_job(srv, "head -c 8M /dev/zero", user="alice")
        creds, md = user_credentials(certs)
        alice_creds, alice_md = user_credentials(certs, "alice")
        before, handles = server_rss_mb(srv), len(os.listdir(f"/proc/{srv.proc.pid}/fd"))

        async def stall(followers=300, connections=30):
            channels = [grpc.aio.secure_channel(srv.address, creds) for _ in range(connections)]
            calls = [pb_grpc.JobServiceStub(channels[i % connections]).Output(
                pb.OutputRequest(job_id=job_id, offset=i * (sj.MiB + 4099), follow=True),
                metadata=md) for i in range(followers)]
            for call in calls:
                await call.read()   # one message each, then never another
            # The streams cost no file handle each: only their connections do.
            assert len(os.listdir(f"/proc/{srv.proc.pid}/fd")) <= handles + connections + 10
            # Another user's stream is not starved of chunk size by them.
            async with grpc.aio.secure_channel(srv.address, alice_creds) as channel:
                alice_chunks = [len(c.data) async for c in pb_grpc.JobServiceStub(
                    channel).Output(pb.OutputRequest(job_id=alices, follow=True),
                                    metadata=alice_md)]
            peak = 0.0
            for _ in range(int(scaled(3) / 0.1)):
                peak = max(peak, server_rss_mb(srv))
                await asyncio.sleep(0.1)
            for call in calls:
                call.cancel()
            for channel in channels:
                await channel.close()
            return peak, alice_chunks

        peak, alice_chunks = asyncio.run(stall())
        assert sum(alice_chunks) == 8 * sj.MiB and max(alice_chunks) == sj.STREAM_CHUNK, alice_chunks
        time.sleep(scaled(2))
        after = server_rss_mb(srv)
        assert peak <= 300, f"server RSS {before:.0f} -> peak {peak:.0f} MB"
        assert after <= before + 50, f"server RSS {before:.0f} -> {after:.0f} MB after"
        assert cli(srv, "status", job_id).returncode == 0


@pytest.mark.faults
def test_one_users_streams_are_capped_and_do_not_stop_anothers(certs):
    require_kernel()
    with Server(certs, extra=["--stop-jobs-on-exit", "--max-streams-per-user", "3"]) as srv:
        job_id = start_job(srv, "echo on; sleep 1000", user="alice")
        follow = lambda user: subprocess.Popen(
            [PYTHON, SCRIPT, "--server", srv.address, "--certs", certs, "--user", user,
             "stream", job_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        held = [follow("alice") for _ in range(3)]
        for proc in held:
            assert proc.stdout.readline() == b"on\n"
        done = cli(srv, "output", job_id, user="alice")
        assert done.returncode == 9 and b"--max-streams-per-user" in done.stderr, done.stderr
        assert cli(srv, "output", job_id).stdout == b"on\n"   # the admin's are not counted
        for proc in held:
            proc.kill()
            proc.wait()
        deadline = time.monotonic() + scaled(10)
        while cli(srv, "output", job_id, user="alice").returncode != 0:
            assert time.monotonic() < deadline, "closed streams were not given back"
            time.sleep(0.1)


def children_of(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = open(f"/proc/{entry}/stat").read()
                if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                    found.append(int(entry))
    return found


@pytest.mark.faults
def test_a_killed_server_leaves_a_quiet_spawner_and_a_stopped_one_no_cgroup_root(certs):
    require_kernel()
    with Server(certs) as srv:
        job_id = start_job(srv, "exit 0")
        for _ in range(3):   # supervisors used: the spawner offers new ones, left unread
            start_job(srv, "exit 0")
        time.sleep(0.5)
        spawners = children_of(srv.proc.pid)
        assert spawners
        srv.terminate(signal.SIGKILL)
        deadline = time.monotonic() + scaled(10)
        while any(sj.process_start_time(p) for p in spawners):
            assert time.monotonic() < deadline, "the spawner outlived its server"
            time.sleep(0.05)
        assert "Traceback" not in srv.read_log(), srv.read_log()
        srv.restart()
        assert cli_json(srv, "status", job_id)["exit_code"] == 0
        assert srv.terminate() == 0
        layout = sj.CgroupLayout.detect()
        roots = [os.path.join(m, srv.cgroup_root) for m in [*layout.v1.values(), layout.unified]]
        assert not [r for r in roots if os.path.exists(r)]


class _RpcError(Exception):
    def __init__(self, code, details, trailer=()):
        self._code, self._details, self._trailer = code, details, trailer

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailer


@pytest.mark.faults
def test_the_cli_says_cannot_reach_only_when_the_server_did_not_answer():
    for said, told in (
            ("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: "
             "Connection refused", "cannot reach the server at"),
            ("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: "
             "Socket closed", "refused the client certificate"),
            ("Socket closed", "the connection to the server at"),
            ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls "
             "handshake failed: CERTIFICATE_VERIFY_FAILED", "not the server you trust"),
            ("Peer name x is not in peer certificate", "not for the name in --server")):
        transport = sj.ClientError.from_rpc(_RpcError(grpc.StatusCode.UNAVAILABLE, said))
        assert transport.exit_code == 8 and told in str(transport), said
    said = sj.ClientError.from_rpc(_RpcError(
        grpc.StatusCode.UNAVAILABLE, "the spawner is gone",
        ((sj.ERROR_ORIGIN_KEY, "unavailable"),)))
    assert said.exit_code == 8 and "cannot reach" not in str(said)
    late = sj.ClientError.from_rpc(_RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "x did not end",
                                             ((sj.ERROR_ORIGIN_KEY, "deadline_exceeded"),)))
    assert late.exit_code == 10 and "cannot reach" not in str(late)


###############################################################################
# Tenant tests: what a hostile user (alice, role user) can do to others and the host
###############################################################################

def sub_ca_client_cert(certs_dir, cn):
    """A client certificate for cn issued by a sub-CA that the test CA signed (its
    pathlen:0 forbids that). Returns (leaf + sub-CA chain pem, key pem, leaf der)."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    ca_key = serialization.load_pem_private_key(open(f"{certs_dir}/ca.key", "rb").read(), None)
    ca = x509.load_pem_x509_certificate(open(f"{certs_dir}/ca.crt", "rb").read())
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)

    def issue(subject, key, issuer_name, issuer_key, is_ca):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - day).not_valid_after(now + 30 * day)
                   .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), True))
        if is_ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), True)
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        return builder.sign(issuer_key, hashes.SHA256())

    sub_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    sub = issue("rogue sub-CA", sub_key, ca.subject, ca_key, True)
    leaf = issue(cn, leaf_key, sub.subject, sub_key, False)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)
    return (pem(leaf) + pem(sub), leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), leaf.public_bytes(serialization.Encoding.DER))


@pytest.mark.tenants
def test_a_client_certificate_from_a_sub_ca_is_refused(server, certs):
    chain, key, der = sub_ca_client_cert(certs, "mrarsenal")
    token = signed(certs, jwt_claims(certs, "mrarsenal", cnf={
        "x5t#S256": sj.certificate_thumbprint(der)}))
    code, _ = call(certs, server.address, "List", pb.ListRequest(all_users=True),
                   token=token, cert=chain, key=key)
    assert code == "UNAUTHENTICATED"


@pytest.mark.tenants
def test_client_supplied_strings_cannot_forge_or_flood_log_lines(server, certs):
    forged = ("x\n2026-01-01 00:00:00,000 INFO rpc user=mrarsenal method=Remove job=y "
              "result=OK duration_ms=1.0")
    huge = "a" * 100_000
    for job_id in (forged, huge):
        done = cli(server, "status", job_id, user="alice")
        assert done.returncode == 3 and len(done.stderr) < 400, done.stderr[:500]
        code, _ = call(certs, server.address, "Output", pb.OutputRequest(job_id=job_id),
                       user="alice")
        assert code == "NOT_FOUND"
    log = server.read_log()
    assert not [line for line in log.splitlines() if line.startswith("2026-01-01")]
    assert max(len(line) for line in log.splitlines()) < 1000
    assert "\\n2026-01-01" in log   # the forged id, escaped into its own log line


@pytest.mark.tenants
def test_a_flood_of_long_stops_delays_no_other_users_stop(server):
    """Reproduction: alice's 64 Stop(grace 20) of one job that ignores SIGTERM held every
    stop thread: mrarsenal's stop of an unrelated job took 18.5 s."""
    alice, admin = Api(server, "alice"), Api(server)
    pb = alice.pb
    try:
        hers = started(alice, ["sh", "-c", "trap '' TERM; sleep 600"]).job_id
        his = started(admin, ["sleep", "300"]).job_id
        flood = [alice.stub.Stop.future(pb.StopRequest(job_id=hers, grace_seconds=20),
                                        metadata=alice.metadata, timeout=scaled(60))
                 for _ in range(100)]
        time.sleep(scaled(1))   # (they have reached the server)
        began = time.monotonic()
        assert admin.Stop(pb.StopRequest(job_id=his)).state == pb.STATE_STOPPED
        took = time.monotonic() - began
        assert took < scaled(5), f"an unrelated stop took {took:.1f} s"
        refused = [f for f in flood if f.done()]
        assert len(refused) == 100 - sj.MAX_STOPS_PER_USER   # the rest are in flight
        assert {f.exception().code().name for f in refused} == {"RESOURCE_EXHAUSTED"}
        # Its stops are one stop: a shorter grace brings every waiting one's end forward
        # (the admin's, since alice may have no more stops under way).
        assert alice.error("Stop", pb.StopRequest(job_id=hers, grace_seconds=0))[:2] == (
            "RESOURCE_EXHAUSTED", "TOO_MANY_STOPS")
        assert admin.Stop(pb.StopRequest(job_id=hers, grace_seconds=0)).state == \
            pb.STATE_STOPPED
        waiting = [f for f in flood if f not in refused]
        assert {f.result(timeout=scaled(10)).state for f in waiting} == {pb.STATE_STOPPED}
        assert server.read_log().count(f"method=Stop job={hers} result=OK") == \
            sj.MAX_STOPS_PER_USER + 1
        assert alice.Status(pb.JobRef(job_id=hers)).state == pb.STATE_STOPPED   # not killed
    finally:
        alice.close()
        admin.close()


@pytest.mark.tenants
def test_a_jobs_strings_cannot_rewrite_another_users_screen(server):
    """Reproduction: alice's argv, label and workdir held ESC and OSC sequences; an admin's
    `list --all` and `status` printed them raw (cursor up and erase, OSC 0 the window's
    title, OSC 52 the clipboard)."""
    evil = "\x1b[1A\x1b[2K\x1b]0;owned\x07\x1b]52;c;ZWNobyBoaQ==\x07\u009b2J\x7f"
    alice = Api(server, "alice")
    try:
        code, reason, field, _ = alice.error("Start", pb.StartRequest(
            argv=["true"], labels={"note": evil}))
        assert (code, field) == ("INVALID_ARGUMENT", "labels")
        ran = started(alice, ["sh", "-c", f"exit 0 # {evil}"], labels={"note": "calm"})
        failed = started(alice, ["true"], workdir=f"/nonexistent{evil}")
        for job in (ran, failed):
            alice.Wait(pb.JobRef(job_id=job.job_id))
    finally:
        alice.close()
    shown = [cli(server, "list", "--all"), cli(server, "ps", "-a", "--all-users"),
             cli(server, "status", ran.job_id), cli(server, "status", failed.job_id),
             cli(server, "status", ran.job_id, failed.job_id, "no-such-job" + evil)]
    for done in shown:
        text = (done.stdout + done.stderr).decode()
        assert not sj.CONTROL_CHARACTERS.search(text.replace("\n", "")), text
    for done in shown[0], shown[2], shown[3]:
        assert "\\x1b[1A" in done.stdout.decode()   # shown, escaped
    st = cli_json(server, "status", ran.job_id)   # JSON stays JSON, the argv as it was
    assert st["argv"][-1] == f"exit 0 # {evil}"


@pytest.mark.tenants
def test_an_output_call_cancelled_mid_write_is_one_quiet_line(server):
    """Reproduction: a client that cancelled Output while a chunk was being written was
    logged as `internal error`, with a traceback."""
    api = Api(server, "alice")
    pb = api.pb
    try:
        job = started(api, ["sh", "-c", "head -c 20000000 /dev/zero"]).job_id
        api.Wait(pb.JobRef(job_id=job))
        for _ in range(30):
            call = api.stub.Output(pb.OutputRequest(job_id=job), metadata=api.metadata,
                                   timeout=scaled(30))
            next(call)
            call.cancel()
        log = lambda: server.read_log()
        results = lambda: re.findall(f"method=Output job={job} result=(\\w+)", log())
        wait_for(lambda: len(results()) == 30)
        assert set(results()) == {"CANCELLED"}, results()
        assert "internal error" not in log() and "Traceback" not in log()
        api.Remove(pb.JobRef(job_id=job))
    finally:
        api.close()


@pytest.mark.tenants
def test_a_user_may_name_themselves_as_the_owner_and_nobody_else(server):
    mine = start_job(server, "true", user="alice")
    listed = cli(server, "list", "-q", "--owner", "alice", user="alice")
    assert listed.returncode == 0 and mine in listed.stdout.decode().split(), listed.stderr
    other = cli(server, "list", "--owner", "mrarsenal", user="alice")
    assert other.returncode == 6 and b"sees only its own jobs" in other.stderr, other.stderr
    cli(server, "rm", mine, user="alice")


def server_cpu_seconds(srv):
    """The server process's user + system CPU time so far."""
    with open(f"/proc/{srv.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.tenants
def test_a_huge_tail_costs_the_server_about_what_it_returns(certs):
    """Reproduction: Output(tail_lines=2**63) of a job of 20 MB of empty lines took 2.4 s
    of the server's CPU (one Python step a newline), counted in the caller's stream cap
    only after that work."""
    with Server(certs, extra=["--max-streams-per-user", "2"]) as srv, \
            contextlib.closing(Api(srv, "alice")) as alice:
        pb = alice.pb
        output = lambda **r: alice.stub.Output(pb.OutputRequest(**r), metadata=alice.metadata,
                                               timeout=scaled(60))
        job = started(alice, ["sh", "-c", "yes '' | head -c 20000000"]).job_id
        alice.Wait(pb.JobRef(job_id=job))
        before = server_cpu_seconds(srv)
        for lines in (2**63, 5_000_000, 3):
            got = b"".join(c.data for c in output(job_id=job, tail_lines=lines))
            assert got == b"\n" * min(lines, 20_000_000)
        used = server_cpu_seconds(srv) - before
        assert used < scaled(1.2), f"three tails took {used:.2f} s of the server's CPU"
        # Over the stream cap: refused before the scan.
        sleeper = started(alice, ["sleep", "300"]).job_id
        held = [output(job_id=sleeper, follow=True) for _ in range(2)]
        time.sleep(scaled(1))   # (both streams are open on the server)
        before = server_cpu_seconds(srv)
        with pytest.raises(alice.grpc.RpcError) as refused:
            list(output(job_id=job, tail_lines=2**63))
        assert refused.value.code().name == "RESOURCE_EXHAUSTED"
        assert server_cpu_seconds(srv) - before < scaled(0.5)
        for call in held:
            call.cancel()


def runs_of(chunks):
    """[(offset, stream, data, time)] of each run in Output's chunks (OutputChunk.runs)."""
    runs = []
    for c in chunks:
        if not c.run_sizes:
            runs.append((c.offset, c.stream, c.data, c.time.ToNanoseconds() / 1e9))
            continue
        at = 0
        for offset, size, stream, t in itertools.zip_longest(c.run_offsets, c.run_sizes,
                                                             c.run_streams, c.run_times):
            runs.append((offset, stream, c.data[at:at + size], t or 0.0))
            at += size
        assert at == len(c.data) and c.offset == c.run_offsets[0] and not c.stream
    return runs


@pytest.mark.tenants
def test_an_interleaved_job_reads_in_few_chunks_each_byte_from_its_stream(certs):
    """Reproduction: a job alternating 1-byte writes to its streams cost a message a byte
    (614k messages, 47.6 s of server CPU, for its 16.7 MB; the job had used 5 s)."""
    with Server(certs) as srv, contextlib.closing(Api(srv, "alice")) as alice:
        pb = alice.pb
        output = lambda **r: list(alice.stub.Output(pb.OutputRequest(**r), metadata=alice.metadata,
                                                    timeout=scaled(60)))
        # (with pauses: output that comes without one is moved a round every 2 ms, in few runs)
        script = ("import os, time\nfor _ in range(1000):\n"
                  "    os.write(1, b'a' * 50); os.write(2, b'b' * 50); time.sleep(0.003)")
        letters = {pb.STREAM_STDOUT: b"a", pb.STREAM_STDERR: b"b"}
        job = started(alice, ["python3", "-c", script]).job_id
        assert alice.Wait(pb.JobRef(job_id=job), timeout=scaled(60)).exit_code == 0
        every = runs_of(output(job_id=job, runs=True))
        assert len(every) > 1000, len(every)   # (what made this a message a run)
        for ask, expected in (({}, 100_000), ({"stream": pb.STREAM_STDERR}, 50_000),
                              ({"timestamps": True}, 100_000)):
            chunks = output(job_id=job, runs=True, **ask)
            assert len(chunks) <= 100_000 // 4096 + 2, len(chunks)
            at = 0
            for offset, stream, data, t in runs_of(chunks):
                assert data == letters[stream] * len(data) and data
                assert stream == ask.get("stream", stream) and (t > 0) == ("timestamps" in ask)
                assert offset == at or "stream" in ask
                at = offset + len(data)
            assert sum(len(c.data) for c in chunks) == expected
        # A client that does not ask for runs gets a run a chunk, as before (the server
        # reads them many at a time), from anywhere, with their times if asked.
        near_end = every[-20][0]
        plain = [(c.offset, c.stream, c.data) for c in output(job_id=job, offset=near_end)]
        assert plain == [run[:3] for run in every[-20:]]
        plain = [(c.offset, c.stream, c.data) for c in output(job_id=job)]
        assert plain == [run[:3] for run in every]
        timed = output(job_id=job, stream=pb.STREAM_STDERR, timestamps=True)
        assert [(c.offset, c.data) for c in timed] == [
            (offset, data) for offset, stream, data, _ in every if stream == pb.STREAM_STDERR]
        assert all(c.time.seconds > 0 and c.stream == pb.STREAM_STDERR for c in timed)
        done = cli(srv, "output", job, user="alice")
        assert (done.returncode, done.stdout, done.stderr) == (0, b"a" * 50000, b"b" * 50000)


ALTERNATING_WRITER = ("import os, time\n"    # 1-byte writes to each stream in turn
                      "end = time.monotonic() + {seconds}\n"
                      "while time.monotonic() < end:\n"
                      "    for _ in range(1000):\n"
                      "        os.write(1, b'a'); os.write(2, b'b')\n")


EIGHT_READERS = """
import sys, threading
sys.path.insert(0, sys.argv[1])
from steve_jobs_harness import bearer, user_channel
from test_steve_jobs import raw_output
channel = user_channel(sys.argv[2], sys.argv[3], "alice")
got, lock = [0], threading.Lock()
def read_forever(i):
    while True:   # (each from an offset of its own: no chunk shared between them)
        for size in raw_output(channel, bearer(sys.argv[2], "alice"), sys.argv[4], i):
            with lock:
                got[0] += size
for i in range(8):
    threading.Thread(target=read_forever, args=(i,), daemon=True).start()
for _ in sys.stdin:   # a line asks for what they have read so far
    with lock:
        print(got[0], flush=True)
"""


def raw_output(channel, metadata, job_id, offset=0):
    """The size of each chunk of an Output(runs) call on channel, left unparsed: the client
    costs little beside the server."""
    call = channel.unary_stream("/steve_jobs.v1.JobService/Output",
                                request_serializer=pb.OutputRequest.SerializeToString)
    for raw in call(pb.OutputRequest(job_id=job_id, offset=offset, runs=True),
                    metadata=metadata, timeout=scaled(600)):
        yield len(raw)


@pytest.mark.tenants
def test_one_users_many_reads_take_one_users_share_of_the_server(certs):
    """Reproduction: alice's 8 reads of a 1-byte-interleaved job took mrarsenal's status
    p50 from 2.4 to 146 ms: her chunks' reads and writes on the event loop went one of
    each of her streams in turn, so she took eight shares of it to another user's one."""
    with Server(certs) as srv, contextlib.closing(Api(srv, "alice")) as alice, \
            contextlib.closing(Api(srv)) as admin:
        pb, writer = alice.pb, ["python3", "-c", ALTERNATING_WRITER.format(seconds=3)]
        readers = None
        try:
            hers, mine = (started(api, writer, limits=pb.Limits(cpu=0.5)).job_id
                          for api in (alice, admin))
            alice.Wait(pb.JobRef(job_id=hers)), admin.Wait(pb.JobRef(job_id=mine))
            size = sum(raw_output(admin.channel, admin.metadata, mine))
            readers = subprocess.Popen([PYTHON, "-c", EIGHT_READERS, HERE, certs, srv.address,
                                        hers], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True)

            def alice_read():
                readers.stdin.write("\n")
                readers.stdin.flush()
                return int(readers.stdout.readline())
            deadline = time.monotonic() + scaled(30)
            while alice_read() < 2 * size and time.monotonic() < deadline:   # (all 8 going)
                time.sleep(0.1)
            shares = []
            for _ in range(5):
                before = alice_read()
                assert sum(raw_output(admin.channel, admin.metadata, mine)) == size
                shares.append((alice_read() - before) / size)
            # One share each: she reads about what he reads meanwhile (before: about 8 times).
            assert statistics.median(shares) < 3, shares
        finally:
            if readers is not None:
                readers.kill()
                readers.wait()


def supervisor_cpu_seconds(srv, job_id):
    """The CPU seconds the job's supervisor has used by the time it exits (polled)."""
    pid = shim_pid_of(srv, job_id)
    used = 0.0
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        while True:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            used = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            time.sleep(0.05)
    return used


@pytest.mark.tenants
def test_a_jobs_supervisor_works_for_it_within_a_bound(server):
    """Reproduction: a job of 1-byte writes at --cpu 0.1 had its supervisor, outside the
    job's limits, spend 0.25 s moving its output to the 0.4 s the job was allowed."""
    alice = Api(server, "alice")
    pb = alice.pb
    writer = ("import os, time\nend = time.monotonic() + 3\nwhile time.monotonic() < end:\n"
              "    for _ in range(1000): os.write(1, b'a')")
    try:
        job = started(alice, ["python3", "-c", writer], limits=pb.Limits(cpu=0.1)).job_id
        ours = supervisor_cpu_seconds(server, job)
        theirs = alice.Wait(pb.JobRef(job_id=job), timeout=scaled(60)).cpu_seconds
        assert ours <= 0.05 + 0.2 * theirs, f"the supervisor took {ours} s, the job {theirs}"
    finally:
        alice.close()


@pytest.mark.tenants
def test_a_state_folder_another_user_can_write_is_refused(certs):
    """Reproduction: nobody made /var/tmp/squat, root started the server on it, and nobody
    swapped alice's job folder for links: her `output` read a root-only file, a `stream`
    appended to one, her `stop` truncated one to 0 bytes."""
    squat = new_state_dir()
    inside = os.path.join(squat, "state")
    os.mkdir(inside, 0o700)
    try:
        for folder, owner, mode, says in ((squat, 65534, 0o755, "belongs to uid 65534"),
                                          (inside, 65534, 0o755, f"{squat} belongs to uid"),
                                          (squat, 0, 0o777, "writable by everyone")):
            os.chown(squat, owner, owner)
            os.chmod(squat, mode)
            srv = Server(certs, state_dir=folder)
            try:
                with pytest.raises(AssertionError):
                    srv.start()
                lines = [line for line in srv.read_log().splitlines() if "unsafe" in line]
                assert srv.proc.wait(30) == 1 and len(lines) == 1 and says in lines[0], \
                    srv.read_log()
            finally:
                srv.terminate()   # (it made nothing to clean up)
        os.chown(squat, 0, 0)
        os.chmod(squat, 0o711)
        missing = os.path.join(squat, "made", "by", "the-server")
        srv = Server(certs, state_dir=missing)
        srv.log_path = os.path.join(squat, "server.log")   # (not in the folder it makes)
        with srv:   # a missing one is made, root's
            assert os.stat(missing).st_uid == 0 and not os.stat(missing).st_mode & 0o022
    finally:
        os.chown(squat, 0, 0)
        remove_state_dir(squat)


@pytest.mark.tenants
def test_the_server_follows_no_link_in_a_job_folder(engine, tmp_path):
    """A job folder's files are opened without following a link: a link planted there
    (by whoever could write the folder) leads the root server to no other file."""
    precious = tmp_path / "precious"
    precious.write_bytes(b"root's own\n")
    job = engine.start("alice", ["sleep", "300"])
    folder = engine._get(job).dir
    for name in (sj.OUTPUT_FILE, sj.SESSIONS_FILE, sj.STOP_FILE):
        path = os.path.join(folder, name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.symlink(precious, path)
    assert engine.read_output(job) == b""
    engine.record_session(job, "reader", "watch")
    assert engine.status(job).sessions == ()
    engine.stop(job, grace=0)
    assert precious.read_bytes() == b"root's own\n"


@pytest.mark.tenants
def test_watchers_cannot_flush_who_typed_into_a_job(server):
    """Reproduction: a reader's 150 Output(follow) calls on alice's terminal job pushed every
    event out of status's last 100 (14,000 filled the record, and later input was not
    kept at all)."""
    alice, rita = Api(server, "alice"), Api(server, "rita")
    pb = alice.pb
    try:
        job = started(alice, ["cat"], terminal=pb.TerminalSize(rows=24, columns=80)).job_id
        summary = alice.stub.Input(iter([pb.InputMessage(job_id=job, data=b"secret\n")]),
                                   metadata=alice.metadata, timeout=scaled(30))
        assert summary.bytes == 7
        for _ in range(150):
            call = rita.stub.Output(pb.OutputRequest(job_id=job, follow=True),
                                    metadata=rita.metadata, timeout=scaled(30))
            next(call)   # (the call has been served: its watch is recorded)
            call.cancel()
        events = [(e.user, e.event) for e in alice.Status(pb.JobRef(job_id=job)).sessions]
        assert events == [("alice", "input"), ("alice", "input-end"), ("rita", "watch")]
        alice.Stop(pb.StopRequest(job_id=job, grace_seconds=0))
    finally:
        alice.close()
        rita.close()


@pytest.mark.tenants
def test_a_full_session_record_keeps_room_for_writes_and_counts_what_it_drops(engine):
    job = engine.start("alice", ["cat"], options=sj.JobOptions(stdin=True))
    for i in range(sj.WATCH_SESSIONS_BYTES // 60):   # more distinct watchers than fit
        engine.record_session(job, f"watcher-{i}", "watch")
    st = engine.status(job)
    watched = st.sessions_dropped
    assert watched > 0 and [e.event for e in st.sessions] == ["watch"] * sj.MAX_WATCHES_SHOWN
    engine.record_session(job, "mrarsenal", "taken-over")
    st = engine.status(job)
    assert st.sessions[-1][1:3] == ("mrarsenal", "taken-over")
    assert st.sessions_dropped == watched
    for _ in range((sj.MAX_SESSIONS_BYTES - sj.WATCH_SESSIONS_BYTES) // 60 + 10):
        engine.record_session(job, "mrarsenal", "input")
    assert engine.status(job).sessions_dropped > watched
    assert engine._get(job).sessions.dropped() == sj._load_json(os.path.join(
        engine._get(job).dir, sj.SESSIONS_DROPPED_FILE))
    engine.stop(job, grace=0)


@pytest.mark.tenants
def test_input_holds_bounded_memory_per_call_and_per_user(certs):
    """Reproduction: 10 Input calls to jobs that never read, sent 4 MiB messages, took 145 MB
    of the server's memory; Input counted in no stream cap, and one that never sent its
    first message was held for ever."""
    srv = Server(certs, extra=["--max-streams-per-user", str(sj.MAX_INPUTS_PER_USER + 1)])
    with srv, contextlib.closing(Api(srv, "alice")) as alice:
        pb = alice.pb
        silent = threading.Event()

        def then_nothing(messages):   # the messages, then a call that stays open
            yield from messages
            silent.wait()

        send = lambda messages: alice.stub.Input.future(then_nothing(messages),
                                                        metadata=alice.metadata,
                                                        timeout=scaled(60))
        try:
            mute = send([])   # sends nothing at all
            jobs = [started(alice, ["sleep", "600"], stdin=True).job_id
                    for _ in range(sj.MAX_INPUTS_PER_USER + 1)]
            big = send([pb.InputMessage(job_id=jobs[0],
                                        data=b"x" * (sj.MAX_RECEIVED_MESSAGE + 1))])
            assert big.exception(scaled(30)).code().name == "RESOURCE_EXHAUSTED"
            held = [send([pb.InputMessage(job_id=j, data=b"x" * sj.MiB)]) for j in jobs]
            wait_for(lambda: sum(f.done() for f in held) == 2, scaled(30))
            refused = [f.exception() for f in held if f.done()]
            reasons = {sj.error_reason(dict(e.trailing_metadata()).get(sj.STATUS_DETAILS_KEY,
                                                                       b""))[0] for e in refused}
            assert reasons <= {"TOO_MANY_INPUTS", "TOO_MANY_STREAMS"} and len(reasons) >= 1
            assert mute.exception(scaled(30)).code().name == "DEADLINE_EXCEEDED"
            for f in held:
                f.cancel()
        finally:
            silent.set()


@pytest.mark.tenants
def test_host_network_is_an_admin_privilege_unless_the_server_opens_it():
    alice, wants = sj.Identity("alice", "user"), sj.JobOptions(host_network=True)
    with pytest.raises(sj.PermissionDeniedError, match="--allow-host-network-role"):
        sj.check_start_allowed(alice, sj.Limits(), wants, sj.Limits())
    sj.check_start_allowed(alice, sj.Limits(), wants, sj.Limits(), ("admin", "user"))
    sj.check_start_allowed(sj.Identity("root", "admin"), sj.Limits(), wants, sj.Limits())


@pytest.mark.tenants
def test_the_server_refuses_a_certificate_folder_that_jobs_could_use(certs, tmp_path):
    require_kernel()
    cases = {"the CA's key beside it": lambda d: shutil.copy2(f"{certs}/ca.key", d),
             "the token signer's key": lambda d: shutil.copy2(f"{certs}/jwt-signing.key", d),
             "a key others can read": lambda d: os.chmod(f"{d}/server.key", 0o644),
             "a token others can read": lambda d: (shutil.copy2(f"{certs}/alice.jwt", d),
                                                   os.chmod(f"{d}/alice.jwt", 0o640))}
    for i, (case, spoil) in enumerate(cases.items()):
        folder = copy_server_certs(certs, tmp_path / f"case{i}")
        spoil(folder)
        srv = Server(str(folder))
        srv.server_certs = str(folder)   # as it is, keys and all
        try:
            with pytest.raises(AssertionError, match="insecure-dev-certs"):
                srv.start()
            log = srv.read_log().strip()
            assert srv.proc.wait(30) == 1 and len(log.splitlines()) == 1, (case, log)
        finally:
            srv.cleanup()   # a server that started after all is stopped, its state removed
    # With the flag (the quickstart, on the bundled set) it starts, and its log says why not.
    srv = Server(str(folder), extra=["--insecure-dev-certs"])
    srv.server_certs = str(folder)
    with srv:
        assert "--insecure-dev-certs: " in srv.read_log()


@pytest.mark.tenants
@pytest.mark.parametrize("args", [
    ["mrarsenal:admin", "bad name:user"], ["alice:root"], ["-rf:user"],
    ["--san", "x\nextendedKeyUsage=serverAuth,clientAuth", "alice:user"],
    ["--san", "jobs.example.com,IP:10.0.0.1"], ["--san"]])
def test_gen_certs_checks_every_argument_before_writing_anything(tmp_path, args):
    target = tmp_path / "set"
    done = subprocess.run(["bash", os.path.join(HERE, "gen_certs.sh"), "--dir", str(target),
                           *args], capture_output=True, env={**os.environ, "PYTHON": PYTHON})
    assert done.returncode == 2 and not target.exists(), done
    assert done.stderr.startswith(b"gen_certs.sh: ") and done.stderr.count(b"\n") == 1


@pytest.mark.tenants
def test_a_job_sees_the_host_read_only_and_none_of_the_servers_folders():
    certs_like = host_folder_for_jobs()   # stands for the server's certificate folder
    with open(os.path.join(certs_like, "server.key"), "w") as f:
        f.write("-----BEGIN PRIVATE KEY-----\n")
    os.chmod(os.path.join(certs_like, "server.key"), 0o644)
    try:
        with running_engine(hidden_paths=(certs_like,), allow_root=True) as engine:
            state = engine.config.state_dir
            probe = (f"cat {certs_like}/server.key; ls {state}/jobs; "
                     "for f in /etc/steve-x /usr/steve-x /var/lib/steve-x /root/steve-x; do "
                     "  touch $f 2>/dev/null && echo WROTE $f; done; "
                     "touch ./mine /tmp/mine /var/tmp/mine /dev/shm/mine && echo private-ok; "
                     "ls /dev | tr '\\n' ' '")
            for as_root in (False, True):   # a --root job too: host root, namespaced view
                st, out = sh(engine, probe, as_root=as_root)
                text = out.decode()
                assert "PRIVATE KEY" not in text and "WROTE" not in text, text
                assert "private-ok" in text, text
                assert text.split("private-ok\n")[1].split() == sorted(
                    list(sj.JOB_DEVICES) + ["fd", "ptmx", "pts", "shm", "stderr", "stdin",
                                            "stdout"]), text
            for f in ("/etc/steve-x", "/usr/steve-x", "/var/lib/steve-x", "/root/steve-x"):
                assert not os.path.exists(f)
    finally:
        shutil.rmtree(certs_like)


@pytest.mark.tenants
def test_what_one_job_leaves_in_var_tmp_no_later_job_sees(engine):
    sh(engine, "echo secret > /var/tmp/left-behind; echo secret > /run/lock/left-behind")
    st, out = sh(engine, "cat /var/tmp/left-behind /run/lock/left-behind")
    assert b"secret" not in out and st.exit_code != 0, out
    assert not os.path.exists("/var/tmp/left-behind")


@pytest.mark.tenants
def test_a_named_working_folder_is_checked_as_the_jobs_user(engine):
    private = tempfile.mkdtemp(prefix="steve-jobs-test-", dir="/var/lib")   # 0700, root's
    os.mkdir(os.path.join(private, "there"))
    try:
        there = run(engine, ["true"], workdir=f"{private}/there")[0]
        nowhere = run(engine, ["true"], workdir=f"{private}/nowhere")[0]
        assert there.state == nowhere.state == sj.FAILED
        # What the job's user cannot reach, it cannot tell from what does not exist.
        assert "Permission denied" in there.error and "Permission denied" in nowhere.error
        with pytest.raises(sj.InvalidArgumentError, match="io_device"):
            engine.start("tester", ["true"], sj.Limits(io_write_bps=1 << 20),
                         sj.JobOptions(workdir=f"{private}/nowhere"))
    finally:
        shutil.rmtree(private)


@pytest.mark.tenants
def test_a_user_cannot_read_the_servers_keys_from_a_job(server):
    done = cli(server, "run", "-f", "--", "cat", f"{server.server_certs}/server.key",
               user="alice")
    assert done.returncode != 0 and b"PRIVATE KEY" not in done.stdout, done


@pytest.mark.tenants
def test_job_uids_come_in_order_and_only_back_once_no_record_holds_them(tmp_path):
    base = sj.EngineConfig().uid_base
    pool = sj.UidPool(str(tmp_path), base, 3)
    pool.load()
    uids = [pool.take() for _ in range(3)]
    assert uids == [base, base + 1, base + 2]
    with pytest.raises(sj.ResourceExhaustedError, match="job uid"):
        pool.take()
    pool.release(base + 1)              # its record was removed
    assert pool.take() == base + 1
    assert json.load(open(tmp_path / sj.UID_FILE))["next"] >= 4   # a restart goes on
    # A job that could leave files on the host (a --workdir) retires its uid for good.
    pool.release(base + 2)
    assert pool.take(leaves_files=True) == base + 2
    pool.release(base + 2)
    with pytest.raises(sj.ResourceExhaustedError, match="job uid"):
        pool.take()
    assert json.load(open(tmp_path / sj.UID_FILE))["retired"] == [base + 2]
    restarted = sj.UidPool(str(tmp_path), base, 3)   # a new server: on from the last block
    restarted.load()
    restarted.keep(base)
    restarted.keep(base + 1)
    with pytest.raises(sj.ResourceExhaustedError, match="job uid"):
        restarted.take()   # base + 2 retired, the others held by records


@pytest.mark.tenants
def test_one_users_calls_hold_no_more_than_their_share_of_the_services_threads():
    """The service's threads for blocking calls serve every user (a unary call's or a
    StartWithFiles' engine calls go through JobService.in_users_thread): one user's many
    slow calls (removes of big folders) hold their share of the threads and wait, holding
    nothing, for more, while another user's call goes at once."""
    import asyncio
    service = sj.JobService(None, None, None, None)
    share = sj.SERVICE_THREADS_PER_USER
    assert share * 2 <= sj.SERVICE_THREADS
    release, holding, lock = threading.Event(), [], threading.Lock()

    def slow_call(user):   # (in a service thread)
        with lock:
            holding.append(user)
        assert release.wait(scaled(30))
        return user

    async def held(count):
        for _ in range(int(scaled(10) / 0.01)):
            if len(holding) >= count:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)   # (long enough for one more to have come, had it)
        return sorted(holding)

    async def scenario():
        alices = [asyncio.create_task(service.in_users_thread("alice", slow_call, "alice"))
                  for _ in range(share + 3)]
        assert await held(share) == ["alice"] * share
        bob = asyncio.create_task(service.in_users_thread("bob", slow_call, "bob"))
        assert await held(share + 1) == ["alice"] * share + ["bob"]
        release.set()
        done = await asyncio.wait_for(asyncio.gather(*alices, bob), scaled(10))
        assert done.count("alice") == share + 3 and holding.count("alice") == share + 3
    try:
        asyncio.run(scenario())
    finally:
        release.set()
        service.start_pool.shutdown()
        service.scan_pool.shutdown()


@pytest.mark.tenants
def test_a_job_removed_by_several_at_once_goes_once(engine):
    """Removers can race: `rm` naming a job twice (its calls go side by side), two users'
    rm, retention, `run --rm`. One of them removes the job, the others find it gone.
    Each used to remove it again: "removed" told twice, and its uid given back twice (so
    that, taken by a new job in between, it could go to a third job as well)."""
    job_id = engine.start("tester", ["true"])
    engine.wait(job_id, scaled(30))
    told, second = [], []

    def observer(kind, st, record):   # called by the first remover, under way
        if kind == "removed" and st.id == job_id:
            told.append(kind)
            if len(told) == 1:
                try:
                    engine.remove(job_id)
                    second.append("removed")
                except sj.NotFoundError:
                    second.append("not found")
    engine.observe(observer)
    try:
        engine.remove(job_id)
        assert (second, told) == (["not found"], ["removed"])
        with pytest.raises(sj.NotFoundError):
            engine.remove(job_id)
    finally:
        engine.unobserve(observer)


@pytest.mark.tenants
def test_a_removed_jobs_uid_is_not_given_to_the_next_job_nor_after_a_restart():
    with engine_that_goes_away() as (first, state_dir, root):
        a = first.start("tester", ["true"])
        b = first.start("tester", ["true"])
        ua, ub = first.wait(a, scaled(30)).uid, first.wait(b, scaled(30)).uid
        first.remove(a)
        uc = first.wait(first.start("tester", ["true"]), scaled(30)).uid
        assert ua < ub < uc
    with running_engine(state_dir=state_dir, cgroup_root=root) as second:
        ud = second.wait(second.start("tester", ["true"]), scaled(30)).uid
        assert ud > uc


@pytest.mark.tenants
def test_a_job_cannot_make_user_namespaces_or_reach_the_kernels_wider_surface():
    column = {"x86_64": 0, "aarch64": 1}.get(os.uname().machine)
    if column is None:
        pytest.skip("no syscall numbers for this architecture")
    calls = {name: sj.DENIED_SYSCALLS[name][column]
             for name in ("bpf", "keyctl", "add_key", "userfaultfd", "perf_event_open",
                          "mount", "setns", "init_module", "kexec_load", "open_by_handle_at")}
    probe = ("import ctypes, json\n"
             "libc = ctypes.CDLL(None, use_errno=True)\n"
             f"calls = {calls!r}\n"
             "out = {}\n"
             "for name, nr in calls.items():\n"
             "    ctypes.set_errno(0)\n"
             "    out[name] = (libc.syscall(nr, 0, 0, 0, 0, 0), ctypes.get_errno())\n"
             "print(json.dumps(out))\n")
    with running_engine(allow_root=True) as engine:
        for as_root in (False, True):
            st, out = run(engine, ["python3", "-c", probe], as_root=as_root)
            assert json.loads(out) == {name: [-1, errno.EPERM] for name in calls}, out
            st, out = sh(engine, "unshare -Ur true || echo refused", as_root=as_root)
            assert b"refused\n" in out.splitlines(keepends=True), out
        # Ordinary programs keep working: threads, subprocesses, compilers, git.
        tools = " && ".join(t for t in (
            "python3 -c 'import subprocess, threading; t = threading.Thread(target=print); "
            "t.start(); t.join(); subprocess.run([\"true\"], check=True)'",
            "git init -q repo" if shutil.which("git") else "",
            "printf 'int main(){return 0;}' > a.c && cc a.c -o a && ./a"
            if shutil.which("cc") else "",
            "make -v >/dev/null" if shutil.which("make") else "") if t)
        st, out = sh(engine, tools + " && echo all-ok")
        assert out.endswith(b"all-ok\n"), out
        if shutil.which("curl"):   # and a client on the host's network, to the host
            import http.server
            web = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
            threading.Thread(target=web.handle_request, daemon=True).start()
            st, out = sh(engine, f"curl -s -o /dev/null -w '%{{http_code}}' "
                                 f"http://127.0.0.1:{web.server_port}/", host_network=True)
            web.server_close()
            assert out == b"200", out


KSM_OFFER_PROBE = """
import ctypes, json, mmap
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
size = 4 * mmap.PAGESIZE
page = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                 mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
def call(f, *args):
    ctypes.set_errno(0)
    return [f(*args), ctypes.get_errno()]
print(json.dumps({
    "mergeable": call(libc.madvise, ctypes.c_void_p(page), ctypes.c_size_t(size), 12),
    "other_advice": call(libc.madvise, ctypes.c_void_p(page), ctypes.c_size_t(size), 4),
    "merge_all": call(libc.prctl, 67, 1, 0, 0, 0),
    "other_prctl": call(libc.prctl, 16, ctypes.create_string_buffer(16), 0, 0, 0)}))
"""


@pytest.mark.tenants
def test_a_job_cannot_offer_its_pages_to_kernel_samepage_merging():
    """Job supervisors offer their pages to KSM (advise_page_merging): a job that could offer
    its own could learn, by timing its writes, whether a page of another job's supervisor
    holds what it guessed. The filter answers as a kernel without KSM does (EINVAL); other
    advice and other prctl options work."""
    with running_engine(allow_root=True) as engine:
        for as_root in (False, True):
            st, out = run(engine, ["python3", "-c", KSM_OFFER_PROBE], as_root=as_root)
            assert st.exit_code == 0, out
            assert json.loads(out) == {"mergeable": [-1, errno.EINVAL], "other_advice": [0, 0],
                                       "merge_all": [-1, errno.EINVAL],
                                       "other_prctl": [0, 0]}, (as_root, out)


@pytest.mark.kernel
def test_jobs_folders_on_a_filesystem_of_their_own_still_reach_their_jobs():
    """An operator may give the jobs' folders (STATE_DIR/work) a filesystem of their own.
    Each job's view drops work/ from its copy of the host's mounts (and with it every other
    job's folder): a job whose working folder is on that disk (--workdir-size 0) must still
    find its own, not the empty folder beneath the operator's mount."""
    state_dir = new_state_dir()
    work = os.path.join(state_dir, "work")
    os.mkdir(work, 0o711)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0711", "tmpfs", work],
                   check=True)
    try:
        with running_engine(state_dir=state_dir, workdir_size=0) as engine:
            st, out = run(engine, ["sh", "-c", "echo kept > f && cat f"])
            assert (st.exit_code, out) == (0, b"kept\n"), (st, out)
            assert os.listdir(work), "the job's folder is not on the operator's filesystem"
    finally:
        remove_state_dir(state_dir)


@pytest.mark.tenants
def test_a_job_sees_no_other_jobs_working_folder_not_even_in_its_mount_table(server):
    """Each job's working folder is a mount on the host (in the state folder's work/), and
    a job's view starts as a copy of the host's mounts: unless they are dropped, a job's
    /proc/self/mountinfo names every other running job (its id), and each job holds a
    copy of every other's mount (the kernel's memory for them grew with the square of the
    jobs running: 54 MiB at 500 jobs, 200 MiB at 1,000)."""
    mounts = "grep -c . /proc/self/mountinfo; cat /proc/self/mountinfo"
    first = cli(server, "run", "-f", mounts, user="alice")
    others = []
    try:
        for _ in range(10):
            others.append(start_job(server, "sleep 300"))
        later = cli(server, "run", "-f", mounts, user="alice")
        assert first.returncode == later.returncode == 0, (first.stderr, later.stderr)
        assert not [job_id for job_id in others if job_id in later.stdout.decode()]
        # Other tests' and the host's mounts may come and go meanwhile: ten more jobs
        # must not bring (at least) ten more mounts.
        def mount_points(run):
            return {line.split()[4] for line in run.stdout.decode().splitlines()[1:]}
        grown = mount_points(later) - mount_points(first)
        assert len(grown) < len(others), sorted(grown)
    finally:
        if others:
            cli(server, "rm", "-f", *others)


@pytest.mark.tenants
def test_the_jobs_pid_1_its_supervisor_is_out_of_its_reach(server):
    """A job's pid 1 is its shim: root, in the host's mount namespace. Neither a job nor a
    root job may read its environment or descriptors, reach the host's files through its
    root, signal it away or ptrace it; what exec runs in the job may not either."""
    probe = ("import ctypes, os, signal\n"
             "out = []\n"
             "try:   # (a --root job may read it: nothing of the server's environment)\n"
             "    names = sorted(v.split(b'=')[0].decode() for v in\n"
             "                   open('/proc/1/environ', 'rb').read().split(b'\\0') if v)\n"
             "    out.append(' '.join(n for n in names if n not in ('PATH', 'STEVE_JOBS_TIME_SCALE')\n"
             "                        ) or 'clean')\n"
             "except OSError as e:\n"
             "    out.append(e.strerror)\n"
             "for path in ('/proc/1/root/etc/hostname', '/proc/1/fd/0', '/proc/1/mem'):\n"
             "    try:\n"
             "        open(path, 'rb').read(1); out.append('read ' + path)\n"
             "    except OSError as e:\n"
             "        out.append(e.strerror)\n"
             "libc = ctypes.CDLL(None, use_errno=True)\n"
             "attached = libc.ptrace(16, 1, 0, 0)   # PTRACE_ATTACH\n"
             "out.append('attached' if attached == 0 else os.strerror(ctypes.get_errno()))\n"
             "try:   # (SIGTERM, if it may: what is sent to pid 1 is the command's)\n"
             "    os.kill(1, signal.SIGKILL)\n"
             "except OSError as e:\n"
             "    out.append(e.strerror)\n"
             "print(' | '.join(out), flush=True)\n"
             "import time; time.sleep(0.3)\n"
             "print(open('/proc/1/comm').read().strip())\n")
    for flags in ((), ("--root",)):
        done = cli(server, "run", "-f", *flags, "--", "python3", "-c", probe)
        said, comm = done.stdout.decode().splitlines()
        assert "read " not in said and "attached" not in said, (flags, said)
        assert said.split(" | ")[0] in ("clean", "Permission denied"), said
        assert comm == "steve-init" and done.returncode == 0, done   # (pid 1 lives on)
    job_id = start_job(server, "sleep 60", "mrarsenal", "", "--root")
    try:
        done = cli(server, "exec", job_id, "--", "python3", "-c", probe)
        assert b"read " not in done.stdout and b"attached" not in done.stdout, done
        assert b"steve-init" in done.stdout, done
        assert cli_json(server, "status", job_id)["state"] == "running"
    finally:
        cli(server, "stop", "--grace", "0", job_id)


@pytest.mark.tenants
def test_an_admin_may_ask_for_a_writable_host_and_gets_it_for_that_job_only():
    target = f"/var/lib/steve-jobs-test-rw-{uuid.uuid4().hex[:8]}"
    with running_engine(allow_root=True) as engine:
        try:
            st, out = sh(engine, f"touch {target} && echo wrote", as_root=True, rw_host=True)
            assert out == b"wrote\n" and os.path.exists(target), out
            assert engine.status(st.id).options.rw_host
            os.unlink(target)
            st, out = sh(engine, f"touch {target} || echo refused", as_root=True)
            assert b"refused\n" in out.splitlines(keepends=True), out
            assert not os.path.exists(target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)


@pytest.mark.tenants
@pytest.mark.parametrize("way", ["make_mounts_read_only", "remount_each_read_only"])
def test_both_ways_of_making_the_host_read_only_cover_every_mount(way):
    require_kernel()
    probe = (f"import os, steve_jobs as sj\n"
             f"sj.mount(None, '/', None, sj.MS_REC | sj.MS_PRIVATE)\n"
             f"sj.{way}('/')\n"
             f"for path in ('/var/tmp', '/dev/shm', '/run', '/sys/fs/cgroup', '/proc/sys'):\n"
             f"    try:\n"
             f"        os.mkdir(path + '/steve-jobs-test-ro')\n"
             f"        print('WROTE', path)\n"
             f"    except OSError as e:\n"
             f"        print(path, e.errno)\n")
    done = subprocess.run(["unshare", "--mount", PYTHON, "-c", probe], cwd=HERE,
                          capture_output=True, timeout=scaled(30))
    assert done.returncode == 0 and b"WROTE" not in done.stdout, done
    assert done.stdout.count(b" %d\n" % errno.EROFS) >= 3, done.stdout


@pytest.mark.tenants
def test_running_out_of_file_handles_is_resource_exhausted_not_internal(caplog):
    code, message, _, _ = sj.rpc_status(OSError(errno.EMFILE, "Too many open files"))
    assert code == "RESOURCE_EXHAUSTED" and "file handles" in message
    assert "Traceback" not in caplog.text


###############################################################################
# Host tests: where the server puts itself and its jobs on real hosts (a systemd unit
# with Delegate=yes, a container's cgroup namespace) and what old kernels lack. On a pure
# cgroup v2 kernel (.ci/v2vm) these meet v2's no-internal-process rule for real.
###############################################################################

LAUNCH_IN_CGROUP = """\
import os, sys
sys.path.insert(0, sys.argv[1])
import steve_jobs as sj
cgroup, kind, unified = sys.argv[2], sys.argv[3], sys.argv[4]
with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
    f.write("0")
if kind.startswith("container"):   # docker --cgroupns=private: a namespace rooted there
    sj.unshare(sj.CLONE_NEWCGROUP | sj.CLONE_NEWNS)
    sj.mount(None, "/", None, sj.MS_REC | sj.MS_PRIVATE)
    sj.umount_lazy(unified)   # (mounting over the host's view is refused: EBUSY)
    sj.mount("cgroup2", unified, "cgroup2", sj.MS_RDONLY if kind.endswith("-ro") else 0)
os.execv(sys.argv[5], sys.argv[5:])
"""


def launched_in(cgroup, kind="service"):
    """A Server prefix that starts it in cgroup (kind 'container': in a cgroup namespace
    rooted there, with its own cgroup2 mount, as a container engine does)."""
    return [PYTHON, "-c", LAUNCH_IN_CGROUP, HERE, cgroup, kind, sj.CgroupLayout.detect().unified]


@contextlib.contextmanager
def a_cgroup_of_its_own(kind, delegated=False):
    """A fresh cgroup under the unified root, as systemd makes for a unit (delegated: with
    the trusted.delegate xattr) or a container engine for a container. Afterwards every
    process in it is killed and every folder removed."""
    require_kernel()
    layout = sj.CgroupLayout.detect()
    path = os.path.join(layout.unified, f"steve-jobs-test-{kind}-{uuid.uuid4().hex[:8]}")
    if layout.v2:   # as the host's manager would: controllers for its children
        # (In a container, the tests' own process must leave its cgroup for that, as the
        # server does: the first engine of the run usually did it already.)
        placement = sj.detect_placement(layout, "")
        if placement.supervisor:
            sj.move_into_leaf(os.path.dirname(placement.supervisor), placement.supervisor)
        with open(os.path.join(layout.unified, "cgroup.subtree_control"), "w") as f:
            f.write(" ".join("+" + c for c in layout.v2))
    os.mkdir(path)
    try:
        if delegated:
            os.setxattr(path, "trusted.delegate", b"1")
        yield path
    finally:
        folders = [d for d, _, _ in os.walk(path, topdown=False)]
        for d in folders:
            with contextlib.suppress(OSError):
                if os.path.exists(f"{d}/cgroup.kill"):
                    sj.write_file(f"{d}/cgroup.kill", "1")
                else:
                    for pid in sj.read_file(f"{d}/cgroup.procs", "").split():
                        os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + scaled(5)
        for d in folders:
            while os.path.exists(d) and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    os.rmdir(d)
                time.sleep(0.01)
        left = [d for d in folders if os.path.exists(d)]
        assert not left, f"cgroups left behind: {left}"


def cgroup_of(pid):
    return sj.own_cgroup(sj.read_file(f"/proc/{pid}/cgroup"))


@pytest.mark.hosts
def test_a_server_in_a_containers_cgroup_namespace_moves_into_a_leaf(certs):
    with a_cgroup_of_its_own("container") as container:
        srv = Server(certs, prefix=launched_in(container, "container"),
                     extra=["--stop-jobs-on-exit"])
        try:
            srv.start()
            assert "(a container)" in srv.read_log()
            # Seen from the host: the server left its container's cgroup for a leaf...
            name = os.path.basename(container)
            assert cgroup_of(srv.proc.pid) == f"/{name}/supervisor"
            job_id = start_job(srv, "echo ok; sleep 1000")
            # ... and its jobs are in the container's cgroup too, not at the host's root.
            jobs = os.path.join(container, srv.cgroup_root)
            assert [n for n in os.listdir(jobs) if n.startswith("j-")], os.listdir(jobs)
            layout = sj.CgroupLayout.detect()
            assert not os.path.exists(os.path.join(layout.unified, srv.cgroup_root))
            st = cli_json(srv, "stop", "--grace", "1", job_id)
            assert st["state"] == "stopped" and cli(srv, "output", job_id).stdout == b"ok\n"
            done = cli(srv, "run", "-f", "--memory", "64M", "--pids", "20", "echo limited")
            assert done.returncode == 0 and done.stdout == b"limited\n", done.stderr
        finally:
            srv.terminate()
            remove_state_dir(srv.state_dir)
        assert not os.path.exists(os.path.join(container, srv.cgroup_root))


@pytest.mark.hosts
def test_a_container_without_a_writable_cgroup_mount_is_refused_in_one_line(certs):
    with a_cgroup_of_its_own("container") as container:
        srv = Server(certs, prefix=launched_in(container, "container-ro"))
        try:
            with pytest.raises(AssertionError, match="did not start"):
                srv.start()
            assert srv.proc.wait(scaled(30)) == 1
            last = srv.read_log().strip().splitlines()[-1]
            assert "Read-only file system" in last and "read-write /sys/fs/cgroup" in last
            assert "Traceback" not in srv.read_log()
        finally:
            srv.terminate()
            remove_state_dir(srv.state_dir)


@pytest.mark.hosts
def test_a_server_in_a_delegated_unit_keeps_to_its_subtree_and_survives_a_restart(certs):
    with a_cgroup_of_its_own("unit.service", delegated=True) as unit:
        srv = Server(certs, prefix=launched_in(unit))
        try:
            srv.start()
            log = srv.read_log()
            assert "Delegate=yes" in log and f"jobs in {unit}/{srv.cgroup_root}" in log, log
            unified = sj.CgroupLayout.detect().unified
            assert cgroup_of(srv.proc.pid) == f"/{os.path.relpath(unit, unified)}/supervisor"
            job_id = start_job(srv, "echo ok; sleep 1000")
            assert not os.path.exists(os.path.join(unified, srv.cgroup_root))
            # systemctl restart with KillMode=process: only the server dies; systemd
            # starts the next one in the leaf (DelegateSubgroup=supervisor).
            srv.prefix = launched_in(os.path.join(unit, "supervisor"))
            srv.restart()
            assert cli_json(srv, "status", job_id)["state"] == "running"
            assert cli_json(srv, "stop", "--grace", "1", job_id)["state"] == "stopped"
            srv.terminate()
            # No job left: the controllers are handed back, so that a systemd before 254
            # can start the next server in the unit's cgroup.
            assert not os.path.exists(os.path.join(unit, srv.cgroup_root))
            assert sj.read_file(os.path.join(unit, "cgroup.subtree_control")).split() == []
        finally:
            srv.cleanup()
            remove_state_dir(srv.state_dir)


@pytest.mark.hosts
def test_a_job_is_killed_without_cgroup_kill_as_on_kernels_before_5_14(engine):
    job_id = engine.start("tester", ["sh", "-c", "sleep 1000 & sleep 1000 & echo up; wait"])
    deadline = time.monotonic() + scaled(10)
    while b"up" not in engine.read_output(job_id) and time.monotonic() < deadline:
        time.sleep(0.02)
    engine._get(job_id).cgroup.kill_by_signals()
    st = engine.wait(job_id, scaled(30))
    assert st.state in sj.ENDED_STATES and st.signal == signal.SIGKILL, st


###############################################################################
# API tests: the v1 API and CLI as users of docker, kubectl and ssh use them
###############################################################################

class Api:
    """A stub for user on server, calls raising grpc.RpcError as any gRPC client sees."""

    def __init__(self, server, user="mrarsenal", **options):
        self.grpc, self.pb = grpc, pb
        # options: a stock client's limits, e.g. the 4 MiB default receive size
        self.channel = user_channel(server.certs, server.address, user, options=options)
        self.stub = pb_grpc.JobServiceStub(self.channel)
        self.metadata = bearer(server.certs, user)

    def __getattr__(self, method):
        rpc = getattr(self.stub, method)
        return lambda request, timeout=scaled(30): rpc(request, metadata=self.metadata,
                                                       timeout=timeout)

    def error(self, method, request, **kw):
        """(code name, reason, field, message) of a call that must fail."""
        with pytest.raises(self.grpc.RpcError) as info:
            getattr(self, method)(request, **kw)
        e = info.value
        trailer = dict(e.trailing_metadata() or ())
        reason, field = sj.error_reason(trailer.get(sj.STATUS_DETAILS_KEY, b""))
        return e.code().name, reason, field, e.details()

    def close(self):
        self.channel.close()


@pytest.fixture(scope="module")
def api_server(certs):
    """The API tests' own server: their lists see their jobs only."""
    yield from serving(certs)


@pytest.fixture
def api(api_server):
    client = Api(api_server)
    yield client
    client.close()


def started(api, argv, **fields):
    return api.Start(api.pb.StartRequest(argv=argv, **fields))


@pytest.mark.api
def test_list_of_many_big_jobs_fits_a_stock_client_and_pages_through_all(api_server):
    """Reproduction: 40 jobs of ~120 KB argv made List 4.8 MB, over a stock client's 4 MiB."""
    alice = Api(api_server, "alice")
    stock = Api(api_server, "alice", **{"grpc.max_receive_message_length": 4 * sj.MiB})
    try:
        ids = [started(alice, ["/bin/true", f"{i}" + "x" * 120_000]).job_id for i in range(40)]
        first = stock.List(stock.pb.ListRequest())
        assert [j.job_id for j in first.jobs] == ids and not first.next_page_token
        assert all(j.view == stock.pb.VIEW_SUMMARY and len(j.argv[1]) < 300
                   and not j.HasField("limits") for j in first.jobs)
        pages, token = [], ""
        while True:   # the full view pages by size: 3 MiB at most per response
            page = stock.List(stock.pb.ListRequest(view=stock.pb.VIEW_FULL, page_size=1000,
                                                   page_token=token))
            pages.append([j.job_id for j in page.jobs])
            assert page.ByteSize() <= 3 * sj.MiB + 64 * sj.KiB
            token = page.next_page_token
            if not token:
                break
        assert len(pages) == 2 and sum(pages, []) == ids
        small = [j.job_id for p in (stock.List(stock.pb.ListRequest(page_size=15, page_token=t))
                                    for t in ("",)) for j in p.jobs]
        assert small == ids[:15]
        listed = cli(api_server, "list", user="alice")   # the CLI pages transparently
        assert listed.returncode == 0, listed.stderr
        assert sum(i in listed.stdout.decode() for i in ids) == 40
        assert alice.error("List", alice.pb.ListRequest(page_token="nonsense"))[:3] == (
            "INVALID_ARGUMENT", "INVALID_ARGUMENT", "page_token")
        assert alice.error("List", alice.pb.ListRequest(page_size=1001))[2] == "page_size"
    finally:
        for job_id in ids:
            alice.Remove(alice.pb.JobRef(job_id=job_id))
        alice.close()
        stock.close()


@pytest.mark.api
def test_list_filters_by_state_label_name_and_owner(api, api_server):
    pb = api.pb
    tag = uuid.uuid4().hex[:8]
    done = started(api, ["true"], labels={"batch": tag, "kind": "quick"}, name=f"q-{tag}")
    slow = started(api, ["sleep", "30"], labels={"batch": tag})
    api.Wait(pb.JobRef(job_id=done.job_id))

    def ids(**request):
        return [j.job_id for j in api.List(pb.ListRequest(**request)).jobs]
    assert ids(labels={"batch": tag}) == [done.job_id, slow.job_id]
    assert ids(labels={"batch": tag, "kind": "quick"}) == [done.job_id]
    assert ids(labels={"batch": tag}, states=[pb.STATE_RUNNING]) == [slow.job_id]
    assert ids(name=f"q-{tag}") == [done.job_id]
    assert ids(labels={"batch": tag}, owner="alice") == []
    alice = Api(api_server, "alice")
    try:
        assert alice.error("List", pb.ListRequest(owner="mrarsenal"))[0] == "PERMISSION_DENIED"
    finally:
        alice.close()
    listed = cli(api_server, "list", "--label", f"batch={tag}", "--state", "running")
    assert slow.job_id in listed.stdout.decode() and done.job_id not in listed.stdout.decode()
    api.Stop(pb.StopRequest(job_id=slow.job_id, grace_seconds=0))


@pytest.mark.api
def test_wait_returns_when_the_job_ends_and_honors_the_deadline(api, api_server):
    pb = api.pb
    job = started(api, ["/bin/sh", "-c", "sleep 1; exit 3"])
    began = time.monotonic()
    st = api.Wait(pb.JobRef(job_id=job.job_id))
    assert st.state == pb.STATE_EXITED and st.exit_code == 3 and st.HasField("end_time")
    assert time.monotonic() - began < scaled(10)
    slow = started(api, ["sleep", "60"])
    assert api.error("Wait", pb.JobRef(job_id=slow.job_id), timeout=0.5)[0] == \
        "DEADLINE_EXCEEDED"
    assert api.Status(pb.JobRef(job_id=slow.job_id)).state == pb.STATE_RUNNING
    waited = cli(api_server, "wait", "--timeout", "0.5", slow.job_id)
    assert waited.returncode == 10, waited.stderr
    # `docker wait`: the exit code printed, and the command's own exit code
    waited = cli(api_server, "wait", job.job_id)
    assert (waited.returncode, waited.stdout) == (3, b"3\n")
    api.Stop(pb.StopRequest(job_id=slow.job_id, grace_seconds=0))
    waited = cli(api_server, "wait", slow.job_id)
    assert (waited.returncode, waited.stdout) == (137, b"137\n")
    # several: each waited for, an unknown one named on its own line, its code the exit's
    waited = cli(api_server, "wait", slow.job_id, "no-such-job", job.job_id)
    assert (waited.returncode, waited.stdout) == (3, b"137\n3\n"), waited.stderr
    assert b"no-such-job" in waited.stderr
    still = started(api, ["sleep", "60"])
    waited = cli(api_server, "wait", "--timeout", "0.5", still.job_id, job.job_id)
    assert (waited.returncode, waited.stdout) == (10, b""), waited.stderr
    assert waited.stderr.decode().count("\n") == 2 and job.job_id in waited.stderr.decode()
    api.Stop(pb.StopRequest(job_id=still.job_id, grace_seconds=0))


@pytest.mark.api
def test_signal_reaches_the_command_or_every_process(api, api_server):
    pb = api.pb
    script = ("trap 'echo parent got USR1' USR1; "
              "(trap 'echo child got USR1; exit' USR1; while :; do sleep 0.05; done) & "
              "while :; do sleep 0.05; done")
    job = started(api, ["/bin/sh", "-c", script])
    time.sleep(0.5 * sj.TIME_SCALE)

    def output_has(text):
        deadline = time.monotonic() + scaled(10)
        while time.monotonic() < deadline:
            out = b"".join(c.data for c in api.Output(pb.OutputRequest(job_id=job.job_id)))
            if text in out:
                return out
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} in {out!r}")
    killed = cli(api_server, "kill", "-s", "usr1", job.job_id[:8])   # a prefix will do
    assert killed.returncode == 0, killed.stderr
    out = output_has(b"parent got USR1")
    assert b"child" not in out
    api.Signal(pb.SignalRequest(job_id=job.job_id, signal=signal.SIGUSR1, all=True))
    assert b"child got USR1" in output_has(b"child got USR1")
    assert api.error("Signal", pb.SignalRequest(job_id=job.job_id, signal=99))[:3] == (
        "INVALID_ARGUMENT", "INVALID_ARGUMENT", "signal")
    assert cli(api_server, "kill", job.job_id).returncode == 0   # SIGKILL, as docker kill
    st = api.Wait(pb.JobRef(job_id=job.job_id))
    assert st.state == pb.STATE_KILLED and st.signal == signal.SIGKILL
    code, reason, _, _ = api.error("Signal", pb.SignalRequest(job_id=job.job_id, signal=15))
    assert (code, reason) == ("FAILED_PRECONDITION", "JOB_NOT_RUNNING")


@pytest.mark.api
def test_a_retried_start_with_the_same_request_id_starts_nothing_more(api):
    pb = api.pb
    rid = uuid.uuid4().hex
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        ids = set(pool.map(lambda _: started(api, ["sleep", "0.2"], request_id=rid).job_id,
                           range(6)))
    assert len(ids) == 1
    again = started(api, ["sleep", "0.2"], request_id=rid)
    assert {again.job_id} == ids and again.request_id == rid
    code, reason, field, _ = api.error("Start", pb.StartRequest(argv=["true"], request_id=rid))
    assert (code, reason, field) == ("INVALID_ARGUMENT", "REQUEST_ID_REUSED", "request_id")
    other = started(api, ["sleep", "0.2"], request_id=uuid.uuid4().hex)
    assert other.job_id not in ids


@pytest.mark.api
def test_a_server_killed_during_a_burst_of_starts_leaves_no_job_its_client_missed(certs):
    """Reproduction: a server killed during 50 starts left 10 jobs whose clients were told
    the start failed. The CLI retries once with the same request id."""
    with Server(certs, extra=["--stop-jobs-on-exit"]) as srv:
        clients = [subprocess.Popen(
            [PYTHON, SCRIPT, "--server", srv.address, "--certs", srv.certs, "run",
             f"sleep 300 # {i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for i in range(30)]
        deadline = time.monotonic() + scaled(30)
        while srv.read_log().count("method=Start") < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.terminate(signal.SIGKILL)
        srv.start()   # the same address: the clients' retry finds it
        told = set()
        for c in clients:
            out, err = c.communicate(timeout=scaled(60))
            assert c.returncode == 0, err
            told.add(out.decode().strip())
        api = Api(srv)
        try:
            running = {j.job_id for j in api.List(api.pb.ListRequest()).jobs}
        finally:
            api.close()
        assert running == told and len(told) == 30


@pytest.mark.api
def test_names_labels_and_id_prefixes_stand_for_a_job(api, api_server):
    pb = api.pb
    name = f"build-{uuid.uuid4().hex[:6]}"
    done = cli(api_server, "run", "--name", name, "--label", "team=ci", "echo", "hi", "there")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.decode().strip()
    st = api.Wait(pb.JobRef(job_id=name))
    assert (st.job_id, st.name, dict(st.labels)) == (job_id, name, {"team": "ci"})
    assert list(st.argv) == ["/bin/sh", "-c", "echo hi there"]   # ssh's rule
    assert cli(api_server, "output", name).stdout == b"hi there\n"
    assert cli(api_server, "output", job_id[:10]).stdout == b"hi there\n"
    code, reason, field, _ = api.error("Start", pb.StartRequest(argv=["true"], name=name))
    assert (code, reason, field) == ("ALREADY_EXISTS", "NAME_TAKEN", "name")
    taken = cli(api_server, "run", "--name", name, "true")
    assert taken.returncode == 11 and taken.stderr.count(b"\n") == 1
    # a name is its owner's: alice neither sees it nor is kept from using it
    alice = Api(api_server, "alice")
    try:
        assert alice.error("Status", pb.JobRef(job_id=name))[:2] == ("NOT_FOUND", "JOB_NOT_FOUND")
        assert alice.error("Status", pb.JobRef(job_id=job_id[:10]))[0] == "NOT_FOUND"
        mine = started(alice, ["true"], name=name)
        assert alice.Status(pb.JobRef(job_id=name)).job_id == mine.job_id
        alice.Wait(pb.JobRef(job_id=name))
        alice.Remove(pb.JobRef(job_id=name))
    finally:
        alice.close()
    for _ in range(40):   # enough jobs that some share a first hex digit
        started(api, ["true"])
    ids = [j.job_id for j in api.List(pb.ListRequest(all_users=True, page_size=1000)).jobs]
    shared = next(i[0] for i in ids if sum(j.startswith(i[0]) for j in ids) > 1)
    code, reason, field, _ = api.error("Status", pb.JobRef(job_id=shared))
    assert (code, reason, field) == ("INVALID_ARGUMENT", "AMBIGUOUS_JOB_ID", "job_id")
    api.Remove(pb.JobRef(job_id=name))
    assert started(api, ["true"], name=name).name == name   # free again once removed
    for bad in ("-x", "a b", "x" * 65, str(uuid.uuid4())):
        assert api.error("Start", pb.StartRequest(argv=["true"], name=bad))[2] == "name"


@pytest.mark.api
def test_stdout_and_stderr_stay_apart_in_their_merged_order(api, api_server):
    pb = api.pb
    job = started(api, ["/bin/sh", "-c", "echo o1; sleep 0.05; echo e1 >&2; sleep 0.05; "
                                         "echo o2; sleep 0.05; echo e2 >&2"])
    api.Wait(pb.JobRef(job_id=job.job_id))
    chunks = list(api.Output(pb.OutputRequest(job_id=job.job_id)))
    assert [(c.stream, c.data) for c in chunks] == [
        (pb.STREAM_STDOUT, b"o1\n"), (pb.STREAM_STDERR, b"e1\n"),
        (pb.STREAM_STDOUT, b"o2\n"), (pb.STREAM_STDERR, b"e2\n")]
    assert [c.offset for c in chunks] == [0, 3, 6, 9]   # offsets in the merged output
    only_err = list(api.Output(pb.OutputRequest(job_id=job.job_id, stream=pb.STREAM_STDERR)))
    assert [(c.offset, c.data) for c in only_err] == [(3, b"e1\n"), (9, b"e2\n")]
    out = cli(api_server, "run", "-f", "echo to-out; echo to-err >&2")
    assert out.stdout == b"to-out\n" and out.stderr.endswith(b"to-err\n")
    quiet = cli(api_server, "output", "--stderr", job.job_id)
    assert (quiet.stdout, quiet.stderr) == (b"", b"e1\ne2\n")


@pytest.mark.api
def test_tail_since_and_timestamps(api, api_server):
    pb = api.pb
    job = started(api, ["/bin/sh", "-c", "for i in 1 2 3 4 5; do echo line $i; done; sleep 1.2;"
                                         " echo late >&2; sleep 0.05; echo later"])
    api.Wait(pb.JobRef(job_id=job.job_id))

    def text(**request):
        return b"".join(c.data for c in api.Output(pb.OutputRequest(job_id=job.job_id,
                                                                     **request)))
    assert text(tail_lines=2) == b"late\nlater\n"
    assert text(tail_lines=2, stream=pb.STREAM_STDOUT) == b"line 5\nlater\n"
    assert text(tail_bytes=6) == b"later\n"
    assert text(tail_lines=100) == text()
    chunks = list(api.Output(pb.OutputRequest(job_id=job.job_id, timestamps=True)))
    times = [c.time.ToNanoseconds() / 1e9 for c in chunks]
    assert all(c.HasField("time") for c in chunks) and times == sorted(times)
    assert times[-1] - times[0] >= 1.0
    since = pb.OutputRequest(job_id=job.job_id)
    since.since.FromNanoseconds(int((times[0] + 0.6) * 1e9))
    assert b"".join(c.data for c in api.Output(since)) == b"late\nlater\n"
    tailed = cli(api_server, "output", "--tail", "1", "--timestamps", job.job_id)
    assert re.fullmatch(rb"\d{4}-\d\d-\d\dT[\d:.]+Z later\n", tailed.stdout), tailed.stdout
    recent = cli(api_server, "output", "--since", "1h", job.job_id)
    assert recent.stdout == text(stream=pb.STREAM_STDOUT)
    bad = cli(api_server, "output", "--since", "yesterday", job.job_id)
    assert bad.returncode == 2 and b"invalid time 'yesterday'" in bad.stderr


@pytest.mark.api
def test_json_output_is_documented_and_absent_while_unknown(api_server):
    listed = cli_json(api_server, "run", "sleep 30")
    assert "end_time" not in listed and "ended_at" not in listed and listed["create_time"]
    readme = open(os.path.join(os.path.dirname(SCRIPT), "README.md")).read()
    for field in listed:
        assert f"`{field}`" in readme, f"README: JSON output does not describe {field}"
    lines = cli(api_server, "--json", "run", "-f", "echo hi; echo ho >&2").stdout.splitlines()
    objects = [json.loads(line) for line in lines]   # JSON Lines, each line one object
    assert objects[0]["job_id"] and objects[-1]["state"] == "exited"
    assert [(o["stream"], o["data_b64"]) for o in objects[1:-1]] == [
        ("stdout", "aGkK"), ("stderr", "aG8K")]
    error = cli(api_server, "--json", "status", "no-such-job")
    assert error.returncode == 3
    assert json.loads(error.stdout)["error"]["reason"] == "JOB_NOT_FOUND"
    cli(api_server, "stop", "--grace", "0", listed["job_id"])


@pytest.mark.api
def test_cli_habits_sizes_env_values_utf8_and_version(api_server, tmp_path):
    bad = cli(api_server, "run", "--memory", "10XB", "true")
    assert bad.returncode == 2 and bad.stderr.count(b"\n") == 1
    assert b"invalid size '10XB': use a number with K, M, G or T (powers of 1024)" in bad.stderr
    big = cli(api_server, "run", "--memory", "999G", "true")
    assert big.returncode == 4 and b"16.0GiB" in big.stderr, big.stderr
    env = {**os.environ, "STEVE_JOBS_MAX_JOBS": "lots"}
    listed = cli(api_server, "list", env=env)   # a server variable does not break clients
    assert listed.returncode == 0, listed.stderr
    refused = subprocess.run([PYTHON, SCRIPT, "server"], env=env, capture_output=True)
    assert refused.returncode == 2 and refused.stderr.count(b"\n") == 1
    assert b"STEVE_JOBS_MAX_JOBS" in refused.stderr and b"Traceback" not in refused.stderr
    odd = cli(api_server, "run", "--", "echo", b"\xff\xfe".decode(errors="surrogateescape"))
    assert odd.returncode == 2 and b"not valid UTF-8" in odd.stderr
    assert b"Traceback" not in odd.stderr
    version = cli(api_server, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"steve-jobs {sj.__version__}".encode()
    assert b"exit codes:" in cli(api_server, "--help").stdout
    server_help = b" ".join(cli(api_server, "server", "--help").stdout.split())
    assert b"running jobs at most; more starts are RESOURCE_EXHAUSTED (env " \
        b"STEVE_JOBS_MAX_JOBS) (default: 1024)" in server_help


@pytest.mark.api
def test_ctrl_c_while_the_cli_starts_up_or_waits_exits_130_quietly(api_server):
    job_id = start_job(api_server, "sleep 60")
    # Not before Python has compiled the script (Python's own traceback then): timed here.
    began = time.monotonic()
    subprocess.run([PYTHON, "-c", f"compile(open({SCRIPT!r}).read(), 'x', 'exec')"], check=True)
    compiled = time.monotonic() - began
    for delay in (1.5 * compiled, 2 * compiled + 0.1, 1.5):   # loading, connecting, waiting
        proc = subprocess.Popen([PYTHON, SCRIPT, "--server", api_server.address,
                                 "--certs", api_server.certs, "wait", job_id],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=scaled(30))
        assert proc.returncode == 130 and b"Traceback" not in err, (delay, err)
    cli(api_server, "stop", "--grace", "0", job_id)


@pytest.mark.api
def test_contexts_name_a_server_user_and_certificates(api_server, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'current-context = "nowhere"\n\n'
                      f'[contexts.nowhere]\nserver = "127.0.0.1:1"\nuser = "alice"\n'
                      f'certs = "{api_server.certs}"\n\n'
                      f'[contexts.here]\nserver = "{api_server.address}"\nuser = "alice"\n'
                      f'certs = "{api_server.certs}"\n')
    env = {**os.environ, "STEVE_JOBS_CONFIG": str(config)}

    def run(*args, **extra):
        return subprocess.run([PYTHON, SCRIPT, *args], capture_output=True,
                              env={**env, **extra}, timeout=scaled(60))
    assert run("list").returncode == 8   # nowhere: unreachable
    assert run("--context", "here", "list").returncode == 0
    assert run("list", STEVE_JOBS_CONTEXT="here").returncode == 0
    assert run("--server", api_server.address, "list").returncode == 0   # flags win
    assert run("context", "use", "here").returncode == 0
    assert 'current-context = "here"' in config.read_text()
    done = run("run", "echo", "hello")
    assert done.returncode == 0, done.stderr
    status = json.loads(run("--json", "status", done.stdout.decode().strip()).stdout)
    assert status["owner"] == "alice"
    assert run("context", "list", "-q").stdout == b"nowhere\nhere\n"
    unknown = run("--context", "gone", "list")
    assert unknown.returncode == 2 and b"no context 'gone'" in unknown.stderr


@pytest.mark.api
def test_completion_completes_commands_and_job_names(api_server, tmp_path):
    name = f"comp-{uuid.uuid4().hex[:6]}"
    assert cli(api_server, "run", "--name", name, "true").returncode == 0
    script = cli(api_server, "completion", "bash").stdout.decode()
    wrapper = tmp_path / "steve-jobs"
    wrapper.write_text(f"#!/bin/sh\nexec {PYTHON} {SCRIPT} --server {api_server.address} "
                       f"--certs {api_server.certs} \"$@\"\n")
    wrapper.chmod(0o755)
    probe = (f"{script}\nCOMP_WORDS=({wrapper} sta); COMP_CWORD=1; _steve_jobs; "
             f"echo \"${{COMPREPLY[*]}}\"\n"
             f"COMP_WORDS=({wrapper} status {name[:6]}); COMP_CWORD=2; _steve_jobs; "
             f"echo \"${{COMPREPLY[*]}}\"\n")
    out = subprocess.run(["bash", "-c", probe], capture_output=True, timeout=scaled(60))
    assert out.stdout.decode().splitlines() == ["status", name], out.stderr


@pytest.mark.api
def test_tls_failures_say_what_is_wrong(api_server, other_ca_certs, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(api_server.certs, mixed)
    for f in ("mrarsenal.crt", "mrarsenal.key"):   # a client certificate of another CA
        shutil.copy(os.path.join(other_ca_certs, f), mixed / f)
    refused = subprocess.run([PYTHON, SCRIPT, "--server", api_server.address, "--certs",
                              str(mixed), "list"], capture_output=True, timeout=scaled(60))
    assert refused.returncode == 8
    assert b"refused the client certificate" in refused.stderr, refused.stderr
    untrusted = tmp_path / "untrusted"
    shutil.copytree(api_server.certs, untrusted)
    shutil.copy(os.path.join(other_ca_certs, "ca.crt"), untrusted / "ca.crt")
    done = subprocess.run([PYTHON, SCRIPT, "--server", api_server.address, "--certs",
                           str(untrusted), "list"], capture_output=True, timeout=scaled(60))
    assert b"not signed by" in done.stderr and b"not the server you trust" in done.stderr, \
        done.stderr
    nobody = subprocess.run([PYTHON, SCRIPT, "--server", f"127.0.0.1:{free_port()}",
                             "--certs", api_server.certs, "list"], capture_output=True,
                            timeout=scaled(60))
    assert nobody.returncode == 8 and b"cannot reach the server" in nobody.stderr
    code, _ = call(api_server.certs, api_server.address, "List", pb.ListRequest(), token="x.y.z")
    assert code == "UNAUTHENTICATED"   # the server says who was refused, and why
    # The line is written as the call ends: the client may see the status a moment before.
    wait_for(lambda: re.search(r"peer=ipv4:127\.0\.0\.1:\d+ method=List job=- "
                               r"result=UNAUTHENTICATED why=invalid\\x20token",
                               api_server.read_log()))


@pytest.mark.api
def test_outside_its_environment_the_script_says_how_to_set_up(tmp_path):
    plain = subprocess.run([sys.executable, "-I", "-S", SCRIPT, "list"], capture_output=True,
                           timeout=60)
    assert plain.returncode == 1 and plain.stderr.count(b"\n") == 1, plain.stderr
    assert b"pip install -r requirements.txt" in plain.stderr


@pytest.mark.api
def test_pip_install_gives_a_steve_jobs_command(api_server, tmp_path):
    source, target = tmp_path / "source", tmp_path / "site"
    source.mkdir()   # a copy: building leaves build/ and *.egg-info beside the sources
    for name in ("steve_jobs.py", "jobs_pb2.py", "jobs_pb2_grpc.py", "pyproject.toml",
                 "README.md"):
        shutil.copy(os.path.join(os.path.dirname(SCRIPT), name), source / name)
    built = subprocess.run([PYTHON, "-m", "pip", "install", "-q", "--no-deps",
                            "--no-build-isolation", "--target", str(target), str(source)],
                           capture_output=True, timeout=300)
    assert built.returncode == 0, built.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    command = [PYTHON, str(target / "bin" / "steve-jobs")]
    assert subprocess.run([*command, "--version"], env=env, capture_output=True).stdout == \
        f"steve-jobs {sj.__version__}\n".encode()
    listed = subprocess.run([*command, "--server", api_server.address, "--certs",
                             api_server.certs, "list"], env=env, capture_output=True)
    assert listed.returncode == 0, listed.stderr
    # Without --certs: not site-packages/certs, but beside the configuration file.
    home = tmp_path / "home"
    env = {**env, "HOME": str(home), "XDG_CONFIG_HOME": "", "STEVE_JOBS_SERVER":
           api_server.address}
    env.pop("STEVE_JOBS_CONFIG", None)
    missing = subprocess.run([*command, "list"], env=env, capture_output=True)
    where = str(home / ".config" / "steve-jobs" / "certs")
    assert missing.returncode == 2 and where.encode() in missing.stderr, missing.stderr
    assert b"--certs" in missing.stderr and missing.stderr.count(b"\n") == 1
    shutil.copytree(api_server.certs, where)
    listed = subprocess.run([*command, "list"], env=env, capture_output=True)
    assert listed.returncode == 0, listed.stderr


###############################################################################
# Session tests: stdin, terminals, attach, recordings, traces and logs
###############################################################################

@pytest.fixture(scope="module")
def session_server(certs):
    yield from serving(certs)


class Terminal:
    """The CLI on a real pty, as a user's terminal runs it: its controlling terminal (setsid
    -c), so that resizing sends SIGWINCH as a terminal emulator's does."""

    def __init__(self, server, *args, rows=24, columns=80, user="mrarsenal", shell=False):
        import termios
        self.master, self.slave = os.openpty()   # the slave stays open: its modes are checked
        self.resize(rows, columns)
        self.modes_before = termios.tcgetattr(self.slave)
        # shell: the CLI started from a shell that holds the terminal on after it (the
        # session's leader: its exit would hang the terminal up), and says "exit=CODE".
        under = ["sh", "-c", '"$@"; echo "exit=$?"; sleep 600', "sh"] if shell else []
        self.proc = subprocess.Popen(
            ["setsid", "-c", *under, PYTHON, SCRIPT, "--server", server.address, "--certs",
             server.certs, "--user", user, *args],
            stdin=self.slave, stdout=self.slave, stderr=self.slave, env={**os.environ,
                                                                         "TERM": "xterm"})
        self.seen = b""

    def resize(self, rows, columns):
        import fcntl
        import struct
        import termios
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def type(self, keys):
        os.write(self.master, keys)

    def expect(self, pattern, timeout=scaled(15)):
        """Read until pattern (bytes, a regex) shows; returns the match."""
        import select
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.seen)
            if m:
                self.seen = self.seen[m.end():]
                return m
            left = deadline - time.monotonic()
            assert left > 0, f"{pattern!r} did not show; the terminal shows {self.seen[-2000:]!r}"
            if select.select([self.master], [], [], min(left, 0.2))[0]:
                with contextlib.suppress(OSError):
                    self.seen += os.read(self.master, 65536)

    def wait(self, timeout=scaled(30)):
        return self.proc.wait(timeout)

    def modes_restored(self):
        import termios
        return termios.tcgetattr(self.slave) == self.modes_before

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@contextlib.contextmanager
def terminal(server, *args, **kw):
    t = Terminal(server, *args, **kw)
    try:
        yield t
    finally:
        t.close()


def job_state(server, job_id):
    return cli_json(server, "status", job_id)["state"]


@pytest.mark.sessions
def test_a_read_only_viewer_gets_its_terminal_back_without_the_jobs_queries_answers(
        session_server):
    """Reproduction: `attach --read-only` of a job that prints ESC [6n left the viewer's
    terminal's answers (cursor position reports) in its tty's input, for the shell to
    read next."""
    import termios
    import tty
    api = Api(session_server)
    pb = api.pb
    try:
        job = started(api, ["sh", "-c", "sleep 1; printf 'asking\\033[6n'; sleep 1"],
                      terminal=pb.TerminalSize(rows=24, columns=80)).job_id
        with terminal(session_server, "attach", "--read-only", job, shell=True) as t:
            t.expect(rb"asking\x1b\[6n")
            t.type(b"\x1b[5;1R" * 14)   # what a terminal answers, none of it read
            t.expect(rb"exit=0")
            tty.setraw(t.slave, termios.TCSANOW)   # (canonical mode counts whole lines)
            left = struct.unpack("i", fcntl.ioctl(t.slave, termios.FIONREAD, b"\0" * 4))[0]
            assert left == 0, f"{left} bytes of answers left for the shell to read"
    finally:
        api.close()


@pytest.mark.sessions
def test_run_without_i_says_stdin_is_not_sent_and_run_i_sends_it(session_server):
    """Reproduction: `echo data | steve_jobs.py run -f "wc -c"` printed 0, silently."""
    silent = cli(session_server, "run", "-f", "wc -c", input=b"data\n")
    assert silent.stdout == b"0\n"
    assert b"stdin is not sent to the job" in silent.stderr and b"run -i" in silent.stderr
    quiet = cli(session_server, "run", "-f", "wc -c", stdin=subprocess.DEVNULL)
    assert b"stdin" not in quiet.stderr
    sent = cli(session_server, "run", "-i", "wc -c", input=b"data\n")
    assert (sent.returncode, sent.stdout) == (0, b"5\n"), sent.stderr
    assert b"stdin" not in sent.stderr


@pytest.mark.sessions
def test_run_i_carries_100_mib_byte_exact(session_server, tmp_path):
    data = tmp_path / "in"
    with open(data, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(sj.MiB))
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    with open(data, "rb") as stdin:
        done = cli(session_server, "run", "-i", "sha256sum", stdin=stdin, timeout=scaled(300))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0].decode() == digest


@pytest.mark.sessions
def test_a_job_that_does_not_read_holds_its_writer_back(session_server):
    """Flow control end to end: the client stops taking stdin, nobody buffers the rest."""
    proc = subprocess.Popen([PYTHON, SCRIPT, "--server", session_server.address, "--certs",
                             session_server.certs, "--user", "mrarsenal", "--json", "run",
                             "-i", "--name", "not-reading", "sleep 1000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        json.loads(proc.stdout.readline())   # started
        os.set_blocking(proc.stdin.fileno(), False)
        taken, piece, deadline = 0, b"x" * sj.MiB, time.monotonic() + scaled(4)
        while time.monotonic() < deadline:
            try:
                taken += os.write(proc.stdin.fileno(), piece)
            except BlockingIOError:
                time.sleep(0.05)
        # Pipes, socket buffers and HTTP/2 windows hold a few MiB; 4 s of loopback, gigabytes.
        assert taken < 64 * sj.MiB, f"{taken} bytes taken by a job that reads nothing"
        assert job_state(session_server, "not-reading") == "running"
    finally:
        proc.kill()
        proc.wait()
        cli(session_server, "stop", "--grace", "0", "not-reading")
        cli(session_server, "rm", "not-reading")


def input_messages(pb, job_id, q, take_over=False):
    """An Input call's messages: the first, then what q brings until None."""
    yield pb.InputMessage(job_id=job_id, take_over=take_over)
    while (item := q.get()) is not None:
        yield item


@pytest.mark.sessions
def test_one_writer_at_a_time_the_owner_or_an_admin_taking_over(session_server):
    import queue
    alice, admin, reader = (Api(session_server, u) for u in ("alice", "mrarsenal", "rita"))
    try:
        job = started(alice, ["cat"], stdin=True).job_id
        code, reason, _, _ = reader.error("Input", iter([reader.pb.InputMessage(job_id=job)]))
        assert code == "PERMISSION_DENIED"
        alice_q = queue.Queue()
        alice_call = alice.stub.Input.future(input_messages(alice.pb, job, alice_q),
                                             metadata=alice.metadata)
        alice_q.put(alice.pb.InputMessage(data=b"from alice\n"))
        wait_for(lambda: b"from alice" in output_of(alice, job))
        code, reason, _, message = admin.error("Input", iter([admin.pb.InputMessage(job_id=job)]))
        assert (code, reason) == ("FAILED_PRECONDITION", "INPUT_BUSY") and "alice" in message
        taken = admin.Input(iter([admin.pb.InputMessage(job_id=job, take_over=True,
                                                        data=b"from the admin\n", eof=True)]))
        assert taken.bytes == len(b"from the admin\n")
        wait_for(lambda: alice.Status(alice.pb.JobRef(job_id=job)).state ==
                 alice.pb.STATE_EXITED)
        alice_q.put(alice.pb.InputMessage(data=b"too late\n"))
        alice_q.put(None)
        with pytest.raises(alice.grpc.RpcError) as info:
            alice_call.result(timeout=scaled(10))
        assert info.value.code().name == "FAILED_PRECONDITION"
        assert output_of(alice, job) == b"from alice\nfrom the admin\n"
        events = [(e.user, e.event) for e in alice.Status(alice.pb.JobRef(job_id=job)).sessions]
        assert events[:3] == [("alice", "input"), ("mrarsenal", "taken-over"),
                              ("mrarsenal", "input")], events
        assert ("alice", "input-end") in events and ("mrarsenal", "input-end") in events
        code, reason, _, _ = alice.error("Input", iter([alice.pb.InputMessage(job_id=job)]))
        assert (code, reason) == ("FAILED_PRECONDITION", "JOB_NOT_RUNNING")
    finally:
        for a in (alice, admin, reader):
            a.close()


def output_of(api, job_id):
    return b"".join(c.data for c in api.Output(api.pb.OutputRequest(job_id=job_id)))


def wait_for(condition, timeout=scaled(15)):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


PROMPT = rb"\$ $"


@pytest.mark.sessions
def test_run_it_is_an_interactive_shell_on_the_host(session_server):
    with terminal(session_server, "run", "-it", "PS1='$ ' bash --norc", rows=30,
                  columns=100) as t:
        t.expect(PROMPT)
        t.type(b"echo hel''lo; tty; stty size\r")
        t.expect(rb"hello\r\n/dev/pts/\d+\r\n30 100\r\n")
        t.resize(40, 120)   # the kernel sends the client SIGWINCH; it tells the job
        time.sleep(0.2)     # (as a user: typing comes after the resize, not within a ms)
        t.type(b"stty size\r")
        t.expect(rb"40 120\r\n")
        t.type(b"echo sleep-$((2+2)); sleep 1000\r")
        t.expect(rb"sleep-4\r\n")
        time.sleep(0.3)
        t.type(b"\x03")     # Ctrl-C: the job's sleep is interrupted, not the client
        t.type(b"echo after-$?\r")
        t.expect(rb"after-130\r\n")
        assert t.proc.poll() is None
        t.type(b"exit 7\r")
        assert t.wait() == 7
        assert t.modes_restored()


@pytest.mark.sessions
def test_a_terminal_client_ended_by_a_signal_gives_the_terminal_back(session_server):
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):   # SIGINT: from kill
        with terminal(session_server, "run", "-it", "--name", f"signalled-{sig.name}",
                      "PS1='$ ' bash --norc") as t:
            t.expect(PROMPT)
            t.proc.send_signal(sig)
            assert t.wait() == 128 + sig, sig
            assert t.modes_restored(), sig
        assert job_state(session_server, f"signalled-{sig.name}") == "running"
        cli(session_server, "stop", "--grace", "0", f"signalled-{sig.name}")


@pytest.mark.sessions
def test_detach_with_tilde_dot_and_attach_rejoins(session_server):
    with terminal(session_server, "run", "-it", "--name", "shell",
                  "PS1='$ ' bash --norc") as t:
        t.expect(PROMPT)
        t.type(b"echo one-$((20+1))\r")
        t.expect(rb"one-21\r\n")
        t.type(b"~.")
        assert t.wait() == 0
        t.expect(rb"detached from job")
        assert t.modes_restored()
    assert job_state(session_server, "shell") == "running"
    with terminal(session_server, "attach", "shell") as t:
        t.expect(rb"one-21")   # the last screenful, redrawn
        t.type(b"echo two-$((1+1)); exit 3\r")
        t.expect(rb"two-2\r\n")
        assert t.wait() == 3
        assert t.modes_restored()
    st = cli_json(session_server, "status", "shell")
    assert st["exit_code"] == 3 and st["terminal"] == {"rows": 24, "columns": 80}
    assert [e["event"] for e in st["sessions"]].count("input") == 2
    cli(session_server, "rm", "shell")


@pytest.mark.sessions
def test_attach_i_feeds_a_job_without_a_terminal_and_readers_only_watch(session_server):
    owner = Api(session_server, "alice")
    try:
        job = started(owner, ["sh", "-c", "read line; echo got-$line"], stdin=True).job_id
        watcher = subprocess.Popen(
            [PYTHON, SCRIPT, "--server", session_server.address, "--certs",
             session_server.certs, "--user", "rita", "attach", "--tail", "0", job],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert watcher.stderr.readline().startswith(b"job ")   # it is attaching
            time.sleep(scaled(0.5))
            fed = cli(session_server, "attach", "-i", job, user="alice", input=b"tea\n")
            assert (fed.returncode, fed.stdout) == (0, b"got-tea\n"), fed.stderr
            watched, _ = watcher.communicate(timeout=scaled(30))
            assert watched == b"got-tea\n" and watcher.returncode == 0
        finally:
            watcher.kill()
            watcher.wait()
        refused = cli(session_server, "attach", "-i", job, user="rita", input=b"x\n")
        assert refused.returncode == 5   # it has ended: nothing to attach to
    finally:
        owner.close()


@pytest.mark.sessions
def test_terminal_output_exports_as_asciicast(session_server):
    done = cli(session_server, "--json", "run", "-t", "printf 'h\\303\\251llo\\n'; sleep 0.3; "
               "echo world", stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    job_id = json.loads(done.stdout.splitlines()[0])["job_id"]
    cast = cli(session_server, "output", "--asciicast", job_id)
    assert cast.returncode == 0, cast.stderr
    header, *events = [json.loads(line) for line in cast.stdout.splitlines()]
    assert (header["version"], header["width"], header["height"]) == (2, 80, 24)
    assert "".join(e[2] for e in events) == "h\u00e9llo\r\nworld\r\n"
    assert all(kind == "o" for _, kind, _ in events)
    times = [e[0] for e in events]
    assert times == sorted(times) and times[-1] - times[0] >= 0.25


@pytest.mark.sessions
def test_a_trace_goes_from_the_cli_through_the_server_log_into_the_job(session_server):
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    env = {**os.environ, "TRACEPARENT": f"00-{trace_id}-{span_id}-01"}
    done = cli(session_server, "run", "-f", "echo $TRACEPARENT", env=env)
    seen = sj.parse_traceparent(done.stdout.decode().strip())
    assert seen and seen[0] == trace_id and seen[1] != span_id   # the server's span
    log = session_server.read_log()
    assert re.search(rf"method=Start job=\S+ result=OK .*trace_id={trace_id}", log)
    assert re.search(rf"job-ended trace_id={trace_id} .*state=exited exit_code=0", log)
    fresh = cli(session_server, "run", "-f", "echo $TRACEPARENT").stdout.decode().strip()
    assert sj.parse_traceparent(fresh)[0] in session_server.read_log()


@pytest.mark.sessions
def test_json_log_lines_and_journald_priorities(certs, monkeypatch):
    with Server(certs, extra=["--log-format", "json"]) as srv:   # jobs outlive a restart
        job = start_job(srv, "sleep 1000")
        srv.restart()   # the running job is adopted
        cli(srv, "stop", "--grace", "0", job)
        lines = [json.loads(line) for line in srv.read_log().splitlines()]
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+(Z|[+-]\d\d:\d\d)", line["time"])
                   and line["level"] in ("info", "warning", "error") for line in lines)
        rpcs = [line for line in lines if line.get("event") == "rpc"]
        assert rpcs and all(len(line["trace_id"]) == 32 and line["method"] for line in rpcs)
        kinds = {line.get("event") for line in lines if line.get("job") == job}
        assert {"job-adopted", "job-ended"} <= kinds
    plain = Server(certs, extra=["--stop-jobs-on-exit"])
    open(plain.log_path, "ab").close()
    st = os.stat(plain.log_path)   # its stderr: as if journald's stream
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    with plain:
        lines = plain.read_log().splitlines()
        assert lines and all(re.match(r"<[2-7]>", line) for line in lines)
        assert any(line.startswith("<6>INFO listening") for line in lines)


@pytest.mark.sessions
def test_spans_of_calls_and_of_a_jobs_life_are_exported_to_a_collector(certs, monkeypatch):
    collector = SpanCollector()
    for name, value in collector.env().items():
        monkeypatch.setenv(name, value)
    with contextlib.closing(collector), Server(certs, extra=["--stop-jobs-on-exit"]) as srv:
        trace_id = os.urandom(16).hex()
        env = {**os.environ, "TRACEPARENT": f"00-{trace_id}-{os.urandom(8).hex()}-01"}
        done = cli(srv, "run", "-f", "echo $TRACEPARENT", env=env)
        in_job = sj.parse_traceparent(done.stdout.decode().strip())
        # The Output call ends after the job does: its span may come in a later batch
        wait_for(lambda: collector.named("job", trace_id)
                 and collector.named("steve_jobs.v1.JobService/Output", trace_id))
        start_rpc = collector.named("steve_jobs.v1.JobService/Start", trace_id)
        assert len(start_rpc) == 1 and start_rpc[0].span_id.hex() == in_job[1]
        job = collector.named("job", trace_id)[0]
        assert job.parent_span_id == start_rpc[0].span_id   # the job's TRACEPARENT
        parts = {s.name: s for s in collector.spans if s.trace_id.hex() == trace_id}
        for name, parent in (("job.start", "job"), ("job.run", "job"),
                             ("job.start.spawn", "job.start"), ("job.start.cgroup", "job.start"),
                             ("job.start.exec", "job.start")):
            assert parts[name].parent_span_id == parts[parent].span_id, name
            assert job.start_time_unix_nano <= parts[name].start_time_unix_nano \
                <= parts[name].end_time_unix_nano <= job.end_time_unix_nano, name
        assert f"trace_id={trace_id}" in srv.read_log()


###############################################################################
# First-hour tests: what a newcomer does on a fresh clone, and the usual mistakes
###############################################################################

def job_cgroups_exist(layout, root):
    return sj.JobCgroup.names(layout, root)


@pytest.mark.newcomer
def test_a_second_server_on_the_same_cgroup_root_is_refused_and_harms_nothing(certs):
    require_kernel()
    with Server(certs) as first:
        second = Server(certs, cgroup_root=first.cgroup_root)   # its own state folder
        try:
            job_id = start_job(first, "sleep 300")
            with pytest.raises(AssertionError, match="another server"):
                second.start()
            assert second.proc.wait(30) == 1
            log = second.read_log().strip()
            assert len(log.splitlines()) == 1 and "Traceback" not in log, log
            assert f"pid {first.proc.pid}" in log and first.state_dir in log, log
            assert cli_json(first, "status", job_id)["state"] == "running"
            for _ in range(2):   # the first one's warm supervisors are alive
                done = cli(first, "run", "-f", "echo alive")
                assert done.returncode == 0 and done.stdout == b"alive\n", done.stderr
            assert "swept" not in first.read_log()
        finally:
            if second.proc:
                second.terminate(signal.SIGKILL)
            remove_state_dir(second.state_dir)
    assert not job_cgroups_exist(sj.CgroupLayout.detect(), first.cgroup_root)


@pytest.mark.newcomer
def test_a_server_that_cannot_listen_touches_no_cgroup_and_says_why(certs):
    require_kernel()
    with Server(certs) as first:
        second = Server(certs)
        second.port, second.address = first.port, first.address   # the port is taken
        try:
            job_id = start_job(first, "sleep 300")
            with pytest.raises(AssertionError):
                second.start()
            assert second.proc.wait(30) == 1
            log = second.read_log().strip()
            assert log.endswith(f"cannot listen on {first.address}: address in use "
                                f"(another server?)"), log
            assert "GRPC" not in log and len(log.splitlines()) == 1, log
            assert not job_cgroups_exist(sj.CgroupLayout.detect(), second.cgroup_root)
            assert cli_json(first, "status", job_id)["state"] == "running"
        finally:
            if second.proc:
                second.terminate(signal.SIGKILL)
            remove_state_dir(second.state_dir)


@pytest.mark.newcomer
def test_a_sweep_removes_only_the_cgroups_this_state_folder_made():
    require_kernel()
    root = f"steve-jobs-test-{uuid.uuid4().hex[:8]}"
    layout = sj.CgroupLayout.detect()
    state_dir = new_state_dir()
    ours = sj.JobCgroup(layout, root, sj.cgroup_mark(state_dir) + "stale")
    theirs = sj.JobCgroup(layout, root, sj.cgroup_mark("/var/lib/elsewhere") + "alive")
    try:
        for cg in (ours, theirs):
            cg.create()
        engine = sj.Engine(sj.EngineConfig(state_dir=state_dir, cgroup_root=root)).open()
        assert not [d for d in ours.dirs() if os.path.exists(d)]
        assert all(os.path.exists(d) for d in theirs.dirs())
        engine.close()
        assert all(os.path.exists(d) for d in theirs.dirs())
    finally:
        remove_cgroups(layout, root)
        remove_state_dir(state_dir)


def kernel_memory_rules(monkeypatch):
    """write_file as a v1 memory controller takes it: the RAM limit never above memsw."""
    files = {}

    def write(path, value):
        name = os.path.basename(path)
        if name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
            ram = int(value) if name == "memory.limit_in_bytes" else files.get("ram", 1 << 62)
            swap = int(value) if name != "memory.limit_in_bytes" else files.get("sw", 1 << 62)
            if ram > swap:
                raise OSError(errno.EINVAL, "Invalid argument")
            files.update(ram=ram, sw=swap)
    monkeypatch.setattr(sj, "write_file", write)
    monkeypatch.setattr(os.path, "exists", lambda p: True)
    return files


@pytest.mark.newcomer
@pytest.mark.parametrize("start, to", [(512, 64), (512, 1024), (512, 3072), (3072, 64),
                                       (64, 3072), (1024, 1024)])
def test_v1_memory_limits_are_raised_and_lowered_in_the_order_the_kernel_takes(
        monkeypatch, start, to):
    layout = sj.CgroupLayout.from_mountinfo(HYBRID_MOUNTINFO, read=lambda p, d=None: "")
    cg = sj.JobCgroup(layout, "steve-jobs", "j-3")
    files = kernel_memory_rules(monkeypatch)
    warm = sj.Limits(memory=start * sj.MiB)
    cg.apply(warm)
    cg.apply(warm._replace(memory=to * sj.MiB), already=warm)
    assert files == {"ram": to * sj.MiB, "sw": to * sj.MiB}


def cli_as(server, certs_dir, *args, user="mrarsenal", run_as=None, timeout=scaled(60)):
    """The CLI with another certificate folder, as root or (run_as) another local user."""
    prefix = ["setpriv", f"--reuid={run_as}", f"--regid={run_as}", "--clear-groups"] \
        if run_as is not None else []
    return subprocess.run([*prefix, PYTHON, SCRIPT, "--server", server.address, "--certs",
                           certs_dir, "--user", user, *args], capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=timeout,
                          env={**os.environ, **({"HOME": "/"} if prefix else {})})


def a_clone_of_the_bundled_certs(parent):
    """certs/ as a fresh clone has it, in a folder every user may enter: every file 0644
    (git keeps no modes)."""
    folder = os.path.join(parent, "certs")
    shutil.copytree(os.path.join(HERE, "certs"), folder)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o644)
    os.chmod(parent, 0o755)
    return folder


@pytest.mark.newcomer
def test_insecure_dev_certs_makes_the_bundled_keys_private_and_says_so():
    require_kernel()
    parent = tempfile.mkdtemp(prefix="steve-jobs-test-", dir="/var/tmp")
    folder = a_clone_of_the_bundled_certs(parent)
    srv = Server(folder, extra=["--insecure-dev-certs", "--stop-jobs-on-exit"])
    srv.server_certs = folder                    # the Quickstart's: the whole bundled set
    try:
        with srv:
            private = [n for n in os.listdir(folder) if n.endswith((".key", ".jwt"))]
            assert private and all(os.stat(os.path.join(folder, n)).st_mode & 0o777 == 0o600
                                   for n in private)
            assert "chmod 600" in srv.read_log()
            done = cli_as(srv, folder, "run", "-f", "id -u")
            assert done.returncode == 0, done.stderr
            nobody = cli_as(srv, folder, "run", "--root", "-f", "id -u", run_as=65534)
            assert nobody.returncode == 2 and nobody.stdout == b"", nobody
            assert b"Permission denied" in nobody.stderr and b"Traceback" not in nobody.stderr
            assert b"mrarsenal.key" in nobody.stderr   # (the folder itself is open to all)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.newcomer
def test_the_client_refuses_a_key_or_token_others_can_read(server, tmp_path):
    for name in ("alice.key", "alice.jwt"):
        folder = str(tmp_path / name)
        shutil.copytree(server.certs, folder)
        os.chmod(os.path.join(folder, name), 0o644)
        done = cli_as(server, folder, "list", user="alice")
        path = os.path.join(folder, name)
        assert done.returncode == 2, done
        assert done.stderr.decode().strip().endswith(f"chmod 600 {path}"), done.stderr
        assert done.stderr.count(b"\n") == 1
    empty = str(tmp_path / "empty")
    shutil.copytree(server.certs, empty)
    open(os.path.join(empty, "alice.jwt"), "w").close()
    done = cli_as(server, empty, "list", user="alice")
    assert done.returncode == 2 and b"alice.jwt is empty" in done.stderr, done.stderr


@pytest.mark.newcomer
def test_tokens_up_to_16k_are_taken_and_bigger_ones_refused_with_a_reason(server, tmp_path):
    for size, code in ((7 * 1024, 0), (15 * 1024, 0), (17 * 1024, 7)):
        claims = jwt_claims(server.certs, "mrarsenal", groups=["g" * 60] * (size // 85))
        token = signed(server.certs, claims)
        assert abs(len(token) - size) < 1024
        folder = str(tmp_path / str(size))
        shutil.copytree(server.certs, folder)
        with open(os.path.join(folder, "mrarsenal.jwt"), "w") as f:
            f.write(token)
        done = cli_as(server, folder, "list", "-q")
        assert done.returncode == code, (size, done.stderr)
        if code:
            assert b"at most 16.0KiB" in done.stderr, done.stderr
    huge = signed(server.certs, jwt_claims(server.certs, "mrarsenal",
                                           groups=["g" * 60] * (18 * 1024 // 85)))
    assert call(server.certs, server.address, "List", pb.ListRequest(),
                token=huge)[0] == "UNAUTHENTICATED"


@pytest.mark.newcomer
def test_an_expired_token_says_which_file_when_and_what_to_do(server, tmp_path):
    folder = str(tmp_path / "expired")
    shutil.copytree(server.certs, folder)
    then = int(time.time()) - 3600
    with open(os.path.join(folder, "mrarsenal.jwt"), "w") as f:
        f.write(signed(server.certs, jwt_claims(server.certs, "mrarsenal", iat=then - 60,
                                                exp=then)))
    done = cli_as(server, folder, "list")
    line = done.stderr.decode()
    assert done.returncode == 7 and line.count("\n") == 1, line
    assert sj.rfc3339(then)[:16] in line and os.path.join(folder, "mrarsenal.jwt") in line
    assert "steve_jobs.py token" in line


@contextlib.contextmanager
def plain_http_listener():
    """A plain HTTP server on a free loopback port: its address."""
    import http.server
    httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.newcomer
def test_wrong_addresses_say_what_is_wrong_and_where_the_value_came_from(server, tmp_path):
    def client(address, *args, env=None):
        flag = ["--server", address] if env is None else []
        started = time.monotonic()
        done = subprocess.run([PYTHON, SCRIPT, *flag, "--certs", server.certs, *args],
                              capture_output=True, stdin=subprocess.DEVNULL,
                              timeout=scaled(60), env={**os.environ, **(env or {})})
        line = done.stderr.decode()
        assert line.count("\n") == 1 and "Traceback" not in line, line
        return done.returncode, line, time.monotonic() - started
    for address, words in (("127.0.0.1:notaport", "not a port number"),
                           (":50051", "names no host"), ("http://host:50051", "no scheme"),
                           (server.address + "/", "no scheme")):
        code, line, _ = client(address, "status", "x")
        assert code == 2 and words in line and "--server" in line, line
    code, line, _ = client("", "status", "x", env={"STEVE_JOBS_SERVER": "host:"})
    assert code == 2 and "STEVE_JOBS_SERVER" in line, line
    code, line, took = client("no-such-host.invalid", "run", "-f", "true")
    assert code == 125 and "does not resolve" in line and took < scaled(10), line
    code, line, took = client(f"127.0.0.1:{free_port()}", "run", "true")
    assert code == 8 and "nothing listens there" in line and took < scaled(10), line
    code, line, _ = client("127.0.0.1", "status", "x")   # the default port, not 443
    assert "127.0.0.1:50051" in line, line
    with plain_http_listener() as http_address:
        code, line, _ = client(http_address, "status", "x")
        assert code == 8 and "not a TLS server" in line, line
    code, line, _ = client(f"[::ffff:127.0.0.1]:{server.port}", "status", "x")
    assert code == 8 and "is not for the name" in line, line


@pytest.mark.newcomer
def test_input_right_after_start_waits_for_the_supervisor_to_listen(server):
    """Reproduction: `tar c certs | run -i 'tar x'` hung 1 in 30: an Input 3 ms after
    Start was told the job "has ended" while it waited on stdin."""
    api = Api(server)
    try:
        for _ in range(30):
            job = started(api, ["cat"], stdin=True).job_id
            sent = api.Input(iter([api.pb.InputMessage(job_id=job, data=b"x", eof=True)]),
                             timeout=scaled(20))
            assert sent.bytes == 1
            wait_for(lambda: api.Status(api.pb.JobRef(job_id=job)).state ==
                     api.pb.STATE_EXITED)
            assert output_of(api, job) == b"x"
            api.Remove(api.pb.JobRef(job_id=job))
    finally:
        api.close()


def run_i_client(server, *args):
    """`run -i ...` with a stdin pipe the test holds; waits for the job's id."""
    proc = subprocess.Popen([PYTHON, SCRIPT, "--server", server.address, "--certs",
                             server.certs, "--user", "mrarsenal", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    line = proc.stderr.readline().decode()
    assert line.startswith("job "), line
    return proc, line.split()[1]


@pytest.mark.newcomer
def test_ctrl_c_in_run_i_ends_the_jobs_stdin_instead_of_leaving_it_waiting(server):
    proc, job = run_i_client(server, "run", "-i", "cat; echo got-eof")
    try:
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"hello\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(scaled(10)) == 130
        deadline = time.monotonic() + scaled(10)
        while job_state(server, job) == "running":
            assert time.monotonic() < deadline, "the job still waits on a stdin nobody holds"
            time.sleep(0.05)
        assert cli(server, "output", job).stdout == b"hello\ngot-eof\n"
    finally:
        proc.kill()
        proc.wait()
        cli(server, "stop", "--grace", "0", job)


@pytest.mark.newcomer
def test_a_writer_taken_over_is_told_at_once_and_once(server):
    proc, job = run_i_client(server, "run", "-i", "cat")
    taker = None
    try:
        proc.stdin.write(b"one\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"one\n"
        taker = subprocess.Popen([PYTHON, SCRIPT, "--server", server.address, "--certs",
                                  server.certs, "attach", "-i", "--take-over", job],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        os.set_blocking(proc.stderr.fileno(), False)
        told, deadline = b"", time.monotonic() + scaled(10)
        while b"took over" not in told:   # with no output coming after the take-over
            assert time.monotonic() < deadline, told
            time.sleep(0.05)
            told += proc.stderr.read() or b""
        taker.stdin.close()   # eof: cat ends, and so do both clients
        assert proc.wait(scaled(20)) == 0 and taker.wait(scaled(20)) == 0
        told += proc.stderr.read() or b""
        assert told.count(b"took over") == 1, told
    finally:
        for p in (proc, taker):
            if p:
                p.kill()
                p.wait()
        cli(server, "stop", "--grace", "0", job)


@pytest.mark.newcomer
def test_run_it_without_a_terminal_is_refused_at_once(server):
    before = len(cli_json(server, "list", "--all"))
    done = cli(server, "run", "-it", "bash", input=b"echo cmd\n", timeout=scaled(20))
    assert done.returncode == 2 and b"not a terminal" in done.stderr, done.stderr
    assert len(cli_json(server, "list", "--all")) == before


@pytest.mark.newcomer
def test_non_utf8_arguments_are_one_line_and_a_usage_error(server):
    bad = os.fsencode("a\udcff")   # the bytes a\xff, as argv brings them
    for args in ((b"run", b"--name", bad, b"true"), (b"run", b"--env", b"A=" + bad, b"true"),
                 (b"run", b"--label", b"k=" + bad, b"true"), (b"run", b"--workdir", b"/" + bad,
                                                              b"true"),
                 (b"--server", bad, b"list"), (b"list", b"--owner", bad),
                 (b"list", b"--name", bad), (b"status", bad), (b"stop", bad),
                 (b"--json", b"status", bad), (b"run", b"echo " + bad)):
        done = subprocess.run([PYTHON, SCRIPT, "--certs", server.certs, *args],
                              capture_output=True, stdin=subprocess.DEVNULL,
                              timeout=scaled(30))
        out = done.stdout if b"--json" in args else done.stderr
        assert done.returncode == 2 and b"Traceback" not in done.stderr, (args, done.stderr)
        assert b"not valid UTF-8" in out and out.strip().count(b"\n") in (0, 8), out
    done = subprocess.run([PYTHON, SCRIPT, "--certs", server.certs, "list"],
                          capture_output=True, timeout=scaled(30),
                          env={**os.environ, "STEVE_JOBS_SERVER": "h\udcff"})
    assert done.returncode == 2 and b"Traceback" not in done.stderr, done.stderr


@pytest.mark.newcomer
def test_list_prints_nothing_before_an_error_and_q_prints_ids_only(server):
    unreachable = subprocess.run([PYTHON, SCRIPT, "--server", f"127.0.0.1:{free_port()}",
                                  "--certs", server.certs, "list"], capture_output=True,
                                 timeout=scaled(30))
    assert unreachable.returncode == 8 and unreachable.stdout == b"", unreachable.stdout
    job = cli_json(server, "run", "--name", "named-for-q", "true")["job_id"]
    ids = cli(server, "list", "-q").stdout.decode().split()
    assert job in ids and "named-for-q" not in ids
    assert all(sj.JOB_ID_FORMAT.fullmatch(i) for i in ids), ids
    cli(server, "rm", job)


def readme_blocks(section):
    """The ```sh blocks of README.md's section (a '## ' title), in order."""
    text = open(os.path.join(HERE, "README.md")).read()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", body, re.S)


def a_fresh_clone(target):
    """The files git tracks, as a clone has them (0644, or 0755 if executable); outside a
    git checkout (an unpacked archive), every file but the virtualenv's and caches."""
    listed = subprocess.run(["git", "-C", HERE, "ls-files", "-z"], capture_output=True)
    if listed.returncode == 0:
        names = listed.stdout.decode().split("\0")
    else:
        skipped = {".venv", ".git", "__pycache__", ".pytest_cache"}
        names = [os.path.relpath(os.path.join(folder, f), HERE)
                 for folder, _, files in os.walk(HERE)
                 if not skipped & set(os.path.relpath(folder, HERE).split(os.sep))
                 for f in files]
    for name in filter(None, names):
        source, copy = os.path.join(HERE, name), os.path.join(target, name)
        if not os.path.isfile(source):
            continue
        os.makedirs(os.path.dirname(copy), exist_ok=True)
        shutil.copyfile(source, copy)
        os.chmod(copy, 0o755 if os.stat(source).st_mode & 0o100 else 0o644)
    return target


@pytest.mark.newcomer
def test_the_quickstart_works_as_written_on_a_fresh_clone():
    """Every command of the Quickstart, verbatim, in a fresh clone; the server's place
    (port, state folder, cgroup root) comes from its STEVE_JOBS_* variables."""
    require_kernel()
    server_block, client_block = readme_blocks("Quickstart")
    clone = a_fresh_clone(tempfile.mkdtemp(prefix="steve-jobs-test-clone-", dir="/var/tmp"))
    port, state_dir = free_port(), new_state_dir()
    root = f"steve-jobs-test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "STEVE_JOBS_LISTEN": f"127.0.0.1:{port}",
           "STEVE_JOBS_STATE_DIR": state_dir, "STEVE_JOBS_CGROUP_ROOT": root,
           "PYTHONDONTWRITEBYTECODE": "1"}   # (honoured by its helpers too, as -I does not)
    log_path = os.path.join(state_dir, "quickstart.log")
    with open(log_path, "wb") as log:
        server = subprocess.Popen(["bash", "-c", server_block], cwd=clone, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + scaled(300)   # (pip installs the requirements first)
        while "listening on" not in open(log_path).read():
            assert server.poll() is None and time.monotonic() < deadline, open(log_path).read()
            time.sleep(0.2)
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", client_block],
                              cwd=clone, capture_output=True, timeout=scaled(120),
                              env={**os.environ, "STEVE_JOBS_SERVER": f"127.0.0.1:{port}"})
        assert done.returncode == 0, done.stderr
        out = done.stdout.decode()
        assert "hello from" in out and re.search(r"[0-9a-f]{64}  -", out), out
        assert all(os.stat(os.path.join(clone, "certs", n)).st_mode & 0o077 == 0
                   for n in os.listdir(os.path.join(clone, "certs")) if n.endswith(".key"))
        assert not glob.glob(os.path.join(clone, "__pycache__", "steve_jobs.*"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(scaled(30))
        with running_engine(state_dir=state_dir, cgroup_root=root):
            pass   # stops what the server left running
        shutil.rmtree(clone, ignore_errors=True)


@pytest.mark.newcomer
def test_what_docker_and_kubectl_users_type_first(server, tmp_path):
    folder = host_folder_for_jobs()
    env_file = tmp_path / "env"
    env_file.write_text("# a comment\nB=3\n\nC\n")
    try:
        done = subprocess.run(
            [PYTHON, SCRIPT, "--server", server.address, "--certs", server.certs, "run",
             "--name", "docker-like", "-e", "A=1", "-e", "X", "--env-file", str(env_file),
             "-w", folder, "-f", "echo $A $X $B $C; pwd; echo last"],
            capture_output=True, timeout=scaled(60), stdin=subprocess.DEVNULL,
            env={**os.environ, "X": "2", "C": "4"})
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"1 2 3 4\n{folder}\nlast\n".encode()
        assert cli(server, "logs", "docker-like").stdout == done.stdout
        assert cli(server, "logs", "-n", "1", "docker-like").stdout == b"last\n"
        assert cli(server, "logs", "-f", "docker-like").stdout == done.stdout
        bad = cli(server, "run", "-e", "NOT_SET_ANYWHERE_X", "true")
        assert bad.returncode == 2 and b"NOT_SET_ANYWHERE_X" in bad.stderr
    finally:
        cli(server, "rm", "docker-like")
        shutil.rmtree(folder, ignore_errors=True)
    ids = [start_job(server, "sleep 300") for _ in range(3)]
    ended = start_job(server, "true")
    wait_for(lambda: job_state(server, ended) == "exited")
    running = cli(server, "ps", "-q").stdout.decode().split()
    assert set(ids) <= set(running) and ended not in running
    assert ended in cli(server, "ps", "-a", "-q").stdout.decode().split()
    stopped = cli(server, "stop", "--grace", "0", *ids)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.decode().split() == [w for i in ids for w in (i, "stopped")]
    assert cli(server, "rm", *ids, ended).stdout.decode().split() == [*ids, ended]
    forced = start_job(server, "sleep 300")
    assert cli(server, "rm", forced).returncode == 5
    assert cli(server, "rm", "-f", forced).returncode == 0
    assert cli(server, "status", forced).returncode == 3
    some = cli(server, "stop", "no-such-job", "neither")
    assert some.returncode == 3 and some.stderr.count(b"\n") == 2, some.stderr
    alice_job = start_job(server, "true", user="alice")
    as_alice = subprocess.run([PYTHON, SCRIPT, "list", "-q", "--server", server.address,
                               "--certs", server.certs, "--user", "alice"],
                              capture_output=True, timeout=scaled(30))
    alices = as_alice.stdout.decode().split()   # (other tests leave jobs of alice's too)
    assert alice_job in alices and not {*ids, ended, forced} & set(alices), as_alice.stderr
    cli(server, "rm", alice_job, user="alice")


@pytest.mark.e2e
def test_a_stop_of_several_jobs_gives_them_their_grace_side_by_side(server):
    """`stop ID...` of jobs that take their grace: each is asked to stop at once, not
    after the one before it has used its grace (2,000 jobs, 10 s each: 5 hours)."""
    script = "trap 'echo asked to stop' TERM; echo ready; while :; do sleep 0.1; done"
    ids, stop = [], None
    try:
        for _ in range(3):
            ids.append(start_job(server, script))
        wait_for(lambda: all(b"ready" in cli(server, "output", job_id).stdout
                             for job_id in ids),
                 timeout=scaled(30))   # (a TERM before its trap would end it silently)
        stop = subprocess.Popen([PYTHON, SCRIPT, "--server", server.address, "--certs",
                                 server.certs, "--user", "mrarsenal", "stop", "--grace",
                                 "600", *ids], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        wait_for(lambda: all(b"asked to stop" in cli(server, "output", job_id).stdout
                             for job_id in ids), timeout=scaled(30))
        assert cli(server, "kill", *ids).returncode == 0   # their grace: ended by hand
        out, err = stop.communicate(timeout=scaled(30))
        assert stop.returncode == 0, err
        assert out.decode().split()[::2] == ids   # in the order named, one line each
    finally:
        if stop:
            stop.kill()
            stop.wait()
        if ids:
            cli(server, "rm", "-f", *ids)


@pytest.mark.newcomer
def test_contexts_are_made_with_a_command_and_a_broken_file_breaks_only_who_reads_it(
        server, tmp_path):
    config = tmp_path / "config" / "config.toml"
    env = {**os.environ, "STEVE_JOBS_CONFIG": str(config)}
    run = lambda *args: subprocess.run([PYTHON, SCRIPT, *args], capture_output=True,
                                       timeout=scaled(30), env=env)
    empty = run("context", "list")
    assert empty.returncode == 0 and b"context add" in empty.stderr, empty.stderr
    added = run("context", "add", "here", "--server", server.address, "--certs",
                server.certs, "--user", "alice")
    assert added.returncode == 0 and b"made it current" in added.stdout, added.stderr
    assert config.stat().st_mode & 0o777 == 0o600
    assert run("list", "-q").returncode == 0                    # through the context
    assert run("context", "add", "here", "--server", "x:1").returncode == 11
    config.write_text("this is [ not toml")
    named = run("--server", server.address, "--certs", server.certs, "--user", "alice",
                "list", "-q")
    assert named.returncode == 0, named.stderr
    needs = run("list")
    assert needs.returncode == 2 and str(config).encode() in needs.stderr


@pytest.mark.newcomer
def test_the_small_things_a_newcomer_reads(server):
    double = cli(server, "list", "--bogus")
    assert double.returncode == 2 and double.stderr.count(b"steve-jobs:") == 1, double.stderr
    help_text = cli(server, "kill", "--help").stdout.decode()
    assert "(default: KILL)" in help_text and "(default: 9)" not in help_text
    memory = cli(server, "run", "--memory", "1", "true")
    assert memory.returncode == 4 and b"--memory" in memory.stderr, memory.stderr
    assert b"memory_bytes" not in memory.stderr
    lines = cli(server, "--json", "run", "-f", "echo x").stdout.splitlines()
    assert json.loads(lines[0])["name"] == ""
    job = json.loads(lines[0])["job_id"]
    stamped = cli(server, "output", "--timestamps", job).stdout
    assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d\dZ x\n", stamped), stamped
    cli(server, "rm", job)


@pytest.mark.newcomer
def test_a_users_job_cap_is_said_in_good_english():
    with running_engine(max_jobs_per_user=1) as engine:
        engine.start("bob", ["sleep", "30"])
        with pytest.raises(sj.ResourceExhaustedError, match="bob has 1 job running,"):
            engine.start("bob", ["true"])


@pytest.mark.newcomer
def test_listen_and_server_addresses_are_checked_with_the_default_port():
    assert sj.split_address("localhost") == ("localhost", 50051)
    assert sj.split_address("[::1]:7") == ("::1", 7)
    assert sj.listen_address("localhost") == "localhost:50051"
    for bad, words in (("127.0.0.1:notaport", "not a port number"), (":50051", "no host"),
                       ("http://host:50051", "no scheme"), ("host:50051/", "no scheme"),
                       ("host:", "empty port"), ("host:70000", "not a port number")):
        with pytest.raises(ValueError, match=words):
            sj.split_address(bad)


###############################################################################
# Files: a job's working folder kept after its end, cp in and out, run --copy
###############################################################################

BUILD_TREE = {
    "Makefile": "hello: hello.c\n\tcc -O2 -o hello hello.c\n",
    "hello.c": '#include <stdio.h>\nint main(void) { puts("built by steve-jobs"); '
               'return 0; }\n',
}


def write_tree(top, files):
    for name, text in files.items():
        os.makedirs(os.path.join(top, os.path.dirname(name)), exist_ok=True)
        with open(os.path.join(top, name), "w") as f:
            f.write(text)


def tar_of(*members):
    """A tar stream of (TarInfo fields, data) members, for crafted copies."""
    import io
    import tarfile
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for fields, data in members:
            info = tarfile.TarInfo(fields.pop("name"))
            for key, value in fields.items():
                setattr(info, key, value)
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def tar_tree(top):
    """A tree with what a tar stream must carry: long names and link targets, a hard link,
    links, an empty file, a mode and an mtime, a file larger than a chunk."""
    deep = top / ("d" * 120) / "sub"
    os.makedirs(deep)
    (deep / ("f" * 150)).write_text("long\n")
    (top / "a.txt").write_text("a" * 5000)
    os.link(top / "a.txt", top / "hard")
    os.symlink("a.txt", top / "ln")
    os.symlink("/" + "x" * 200, top / "longlink")
    os.chmod(top / "a.txt", 0o751)
    os.utime(top / "a.txt", (1_000_000_000, 1_000_000_000))
    (top / "empty").write_text("")
    (top / "big").write_bytes(os.urandom(600 * 1024 + 3))


def same_tree(a, b):
    done = subprocess.run(["diff", "-r", "--no-dereference", str(a), str(b)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    st = os.stat(os.path.join(b, "a.txt"))
    assert (st.st_mtime, st.st_mode & 0o7777, st.st_nlink) == (1_000_000_000, 0o751, 2)


@pytest.mark.unit
def test_our_tar_streams_are_read_by_gnu_tar_and_tarfile(tmp_path):
    import tarfile
    tar_tree(tmp_path / "src")
    stream = b"".join(sj.tar_chunks([(str(tmp_path / "src"), "src")], 64 * 1024))
    (tmp_path / "ours.tar").write_bytes(stream)
    os.mkdir(tmp_path / "gnu")
    subprocess.run(["tar", "xf", str(tmp_path / "ours.tar"), "-C", str(tmp_path / "gnu")],
                   check=True)
    same_tree(tmp_path / "src", tmp_path / "gnu" / "src")
    with tarfile.open(tmp_path / "ours.tar") as tar:
        names = tar.getnames()
        assert tar.getmember("src/hard").islnk() and tar.getmember("src/ln").issym()
    assert f"src/{'d' * 120}/sub/{'f' * 150}" in names


@pytest.mark.unit
@pytest.mark.parametrize("made_by", ["gnu", "posix", "oldgnu", "tarfile-pax", "tarfile-gnu",
                                     "ours"])
def test_unpack_reads_the_tar_formats_programs_write(tmp_path, made_by):
    import tarfile
    tar_tree(tmp_path / "src")
    archive = tmp_path / "a.tar"
    if made_by in ("gnu", "posix", "oldgnu"):
        subprocess.run(["tar", "cf", str(archive), f"--format={made_by}", "-C", str(tmp_path),
                        "src"], check=True)
    elif made_by == "ours":
        archive.write_bytes(b"".join(sj.tar_chunks([(str(tmp_path / "src"), "src")])))
    else:
        with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT if made_by == "tarfile-pax"
                          else tarfile.GNU_FORMAT) as tar:
            tar.add(tmp_path / "src", arcname="src")
    with open(archive, "rb") as f:   # (read 7 bytes at a time: every boundary is crossed)
        done = sj.unpack_tar(sj.TarReader(lambda _n: f.read(7)), str(tmp_path / "out"),
                             into_job=False)   # (a job's folder refuses the link to /xxx)
    assert done["tops"] == ["src"] and done["files"] == 10
    same_tree(tmp_path / "src", tmp_path / "out" / "src")


@pytest.mark.unit
def test_unpack_refuses_a_bad_stream_and_leaves_no_partial_file(tmp_path):
    whole = tar_of(({"name": "f"}, b"x" * 3000))
    for cut, says in ((whole[:1024], "ended in the middle"),
                      (b"y" * 1024, "checksum"),
                      (tar_of(({"name": "l", "type": b"2", "linkname": "."}, b""),
                              ({"name": "l/x"}, b"x")), "under a link of the copy")):
        out = tmp_path / f"out{len(os.listdir(tmp_path))}"
        os.mkdir(out)
        with pytest.raises(sj.TarError, match=says):
            pieces = iter([cut])
            sj.unpack_tar(sj.TarReader(lambda _n: next(pieces, b"")), str(out))
        assert not os.path.exists(out / "f") and not os.path.exists(out / "x")
        assert not [n for n in os.listdir(out) if ".partial-" in n]
    # Cut between two members: what came whole stays, and the copy is not taken for whole.
    pieces = iter([tar_of(({"name": "f"}, b"x"))[:1024]])
    os.mkdir(tmp_path / "cut")
    with pytest.raises(sj.TarError, match="before its end blocks"):
        sj.unpack_tar(sj.TarReader(lambda _n: next(pieces, b"")), str(tmp_path / "cut"))
    assert (tmp_path / "cut" / "f").read_bytes() == b"x"
    # A local file that cannot be read ends the upload short of its end blocks.
    upload = sj.TarUpload("first", [(str(tmp_path / "missing"), "m")], lambda data: data)
    assert list(upload.requests()) == ["first"] and upload.failed.errno == errno.ENOENT
    # Numbers too large for octal (GNU base-256), both ways.
    field = sj.tar_number(2 ** 40, 12)
    assert field[0] == 0x80 and sj.tar_read_number(field) == 2 ** 40


def crafted_tar(*members):
    """A tar stream of (name, flag, data) members made by hand: what no tar program writes."""
    stream = b""
    for name, flag, data in members:
        stream += sj.tar_header_block(name, flag, 0o644, 0, len(data)) + sj.tar_pad(data)
    return stream + bytes(1024)


@pytest.mark.unit
@pytest.mark.parametrize("stream, says", [
    (crafted_tar((b"h", b"x", b"0 x=y\n"), (b"f", b"0", b"")), "pax header"),   # (a loop)
    (crafted_tar((b"h", b"x", b"10 size=a\n"), (b"f", b"0", b"")), "pax size"),
    (crafted_tar((b"h", b"x", b"15 mtime=1e999\n"), (b"f", b"0", b"")), "pax mtime"),
    (crafted_tar((b"././@LongLink", b"L", b"a\0b\0"), (b"f", b"0", b"")), "cannot be"),
    (tar_of(({"name": "l", "type": b"2", "linkname": "."}, b""), ({"name": "./l/x"}, b"x")),
     "under a link"),
    (tar_of(({"name": "l", "type": b"2", "linkname": "."}, b""), ({"name": "l", "type": b"5"},
                                                                  b"")), "under a link"),
])
def test_unpack_turns_a_hostile_stream_into_one_clear_error(tmp_path, stream, says):
    """Each is a TarError (the copier's one clear line), never another exception, a
    loop, or a write through a link of the copy."""
    pieces = iter([stream])
    with pytest.raises(sj.TarError, match=says):
        sj.unpack_tar(sj.TarReader(lambda _n: next(pieces, b"")), str(tmp_path))


@pytest.mark.unit
def test_tar_of_a_tree_deeper_than_pythons_stack_and_a_link_hard_linked(tmp_path):
    deep = tmp_path / "src"
    os.mkdir(deep)
    try:
        for _ in range(1100):   # (os.makedirs and shutil.rmtree recurse: not these)
            deep = deep / "d"
            os.mkdir(deep)
        (deep / "f").write_text("deep\n")
        pieces = iter([b"".join(sj.tar_chunks([(str(tmp_path / "src"), "src")]))])
        names = [m.name for m in sj.TarReader(lambda _n: next(pieces, b""))]
        assert len(names) == 1102 and names[-1].endswith("/d/f")
    finally:
        subprocess.run(["rm", "-rf", str(tmp_path / "src")], check=True)
    # A hard link to a link of the copy links the link, never what it names.
    pieces = iter([tar_of(({"name": "l", "type": b"2", "linkname": "/etc/passwd"}, b""),
                          ({"name": "h", "type": b"1", "linkname": "l"}, b""))])
    os.mkdir(tmp_path / "out")
    sj.unpack_tar(sj.TarReader(lambda _n: next(pieces, b"")), str(tmp_path / "out"),
                  into_job=False)
    assert os.readlink(tmp_path / "out" / "h") == "/etc/passwd"
    assert os.stat("/etc/passwd").st_nlink == 1


@pytest.mark.files
def test_a_build_host_walk_sources_in_build_artifact_out(server, tmp_path):
    if not shutil.which("cc"):
        pytest.skip("no C compiler on this host") if not MUST_WORK else pytest.fail("no cc")
    write_tree(tmp_path / "src", BUILD_TREE)
    name = f"build-{uuid.uuid4().hex[:6]}"
    built = cli(server, "run", "--name", name, "--copy", f"{tmp_path}/src:src", "-f",
                "cd src && make && ./hello", user="alice")
    assert built.returncode == 0 and b"built by steve-jobs" in built.stdout, built
    # The job has ended; its files have not: the artifact comes out, and runs here.
    done = cli(server, "cp", f"{name}:src/hello", str(tmp_path / "hello"), user="alice")
    assert done.returncode == 0, done.stderr
    assert os.stat(tmp_path / "hello").st_uid == os.getuid()   # ours, not the job's uid
    ran = subprocess.run([str(tmp_path / "hello")], capture_output=True)
    assert ran.stdout == b"built by steve-jobs\n"
    # A whole folder, into a folder that exists; and a tar stream on stdout.
    os.mkdir(tmp_path / "back")
    assert cli(server, "cp", f"{name}:src", str(tmp_path / "back"), user="alice").returncode == 0
    assert (tmp_path / "back" / "src" / "hello.c").read_text() == BUILD_TREE["hello.c"]
    assert os.access(tmp_path / "back" / "src" / "hello", os.X_OK)   # modes kept
    streamed = cli(server, "cp", f"{name}:src/Makefile", "-", user="alice")
    assert b"hello: hello.c" in streamed.stdout
    st = cli_json(server, "status", name, user="alice")
    assert [e["event"] for e in st["sessions"]].count("copy-out") >= 3, st["sessions"]
    assert cli(server, "rm", name, user="alice").returncode == 0
    assert cli(server, "cp", f"{name}:src", "-", user="alice").returncode == 3   # gone


@pytest.mark.files
def test_cp_onto_a_full_state_disk_is_resource_exhausted_and_harms_no_file(certs, tmp_path):
    """A job's folder on the state disk (--workdir-size 0): a copy that fills the disk
    fails with RESOURCE_EXHAUSTED, the file it was to replace is whole, nothing partial."""
    (tmp_path / "f").write_bytes(os.urandom(64 * sj.MiB))
    with small_filesystem("48m") as fs:
        state_dir = os.path.join(fs, "state")
        os.mkdir(state_dir, 0o711)
        with Server(certs, state_dir=state_dir, extra=["--workdir-size", "0"]) as srv:
            job = start_job(srv, "echo kept > f; sleep 1000", user="alice")
            deadline = time.monotonic() + scaled(10)
            while cli(srv, "cp", f"{job}:f", "-", user="alice").returncode != 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            done = cli(srv, "cp", str(tmp_path / "f"), f"{job}:f", user="alice")
            assert done.returncode == 9 and b"no room left" in done.stderr, done
            assert cli(srv, "exec", job, "cat", "f", user="alice").stdout == b"kept\n"
            listed = cli(srv, "exec", job, "ls", "-a", user="alice").stdout.split()
            assert sorted(listed) == [b".", b"..", b"f"], listed
            assert cli_json(srv, "status", job, user="alice")["state"] == "running"
            (tmp_path / "g").write_text("new\n")   # a file that fits replaces it, as cp's
            assert cli(srv, "cp", str(tmp_path / "g"), f"{job}:f", user="alice").returncode == 0
            assert cli(srv, "exec", job, "cat", "f", user="alice").stdout == b"new\n"
            cli(srv, "stop", "--grace", "0", job, user="alice")


@pytest.mark.files
def test_cp_into_a_running_job_and_links_kept_as_links(server, tmp_path):
    write_tree(tmp_path / "in", {"a.txt": "a\n", "sub/b.txt": "b\n"})
    os.symlink("a.txt", tmp_path / "in" / "link")
    job = start_job(server, "while [ ! -e in/done ]; do sleep 0.05; done; cat in/sub/b.txt",
                    user="alice")
    try:
        assert cli(server, "cp", str(tmp_path / "in"), f"{job}:in", user="alice").returncode == 0
        assert cli(server, "cp", "-", f"{job}:in", user="alice",
                   input=tar_of(({"name": "done"}, b""))).returncode == 0
        assert cli_json(server, "wait", job, user="alice")["exit_code"] == 0
        assert cli(server, "output", job, user="alice").stdout == b"b\n"
        out = cli(server, "cp", f"{job}:in/link", "-", user="alice").stdout
        import io
        import tarfile
        (member,) = tarfile.open(fileobj=io.BytesIO(out)).getmembers()
        assert member.issym() and member.linkname == "a.txt"
        # ID: alone is the whole folder: what it holds lands in the local folder.
        assert cli(server, "cp", f"{job}:", str(tmp_path / "whole"), user="alice").returncode == 0
        assert (tmp_path / "whole" / "in" / "sub" / "b.txt").read_text() == "b\n"
    finally:
        cli(server, "stop", "--grace", "0", job, user="alice")


@pytest.mark.files
@pytest.mark.parametrize("member, says", [
    ({"name": "../evil"}, "leaves the folder"),
    ({"name": "/etc/evil"}, "leaves the folder"),
    ({"name": "dev", "type": b"3", "devmajor": 1, "devminor": 3}, "device node"),
    ({"name": "suid", "mode": 0o4755}, "setuid"),
    ({"name": "hard", "type": b"1", "linkname": "etc/shadow"}, "not in the copy"),
    ({"name": "out", "type": b"2", "linkname": "/etc/shadow"}, "link out of the folder"),
])
def test_cp_in_refuses_what_could_reach_outside_the_folder(server, member, says):
    job = start_job(server, "true", user="alice")
    done = cli(server, "cp", "-", f"{job}:.", user="alice", input=tar_of((member, b"x")))
    assert done.returncode == 4 and says.encode() in done.stderr, done
    assert cli(server, "cp", f"{job}:.", "-", user="alice").stdout.count(b"evil") == 0


@pytest.mark.files
def test_cp_of_a_local_fifo_is_one_line_not_an_empty_copy(server, tmp_path):
    os.mkfifo(tmp_path / "fifo")
    done = cli(server, "cp", str(tmp_path / "fifo"), "no-such-job:x", user="alice")
    assert done.returncode == 2 and b"not a file, folder or link" in done.stderr, done


@pytest.mark.files
def test_cp_out_never_follows_a_planted_link_and_stays_in_the_folder(server):
    job = start_job(server, "ln -s /etc/shadow shadow; ln -s ../../.. up; "
                            "ln -s \"$PWD/..\" work", user="alice")
    cli(server, "wait", job, user="alice")
    for path, says in (("shadow/x", b"link out of the job's working folder"),
                       ("up/etc/passwd", b"leaves the job's working folder"),
                       ("work/x", b"leaves the job's working folder"),
                       ("../x", b"leaves the job's working folder"),
                       ("/etc/passwd", b"not in the job's working folder")):
        done = cli(server, "cp", f"{job}:{path}", "-", user="alice")
        assert done.returncode == 4 and says in done.stderr and not done.stdout, (path, done)
    # The link itself is copied, as a link (docker cp's way): nothing of what it names.
    import io
    import tarfile
    out = cli(server, "cp", f"{job}:shadow", "-", user="alice").stdout
    (member,) = tarfile.open(fileobj=io.BytesIO(out)).getmembers()
    assert member.issym() and member.linkname == "/etc/shadow" and b"root:" not in out


@pytest.mark.tenants
def test_cp_is_the_owners_and_admins_readers_may_copy_out(server, tmp_path):
    job = start_job(server, "echo secret > s")   # mrarsenal's
    cli(server, "wait", job)
    (tmp_path / "f").write_text("x")
    assert cli(server, "cp", f"{job}:s", "-", user="alice").returncode == 3   # not hers
    assert cli(server, "cp", str(tmp_path / "f"), f"{job}:f", user="alice").returncode == 3
    assert b"secret" in cli(server, "cp", f"{job}:s", "-", user="rita").stdout
    done = cli(server, "cp", str(tmp_path / "f"), f"{job}:f", user="rita")
    assert done.returncode == 6 and b"may not call CopyIn" in done.stderr


@pytest.mark.files
def test_cp_in_beyond_the_folders_size_is_refused_and_leaves_no_partial_file(certs, tmp_path):
    with Server(certs, extra=["--workdir-size", "2M", "--stop-jobs-on-exit"]) as srv:
        job = start_job(srv, "true", user="alice")
        big = tar_of(({"name": "big"}, b"\0" * (4 * sj.MiB)))
        done = cli(srv, "cp", "-", f"{job}:.", user="alice", input=big)
        assert done.returncode == 9 and b"no room left" in done.stderr, done
        listing = cli(srv, "cp", f"{job}:.", "-", user="alice").stdout
        assert b"big" not in listing   # not under its name, not under a temporary one
        # A client that goes away mid-copy: no partial file either.
        copier = subprocess.Popen([PYTHON, SCRIPT, "--server", srv.address, "--certs",
                                   srv.certs, "--user", "alice", "cp", "-", f"{job}:."],
                                  stdin=subprocess.PIPE)
        copier.stdin.write(tar_of(({"name": "half"}, b"y" * 8 * sj.KiB))[:4096])
        copier.stdin.flush()
        time.sleep(0.5)
        copier.kill()
        copier.wait()
        time.sleep(0.5)
        assert b"half" not in cli(srv, "cp", f"{job}:.", "-", user="alice").stdout


def run_walkthrough(section, server, folder):
    """The ```sh block of README.md's section, run by bash -e as alice would, with
    `steve-jobs` the CLI for server; returns its CompletedProcess (it succeeded)."""
    (block,) = readme_blocks(section)
    steve_jobs = (f'steve-jobs() {{ "{PYTHON}" "{SCRIPT}" --server {server.address} '
                  f'--certs "{server.certs}" --user alice "$@"; }}\n')
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", steve_jobs + block],
                          cwd=folder, capture_output=True, timeout=scaled(120))
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.files
def test_the_readmes_build_host_walkthrough_runs_as_written(server, tmp_path):
    done = run_walkthrough("Build hosts", server, tmp_path)
    assert b"hello from a build job" in done.stdout, done.stdout


@pytest.mark.files
def test_exec_runs_inside_the_job_as_the_job_and_says_how_it_ended(server):
    job = start_job(server, "echo kept > f; exec sleep 1000", user="alice")
    try:
        deadline = time.monotonic() + scaled(10)
        while cli(server, "cp", f"{job}:f", "-", user="alice").returncode != 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        inside = cli(server, "exec", job, "id -u; pwd; ls; cat /proc/self/cgroup; "
                     "for p in /proc/[0-9]*; do cat $p/comm; done", user="alice")
        assert inside.returncode == 0, inside.stderr
        uid, cwd, files, *rest = inside.stdout.decode().splitlines()
        assert int(uid) >= sj.EngineConfig().uid_base and cwd.endswith(f"/work/{job}")
        assert files == "f"
        assert "0::/" in rest   # its cgroup namespace's root: the job's cgroup
        assert "sleep" in rest and "steve-init" in rest   # the job's processes, only theirs
        assert cli(server, "output", job, user="alice").stdout == b""   # not mixed in
        assert cli(server, "exec", job, "false", user="alice").returncode == 1
        assert cli(server, "exec", job, "echo out; echo err >&2; exit 3",
                   user="alice").stderr == b"err\n"
        missing = cli(server, "exec", job, "--", "no-such-command", user="alice")
        assert missing.returncode == 127, missing.stderr   # (no shell in between: ours says)
        assert missing.stderr == b"no-such-command: command not found\n"
        assert cli(server, "exec", "-i", job, "tr a-z A-Z", user="alice",
                   input=b"typed\n").stdout == b"TYPED\n"
        # Never more than the job: its syscall filter and no_new_privs hold.
        done = cli(server, "exec", job, "unshare -Ur true", user="alice")
        assert done.returncode != 0
        events = [e["event"] for e in cli_json(server, "status", job, user="alice")["sessions"]]
        assert events.count("exec") >= 6
        # Others cannot, readers cannot; a paused or ended job is one line.
        assert cli(server, "exec", job, "true").returncode == 0   # an admin can
        assert cli(server, "exec", job, "true", user="rita").returncode == 6
        assert cli(server, "pause", job, user="alice").returncode == 0
        paused = cli(server, "exec", job, "true", user="alice")
        assert paused.returncode == 5 and b"paused" in paused.stderr
        cli(server, "resume", job, user="alice")
    finally:
        cli(server, "stop", "--grace", "0", job, user="alice")
    ended = cli(server, "exec", job, "true", user="alice")
    assert ended.returncode == 5 and ended.stderr.count(b"\n") == 1 and b"ended" in ended.stderr


@pytest.mark.files
def test_exec_runs_in_the_jobs_network_not_the_hosts(server, host_listener):
    job = start_job(server, "exec sleep 1000", user="alice")
    try:
        inside = cli(server, "exec", job, "--", "bash", "-c",
                     "ls /sys/class/net /proc/self/net/dev_snmp6; "
                     f"echo > /dev/tcp/127.0.0.1/{host_listener} && echo REACHED", user="alice")
        assert inside.stdout.split() == [b"/proc/self/net/dev_snmp6:", b"lo",
                                         b"/sys/class/net:", b"lo"], inside
        assert b"Connection refused" in inside.stderr, inside.stderr
    finally:
        cli(server, "stop", "--grace", "0", job, user="alice")


@pytest.mark.files
def test_exec_i_of_a_command_that_reads_its_stdin_late_or_never_does_not_jam(server):
    """What the caller types waits while the command does not read it: a command that
    writes much before it reads (or reads nothing) has its output relayed meanwhile."""
    job = start_job(server, "exec sleep 1000", user="alice")
    typed = os.urandom(4 * sj.MiB)
    try:
        done = cli(server, "exec", "-i", job, "head -c 1048576 /dev/zero; wc -c",
                   user="alice", input=typed, timeout=scaled(30))
        assert (done.returncode, done.stdout) == (0, bytes(sj.MiB) + b"4194304\n"), \
            done.stderr
        done = cli(server, "exec", "-i", job, "sleep 1; echo done", user="alice",
                   input=typed, timeout=scaled(30))
        assert (done.returncode, done.stdout) == (0, b"done\n"), done.stderr
    finally:
        cli(server, "stop", "--grace", "0", job, user="alice")


def grpc_over_h2(server, user, method, messages, response_type):
    """A call made as a second gRPC stack would from jobs.proto alone: HTTP/2 by hand (h2,
    ssl), gRPC's length-prefixed messages, the request stream left open until the response
    ends. Returns (responses, grpc-status, grpc-message)."""
    import ssl
    import h2.config
    import h2.connection
    import h2.events
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(os.path.join(server.certs, "ca.crt"))
    context.load_cert_chain(os.path.join(server.certs, f"{user}.crt"),
                            os.path.join(server.certs, f"{user}.key"))
    context.set_alpn_protocols(["h2"])
    with context.wrap_socket(socket.create_connection(("127.0.0.1", server.port),
                                                      timeout=scaled(30)),
                             server_hostname="localhost") as tls:
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        h2c.initiate_connection()
        stream = h2c.get_next_available_stream_id()
        h2c.send_headers(stream, [
            (":method", "POST"), (":scheme", "https"), (":authority", "localhost"),
            (":path", f"/steve_jobs.v1.JobService/{method}"), ("te", "trailers"),
            ("content-type", "application/grpc"), *bearer(server.certs, user)])
        for message in messages:
            body = message.SerializeToString()
            h2c.send_data(stream, struct.pack(">BI", 0, len(body)) + body)
        tls.sendall(h2c.data_to_send())
        received, trailers, ended = b"", {}, False
        while not ended:
            data = tls.recv(64 * 1024)
            assert data, "the server hung up"
            for event in h2c.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    received += event.data
                    h2c.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, (h2.events.TrailersReceived,
                                        h2.events.ResponseReceived)):
                    trailers.update((k.decode(), v.decode()) for k, v in event.headers)
                ended = ended or isinstance(event, h2.events.StreamEnded)
            tls.sendall(h2c.data_to_send())
    responses = []
    while received:
        _, size = struct.unpack(">BI", received[:5])
        responses.append(response_type.FromString(received[5:5 + size]))
        received = received[5 + size:]
    return responses, trailers.get("grpc-status"), trailers.get("grpc-message", "")


@pytest.mark.files
def test_exec_from_a_second_grpc_stack_with_jobs_proto_alone(server):
    import jobs_pb2 as pb
    job = start_job(server, "exec sleep 1000", user="alice")
    try:
        replies, status, _ = grpc_over_h2(server, "alice", "Exec", [
            pb.ExecInput(job_id=job, argv=["sh", "-c", "tr a-z A-Z; echo err >&2; exit 3"]),
            pb.ExecInput(data=b"typed\n"), pb.ExecInput(eof=True)], pb.ExecOutput)
        assert status == "0"
        out = b"".join(r.data for r in replies if r.stream == pb.STREAM_STDOUT and not r.ended)
        err = b"".join(r.data for r in replies if r.stream == pb.STREAM_STDERR and not r.ended)
        assert (out, err, replies[-1].ended, replies[-1].exit_code) == (
            b"TYPED\n", b"err\n", True, 3), replies
        replies, status, message = grpc_over_h2(server, "rita", "Exec", [
            pb.ExecInput(job_id=job, argv=["true"])], pb.ExecOutput)
        assert (replies, status) == ([], "7"), message   # a reader may not: PERMISSION_DENIED
    finally:
        cli(server, "stop", "--grace", "0", job, user="alice")


@pytest.mark.files
def test_an_exec_ends_with_the_job_and_with_a_server_restart(certs):
    with Server(certs) as srv:
        job = start_job(srv, "sleep 1000", user="alice")
        marker = f"exec-{uuid.uuid4().hex[:8]}"
        execing = subprocess.Popen([PYTHON, SCRIPT, "--server", srv.address, "--certs",
                                    srv.certs, "--user", "alice", "exec", job,
                                    f"exec -a {marker} sleep 1000"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + scaled(10)
        while not subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        srv.terminate()   # the exec's call ends with the server: so does its command
        execing.wait(scaled(30))
        deadline = time.monotonic() + scaled(10)
        while subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout:
            assert time.monotonic() < deadline, "the exec's command outlived its call"
            time.sleep(0.05)
        srv.restart()
        assert cli_json(srv, "status", job)["state"] == "running"   # the job goes on
        execing = subprocess.Popen([PYTHON, SCRIPT, "--server", srv.address, "--certs",
                                    srv.certs, "--user", "alice", "exec", job, "sleep 1000"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.5)
        cli(srv, "stop", "--grace", "0", job)
        _, err = execing.communicate(timeout=scaled(30))
        assert execing.returncode != 0   # the job ended: so did its exec


@pytest.mark.files
def test_exec_it_is_a_shell_in_the_job_on_a_real_terminal(server):
    job = start_job(server, "sleep 1000", user="alice")
    try:
        with terminal(server, "exec", "-it", job, "sh", user="alice", rows=30,
                      columns=100) as t:
            t.type(b"tty; stty size; id -u\r")
            t.expect(rb"/dev/pts/\d+")                   # a terminal of the job's devpts
            t.expect(rb"30 100")                         # of our size
            t.expect(rb"\d{6,}")                         # as the job's uid
            t.type(b"exit 7\r")
            assert t.wait() == 7
            assert t.modes_restored()
    finally:
        cli(server, "stop", "--grace", "0", job, user="alice")


@pytest.mark.files
def test_files_copied_into_an_ended_job_count_toward_the_quota(certs):
    with Server(certs, extra=["--workdir-size", "4M", "--files-quota", "1M",
                              "--stop-jobs-on-exit"]) as srv:
        job = start_job(srv, "true", user="alice")
        cli(srv, "wait", job, user="alice")
        assert start_job(srv, "true", user="alice")   # nothing kept yet: starts go on
        done = cli(srv, "cp", "-", f"{job}:.", user="alice",
                   input=tar_of(({"name": "two-megs"}, b"\0" * (2 * sj.MiB))))
        assert done.returncode == 0, done.stderr
        refused = cli(srv, "run", "true", user="alice")
        assert refused.returncode == 9 and b"files-quota" in refused.stderr, refused
        assert cli(srv, "run", "true").returncode == 0   # another user's starts go on
        assert cli(srv, "rm", job, user="alice").returncode == 0
        assert cli(srv, "run", "true", user="alice").returncode == 0


# -- batch: the queue, dependencies, deadlines, removal, metrics and events ---------------

def queue_of(*owners_and_priorities):
    """A JobQueue (in a folder of its own) with a record per (owner, priority)."""
    queue = sj.JobQueue(tempfile.mkdtemp(prefix="steve-jobs-queue-"))
    queue.open()
    for n, (owner, priority) in enumerate(owners_and_priorities):
        queue.add({"id": f"job-{n}", "owner": owner, "queue": {"priority": priority}}, {})
    return queue


def drain(queue, may_start=lambda owner: True):
    order = []
    while (entry := queue.pick(may_start)) is not None:
        queue.gone(entry)
        order.append(entry.job_id)
    return order


@pytest.mark.unit
def test_the_queue_is_fifo_per_user_round_robin_between_users_and_by_priority():
    queue = queue_of(*[("many", 0)] * 6, ("one", 0), ("other", 0), ("urgent", 5))
    try:
        assert queue.position("job-6") == 3   # after urgent's and many's first
        assert drain(queue, lambda owner: owner != "other") == [
            "job-8", "job-0", "job-6", "job-1", "job-2", "job-3", "job-4", "job-5"]
        assert drain(queue) == ["job-7"]   # (held back by may_start, not lost)
        assert len(queue) == 0 and os.path.getsize(queue.path) == 0   # emptied: truncated
    finally:
        queue.close()
        shutil.rmtree(os.path.dirname(queue.path))


@pytest.mark.unit
def test_the_queue_journal_keeps_order_dependencies_met_and_what_left():
    queue = queue_of(("a", 0), ("b", 0), ("a", 0))
    try:
        queue.add({"id": "later", "owner": "b", "queue": {"priority": 0,
                                                          "after": [["x", "ok"], ["y", "any"]]}},
                  {"x": "ok", "y": "any"})
        assert queue.position("later") == 0 and queue.waiting_for("later") == {
            "x": "ok", "y": "any"}
        assert queue.met("later", "y") is False and queue.dependents("x") == [("later", "ok")]
        queue.remove("job-1")
        with open(queue.path, "a") as f:
            f.write("not json\n")   # (a torn last line: skipped)
        records = sj.JobQueue(os.path.dirname(queue.path)).load()
        assert [r["id"] for r in records] == ["job-0", "job-2", "later"]
        assert records[2]["queue"]["met"] == ["y"]
    finally:
        queue.close()
        shutil.rmtree(os.path.dirname(queue.path))


@pytest.fixture(scope="module")
def batch_server(certs):
    """A server with two slots, one per user (alice, mrarsenal), for the queue's tests."""
    require_kernel()
    with Server(certs, extra=["--max-jobs", "2", "--max-jobs-per-user", "1",
                              "--max-queued-per-user", "5", "--stop-jobs-on-exit"]) as srv:
        yield srv


def wait_state(server, job_id, states, user="mrarsenal", timeout=scaled(30)):
    deadline = time.monotonic() + timeout
    while True:
        st = cli_json(server, "status", job_id, user=user)
        if st["state"] in states:
            return st
        assert time.monotonic() < deadline, f"{job_id} stayed {st['state']}"
        time.sleep(0.05)


@pytest.mark.batch
def test_a_full_host_queues_starts_in_turn_and_a_queued_job_can_be_stopped_or_removed(
        batch_server):
    srv = batch_server
    blocker = start_job(srv, "sleep 1000")
    try:
        refused = cli(srv, "run", "true")   # without --queue: as before
        assert refused.returncode == 9 and b"--max-jobs-per-user" in refused.stderr, refused
        first = start_job(srv, "echo first", "mrarsenal", "", "--queue")
        second = start_job(srv, "echo second", "mrarsenal", "", "--queue")
        st = cli_json(srv, "status", second)
        assert (st["state"], st["queue_position"]) == ("queued", 2), st
        assert "1 job ahead of it" in cli(srv, "status", second).stdout.decode()
        listed = cli_json(srv, "list", "--state", "queued")
        assert [j["job_id"] for j in listed] == [first, second], listed
        doomed = start_job(srv, "touch /tmp/ran; sleep 1000", "mrarsenal", "", "--queue")
        gone = start_job(srv, "true", "mrarsenal", "", "--queue")
        stopped = cli_json(srv, "stop", doomed)
        assert (stopped["state"], stopped["exit_code"]) == ("stopped", None), stopped
        assert "never ran" in stopped["error"], stopped
        assert cli(srv, "rm", gone).returncode == 0
        assert cli(srv, "status", gone).returncode == 3
        assert cli(srv, "output", second).stdout == b""
        for verb in ("pause", "kill", "exec"):
            done = cli(srv, verb, second, *(["true"] if verb == "exec" else []))
            assert done.returncode == 5 and b"is queued" in done.stderr, (verb, done)
            assert done.stderr.count(b"\n") == 1, done
        cli(srv, "stop", "--grace", "0", blocker)
        for job, text in ((first, b"first\n"), (second, b"second\n")):
            assert wait_state(srv, job, sj.ENDED_STATES)["state"] == "exited"
            assert cli(srv, "output", job).stdout == text
        firsts = [cli_json(srv, "status", j)["start_time"] for j in (first, second)]
        assert firsts[0] < firsts[1]   # first in, first out
    finally:
        cli(srv, "stop", "--grace", "0", blocker)


@pytest.mark.batch
def test_one_users_many_queued_jobs_do_not_starve_anothers(batch_server):
    srv = batch_server
    blockers = [start_job(srv, "sleep 1000", user) for user in ("mrarsenal", "alice")]
    try:
        mine = [start_job(srv, "sleep 0.2", "mrarsenal", "", "--queue") for _ in range(4)]
        hers = start_job(srv, "echo hers", "alice", "", "--queue")
        assert cli_json(srv, "status", hers, user="alice")["queue_position"] == 1
        cli(srv, "stop", "--grace", "0", blockers[1], user="alice")   # a slot frees
        # alice's one job takes it: mrarsenal is at his own cap (one running)
        assert wait_state(srv, hers, sj.ENDED_STATES, "alice")["state"] == "exited"
        cli(srv, "stop", "--grace", "0", blockers[0])
        for job in mine:
            assert wait_state(srv, job, sj.ENDED_STATES)["state"] == "exited"
    finally:
        for job, user in zip(blockers, ("mrarsenal", "alice")):
            cli(srv, "stop", "--grace", "0", job, user=user)


@pytest.mark.batch
def test_after_waits_for_its_dependencies_and_a_failed_ok_one_cancels_it(batch_server):
    srv = batch_server
    gate = start_job(srv, "sleep 4; exit 3")
    failed_ok = start_job(srv, "echo never", "mrarsenal", "", "--after", gate)
    after_any = start_job(srv, "echo any", "mrarsenal", "", "--after", f"{gate}:any")
    chained = start_job(srv, "echo never", "mrarsenal", "", "--after", failed_ok)
    st = cli_json(srv, "status", after_any)
    assert st["state"] == "queued" and st["waiting_for"] == [gate], st
    assert f"waits for job {gate} to end" in cli(srv, "status", after_any).stdout.decode()
    cancelled = wait_state(srv, failed_ok, sj.ENDED_STATES)
    assert cancelled["state"] == "cancelled", cancelled
    assert f"{gate}:ok), ended exited with exit code 3" in cancelled["error"], cancelled
    assert cli(srv, "output", failed_ok).stdout == b""   # it never ran
    assert wait_state(srv, chained, sj.ENDED_STATES)["state"] == "cancelled"   # and on
    assert wait_state(srv, after_any, sj.ENDED_STATES)["state"] == "exited"
    assert cli(srv, "output", after_any).stdout == b"any\n"
    late = cli_json(srv, "run", "--after", gate, "true")   # (it failed already: at once)
    assert late["state"] == "cancelled" and "exit code 3" in late["error"], late
    ok = start_job(srv, "true")
    wait_state(srv, ok, sj.ENDED_STATES)
    done = cli(srv, "run", "-f", "--after", ok, "echo after an ended one")   # met at once
    assert done.returncode == 0 and done.stdout == b"after an ended one\n", done


@pytest.mark.batch
def test_run_f_queue_says_once_that_it_waits_then_follows_to_the_end(batch_server):
    srv = batch_server
    blocker = start_job(srv, "sleep 1000")
    try:
        hog = "python3 -c \"x = b'x' * (256 << 20)\"; echo $?"   # (over its --memory)
        follower = subprocess.Popen(
            [PYTHON, SCRIPT, "--server", srv.address, "--certs", srv.certs, "--user",
             "mrarsenal", "run", "-f", "--queue", "--memory", "64M", f"{hog}; exit 4"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(scaled(1.0))
        cli(srv, "stop", "--grace", "0", blocker)
        out, err = follower.communicate(timeout=scaled(30))
        # It ran once the slot freed, with the limits it asked for, followed to its end.
        assert follower.returncode == 4 and out == b"137\n", (out, err)   # (OOM-killed)
        assert err.count(b"is queued: it waits for a slot: 0 jobs ahead of it") == 1, err
    finally:
        cli(srv, "stop", "--grace", "0", blocker)


@pytest.mark.batch
def test_queue_timeouts_and_queued_jobs_outlive_a_restart_in_order(certs):
    with Server(certs, extra=["--max-jobs", "1"]) as srv:   # (its jobs outlive it)
        blocker = start_job(srv, "sleep 1000")
        impatient = start_job(srv, "echo never", "mrarsenal", "", "--queue",
                              "--queue-timeout", "1s")
        queued = [start_job(srv, f"echo {n}", "mrarsenal", "", "--queue") for n in range(3)]
        st = wait_state(srv, impatient, sj.ENDED_STATES)
        assert (st["state"], st["timed_out"]) == ("cancelled", True), st
        assert "queue timeout" in st["error"], st
        srv.restart()
        assert [cli_json(srv, "status", j)["queue_position"] for j in queued] == [1, 2, 3]
        cli(srv, "stop", "--grace", "0", blocker)
        starts = [wait_state(srv, j, sj.ENDED_STATES)["start_time"] for j in queued]
        assert starts == sorted(starts)
        assert [cli(srv, "output", j).stdout for j in queued] == [b"0\n", b"1\n", b"2\n"]


@pytest.mark.batch
def test_bad_queue_requests_get_one_clear_line(batch_server):
    srv = batch_server
    theirs = start_job(srv, "true")   # (mrarsenal's: alice may not see it)
    removed = start_job(srv, "true")
    wait_state(srv, removed, sj.ENDED_STATES)
    cli(srv, "rm", removed)
    assert cli(srv, "run", "--after", theirs, "true").returncode == 0   # (an admin sees it)
    for args, code, said in (
            (["--queue-timeout", "0", "--queue"], 2, b"invalid duration"),
            (["--queue-timeout=-5s", "--queue"], 2, b"invalid duration"),
            (["--queue-timeout", "10m"], 4, b"add --queue"),
            (["--after", "no-such-job"], 3, b"no job 'no-such-job'"),
            (["--after", theirs], 3, b"no job"),
            (["--after", removed], 3, b"no job"),
            (["--name", "loop", "--after", "loop"], 3, b"no job 'loop'"),   # (a cycle)
            (["--after", "x:sometimes"], 2, b"ID:ok or ID:any"),
            (["--priority", "5", "--queue"], 6, b"may not set a --priority")):
        done = cli(srv, "run", *args, "true", user="alice")
        assert done.returncode == code and said in done.stderr, (args, done)
        assert b"Traceback" not in done.stderr and done.stderr.count(b"\n") <= 3, done
    assert cli(srv, "run", "--priority", "2000", "--queue", "true").returncode == 4
    blocker = start_job(srv, "sleep 1000", "alice")
    try:
        for _ in range(5):
            start_job(srv, "true", "alice", "", "--queue")
        full = cli(srv, "run", "--queue", "true", user="alice")
        assert full.returncode == 9 and b"--max-queued-per-user" in full.stderr, full
        assert full.stderr.count(b"\n") == 1
    finally:
        cli(srv, "stop", "--grace", "0", blocker, user="alice")


@pytest.mark.unit
@hypothesis.settings(max_examples=60, deadline=None, database=None)
@hypothesis.given(owners=hypothesis.strategies.lists(hypothesis.strategies.sampled_from("abcd"),
                                                     min_size=1, max_size=30),
                  served=hypothesis.strategies.integers(0, 5))
def test_a_queued_jobs_position_is_its_place_in_the_start_order(owners, served):
    queue = queue_of(*[(owner, 0) for owner in owners])
    try:
        for _ in range(served):   # (some owners served already: the rotation moves on)
            entry = queue.pick(lambda owner: True)
            if entry:
                queue.gone(entry)
        positions = {job_id: queue.position(job_id) for job_id in list(queue._entries)}
        order = drain(queue)
        assert [positions[job_id] for job_id in order] == list(range(1, len(order) + 1))
    finally:
        queue.close()
        shutil.rmtree(os.path.dirname(queue.path))


class EventReader:
    """`events --json` of a user's as a process; lines() reads what has come so far."""

    def __init__(self, server, *args, user="alice"):
        self.proc = subprocess.Popen(
            [PYTHON, SCRIPT, "--server", server.address, "--certs", server.certs, "--user",
             user, "--json", "events", *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.events = []
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buffer = b""

    def until(self, done, timeout=scaled(30)):
        """Events until done(events) holds (or the timeout: AssertionError)."""
        deadline = time.monotonic() + timeout
        while not done(self.events):
            assert time.monotonic() < deadline, f"events so far: {self.events}"
            chunk = self.proc.stdout.read() or b""
            self.buffer += chunk
            *lines, self.buffer = self.buffer.split(b"\n")
            self.events += [json.loads(line) for line in lines if line]
            time.sleep(0.05)
        return self.events

    def close(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.mark.batch
def test_events_stream_each_users_job_lives_as_they_happen(batch_server):
    srv = batch_server
    mine, everyone = EventReader(srv), EventReader(srv, "--all", user="rita")
    try:
        time.sleep(scaled(1.5))   # (both streams open)
        other = start_job(srv, "true")   # mrarsenal's: not alice's to see
        blocker = start_job(srv, "sleep 1000", "alice")
        queued = start_job(srv, "exit 3", "alice", "", "--queue", "--label", "team=x")
        cli(srv, "pause", blocker, user="alice")
        cli(srv, "resume", blocker, user="alice")
        cli(srv, "stop", "--grace", "0", blocker, user="alice")
        wait_state(srv, queued, sj.ENDED_STATES, "alice")
        cli(srv, "rm", queued, user="alice")
        seen = mine.until(lambda es: any(e["kind"] == "removed" for e in es))
        assert [(e["kind"], e["job"]["job_id"]) for e in seen] == [
            ("started", blocker), ("queued", queued), ("paused", blocker),
            ("resumed", blocker), ("ended", blocker), ("started", queued),
            ("ended", queued), ("removed", queued)], seen
        ended = [e["job"] for e in seen if e["kind"] == "ended"]
        assert [(j["state"], j["exit_code"]) for j in ended] == [("stopped", None),
                                                                 ("exited", 3)], ended
        assert seen[1]["job"]["labels"] == {"team": "x"} and seen[1]["time"].endswith("Z")
        assert everyone.until(lambda es: {e["job"]["job_id"] for e in es} >= {other, queued})
        denied = cli(srv, "events", "--all", user="alice", timeout=scaled(30))
        assert denied.returncode == 6 and denied.stderr.count(b"\n") == 1, denied
        assert cli(srv, "events", other, user="alice").returncode == 3   # (not hers)
    finally:
        mine.close()
        everyone.close()


@pytest.mark.batch
def test_a_jobs_start_is_told_before_its_end_however_soon_it_ends(engine):
    """A job that ends at once can have its result seen (the watcher thread) before the
    thread that started it, back from the spawner, tells of the start: observers (the
    events stream, metrics) heard "ended" before "started". Made likely here by a thread
    that keeps the GIL busy, as a loaded server's threads do: every job out of order
    before (40 of 40 by hand)."""
    told, lock = [], threading.Lock()

    def observer(kind, st, _record):
        if kind in ("started", "ended"):
            with lock:
                told.append((kind, st.id))

    busy, jobs = threading.Event(), []

    def hog_the_interpreter():
        while not busy.is_set():
            pass

    switch = sys.getswitchinterval()
    engine.observe(observer)
    hog = threading.Thread(target=hog_the_interpreter)
    try:
        sys.setswitchinterval(0.02)
        hog.start()
        for _ in range(20):
            jobs.append(engine.start("tester", ["true"]))
            assert engine.wait(jobs[-1], scaled(30)).state == sj.EXITED
    finally:
        busy.set()
        if hog.is_alive():
            hog.join()
        sys.setswitchinterval(switch)
        engine.unobserve(observer)
    with lock:
        order = {job: [kind for kind, told_id in told if told_id == job] for job in jobs}
    assert all(kinds == ["started", "ended"] for kinds in order.values()), order


@pytest.mark.batch
def test_a_queued_jobs_start_is_told_after_its_queueing():
    """The dispatcher can start a queued job (a slot freed meanwhile) before the thread
    that queued it has told "queued": here that thread is held in an observer, as a
    descheduled thread would be, while the job ahead of it ends. "started" came first."""
    told = []

    def observer(kind, st, _record):
        if kind == "queued":
            time.sleep(scaled(1.0))   # (the queueing thread, held while the slot frees)
        told.append((kind, st.id))

    with running_engine(max_running_jobs=1) as engine:
        engine.observe(observer)
        try:
            ahead = engine.start("tester", ["sleep", str(scaled(0.3))])
            queued = engine.start("tester", ["true"], queue=sj.QueueRequest(wanted=True))
            assert engine.wait(queued, scaled(30)).state == sj.EXITED
            assert engine.wait(ahead, scaled(30)).state == sj.EXITED
        finally:
            engine.unobserve(observer)
    assert [kind for kind, job in told if job == queued] == ["queued", "started", "ended"], told


@pytest.mark.batch
def test_a_job_that_just_ended_is_removed_only_once_its_end_is_told(engine):
    """Between a job's end (recorded: its status says so) and its telling (held until its
    start is told), a remover could go first: "removed" told before "ended", and the end
    then told of a job already gone. Here the starting thread is held in an observer of
    "started" while the job ends and is removed."""
    told, starting = [], threading.Event()

    def observer(kind, st, _record):
        told.append((kind, st.id))
        if kind == "started":
            starting.set()
            time.sleep(scaled(1.0))   # (the starting thread, held: the end waits)

    engine.observe(observer)
    starter = concurrent.futures.ThreadPoolExecutor(1)
    try:
        started = starter.submit(engine.start, "tester", ["true"])
        assert starting.wait(scaled(30))
        job_id = told[0][1]
        deadline = time.monotonic() + scaled(30)
        while engine.status(job_id).state not in sj.ENDED_STATES:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        engine.remove(job_id)
        assert started.result(scaled(30)) == job_id
    finally:
        starter.shutdown()
        engine.unobserve(observer)
    assert [kind for kind, job in told if job == job_id] == ["started", "ended", "removed"]


def scrape(address):
    """The server's metrics, parsed as Prometheus does: {(name, labels...): value}."""
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=scaled(10)) as reply:
        text = reply.read().decode()
    return {(s.name, *sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.batch
def test_metrics_move_as_jobs_start_queue_end_and_fail(certs):
    metrics = f"127.0.0.1:{free_port()}"
    with Server(certs, extra=["--max-jobs", "1", "--metrics-listen", metrics,
                              "--stop-jobs-on-exit"]) as srv:
        before = scrape(metrics)
        assert before[("steve_jobs_starts_total",)] == 0
        assert before[("process_open_fds",)] > 0 and before[("process_resident_memory_bytes",)]
        blocker = start_job(srv, "echo hello; sleep 1000", "alice")
        queued = start_job(srv, "exit 3", "alice", "", "--queue")
        assert cli(srv, "run", "true").returncode == 9   # (full, and no --queue)
        now = scrape(metrics)
        assert now[("steve_jobs_jobs", ("state", "running"), ("user", "alice"))] == 1
        assert now[("steve_jobs_jobs", ("state", "queued"), ("user", "alice"))] == 1
        assert now[("steve_jobs_queued_total",)] == 1
        assert now[("steve_jobs_rpcs_total", ("code", "RESOURCE_EXHAUSTED"),
                    ("method", "Start"))] == 1
        assert cli(srv, "output", blocker, user="alice").stdout == b"hello\n"
        cli(srv, "stop", "--grace", "0", blocker, user="alice")
        wait_state(srv, queued, sj.ENDED_STATES, "alice")
        done = cli(srv, "run", "-f", "--timeout", "1s", "sleep 100")
        assert done.returncode == 128 + 15, done
        assert cli(srv, "run", "-f", "--", "no-such-program").returncode == 127
        after = scrape(metrics)
        assert after[("steve_jobs_starts_total",)] == 3   # (not the one that could not exec)
        assert after[("steve_jobs_start_seconds_count",)] == 3
        assert after[("steve_jobs_queue_wait_seconds_count",)] == 1
        assert after[("steve_jobs_jobs_ended_total", ("state", "exited"))] == 1
        assert after[("steve_jobs_jobs_ended_total", ("state", "stopped"))] == 2
        assert after[("steve_jobs_jobs_ended_total", ("state", "failed"))] == 1
        assert after[("steve_jobs_deadline_stops_total", ("deadline", "timeout"))] == 1
        assert after[("steve_jobs_output_sent_bytes_total",)] >= len(b"hello\n")
        assert after[("steve_jobs_rpcs_total", ("code", "OK"), ("method", "Start"))] >= 4
        assert after[("steve_jobs_rpc_duration_seconds_count", ("method", "Output"))] >= 1
        assert ("steve_jobs_jobs", ("state", "queued"), ("user", "alice")) not in after
    refused = subprocess.run([PYTHON, SCRIPT, "server", "--metrics-listen", "0.0.0.0:9",
                              "--certs", server_only(certs)], capture_output=True,
                             timeout=scaled(60))
    assert refused.returncode == 1 and b"not a loopback address" in refused.stderr, refused
    assert refused.stderr.count(b"\n") == 1, refused.stderr


@contextlib.contextmanager
def engines_in_turn(**config):
    """(state_dir, cgroup_root, config) for engines a test opens one after another on the
    same state; afterwards one more opens and closes it, stopping every job, and removes
    what is left, however the test ended."""
    require_kernel()
    state_dir, root = new_state_dir(), f"steve-jobs-test-{uuid.uuid4().hex[:8]}"
    try:
        yield state_dir, root, sj.EngineConfig(state_dir=state_dir, cgroup_root=root, **config)
    finally:
        if os.path.exists(state_dir):
            with running_engine(state_dir=state_dir, cgroup_root=root):
                pass


@pytest.mark.batch
def test_a_retried_queued_start_is_its_job_and_stop_jobs_on_exit_keeps_the_queue():
    with engines_in_turn(max_running_jobs=1) as (state_dir, root, config):
        first = sj.Engine(config).open()
        try:
            first.start("tester", ["sleep", "1000"])
            meta, queue = sj.JobMeta(request_id="retry-me"), sj.QueueRequest(wanted=True)
            queued = first.start("tester", ["true"], meta=meta, queue=queue)
            t = time.monotonic()
            assert first.start("tester", ["true"], meta=meta, queue=queue) == queued
            assert time.monotonic() - t < scaled(2)   # (not a wait for a start under way)
        finally:
            first.close(stop_jobs=True)   # (as --stop-jobs-on-exit: running jobs stop)
        with running_engine(state_dir=state_dir, cgroup_root=root) as second:
            assert second.wait(queued, scaled(30)).state == sj.EXITED


@pytest.mark.batch
def test_the_readmes_batch_host_walkthrough_runs_as_written(server, tmp_path):
    text = run_walkthrough("Batch hosts", server, tmp_path).stdout.decode()
    assert "state    queued" in text and "waits for job" in text, text
    assert "training\n" in text, text


@pytest.mark.unit
def test_a_job_leaving_the_queue_keeps_its_journal_line_until_it_has_started():
    queue = queue_of(("a", 0), ("b", 0))
    try:
        leaving = queue.pick(lambda owner: True)   # (the dispatcher starts it now)
        queue.remove("job-1")                      # the queue is empty meanwhile
        assert [r["id"] for r in sj.JobQueue(os.path.dirname(queue.path)).load()] == [
            leaving.job_id]                        # a crash now loses nothing
        queue.gone(leaving)
        assert os.path.getsize(queue.path) == 0    # started: the journal is cut
    finally:
        queue.close()
        shutil.rmtree(os.path.dirname(queue.path))


@pytest.mark.batch
def test_run_i_queue_waits_for_its_start_then_sends_its_input(batch_server):
    srv = batch_server
    blocker = start_job(srv, "sleep 1000")
    try:
        typing_in = subprocess.Popen(
            [PYTHON, SCRIPT, "--server", srv.address, "--certs", srv.certs, "--user",
             "mrarsenal", "run", "-i", "--queue", "tr a-z A-Z"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(scaled(1.0))
        cli(srv, "stop", "--grace", "0", blocker)
        out, err = typing_in.communicate(b"typed while queued\n", timeout=scaled(30))
        assert typing_in.returncode == 0 and out == b"TYPED WHILE QUEUED\n", (out, err)
    finally:
        cli(srv, "stop", "--grace", "0", blocker)


@pytest.mark.tenants
def test_one_user_holds_at_most_16_event_streams_and_others_are_not_held_back(batch_server):
    srv = batch_server
    channel = user_channel(srv.certs, srv.address, "alice")
    stub, md = pb_grpc.JobServiceStub(channel), bearer(srv.certs, "alice")
    streams = [stub.Events(pb.EventsRequest(), metadata=md)
               for _ in range(sj.MAX_EVENT_STREAMS_PER_USER)]
    try:
        time.sleep(scaled(1.0))   # (all of them open on the server)
        extra = stub.Events(pb.EventsRequest(), metadata=md, timeout=scaled(10))
        with pytest.raises(grpc.RpcError) as refused:
            next(extra)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "16 Events calls" in refused.value.details()
        theirs = EventReader(srv, user="mrarsenal")   # another user's stream is served
        try:
            time.sleep(scaled(1.0))
            job = start_job(srv, "true")
            theirs.until(lambda es: any(e["job"]["job_id"] == job for e in es))
        finally:
            theirs.close()
    finally:
        for stream in streams:
            stream.cancel()
        channel.close()


@pytest.mark.batch
def test_a_stop_while_a_job_leaves_the_queue_stops_it_once_it_runs():
    with running_engine(max_running_jobs=1) as engine:
        blocker = engine.start("tester", ["sleep", "1000"])
        leaving = engine.start("tester", ["sleep", "1000"],
                               queue=sj.QueueRequest(wanted=True))
        prepare, spawn, slowed = engine._prepare, engine._spawner.spawn, threading.Event()

        def later(step):   # (the real step, a second later)
            def slow(*args, **kw):
                slowed.set()
                time.sleep(1.0)
                return step(*args, **kw)
            return slow
        # Stopped while it leaves the queue (its folders being made), then while its
        # supervisor is being started: either way it runs, and is stopped.
        for obj, name, step in ((engine, "_prepare", prepare),
                                (engine._spawner, "spawn", spawn)):
            slowed.clear()
            with unittest.mock.patch.object(obj, name, later(step)):
                engine.request_stop(blocker, grace=0)
                assert slowed.wait(scaled(30))
                if name == "_prepare":
                    assert engine.status(leaving).state == sj.QUEUED
                st = engine.stop(leaving, grace=0)
            assert st.state == sj.STOPPED and st.started_at, (name, st)
            blocker = engine.start("tester", ["sleep", "1000"])
            leaving = engine.start("tester", ["sleep", "1000"],
                                   queue=sj.QueueRequest(wanted=True))


@pytest.mark.batch
def test_queue_timeouts_and_dependencies_that_came_while_no_server_ran():
    with engines_in_turn(max_running_jobs=2, max_jobs_per_user=2) as (state_dir, root, config):
        first = sj.Engine(config).open()
        try:
            first.start("tester", ["sleep", "1000"])
            gone = first.start("tester", ["sleep", "1"], options=sj.JobOptions(remove=True))
            after_gone = first.start("tester", ["echo", "ran"],
                                     queue=sj.QueueRequest(after=((gone, "ok"),)))
            impatient = first.start("tester", ["true"], queue=sj.QueueRequest(
                wanted=True, after=((after_gone, "any"),), timeout=1.0))
        finally:
            first.close()   # (its jobs run on: `gone` ends while no server runs)
        time.sleep(2.5)
        with unittest.mock.patch.object(sj, "REMOVE_GRACE", 0.0), \
                running_engine(state_dir=state_dir, cgroup_root=root) as second:
            st = second.wait(impatient, scaled(30))
            assert (st.state, st.timed_out) == (sj.CANCELLED, True), st   # (not stuck)
            st = second.wait(after_gone, scaled(30))   # its dependency's --rm waited for it
            assert (st.state, st.exit_code) == (sj.EXITED, 0), st


@pytest.mark.batch
def test_a_users_queued_jobs_hold_a_bounded_number_of_bytes():
    with running_engine(max_running_jobs=1) as engine, \
            unittest.mock.patch.object(sj, "MAX_QUEUED_BYTES_PER_USER", 64 * sj.KiB):
        engine.start("tester", ["sleep", "1000"])
        big = ["echo", "x" * (20 * sj.KiB)]
        for _ in range(3):
            engine.start("tester", big, queue=sj.QueueRequest(wanted=True))
        with pytest.raises(sj.ResourceExhaustedError, match="commands and environments"):
            engine.start("tester", big, queue=sj.QueueRequest(wanted=True))
        engine.start("another", big, queue=sj.QueueRequest(wanted=True))   # (theirs: room)


@pytest.mark.batch
def test_metrics_over_https_need_a_client_certificate_of_the_ca(certs, tmp_path):
    import ssl
    import urllib.request
    own = server_only(certs)
    metrics = f"127.0.0.1:{free_port()}"
    with Server(certs, extra=["--metrics-listen", metrics, "--queue-by-default",
                              "--metrics-cert", os.path.join(own, "server.crt"),
                              "--metrics-key", os.path.join(own, "server.key")]) as srv:
        context = ssl.create_default_context(cafile=os.path.join(certs, "ca.crt"))
        with pytest.raises((ssl.SSLError, OSError)):   # no client certificate: refused
            urllib.request.urlopen(f"https://{metrics}/metrics", context=context,
                                   timeout=scaled(10)).read()
        context.load_cert_chain(os.path.join(certs, "rita.crt"), os.path.join(certs, "rita.key"))
        with urllib.request.urlopen(f"https://{metrics}/metrics", context=context,
                                    timeout=scaled(10)) as reply:
            assert b"steve_jobs_starts_total" in reply.read()
        # --queue-by-default leaves starts with files as they were: they start.
        (tmp_path / "f").write_text("copied\n")
        done = cli(srv, "run", "-f", "--copy", str(tmp_path / "f"), "cat f")
        assert done.returncode == 0 and done.stdout == b"copied\n", done


###############################################################################
# Scale: hundreds of jobs at once through a real server (real kernel, as root)
###############################################################################

SCALE_JOBS = 500


def for_each_at_once(items, work, clients=10):
    """[work(item) for item in items], from `clients` threads; raises the first failure."""
    results, errors = [None] * len(items), []

    def client(k):
        try:
            for i in range(k, len(items), clients):
                results[i] = work(items[i])
        except Exception as e:   # (raised below: a thread's exception is otherwise lost)
            errors.append(e)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.scale
def test_500_jobs_at_once_are_readopted_by_a_restart_and_each_ends_exactly(certs):
    """500 jobs run at once (each waits for its input); a server restart re-adopts every one;
    then each is given its input and followed from its first byte to its end: its exact
    output (both streams) and exit code."""
    require_kernel()
    cap = str(SCALE_JOBS + 50)
    with Server(certs, extra=["--max-jobs", cap, "--max-jobs-per-user", cap]) as srv:
        md = bearer(certs)
        channel = user_channel(certs, srv.address, "mrarsenal")
        stub = pb_grpc.JobServiceStub(channel)
        script = 'echo "start $0"; read line; echo "$line $0" >&2; exit $(($0 % 256))'
        ids = for_each_at_once(range(SCALE_JOBS), lambda i: stub.Start(pb.StartRequest(
            argv=["sh", "-c", script, str(i)], stdin=True), metadata=md,
            timeout=scaled(120)).job_id)
        states = lambda: [stub.Status(pb.JobRef(job_id=j), metadata=md).state for j in ids]
        assert set(states()) == {pb.STATE_RUNNING}   # all of them at once
        channel.close()
        srv.restart()
        channel = user_channel(certs, srv.address, "mrarsenal")
        stub = pb_grpc.JobServiceStub(channel)
        assert set(states()) == {pb.STATE_RUNNING}   # every one re-adopted

        def finish(i):
            job_id = ids[i]
            # (no eof: the job ends once it has read its line, maybe before an eof came)
            stub.Input(iter([pb.InputMessage(job_id=job_id, data=b"go\n")]), metadata=md,
                       timeout=scaled(60))
            got = b"".join(c.data for c in stub.Output(
                pb.OutputRequest(job_id=job_id, follow=True), metadata=md, timeout=scaled(120)))
            assert got == b"start %d\ngo %d\n" % (i, i), (i, got)
            st = stub.Status(pb.JobRef(job_id=job_id), metadata=md)
            assert (st.state, st.exit_code) == (pb.STATE_EXITED, i % 256), (i, st)
        try:
            for_each_at_once(range(SCALE_JOBS), finish)
        finally:
            channel.close()
        layout = sj.CgroupLayout.detect()
        deadline = time.monotonic() + scaled(30)   # every job's cgroup gone (warm ones stay)
        while (len(sj.JobCgroup.names(layout, srv.cgroup_root)) > sj.WARM_SHIMS
               and time.monotonic() < deadline):
            time.sleep(0.1)
        assert len(sj.JobCgroup.names(layout, srv.cgroup_root)) <= sj.WARM_SHIMS


@pytest.mark.kernel
def test_a_job_gets_its_own_folder_where_the_state_folder_is_covered():
    """The server's state folder is covered in a job's view, and the job's own working
    folder is bound at its path inside it (/var/lib/steve-jobs/work/ID by default). The
    tests' other state folders are under /var/tmp, which a job gets a private one of."""
    state_dir = tempfile.mkdtemp(prefix="steve-jobs-test-", dir="/var/lib")
    with running_engine(state_dir=state_dir) as engine:
        st, out = sh(engine, "pwd; ls -A; ls -A ..")
    assert st.exit_code == 0, st.error
    workdir = os.path.join(state_dir, "work", st.id)
    assert out.decode() == f"{workdir}\n{st.id}\n", out   # empty; nothing else beside it


@pytest.mark.scale
def test_a_jobs_view_makes_one_tmpfs_for_dev_its_private_folders_and_the_covers():
    """Each filesystem a job mounts is paid for at every job's end, in proportion to all
    the jobs running: the kernel removes a job's memory cgroup by walking every
    superblock's per-cgroup lists (beside 2,000 sleeping jobs with nine filesystems each,
    11% of the CPU while jobs started one after another). /dev, /tmp, /var/tmp, /dev/shm,
    /run/lock and the covers over the server's folders are folders of one tmpfs of the
    job's: each as private, writable (a cover by root only) or read-only as it was."""
    cover = host_folder_for_jobs()   # stands for a folder of the server's: covered
    host = {line.split()[2] for line in open("/proc/self/mountinfo")}
    # (Each the host has: a job gets no /run/lock where the host has none; /dev's its own.)
    private = [p for p in sj.JOB_PRIVATE_DIRS if os.path.isdir(p) or p.startswith("/dev/")]
    probe = (f"pwd; cat /proc/self/mountinfo; echo ==; for d in {' '.join(private)}; do "
             "touch $d/x && echo wrote $d; done; touch /dev/x 2>/dev/null || echo read-only; "
             f"touch {cover}/x 2>/dev/null || echo root-only; ls -A {cover}")
    try:
        with running_engine(hidden_paths=(cover,)) as engine:
            st, out = sh(engine, probe)
    finally:
        shutil.rmtree(cover)
    workdir, _, out = out.decode().partition("\n")
    mountinfo, _, said = out.partition("==\n")
    ours = {}   # mount point: (device, type, options) of the filesystems the job made
    for line in mountinfo.splitlines():
        fields = line.split()
        if fields[2] not in host and fields[4] != workdir:   # (its working folder: a start's)
            ours[fields[4]] = (fields[2], fields[fields.index("-") + 1], fields[5])
    shared = ["/dev", *private, cover]
    assert {ours[p][:2] for p in shared} == {(ours["/dev"][0], "tmpfs")}, ours
    assert {t for _, t, _ in ours.values()} <= {"tmpfs", "proc", "devpts", "sysfs", "cgroup2"}
    assert len({d for d, _, _ in ours.values()}) <= 5, ours   # one of each
    assert set(ours["/dev"][2].split(",")) >= {"ro", "nosuid", "noexec"}, ours["/dev"]
    for path in private:
        options = ours[path][2].split(",")
        assert options[0] == "rw" and {"nosuid", "nodev"} <= set(options), ours[path]
        assert "noexec" not in options, ours[path]
    assert set(ours[cover][2].split(",")) >= {"nosuid", "nodev"}, ours[cover]
    assert st.exit_code == 0 and said == "".join(
        f"wrote {d}\n" for d in private) + "read-only\nroot-only\n", said


@pytest.mark.scale
def test_a_jobs_supervisor_holds_no_more_than_the_file_loaded_as_a_module(server):
    """Each job's shim is a fork of the spawner, and holds what it holds: each fork, exec
    and exit of a shim or its command costs page tables of that size. A process that
    imports steve_jobs holds the file's code and what it imports: the shim not half as
    much again (a script's parse tree, kept while the script runs, was 25 MB of 41)."""
    job_id = start_job(server, "sleep 300")
    module = subprocess.Popen(
        [PYTHON, "-I", "-S", "-c", f"import sys; sys.path.insert(0, {HERE!r}); "
                                   f"import steve_jobs; print(flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert module.stdout.readline() == b"\n"   # imported
        rss_kib = lambda pid: next(int(line.split()[1]) for line in open(f"/proc/{pid}/status")
                                   if line.startswith("VmRSS:"))
        shim = rss_kib(shim_pid_of(server, job_id))
        assert shim < 1.5 * rss_kib(module.pid), (shim, rss_kib(module.pid))
    finally:
        module.kill()
        module.wait()
        cli(server, "rm", "-f", job_id)


def mergeable_kib(pid):
    """KiB of pid's mappings offered to KSM (VmFlags mg)."""
    kib, size = 0, 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("VmFlags:") and "mg" in line.split()[1:]:
                kib += size
    return kib


@pytest.mark.scale
def test_a_jobs_supervisor_offers_its_pages_to_ksm_and_its_command_does_not(server):
    """Where the operator runs KSM, the shims' copies of the spawner's pages (the same bytes
    in each) are kept once: each shim's private writable mappings (its heap and Python's
    arenas, at least) are offered, as the spawner's it inherited them with; the job's
    command, exec'd, offers none."""
    if not os.path.isdir(os.path.dirname(sj.KSM_RUN)):
        (pytest.fail if MUST_WORK else pytest.skip)("this kernel has no KSM")
    job_id = start_job(server, "sleep 300")
    try:
        shim = shim_pid_of(server, job_id)
        with open(f"/proc/{shim}/task/{shim}/children") as f:
            command = [int(p) for p in f.read().split()]
        assert len(command) == 1, command
        assert mergeable_kib(shim) >= 1024, mergeable_kib(shim)
        assert mergeable_kib(command[0]) == 0
    finally:
        cli(server, "rm", "-f", job_id)


MOUNT_TEMPLATE_PROBE = """
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import steve_jobs as sj
own, cwd = os.readlink("/proc/self/ns/mnt"), os.getcwd()
work = os.path.join(sys.argv[2], "work")
os.mkdir(work)
sj.keep_mounts_private(work)
os.mkdir(os.path.join(work, "job"))
sj.mount("tmpfs", os.path.join(work, "job"), "tmpfs", 0, "size=64k")
template = sj.MountTemplate(work)
fd = template.current()
pid = os.fork()
if pid == 0:   # a job's command: enter it and look
    sj.setns(fd, sj.CLONE_NEWNS)
    os._exit(0 if not os.path.ismount(os.path.join(work, "job")) else 1)
job_saw_no_folder = os.waitpid(pid, 0)[1] == 0
again = template.current()
other = os.readlink(f"/proc/self/fd/{fd}") != own
time.sleep(sj.MOUNT_TEMPLATE_AGE)
idle = template.idle_for()
template.release()
missing = sj.MountTemplate(os.path.join(sys.argv[2], "missing"))
print(json.dumps({"own": own == os.readlink("/proc/self/ns/mnt"), "cwd": cwd == os.getcwd(),
                  "other": other, "same_within_age": again == fd,
                  "job_saw_no_folder": job_saw_no_folder,
                  "idle_for": idle, "missing": [missing.current(), missing.current()],
                  "still_own": own == os.readlink("/proc/self/ns/mnt")}))
sj.unmount_if_mounted(work)
"""


ODD_MOUNTS_PROBE = """
import json, os, subprocess, sys
sys.path.insert(0, sys.argv[1])
import steve_jobs as sj
top = sys.argv[2].encode()
points = [top + b"/caf\\xe9", top + b"/caf\\xc3\\xa9 x"]   # latin-1; UTF-8 with a space
for point in points:
    os.mkdir(point)
    subprocess.run([b"mount", b"-t", b"tmpfs", b"none", point], check=True)
layout = sj.CgroupLayout.detect()
print(json.dumps({"cgroups": bool(layout.unified or layout.v1),
                  "mount_points": [sj.is_mount_point(os.fsdecode(p)) for p in points],
                  "folder": sj.is_mount_point(sys.argv[2])}))
"""


@pytest.mark.kernel
def test_a_host_mount_whose_name_is_not_utf8_does_not_stop_the_server(tmp_path):
    """Reproduction: a host with a mount point whose name is not UTF-8 (a USB disk's label
    in latin-1) could not run the server: reading /proc/self/mountinfo raised
    UnicodeDecodeError, a traceback at start; and a mount point named in UTF-8 was not
    seen as one (its name decoded twice). In a mount namespace of the probe's own."""
    require_kernel()
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", PYTHON, "-c",
                           ODD_MOUNTS_PROBE, HERE, str(tmp_path)],
                          capture_output=True, timeout=scaled(30))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"cgroups": True, "mount_points": [True, True],
                                       "folder": False}, done.stderr


@pytest.mark.kernel
def test_a_mount_template_leaves_its_maker_where_it_was(tmp_path):
    """MountTemplate.current() unshares and comes back: its maker (the spawner) stays in
    its own mount namespace and folder; a process entering the template finds no job's
    working folder; within MOUNT_TEMPLATE_AGE the same one serves; one that cannot be made
    is tried once (None: jobs copy the host's), and its maker stays where it was."""
    require_kernel()
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", PYTHON, "-c",
                           MOUNT_TEMPLATE_PROBE, HERE, str(tmp_path)], cwd=str(tmp_path),
                          capture_output=True, timeout=scaled(30))
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got == {"own": True, "cwd": True, "other": True, "same_within_age": True,
                   "job_saw_no_folder": True, "idle_for": 0.0, "missing": [None, None],
                   "still_own": True}, (got, done.stderr)
    assert done.stderr.count(b"cannot make a template") <= 1, done.stderr


def mount_namespaces_held(pid):
    """The mount namespaces pid holds an fd on (none if it is gone)."""
    held = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("mnt:["):
                    held.append(fd)
    return held


@pytest.mark.scale
def test_jobs_views_come_from_a_template_of_the_hosts_mounts_that_pins_nothing(server):
    """A job's mounts are copied from a template of the host's less the jobs' working
    folders (MountTemplate), not from the host's: with 2,000 jobs running, a copy of their
    2,000 mounts at each start. The template is at most MOUNT_TEMPLATE_AGE old: a mount
    made on the host shows in the jobs started after it, once the warm shims made before it
    are used; and once the server is idle nothing holds one (it would keep filesystems the
    host unmounted alive): neither the spawner nor a shim, and the spawner is back in the
    host's mounts."""
    folder = host_folder_for_jobs()
    job_id = None
    try:
        assert start_job(server, "true")   # the spawner is up, its warm shims made
        time.sleep(0.3)                    # (a quiet moment: it refills)
        sj.mount("tmpfs", folder, "tmpfs", sj.MS_NOSUID | sj.MS_NODEV, "size=64k,mode=0755")
        with open(os.path.join(folder, "marker"), "w") as f:
            f.write("mounted\n")
        time.sleep(sj.MOUNT_TEMPLATE_AGE)   # a template made before the mount is too old now
        seen = [cli(server, "run", "-f", "cat", f"{folder}/marker").stdout
                for _ in range(sj.WARM_SHIMS + 1)]
        assert seen[-1] == b"mounted\n", seen
        job_id = start_job(server, "sleep 300")
        spawner = next(pid for pid in children_of(server.proc.pid)
                       if open(f"/proc/{pid}/cmdline", "rb").read().rstrip(b"\0")
                       == b"steve-jobs spawner")
        ours = lambda: [spawner, *children_of(spawner)]   # its warm shims and the job's
        assert shim_pid_of(server, job_id) in ours()
        wait_for(lambda: not [pid for pid in ours() if mount_namespaces_held(pid)],
                 timeout=scaled(5) + sj.MOUNT_TEMPLATE_AGE)
        assert os.readlink(f"/proc/{spawner}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    finally:
        if job_id:
            cli(server, "rm", "-f", job_id)
        sj.unmount_if_mounted(folder)
        shutil.rmtree(folder)


@pytest.mark.e2e
def test_the_spawner_names_itself_in_ps(server):
    """An operator's `ps` shows the server's spawner as what it is, not as the boot code
    and settings (JSON) of its command line."""
    assert start_job(server, "true")   # (the spawner is up)
    titles = []
    for pid in children_of(server.proc.pid):   # (a short-lived child may be gone)
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            titles.append(f.read().rstrip(b"\0"))
    assert titles.count(b"steve-jobs spawner") == 1, titles
    assert not [t for t in titles if b"_spawner" in t], titles


@pytest.mark.e2e
def test_the_spawner_caches_its_compiled_code_where_the_servers_python_says(certs, tmp_path):
    """The spawner imports this file in an interpreter started with -I, which ignores
    PYTHONDONTWRITEBYTECODE and PYTHONPYCACHEPREFIX: the server hands both on. An operator
    who keeps caches out of the code's folder (PYTHONPYCACHEPREFIX) finds them there."""
    prefix = str(tmp_path / "caches")
    with Server(certs, prefix=["env", "-u", "PYTHONDONTWRITEBYTECODE",
                               f"PYTHONPYCACHEPREFIX={prefix}"]) as srv:
        assert start_job(srv, "true")   # (the spawner has loaded the file by now)
        cached = glob.glob(os.path.join(prefix, "**", "steve_jobs.*.pyc"), recursive=True)
        assert cached, f"no cached steve_jobs under {prefix}: {os.listdir(tmp_path)}"
