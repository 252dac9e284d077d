#!/usr/bin/env python3
"""steve-jobs: run commands on this Linux host as isolated, resource-limited jobs.

How to run:   python steve_jobs.py server              (as root, on the job host)
              python steve_jobs.py run "make -j4"      (anywhere with a client certificate)
              python steve_jobs.py --help              (every subcommand)

Security model, in five lines:
  1. Clients prove who they are with a TLS client certificate signed by the server's CA.
  2. Every call also carries a JWT bound to that certificate; its role decides what the caller may do.
  3. Jobs run in their own PID, mount, network, UTS, IPC and cgroup namespaces, as a fresh
     unprivileged uid with no_new_privs, inside a cgroup that caps CPU, memory, IO and pids.
  4. The threaded server never forks: a single-threaded spawner does every privileged step.
"""

# Sections, in dependency order (nothing calls into a section below it except the CLI):
#   constants and errors -> Linux primitives -> cgroups -> spawner, shim and init
#   -> job engine -> auth -> gRPC service -> client -> CLI -> main()

# Only light modules here: the spawner runs this file too, and every megabyte it holds
# makes each fork and the job's final exec slower (secrets pulls in OpenSSL, dataclasses
# inspect, ctypes.util and uuid subprocess; logging is imported on first use).
import ctypes
import errno
import fcntl
import json
import math
import os
import re
import select
import signal
import socket
import struct
import sys
import threading
import time
import typing


class _LazyLogger:
    """The 'steve_jobs' logger, imported on first use."""

    def __getattr__(self, name):
        import logging
        return getattr(logging.getLogger("steve_jobs"), name)


log = _LazyLogger()


def random_hex(nbytes):
    """Random hex digits from the kernel's CSPRNG (what secrets.token_hex does)."""
    return os.urandom(nbytes).hex()


def new_job_id():
    """A random (version 4) UUID string, as uuid.uuid4() would make."""
    b = bytearray(os.urandom(16))
    b[6], b[8] = (b[6] & 0x0F) | 0x40, (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

###############################################################################
# Constants and errors
###############################################################################

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

DEFAULT_STATE_DIR = "/var/lib/steve-jobs"
DEFAULT_CGROUP_ROOT = "steve-jobs"
JOB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_ARGV_BYTES = 128 * KiB        # one start request must fit one SOCK_SEQPACKET message
MAX_REQUEST_BYTES = 1 * MiB       # a start request, argv and environment JSON-encoded
SO_SNDBUFFORCE = 32
MAX_ARGV_ITEMS = 4096
MAX_ENV_ITEMS = 256
MIN_MEMORY = 8 * MiB              # below this even the job's init cannot run
SPAWN_TIMEOUT = 15.0              # seconds the engine waits for a job to reach exec
KILL_TIMEOUT = 10.0               # seconds a killed job gets to disappear
CHUNK = 1 * MiB                   # largest piece of output read or copied at once
PIPE_SIZE = 1 * MiB               # job stdout pipe capacity: fewer stalls for chatty jobs

# Job states, as status() reports them.
RUNNING, PAUSED = "running", "paused"
EXITED, FAILED, STOPPED, KILLED, OOM_KILLED, UNKNOWN = (
    "exited", "failed", "stopped", "killed", "oom_killed", "unknown")
ENDED_STATES = (EXITED, FAILED, STOPPED, KILLED, OOM_KILLED, UNKNOWN)


class Error(Exception):
    """Base of every error a caller of the engine can cause or be told about."""


class NotFoundError(Error):
    """No such job (or not one the caller may see)."""


class InvalidArgumentError(Error):
    """The request is malformed or a value is out of range; nothing was changed."""


class FailedPreconditionError(Error):
    """The job is not in a state that allows the operation (e.g. stopping an ended job)."""


class ResourceExhaustedError(Error):
    """The server cannot take more work right now."""


class PermissionDeniedError(Error):
    """The caller is known but may not do this."""


class UnauthenticatedError(Error):
    """The caller could not be identified."""


class UnavailableError(Error):
    """A server facility (cgroups, namespaces, the spawner) is not working."""


###############################################################################
# Linux primitives (ctypes for what Python 3.11 lacks)
###############################################################################

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REC, MS_PRIVATE = 0x4000, 0x40000
MNT_DETACH = 0x2
PR_SET_NAME, PR_SET_NO_NEW_PRIVS = 15, 38
IN_MODIFY, IN_MOVED_TO, IN_IGNORED = 0x2, 0x80, 0x8000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1

_libc = ctypes.CDLL(None, use_errno=True)   # the C library Python itself is linked with
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


def _check(result, what):
    """Raise OSError with errno if a libc call returned -1, else return its result."""
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare(flags):
    """unshare(2): move the calling process into new namespaces. Raises OSError."""
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source, target, fstype, flags, data=None):
    """mount(2). Raises OSError."""
    enc = lambda s: s.encode() if s is not None else None
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
           f"mount {target}")


def umount_lazy(target):
    """umount2(target, MNT_DETACH): detach target and everything mounted below it."""
    _check(_libc.umount2(os.fsencode(target), ctypes.c_int(MNT_DETACH)), f"umount {target}")


def setns(fd, nstype):
    """setns(2): join the namespace fd refers to. Raises OSError."""
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def prctl(option, arg):
    """prctl(2) with one argument. Raises OSError."""
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg) if isinstance(arg, int)
                       else ctypes.c_char_p(arg), 0, 0, 0), "prctl")


def inotify_init():
    """A non-blocking, close-on-exec inotify descriptor. Raises OSError."""
    return _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")


def inotify_add_watch(fd, path, mask):
    """Watch path; returns the watch descriptor. Raises OSError."""
    return _check(_libc.inotify_add_watch(fd, os.fsencode(path), mask), "inotify_add_watch")


def inotify_rm_watch(fd, wd):
    """Stop a watch; an already-gone watch is not an error."""
    _libc.inotify_rm_watch(fd, wd)


def inotify_read(fd):
    """Yield (wd, mask, name) for every event queued on a non-blocking inotify fd."""
    try:
        buf = os.read(fd, 64 * KiB)
    except BlockingIOError:
        return
    pos = 0
    while pos < len(buf):
        wd, mask, _cookie, size = struct.unpack_from("iIII", buf, pos)
        name = buf[pos + 16:pos + 16 + size].rstrip(b"\0").decode(errors="replace")
        pos += 16 + size
        yield wd, mask, name


def bring_loopback_up():
    """Set IFF_UP on 'lo' in the current network namespace. Raises OSError."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def process_start_time(pid):
    """The kernel's start time (clock ticks since boot) of pid, or None if it is gone.

    A pid plus its start time names one process for good: pids are reused, the pair is not.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def write_file(path, data):
    """Write a small control file (cgroupfs, procfs) in one write(2). Raises OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode() if isinstance(data, str) else data)
    finally:
        os.close(fd)


def read_file(path, default=None):
    """Read a small text file; default if it does not exist (or cannot be read)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        if default is None:
            raise
        return default


