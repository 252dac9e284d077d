"""Tests for steve-jobs, in three groups:

  unit    no root needed: parsing, validation, the cgroup v2 path against a fake cgroupfs tree
  kernel  the job engine against the real kernel: real cgroups, namespaces, processes
  e2e     a real server process over real mutual TLS on loopback

Kernel and e2e tests skip without root, cgroups or namespaces, unless STEVE_JOBS_MUST_WORK=1,
under which they fail instead. Every test removes the cgroups and processes it makes.
"""

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

import steve_jobs as sj

MUST_WORK = os.environ.get("STEVE_JOBS_MUST_WORK") == "1"
HERE = os.path.dirname(os.path.abspath(__file__))


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
        shutil.rmtree(state_dir, ignore_errors=True)
        assert not leftovers, f"cgroups left behind: {leftovers}"


def remove_cgroups(layout, root):
    """Kill and remove every cgroup under root (a safety net); returns what existed."""
    names = sj.JobCgroup.names(layout, root)
    for name in names:
        cg = sj.JobCgroup(layout, root, name)
        with contextlib.suppress(OSError, sj.Error):
            cg.kill()
        cg.remove(timeout=5)
    sj.JobCgroup.remove_root(layout, root)
    return names


@pytest.fixture(scope="module")
def engine():
    with running_engine() as e:
        yield e


def run(engine, argv, limits=sj.Limits(), timeout=60, **options):
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


def test_layout_hybrid_uses_v1_controllers_and_the_unified_tree():
    layout = sj.CgroupLayout.from_mountinfo(HYBRID_MOUNTINFO, read=lambda p, d=None: "")
    assert layout.unified == "/sys/fs/cgroup/unified"
    assert layout.v1["memory"] == "/sys/fs/cgroup/memory"
    assert layout.v1["freezer"] == "/sys/fs/cgroup/freezer"
    assert layout.v2 == () and layout.missing() == []


def test_layout_pure_v2_reads_offered_controllers():
    layout = sj.CgroupLayout.from_mountinfo(
        V2_MOUNTINFO, read=lambda p, d=None: "cpuset cpu io memory hugetlb pids rdma\n")
    assert layout.unified == "/sys/fs/cgroup" and layout.v1 == {}
    assert layout.v2 == ("cpu", "memory", "io", "pids") and layout.missing() == []


def test_layout_v1_comounted_controllers_share_a_folder():
    layout = sj.CgroupLayout.from_mountinfo(V1_COMOUNT_MOUNTINFO)
    assert layout.v1["cpu"] == layout.v1["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct"
    cg = sj.JobCgroup(layout, "steve-jobs", "j-1")
    assert len(cg.dirs()) == 4   # cpu,cpuacct once; memory; blkio; pids
    assert layout.missing() == []


def test_layout_without_pids_reports_it_missing():
    layout = sj.CgroupLayout.from_mountinfo(V2_MOUNTINFO, read=lambda p, d=None: "cpu memory io")
    assert layout.missing() == ["pids"]


V2_FILES = ("cgroup.procs", "cgroup.subtree_control", "cgroup.events", "cgroup.freeze",
            "cgroup.kill", "cpu.max", "cpu.stat", "memory.max", "memory.swap.max",
            "memory.current", "memory.peak", "memory.events", "io.max", "pids.max")


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
    assert (job / "pids.max").read_text() == "11"          # + the job's init
    assert (job / "io.max").read_text() == "8:0 rbps=1000000 wbps=max"
    assert cg.dirs() == [str(job)]


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
    assert cg.usage() == {"cpu_seconds": 2.5, "memory_bytes": 4096,
                          "peak_memory_bytes": 1048576, "oom_kills": 1}
    assert cg.populated()


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
        "/sys/fs/cgroup/pids/steve-jobs/j-3/pids.max": "6",
        "/sys/fs/cgroup/blkio/steve-jobs/j-3/blkio.throttle.write_bps_device": "254:0 4096",
    }


def _unopened_engine(**config):
    return sj.Engine(sj.EngineConfig(**config), layout=sj.CgroupLayout(unified="/x"))


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