def write_json_atomic(path, obj):
    """Replace path with obj as JSON so readers see the old or the new file, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.rename(tmp, path)


###############################################################################
# Cgroups (v1, v2 and hybrid) by direct cgroupfs writes
###############################################################################

V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "blkio", "pids", "freezer")
V2_CONTROLLERS = ("cpu", "memory", "io", "pids")
V2_EQUIVALENT = {"cpuacct": "cpu", "blkio": "io", "freezer": None}   # None: cgroup.freeze


class Limits(typing.NamedTuple):
    """Resource limits of one job; 0 means 'the server default' in a request."""
    cpu: float = 0.0          # CPU time as a fraction of cores (0.5 = half a core)
    memory: int = 0           # bytes of RAM; swap may not add to it
    pids: int = 0             # processes and threads the command may have at once
    io_read_bps: int = 0      # bytes/s read from io_device
    io_write_bps: int = 0     # bytes/s written to io_device
    io_device: str = ""       # "MAJOR:MINOR" of a whole disk; default: the job's files' disk


class CgroupLayout(typing.NamedTuple):
    """Where each controller lives on this host: a v1 hierarchy or the unified (v2) tree."""
    unified: str = ""        # cgroup2 mount point, if any
    v1: dict = {}            # controller -> v1 mount point (never mutated)
    v2: tuple = ()           # controllers the unified root offers

    @classmethod
    def from_mountinfo(cls, mountinfo, read=read_file):
        """Parse /proc/self/mountinfo text. Controllers mounted as v1 win over v2."""
        unified, v1 = "", {}
        for line in mountinfo.splitlines():
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) < 5 or len(rfields) < 3:
                continue
            mount_point, fstype, options = fields[4], rfields[0], rfields[2].split(",")
            if fstype == "cgroup2" and not unified:
                unified = mount_point
            elif fstype == "cgroup":
                for ctl in V1_CONTROLLERS:
                    if ctl in options:
                        v1.setdefault(ctl, mount_point)
        v2 = ()
        if unified:
            offered = read(os.path.join(unified, "cgroup.controllers"), "").split()
            v2 = tuple(c for c in V2_CONTROLLERS if c in offered)
        return cls(unified=unified, v1=v1, v2=v2)

    @classmethod
    def detect(cls):
        """The layout of this host. Raises UnavailableError if no cgroupfs is mounted."""
        layout = cls.from_mountinfo(read_file("/proc/self/mountinfo"))
        if not layout.unified and not layout.v1:
            raise UnavailableError("no cgroup filesystem is mounted")
        return layout

    def missing(self):
        """Controllers a job needs that this host offers in neither version."""
        need = {"cpu": "cpu", "memory": "memory", "pids": "pids", "blkio": "io"}
        return [ctl for ctl, v2 in need.items() if ctl not in self.v1 and v2 not in self.v2]

    def to_dict(self):
        return {"unified": self.unified, "v1": self.v1, "v2": list(self.v2)}

    @classmethod
    def from_dict(cls, d):
        return cls(unified=d["unified"], v1=dict(d["v1"]), v2=tuple(d["v2"]))


class JobCgroup:
    """One job's cgroup: a folder in each hierarchy that has a controller we use.

    v1 and v2 are two small parallel paths: each limit is one (file, value) pair per version.
    All methods raise OSError for cgroupfs failures.
    """

    def __init__(self, layout, root, name):
        self.layout, self.root, self.name = layout, root, name
        self.v1_dirs = {ctl: os.path.join(mnt, root, name) for ctl, mnt in layout.v1.items()}
        self.v2_dir = os.path.join(layout.unified, root, name) if layout.unified else ""

    def dirs(self):
        """Every folder of this job, one per hierarchy (v1 co-mounts share one)."""
        seen = dict.fromkeys(list(self.v1_dirs.values()) + ([self.v2_dir] if self.v2_dir else []))
        return list(seen)

    def _dir(self, v1_ctl):
        """(version, folder) where a controller's files for this job live, or (None, '')."""
        if v1_ctl in self.v1_dirs:
            return 1, self.v1_dirs[v1_ctl]
        v2_ctl = V2_EQUIVALENT.get(v1_ctl, v1_ctl)
        if v2_ctl in self.layout.v2:
            return 2, self.v2_dir
        return None, ""

    def limit_writes(self, limits):
        """The (path, value) writes that apply limits, in order."""
        writes = []
        version, d = self._dir("cpu")
        if version == 1:
            writes += [(f"{d}/cpu.cfs_period_us", "100000"),
                       (f"{d}/cpu.cfs_quota_us", str(max(1000, int(limits.cpu * 100000))))]
        elif version == 2:
            writes += [(f"{d}/cpu.max", f"{max(1000, int(limits.cpu * 100000))} 100000")]
        version, d = self._dir("memory")
        if version == 1:
            # memsw caps RAM+swap: set equal to the RAM limit, so swap cannot extend it.
            writes += [(f"{d}/memory.limit_in_bytes", str(limits.memory)),
                       (f"{d}/memory.memsw.limit_in_bytes", str(limits.memory))]
        elif version == 2:
            writes += [(f"{d}/memory.max", str(limits.memory)),
                       (f"{d}/memory.swap.max", "0")]
        version, d = self._dir("pids")
        if version:
            writes += [(f"{d}/pids.max", str(limits.pids + 1))]   # +1: the job's init
        version, d = self._dir("blkio")
        if limits.io_device and (limits.io_read_bps or limits.io_write_bps):
            dev = limits.io_device
            if version == 1:
                if limits.io_read_bps:
                    writes += [(f"{d}/blkio.throttle.read_bps_device", f"{dev} {limits.io_read_bps}")]
                if limits.io_write_bps:
                    writes += [(f"{d}/blkio.throttle.write_bps_device", f"{dev} {limits.io_write_bps}")]
            elif version == 2:
                rbps = limits.io_read_bps or "max"
                wbps = limits.io_write_bps or "max"
                writes += [(f"{d}/io.max", f"{dev} rbps={rbps} wbps={wbps}")]
        return writes

    def _enable_v2_controllers(self):
        """v2 delegation: controllers must be enabled in every ancestor's subtree_control."""
        want = list(self.layout.v2)
        if not want:
            return
        for parent in (self.layout.unified, os.path.join(self.layout.unified, self.root)):
            path = os.path.join(parent, "cgroup.subtree_control")
            enabled = read_file(path, "").split()
            missing = [c for c in want if c not in enabled]
            if missing:
                write_file(path, " ".join("+" + c for c in missing))

    def create(self):
        """Make the folders (no limits yet). On failure removes what it made and raises."""
        try:
            for d in self.dirs():
                os.makedirs(os.path.dirname(d), exist_ok=True)
                os.mkdir(d)
            if self.v2_dir:
                self._enable_v2_controllers()
        except OSError:
            self.remove(timeout=0)
            raise

    def apply(self, limits):
        """Write the limits (cheap, unlike moving a process in: they can come later)."""
        for path, value in self.limit_writes(limits):
            if path.endswith(("memsw.limit_in_bytes", "swap.max")) and not os.path.exists(path):
                continue   # no swap accounting on this kernel: no swap to bypass with
            write_file(path, value)

    def join(self):
        """Move the calling process into every folder ("0" means the writer itself)."""
        for d in self.dirs():
            write_file(os.path.join(d, "cgroup.procs"), "0")

    def pids(self):
        """Every pid in the job's cgroup (host pid namespace)."""
        d = self.v2_dir or next(iter(self.v1_dirs.values()))
        return [int(p) for p in read_file(os.path.join(d, "cgroup.procs"), "").split()]

    def populated(self):
        """True while any process is in the job's cgroup."""
        if self.v2_dir and os.path.exists(os.path.join(self.v2_dir, "cgroup.events")):
            events = read_file(os.path.join(self.v2_dir, "cgroup.events"), "populated 0")
            return "populated 1" in events
        return bool(self.pids())

    def _freezer(self):
        """(path, frozen value, thawed value) of the freezer to use: v2's if it has one."""
        if self.v2_dir and os.path.exists(os.path.join(self.v2_dir, "cgroup.freeze")):
            return os.path.join(self.v2_dir, "cgroup.freeze"), "1", "0"
        if "freezer" in self.v1_dirs:
            return os.path.join(self.v1_dirs["freezer"], "freezer.state"), "FROZEN", "THAWED"
        raise UnavailableError("no cgroup freezer on this host")

    def freeze(self):
        path, frozen, _ = self._freezer()
        write_file(path, frozen)

    def thaw(self):
        path, _, thawed = self._freezer()
        write_file(path, thawed)

    def kill(self):
        """SIGKILL every process in the cgroup, including ones that forked meanwhile."""
        if self.v2_dir and os.path.exists(os.path.join(self.v2_dir, "cgroup.kill")):
            write_file(os.path.join(self.v2_dir, "cgroup.kill"), "1")
            return
        # v1: freeze so nothing can fork between reading the list and killing it.
        self.freeze()
        try:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finally:
            self.thaw()

    def usage(self):
        """{cpu_seconds, memory_bytes, peak_memory_bytes, oom_kills} from the cgroup files."""
        out = {"cpu_seconds": 0.0, "memory_bytes": 0, "peak_memory_bytes": 0, "oom_kills": 0}
        version, d = self._dir("cpuacct")
        if version == 1:
            out["cpu_seconds"] = int(read_file(f"{d}/cpuacct.usage", "0") or 0) / 1e9
        elif self.v2_dir:   # cpu.stat's usage_usec exists in v2 even without the controller
            stat = _keyed(read_file(f"{self.v2_dir}/cpu.stat", ""))
            out["cpu_seconds"] = stat.get("usage_usec", 0) / 1e6
        version, d = self._dir("memory")
        if version == 1:
            out["memory_bytes"] = int(read_file(f"{d}/memory.usage_in_bytes", "0") or 0)
            out["peak_memory_bytes"] = int(read_file(f"{d}/memory.max_usage_in_bytes", "0") or 0)
            out["oom_kills"] = _keyed(read_file(f"{d}/memory.oom_control", "")).get("oom_kill", 0)
        elif version == 2:
            out["memory_bytes"] = int(read_file(f"{d}/memory.current", "0") or 0)
            out["peak_memory_bytes"] = int(read_file(f"{d}/memory.peak", "0") or 0)
            out["oom_kills"] = _keyed(read_file(f"{d}/memory.events", "")).get("oom_kill", 0)
        return out

    def remove(self, timeout=2.0):
        """rmdir every folder; retries while the kernel still counts exiting tasks.

        Returns True when all are gone. Never raises for folders already gone.
        """
        deadline = time.monotonic() + timeout
        left = [d for d in self.dirs() if os.path.isdir(d)]
        while left:
            for d in list(left):
                try:
                    os.rmdir(d)
                    left.remove(d)
                except FileNotFoundError:
                    left.remove(d)
                except OSError as e:
                    if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                        raise
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        return not left

    @staticmethod
    def names(layout, root):
        """Names of every job cgroup under the root in any hierarchy (to sweep leftovers)."""
        ids = set()
        for mnt in list(layout.v1.values()) + ([layout.unified] if layout.unified else []):
            try:
                ids.update(e.name for e in os.scandir(os.path.join(mnt, root)) if e.is_dir())
            except FileNotFoundError:
                pass
        return ids

    @staticmethod
    def remove_root(layout, root):
        """Remove the (empty) root folders; a root still holding jobs stays."""
        for mnt in set(list(layout.v1.values()) + ([layout.unified] if layout.unified else [])):
            try:
                os.rmdir(os.path.join(mnt, root))
            except OSError:
                pass


def _keyed(text):
    """Parse 'key value' lines (memory.events, cpu.stat, memory.oom_control) into ints."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def whole_disk_of(path):
    """'MAJOR:MINOR' of the whole disk holding path, or '' if it is on no block device."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    if major == 0:
        return ""   # tmpfs, overlay, nfs...: anonymous device, nothing to throttle
    sysdir = f"/sys/dev/block/{major}:{minor}"
    if not os.path.exists(sysdir):
        return ""
    if os.path.exists(os.path.join(sysdir, "partition")):
        # A partition's sysfs folder sits inside its disk's folder.
        parent = os.path.dirname(os.path.realpath(sysdir))
        return read_file(os.path.join(parent, "dev")).strip()
    return f"{major}:{minor}"


###############################################################################
# Spawner, shim and init: every privileged step, in single-threaded processes
###############################################################################
#
# The server is multi-threaded, and fork() in a threaded process can deadlock the child
# on a lock another thread held. So at start-up the server execs one helper, the spawner,
# which stays single-threaded and forks one shim per job:
#
#   spawner --fork--> shim (the job's supervisor, outside the job; outlives the server)
#                       --unshare(PID), fork--> init (pid 1 of the job's namespaces)
#                                                 --fork--> command (drops privileges, execs)
#
# Moving a process into a cgroup costs the kernel an RCU grace period (10-20 ms when the
# host is idle), more than everything else in a start. So the spawner keeps one shim warm:
# its cgroup made, its init and command already in it and in their namespaces, the
# command blocked reading its request. A start then only writes limits and sends the
# request down; the next warm shim gets ready while the job runs. Cgroups are therefore
# named by the shim ("j-" + random), not by job id: cgroup v2 cannot rename a folder.
#
# The shim copies the job's output into its file, waits for init, removes the cgroup and
# writes the job's result. Everything the server needs later is in files, so a job does
# not depend on the server process.

RESULT_FILE, SPEC_FILE, OUTPUT_FILE, STOP_FILE = (
    "result.json", "job.json", "output", "stop_requested")


def spawner_main(sock_fd, settings):
    """Serve start requests on sock_fd until the server hangs up. Returns the exit code.

    settings: {"layout": CgroupLayout.to_dict(), "cgroup_root": str}.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is for the server to handle
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)    # the kernel reaps exited shims
    sock = socket.socket(fileno=sock_fd)
    warm = None
    try:
        while True:
            if warm is None:
                warm = WarmShim(settings, sock)
            try:
                msg, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST_BYTES, 1)
            except InterruptedError:
                continue
            if not msg:
                return 0
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            reply_fd = fds[0]
            if not warm.hand_over(msg, reply_fd):   # it died while waiting: one fresh try
                warm = WarmShim(settings, sock)
                if not warm.hand_over(msg, reply_fd):
                    _reply(reply_fd, ok=False, error="the job's supervisor could not start")
            os.close(reply_fd)
            warm = None
    finally:
        if warm is not None:
            warm.discard()


def _reply(reply_fd, **fields):
    """Answer a start request on its own reply pipe."""
    try:
        _write_all(reply_fd, json.dumps(fields).encode())
    except OSError:
        pass   # the asker gave up waiting


def seqpacket_pair():
    """A connected AF_UNIX SOCK_SEQPACKET pair with room for the largest request."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        try:
            # One message must fit the send buffer; root may exceed net.core.wmem_max.
            s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 2 * MAX_REQUEST_BYTES)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * MAX_REQUEST_BYTES)
    return a, b