def test_limits_default_and_cap_from_config():
    engine = _unopened_engine(default_limits=sj.Limits(cpu=0.5, memory=64 * sj.MiB, pids=7),
                              max_limits=sj.Limits(cpu=1, memory=128 * sj.MiB, pids=10,
                                                   io_write_bps=8192))
    assert engine.effective_limits(sj.Limits()) == sj.Limits(cpu=0.5, memory=64 * sj.MiB, pids=7)
    with pytest.raises(sj.InvalidArgumentError):
        engine.effective_limits(sj.Limits(io_write_bps=8193))


@pytest.mark.parametrize("argv", [[], [""], ["echo", "a\0b"], "echo hi", [1, 2],
                                  ["x" * (sj.MAX_ARGV_BYTES + 1)], ["\udcff"]])
def test_bad_argv_is_rejected(argv):
    with pytest.raises(sj.InvalidArgumentError):
        sj.validate_argv(argv)


@pytest.mark.parametrize("env", [[("1BAD", "x")], [("A=B", "x")], [("OK", "a\0b")]])
def test_bad_env_is_rejected(env):
    with pytest.raises(sj.InvalidArgumentError):
        sj.validate_env(env)


def test_copy_output_keeps_cap_and_drains_the_rest(tmp_path):
    r, w = os.pipe()
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    payload = os.urandom(300_000)
    writer = threading.Thread(target=lambda: (sj._write_all(w, payload), os.close(w)))
    writer.start()
    written, truncated, error = sj.copy_output(r, out, cap=100_000)
    writer.join()
    os.close(out)
    assert (written, truncated, error) == (100_000, True, "")
    assert (tmp_path / "out").read_bytes() == payload[:100_000]


def _job_with(result, stop=False, paused=False):
    job = sj.Job("id", {"owner": "o", "uid": 1}, "/nonexistent")
    job.result, job.stop_requested, job.paused = result, stop, paused
    return job


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


def test_whole_disk_of_names_a_disk_or_nothing():
    dev = sj.whole_disk_of("/")
    assert dev == "" or (dev.count(":") == 1 and not os.path.exists(
        f"/sys/dev/block/{dev}/partition"))
    assert sj.whole_disk_of("/proc") == ""


###############################################################################
# Kernel tests: the engine on the real kernel
###############################################################################

def test_output_and_exit_code(engine):
    status, out = sh(engine, "printf hello; printf ' world' >&2; exit 3")
    assert (status.state, status.exit_code, status.signal) == (sj.EXITED, 3, None)
    assert out == b"hello world"
    assert status.output_bytes == len(out)
    assert status.ended_at >= status.started_at >= status.created_at - 1


def test_output_is_binary_exact(engine):
    script = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 4000)"
    status, out = run(engine, ["python3", "-c", script])
    assert status.exit_code == 0 and out == bytes(range(256)) * 4000


def test_command_not_found_fails_with_127(engine):
    status, out = run(engine, ["no-such-command-here"])
    assert (status.state, status.exit_code) == (sj.FAILED, 127)
    assert "command not found" in status.error and b"command not found" in out


def test_not_executable_fails_with_126(engine):
    status, _ = run(engine, ["/etc/passwd"])
    assert (status.state, status.exit_code) == (sj.FAILED, 126)
    assert "Permission denied" in status.error


def test_missing_workdir_fails_to_start(engine):
    status, _ = run(engine, ["true"], workdir="/nonexistent/dir")
    assert status.state == sj.FAILED and "working directory" in status.error


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


def test_unknown_job_id_is_not_found(engine):
    for call in (lambda: engine.status("nope"), lambda: engine.stop("nope"),
                 lambda: engine.read_output("nope"), lambda: list(engine.follow("nope")),
                 lambda: engine.pause("nope"), lambda: engine.status(None)):
        with pytest.raises(sj.NotFoundError):
            call()


def test_environment_is_small_and_hides_server_secrets(engine, monkeypatch):
    monkeypatch.setenv("STEVE_TEST_SECRET", "hunter2")
    status, out = run(engine, ["env"], env=(("EXTRA", "yes"),))
    names = {line.split("=", 1)[0] for line in out.decode().splitlines()}
    assert names == {"PATH", "HOME", "LANG", "EXTRA"} and b"hunter2" not in out