class WarmShim:
    """A forked shim, ready for the next job; the spawner's handle on it."""

    def __init__(self, settings, spawner_sock):
        ours, theirs = seqpacket_pair()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                ours.close()
                spawner_sock.close()   # the server must see EOF when the spawner alone exits
                code = shim_main(theirs, settings)
            except BaseException:   # a shim must never fall back into the spawner loop
                log.exception("job supervisor failed")
            finally:
                os._exit(code)
        theirs.close()
        self._sock = ours

    def hand_over(self, msg, reply_fd):
        """Give it its job and the job's reply pipe. False if it is gone."""
        try:
            socket.send_fds(self._sock, [msg], [reply_fd])
            return True
        except OSError:
            return False
        finally:
            self._sock.close()

    def discard(self):
        """No job will come: hanging up makes it clean up; wait (bounded) until it has."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:
            pidfd = None   # already gone
        self._sock.close()
        if pidfd is not None:
            select.select([pidfd], [], [], KILL_TIMEOUT)   # readable once it has exited
            os.close(pidfd)


def shim_main(chan, settings):
    """Supervise one job, from a warm cgroup to its result file. Returns an exit code.

    chan: the spawner's socket to this shim; it brings the request and its reply pipe.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)    # we wait for init ourselves
    os.setsid()                                     # no terminal signals from the server's tty
    layout = CgroupLayout.from_dict(settings["layout"])
    cg = JobCgroup(layout, settings["cgroup_root"], "j-" + random_hex(8))
    warm_error = ""
    try:
        cg.create()
    except OSError as e:
        warm_error = f"cannot make the job's cgroup: {e.strerror or e}"
    out_r, out_w = os.pipe2(os.O_CLOEXEC)        # the job's stdout and stderr
    err_r, err_w = os.pipe2(os.O_CLOEXEC)        # init/command -> shim: why it did not start
    status_r, status_w = os.pipe2(os.O_CLOEXEC)  # init -> shim: the command's wait status
    go_r, go_w = os.pipe2(os.O_CLOEXEC)          # shim -> command: the request
    try:
        fcntl.fcntl(out_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass   # over /proc/sys/fs/pipe-max-size: the default pipe works, in smaller steps
    init_pid = None
    if not warm_error:
        unshare(CLONE_NEWPID)                    # the next child is pid 1 of a new namespace
        init_pid = os.fork()
        if init_pid == 0:
            for fd in (out_r, err_r, status_r, go_w):
                os.close(fd)
            chan.close()
            code = 126
            try:
                code = init_main(cg, out_w, err_w, status_w, go_r)
            finally:
                os._exit(code)
    for fd in (out_w, err_w, status_w, go_r):
        os.close(fd)

    msg, fds, _, _ = socket.recv_fds(chan, MAX_REQUEST_BYTES, 1)   # wait for a job
    chan.close()
    if not msg or len(fds) != 1:                  # the spawner is gone: no job will come
        _discard_warm(cg, init_pid)
        return 0
    reply_fd = fds[0]
    req = json.loads(msg)
    job_dir, spec = req["job_dir"], req["spec"]
    started = time.time()

    def fail(message):
        _discard_warm(cg, init_pid)
        write_json_atomic(os.path.join(job_dir, SPEC_FILE), spec)
        write_json_atomic(os.path.join(job_dir, RESULT_FILE), {
            "failed": True, "error": message, "exit_code": 126, "started_at": started,
            "ended_at": time.time(), "output_bytes": 0})
        _reply(reply_fd, ok=False, error=message)
        return 1

    if warm_error:
        return fail(warm_error)
    try:
        cg.apply(Limits(**req["limits"]))
    except OSError as e:
        return fail(f"cannot apply the job's limits: {e.strerror or e}")
    out_fd = os.open(os.path.join(job_dir, OUTPUT_FILE),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        _write_all(go_w, msg)
    except OSError:
        pass   # the command died during warm-up: err_r says why
    os.close(go_w)
    # EOF on err_r means the command reached exec (close-on-exec closed the last copy).
    failure = _read_all(err_r)
    failure = json.loads(failure)["error"] if failure else ""
    shim = {"shim_pid": os.getpid(), "shim_start": process_start_time(os.getpid()),
            "init_pid": init_pid, "cgroup": cg.name, "started_at": started}
    _reply(reply_fd, ok=True, error=failure, shim=shim)   # first: the caller is waiting
    os.close(reply_fd)
    # The job's record: what the server asked for and where the job lives. Written here,
    # not by the server, so that it exists whatever happens to the server meanwhile.
    write_json_atomic(os.path.join(job_dir, SPEC_FILE), {**spec, "shim": shim})

    written, truncated, out_error = copy_output(out_r, out_fd, req["output_cap"])
    os.close(out_fd)
    _, init_status = os.waitpid(init_pid, 0)
    raw = _read_all(status_r)
    result = {"started_at": started, "ended_at": time.time(), "output_bytes": written,
              "output_truncated": truncated, "output_error": out_error}
    # init reports the command's wait status; if it sent none, init itself was killed
    # (stop, OOM) and the job died with it.
    cmd_status = struct.unpack("i", raw[:4])[0] if len(raw) >= 4 else init_status
    if os.WIFSIGNALED(cmd_status):
        result["signal"] = os.WTERMSIG(cmd_status)
    else:
        result["exit_code"] = os.waitstatus_to_exitcode(cmd_status)
    if failure:
        result.update(failed=True, error=failure)
    result.update(cg.usage())
    _remove_cgroup(cg)
    write_json_atomic(os.path.join(job_dir, RESULT_FILE), result)
    return 0


def _discard_warm(cg, init_pid):
    """Kill a shim's unused init and command, and remove its cgroup."""
    if init_pid:
        # Not cg.kill(): init may not have joined the cgroup yet. Killing pid 1 of a pid
        # namespace kills everything in it, and init is our unreaped child: no pid reuse.
        os.kill(init_pid, signal.SIGKILL)
        os.waitpid(init_pid, 0)
    _remove_cgroup(cg)


def _remove_cgroup(cg):
    if not cg.remove(timeout=0.5):
        cg.kill()   # something outlived init (a pid namespace forbids it; be sure anyway)
        cg.remove(timeout=KILL_TIMEOUT)


def copy_output(pipe_fd, out_fd, cap):
    """Move bytes from the job's pipe to its output file until EOF, zero-copy.

    Past `cap` bytes (or a write error such as a full disk) the rest is read and discarded,
    so the job is never blocked or killed by its own output. Returns (written, truncated, error).
    """
    written, truncated, error = 0, False, ""
    sink = out_fd
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        while True:
            room = cap - written if sink == out_fd else CHUNK
            if room <= 0:
                sink, truncated = devnull, True
                continue
            try:
                n = os.splice(pipe_fd, sink, min(CHUNK, room))
            except OSError as e:
                if sink == devnull:
                    raise
                sink, truncated, error = devnull, True, str(e)
                continue
            if n == 0:
                return written, truncated, error
            if sink == out_fd:
                written += n
    finally:
        os.close(devnull)
        os.close(pipe_fd)


def _read_all(fd):
    """Read fd to EOF and close it."""
    chunks = []
    try:
        while True:
            b = os.read(fd, 65536)
            if not b:
                return b"".join(chunks)
            chunks.append(b)
    finally:
        os.close(fd)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _report_start_failure(err_w, out_w, message):
    """Tell the shim why the job could not start, and the job's output too, as a shell would."""
    try:
        os.write(err_w, json.dumps({"error": message}).encode())
        os.write(out_w, f"steve-jobs: {message}\n".encode())
    except OSError:
        pass


def init_main(cg, out_w, err_w, status_w, go_r):
    """Pid 1 of the job: enter namespaces, fork the command, reap, report its wait status."""
    try:
        enter_job_namespaces(cg)
    except Exception as e:   # whatever it is, the shim must hear why the job did not start
        _report_start_failure(err_w, out_w, f"namespace setup failed: {e}")
        return 126
    command_pid = None

    def forward(signum, _frame):
        # tini-style: signals sent to the job (stop's SIGTERM) go to the command.
        if command_pid:
            try:
                os.kill(command_pid, signum)
            except ProcessLookupError:
                pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    command_pid = os.fork()
    if command_pid == 0:
        command_main(cg, go_r, out_w, err_w)   # never returns
    for fd in (out_w, err_w, go_r):
        os.close(fd)
    status = reap_until(command_pid)
    os.write(status_w, struct.pack("i", status))
    return 0   # pid 1 exiting makes the kernel kill whatever the command left behind


FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)


def _run_steps(steps):
    """Run (description, callable) pairs; an OSError names the step that failed."""
    for what, step in steps:
        try:
            step()
        except OSError as e:
            raise OSError(e.errno, f"cannot {what}: {e.strerror or e}") from None


def enter_job_namespaces(cg):
    """In init: join the cgroup, unshare mount, UTS, IPC and cgroup namespaces, remount.

    What depends on the request (network, hostname) is the command's to do.
    Raises OSError naming the step that failed.
    """
    def private_mounts():
        # Private propagation first, or our mounts would leak back into the host's namespace.
        mount(None, "/", None, MS_REC | MS_PRIVATE)

    def fresh_proc():
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)

    def protect_init_from_oom():
        # The OOM killer should pick the job's hungry process, never its init (which would
        # end the job with no status). The command resets this before it execs. Only the
        # fresh /proc resolves "self" for a process in a new pid namespace. Best effort:
        # it needs CAP_SYS_RESOURCE, which some container runtimes withhold from root.
        try:
            write_file("/proc/self/oom_score_adj", "-1000")
        except PermissionError:
            pass

    def private_tmp():
        # A private /tmp and /dev/shm: jobs must not meet each other (or the host) there.
        for path in ("/tmp", "/dev/shm"):
            if os.path.isdir(path):
                mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")

    _run_steps([
        ("join the job's cgroup", cg.join),
        ("unshare namespaces", lambda: unshare(
            CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP)),
        ("make mounts private", private_mounts),
        ("mount /proc", fresh_proc),
        ("protect init from the OOM killer", protect_init_from_oom),
        ("mount private /tmp", private_tmp),
        ("name init", lambda: prctl(PR_SET_NAME, b"steve-init"))])


def command_main(cg, go_r, out_w, err_w):
    """The command's process: get ready, wait for the request, finish, exec. Never returns."""
    host_net = None
    try:
        host_net = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        enter_job_network(cg)
    except Exception as e:   # reported once a job comes: it is that job's failure
        warm_error = f"namespace setup failed: {e}"
    else:
        warm_error = ""
    try:
        msg = _read_all(go_r)
    except OSError:
        msg = b""
    if not msg:
        os._exit(0)   # a warm shim discarded before any job came
    req = json.loads(msg)
    try:
        if warm_error:
            raise OSError(0, warm_error)
        _run_steps([("set the hostname", lambda: socket.sethostname(req["job_id"]))])
        if req["host_network"]:
            leave_job_network(host_net)
        os.close(host_net)
    except Exception as e:
        _report_start_failure(err_w, out_w, f"namespace setup failed: {e}")
        os._exit(126)
    exec_command(req, out_w, err_w)


def enter_job_network(cg):
    """Unshare a network namespace with only loopback, up, and mount a /sys that shows it.

    Done before the request arrives (it costs about a millisecond). Raises OSError naming
    the step that failed.
    """
    def fresh_sys():
        # sysfs shows the network namespace of whoever mounted it: remount it for ours, read
        # only, and show the job its own cgroup (the cgroup namespace roots it there), as
        # runtimes that size themselves from cgroup limits (JVM, Go) expect.
        mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        if cg.v2_dir:
            mount("cgroup2", "/sys/fs/cgroup", "cgroup2",
                  MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)

    _run_steps([("unshare the network namespace", lambda: unshare(CLONE_NEWNET)),
                ("mount /sys", fresh_sys),
                ("bring up loopback", bring_loopback_up)])


def leave_job_network(host_net):
    """For a job that shares the host's network: back to it, and to the host's /sys."""
    _run_steps([("rejoin the host network", lambda: setns(host_net, CLONE_NEWNET)),
                ("unmount the job's /sys", lambda: umount_lazy("/sys"))])


def exec_command(req, out_w, err_w):
    """Redirect, drop privileges, exec. Never returns.

    Failures before exec reach the shim through err_w (close-on-exec, so a successful exec
    closes it silently), with shell exit codes: 127 not found, 126 cannot execute.
    """
    argv = req["argv"]
    stage = "setting up"
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.closerange(3, err_w)
        os.closerange(err_w + 1, 1 << 16)
        # Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec: undo that.
        for sig in FORWARDED_SIGNALS + (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        if read_file("/proc/self/oom_score_adj", "0").strip() != "0":
            write_file("/proc/self/oom_score_adj", "0")
        uid = req["uid"]
        if uid != 0:
            stage = "dropping privileges"
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        prctl(PR_SET_NO_NEW_PRIVS, 1)   # setuid binaries cannot give privileges back
        stage = f"cannot enter working directory {req['workdir']}"
        os.chdir(req["workdir"])
        stage = argv[0]
        os.execvpe(argv[0], argv, req["env"])
    except OSError as e:
        not_found = stage == argv[0] and e.errno in (errno.ENOENT, errno.ENOTDIR)
        reason = "command not found" if not_found else (e.strerror or str(e))
        _report_start_failure(err_w, 2, f"{stage}: {reason}")
        os._exit(127 if not_found else 126)
    except BaseException as e:
        _report_start_failure(err_w, 2, f"{stage}: {e}")
        os._exit(126)


def reap_until(pid):
    """Reap every child (init adopts orphans) until pid exits; return pid's wait status."""
    while True:
        child, status = os.waitpid(-1, 0)
        if child == pid:
            return status


###############################################################################
# Job engine
###############################################################################

class JobOptions(typing.NamedTuple):
    """How a job runs, apart from its limits."""
    env: tuple = ()               # extra (NAME, value) pairs on top of PATH, HOME, LANG
    workdir: str = ""             # absolute path; default: a fresh folder per job
    as_root: bool = False         # run as uid 0 (inside the namespaces); server must allow it
    host_network: bool = False    # share the host's network namespace


class EngineConfig(typing.NamedTuple):
    """Server-side settings of the engine; every limit has a default and a maximum."""
    state_dir: str = DEFAULT_STATE_DIR
    cgroup_root: str = DEFAULT_CGROUP_ROOT
    default_limits: Limits = Limits(cpu=1.0, memory=512 * MiB, pids=512)
    max_limits: Limits = Limits(cpu=float(os.cpu_count() or 1), memory=16 * GiB, pids=32768,
                                io_read_bps=0, io_write_bps=0)   # io 0: no maximum
    output_cap: int = 1 * GiB     # bytes of output kept per job; the rest is discarded
    allow_root: bool = False      # may jobs ask to run as root?
    stop_grace: float = 10.0      # seconds between SIGTERM and SIGKILL by default
    uid_base: int = 0x60000000    # jobs run as uid/gid uid_base + n, one fresh uid per job
    uid_count: int = 1 << 20


RESULT_FIELDS = ("started_at", "ended_at", "exit_code", "signal", "error", "cpu_seconds",
                 "peak_memory_bytes", "oom_kills", "output_bytes", "output_truncated")


class JobStatus(typing.NamedTuple):
    """What is known about one job, as status() and list() return it."""
    id: str
    owner: str
    argv: list
    state: str
    limits: Limits
    options: JobOptions
    created_at: float
    started_at: float = 0.0
    ended_at: float = 0.0
    exit_code: int = None         # set when the command exited (or could not start: 126/127)
    signal: int = None            # set when the command was killed by a signal
    error: str = ""               # why it failed to start, or why its end is unknown
    cpu_seconds: float = 0.0
    memory_bytes: int = 0
    peak_memory_bytes: int = 0
    oom_kills: int = 0
    output_bytes: int = 0
    output_truncated: bool = False
    uid: int = 0


class Job:
    """One job's in-memory record; its durable state lives in its folder."""

    def __init__(self, job_id, spec, job_dir):
        self.id, self.spec, self.dir = job_id, spec, job_dir
        self.shim = None              # shim.json: shim and init pids, cgroup, start time
        self.cgroup = None            # JobCgroup, once the shim has said which
        self.result = None            # result.json: how it ended
        self.stop_requested = False
        self.paused = False
        self.ended = threading.Event()
        self._cond = threading.Condition()
        self._version = 0             # bumped on every output change or end
        self._callbacks = set()

    @property
    def output_path(self):
        return os.path.join(self.dir, OUTPUT_FILE)

    def notify(self):
        """Wake everything following this job's output (called from the watcher thread)."""
        with self._cond:
            self._version += 1
            self._cond.notify_all()
            callbacks = list(self._callbacks)
        for cb in callbacks:
            try:
                cb()
            except Exception:
                log.exception("output callback failed")

    def subscribe(self, callback):
        """Call callback() (from another thread, quickly) on every change; returns unsubscribe."""
        with self._cond:
            self._callbacks.add(callback)
        return lambda: self._discard(callback)

    def _discard(self, callback):
        with self._cond:
            self._callbacks.discard(callback)

    def version(self):
        with self._cond:
            return self._version

    def wait_change(self, version, timeout):
        """Block until the version moves past `version` or timeout seconds pass."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != version, timeout)


def derive_state(job):
    """The state status() reports, from the job's files (one place decides)."""
    r = job.result
    if r is None:
        return PAUSED if job.paused else RUNNING
    if r.get("unknown"):
        return UNKNOWN
    if r.get("failed"):
        return FAILED
    if job.stop_requested:
        return STOPPED
    if r.get("oom_kills") and (r.get("signal") == signal.SIGKILL or r.get("exit_code") == 137):
        return OOM_KILLED
    if r.get("signal") is not None:
        return KILLED
    return EXITED


class OutputWatcher:
    """One thread that turns inotify events on job folders into Job.notify() and ends."""

    def __init__(self, on_result):
        self._fd = inotify_init()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._jobs = {}          # wd -> Job
        self._lock = threading.Lock()
        self._on_result = on_result
        self._thread = threading.Thread(target=self._run, name="output-watcher", daemon=True)
        self._thread.start()

    def watch(self, job):
        """Start delivering events for job's folder. Raises OSError."""
        wd = inotify_add_watch(self._fd, job.dir, IN_MODIFY | IN_MOVED_TO)
        with self._lock:
            self._jobs[wd] = job
        return wd

    def unwatch(self, wd):
        with self._lock:
            self._jobs.pop(wd, None)
        inotify_rm_watch(self._fd, wd)

    def close(self):
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        for fd in (self._fd, self._wake_r, self._wake_w):
            os.close(fd)

    def _run(self):
        while True:
            readable, _, _ = select.select([self._fd, self._wake_r], [], [])
            if self._wake_r in readable:
                return
            changed, finished = {}, {}
            for wd, mask, name in inotify_read(self._fd):
                with self._lock:
                    job = self._jobs.get(wd)
                if job is None or mask & IN_IGNORED:
                    continue
                if name == OUTPUT_FILE:
                    changed[job.id] = job          # many writes, one wake-up per batch
                elif name == RESULT_FILE and mask & IN_MOVED_TO:
                    finished[job.id] = (job, wd)
            for job in changed.values():
                job.notify()
            for job, wd in finished.values():
                self.unwatch(wd)
                try:
                    self._on_result(job)
                except Exception:
                    log.exception("recording the end of job %s failed", job.id)


class Spawner:
    """The server's handle on the spawner process.

    Each request carries its own reply pipe (SCM_RIGHTS), so the thread that asks reads
    the answer itself: no reply thread, no matching of answers to questions.
    """

    def __init__(self):
        self._sock = None
        self._proc = None

    def start(self, settings):
        """Exec the spawner helper. Raises UnavailableError if it cannot run."""
        import subprocess   # Popen forks and execs in C: safe in a threaded process
        ours, theirs = seqpacket_pair()
        try:
            # -I -S: no site-packages, no environment: a small process forks faster.
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), "_spawner",
                 str(theirs.fileno()), json.dumps(settings)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            ours.close()
            raise UnavailableError(f"cannot start the spawner: {e}") from None
        finally:
            theirs.close()
        self._sock = ours

    def spawn(self, request, timeout=SPAWN_TIMEOUT):
        """Send one start request and wait (bounded) for its reply dict.

        Raises InvalidArgumentError if the request is too large, UnavailableError if the
        spawner is gone or does not answer in time.
        """
        msg = json.dumps(request, ensure_ascii=False).encode()
        if len(msg) > MAX_REQUEST_BYTES:
            raise InvalidArgumentError("the command and its environment are too large")
        reply_r, reply_w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                socket.send_fds(self._sock, [msg], [reply_w])
            except OSError as e:
                raise UnavailableError(f"the spawner is gone: {e}") from None
            finally:
                os.close(reply_w)   # now only the spawner (then the shim) holds it
            if not select.select([reply_r], [], [], timeout)[0]:
                raise UnavailableError("the spawner did not answer in time")
            reply = _read_all(reply_r)
            reply_r = None
        finally:
            if reply_r is not None:
                os.close(reply_r)
        if not reply:
            raise UnavailableError("the spawner or the job's supervisor exited")
        return json.loads(reply)

    def close(self):
        """Hang up; the spawner discards its warm shim and exits (bounded wait)."""
        if self._sock:
            self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        if self._proc:
            try:
                self._proc.wait(timeout=KILL_TIMEOUT + 5)
            except Exception:
                self._proc.kill()
                self._proc.wait(timeout=5)
            self._proc = None