def test_root_jobs_need_the_server_to_allow_them(engine):
    with pytest.raises(sj.PermissionDeniedError):
        engine.start("tester", ["id"], options=sj.JobOptions(as_root=True))


def test_memory_hog_is_oom_killed_and_reported(engine):
    hog = "x = b'x' * (256 << 20); print('survived')"
    status, out = run(engine, ["python3", "-c", hog], limits=sj.Limits(memory=64 * sj.MiB))
    assert status.state == sj.OOM_KILLED, status
    assert status.oom_kills >= 1 and status.signal == signal.SIGKILL
    assert b"survived" not in out
    assert status.peak_memory_bytes <= 64 * sj.MiB + 1 * sj.MiB


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


def test_cpu_limit_holds_a_busy_loop_near_its_share(engine):
    busy = "import time\nt = time.time()\nwhile time.time() - t < 3: pass\n"
    status, _ = run(engine, ["python3", "-c", busy], limits=sj.Limits(cpu=0.2))
    share = status.cpu_seconds / (status.ended_at - status.started_at)
    assert 0.12 < share < 0.26, f"cpu share {share:.3f} with a 0.2 limit"


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


def test_job_network_has_only_loopback_and_cannot_reach_the_host(engine, host_listener):
    script = f"ls /sys/class/net; echo > /dev/tcp/127.0.0.1/{host_listener} && echo REACHED"
    status, out = run(engine, ["bash", "-c", script])
    lines = out.decode().splitlines()
    assert lines[0] == "lo" and "REACHED" not in lines, out
    assert "Connection refused" in out.decode()


def test_host_network_option_shares_the_host_network(engine, host_listener):
    script = f"echo > /dev/tcp/127.0.0.1/{host_listener} && echo REACHED"
    status, out = run(engine, ["bash", "-c", script], host_network=True)
    assert b"REACHED" in out, out


def test_ps_inside_shows_only_the_job(engine):
    status, out = run(engine, ["ps", "-e", "-o", "pid=,comm="])
    procs = [line.split() for line in out.decode().splitlines()]
    assert procs[0] == ["1", "steve-init"], out
    assert [p[1] for p in procs[1:]] == ["ps"], out


def test_hostname_is_the_job_id(engine):
    job_id = engine.start("tester", ["hostname"])
    engine.wait(job_id, 30)
    assert b"".join(engine.follow(job_id)).decode().strip() == job_id


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


def test_ended_job_leaves_no_cgroup_and_no_process(engine):
    job_id = engine.start("tester", ["sh", "-c", "sleep 0.2 & sleep 0.1"])
    dirs = job_cgroup_dirs(engine, job_id)
    assert dirs, "a running job has cgroup folders"
    status = engine.wait(job_id, 30)
    assert status.state == sj.EXITED
    assert not [d for d in dirs if os.path.exists(d)]
    assert not pids_of_uid(status.uid)


def test_stop_kills_a_tree_that_traps_sigterm_and_daemonizes(engine):
    script = ("trap '' TERM; "
              "setsid sh -c \"trap '' TERM; sleep 1000\" & "
              "(sh -c \"trap '' TERM; sleep 1000\" &) ; "
              "echo ready; while :; do sleep 1; done")
    job_id = engine.start("tester", ["sh", "-c", script])
    for _ in engine.follow(job_id):
        break   # 'ready': the tree exists
    uid = engine.status(job_id).uid
    deadline = time.monotonic() + 10
    while len(pids_of_uid(uid)) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)   # the daemons' own forks may still be under way
    assert len(pids_of_uid(uid)) >= 4
    dirs = job_cgroup_dirs(engine, job_id)
    status = engine.stop(job_id, grace=0.5)
    assert status.state == sj.STOPPED and status.signal == signal.SIGKILL
    assert not pids_of_uid(uid)
    assert not [d for d in dirs if os.path.exists(d)]
    with pytest.raises(sj.FailedPreconditionError):
        engine.stop(job_id)


def test_stop_with_sigterm_ends_a_polite_job_at_once(engine):
    job_id = engine.start("tester", ["sleep", "1000"])
    status = engine.stop(job_id, grace=30)
    assert status.state == sj.STOPPED and status.signal == signal.SIGTERM
    assert status.ended_at - status.started_at < 10


def test_twenty_followers_attaching_at_different_moments_get_every_byte(engine):
    writer = ("import os, sys, time, hashlib\n"
              "h = hashlib.sha256()\n"
              "for i in range(50):\n"
              "    chunk = os.urandom(1000000)\n"
              "    h.update(chunk)\n"
              "    sys.stdout.buffer.write(chunk); sys.stdout.flush()\n"
              "    time.sleep(0.02)\n"
              "open('digest', 'w').write(h.hexdigest())\n")
    job_id = engine.start("tester", ["python3", "-c", writer])
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
    status = engine.wait(job_id, 60)
    assert status.exit_code == 0 and not errors
    workdir = engine._get(job_id).spec["workdir"]
    expected = open(os.path.join(workdir, "digest")).read()
    assert digests == [expected] * 20
    assert status.output_bytes == 50_000_000


def test_output_cap_keeps_the_first_bytes_and_lets_the_job_finish():
    with running_engine(output_cap=100_000) as engine:
        status, out = sh(engine, "head -c 300000 /dev/zero; echo done >&2; exit 0")
    assert status.exit_code == 0 and status.output_truncated
    assert out == b"\0" * 100_000 and status.output_bytes == 100_000


def test_pause_freezes_and_resume_thaws(engine):
    counter = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done"
    job_id = engine.start("tester", ["sh", "-c", counter])
    time.sleep(0.3)
    assert engine.pause(job_id).state == sj.PAUSED
    time.sleep(0.1)   # let the freeze settle
    size, cpu = engine.status(job_id).output_bytes, engine.status(job_id).cpu_seconds
    time.sleep(0.5)
    paused = engine.status(job_id)
    assert (paused.output_bytes, paused.cpu_seconds) == (size, cpu)
    assert engine.resume(job_id).state == sj.RUNNING
    time.sleep(0.3)
    assert engine.status(job_id).output_bytes > size
    with pytest.raises(sj.FailedPreconditionError):
        engine.resume(job_id)
    engine.pause(job_id)
    assert engine.stop(job_id, grace=1).state == sj.STOPPED   # stopping a paused job works


def test_jobs_survive_an_engine_restart():
    require_kernel()
    state_dir = new_state_dir()
    root = f"steve-jobs-test-{uuid.uuid4().hex[:8]}"
    first = sj.Engine(sj.EngineConfig(state_dir=state_dir, cgroup_root=root)).open()
    try:
        done = first.start("tester", ["sh", "-c", "echo finished; exit 4"])
        first.wait(done, 30)
        live = first.start("tester", ["sh", "-c", "echo started; sleep 1000"])
        for _ in first.follow(live):
            break
    finally:
        first._spawner.close()   # the server goes away without stopping its jobs
        first._watcher.close()
    with running_engine(state_dir=state_dir, cgroup_root=root) as second:
        assert second.status(done).exit_code == 4
        assert b"".join(second.follow(done)) == b"finished\n"
        assert second.status(live).state == sj.RUNNING
        assert second.read_output(live) == b"started\n"
        assert second.stop(live, grace=5).state == sj.STOPPED
        assert b"".join(second.follow(live)) == b"started\n"


def test_start_sweeps_leftover_cgroups():
    require_kernel()
    root = f"steve-jobs-test-{uuid.uuid4().hex[:8]}"
    layout = sj.CgroupLayout.detect()
    stale = sj.JobCgroup(layout, root, "j-stale")
    stale.create()
    state_dir = new_state_dir()
    try:
        engine = sj.Engine(sj.EngineConfig(state_dir=state_dir, cgroup_root=root)).open()
        assert not [d for d in stale.dirs() if os.path.exists(d)]
        engine.close()
    finally:
        remove_cgroups(layout, root)
        shutil.rmtree(state_dir, ignore_errors=True)


def test_many_quick_jobs_all_report_their_exit(engine):
    ids = [engine.start("tester", ["sh", "-c", f"exit {i % 7}"]) for i in range(30)]
    statuses = [engine.wait(i, 30) for i in ids]
    assert [s.exit_code for s in statuses] == [i % 7 for i in range(30)]
    assert {s.state for s in statuses} == {sj.EXITED}