class Engine:
    """Start, stop, inspect and read the output of jobs. Thread-safe; imports no gRPC.

    Every method raises only Error subclasses for things a caller can cause.
    """

    def __init__(self, config=EngineConfig(), layout=None):
        self.config = config
        self.layout = layout
        self._jobs = {}
        self._lock = threading.Lock()
        self._spawner = Spawner()
        self._watcher = None
        self._uids_in_use = set()

    # -- life cycle -----------------------------------------------------------

    def open(self):
        """Check the host, start the spawner and the watcher, reload state, sweep leftovers.

        Raises UnavailableError when the host cannot run jobs (not root, no cgroups...).
        """
        if os.geteuid() != 0:
            raise UnavailableError("the job engine must run as root")
        if self.layout is None:
            self.layout = CgroupLayout.detect()
        missing = self.layout.missing()
        if missing:
            raise UnavailableError(f"cgroup controllers missing: {', '.join(missing)}")
        state_dir = os.path.realpath(self.config.state_dir)
        if any(state_dir == p or state_dir.startswith(p + "/") for p in ("/tmp", "/dev/shm")):
            raise UnavailableError(f"the state directory cannot be under /tmp or /dev/shm: "
                                   f"jobs get private ones, so they would not see their files")
        for sub in ("jobs", "work"):
            os.makedirs(os.path.join(self.config.state_dir, sub), exist_ok=True)
        os.chmod(self.config.state_dir, 0o711)
        os.chmod(os.path.join(self.config.state_dir, "jobs"), 0o700)
        os.chmod(os.path.join(self.config.state_dir, "work"), 0o711)
        self._watcher = OutputWatcher(self._record_end)
        self._load_jobs()
        self._sweep_cgroups()
        self._spawner.start({"layout": self.layout.to_dict(),
                             "cgroup_root": self.config.cgroup_root})
        return self

    def close(self, stop_jobs=False):
        """Stop serving; with stop_jobs, stop every running job first (bounded)."""
        if stop_jobs:
            running = [j for j in self._all_jobs() if j.result is None]
            threads = [threading.Thread(target=self._stop_quietly, args=(j,)) for j in running]
            for t in threads:
                t.start()
            for t in threads:
                t.join(self.config.stop_grace + KILL_TIMEOUT + 5)
        self._spawner.close()
        if self._watcher:
            self._watcher.close()
        JobCgroup.remove_root(self.layout, self.config.cgroup_root)

    def _stop_quietly(self, job):
        try:
            self.stop(job.id, grace=min(self.config.stop_grace, 2.0))
        except Error:
            pass

    def _load_jobs(self):
        """Re-adopt the jobs in the state directory after a restart."""
        jobs_dir = os.path.join(self.config.state_dir, "jobs")
        for name in os.listdir(jobs_dir):
            job_dir = os.path.join(jobs_dir, name)
            try:
                with open(os.path.join(job_dir, SPEC_FILE)) as f:
                    spec = json.load(f)
            except (OSError, ValueError):
                log.warning("ignoring %s: no readable job record", job_dir)
                continue
            job = self._new_job(name, spec)
            job.stop_requested = os.path.exists(os.path.join(job_dir, STOP_FILE))
            self._set_shim(job, spec.get("shim"))
            if job.result is None and not self._shim_alive(job):
                # The shim is gone without writing a result: the job's end cannot be known.
                self._finish(job, {"unknown": True, "error":
                                   "the job's supervisor died; its end is unknown",
                                   "ended_at": time.time()}, save=True)
            elif job.result is None:
                self._watch(job)

    def _sweep_cgroups(self):
        """Kill and remove job cgroups that no running job owns (left by a crash).

        Called before the spawner starts, so no warm shim of ours can be among them.
        """
        owned = {j.cgroup.name for j in self._all_jobs() if j.result is None and j.cgroup}
        for name in JobCgroup.names(self.layout, self.config.cgroup_root) - owned:
            cg = JobCgroup(self.layout, self.config.cgroup_root, name)
            log.warning("removing leftover job cgroup %s", name)
            try:
                if cg.populated():
                    cg.kill()
                cg.remove(timeout=KILL_TIMEOUT)
            except (OSError, Error) as e:
                log.error("cannot remove leftover cgroup %s: %s", name, e)

    @staticmethod
    def _shim_alive(job):
        s = job.shim
        return bool(s) and process_start_time(s["shim_pid"]) == s["shim_start"]

    # -- jobs ---------------------------------------------------------------

    def start(self, owner, argv, limits=Limits(), options=JobOptions()):
        """Start argv as a job owned by owner; returns its id once the command has exec'd.

        A command that cannot be started (not found, not executable) still makes a job,
        whose status says why (exit code 127 or 126, as a shell would).
        Raises InvalidArgumentError, PermissionDeniedError, UnavailableError.
        """
        argv = validate_argv(argv)
        limits = self.effective_limits(limits)
        env = validate_env(options.env)
        if options.as_root and not self.config.allow_root:
            raise PermissionDeniedError("this server does not run jobs as root")
        if options.workdir and (not options.workdir.startswith("/") or "\0" in options.workdir):
            raise InvalidArgumentError("workdir must be an absolute path without NUL bytes")

        job_id = new_job_id()
        job_dir = os.path.join(self.config.state_dir, "jobs", job_id)
        uid = 0 if options.as_root else self._allocate_uid()
        workdir = options.workdir
        try:
            if not workdir:
                workdir = os.path.join(self.config.state_dir, "work", job_id)
                os.mkdir(workdir, 0o700)
                os.chown(workdir, uid, uid)
            if (limits.io_read_bps or limits.io_write_bps) and not limits.io_device:
                device = whole_disk_of(workdir)
                if not device:
                    raise InvalidArgumentError(
                        f"cannot limit IO: {workdir} is on no block device; name io_device")
                limits = limits._replace(io_device=device)
            os.mkdir(job_dir, 0o700)
        except OSError as e:
            self._release_uid(uid)
            raise InvalidArgumentError(f"cannot prepare the job: {e}") from None
        spec = {"id": job_id, "owner": owner, "argv": argv, "limits": limits._asdict(),
                "options": options._replace(env=tuple(env.items()))._asdict(),
                "created_at": time.time(), "uid": uid, "workdir": workdir}
        job = self._new_job(job_id, spec)
        self._watch(job)   # before the spawn, or a quick job could end unseen
        try:
            reply = self._spawner.spawn({
                "job_id": job_id, "job_dir": job_dir, "spec": spec, "argv": argv, "uid": uid,
                "env": {"PATH": JOB_PATH, "HOME": workdir, "LANG": "C.UTF-8", **env},
                "workdir": workdir, "limits": spec["limits"],
                "host_network": options.host_network, "output_cap": self.config.output_cap})
        except Error:
            self._forget(job, remove_workdir=not options.workdir)
            raise
        self._set_shim(job, reply.get("shim"))
        if not reply.get("ok") or reply.get("error"):
            # Not started: the shim writes its result at once; show it before returning.
            job.ended.wait(KILL_TIMEOUT)
        self._check_result(job)
        return job_id

    def effective_limits(self, requested):
        """The limits a job gets: defaults filled in, every value checked against the maximums.

        Raises InvalidArgumentError for a malformed or out-of-range value.
        """
        d, m = self.config.default_limits, self.config.max_limits
        try:
            cpu = float(requested.cpu or d.cpu)
            memory = int(requested.memory or d.memory)
            pids = int(requested.pids or d.pids)
            rbps = int(requested.io_read_bps or d.io_read_bps)
            wbps = int(requested.io_write_bps or d.io_write_bps)
        except (TypeError, ValueError, OverflowError):
            raise InvalidArgumentError("limits must be numbers") from None
        if not (math.isfinite(cpu) and 0.01 <= cpu <= m.cpu):
            raise InvalidArgumentError(f"cpu must be between 0.01 and {m.cpu:g} cores")
        if not MIN_MEMORY <= memory <= m.memory:
            raise InvalidArgumentError(f"memory must be between {MIN_MEMORY} and {m.memory} bytes")
        if not 1 <= pids <= m.pids:
            raise InvalidArgumentError(f"pids must be between 1 and {m.pids}")
        for name, value, cap in (("io_read_bps", rbps, m.io_read_bps),
                                 ("io_write_bps", wbps, m.io_write_bps)):
            if value < 0 or (cap and value > cap) or value > 1 << 62:
                raise InvalidArgumentError(f"{name} must be between 0 and {cap or 1 << 62}")
        if cap_small := [n for n, v in (("io_read_bps", rbps), ("io_write_bps", wbps))
                         if 0 < v < 4096]:
            raise InvalidArgumentError(f"{cap_small[0]} must be at least 4096 bytes/s")
        device = requested.io_device or d.io_device
        if device and not re.fullmatch(r"\d{1,4}:\d{1,7}", device):
            raise InvalidArgumentError("io_device must be MAJOR:MINOR")
        return Limits(cpu=cpu, memory=memory, pids=pids, io_read_bps=rbps,
                      io_write_bps=wbps, io_device=device)

    def stop(self, job_id, grace=None):
        """SIGTERM the job, wait up to grace seconds, then kill everything in its cgroup.

        Blocks (bounded) until the job has ended; holds no lock while waiting.
        Raises NotFoundError, FailedPreconditionError (already ended), InvalidArgumentError.
        """
        job = self._get(job_id)
        grace = self.config.stop_grace if grace is None else grace
        if not (isinstance(grace, (int, float)) and math.isfinite(grace) and 0 <= grace <= 3600):
            raise InvalidArgumentError("grace must be between 0 and 3600 seconds")
        if job.result is not None:
            raise FailedPreconditionError(f"job {job_id} has already ended")
        if not job.stop_requested:
            job.stop_requested = True
            open(os.path.join(job.dir, STOP_FILE), "w").close()
        self._signal_init(job, signal.SIGTERM)
        if job.paused:
            self.resume(job_id, quiet=True)   # a frozen job cannot act on SIGTERM
        if not job.ended.wait(grace):
            try:
                self._cgroup_of(job).kill()
            except OSError as e:
                if job.result is None and e.errno != errno.ENOENT:
                    raise UnavailableError(f"cannot kill job {job_id}: {e}") from None
        if not job.ended.wait(KILL_TIMEOUT):
            raise UnavailableError(f"job {job_id} did not end {KILL_TIMEOUT:g}s after SIGKILL")
        return self.status(job_id)

    def wait(self, job_id, timeout):
        """Block until the job has ended or timeout seconds pass; returns its JobStatus.

        Raises NotFoundError, InvalidArgumentError.
        """
        if not (isinstance(timeout, (int, float)) and 0 <= timeout <= 86400):
            raise InvalidArgumentError("timeout must be between 0 and 86400 seconds")
        job = self._get(job_id)
        job.ended.wait(timeout)
        return self._status(job)

    def pause(self, job_id):
        """Freeze every process of the job. Raises NotFoundError, FailedPreconditionError."""
        job = self._get(job_id)
        self._require_running(job)
        self._cgroup_of(job).freeze()
        job.paused = True
        return self.status(job_id)

    def resume(self, job_id, quiet=False):
        """Thaw a paused job. Raises NotFoundError, FailedPreconditionError."""
        job = self._get(job_id)
        if not quiet:
            self._require_running(job)
            if not job.paused:
                raise FailedPreconditionError(f"job {job_id} is not paused")
        try:
            self._cgroup_of(job).thaw()
        except (OSError, Error):
            if not quiet:
                raise
        job.paused = False
        return self.status(job_id)

    def status(self, job_id):
        """A JobStatus snapshot. Raises NotFoundError."""
        return self._status(self._get(job_id))

    def list(self, owner=None):
        """Statuses of every job (or only owner's), oldest first."""
        jobs = [j for j in self._all_jobs() if owner is None or j.spec["owner"] == owner]
        return sorted((self._status(j) for j in jobs), key=lambda s: s.created_at)

    def read_output(self, job_id, offset=0, size=CHUNK):
        """Up to size bytes of the job's output from offset (b'' at the current end).

        Raises NotFoundError, InvalidArgumentError.
        """
        job = self._get(job_id)
        if not (isinstance(offset, int) and offset >= 0 and isinstance(size, int) and size > 0):
            raise InvalidArgumentError("offset must be >= 0 and size > 0")
        return read_output_file(job.output_path, offset, min(size, CHUNK))

    def output_end(self, job_id):
        """Final output size once the job has ended and every byte is on disk, else None."""
        job = self._get(job_id)
        return job.result.get("output_bytes", 0) if job.result is not None else None

    def follow(self, job_id, offset=0, poll=1.0):
        """Yield the job's output from offset as it is written; end once the job has ended
        and every byte was yielded. Woken by inotify; poll is only a safety net.

        Raises NotFoundError, InvalidArgumentError.
        """
        job = self._get(job_id)
        while True:
            version = job.version()
            data = self.read_output(job_id, offset)
            if data:
                offset += len(data)
                yield data
                continue
            end = self.output_end(job_id)
            if end is not None and offset >= end:
                return
            job.wait_change(version, poll)

    def subscribe(self, job_id, callback):
        """Call callback() on every output change or end of the job; returns unsubscribe.

        callback runs on the watcher thread: it must be quick and must not block.
        Raises NotFoundError.
        """
        return self._get(job_id).subscribe(callback)

    # -- internals ------------------------------------------------------------

    def _new_job(self, job_id, spec):
        job = Job(job_id, spec, os.path.join(self.config.state_dir, "jobs", job_id))
        result = _load_json(os.path.join(job.dir, RESULT_FILE))
        if result is not None:
            job.result = result
            job.ended.set()
        with self._lock:
            self._jobs[job_id] = job
            if job.result is None:
                self._uids_in_use.add(spec["uid"])
        return job

    def _set_shim(self, job, shim):
        """Record the shim's facts (pids, cgroup), from its reply or its shim.json."""
        job.shim = shim
        if shim and shim.get("cgroup"):
            job.cgroup = JobCgroup(self.layout, self.config.cgroup_root, shim["cgroup"])

    def _watch(self, job):
        self._watcher.watch(job)
        self._check_result(job)

    def _check_result(self, job):
        """Pick up a result written before a watch existed."""
        if job.result is None and os.path.exists(os.path.join(job.dir, RESULT_FILE)):
            self._record_end(job)

    def _record_end(self, job):
        """The shim wrote result.json: the job has ended."""
        result = _load_json(os.path.join(job.dir, RESULT_FILE))
        if result is not None:
            self._finish(job, result)

    def _finish(self, job, result, save=False):
        if save:
            write_json_atomic(os.path.join(job.dir, RESULT_FILE), result)
        with self._lock:
            if job.result is not None:
                return
            job.result = result
            job.paused = False
            self._uids_in_use.discard(job.spec["uid"])
        job.ended.set()
        job.notify()

    def _forget(self, job, remove_workdir):
        """Undo a start that did not reach the spawner's shim: no record, no folders."""
        import shutil
        with self._lock:
            self._jobs.pop(job.id, None)
            self._uids_in_use.discard(job.spec["uid"])
        shutil.rmtree(job.dir, ignore_errors=True)   # also ends its inotify watch
        if remove_workdir:
            shutil.rmtree(job.spec["workdir"], ignore_errors=True)

    def _allocate_uid(self):
        with self._lock:
            for _ in range(64):
                uid = self.config.uid_base + int.from_bytes(os.urandom(4), "little") % self.config.uid_count
                if uid not in self._uids_in_use:
                    self._uids_in_use.add(uid)
                    return uid
        raise ResourceExhaustedError("no free job uid")

    def _release_uid(self, uid):
        with self._lock:
            self._uids_in_use.discard(uid)

    def _get(self, job_id):
        with self._lock:
            job = self._jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise NotFoundError(f"no job {job_id!r}")
        return job

    def _all_jobs(self):
        with self._lock:
            return list(self._jobs.values())

    @staticmethod
    def _cgroup_of(job):
        if job.cgroup is None:
            raise UnavailableError(f"job {job.id} has no known cgroup")
        return job.cgroup

    @staticmethod
    def _require_running(job):
        if job.result is not None:
            raise FailedPreconditionError(f"job {job.id} has ended")

    def _signal_init(self, job, signum):
        """Signal the job's init (which forwards to the command), never a reused pid."""
        init_pid = (job.shim or {}).get("init_pid")
        if not init_pid:
            return
        try:
            pidfd = os.pidfd_open(init_pid)
        except OSError:
            return   # already gone
        try:
            # The pidfd pins the process; check it is still this job's init, not a reused pid.
            if job.cgroup and f"/{job.cgroup.name}\n" in read_file(f"/proc/{init_pid}/cgroup", ""):
                signal.pidfd_send_signal(pidfd, signum)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)

    def _status(self, job):
        spec, r = job.spec, job.result
        fields = dict(
            id=job.id, owner=spec["owner"], argv=list(spec["argv"]), state=derive_state(job),
            limits=Limits(**spec["limits"]),
            options=JobOptions(**{**spec["options"],
                                  "env": tuple(map(tuple, spec["options"]["env"]))}),
            created_at=spec["created_at"], uid=spec["uid"],
            started_at=(job.shim or {}).get("started_at", 0.0))
        if r is None:   # running: live figures from the cgroup and the output file
            try:
                fields.update(job.cgroup.usage() if job.cgroup else {})
                fields["output_bytes"] = os.stat(job.output_path).st_size
            except OSError:
                pass
            return JobStatus(**fields)
        fields.update((k, r[k]) for k in RESULT_FIELDS if k in r)
        return JobStatus(**fields)


def read_output_file(path, offset, size):
    """pread up to size bytes at offset; b'' past the end or before the file exists."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def validate_argv(argv):
    """argv as a list of str. Raises InvalidArgumentError if empty, too big or has NUL bytes."""
    if not isinstance(argv, (list, tuple)) or not argv:
        raise InvalidArgumentError("the command is empty")
    if len(argv) > MAX_ARGV_ITEMS:
        raise InvalidArgumentError(f"at most {MAX_ARGV_ITEMS} arguments")
    if not all(isinstance(a, str) for a in argv):
        raise InvalidArgumentError("arguments must be strings")
    if not argv[0]:
        raise InvalidArgumentError("the command name is empty")
    if any("\0" in a for a in argv):
        raise InvalidArgumentError("arguments may not contain NUL bytes")
    try:
        size = sum(len(a.encode()) + 1 for a in argv)
    except UnicodeEncodeError:
        raise InvalidArgumentError("arguments must be valid UTF-8") from None
    if size > MAX_ARGV_BYTES:
        raise InvalidArgumentError(f"the command is longer than {MAX_ARGV_BYTES} bytes")
    return list(argv)


def validate_env(pairs):
    """Extra environment as a dict. Raises InvalidArgumentError for bad names or NUL bytes."""
    env = {}
    for pair in pairs:
        name, value = pair
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise InvalidArgumentError(f"invalid environment variable name {name!r}")
        if not isinstance(value, str) or "\0" in value:
            raise InvalidArgumentError(f"environment variable {name} has a NUL byte")
        env[name] = value
    if len(env) > MAX_ENV_ITEMS:
        raise InvalidArgumentError(f"at most {MAX_ENV_ITEMS} environment variables")
    return env


###############################################################################
# main()
###############################################################################

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # Hidden helper mode, dispatched before anything heavy (grpc) is imported.
    if argv[:1] == ["_spawner"]:
        return spawner_main(int(argv[1]), json.loads(argv[2]))
    raise SystemExit("steve-jobs: the server and client come in a later version")


if __name__ == "__main__":
    sys.exit(main())
