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
#   helpers (logs, addresses, quoting, ids, trace context) -> constants and errors
#   -> Linux primitives -> cgroups (limits, placement) -> spawner, shim and init
#   -> job engine -> auth -> tracing -> metrics -> gRPC service -> client -> CLI -> main()
# README.md's "Design" section draws how a call travels through them.

import os
import signal


def _exit_quietly_on_ctrl_c(_signum, _frame):
    os._exit(130)   # (nothing is set up yet: nothing to tear down)


if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    # Ctrl-C while the rest of this file loads: exit 130 as after it, not a traceback.
    # main() puts Python's handler back.
    signal.signal(signal.SIGINT, _exit_quietly_on_ctrl_c)

# Only light modules here: the spawner runs this file too, and every megabyte it holds
# makes each fork and the job's final exec slower (secrets pulls in OpenSSL, dataclasses
# inspect, ctypes.util and uuid subprocess; logging and threading are imported on first use).
import bisect
import contextlib
import ctypes
import errno
import fcntl
import functools
import gc
import itertools
import json
import math
import operator
import re
import select
import socket
import stat
import struct
import sys
import time
import types
import typing

__version__ = "1.0.0"


###############################################################################
# Helpers: log lines, addresses, quoting, ids and trace context (every section uses them)
###############################################################################

class _LazyLogger:
    """The 'steve_jobs' logger, imported on first use."""

    def __getattr__(self, name):
        import logging
        return getattr(logging.getLogger("steve_jobs"), name)


log = _LazyLogger()


class _LazyModule:
    """A module imported on first use: the name then stands for the module itself."""

    def __init__(self, name):
        self._lazy_name = name

    def __getattr__(self, attr):
        module = __import__(self._lazy_name)
        globals()[self._lazy_name] = module
        return getattr(module, attr)


# Why threading waits: importing it registers an at-fork hook whose run in the child
# copies about 0.4 MB of the parent's pages (measured: a fork of the spawner that does
# nothing holds 0.65 MB of private pages with threading imported, 0.21 MB without), and
# every job's supervisor is such a fork. The spawner never starts a thread.
threading = _LazyModule("threading")


def log_line(message, level="info", **fields):
    """Log message followed by key=value fields (the caller makes them loggable); the JSON
    log format (--log-format json) gets them as keys of their own."""
    text = " ".join([message] + [f"{k}={v}" for k, v in fields.items()])
    getattr(log, level)(text, extra={"fields": {"event": message, **fields}})


DEFAULT_PORT = 50051


def split_address(text, flag="--server"):
    """(host, port) of a server address "host[:port]" or "[v6 address][:port]" (port
    DEFAULT_PORT when none is given).

    Raises ValueError with one line naming flag and what is wrong (a URL, a path, no
    host, a port that is not a number)."""
    hint = f"{flag} takes host[:port], e.g. 127.0.0.1:{DEFAULT_PORT}"
    if "://" in text or "/" in text:
        raise ValueError(f"{flag} {text!r} is not an address: {hint} (no scheme, no path)")
    host, port = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{flag} {text!r} is not an address: {hint}")
        port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{flag} {text!r} names no host: {hint}")
    if not port and (text.endswith(":")):
        raise ValueError(f"{flag} {text!r} has an empty port: {hint}")
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{flag} {text!r}: {port!r} is not a port number (1-65535)")
    return host, int(port or DEFAULT_PORT)


def join_address(host, port):
    """"host:port", with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def random_hex(nbytes):
    """Random hex digits from the kernel's CSPRNG (what secrets.token_hex does)."""
    return os.urandom(nbytes).hex()


def loggable(value, limit=128):
    """value as one safe log token: control and non-ASCII characters escaped (no forged
    lines, no terminal escapes), and cut at limit characters of the original."""
    text = value if isinstance(value, str) else repr(value)
    cut = text[:limit].encode("unicode_escape").decode("ascii").replace(" ", "\\x20")
    return cut + ("..." if len(text) > limit else "")


CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")   # C0, DEL and C1


def for_terminal(text):
    """text safe to print for a person: every C0 and C1 control and DEL as a \\xNN escape,
    so that a string of another user's (an argv, a label, an error naming a path) can
    neither move the cursor, erase rows, set the window's title nor write the clipboard."""
    return CONTROL_CHARACTERS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def quoted(value, limit=128):
    """value quoted for an error message: escaped and cut like loggable."""
    return f"'{loggable(value, limit)}'"


JOB_ID_FORMAT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def new_job_id():
    """A random (version 4) UUID string, as uuid.uuid4() would make."""
    b = bytearray(os.urandom(16))
    b[6], b[8] = (b[6] & 0x0F) | 0x40, (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# W3C trace context (https://www.w3.org/TR/trace-context/): version 00, a 32-digit trace
# id and a 16-digit parent (span) id, neither all zeros, and flags (01: sampled).
TRACEPARENT_FORMAT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def parse_traceparent(value):
    """(trace_id, span_id, flags) of a valid traceparent header value, else None."""
    m = TRACEPARENT_FORMAT.fullmatch(value or "")
    if not m or not int(m[1], 16) or not int(m[2], 16):
        return None
    return m[1], m[2], m[3]


def new_traceparent(trace_id=None, flags="01"):
    """A traceparent for a new span: in trace_id's trace, or in a new trace."""
    return f"00-{trace_id or random_hex(16)}-{random_hex(8)}-{flags}"


def trace_id_of(traceparent):
    parsed = parse_traceparent(traceparent)
    return parsed[0] if parsed else ""

###############################################################################
# Constants and errors
###############################################################################

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

DEFAULT_STATE_DIR = "/var/lib/steve-jobs"
DEFAULT_CGROUP_ROOT = "steve-jobs"     # under the root cgroup; "jobs" in a delegated one
JOB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_ARGV_BYTES = 128 * KiB        # one start request must fit one SOCK_SEQPACKET message
MAX_REQUEST_BYTES = 1 * MiB       # a start request, argv and environment JSON-encoded
SO_SNDBUFFORCE = 32
MAX_ARGV_ITEMS = 4096
MAX_ENV_ITEMS = 256
MIN_MEMORY = 8 * MiB              # below this even the job's init cannot run


def _time_scale():
    """STEVE_JOBS_TIME_SCALE: every fixed time budget is multiplied by it (default 1), so
    that a 10x slower machine (an emulated VM, a loaded CI host) gets 10x the patience."""
    try:
        scale = float(os.environ.get("STEVE_JOBS_TIME_SCALE", "1"))
    except ValueError:
        return 1.0
    return scale if math.isfinite(scale) and scale >= 1 else 1.0


TIME_SCALE = _time_scale()
SPAWN_TIMEOUT = 15.0 * TIME_SCALE # seconds the engine waits for a job to reach exec
WARM_SHIMS = 2                    # job supervisors the spawner keeps ready
EGRESS_MEMORY = 8                 # a warm one has an egress network ready if one of the
                                  # last this many starts asked for one
REFILL_DELAY = 0.02               # seconds of quiet before the spawner makes the next one
MOUNT_TEMPLATE_AGE = 1.0          # seconds a MountTemplate serves before it is made anew
KILL_TIMEOUT = 10.0 * TIME_SCALE  # seconds a killed job gets to disappear
PEAK_SAMPLE_INTERVAL = 0.1        # seconds between samples where memory.peak is missing
RESULT_RESERVE = 16 * KiB         # room kept for a job's result.json from its start
MAX_ERROR_CHARS = 2000            # longer error texts are cut (they must fit the reserve)
CHUNK = 1 * MiB                   # largest piece of output read or copied at once
PIPE_SIZE = 1 * MiB               # job stdout pipe capacity: fewer stalls for chatty jobs
JOB_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")   # each job: empty, its own
STATE_DIR_REFUSED = ("/tmp", "/dev/shm")   # cleaned by the host, or memory: not for state
JOB_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")   # what /dev holds
PRIVATE_DIR_SIZE = 1 * GiB        # a job's private /tmp and the like (and its memory limit)
NAME_FORMAT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")        # a job's name
LABEL_KEY_FORMAT = re.compile(r"[A-Za-z0-9_./-]{1,63}")
MAX_LABELS, MAX_LABEL_VALUE = 32, 255
REQUEST_ID_FORMAT = re.compile(r"[\x21-\x7e]{1,128}")
REQUEST_ID_TTL = 24 * 3600        # seconds a start's request id keeps meaning that start
NSIG = 65                         # signals are 1..64 on Linux
PENDING = object()                # a name or request id held by a start under way

# Job states, as status() reports them.
QUEUED, RUNNING, PAUSED = "queued", "running", "paused"
EXITED, FAILED, STOPPED, KILLED, OOM_KILLED, UNKNOWN, CANCELLED = (
    "exited", "failed", "stopped", "killed", "oom_killed", "unknown", "cancelled")
ENDED_STATES = (EXITED, FAILED, STOPPED, KILLED, OOM_KILLED, UNKNOWN, CANCELLED)
NETWORK_MODES = ("", "none", "host", "egress")   # a start's network ("": none)


def rfc3339(t, digits=6):
    """Seconds since the epoch -> '2026-12-02T10:00:00.123456Z' (digits: of the fraction,
    cut, not rounded)."""
    import datetime
    text = datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(
        timespec="microseconds").replace("+00:00", "")
    return text[:len(text) - 6 + digits].rstrip(".") + "Z"


def human_bytes(n):
    """1536 -> '1.5KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024


SIZE_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}


DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}   # ("": seconds)


def parse_duration(text):
    """'90', '90s', '1.5m', '2h', '1h30m', '1d' -> seconds (more than 0). Raises ValueError."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd]?)", str(text).strip().lower())
    if not parts or "".join(n + u for n, u in parts) != str(text).strip().lower() \
            or sum(float(n) * DURATION_UNITS[u] for n, u in parts) <= 0:
        raise ValueError(f"invalid duration {quoted(text)}: use a number of seconds, or "
                         f"with s, m, h or d (90s, 10m, 1h30m), more than 0")
    return sum(float(n) * DURATION_UNITS[u] for n, u in parts)


def parse_size(text):
    """'256M', '1G', '10MiB', '4096' -> bytes (binary units). Raises ValueError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"invalid size {quoted(text)}: use a number with K, M, G or T "
                         f"(powers of 1024)")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


class Error(Exception):
    """Base of every error a caller of the engine can cause or be told about.

    reason: what went wrong as one UPPER_SNAKE word for programs (google.rpc.ErrorInfo);
    field: for an invalid request, the request field at fault (google.rpc.BadRequest).
    """
    reason = "ERROR"

    def __init__(self, message, reason=None, field=None):
        super().__init__(message)
        self.reason = reason or self.reason
        self.field = field


class NotFoundError(Error):
    """No such job (or not one the caller may see)."""
    reason = "JOB_NOT_FOUND"


class InvalidArgumentError(Error):
    """The request is malformed or a value is out of range; nothing was changed."""
    reason = "INVALID_ARGUMENT"


class AlreadyExistsError(Error):
    """A name the caller chose is taken by one of its jobs."""
    reason = "NAME_TAKEN"


class FailedPreconditionError(Error):
    """The job is not in a state that allows the operation (e.g. pausing an ended job)."""
    reason = "FAILED_PRECONDITION"


class ResourceExhaustedError(Error):
    """The server cannot take more work right now."""
    reason = "RESOURCE_EXHAUSTED"


class PermissionDeniedError(Error):
    """The caller is known but may not do this."""
    reason = "ROLE_NOT_ALLOWED"


class UnauthenticatedError(Error):
    """The caller could not be identified."""
    reason = "TOKEN_INVALID"


class UnavailableError(Error):
    """A server facility (cgroups, namespaces, the spawner) is not working."""
    reason = "UNAVAILABLE"


class DeadlineExceededError(Error):
    """An operation did not finish in the time it is allowed (e.g. a job that outlives
    SIGKILL); it may still finish later."""
    reason = "DEADLINE_EXCEEDED"


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
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE, MS_SLAVE = 0x20, 0x1000, 0x4000, 0x40000, 0x80000
MNT_DETACH = 0x2
PR_SET_NAME, PR_SET_DUMPABLE, PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 15, 4, 1, 38
PR_SET_MEMORY_MERGE, MADV_MERGEABLE = 67, 12   # (kernel samepage merging: KSM)
KSM_RUN = "/sys/kernel/mm/ksm/run"             # 1: the operator has KSM merging pages
PR_CAPBSET_DROP, CAP_SYS_PTRACE = 24, 19
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


SYS_MOUNT_SETATTR = 442          # the same number on x86_64 and aarch64
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1


def make_mounts_read_only(top):
    """Make top and every mount below it read-only, in this mount namespace only.

    mount_setattr(2) does it in one call (Linux 5.12+); older kernels get a bind-remount
    per mount point, keeping each one's nosuid/nodev/noexec. Raises OSError."""
    attr = struct.pack("QQQQ", MOUNT_ATTR_RDONLY, 0, 0, 0)   # set, clear, propagation, userns
    if _libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, os.fsencode(top), AT_RECURSIVE, attr,
                     len(attr)) == 0:
        return
    if ctypes.get_errno() != errno.ENOSYS:
        _check(-1, f"mount_setattr {top}")
    remount_each_read_only(top)


def mountinfo_path(field):
    """A path as /proc/self/mountinfo writes it, unescaped: space, tab, newline and
    backslash come as octal escapes (\\040 is a space), every other byte as it is."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def remount_each_read_only(top):
    """make_mounts_read_only for kernels without mount_setattr: a read-only bind-remount of
    every mount point at or below top (nosuid, nodev, noexec kept)."""
    keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
    for line in read_file("/proc/self/mountinfo").splitlines():
        fields = line.split()
        point = mountinfo_path(fields[4])
        if point == top or point.startswith(top.rstrip("/") + "/"):
            flags = sum(keep[o] for o in fields[5].split(",") if o in keep)
            with contextlib.suppress(OSError):   # a mount gone meanwhile, or not ours
                mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags)


def bind_mount(source, target, read_only=False):
    """Bind source onto target; writable unless read_only, whatever source's mount is.
    Raises OSError."""
    mount(source, target, None, MS_BIND)
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV
          | (MS_RDONLY if read_only else 0))


# The syscall filter every job runs under, modelled on Docker's and Podman's default
# profiles (a deny-list: what is not named is allowed). Denied: the kernel keyring (not
# namespaced), bpf, perf_event_open, userfaultfd, modules, kexec, every way to mount or
# to enter or make namespaces (user namespaces above all: `unshare -Ur` must fail),
# handles that bypass paths, swap, reboot, accounting, ioperm. Numbers per architecture;
# another architecture's calls (a 32-bit binary, x32) get ENOSYS, as Docker does.
DENIED_SYSCALLS = {   # name: (x86_64, aarch64)
    "add_key": (248, 217), "keyctl": (250, 219), "request_key": (249, 218),
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "mount_setattr": (442, 442), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "move_mount": (429, 429),
    "open_tree": (428, 428), "setns": (308, 268), "open_by_handle_at": (304, 265),
    "swapon": (167, 224), "swapoff": (168, 225), "reboot": (169, 142), "acct": (163, 89),
    "quotactl": (179, 60), "lookup_dcookie": (212, 18), "vhangup": (153, 58),
    "iopl": (172, None), "ioperm": (173, None),
}
CLONE3 = 435     # its flags are in memory, out of a filter's reach: ENOSYS, libc falls back
CLONE_NEWUSER = 0x10000000
AUDIT_ARCHES = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}
X32_SYSCALL_BIT = 0x40000000
BPF_LD_W_ABS, BPF_JEQ, BPF_JGE, BPF_JSET, BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06
# Calls denied for one value of one argument (its low 32 bits): name: ((x86_64, aarch64),
# argument, test (JSET: any of the bits; JEQ: that value), value, errno). Offering pages to
# KSM is denied with the EINVAL of a kernel without it: a job's pages merged with another
# job's supervisor's (advise_page_merging) would let it time its own writes to learn
# whether a page it guessed exists there, or rowhammer a page it shares (Flip Feng Shui).
ARGUMENT_CHECKED = {
    "unshare": ((272, 97), 0, BPF_JSET, CLONE_NEWUSER, errno.EPERM),
    "clone": ((56, 220), 0, BPF_JSET, CLONE_NEWUSER, errno.EPERM),
    "madvise": ((28, 233), 2, BPF_JEQ, MADV_MERGEABLE, errno.EINVAL),
    "prctl": ((157, 167), 0, BPF_JEQ, PR_SET_MEMORY_MERGE, errno.EINVAL),
}
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


def job_syscall_filter(machine=None):
    """The job's seccomp program (classic BPF) for this machine, as bytes; b'' on an
    architecture it has no numbers for."""
    machine = machine or os.uname().machine
    if machine not in AUDIT_ARCHES:
        return b""
    arch, column = AUDIT_ARCHES[machine]
    op = lambda code, k, jt=0, jf=0: struct.pack("HBBI", code, jt, jf, k)
    deny = lambda err: op(BPF_RET, SECCOMP_RET_ERRNO | err)
    prog = [op(BPF_LD_W_ABS, 4),                         # seccomp_data.arch
            op(BPF_JEQ, arch, 1, 0), deny(errno.ENOSYS),
            op(BPF_LD_W_ABS, 0)]                         # seccomp_data.nr
    if machine == "x86_64":
        prog += [op(BPF_JGE, X32_SYSCALL_BIT, 0, 1), deny(errno.ENOSYS)]
    prog += [op(BPF_JEQ, CLONE3, 0, 1), deny(errno.ENOSYS)]
    for numbers, argument, test, value, err in ARGUMENT_CHECKED.values():
        prog += [op(BPF_JEQ, numbers[column], 0, 4),
                 op(BPF_LD_W_ABS, 16 + 8 * argument),    # seccomp_data.args[i], low half
                 op(test, value, 0, 1), deny(err),
                 op(BPF_RET, SECCOMP_RET_ALLOW)]
    for numbers in DENIED_SYSCALLS.values():
        if numbers[column] is not None:
            prog += [op(BPF_JEQ, numbers[column], 0, 1), deny(errno.EPERM)]
    prog.append(op(BPF_RET, SECCOMP_RET_ALLOW))
    return b"".join(prog)


class SockFprog(ctypes.Structure):
    """struct sock_fprog: a BPF program as prctl(PR_SET_SECCOMP) takes it."""
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def prepared_syscall_filter(program):
    """(sock_fprog, its buffer) for install_syscall_filter, made ahead of time: a start
    then pays only for the prctl. None for an empty program."""
    if not program:
        return None
    buf = ctypes.create_string_buffer(program, len(program))
    return SockFprog(len(program) // 8, ctypes.addressof(buf)), buf


def install_syscall_filter(prepared):
    """Load a prepared seccomp filter (needs no_new_privs, or CAP_SYS_ADMIN).
    Raises OSError."""
    if prepared is not None:
        _check(_libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER),
                           ctypes.byref(prepared[0]), 0, 0), "seccomp")


def umount_lazy(target):
    """umount2(target, MNT_DETACH): detach target and everything mounted below it."""
    _check(_libc.umount2(os.fsencode(target), ctypes.c_int(MNT_DETACH)), f"umount {target}")


SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429   # the same on x86_64 and aarch64 (Linux 5.2+)
OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH = 0x1, 0x4


def clone_mount(path):
    """open_tree(2) with OPEN_TREE_CLONE: a detached copy of the mount at path, as an fd
    another process (in another mount namespace) can attach with attach_mount. Raises
    OSError (ENOSYS before Linux 5.2)."""
    return _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(path),
                                OPEN_TREE_CLONE | os.O_CLOEXEC), f"open_tree {path}")


def attach_mount(fd, target):
    """move_mount(2) of a clone_mount fd onto target, in this mount namespace. Raises OSError."""
    _check(_libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, os.fsencode(target),
                         MOVE_MOUNT_F_EMPTY_PATH), f"move_mount {target}")


def unmount_if_mounted(path):
    """Detach whatever is mounted at path (and below); nothing if nothing is. Raises OSError."""
    try:
        umount_lazy(path)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOENT):   # not a mount point, no such path
            raise


def folder_bytes(path):
    """Bytes a job's working folder takes: what its own filesystem (a tmpfs) has in use, or
    for a folder on the state disk, its files' blocks, links not followed. 0 if it is gone."""
    try:
        if os.stat(path).st_dev != os.stat(os.path.dirname(path)).st_dev:
            st = os.statvfs(path)
            return (st.f_blocks - st.f_bfree) * st.f_frsize
    except OSError:
        return 0
    total = 0
    for top, folders, files in os.walk(path):
        for name in folders + files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(top, name)).st_blocks * 512
    return total


def is_mount_point(path):
    """True if something is mounted at path (a bind of a folder of the same filesystem
    too, which os.path.ismount misses)."""
    path = os.path.realpath(path)
    for line in read_file("/proc/self/mountinfo").splitlines():
        if mountinfo_path(line.split()[4]) == path:
            return True
    return False


def keep_mounts_private(folder):
    """Make folder a mount of its own (bound onto itself, once) that propagates nothing:
    the jobs' working folders mounted in it must not appear in every namespace that
    shares the host's mounts (systemd makes / shared; each PrivateTmp service has a
    copy). Raises OSError."""
    if not is_mount_point(folder):
        mount(folder, folder, None, MS_BIND)
    mount(None, folder, None, MS_PRIVATE)


def detach_jobs_folders(work):
    """Detach work/ from this mount namespace: every job's working folder is a mount in it,
    a mount of its own (keep_mounts_private), and one detach drops them all. Nothing when
    work/ is a filesystem of its own (an operator's disk: the folder beneath it is not
    work/, and jobs with a folder on that disk would lose theirs), or already detached.
    Raises OSError."""
    if work and os.stat(work).st_dev == os.stat(os.path.dirname(work)).st_dev:
        unmount_if_mounted(work)


def close_fds_but(keep):
    """Close every fd from 3 up (close-on-exec or not) but those in keep (fds >= 3)."""
    low = 3
    for fd in sorted(keep) + [1 << 16]:
        os.closerange(low, fd)
        low = fd + 1


def setns(fd, nstype):
    """setns(2): join the namespace fd refers to. Raises OSError."""
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def prctl(option, arg):
    """prctl(2) with one argument. Raises OSError."""
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg) if isinstance(arg, int)
                       else ctypes.c_char_p(arg), 0, 0, 0), "prctl")


def advise_page_merging():
    """Offer this process's private writable mappings to KSM (madvise MADV_MERGEABLE):
    where the operator runs it, identical pages in them are kept once. Why: every shim is
    a fork of the spawner that copies the pages it writes (refcounts), mostly the same
    bytes in every shim. Forks inherit the offer, exec drops it. Returns the bytes
    offered: 0 on a kernel without KSM."""
    offered = 0
    for line in read_file("/proc/self/maps").splitlines():
        fields = line.split()
        if fields[1] != "rw-p" or fields[5:] == ["[stack]"]:
            continue
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if _libc.madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low),
                         MADV_MERGEABLE) == 0:   # (a kernel without KSM: EINVAL, each)
            offered += high - low
    return offered


def set_process_title(title):
    """Be title in ps, /proc/PID/comm and /proc/PID/cmdline (as setproctitle does: argv's
    memory overwritten in place). Why: a job's pid 1 is a fork of the spawner, whose
    command line names host paths and the server's settings. Raises OSError."""
    prctl(PR_SET_NAME, title)
    stat = read_file("/proc/self/stat").rsplit(")", 1)[1].split()
    start, end = int(stat[45]), int(stat[46])   # fields 48, 49: arg_start, arg_end
    size = end - start
    if size > 0:
        ctypes.memmove(start, title[:size - 1].ljust(size, b"\0"), size)


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


def children_of(pid):
    """The pids of pid's children (its main thread's), [] if it is gone."""
    text = read_file(f"/proc/{pid}/task/{pid}/children", "")
    return [int(c) for c in text.split()]


def wait_readable(fd, timeout=None):
    """True once fd (a number or anything with fileno()) is readable or at its end, False
    after timeout seconds (None: no bound). (poll, not select: select refuses an fd past
    1023, and a server with a thousand jobs running holds more.)"""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0.0, timeout) * 1000))


def own_host_pid():
    """This process's pid in the host's /proc (getpid() is its pid in its own namespace:
    1 for a shim, the job's pid 1)."""
    return int(os.readlink("/proc/self"))


def host_pid_of(pid):
    """The host /proc's pid of our child pid (a pid of our namespace). Raises OSError."""
    fd = os.pidfd_open(pid)
    try:
        for line in read_file(f"/proc/self/fdinfo/{fd}").splitlines():
            if line.startswith("Pid:"):
                return int(line.split()[1])
    finally:
        os.close(fd)
    raise OSError(errno.ESRCH, f"no host pid for {pid}")


def innermost_pid(pid):
    """pid's number in its own pid namespace (NSpid's last field), None if it is gone."""
    for line in read_file(f"/proc/{pid}/status", "").splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return None


def bring_loopback_up():
    """Set IFF_UP on 'lo' in the current network namespace. Raises OSError."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def process_start_time(pid):
    """The kernel's start time (clock ticks since boot) of pid, or None if it is gone
    (or a zombie: dead, waiting for a parent to reap it).

    A pid plus its start time names one process for good: pids are reused, the pair is not.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def write_file(path, data):
    """Write a small control file (cgroupfs, procfs) in one write(2). Raises OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode() if isinstance(data, str) else data)
    finally:
        os.close(fd)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def unsafe_state_dir(path):
    """Why the state folder path (absolute, links resolved) is unsafe for a root server,
    or None: as sshd's StrictModes, it and each folder above it must be root's and
    writable by no one else, or anyone who can rename an entry in it can point the
    server's reads and writes at any file (a sticky folder such as /var/tmp is fine above
    it: others cannot rename root's entries there). Its jobs/ and work/ too, if present."""
    inside = [os.path.join(path, "jobs"), os.path.join(path, "work")]
    above = [path]
    while above[-1] != "/":
        above.append(os.path.dirname(above[-1]))
    for folder in [*reversed(above), *inside]:
        try:
            st = os.lstat(folder)
        except FileNotFoundError:
            continue   # (made by the server, root's and 0700)
        if st.st_uid != 0:
            return (f"the state folder {path} is unsafe: {folder} belongs to uid {st.st_uid}, "
                    f"who could make the server read and write any file (give it to root, "
                    f"or choose another --state-dir)")
        sticky_above = folder not in inside and folder != path and st.st_mode & 0o1000
        if st.st_mode & 0o022 and not sticky_above:
            return (f"the state folder {path} is unsafe: {folder} is writable by "
                    f"{'everyone' if st.st_mode & 0o002 else 'its group'} "
                    f"(mode {st.st_mode & 0o7777:04o}), who could make the server read and "
                    f"write any file (chmod go-w it, or choose another --state-dir)")
    return None


def open_job_file(path, flags=os.O_RDONLY, mode=0o600):
    """os.open of a file in a job's folder, never through a link in its last step (a
    folder an attacker could write would else lead the root server to any file).
    Raises OSError (ELOOP for a link)."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def _read_all(fd):
    """Read fd to EOF (procfs hands out a page a read, a pipe what was written) and close
    it. Raises OSError."""
    chunks = []
    try:
        while True:
            b = os.read(fd, 65536)
            if not b:
                return b"".join(chunks)
            chunks.append(b)
    finally:
        os.close(fd)


def read_file(path, default=None):
    """Read a small text file, decoded as file names are (os.fsdecode: bytes that are not
    UTF-8 survive as surrogates, so a path read from mountinfo opens the same file, and a
    process's odd name in /proc raises nothing); default if it does not exist (or cannot be
    read). Raises OSError (without a default).

    os.read, not open(): open builds three layers of buffers and asks the file whether it
    is a terminal and where it stands, which made it twice as slow (14 against 7 us on a
    cgroup file). List reads six cgroup files a running job; a job's supervisor reads its
    own, and writes fewer of its pages after the fork."""
    try:
        data = _read_all(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError:
        if default is None:
            raise
        return default
    return os.fsdecode(data)


RESERVE_SUFFIX = ".reserve"


def write_json_atomic(path, obj):
    """Replace path with obj as JSON so readers see the old or the new file, never half.

    If path's room was reserved (reserve_room), the JSON goes into the reserved blocks,
    so it is written even on a full filesystem. Raises OSError (ENOSPC without a reserve).
    """
    data = json.dumps(obj).encode()
    spare = path + RESERVE_SUFFIX
    try:
        fd = open_job_file(spare, os.O_WRONLY)
    except FileNotFoundError:
        fd = None
    if fd is not None:
        try:
            fits = len(data) <= os.fstat(fd).st_size
            if fits:
                # Overwriting blocks that are already the file's allocates nothing.
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
        finally:
            os.close(fd)
        if fits:
            os.rename(spare, path)
            return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)   # (a crash's, or a planted link: O_EXCL refuses either)
        with os.fdopen(open_job_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
            f.write(data)
        os.rename(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def reserve_room(path, size):
    """Take size bytes of real blocks for a file to be written later by write_json_atomic
    (zeros written, not fallocate: overwriting written blocks needs no new room on any
    filesystem that overwrites in place). Raises OSError (ENOSPC) if there is no room."""
    fd = os.open(path + RESERVE_SUFFIX, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                 0o600)
    try:
        _write_all(fd, bytes(size))
    finally:
        os.close(fd)


def write_json_until_written(path, obj):
    """write_json_atomic, retried while the filesystem is full (or failing), so that what a
    supervisor knows is not lost: it is written as soon as there is room again. Not once
    path's folder is gone (the job was removed, or the state folder): nobody would read it.
    Returns whether it was written."""
    pause = 0.2
    while True:
        try:
            write_json_atomic(path, obj)
            return True
        except OSError as e:
            if e.errno == errno.ENOENT and not os.path.isdir(os.path.dirname(path)):
                log.warning("not writing %s: its folder is gone", path)
                return False
            if pause == 0.2:
                log.warning("cannot write %s (%s); retrying until there is room",
                            path, e.strerror or e)
        time.sleep(pause)
        pause = min(pause * 2, 5.0)


def is_out_of_room(error):
    """True for the OSErrors of a full filesystem or quota."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def raise_open_files_limit():
    """Raise the soft RLIMIT_NOFILE to the hard limit. Returns (old soft, new soft).

    Every connection, stream and job costs the server descriptors; the usual default soft
    limit (1024) is far too low for a server, and jobs get the old value back (spawner)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


def set_open_files_limit(soft):
    """Set the soft RLIMIT_NOFILE (e.g. back to what the server started with)."""
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def return_freed_memory_to_the_system():
    """Make glibc's malloc give freed memory back from now on: large buffers (output
    chunks) are mmapped and unmapped on free. Without it, memory that thousands of streams
    once held stays in the process after they end. No-op on other C libraries."""
    with contextlib.suppress(AttributeError):
        _libc.mallopt(M_MMAP_THRESHOLD, 4 * MiB)   # fixed: no "dynamic" growth
        _libc.mallopt(M_TRIM_THRESHOLD, 64 * MiB)
        trim_freed_memory()


def trim_freed_memory():
    """Give the heap's free memory back to the system now (glibc; no-op elsewhere)."""
    with contextlib.suppress(AttributeError):
        _libc.malloc_trim(0)


###############################################################################
# Tar streams: what cp and run --copy carry (written and read without tarfile)
###############################################################################
#
# Python's tarfile costs 100-200 us a member (user and group lookups, a copy of its whole
# read buffer per read, realpath per extracted member): three times GNU tar on a tree of
# small files. These read and write the one format GNU tar, bsdtar and tarfile all read
# (ustar headers, GNU long names); the reader takes POSIX (pax) headers too, which is what
# `cp - ID:PATH` gets from tar programs by default.

TAR_BLOCK = 512
TAR_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
TAR_FLAGS = {"file": b"0", "dir": b"5", "symlink": b"2", "hardlink": b"1"}   # (written)
TAR_KINDS = {**{flag: kind for kind, flag in TAR_FLAGS.items()},
             b"\0": "file", b"7": "file"}   # (read: old tars' files, contiguous files)
TAR_LONG_NAME, TAR_LONG_LINK, TAR_PAX, TAR_PAX_GLOBAL = b"L", b"K", b"x", b"g"


class TarError(ValueError):
    """A tar stream that cannot be read: cut short, or not tar."""


class TarMember(typing.NamedTuple):
    """One entry of a tar stream: kind is "file", "dir", "symlink", "hardlink" or "other"
    (a device, FIFO, sparse file...); data (a file's size bytes) follows it in the stream."""
    name: str
    kind: str
    mode: int
    mtime: int
    size: int
    linkname: str


def tar_number(value, width):
    """A header's number field: octal, or base-256 when it does not fit (GNU's way)."""
    if 0 <= value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    return bytes([0x80]) + max(value, 0).to_bytes(width - 1, "big")


def tar_header(name, kind, mode, mtime, size=0, linkname=""):
    """The header blocks of one member (GNU long-name blocks first where a name is long)."""
    blocks, name_b, link_b = [], name.encode("utf-8", "surrogateescape"), \
        linkname.encode("utf-8", "surrogateescape")
    for long, flag in ((name_b, TAR_LONG_NAME), (link_b, TAR_LONG_LINK)):
        if len(long) > 100:
            blocks.append(tar_header_block(b"././@LongLink", flag, 0o644, 0, len(long) + 1))
            blocks.append(tar_pad(long + b"\0"))
    blocks.append(tar_header_block(name_b[:100], TAR_FLAGS[kind], mode, mtime, size,
                                   link_b[:100]))
    return b"".join(blocks)


def tar_header_block(name, flag, mode, mtime, size, linkname=b""):
    header = bytearray(TAR_HEADER.pack(
        name, tar_number(mode & 0o7777, 8), tar_number(0, 8), tar_number(0, 8),
        tar_number(size, 12), tar_number(int(mtime), 12), b" " * 8, flag, linkname,
        b"ustar ", b" \0", b"", b"", b"", b"", b""))
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def tar_pad(data):
    return data + bytes(-len(data) % TAR_BLOCK)


def tar_chunks(copies, chunk=256 * KiB):
    """A tar stream, in pieces of about chunk bytes, of copies' (path, name) pairs: each
    path (a file, a folder recursively, a link as a link) named name in the stream. Hard
    links within it stay links; sockets, FIFOs and devices are left out. Raises OSError."""
    out, links = bytearray(), {}
    for path, name in copies:
        for member_path, member_name, st in tar_walk(path, name):
            if stat.S_ISDIR(st.st_mode):
                out += tar_header(member_name + "/", "dir", st.st_mode, st.st_mtime)
            elif stat.S_ISLNK(st.st_mode):
                out += tar_header(member_name, "symlink", st.st_mode, st.st_mtime,
                                  linkname=os.readlink(member_path))
            elif st.st_nlink > 1 and (st.st_dev, st.st_ino) in links:
                out += tar_header(member_name, "hardlink", st.st_mode, st.st_mtime,
                                  linkname=links[st.st_dev, st.st_ino])
            else:
                if st.st_nlink > 1:
                    links[st.st_dev, st.st_ino] = member_name
                yield from tar_file(out, member_path, member_name, st, chunk)
            if len(out) >= chunk:
                yield bytes(out)
                out.clear()
    out += bytes(2 * TAR_BLOCK)   # the end
    yield bytes(out)


def tar_walk(path, name):
    """(path, name, lstat) of path and, for a folder, of all it holds, in name order
    (depth first, without recursion: a tree may be deeper than Python's stack); sockets,
    FIFOs and devices left out."""
    todo = [(path, name)]
    while todo:
        path, name = todo.pop()
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            yield path, name, st
        if stat.S_ISDIR(st.st_mode):
            todo.extend((os.path.join(path, entry), f"{name}/{entry}")
                        for entry in sorted(os.listdir(path), reverse=True))


def tar_file(out, path, name, st, chunk):
    """Append a file's header and data to out, yielding out's pieces of chunk bytes as it
    fills. The size is the lstat's: a file that grows meanwhile is cut there, one that
    shrinks is padded with zeros (as GNU tar, which warns)."""
    # (O_NONBLOCK: a FIFO put in the file's place since its lstat must not block us.)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return   # (no longer a file: left out, as special files are)
        out += tar_header(name, "file", st.st_mode, st.st_mtime, st.st_size)
        left = st.st_size
        while left:
            data = os.read(fd, min(left, chunk))
            if not data:
                data = bytes(min(left, chunk))
            left -= len(data)
            if not out and len(data) == chunk:
                yield data   # (a large file's whole pieces go as they are: no copy)
                continue
            out += data
            if len(out) >= chunk:
                yield bytes(out)
                out.clear()
        out += bytes(-st.st_size % TAR_BLOCK)
    finally:
        os.close(fd)


class TarReader:
    """The members of a tar stream read by read(n) (up to n bytes; b"" at its end): for
    each, the member, then its data through data(); what data() does not take is skipped."""

    def __init__(self, read):
        self._read, self._chunk, self._at, self._left = read, b"", 0, 0

    def _take(self, n):
        """Up to n bytes (at least one), or b"" at the stream's end."""
        if self._at >= len(self._chunk):
            self._chunk, self._at = self._read(max(n, 64 * KiB)), 0
            if not self._chunk:
                return b""
        data = self._chunk[self._at:self._at + n]
        self._at += len(data)
        return data

    def _exact(self, n):
        parts, got = [], 0
        while got < n:
            data = self._take(n - got)
            if not data:
                raise TarError("the tar stream ended in the middle of a member")
            parts.append(data)
            got += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def data(self):
        """The current member's data, in pieces (each byte once)."""
        while self._left:
            data = self._take(min(self._left, 256 * KiB))
            if not data:
                raise TarError("the tar stream ended in the middle of a member")
            self._left -= len(data)
            yield data

    def _skip_data(self, padding):
        for _ in self.data():
            pass
        if padding:
            self._exact(padding)

    def __iter__(self):
        long_name = long_link = None
        pax = {}
        padding = 0
        while True:
            self._skip_data(padding)
            block = self._take(TAR_BLOCK)
            if not block:   # (a stream cut between two members: not taken for whole)
                raise TarError("the tar stream ended before its end blocks")
            if len(block) < TAR_BLOCK:
                block += self._exact(TAR_BLOCK - len(block))
            if not block.strip(b"\0"):
                return
            fields = tar_fields(block)
            name, flag, size = fields["name"], fields["flag"], fields["size"]
            self._left, padding = size, -size % TAR_BLOCK
            if flag in (TAR_LONG_NAME, TAR_LONG_LINK, TAR_PAX, TAR_PAX_GLOBAL):
                if size > 1 * MiB:
                    raise TarError(f"a tar header of {size} bytes")
                text = b"".join(self.data())
                if flag == TAR_LONG_NAME:
                    long_name = text.rstrip(b"\0")
                elif flag == TAR_LONG_LINK:
                    long_link = text.rstrip(b"\0")
                elif flag == TAR_PAX:
                    pax = tar_pax_records(text)
                continue
            name = tar_text(pax.get("path", long_name or name))
            kind = TAR_KINDS.get(flag, "other")
            if flag == b"\0" and name.endswith("/"):
                kind = "dir"   # (old tars' folders)
            size = tar_pax_number(pax, "size", size)
            if kind in ("dir", "symlink", "hardlink"):
                size = 0   # (their size field means nothing: no data follows them)
            self._left, padding = size, -size % TAR_BLOCK
            linkname = tar_text(pax.get("linkpath", long_link or fields["linkname"]))
            if "\0" in name + linkname or not name or size < 0:
                raise TarError(f"a tar member that cannot be: {name[:100]!r}")
            mtime = min(max(tar_pax_number(pax, "mtime", fields["mtime"]), 0), 2 ** 40)
            yield TarMember(name.rstrip("/") if kind == "dir" else name, kind,
                            fields["mode"], mtime, size, linkname)
            long_name = long_link = None
            pax = {}


def tar_pax_number(pax, key, default):
    """A pax record's number (an integer part of a decimal), else default. Raises TarError."""
    if key not in pax:
        return default
    whole = pax[key].split(".", 1)[0]
    if not whole.lstrip("-").isdigit() or len(whole) > 20:
        raise TarError(f"a pax {key} that cannot be: {pax[key][:24]!r}")
    return int(whole)


def tar_text(value):
    return value if isinstance(value, str) else value.decode("utf-8", "surrogateescape")


def tar_fields(block):
    """The fields of a header block. Raises TarError (a bad checksum: not a tar stream)."""
    (name, mode, _uid, _gid, size, mtime, checksum, flag, linkname, magic, _version,
     _uname, _gname, _major, _minor, prefix) = TAR_HEADER.unpack(block)
    try:
        stored = int(checksum.split(b"\0")[0].strip() or b"0", 8)
    except ValueError:
        stored = -1
    unsigned = sum(block[:148]) + 256 + sum(block[156:])   # (the field itself as spaces)
    if stored != unsigned and stored != unsigned - 256 * sum(
            1 for b in block[:148] + block[156:] if b > 127):   # (old tars: signed bytes)
        raise TarError("not a tar stream (a header's checksum is wrong)")
    name = name.split(b"\0", 1)[0]
    if magic == b"ustar\0" and prefix.strip(b"\0"):   # POSIX ustar: a prefix field
        name = prefix.split(b"\0", 1)[0] + b"/" + name
    return {"name": name, "flag": flag, "size": tar_read_number(size),
            "mode": tar_read_number(mode), "mtime": tar_read_number(mtime),
            "linkname": linkname.split(b"\0", 1)[0]}


def tar_read_number(field):
    """A header's number: octal, or GNU base-256 (first byte 0x80 or 0xff)."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] == 0xff else value
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarError(f"not a tar stream (a number field holds {digits[:12]!r})") from None


def tar_pax_records(text):
    """The records of a pax extended header ("LEN key=value\\n" each)."""
    records, at = {}, 0
    while at < len(text) and text[at:at + 1] != b"\0":
        length, _, _ = text[at:at + 20].partition(b" ")
        end = at + (int(length) if length.isdigit() else 0)
        if end <= at + len(length) + 1 or end > len(text):   # (0 would loop forever)
            raise TarError("a pax header that cannot be read")
        key, _, value = text[at + len(length) + 1:end - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        at = end
    return records


def refuse_member(member, names, links, into_job):
    """Why a member may not be unpacked, or None. names: the members unpacked so far (the
    one place a hard link may point); links: the symlinks among them (nothing is written
    through one). into_job: a job's folder, where a link out of the folder and setuid or
    setgid bits are refused too (elsewhere, links are kept as links and the bits cleared)."""
    name = member.name
    parts = tar_name_parts(name)
    if name.startswith("/") or ".." in parts:
        return f"{name}: a name that leaves the folder"
    if member.kind == "other":
        return f"{name}: a device node, FIFO or other special file"
    if any("/".join(parts[:i]) in links for i in range(1, len(parts))) or (
            member.kind == "dir" and "/".join(parts) in links):
        return f"{name}: a name under a link of the copy"
    if into_job and member.mode & 0o6000 and member.kind != "dir":
        return f"{name}: setuid or setgid"
    if member.kind == "hardlink" and "/".join(tar_name_parts(member.linkname)) not in names:
        return f"{name}: a hard link to {member.linkname}, which is not in the copy"
    if into_job and member.kind == "symlink" and (
            member.linkname.startswith("/") or ".." in os.path.normpath(
                os.path.join(os.path.dirname(name), member.linkname)).split("/")):
        return f"{name}: a link out of the folder (to {member.linkname})"
    return None


def tar_name_parts(name):
    """A member's name as its parts, without "." and empty ones ("./a//b/" is a/b)."""
    return [part for part in name.split("/") if part not in ("", ".")]


def unpack_tar(reader, folder, rename=None, into_job=True):
    """Write a TarReader's members into folder (its top entry named rename, when given).
    Each file is written under a temporary name and renamed once whole, so a stream cut
    short leaves no partial file under its name. Returns {"files", "bytes", "tops"} (the
    names' first parts). Raises TarError (a member refused, with why; a stream that is not
    tar), OSError."""
    names, links, folders, made = set(), set(), [], {folder}
    files = size = 0
    token = random_hex(4)
    tops = set()
    for member in reader:
        why = refuse_member(member, names, links, into_job)
        if why:
            raise TarError(f"refused: {why}")
        key = "/".join(tar_name_parts(member.name)) or "."
        name = "/".join([rename] + key.split("/")[1:]) if rename else key
        target = os.path.join(folder, name)
        parent = os.path.dirname(target)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        mode = member.mode & (0o1777 if into_job else 0o755)   # (as tar_filter)
        if member.kind == "dir":
            os.makedirs(target, exist_ok=True)
            made.add(target)
            folders.append((target, mode, member.mtime))
        elif member.kind == "file":
            size += write_whole(target, reader.data(), mode, member.mtime, f"{token}{files}")
        elif member.kind == "symlink":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            os.symlink(member.linkname, target)
            links.add(key)
        else:   # a hard link to a file of this copy (never through a link)
            linked = "/".join(tar_name_parts(member.linkname))
            if rename:
                linked = "/".join([rename] + linked.split("/")[1:])
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            os.link(os.path.join(folder, linked), target, follow_symlinks=False)
        names.add(key)
        tops.add(rename or member.name.strip("/").split("/")[0])   # ("." for a whole folder)
        files += 1
    for target, mode, mtime in reversed(folders):   # last: writing into them changed mtimes
        os.chmod(target, mode)
        os.utime(target, (mtime, mtime))
    return {"files": files, "bytes": size, "tops": sorted(tops)}


def write_whole(target, pieces, mode, mtime, tag):
    """A file of pieces' bytes, written as .NAME.partial-TAG and renamed target once whole
    (with mode and mtime). Returns its size. Raises OSError."""
    folder, name = os.path.split(target)
    temporary = os.path.join(folder, f".{name[:32]}.partial-{tag}")   # (a long name fits)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600)
    size = 0
    try:
        try:   # (by the descriptor, not the path: a small file costs a few calls)
            for data in pieces:
                _write_all(fd, data)
                size += len(data)
            os.fchmod(fd, mode & 0o7777)
            os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return size


###############################################################################
# Cgroups (v1, v2 and hybrid) by direct cgroupfs writes
###############################################################################

V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "blkio", "pids", "freezer")
V2_CONTROLLERS = ("cpu", "memory", "io", "pids")
V2_EQUIVALENT = {"cpuacct": "cpu", "blkio": "io", "freezer": None}   # None: cgroup.freeze


class Limits(typing.NamedTuple):
    """Resource limits of one job; 0 means 'the server default' in a request. Each field is
    a row of LIMITS, which says everything else about it."""
    cpu: float = 0.0          # CPU time as a fraction of cores (0.5 = half a core)
    memory: int = 0           # bytes of RAM; swap may not add to it
    pids: int = 0             # processes and threads the command may have at once
    io_read_bps: int = 0      # bytes/s read from io_device
    io_write_bps: int = 0     # bytes/s written to io_device
    io_device: str = ""       # "MAJOR:MINOR" of a whole disk; default: the job's files' disk


def cpu_writes(version, folder, limits, already):
    quota = max(1000, int(limits.cpu * 100000))   # the kernel's least quota is 1 ms
    if version == 1:
        return [(f"{folder}/cpu.cfs_period_us", "100000"),
                (f"{folder}/cpu.cfs_quota_us", str(quota))]
    return [(f"{folder}/cpu.max", f"{quota} 100000")]


def memory_writes(version, folder, limits, already):
    if version == 2:
        return [(f"{folder}/memory.max", str(limits.memory)),
                (f"{folder}/memory.swap.max", "0")]
    # memsw caps RAM+swap: set equal to the RAM limit, so swap cannot extend it. The
    # kernel refuses a RAM limit above memsw (and memsw below the RAM limit): raising,
    # memsw goes first; lowering, last.
    pair = [(f"{folder}/memory.limit_in_bytes", str(limits.memory)),
            (f"{folder}/memory.memsw.limit_in_bytes", str(limits.memory))]
    raising = already is not None and limits.memory > already.memory
    return pair[::-1] if raising else pair


def pids_writes(version, folder, limits, already):
    return [(f"{folder}/pids.max", str(limits.pids))]   # (the job's init, its shim, is outside)


def io_writes(version, folder, limits, already):
    """Both IO limits: v2 takes them in one line of io.max."""
    dev, rbps, wbps = limits.io_device, limits.io_read_bps, limits.io_write_bps
    if not dev or not (rbps or wbps):
        return []
    if version == 2:
        return [(f"{folder}/io.max", f"{dev} rbps={rbps or 'max'} wbps={wbps or 'max'}")]
    return [(f"{folder}/blkio.throttle.{which}_bps_device", f"{dev} {bps}")
            for which, bps in (("read", rbps), ("write", wbps)) if bps]


def bytes_per_second(n):
    return f"{human_bytes(n)}/s"


class LimitSpec(typing.NamedTuple):
    """Every fact about one resource limit, written once: validation, conversions, the CLI's
    and server's flags, what status shows and the cgroup writes are all made from LIMITS."""
    name: str                  # its field in Limits (the engine's and job records' word)
    proto: str                 # its field in jobs.proto's Limits (the API's word)
    flag: str                  # run's flag; the server's --default-X/--max-X are made of it
    parse: typing.Callable     # a flag's text as a value; raises ValueError
    show: typing.Callable      # a value as people read it (no spaces)
    unit: str                  # said after a range in errors
    least: object              # the least value a job may get...
    optional: bool             # ...or 0: no limit at all
    default: object            # the server's default for a job...
    most: object               # ...and the most it lets one ask (optional ones: 0, no most)
    role_capped: bool          # roles without up_to_max_limits ask at most the default
    controller: str            # the v1 controller whose folder writes go to (v2: its peer)
    writes: typing.Callable    # (version, folder, limits, already) -> [(file, value)], or
                               # None where another row's writes cover it
    help: str                  # run's flag's


LIMITS = (
    # name, proto, flag, parse, show, unit, least, optional, default, most, role_capped,
    # controller, writes, help
    LimitSpec("cpu", "cpu", "--cpu", float, "{:g}".format, "cores", 0.01, False, 1.0,
              float(os.cpu_count() or 1), True, "cpu", cpu_writes,
              "cores, e.g. 0.5 (0: the server's)"),
    LimitSpec("memory", "memory_bytes", "--memory", parse_size, human_bytes, "", MIN_MEMORY,
              False, 512 * MiB, 16 * GiB, True, "memory", memory_writes, "e.g. 256M"),
    LimitSpec("pids", "pids", "--pids", int, str, "", 1, False, 512, 32768, True, "pids",
              pids_writes, "processes the job may have at once"),
    LimitSpec("io_read_bps", "io_read_bps", "--io-read", parse_size, bytes_per_second, "",
              4 * KiB, True, 0, 0, False, "blkio", io_writes, "bytes/s, e.g. 10M"),
    LimitSpec("io_write_bps", "io_write_bps", "--io-write", parse_size, bytes_per_second, "",
              4 * KiB, True, 0, 0, False, "blkio", None, "bytes/s, e.g. 10M"),
    LimitSpec("io_device", "io_device", "--io-device", str, str, "", "", True, "", "", False,
              "blkio", None, "MAJOR:MINOR the IO limits apply to"),
)


class CgroupLayout(typing.NamedTuple):
    """Where each controller lives on this host: a v1 hierarchy or the unified (v2) tree."""
    unified: str = ""        # cgroup2 mount point, if any
    v1: dict = {}            # controller -> v1 mount point (never mutated)
    v2: tuple = ()           # controllers the unified root offers
    v2_base: str = ""        # the cgroup, under unified, whose subtree the server may write

    @classmethod
    def from_mountinfo(cls, mountinfo, read=read_file):
        """Parse /proc/self/mountinfo text. Controllers mounted as v1 win over v2."""
        unified, v1 = "", {}
        for line in mountinfo.splitlines():
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) < 5 or len(rfields) < 3:
                continue
            mount_point, fstype, options = (mountinfo_path(fields[4]), rfields[0],
                                            rfields[2].split(","))
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
        """Controllers a job needs that this host offers in neither version (IO limits are
        optional: without blkio/io, requests for them are refused, jobs still run)."""
        need = {"cpu": "cpu", "memory": "memory", "pids": "pids"}
        return [ctl for ctl, v2 in need.items() if ctl not in self.v1 and v2 not in self.v2]

    def has_io(self):
        return "blkio" in self.v1 or "io" in self.v2

    def to_dict(self):
        return {"unified": self.unified, "v1": self.v1, "v2": list(self.v2),
                "v2_base": self.v2_base}

    @classmethod
    def from_dict(cls, d):
        return cls(unified=d["unified"], v1=dict(d["v1"]), v2=tuple(d["v2"]),
                   v2_base=d.get("v2_base", ""))


# Where jobs go in the unified tree. cgroup v2 has two rules that decide it:
# - no internal processes: a cgroup that enables controllers for its children
#   (cgroup.subtree_control) may hold no process itself (the root cgroup is exempt);
# - systemd's single writer: under systemd, a service writes only below the cgroup it was
#   delegated (Delegate=yes, marked with the xattr trusted.delegate); containers get theirs
#   through a cgroup namespace whose root is the container's cgroup.
# So a server in a delegated cgroup C moves every process of C into C/supervisor (the
# supervisors of jobs it starts are born there too), then enables controllers in C and
# makes jobs under C/jobs. A server in the true root cgroup (a host without systemd) keeps
# the old layout, /steve-jobs under the root.

SUPERVISOR_LEAF = "supervisor"
DELEGATED_JOBS_ROOT = "jobs"


class CgroupPlacement(typing.NamedTuple):
    """Where the server keeps its processes and its jobs, and why (said in its first log lines)."""
    layout: CgroupLayout     # with v2_base set
    root: str                # the jobs' folder, relative to v2_base (and to each v1 mount)
    supervisor: str          # folder to move the server's cgroup's processes into, or ""
    why: str


def own_cgroup(proc_self_cgroup):
    """The unified-tree path of this process, from /proc/self/cgroup text ('' if none)."""
    for line in proc_self_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip()
    return ""


def is_delegated(path):
    """True if systemd delegated this cgroup folder (Delegate=yes sets the xattr, v251+)."""
    for name in ("trusted.delegate", "user.delegate"):
        try:
            if os.getxattr(path, name) == b"1":
                return True
        except OSError:
            pass
    return False


def place_jobs(layout, cgroup_root, own, is_true_root, delegated):
    """Decide where jobs go (pure: the caller reads the host).

    cgroup_root: '' (automatic), a name (under the chosen cgroup), or '/a/path' (exactly
    there, from the top of every hierarchy; the server is not moved). own: this process's
    unified path ('/' or '/x/y'). is_true_root(rel) / delegated(rel): tests on unified/rel.
    """
    name = cgroup_root.strip("/")
    at_root = name or DEFAULT_CGROUP_ROOT
    if not layout.unified or cgroup_root.startswith("/"):
        why = (f"--cgroup-root {cgroup_root}: jobs there in every hierarchy"
               if cgroup_root.startswith("/") else "cgroup v1 only: jobs under each controller's root")
        return CgroupPlacement(layout, at_root, "", why)
    mine = own.rstrip("/")
    if mine.endswith("/" + SUPERVISOR_LEAF):      # placed there by an earlier start or systemd
        mine = mine[:-len(SUPERVISOR_LEAF) - 1]
    mine = mine.strip("/")
    where = os.path.join(layout.unified, mine)
    if not mine and is_true_root(""):
        return CgroupPlacement(layout, at_root, "",
                               f"the server runs in the root cgroup (no systemd, no container): "
                               f"jobs in {os.path.join(where, at_root)}")
    if not mine:
        why = (f"the server's cgroup is the root of a cgroup namespace, not the host's root "
               f"(a container): it keeps to {where}")
    elif delegated(mine):
        why = f"systemd delegated {where} to the server (Delegate=yes): it keeps to that subtree"
    else:
        return CgroupPlacement(
            layout, at_root, "",
            f"the server's cgroup {where} is not delegated to it (run it from a unit with "
            f"Delegate=yes): jobs under the root instead, in {os.path.join(layout.unified, at_root)}")
    root = name or DELEGATED_JOBS_ROOT
    supervisor = os.path.join(where, SUPERVISOR_LEAF)
    return CgroupPlacement(layout._replace(v2_base=mine), root, supervisor,
                           f"{why}; server in {supervisor}, jobs in {os.path.join(where, root)}")


def detect_placement(layout, cgroup_root):
    """place_jobs for this process on this host, with the v2 controllers its cgroup offers."""
    def is_true_root(rel):   # the root cgroup has no cgroup.type; a namespace's root has one
        return not os.path.exists(os.path.join(layout.unified, rel, "cgroup.type"))
    placement = place_jobs(layout, cgroup_root, own_cgroup(read_file("/proc/self/cgroup", "")),
                           is_true_root,
                           lambda rel: is_delegated(os.path.join(layout.unified, rel)))
    base = placement.layout
    if base.v2_base:   # a delegated cgroup may be offered fewer controllers than the root
        offered = read_file(os.path.join(base.unified, base.v2_base, "cgroup.controllers"), "")
        placement = placement._replace(layout=base._replace(
            v2=tuple(c for c in base.v2 if c in offered.split())))
    return placement


def move_into_leaf(cgroup, leaf, tries=100):
    """Move every process of cgroup (the server's, and any other the delegation gave it)
    into cgroup/leaf, so that cgroup may enable controllers. Returns how many were moved.

    Raises OSError (not permitted, no such cgroup...)."""
    os.makedirs(leaf, exist_ok=True)
    moved = 0
    for _ in range(tries):    # bounded: a process forking there as fast as we move is a bug
        pids = read_file(os.path.join(cgroup, "cgroup.procs"), "").split()
        if not pids:
            return moved
        for pid in pids:
            try:
                write_file(os.path.join(leaf, "cgroup.procs"), pid)
                moved += 1
            except ProcessLookupError:
                pass
    raise OSError(errno.EBUSY, f"{cgroup} keeps getting new processes")


def enable_v2_controllers(layout, root):
    """v2: controllers must be enabled in every ancestor's subtree_control, from the base
    down to the jobs' root (never above the base: that is not ours to write)."""
    if not layout.v2:
        return
    parent = os.path.join(layout.unified, layout.v2_base)
    for part in [""] + root.strip("/").split("/"):
        parent = os.path.join(parent, part) if part else parent
        path = os.path.join(parent, "cgroup.subtree_control")
        enabled = read_file(path, "").split()
        missing = [c for c in layout.v2 if c not in enabled]
        if missing:
            write_file(path, " ".join("+" + c for c in missing))


class JobCgroup:
    """One job's cgroup: a folder in each hierarchy that has a controller we use.

    v1 and v2 are two small parallel paths: each limit is one (file, value) pair per version.
    All methods raise OSError for cgroupfs failures.
    """

    def __init__(self, layout, root, name):
        self.layout, self.root, self.name = layout, root, name
        self.v1_dirs = {ctl: os.path.join(mnt, root, name) for ctl, mnt in layout.v1.items()}
        self.sampled_peak = 0   # max memory.current seen, where the kernel has no memory.peak
        self.v2_dir = (os.path.join(layout.unified, layout.v2_base, root, name)
                       if layout.unified else "")

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

    def limit_writes(self, limits, already=None):
        """The (path, value) writes that apply limits, in order, to a cgroup that has the
        limits already (None: a new one, every limit at its widest)."""
        writes = []
        for spec in LIMITS:
            version, folder = self._dir(spec.controller)
            if spec.writes and version:
                writes += spec.writes(version, folder, limits, already)
        return writes

    def create(self):
        """Make the folders (no limits yet). On failure removes what it made and raises."""
        try:
            for d in self.dirs():
                os.makedirs(os.path.dirname(d), exist_ok=True)
                os.mkdir(d)
            if self.v2_dir:
                enable_v2_controllers(self.layout, self.root)
        except OSError:
            self.remove(timeout=0)
            raise

    def apply(self, limits, already=None):
        """Write the limits (cheap, unlike moving a process in: they can come later).

        already: limits applied before; only what differs from them is written.
        """
        done = set(self.limit_writes(already)) if already else set()
        for path, value in self.limit_writes(limits, already):
            if (path, value) in done:
                continue
            if path.endswith(("memsw.limit_in_bytes", "swap.max")) and not os.path.exists(path):
                continue   # no swap accounting on this kernel: no swap to bypass with
            write_file(path, value)

    def join(self, pid=0):
        """Move process pid into every folder (0, the default: the calling process)."""
        for d in self.dirs():
            write_file(os.path.join(d, "cgroup.procs"), str(pid))

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

    def frozen(self):
        """True if the job's cgroup is frozen (or freezing)."""
        path, frozen, _ = self._freezer()
        return read_file(path, "").strip() in (frozen, "FREEZING")

    def thaw(self):
        path, _, thawed = self._freezer()
        write_file(path, thawed)

    def kill(self):
        """SIGKILL every process in the cgroup, including ones that forked meanwhile."""
        if self.v2_dir and os.path.exists(os.path.join(self.v2_dir, "cgroup.kill")):
            write_file(os.path.join(self.v2_dir, "cgroup.kill"), "1")
        else:
            self.kill_by_signals()

    def kill_by_signals(self):
        """kill() for v1 and v2 kernels before 5.14 (no cgroup.kill)."""
        # Frozen first, so nothing can fork between reading the list and killing it.
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
        """{cpu_seconds, memory_bytes, peak_memory_bytes, oom_kills, pids, io_read_bytes,
        io_write_bytes} from the cgroup files."""
        out = {"cpu_seconds": 0.0, "memory_bytes": 0, "peak_memory_bytes": 0, "oom_kills": 0}
        out.update(self.live_usage())
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
            peak = read_file(f"{d}/memory.peak", "")     # kernel 5.19+
            out["peak_memory_bytes"] = (int(peak) if peak.strip() else
                                        max(out["memory_bytes"], self.sampled_peak))
            out["oom_kills"] = _keyed(read_file(f"{d}/memory.events", "")).get("oom_kill", 0)
        return out

    def live_usage(self):
        """{pids (now), io_read_bytes, io_write_bytes (so far, every device)}."""
        out = {"pids": 0, "io_read_bytes": 0, "io_write_bytes": 0}
        version, d = self._dir("pids")
        if version:
            out["pids"] = int(read_file(f"{d}/pids.current", "0").strip() or 0)
        version, d = self._dir("blkio")
        if version == 1:   # "MAJ:MIN Read N" lines (and a Total)
            for line in read_file(f"{d}/blkio.throttle.io_service_bytes", "").splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[1] in ("Read", "Write") and parts[2].isdigit():
                    out[f"io_{parts[1].lower()}_bytes"] += int(parts[2])
        elif version == 2:   # "MAJ:MIN rbytes=N wbytes=N ..." lines
            for line in read_file(f"{d}/io.stat", "").splitlines():
                fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
                out["io_read_bytes"] += int(fields.get("rbytes", 0))
                out["io_write_bytes"] += int(fields.get("wbytes", 0))
        return out

    def needs_peak_sampling(self):
        version, d = self._dir("memory")
        return version == 2 and not os.path.exists(f"{d}/memory.peak")

    def sample_peak_memory(self, stopped, interval=PEAK_SAMPLE_INTERVAL):
        """Keep sampled_peak up to date until the stopped event is set (run in a thread)."""
        _, d = self._dir("memory")
        while not stopped.wait(interval):
            current = int(read_file(f"{d}/memory.current", "0") or 0)
            self.sampled_peak = max(self.sampled_peak, current)

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
        for folder in JobCgroup.roots(layout, root):
            try:
                ids.update(e.name for e in os.scandir(folder) if e.is_dir())
            except FileNotFoundError:
                pass
        return ids

    @staticmethod
    def roots(layout, root):
        """The jobs' root folder in every hierarchy."""
        v2 = [os.path.join(layout.unified, layout.v2_base, root)] if layout.unified else []
        return list(dict.fromkeys([os.path.join(m, root) for m in layout.v1.values()] + v2))

    @staticmethod
    def remove_root(layout, root):
        """Remove the (empty) root folders; a root still holding jobs stays."""
        for folder in JobCgroup.roots(layout, root):
            try:
                os.rmdir(folder)
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


def take_placement(placement):
    """Move the server into placement's supervisor leaf, make the jobs' root, enable the
    controllers; log why. Raises UnavailableError with what to change when the cgroup tree
    refuses (and leaves no folder of its own)."""
    log.info("cgroups: %s", placement.why)
    layout, root = placement.layout, placement.root
    step = "cannot move the server's cgroup's processes into " + placement.supervisor
    try:
        if placement.supervisor:
            moved = move_into_leaf(os.path.dirname(placement.supervisor), placement.supervisor)
            if moved > 1:
                log.info("cgroups: moved %d processes (the server and %d more) into %s",
                         moved, moved - 1, placement.supervisor)
        step = "cannot make the jobs' cgroup"
        for folder in JobCgroup.roots(layout, root):
            os.makedirs(folder, exist_ok=True)
        step = "cannot enable the cgroup controllers jobs need"
        enable_v2_controllers(layout, root)
    except OSError as e:
        JobCgroup.remove_root(layout, root)   # (only if empty)
        hint = ""
        if e.errno == errno.EBUSY:
            hint = ("; a cgroup v2 folder with controllers for its children may hold no "
                    "process: run the server in a cgroup of its own (Delegate=yes under "
                    "systemd; as the container's main process), or name an empty place "
                    "with --cgroup-root /path")
        elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            hint = ("; the cgroup filesystem must be writable by the server (in a "
                    "container: --cgroupns=private and a read-write /sys/fs/cgroup)")
        raise UnavailableError(f"{step}: {e.strerror or e}{hint}") from None
    for line in kernel_fallbacks(layout, root):
        log.info("cgroups: %s", line)


def kernel_fallbacks(layout, root):
    """What this kernel lacks, and what the engine does instead (lines for the log)."""
    if not layout.unified:
        return []
    probe = JobCgroup.roots(layout, root)[-1]
    lines = []
    if not os.path.exists(os.path.join(probe, "cgroup.kill")):
        lines.append("no cgroup.kill (kernel < 5.14): jobs are killed by freezing them "
                     "and signalling every process")
    if "memory" in layout.v2 and not os.path.exists(os.path.join(probe, "memory.peak")):
        lines.append("no memory.peak (kernel < 5.19): peak memory is sampled every "
                     f"{PEAK_SAMPLE_INTERVAL:g} s")
    if not layout.has_io():
        lines.append("no io controller offered to the server: requests for IO limits "
                     "are refused (FAILED_PRECONDITION)")
    return lines


def hand_back_controllers(placement):
    """With no job left, disable the controllers we enabled in our delegated cgroup: a
    systemd older than 254 must put the next server's process there, which v2 refuses
    while they are enabled. (With jobs left they stay: see the README.)"""
    base = os.path.join(placement.layout.unified, placement.layout.v2_base)
    enabled = read_file(os.path.join(base, "cgroup.subtree_control"), "").split()
    if not enabled or [e for e in os.scandir(base) if e.is_dir() and
                       e.path != placement.supervisor]:
        return
    with contextlib.suppress(OSError):
        write_file(os.path.join(base, "cgroup.subtree_control"),
                   " ".join("-" + c for c in enabled))


def check_whole_disk(device):
    """Raise InvalidArgumentError unless "MAJOR:MINOR" is a whole disk of this host (the
    kernel takes IO limits for disks only, and would fail the job's start instead)."""
    sysfs = f"/sys/dev/block/{device}"
    if not os.path.exists(sysfs):
        raise InvalidArgumentError(f"io_device {device} is no block device of this host "
                                   f"(see lsblk -d -o NAME,MAJ:MIN)", field="limits.io_device",
                                   reason="NO_SUCH_DEVICE")
    if os.path.exists(f"{sysfs}/partition"):
        disk = read_file(os.path.join(os.path.realpath(sysfs), "..", "dev"), "?").strip()
        raise InvalidArgumentError(f"io_device {device} is a partition: IO limits take its "
                                   f"disk, {disk}", field="limits.io_device",
                                   reason="NO_SUCH_DEVICE")


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
#   spawner --unshare(PID), fork--> shim (the job's supervisor and pid 1 of its pid
#                                         namespace, outside its cgroup; outlives the server)
#                                    --fork--> command (pid 2: enters the job's other
#                                              namespaces and cgroup, drops privileges, execs)
#
# The shim is the job's init, as tini would be: one Python process a job, not two (each
# holds a megabyte or more of private pages, for as long as the job runs). As pid 1 it
# reaps the orphans the namespace's processes leave, and when the command ends it kills
# what the command left, as the kernel does when an init exits; should the shim die, the
# kernel kills the whole namespace and reaps it. It stays in the host's mount namespace
# (it writes the job's folder and cgroup), which the job cannot reach through it: it is
# root and not dumpable, and a --root job has no CAP_SYS_PTRACE (become_job_user). Its
# getpid() is 1: host pids come from own_host_pid, host_pid_of.
#
# Moving a process into a cgroup costs the kernel an RCU grace period (10-20 ms when the
# host is idle), more than everything else in a start. So the spawner keeps one shim warm:
# its cgroup made, its command already in it and in its namespaces, blocked reading its
# request. A start then only writes limits and sends the
# request down; the next warm shim gets ready while the job runs. Cgroups are therefore
# named by the shim ("j-" + random), not by job id: cgroup v2 cannot rename a folder.
#
# The shim copies the job's output into its file, reaps the command, removes the cgroup and
# writes the job's result. Everything the server needs later is in files, so a job does
# not depend on the server process.

# The output index: one record wherever the stream changes, and every INDEX_GRANULE while
# output flows: from output offset on, the bytes came from stream, written at time.
OUTPUT_INDEX_FILE = "output.idx"
INDEX_RECORD = struct.Struct("<QdB7x")   # offset, time (seconds since the epoch), stream
INDEX_GRANULE = 0.01                     # seconds: the precision of output timestamps
# A round of the supervisor's that moves less output than OUTPUT_TRICKLE (and no input) is
# a trickle: past a burst of TRICKLE_BURST of them, they come at most TRICKLE_RATE a
# second. A job's output that comes without pause a few bytes at a time then costs us
# a bounded share of a core, and the merged order of stdout and stderr is kept to within
# 1 / TRICKLE_RATE; a program's usual bursts move at once, in the order they come.
OUTPUT_TRICKLE, TRICKLE_BURST, TRICKLE_RATE = 16 * KiB, 100, 500
# Index records one read takes in at most (96 KiB, about a ms of work on the event loop): a
# job alternating 1-byte writes to its streams has a record a byte.
RECORDS_PER_READ = 4096
STDOUT, STDERR = 1, 2                    # as in the API's Stream
RESULT_FILE, SPEC_FILE, OUTPUT_FILE, STOP_FILE, TIMED_OUT_FILE = (
    "result.json", "job.json", "output", "stop_requested", "timed_out")
MAX_TIMEOUT = 366 * 86400        # a start's timeout, at most
REMOVE_GRACE = 10.0 * TIME_SCALE  # seconds a run --rm job is kept after its end, at least
# The queue (run --queue, --after): its journal in the state folder, a line a change
# (JobQueue), rewritten whole at each server start and once dead lines outnumber live ones.
QUEUE_FILE = "queue.jsonl"
MAX_PRIORITY = 1000               # run --priority: -1000..1000, admins only; 0 by default
MAX_AFTER = 64                    # run --after: dependencies of one job, at most
DEPENDENCY_KINDS = ("ok", "any")  # --after ID:ok waits for exit 0, ID:any for any end
QUEUE_WAITS_FOR = ("TOO_MANY_JOBS", "TOO_MANY_JOBS_OF_USER")   # what a queued start waits out
QUEUE_SAFETY_NET = 1.0            # s: the dispatcher looks at the queue at least this often
MAX_QUEUED_BYTES_PER_USER = 64 * MiB   # of queued jobs' records (argv, env) one user holds
# Queued jobs being started at once, at most. On 2 cores, 2 or 4 made each start slower
# (50 slots freed together, 250 starts: exec p50 20-74 ms against 8-14 ms) and the last
# of a burst no sooner: starts are CPU-bound here. A bigger host may gain from more.
DISPATCH_WORKERS = 1
# The job's input: its supervisor listens on this socket in the job's folder (root only)
# while the job runs, one connection at a time, and writes what comes to the job's stdin
# (a pipe) or its terminal. Messages (SOCK_SEQPACKET), by their first byte:
INPUT_SOCKET = "input.sock"
INPUT_DATA, INPUT_SIZE, INPUT_REDRAW, INPUT_EOF = b"d", b"s", b"r", b"e"
INPUT_SIZE_FORMAT = struct.Struct("HH")   # rows, columns
INPUT_PIECE = 128 * KiB                   # the most data one message carries
INPUT_MESSAGE = 1 * MiB                   # the most the CLI puts in one InputMessage
INPUT_CONNECT_TIMEOUT = 5.0 * TIME_SCALE  # seconds a supervisor gets to take a writer
SESSIONS_FILE = "sessions"                # JSON lines: who wrote or watched, when
SESSIONS_DROPPED_FILE = "sessions.dropped"   # JSON: how many events found no room
MAX_SESSIONS_BYTES = 1 * MiB              # past this, sessions are logged, not kept
WATCH_SESSIONS_BYTES = 768 * KiB          # watches stop here: the rest is for writers
WATCH_WINDOW = 60.0                       # s: one user's watches of a job within it: one
TIOCSIG = 0x40045436                      # pty master: signal the foreground group


class SpawnRequest(typing.NamedTuple):
    """One start, from the server to the job's shim and on to its command, as JSON: the job's
    record and what the record does not say. Facts the record holds are read from it."""
    spec: dict            # the job's record (SPEC_FILE): id, argv, uid, workdir, limits, options
    job_dir: str          # the job's folder: its records and output
    env: dict             # the command's whole environment (the record's, PATH, HOME, LANG...)
    workdir_size: int     # bytes of the private tmpfs working folder; 0: a folder on disk
    output_cap: int       # bytes of output and index kept

    def to_json(self):
        return json.dumps(self._asdict(), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, msg):
        """Raises ValueError (not JSON) or TypeError (not a request's fields)."""
        return cls(**json.loads(msg))

    job_id = property(lambda self: self.spec["id"])
    argv = property(lambda self: self.spec["argv"])
    uid = property(lambda self: self.spec["uid"])
    workdir = property(lambda self: self.spec["workdir"])
    limits = property(lambda self: Limits(**self.spec["limits"]))
    own_workdir = property(lambda self: not self.spec["options"]["workdir"])   # none named
    host_network = property(lambda self: self.spec["options"]["host_network"])
    egress = property(lambda self: self.spec["options"].get("egress", False))
    rw_host = property(lambda self: self.spec["options"]["rw_host"])
    stdin = property(lambda self: self.spec["options"]["stdin"])
    terminal = property(lambda self: self.spec["options"]["terminal"])   # [rows, columns]


class MountTemplate:
    """The host's mounts less the jobs' working folders, in a mount namespace of their own
    held by an fd: each job's mount namespace is copied from it, not from the host's.

    Why: a new mount namespace is a copy of its parent's, and the host's has a mount for
    every running job's working folder. Copied and detached again at every start, with
    2,000 jobs running that took 9.4 ms a fork (3.3 ms from the template; 2.3 ms beside 20
    mounts), under the kernel's namespace lock that the server's mounts of the next
    folders wait for. The copy is a slave of the host's mounts (what the host shares later
    shows in it); it is made anew when MOUNT_TEMPLATE_AGE old, so on a host whose mounts are
    private a new mount shows in the jobs started a second later at most (a warm shim's
    view is as old as the shim anyway); and it is let go when the spawner is idle, so that
    it pins no filesystem the host has unmounted.
    Single-threaded callers only (setns of a mount namespace)."""

    def __init__(self, work):
        self.work = work         # settings["work"]: the jobs' working folders
        self.fd, self.made = None, 0.0
        self.failed = False      # once: it would fail again at every start

    def current(self):
        """An fd on a template at most MOUNT_TEMPLATE_AGE old (the caller must not close it),
        or None if none can be made (the caller copies the host's mounts, as before).
        Never raises: a failure to come back to the host's mounts ends the process."""
        if self.fd is not None and time.monotonic() - self.made < MOUNT_TEMPLATE_AGE:
            return self.fd
        self.release()
        if not self.failed:
            try:
                self.fd, self.made = self._make(), time.monotonic()
            except OSError as e:
                self.failed = True
                log.warning("jobs copy the host's mounts: cannot make a template of them: %s",
                            e)
        return self.fd

    def idle_for(self):
        """Seconds until the template should be let go; None if there is none."""
        if self.fd is None:
            return None
        return max(0.0, self.made + MOUNT_TEMPLATE_AGE - time.monotonic())

    def release(self):
        """Close our fd on the template (shims forked meanwhile hold their own)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _make(self):
        """In a mount namespace of our own for a moment: make it, return an fd on it, come
        back. Raises OSError if it could not be made."""
        host = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            unshare(CLONE_NEWNS)
            try:
                mount(None, "/", None, MS_REC | MS_SLAVE)   # nothing of ours goes back
                detach_jobs_folders(self.work)
                return os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            finally:
                try:
                    setns(host, CLONE_NEWNS)
                    os.fchdir(cwd)
                except OSError:
                    # Left in the template, our shims would not see the jobs' folders.
                    log.exception("cannot come back to the host's mounts")
                    os._exit(1)   # the server starts a new spawner
        finally:
            os.close(host)
            os.close(cwd)


def spawner_main(sock_fd, settings):
    """Keep warm shims on offer to the server, until it hangs up. Returns the exit code.

    To the server it sends {"warm": pid} with the shim's socket: the server hands a job
    straight to it, then says {"used": 1, "egress": bool} so another is made (with an egress
    network made ready if one of the last EGRESS_MEMORY starts asked for one). A request
    that comes with a reply pipe (the server had no warm shim at hand) gets a shim made on
    the spot.
    settings: {"layout": CgroupLayout.to_dict(), "cgroup_root": str, "mark": cgroup_mark(),
               "limits": the server's default Limits as a dict, "warm": int (optional),
               "egress": the server's egress settings (helper, gid, dns, uid_base, table,
               nft, spare_logs), or None if it offers none, ...}.
    """
    # In ps, not its boot code and settings (each shim forked from it names itself too).
    set_process_title(b"steve-jobs spawner")
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is for the server to handle
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)    # the kernel reaps exited shims
    if settings.get("open_files"):
        set_open_files_limit(settings["open_files"])  # jobs get the host's usual limit
    sock = socket.socket(fileno=sock_fd)
    offered = 0
    wanted_egress = [False] * EGRESS_MEMORY   # what the last starts asked for
    template = MountTemplate(settings.get("work"))
    # Once, here: each shim inherits the offer with the mappings (the pages it copies lie
    # in them), where its own call would cost it 0.5 MiB of copies (measured).
    advise_page_merging()
    while True:
        # Refill in a quiet moment: a fork right after a start would compete for the CPU
        # with the job being started (and with the server waiting for its reply).
        if offered < settings.get("warm", WARM_SHIMS):
            if not wait_readable(sock, REFILL_DELAY if offered else 0):
                shim = WarmShim({**settings, "egress_warm": any(wanted_egress),
                                 "mount_template": template.current()}, sock)
                try:
                    socket.send_fds(sock, [json.dumps({"warm": shim.pid}).encode()],
                                    [shim.sock.fileno()])
                    offered += 1
                except OSError:
                    pass   # the server is gone: the recv below sees it
                shim.sock.close()   # the server holds it now; no job comes: it cleans up
                continue
        elif (idle := template.idle_for()) is not None and not wait_readable(sock, idle):
            template.release()
            continue
        try:
            msg, fds = recv_with_fds(sock, MAX_REQUEST_BYTES)
        except InterruptedError:
            continue
        except OSError:
            return 0   # the server is gone (a crash resets the socket): quietly, too
        if not msg:
            return 0
        try:
            req = json.loads(msg)
        except ValueError:
            req = {}
        if req.get("used"):
            offered -= 1
            wanted_egress = wanted_egress[1:] + [bool(req.get("egress"))]
        elif req.get("copy") and len(fds) == 1:
            fork_helper(copier_main, req["copy"], fds[0], sock)
        elif req.get("exec") and len(fds) == 1:
            fork_helper(exec_main, req["exec"], fds[0], sock)
        elif len(fds) == 1:
            # A job that must see the host writable cannot use a warm shim (its view was
            # made read-only before any job came): it gets one made for it.
            try:
                rw_host = SpawnRequest(**req).rw_host
            except (TypeError, KeyError):
                rw_host = False   # not a request: the shim says so to the server
            own = {**settings, "rw_host": rw_host, "mount_template": template.current()}
            if not WarmShim(own, sock).hand_over(msg, fds[0]):
                _reply(fds[0], ok=False, error="the job's supervisor could not start")
        for fd in fds:
            os.close(fd)


def fork_helper(main, request, fd, spawner_sock):
    """Fork a helper (copier_main, exec_main) speaking on fd; the kernel reaps it (SIGCHLD
    ignored)."""
    if os.fork() == 0:
        spawner_sock.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        main(request, socket.socket(fileno=os.dup(fd)))


def _read_reply(fd, deadline):
    """One JSON reply from fd, read until it parses (not until EOF: copies of the pipe's
    write end may outlive the answer). Raises UnavailableError on EOF or at the deadline."""
    data = b""
    while True:
        if not wait_readable(fd, deadline - time.monotonic()):
            raise UnavailableError("the spawner did not answer in time")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise UnavailableError("the spawner or the job's supervisor exited")
        data += chunk
        try:
            return json.loads(data)
        except ValueError:
            continue   # a partial answer: read on


# The spawner's Python: this file loaded as a module, not run as a script. CPython keeps a
# script's parse tree until the script returns, and the spawner's never does: 25 MB (of a
# 43 MB spawner) in it and in every fork of it, each job's shim and command, whose forks,
# execs and exits then cost their page tables' size (measured: a third of a start's system
# time went to fork, exec and exit; the shims' RSS fell from 41 to 12 MB). Like any import
# it reads a cached compilation if one is current, and writes one only where the server's
# own imports would (-I ignores PYTHONDONTWRITEBYTECODE and PYTHONPYCACHEPREFIX: argv[2],
# spawner_cache_setting(), carries them).
SPAWNER_BOOT = ("import sys, types, importlib.machinery as m; "
                "cache = sys.argv[2]; "
                "sys.dont_write_bytecode = cache == 'no-cache'; "
                "sys.pycache_prefix = cache.startswith('cache:') and cache[6:] or None; "
                "mod = sys.modules['steve_jobs'] = types.ModuleType('steve_jobs'); "
                "mod.__file__ = sys.argv[1]; "
                "m.SourceFileLoader('steve_jobs', sys.argv[1]).exec_module(mod); "
                "sys.exit(mod.main(sys.argv[3:]))")


def spawner_cache_setting():
    """SPAWNER_BOOT's argv[2]: "no-cache", or "cache:" and where caches go ("" beside
    the source), as this interpreter's settings say."""
    if sys.dont_write_bytecode:
        return "no-cache"
    return "cache:" + (sys.pycache_prefix or "")


class Spawner:
    """The server's handle on the spawner process and the warm shims it offers: the other
    end of spawner_main's protocol, used by the engine in the threaded server (where
    nothing forks: Popen execs the spawner).

    A start goes straight to a warm shim (one hop, not two); each request carries its own
    reply pipe (SCM_RIGHTS), so the thread that asks reads the answer itself.
    """

    def __init__(self):
        self._settings = None        # spawner_main's settings: start() sends them
        self._sock = None
        self._proc = None
        self._warm = []              # (pid, socket) of warm shims on offer, oldest first
        self._lock = threading.Lock()

    def start(self, settings):
        """Exec the spawner helper. Raises UnavailableError if it cannot run."""
        import subprocess   # Popen forks and execs in C: safe in a threaded process
        self._settings = settings
        ours, theirs = seqpacket_pair()
        try:
            # -I -S: no site-packages, no environment: a small process forks faster.
            # None of the server's environment (its secrets): each shim inherits it, and
            # is its job's pid 1, whose /proc/1/environ a --root job may read.
            env = {"PATH": JOB_PATH, **{k: v for k, v in os.environ.items()
                                         if k == "STEVE_JOBS_TIME_SCALE"}}
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", SPAWNER_BOOT, os.path.abspath(__file__),
                 spawner_cache_setting(), "_spawner",
                 str(theirs.fileno()), json.dumps(settings)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, start_new_session=True,
                env=env)
        except OSError as e:
            ours.close()
            raise UnavailableError(f"cannot start the spawner: {e}") from None
        finally:
            theirs.close()
        self._sock = ours

    def _collect_offers(self):
        """Take the warm shims the spawner has offered since (call with the lock held)."""
        while True:
            try:
                msg, fds = recv_with_fds(self._sock, 4096, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return   # the spawner is gone; sending will say so
            if not msg:
                return
            offer = json.loads(msg)
            if fds:
                self._warm.append((offer["warm"], socket.socket(fileno=fds[0])))

    def spawn(self, request, timeout=SPAWN_TIMEOUT):
        """Send one SpawnRequest and wait (bounded) for its reply dict.

        Raises InvalidArgumentError if the request is too large, UnavailableError if the
        spawner is gone or does not answer in time.
        """
        msg = request.to_json()
        if len(msg) > MAX_REQUEST_BYTES:
            raise InvalidArgumentError("the command and its environment are too large")
        reply_r, reply_w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                self._send(msg, reply_w, warm_ok=not request.rw_host, egress=request.egress)
            finally:
                os.close(reply_w)   # now only the shim holds it
            return _read_reply(reply_r, time.monotonic() + timeout)
        finally:
            os.close(reply_r)

    def _send(self, msg, reply_w, warm_ok=True, egress=False):
        with self._lock:
            self._collect_offers()
            warm = self._warm.pop(0) if self._warm and warm_ok else None
        if warm is not None:
            _, shim_sock = warm
            try:
                socket.send_fds(shim_sock, [msg], [reply_w])
                sent = True
            except OSError:
                sent = False   # it died while on offer
            finally:
                shim_sock.close()
            try:
                # So that the spawner makes the next one, egress ready if starts want it.
                self._sock.send(json.dumps({"used": 1, "egress": egress}).encode())
            except OSError:
                pass
            if sent:
                return
        try:   # no warm shim at hand: the spawner makes one on the spot
            socket.send_fds(self._sock, [msg], [reply_w])
        except OSError as e:
            if not self._restart_if_dead():
                raise UnavailableError(f"the spawner is gone: {e}") from None
            try:
                socket.send_fds(self._sock, [msg], [reply_w])
            except OSError as e2:
                raise UnavailableError(f"the spawner is gone: {e2}") from None

    def run_helper(self, kind, request):
        """A socket to a new helper of kind "copy" (copier_main) or "exec" (exec_main) for
        request. Raises UnavailableError."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        msg = json.dumps({kind: request}).encode()
        try:
            try:
                socket.send_fds(self._sock, [msg], [theirs.fileno()])
            except OSError:
                if not self._restart_if_dead():
                    raise
                socket.send_fds(self._sock, [msg], [theirs.fileno()])
        except OSError as e:
            ours.close()
            raise UnavailableError(f"the spawner is gone: {e}") from None
        finally:
            theirs.close()
        return ours

    def _restart_if_dead(self):
        """Start a new spawner if ours has died (jobs it started are not affected).
        Returns True if there is a new one."""
        with self._lock:
            if self._proc is None or self._proc.poll() is None:
                return False
            log.error("the spawner died (exit status %s); starting a new one",
                      self._proc.returncode)
            self._sock.close()
            self.start(self._settings)
            return True

    def close(self):
        """Hang up on the spawner and on every warm shim; wait (bounded) until they have
        cleaned up."""
        pidfds = []
        if self._sock:
            self._sock.shutdown(socket.SHUT_WR)   # the spawner reads EOF and exits
        if self._proc:
            try:
                self._proc.wait(timeout=KILL_TIMEOUT + 5)
            except Exception:
                self._proc.kill()
                self._proc.wait(timeout=5)
            self._proc = None
        if self._sock:
            with self._lock:
                self._collect_offers()   # offers still in flight
                warm, self._warm = self._warm, []
            for pid, shim_sock in warm:
                try:
                    pidfds.append(os.pidfd_open(pid))
                except OSError:
                    pass   # already gone
                shim_sock.close()          # no job will come: it cleans up and exits
            self._sock.close()
            self._sock = None
        deadline = time.monotonic() + KILL_TIMEOUT
        for pidfd in pidfds:
            wait_readable(pidfd, deadline - time.monotonic())
            os.close(pidfd)


def recv_with_fds(sock, bufsize, flags=0):
    """One message and the fds passed with it (close-on-exec); socket.recv_fds ignores its
    flags argument in Python 3.11. Returns (bytes, [fd, ...])."""
    import array
    fds = array.array("i")
    msg, ancdata, _, _ = sock.recvmsg(bufsize, socket.CMSG_LEN(4 * fds.itemsize),
                                      flags | socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return msg, list(fds)


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
    """A forked shim, ready for the next job; .sock brings it its job."""

    def __init__(self, settings, spawner_sock):
        self.sock, theirs = seqpacket_pair()
        # What the spawner holds now is what every shim shares with it: out of the
        # collector's reach, a collection in a shim does not write to (and so copy) the
        # pages of the objects it inherited.
        gc.freeze()
        host_pids = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        unshare(CLONE_NEWPID)      # the shim is pid 1 of a new pid namespace: the job's
        try:
            self.pid = os.fork()
        except OSError:
            self.pid = None
            raise
        finally:
            if self.pid != 0:      # (the spawner's later children are the host's)
                setns(host_pids, CLONE_NEWPID)
                os.close(host_pids)
        if self.pid == 0:
            code = 1
            try:
                # Nothing of the spawner's may live on in a job's supervisor: not its socket
                # (the server must see EOF when the spawner exits), not another job's reply
                # pipe (its asker would wait for this job to end).
                close_fds_but({theirs.fileno(), settings.get("mount_template")} - {None})
                self.sock.detach()
                spawner_sock.detach()
                code = shim_main(theirs, settings)
            except BaseException:   # a shim must never fall back into the spawner loop
                log.exception("job supervisor failed")
            finally:
                os._exit(code)
        theirs.close()

    def hand_over(self, msg, reply_fd):
        """Give it its job and the job's reply pipe. False if it is gone."""
        try:
            socket.send_fds(self.sock, [msg], [reply_fd])
            return True
        except OSError:
            return False
        finally:
            self.sock.close()


class JobEnds(typing.NamedTuple):
    """The job's ends of the pipes between it and its shim: the command holds them."""
    stdout: int       # the command's stdout and stderr (written; the shim reads them)
    stderr: int
    error: int        # -> shim: why the job did not start (JSON; closed by exec)
    go: int           # shim -> command: the start request (read)
    stdin: int        # the job's stdin, when it asks for one (read)
    tty: int          # command -> shim: its terminal's master goes back by this socket


class ShimEnds(typing.NamedTuple):
    """The shim's ends of the same pipes."""
    stdout: int
    stderr: int
    error: int
    go: int
    stdin: int
    tty: socket.socket


def open_job_pipes():
    """(ShimEnds, JobEnds), all close-on-exec; the output pipes as large as allowed."""
    stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
    stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    tty_ours, tty_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for fd in (stdout_w, stderr_w):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass   # over /proc/sys/fs/pipe-max-size: the default pipe works, in smaller steps
    return (ShimEnds(stdout_r, stderr_r, err_r, go_w, stdin_w, tty_ours),
            JobEnds(stdout_w, stderr_w, err_w, go_r, stdin_r, tty_theirs.detach()))


def shim_main(chan, settings):
    """Supervise one job, from a warm cgroup to its result file, in steps (as tini's main):
    warm up, wait for the job, start it, supervise it, report its end. Returns an exit code.

    chan: the spawner's socket to this shim; it brings the request and its reply pipe.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)    # we wait for our children ourselves
    os.setsid()                                     # no terminal signals from the server's tty
    # The job sees its pid 1: its /proc files only with CAP_SYS_PTRACE (become_job_user),
    # and in ps and /proc/1/cmdline this title (the spawner's command line names the host's
    # paths and the server's settings).
    prctl(PR_SET_DUMPABLE, 0)
    set_process_title(b"steve-init")
    cg, warm_limits, warm_error = warm_up_cgroup(settings)
    ours, theirs = open_job_pipes()
    command = None if warm_error else fork_command(cg, settings, chan, ours, theirs)
    for fd in theirs:
        os.close(fd)
    if settings.get("mount_template") is not None:
        os.close(settings["mount_template"])   # the command's now: we keep no view alive
    me = own_host_pid()
    supervisor = {"shim_pid": me, "shim_start": process_start_time(me)}
    egress = None if warm_error else prepare_warm_egress(settings, cg)
    rehearse_start()
    msg, fds = recv_with_fds(chan, MAX_REQUEST_BYTES)   # wait for a job
    chan.close()
    if not msg or len(fds) != 1:                  # the spawner is gone: no job will come
        if egress:
            egress.discard()
        _discard_warm(cg, command)
        os.close(ours.stdin)
        return 0
    job = ShimJob(SpawnRequest.from_json(msg), fds[0], cg, command, supervisor,
                  settings.get("egress"), egress)
    if warm_error:
        return job.fail(warm_error)
    started = job.start(msg, ours, warm_limits)
    if started is None:
        return 1
    failure, out_fd, index_fd = started
    output = job.supervise(ours, out_fd, index_fd, failure)
    job.report(ours, output, failure)
    return 0


def rehearse_passing_fds():
    """Pass an fd to ourselves over a socket of our own, as share_workdir and
    received_mount do at a start (rehearse_start says why)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        socket.send_fds(ours, [b"w"], [ours.fileno()])
        for fd in recv_with_fds(theirs, 16)[1]:
            os.close(fd)


def rehearse_start():
    """Read a request as a job's, pass an fd over a socket and open a mount's handle, once,
    before any job comes. After fork, the first touch of each object copies its page
    (copy-on-write): paid here, while warm, not by the start (measured: 0.1 ms of a 4.5 ms
    start for the request, 0.25 ms for share_workdir's send)."""
    options = {"workdir": "", "host_network": False, "rw_host": False, "stdin": False,
               "terminal": []}
    request = SpawnRequest(spec={"id": "", "argv": [], "uid": 0, "workdir": "",
                                 "limits": Limits()._asdict(), "options": options},
                           job_dir="", env={}, workdir_size=0, output_cap=0)
    request = SpawnRequest.from_json(request.to_json())
    rehearse_passing_fds()
    handle = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, b"/", os.O_CLOEXEC)   # (not a clone)
    if handle >= 0:
        os.close(handle)
    return request.limits, request.terminal


def warm_up_cgroup(settings):
    """(JobCgroup made with the server's default limits, those Limits, why it failed or "").
    Most jobs then need no write at start."""
    layout = CgroupLayout.from_dict(settings["layout"])
    cg = JobCgroup(layout, settings["cgroup_root"], settings["mark"] + random_hex(6))
    warm_limits = Limits(**settings["limits"])
    try:
        cg.create()
        cg.apply(warm_limits)
    except OSError as e:
        return cg, warm_limits, f"cannot make the job's cgroup: {e.strerror or e}"
    return cg, warm_limits, ""


def fork_command(cg, settings, chan, ours, theirs):
    """Fork the job's command (pid 2): it enters the job's cgroup and namespaces, builds its
    view and waits for its request (command_main), with the job's ends (theirs). Returns
    its JobCommand."""
    pid = os.fork()
    if pid == 0:
        for fd in ours[:-1]:
            os.close(fd)
        ours.tty.close()
        chan.close()
        command_main(cg, settings, theirs)   # never returns
    return JobCommand(pid)


class JobCommand:
    """The job's command: the shim's child, pid 2 of the namespace whose pid 1 the shim is."""

    def __init__(self, pid):
        self.pid = pid                      # (ours: the namespace's)
        self.host_pid = host_pid_of(pid)    # (the server's)
        self.status = None                  # its wait status, once reaped

    def kill(self):
        """SIGKILL it and reap it (a warm command never given a job)."""
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)   # (our unreaped child: no pid reuse)
            self.status = os.waitpid(self.pid, 0)[1]


def kill_the_namespace():
    """As the job's pid 1: SIGKILL every other process of its pid namespace (what the
    command left running), as the kernel does when a namespace's init exits."""
    # kill(-1) signals every process the caller may: in the host's pid namespace, the
    # whole host. Only a namespace's init has pid 1 there, and ours is never the host's.
    if os.getpid() != 1:
        raise RuntimeError("kill_the_namespace outside a job's pid namespace")
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)


class ChildReaper:
    """The job's pid 1 duty: reap each child as it ends (the namespace's orphans are the
    shim's), woken by SIGCHLD through a wakeup fd; a child someone waits for (the command,
    the egress helper) has its wait status handed to on_end[pid]."""

    def __init__(self):
        self.fd, self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.on_end = {}
        signal.set_wakeup_fd(self._wake)
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)   # (wakes, no more)

    def handles(self, fd):
        return fd == self.fd

    def ready(self, _fd=None, _events=None):
        """Reap every child that has ended (never blocks). Returns False once no child is
        left."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 4096)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid in self.on_end:
                self.on_end.pop(pid)(status)

    def reap_all(self, timeout):
        """Reap children until none is left, for at most timeout seconds (the job's last
        processes, just killed: its end is not said before they are gone)."""
        deadline = time.monotonic() + timeout
        while self.ready() and (left := deadline - time.monotonic()) > 0:
            wait_readable(self.fd, left)

    def reap_until(self, pid):
        """Reap children, blocking, until pid has ended (its on_end called)."""
        while pid in self.on_end:
            try:
                child, status = os.waitpid(-1, 0)
            except ChildProcessError:
                return
            if child in self.on_end:
                self.on_end.pop(child)(status)

    def close(self):
        signal.set_wakeup_fd(-1)
        for fd in (self.fd, self._wake):
            os.close(fd)


class ShimJob:
    """The job a shim supervises, from its request to its result file."""

    def __init__(self, req, reply_fd, cg, command, supervisor, egress_settings=None,
                 egress=None):
        self.req, self.reply_fd, self.cg, self.command = req, reply_fd, cg, command
        self.network_lost = None          # how its egress helper had ended, once it has
        self.supervisor = supervisor      # the shim's pid and start time
        self.job_dir, self.spec = req.job_dir, req.spec
        self.started = time.time()
        self.record = None                # the job's record while not yet written
        self.egress_settings = egress_settings   # the server's, if it offers egress
        self.egress = egress              # an EgressNetwork prepared while warm, or None

    def fail(self, message):
        """The job did not start: say why to the server and in the job's files. Returns 1."""
        if self.egress:
            self.egress.discard()
        _discard_warm(self.cg, self.command)
        message = message[:MAX_ERROR_CHARS]
        _reply(self.reply_fd, ok=False, error=message,
               shim={**self.supervisor, "started_at": self.started})
        write_json_until_written(os.path.join(self.job_dir, SPEC_FILE), self.spec)
        write_json_until_written(os.path.join(self.job_dir, RESULT_FILE), {
            "failed": True, "error": message, "exit_code": 126, "started_at": self.started,
            "ended_at": time.time(), "output_bytes": 0})
        return 1

    def start(self, msg, ours, warm_limits):
        """Apply the job's limits, open its output, let its command go on to exec and answer
        the server. Returns (why the command did not exec or "", output fd, index fd), or
        None when the job could not start (fail() has said why)."""
        try:
            self.cg.apply(self.req.limits, already=warm_limits)
        except OSError as e:
            self.fail(f"cannot apply the job's limits: {e.strerror or e}")
            return None
        limits_at = time.time()
        try:   # the server made it, so that a full disk refuses the start, not the job
            out_fd = os.open(os.path.join(self.job_dir, OUTPUT_FILE),
                             os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            index_fd = os.open(os.path.join(self.job_dir, OUTPUT_INDEX_FILE), os.O_WRONLY |
                               os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            self.fail(f"cannot open the job's output file: {e.strerror or e}")
            return None
        try:
            self.start_egress(ours.tty)
        except OSError as e:
            self.fail(f"cannot start the job's egress network: {e.strerror or e}")
            return None
        try:
            self.share_workdir(ours.tty)
        except OSError as e:
            self.fail(f"cannot make the job's working folder: {e.strerror or e}")
            return None
        try:
            _write_all(ours.go, msg)
        except OSError:
            pass   # the command died during warm-up: its error pipe says why
        os.close(ours.go)
        # EOF on the error pipe means the command reached exec (close-on-exec closed the
        # last copy).
        failure = _read_all(ours.error)
        failure = json.loads(failure)["error"][:MAX_ERROR_CHARS] if failure else ""
        shim = {**self.supervisor, "init_pid": self.supervisor["shim_pid"],
                "command_pid": self.command.host_pid, "cgroup": self.cg.name,
                "cgroup_root": self.cg.root, "v2_base": self.cg.layout.v2_base,
                "started_at": self.started, "limits_at": limits_at, "exec_at": time.time(),
                **(self.egress.facts() if self.req.egress else {})}
        _reply(self.reply_fd, ok=True, error=failure, shim=shim)   # first: the caller waits
        os.close(self.reply_fd)
        if self.egress and not self.req.egress:   # (prepared while warm, not wanted)
            self.egress.discard()
            self.egress = None
        elif self.egress and not self.egress_warm:
            # Now, not before the exec: moving a process in costs an RCU grace period.
            try:
                self.cg.join(self.egress.pid)
            except OSError as e:
                log.warning("job %s: its network helper stays outside its cgroup: %s",
                            self.req.job_id, e.strerror or e)
        # The job's record: what the server asked for and where the job lives. Written
        # here, not by the server, so that it exists whatever happens to the server
        # meanwhile. Its room was reserved at the start; should that fail, it is written
        # again at the end.
        self.record = {**self.spec, "shim": shim}
        try:
            write_json_atomic(os.path.join(self.job_dir, SPEC_FILE), self.record)
            self.record = None
        except OSError:
            pass
        return failure, out_fd, index_fd

    def start_egress(self, tty):
        """For a job with an egress network: launch its helper (EgressNetwork: prepared
        while warm, or now) and send the command the network namespace to enter (before
        the request and the working folder's mount: the command reads them in that
        order). Raises OSError."""
        if self.req.egress and self.egress and not self.egress.alive():
            log.warning("job %s: its prepared network helper had died: making another",
                        self.req.job_id)
            self.egress.discard()
            self.egress = None
        self.egress_warm = self.egress is not None
        if not self.req.egress:
            return
        if not self.egress:
            if not self.egress_settings:
                raise OSError(errno.EOPNOTSUPP, "this server offers no egress network")
            self.egress = EgressNetwork(self.egress_settings)
            try:
                self.egress.prepare(os.path.join(self.job_dir, EGRESS_LOG))
            except OSError:
                self.egress.end()
                raise
        netns = self.egress.launch(self.job_dir)
        try:
            socket.send_fds(tty, [b"e"], [netns])
        finally:
            os.close(netns)

    def share_workdir(self, tty):
        """Send the command a clone of the job's own tmpfs working folder, which the server
        mounted where the host keeps it (its path under the state folder's work/, so that
        its files outlive the job), for the job's view (sent before the request: the
        command finds it waiting). A kernel without open_tree (before 5.2) gives none: the
        command mounts a private tmpfs, gone with the job. Raises OSError."""
        req = self.req
        if not (req.own_workdir and req.workdir_size):
            return   # a folder on disk: the command binds it from the host's
        try:
            clone = clone_mount(req.workdir)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            tty.send(b"n")   # none: the command makes its own
            return
        try:
            socket.send_fds(tty, [b"w"], [clone])
        finally:
            os.close(clone)

    def supervise(self, ours, out_fd, index_fd, failure):
        """Copy the job's output (and its input, if it takes some) until the job has ended.
        Returns copy_output's (written, indexed, truncated, error)."""
        self.sampling = None
        if self.cg.needs_peak_sampling():   # old kernels only: this process stays lean
            self.sampling = threading.Event()
            threading.Thread(target=self.cg.sample_peak_memory, args=(self.sampling,),
                             daemon=True).start()
        sources = {ours.stdout: STDOUT, ours.stderr: STDERR}
        relay = open_input_relay(self.req, self.job_dir, ours.stdin, ours.tty, sources,
                                 started=not failure)
        self.reaper = ChildReaper()
        self.reaper.on_end[self.command.pid] = self.command_ended
        for sig in FORWARDED_SIGNALS:   # tini-style: what is sent to the job's pid 1
            signal.signal(sig, self.forward)
        if self.egress and self.egress.pid:
            self.reaper.on_end[self.egress.pid] = self.egress.exited
        # A command that ended before SIGCHLD could wake us (`sh -c 'daemon &'` ends at
        # once), its output held open by what it left: its end is seen now, not never.
        self.reaper.ready()
        try:
            output = copy_output(sources, out_fd, index_fd, self.req.output_cap, relay,
                                 self.reaper)
        finally:
            if relay:
                relay.close()
        os.close(out_fd)
        os.close(index_fd)
        return output

    def forward(self, signum, _frame):
        """A signal sent to the shim, the job's pid 1: the command's."""
        if self.command.status is None:   # (not reaped: its pid is still its own)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.command.pid, signum)

    def command_ended(self, status):
        """The command has ended (reaped: status): its egress network ends, then whatever
        it left running is killed, so that the job's pipes end."""
        self.command.status = status
        if self.egress:   # (first: its helper is one of the namespace's processes)
            killed = ((os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL)
                      or os.path.exists(os.path.join(self.job_dir, STOP_FILE)))
            self.network_lost = self.egress.end(killed_with_job=killed)
        kill_the_namespace()

    def report(self, ours, output, failure):
        """Wait for the command (its output may have ended before it) and write the job's
        result: how its command ended, its output and usage. Never gives up on a full
        disk."""
        written, indexed, truncated, out_error = output
        self.reaper.reap_until(self.command.pid)
        self.reaper.reap_all(KILL_TIMEOUT)   # (what command_ended killed)
        self.reaper.close()
        if self.sampling:
            self.sampling.set()
        result = {"started_at": self.started, "ended_at": time.time(),
                  "output_bytes": written, "index_bytes": indexed,
                  "output_truncated": truncated, "output_error": out_error}
        cmd_status = self.command.status
        if os.WIFSIGNALED(cmd_status):
            result["signal"] = os.WTERMSIG(cmd_status)
        else:
            result["exit_code"] = os.waitstatus_to_exitcode(cmd_status)
        if failure:
            result.update(failed=True, error=failure)
        if self.egress:   # (ended with the command: command_ended)
            result["network_lost"] = self.network_lost or ""
            result["egress_denied"] = self.egress.refusals()
        result.update(self.cg.usage())
        _remove_cgroup(self.cg)
        # A supervisor never dies of a full disk: what it knows is kept until it is written
        # (its room was reserved at the start, so this normally succeeds at once).
        if self.record is not None:
            write_json_until_written(os.path.join(self.job_dir, SPEC_FILE), self.record)
        write_json_until_written(os.path.join(self.job_dir, RESULT_FILE), result)


def _discard_warm(cg, command):
    """Kill a shim's unused command (a JobCommand, or None), and remove its cgroup."""
    if command:
        # Not cg.kill(): the command may not have joined the cgroup yet.
        command.kill()
    _remove_cgroup(cg)


def _remove_cgroup(cg):
    if not cg.remove(timeout=0.5):
        cg.kill()   # something outlived the kill of the namespace: be sure anyway
        cg.remove(timeout=KILL_TIMEOUT)


# -- the egress network (run --network egress) ------------------------------------
#
# A user-mode TCP/IP stack, slirp4netns, beside the job: the job's packets go to a tap
# device in its network namespace, and slirp4netns, in the host's, makes ordinary sockets
# for them. Nothing is routed or bridged, so the host's firewall sees only the helper's
# sockets, and the server's nftables table (EgressFirewall) refuses them, by the helper's
# group, the host's own addresses and the denied ranges: the kernel enforces it, whatever
# becomes of the helper.
#
# The helper runs as a uid of its own (EgressNetwork.uid), never as root. An unprivileged
# process may enter a network namespace only if it belongs to a user namespace of its
# uid, so a child of that uid makes both (egress_namespaces_main), the helper enters them
# by its pid, and the command enters that network namespace instead of the one it made
# warm. While recent starts asked for egress, warm shims do all this ahead (the helper
# runs, its tap ready); a start then only hands the command its namespace.
#
# Why slirp4netns and not pasta: pasta (passt 2023.03, Debian 12) drops its privileges
# before it opens the namespace it is given, so it cannot serve one a root process made;
# slirp4netns also sandboxes itself (its own mount namespace, no capabilities, seccomp).

EGRESS_TAP, EGRESS_MTU = "tap0", 65520    # (slirp4netns's largest MTU: fewer packets)
EGRESS_RESOLVER = "10.0.2.3"              # slirp4netns's DNS forwarder, as the job sees it
EGRESS_LOG = "egress.log"                 # the helper's messages, in the job's folder
EGRESS_LOG_MAX = 64 * KiB                 # (RLIMIT_FSIZE: a chatty helper cannot fill a disk)
EGRESS_READY_TIMEOUT = 5.0 * TIME_SCALE   # seconds the namespaces and the helper get


def _wait_ready(fd, what):
    """Read a child's b"1" (ready) or its error text from pipe fd, bounded. Raises OSError."""
    if not wait_readable(fd, EGRESS_READY_TIMEOUT):
        raise OSError(errno.ETIMEDOUT, f"{what} did not get ready in time")
    said = os.read(fd, 4096)
    if said != b"1":
        raise OSError(errno.EIO, said.decode(errors="replace") or f"{what} exited")


def egress_namespaces_main(uid, gid, ready_w, release_r):
    """A child of the shim: become uid and gid (no privileges), make a user namespace, in
    which it is root, and a network namespace of that user namespace, with loopback up;
    say b"1" (or why not) on ready_w, then wait until release_r is closed. Never returns."""
    code = 1
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)   # (a shim killed while it waits)
        prctl(PR_SET_DUMPABLE, 1)   # (its /proc files are then its uid's: the maps below)
        unshare(CLONE_NEWUSER | CLONE_NEWNET)
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"),
                           ("gid_map", f"0 {gid} 1")):
            write_file(f"/proc/self/{name}", text)
        bring_loopback_up()
        os.write(ready_w, b"1")
        code = 0
        os.read(release_r, 1)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.write(ready_w, f"cannot make the job's network namespace: {e.strerror or e}"
                     .encode())
    finally:
        os._exit(code)


def egress_helper_main(settings, uid, target_pid, log_fd, ready_w, exit_r):
    """A child of the shim: give itself a view of the host where /dev/net/tun is its uid's
    and resolv.conf names settings' resolvers, become uid and the helpers' group, and exec
    slirp4netns on target_pid's namespaces, its messages to log_fd. Never returns (126 if
    it cannot exec)."""
    try:
        unshare(CLONE_NEWNS)
        mount(None, "/", None, MS_REC | MS_PRIVATE)   # (nothing of this leaks to the host)
        resolv = os.path.realpath("/etc/resolv.conf")
        # Its own /run: the host's sockets are no business of a network helper's (its
        # sandbox keeps /etc and /run), and a tmpfs to hold its device and resolv.conf.
        mount("tmpfs", "/run", "tmpfs", MS_NOSUID, "mode=0755,size=64k")
        with contextlib.suppress(PermissionError):   # (a container may forbid mknod: the
            os.mknod("/run/tun", stat.S_IFCHR | 0o600, os.makedev(10, 200))   # host's then)
            os.chown("/run/tun", uid, uid)
            mount("/run/tun", "/dev/net/tun", None, MS_BIND)   # (a device: not nodev)
        text = "".join(f"nameserver {a}\n" for a in settings["dns"])
        if resolv.startswith("/run/"):   # (a link into /run, as systemd-resolved's: there)
            os.makedirs(os.path.dirname(resolv), exist_ok=True)
            with open(resolv, "w") as f:
                f.write(text)
        else:
            with open("/run/resolv.conf", "w") as f:
                f.write(text)
            bind_mount("/run/resolv.conf", resolv)
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (EGRESS_LOG_MAX, EGRESS_LOG_MAX))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # (past it, writes fail; no death)
        os.setgroups([])
        os.setresgid(settings["gid"], settings["gid"], settings["gid"])
        os.setresuid(uid, uid, uid)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)   # (after setresuid, which clears it)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        for fd in (ready_w, exit_r):
            os.set_inheritable(fd, True)
        os.execve(settings["helper"], [   # (none of the server's environment: its secrets)
            "slirp4netns", "--configure", f"--mtu={EGRESS_MTU}", "--disable-host-loopback",
            "--enable-sandbox", "--enable-seccomp", f"--ready-fd={ready_w}",
            f"--exit-fd={exit_r}", str(target_pid), EGRESS_TAP], {"PATH": JOB_PATH})
    except OSError as e:
        with contextlib.suppress(OSError):
            os.write(ready_w, f"cannot start {settings['helper']}: {e.strerror or e}".encode())
    os._exit(126)


def egress_last_words(log_path):
    """The last line an egress helper wrote to its log, cut, or ""."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 1000))
            lines = [line for line in f.read().decode(errors="replace").splitlines()
                     if line.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def run_nft(nft, *args, text=None):
    """Run nft (the egress firewall's tool, its path) with args; returns its stdout. Raises
    OSError with its first error line (subprocess.TimeoutExpired past a bounded wait)."""
    import subprocess   # (forks and execs in C: safe in the threaded server too)
    done = subprocess.run([nft, *args], input=text, capture_output=True, text=True,
                          timeout=10 * TIME_SCALE, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise OSError(errno.EIO, lines[0] if lines else f"nft exited {done.returncode}")
    return done.stdout


def egress_denied_counts(nft, table):
    """{helper uid: packets refused} of the egress firewall's table ("inet NAME").
    Raises OSError, ValueError (a listing nft should not give)."""
    counts = {}
    for item in json.loads(run_nft(nft, "-j", "list", "set", *table.split(), "denied")).get(
            "nftables", ()):
        for element in item.get("set", {}).get("elem", ()):
            if isinstance(element, dict) and "elem" in element:
                counts[element["elem"]["val"]] = element["elem"]["counter"]["packets"]
    return counts


def forget_egress_count(nft, table, uid):
    """Drop uid's count in the egress firewall's table (best effort: mostly there is none):
    the next shim of that pid will have that uid."""
    with contextlib.suppress(Exception):   # (OSError, subprocess.TimeoutExpired)
        run_nft(nft, "delete", "element", *table.split(), "denied", f"{{ {uid} }}")


def prepare_warm_egress(settings, cg):
    """An EgressNetwork made ready while the shim is warm (if the server offers egress and
    its recent starts asked for it: settings["egress_warm"]), or None. A failure is the
    start's to meet again, and say."""
    if not (settings.get("egress") and settings.get("egress_warm")):
        return None
    egress = EgressNetwork(settings["egress"])
    try:
        egress.prepare(os.path.join(settings["egress"]["spare_logs"], f"{own_host_pid()}.log"),
                       cg)
        return egress
    except OSError as e:
        log.warning("cannot prepare an egress network: %s", e.strerror or e)
        egress.discard()
        return None


def _keep_only(*fds):
    """In a child of the shim's: close every fd but stdio and fds. Why: a copy of the job's
    pipes (the request's above all, whose EOF the command waits for) must not live on in
    a helper."""
    low = 3
    for fd in sorted(fds) + [1 << 16]:
        os.closerange(low, fd)
        low = fd + 1


class EgressNetwork:
    """One job's egress network, from its namespaces and helper made ready (prepare: while
    the shim is warm, or at the start) to the job's end. The helper's uid is the shim's
    own: settings["uid_base"] + the shim's pid (unique among live helpers: a helper never
    outlives its shim)."""

    def __init__(self, settings):
        self.settings = settings
        self.uid = settings["uid_base"] + own_host_pid()
        self.maker = self.pid = self.netns = self.exit_w = self.log_path = None
        self.host_pid = self.started_at = None
        self.status = None            # the helper's wait status, once the shim reaped it
        self.warm = False             # prepared before its job came
        self.launched = False         # a job took it: its helper may have been refused

    def prepare(self, log_path, cg=None):
        """Make the namespaces (egress_namespaces_main), start the helper, its messages to
        log_path, and wait until it is ready; with cg, move it into that cgroup (warm: an
        RCU grace period, off the start's path). Raises OSError saying what failed (with
        the helper's last words)."""
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        release_r, release_w = os.pipe2(os.O_CLOEXEC)
        self.maker = os.fork()
        if self.maker == 0:
            _keep_only(ready_w, release_r)
            egress_namespaces_main(self.uid, self.settings["gid"], ready_w, release_r)
        for fd in (ready_w, release_r):
            os.close(fd)
        try:
            _wait_ready(ready_r, "the job's network namespace")
            self.netns = os.open(f"/proc/{host_pid_of(self.maker)}/ns/net",
                                 os.O_RDONLY | os.O_CLOEXEC)
            self._start_helper(log_path)
        except BaseException:
            os.kill(self.maker, signal.SIGKILL)   # (our unreaped child: no pid reuse)
            raise
        finally:
            os.close(ready_r)
            os.close(release_w)   # the maker exits: the helper holds the namespaces now
            os.waitpid(self.maker, 0)
            self.maker = None
        if cg is not None:
            cg.join(self.pid)
            self.warm = True

    def _start_helper(self, log_path):
        """Fork and exec slirp4netns on the maker's namespaces; wait for its ready.
        Raises OSError."""
        self.log_path = log_path
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW |
                         os.O_CLOEXEC, 0o600)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        exit_r, self.exit_w = os.pipe2(os.O_CLOEXEC)
        target = host_pid_of(self.maker)   # (slirp4netns reads the host's /proc)
        self.pid = os.fork()
        if self.pid == 0:
            _keep_only(log_fd, ready_w, exit_r)
            egress_helper_main(self.settings, self.uid, target, log_fd, ready_w, exit_r)
        for fd in (log_fd, ready_w, exit_r):
            os.close(fd)
        try:
            _wait_ready(ready_r, "slirp4netns")
        except OSError as e:
            self.end()
            last = egress_last_words(log_path)
            raise OSError(e.errno, f"{e.strerror}{': ' + last if last else ''}") from None
        finally:
            os.close(ready_r)
        self.host_pid = host_pid_of(self.pid)
        self.started_at = process_start_time(self.host_pid)

    def launch(self, job_dir):
        """The job takes the network: its helper's log moves into job_dir (EGRESS_LOG).
        Returns the job's network namespace (an fd, the caller's to close). Raises OSError."""
        log_path = os.path.join(job_dir, EGRESS_LOG)
        if self.log_path != log_path:
            os.rename(self.log_path, log_path)   # (the helper writes on, to the same file)
            self.log_path = log_path
        netns, self.netns = self.netns, None
        self.launched = True
        return netns

    def facts(self):
        """What the job's record says of its helper: the engine checks it is alive, and
        reads its refusals by its uid."""
        return {"egress_pid": self.host_pid, "egress_start": self.started_at,
                "egress_uid": self.uid, "egress_warm": self.warm}

    def exited(self, status):
        """The shim reaped the helper (its ChildReaper): its wait status."""
        self.status = status

    def alive(self):
        """True while the helper runs (a prepared one may have died waiting)."""
        return (bool(self.pid) and self.status is None
                and os.waitpid(self.pid, os.WNOHANG)[0] == 0)

    def discard(self):
        """A network whose job never came (or never started): the helper ends, its count
        goes, and its log if no job's folder has it."""
        self.end()
        if self.launched:
            self.forget_count()
        if self.log_path and os.path.dirname(self.log_path) == self.settings["spare_logs"]:
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)

    def end(self, killed_with_job=False):
        """End the helper (with the job). Returns how it had ended before, or "" if it was
        still running, never ran, or (killed_with_job) died of the SIGKILL that ended the
        job (a stop kills the job's whole cgroup, the helper with it)."""
        if self.netns is not None:
            os.close(self.netns)
            self.netns = None
        if self.status is not None:
            ended = (self.pid, self.status)
        else:
            ended = os.waitpid(self.pid, os.WNOHANG) if self.pid else (0, 0)
        if self.exit_w is not None:   # (only now: closing it makes a live helper exit 0)
            os.close(self.exit_w)   # --exit-fd: it exits
            self.exit_w = None
        if not self.pid:
            return ""
        pid, status = ended
        if pid == 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)   # (at once: the job is gone anyway)
            os.waitpid(self.pid, 0)
            self.pid = None
            return ""
        self.pid = None
        if killed_with_job and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            return ""
        how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exit status {os.waitstatus_to_exitcode(status)}")
        last = egress_last_words(self.log_path) if self.log_path else ""
        return f"the network helper ended ({how}{': ' + last if last else ''})"

    def forget_count(self):
        """Drop this uid's count in the firewall (forget_egress_count)."""
        forget_egress_count(self.settings["nft"], self.settings["table"], self.uid)

    def refusals(self):
        """Packets the firewall refused this helper, read once the job has ended; its
        count is then dropped (forget_count). 0 if unknown."""
        table = self.settings["table"]
        try:
            counts = egress_denied_counts(self.settings["nft"], table)
            if self.uid in counts:
                self.forget_count()
            return counts.get(self.uid, 0)
        except Exception as e:   # (OSError, ValueError, subprocess.TimeoutExpired)
            log.warning("cannot read the egress firewall's count of uid %d: %s", self.uid, e)
            return 0


def open_input_relay(req, job_dir, stdin_w, tty_ours, sources, started):
    """The InputRelay of a job started with stdin or a terminal, or None (then its stdin
    pipe is closed here). A terminal job's master, which its command sent before exec,
    joins sources as STDOUT (a terminal has one stream). Closes tty_ours."""
    master = None
    if started and req.terminal:
        try:
            _, fds = recv_with_fds(tty_ours, 16, socket.MSG_DONTWAIT)
            master = fds[0] if fds else None
        except OSError:
            pass
    tty_ours.close()
    if master is None and not (started and req.stdin):
        os.close(stdin_w)   # the job sees /dev/null; nobody needs this pipe
        return None
    if master is not None:
        os.close(stdin_w)
        sources[master] = STDOUT
        target = os.dup(master)   # its own fd: poll tells reading from writing apart
    else:
        target = stdin_w
        try:
            fcntl.fcntl(target, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
    return InputRelay(job_dir, target, terminal=master is not None)


class InputRelay:
    """Writes what comes on the job's input socket to its stdin pipe or terminal, at the
    pace the job reads: while a write waits, nothing more is read from the socket, so the
    server (and its client) wait too, and nobody buffers without bound."""

    def __init__(self, job_dir, target, terminal):
        self.target, self.terminal = target, terminal
        self.pending, self.eof_pending = b"", False
        self.conn, self.registered, self.poller = None, None, None
        os.set_blocking(target, False)
        self.path = os.path.join(job_dir, INPUT_SOCKET)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            bind_in_folder(self.listener, job_dir, INPUT_SOCKET)
            self.listener.listen(1)
            self.listener.setblocking(False)
        except OSError as e:   # the job runs anyway, without input
            log.error("cannot make the job's input socket %s: %s", self.path, e)
            self.listener.close()
            self.listener = None

    def attach(self, poller):
        self.poller = poller
        self._register()

    def handles(self, fd):
        return fd == self.registered

    def _register(self):
        """Poll for the one thing that can happen next: the target taking the pending
        bytes, the connection's next message, or a connection."""
        want = ((self.target, select.POLLOUT) if self.pending else
                (self.conn.fileno(), select.POLLIN) if self.conn else
                (self.listener.fileno(), select.POLLIN) if self.listener else (None, 0))
        if self.registered is not None:
            self.poller.unregister(self.registered)
        self.registered = want[0]
        if self.registered is not None:
            self.poller.register(*want)

    def ready(self, fd, events):
        """Handle what poll said of fd (the one registered)."""
        if self.pending:
            self._write(self.pending)
        elif self.conn is not None:
            self._receive()
        else:
            try:
                self.conn, _ = self.listener.accept()
                self.conn.setblocking(False)
            except OSError:
                pass
        self._register()

    def _receive(self):
        try:
            msg = self.conn.recv(INPUT_PIECE + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            msg = b""
        if not msg:   # the server hung up (or died): the next one may connect
            self.conn.close()
            self.conn = None
            return
        kind, body = msg[:1], msg[1:]
        if kind == INPUT_DATA:
            self._write(body)
        elif kind == INPUT_EOF and not self.terminal:
            self.eof_pending = True
            self._write(b"")
        elif self.terminal and self.target is not None:
            try:
                if kind == INPUT_SIZE and len(body) == INPUT_SIZE_FORMAT.size:
                    rows, cols = INPUT_SIZE_FORMAT.unpack(body)
                    fcntl.ioctl(self.target, termios_TIOCSWINSZ(),
                                struct.pack("HHHH", rows, cols, 0, 0))
                elif kind == INPUT_REDRAW:
                    # The kernel picks the foreground group: no pid of ours can be stale.
                    fcntl.ioctl(self.target, TIOCSIG, signal.SIGWINCH)
            except OSError:
                pass

    def _write(self, data):
        """Write what the target takes now; keep the rest pending."""
        if self.target is None:
            self.pending = b""   # the job closed its stdin: what comes is dropped
            return
        try:
            n = os.write(self.target, data) if data else 0
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:   # EPIPE, EIO: nobody reads the job's input any more
            self._close_target()
            self.pending = b""
            return
        self.pending = data[n:]
        if not self.pending and self.eof_pending:
            self._close_target()

    def _close_target(self):
        if self.target is not None:
            os.close(self.target)
            self.target = None

    def close(self):
        if self.registered is not None and self.poller is not None:
            self.poller.unregister(self.registered)
            self.registered = None
        for sock in (self.conn, self.listener):
            if sock is not None:
                sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self._close_target()


def termios_TIOCSWINSZ():
    import termios   # only terminal jobs pay for it
    return termios.TIOCSWINSZ


def bind_in_folder(sock, folder, name):
    """Bind sock to folder/name, however long folder's path (a socket address holds 107
    bytes): through /proc/self/fd. Raises OSError."""
    with opened_folder(folder) as fd:
        sock.bind(f"/proc/self/fd/{fd}/{name}")


@contextlib.contextmanager
def opened_folder(path):
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def copy_output(pipes, out_fd, index_fd, cap, relay=None, reaper=None):
    """Move bytes from the job's pipes ({fd: STDOUT or STDERR}) to its output file, zero-copy,
    in the order they come, until every pipe has ended; closes the pipes. A terminal's
    master (relay.terminal) is read and written instead: splice needs a pipe. The relay,
    if any, is served in the same loop, and the reaper (ChildReaper: the command's end,
    and what then kills what it left, so that the pipes end).

    index_fd gets an INDEX_RECORD before the bytes it describes, wherever the stream
    changes and every INDEX_GRANULE while output flows (bytes with no room for a record
    count as the last record's). The output and its index share `cap`: past it (or a write
    error such as a full disk) the rest is read and discarded, so the job is never blocked
    or killed by its own output, and a job that alternates 1-byte writes between its
    streams takes no more disk than one that does not. Returns (written, indexed,
    truncated, error): the bytes of output and of index written.
    """
    written, indexed, truncated, error = 0, 0, False, ""
    sink, index_ok = out_fd, True
    last_stream, last_time = None, 0.0
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    poller = select.poll()
    for fd in pipes:
        poller.register(fd, select.POLLIN)
    pipes = dict(pipes)
    if relay is not None:
        relay.attach(poller)
    if reaper is not None:
        poller.register(reaper.fd, select.POLLIN)
    trickles = TrickleBudget()
    try:
        while pipes:
            if trickles.owed():
                # A job writing a little at a time, without pause, would have us wake for
                # each write, working for it beyond its CPU limit (a 1-byte writer at --cpu
                # 0.1 took 0.18 s of ours for its 0.32): past a burst, such output waits.
                serve_input_only(poller, pipes, relay, trickles.paid_at())
            moved = 0
            for fd, events in poller.poll():
                if relay is not None and relay.handles(fd):
                    relay.ready(fd, events)
                    moved = -1   # (input: never held back)
                    continue
                if reaper is not None and reaper.handles(fd):
                    reaper.ready()
                    continue
                if fd not in pipes:
                    continue   # (ended earlier in this round)
                room = cap - written - indexed if sink == out_fd else CHUNK
                now = time.time()
                if sink == out_fd and index_ok and room > INDEX_RECORD.size and (
                        pipes[fd] != last_stream or now - last_time >= INDEX_GRANULE):
                    last_stream, last_time = pipes[fd], now
                    try:
                        indexed += os.write(index_fd, INDEX_RECORD.pack(written, now,
                                                                        last_stream))
                        room -= INDEX_RECORD.size
                    except OSError:
                        index_ok = False   # (a full disk) the output itself matters more
                if room <= 0:
                    sink, truncated, room = devnull, True, CHUNK
                try:
                    n = move_bytes(fd, sink, min(CHUNK, room))
                except BlockingIOError:
                    continue
                except OSError as e:
                    if sink == devnull:
                        raise
                    sink, truncated, error = devnull, True, str(e)
                    continue
                if n == 0:
                    poller.unregister(fd)
                    del pipes[fd]
                    os.close(fd)
                elif sink == out_fd:
                    written += n
                if moved >= 0:
                    moved += n
            if 0 < moved < OUTPUT_TRICKLE:
                trickles.spend()
        return written, indexed, truncated, error
    finally:
        os.close(devnull)
        for fd in pipes:
            os.close(fd)


class TrickleBudget:
    """A token bucket of the supervisor's trickle rounds (TRICKLE_BURST, TRICKLE_RATE)."""

    def __init__(self):
        self.tokens, self.at = float(TRICKLE_BURST), time.monotonic()

    def spend(self):
        now = time.monotonic()
        self.tokens = min(TRICKLE_BURST, self.tokens + (now - self.at) * TRICKLE_RATE) - 1
        self.at = now

    def owed(self):
        return self.tokens < 0

    def paid_at(self):
        """When the bucket is out of debt (monotonic time)."""
        return self.at - self.tokens / TRICKLE_RATE


def serve_input_only(poller, pipes, relay, until):
    """Until the monotonic time until, or until input came (or a child ended), leave the
    output pipes be and serve the relay (the job's input): keys typed are never held
    back, nor their echo."""
    for fd in pipes:
        poller.unregister(fd)
    try:
        while (left := until - time.monotonic()) > 0:
            ready = poller.poll(left * 1000)   # (the relay's, the reaper's)
            for fd, events in ready:
                if relay is not None and relay.handles(fd):
                    relay.ready(fd, events)
            if ready:
                return
    finally:
        for fd in pipes:
            poller.register(fd, select.POLLIN)


def move_bytes(source, sink, size):
    """Up to size bytes from source to sink: spliced from a pipe, else read and written (a
    terminal's master, whose EIO once every process has closed its end is its EOF).
    Returns how many; 0 at the source's end. Raises OSError (the sink's)."""
    try:
        return os.splice(source, sink, size)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    try:
        data = os.read(source, size)
    except OSError as e:
        if e.errno == errno.EIO:
            return 0
        raise
    _write_all(sink, data)
    return len(data)


def _report_start_failure(err_w, stderr_fd, message):
    """Tell the shim why the job could not start, and the job's stderr too, as a shell would."""
    try:
        os.write(err_w, json.dumps({"error": message}).encode())
        os.write(stderr_fd, f"steve-jobs: {message}\n".encode())
    except OSError:
        pass


# Signals Python handles or ignores, which the command must find at their defaults.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)


def _run_steps(steps):
    """Run (description, callable) pairs; an OSError names the step that failed."""
    for what, step in steps:
        try:
            step()
        except OSError as e:
            raise OSError(e.errno, f"cannot {what}: {e.strerror or e}") from None


def enter_job_namespaces(cg, mount_template=None):
    """In the command's process: join the cgroup, enter the MountTemplate's mounts (an fd,
    closed here; None: the host's are copied), unshare mount, UTS, IPC and cgroup
    namespaces. Raises OSError naming the step that failed."""
    def enter_template():
        if mount_template is not None:
            try:
                setns(mount_template, CLONE_NEWNS)
            finally:
                os.close(mount_template)
    _run_steps([
        ("join the job's cgroup", cg.join),
        ("enter the host's mounts less the jobs' folders", enter_template),
        ("unshare namespaces", lambda: unshare(
            CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP))])


def build_job_view(settings):
    """In the command's process, warm, in the job's own mount namespace: the
    job's view of the host: all of it read-only but no other job's working folder, a
    fresh /proc, a minimal /dev, empty private /tmp, /var/tmp, /dev/shm and /run/lock, and
    the server's own folders (state, certificates: settings["hidden"]) covered by empty
    ones.

    What depends on the request (network, hostname, working folder) comes later.
    Returns an O_PATH handle on the host's settings["work"] folder (working folders on disk
    are bound from it once the state folder is hidden), or None.
    Raises OSError naming the step that failed.
    """
    handles = {}

    def private_mounts():
        # Private propagation first, or our mounts would leak back into the host's namespace.
        mount(None, "/", None, MS_REC | MS_PRIVATE)

    def drop_other_jobs_folders():
        # Kept, every job held a copy of every other's working folder (the kernel's memory
        # for them grew with the square of the jobs running) and its mountinfo named them.
        # Copied from a MountTemplate, they are gone already. The handle on work/ is opened
        # after: on the folder beneath, in this namespace.
        detach_jobs_folders(settings.get("work"))

    def hold_what_gets_covered():
        # Handles on what the job's view will cover, to bind from /proc/self/fd later.
        for name in JOB_DEVICES:
            handles[name] = os.open(f"/dev/{name}", os.O_PATH | os.O_CLOEXEC)
        if settings.get("work"):
            handles["work"] = os.open(settings["work"], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def fresh_proc():
        # After the host went read-only: the command must still write its oom_score_adj.
        # /proc/sys and sysrq-trigger stay read-only (a --root job is host root).
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        for path in ("/proc/sys", "/proc/sysrq-trigger"):
            if os.path.exists(path):
                bind_mount(path, path, read_only=True)

    def scratch_filesystem():
        # One tmpfs holds /dev, the private folders and the covers over the server's, each
        # a bind of a folder of it. A filesystem a job mounts costs more than its own
        # memory: each memory cgroup's removal (every job's end) walks every superblock's
        # per-cgroup lists, the other jobs' too (beside 2,000 sleeping jobs with nine
        # filesystems each: 11% of the CPU while jobs started one after another). It is
        # set up over /proc, where nothing sees it, then let go there: the binds keep it.
        size = settings.get("private_size", PRIVATE_DIR_SIZE)
        mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0700,size={size}")
        try:
            def made(name, mode):
                os.mkdir(f"/proc/{name}")
                os.chmod(f"/proc/{name}", mode)   # (whatever the umask)
                return f"/proc/{name}"
            dev = made("dev", 0o755)
            for name in ("pts", "shm"):
                os.mkdir(f"{dev}/{name}", 0o755)
            # A bind keeps the scratch's nosuid, nodev (a mount call fewer than bind_mount);
            # /dev is made read-only once its devices are in.
            mount(dev, "/dev", None, MS_BIND)
            # Empty and private: jobs must not meet each other (or the host) there. Their
            # pages are charged to the job's memory cgroup.
            for path in JOB_PRIVATE_DIRS:
                if os.path.isdir(path):
                    mount(made(path.strip("/").replace("/", "-"), 0o1777), path, None, MS_BIND)
            # Keys, tokens and every other job's records and output: not even their names.
            # Each cover a folder of its own, root's: the job's working folder is bound at
            # its path inside the state folder's (its mount point made there later, as root).
            covered = [path for path in settings.get("hidden", ()) if os.path.isdir(path)]
            for i, path in enumerate(covered):
                mount(made(f"cover-{i}", 0o755), path, None, MS_BIND)
        finally:
            umount_lazy("/proc")

    def minimal_dev():
        # The devices a program expects, bound from the host's (no mknod: containers may
        # forbid it), a private devpts for terminals, and nothing else of the host's /dev.
        for name in JOB_DEVICES:
            os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
            mount(f"/proc/self/fd/{handles.pop(name)}", f"/dev/{name}", None, MS_BIND)
        mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
              "newinstance,ptmxmode=0666,mode=0620")
        for link, to in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"),
                         ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
            os.symlink(to, f"/dev/{link}")

    _run_steps([
        ("make mounts private", private_mounts),
        ("drop the other jobs' working folders", drop_other_jobs_folders),
        ("hold the host's devices", hold_what_gets_covered),
        ("make the host read-only",
         lambda: None if settings.get("rw_host") else make_mounts_read_only("/")),
        ("make /dev, private /tmp and the like, and hide the server's folders",
         scratch_filesystem),
        ("mount /proc", fresh_proc),
        ("make a minimal /dev", minimal_dev),
        ("make /dev read-only", lambda: mount(   # (the bind only: not the scratch tmpfs)
            None, "/dev", None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_NOEXEC
            | MS_RDONLY))])
    return handles.get("work")


def command_main(cg, settings, ends):
    """The command's process: get ready, wait for the request, finish, exec. Never returns.

    Everything that does not depend on the request happens before it arrives.
    ends: the job's JobEnds.
    """
    warm_error = ""
    err_w, stderr_fd = ends.error, ends.stderr
    work_fd = None
    try:
        enter_job_namespaces(cg, settings.get("mount_template"))
        work_fd = build_job_view(settings)
        host_net = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        keep = (ends.go, err_w, host_net, ends.stdin, ends.tty) + (
            (work_fd,) if work_fd is not None else ())
        prepare_process((ends.stdout, ends.stderr), keep=keep)
        stderr_fd = 2
        syscall_filter = prepared_syscall_filter(JOB_SYSCALL_FILTER)
        enter_job_network(cg)
        tty = socket.socket(fileno=ends.tty)
        rehearse_passing_fds()
    except Exception as e:   # reported once a job comes: it is that job's failure
        warm_error = f"namespace setup failed: {e}"
    try:
        msg = _read_all(ends.go)
    except OSError:
        msg = b""
    if not msg:
        os._exit(0)   # a warm shim discarded before any job came
    req = SpawnRequest.from_json(msg)
    if warm_error:
        _report_start_failure(err_w, stderr_fd, warm_error)
        os._exit(126)

    def network():
        _run_steps([("set the hostname", lambda: socket.sethostname(req.job_id))])
        if req.host_network:
            leave_job_network(host_net)
        elif req.egress:
            enter_egress_network(cg, tty)
        os.close(host_net)
    # What the request decides, in order: the first step to fail is the job's error (its
    # words first), and the start's exit code is 126, as a shell's "cannot execute".
    for words, step in (("namespace setup failed", network),
                        (f"cannot enter working directory {req.workdir}",
                         lambda: mount_workdir(req, work_fd, tty)),
                        ("cannot make the job's terminal",
                         lambda: connect_input(req, ends.stdin, tty))):
        try:
            step()
        except Exception as e:
            _report_start_failure(err_w, 2, f"{words}: {getattr(e, 'strerror', None) or e}")
            os._exit(126)
    exec_command(req, err_w, syscall_filter)


def connect_input(req, stdin_r, tty_sock):
    """The job's stdin: /dev/null (as prepare_process left it), the pipe the shim writes,
    or a terminal (req.terminal: [rows, columns]) on stdin, stdout and stderr. Closes
    stdin_r and the shim's socket tty_sock. Raises OSError."""
    try:
        if req.terminal:
            make_terminal(req.terminal, req.uid, tty_sock)
        elif req.stdin:
            os.dup2(stdin_r, 0)
    finally:
        tty_sock.close()
        os.close(stdin_r)


def make_terminal(size, uid, tty_sock):
    """Open a pty in the job's own devpts (its /dev/ptmx), make it this session's
    controlling terminal on fds 0-2, and send the master to the shim. Raises OSError."""
    import termios
    master, slave = os.openpty()   # /dev/ptmx here is the job's devpts instance
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
        os.fchown(slave, uid, uid)   # the job's own, as login would make it
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)   # (we are a session leader, no terminal)
        socket.send_fds(tty_sock, [b"m"], [master])
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
    finally:
        os.close(master)   # the job must not hold its own master: EOF would never come
        os.close(slave)


def received_mount(tty):
    """The mount the shim sent on its socket tty before the request (an fd), or None if it
    had none to send (a kernel without open_tree). Raises OSError."""
    _, fds = recv_with_fds(tty, 16)
    return fds[0] if fds else None


def mount_workdir(req, work_fd, tty):
    """Make the job's working folder, the one writable place of the host's in its view.

    Its own folder (req.own_workdir) is a tmpfs of workdir_size bytes, the one its shim
    mounted on the host and sent on its socket tty (else, on kernels without open_tree, a private
    one), or with workdir_size 0 the host's folder bound from work_fd (the state folder is
    hidden). A folder the client named is the host's, bound writable onto itself. Why a
    tmpfs: a job must not be able to fill the state filesystem for every other job; its
    pages are charged to the job's memory cgroup. Raises OSError."""
    path, uid = req.workdir, req.uid
    if not req.own_workdir:
        fd = open_as(uid, path)   # a path the job cannot reach is no business of ours
        try:
            bind_mount(f"/proc/self/fd/{fd}", path)
        finally:
            os.close(fd)
        return
    os.makedirs(path, 0o755, exist_ok=True)   # in the empty folder hiding the state folder
    if req.workdir_size:
        shared = received_mount(tty)
        if shared is not None:
            attach_mount(shared, path)
            os.close(shared)
        else:
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV,
                  f"size={req.workdir_size},mode=0700,uid={uid},gid={uid}")
    else:
        bind_mount(f"/proc/self/fd/{work_fd}/{req.job_id}", path)


def open_as(uid, path):
    """An O_PATH handle on the folder path, opened with uid's permissions (so that its
    errors tell nothing uid could not learn itself). Single-threaded callers only: it
    switches the effective ids of the process. Raises OSError."""
    os.setegid(uid)
    os.seteuid(uid)
    try:
        return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    finally:
        os.seteuid(0)
        os.setegid(0)


def prepare_process(out_w, keep):
    """The command's process before its job is known: session, stdio, fds, signals."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_w[0], 1)
    os.dup2(out_w[1], 2)
    close_fds_but(keep)   # whatever the forks brought along
    # Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec: undo that.
    for sig in FORWARDED_SIGNALS + (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    if read_file("/proc/self/oom_score_adj", "0").strip() != "0":
        write_file("/proc/self/oom_score_adj", "0")


def mount_job_sys(cg):
    """Mount a /sys for the network namespace we are in. Raises OSError."""
    # sysfs shows the network namespace of whoever mounted it: remount it for ours, read
    # only, and show the job its own cgroup (the cgroup namespace roots it there), as
    # runtimes that size themselves from cgroup limits (JVM, Go) expect.
    mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if cg.v2_dir:
        mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def enter_job_network(cg):
    """Unshare a network namespace with only loopback, up, and mount a /sys that shows it.

    Done before the request arrives (it costs about a millisecond). Raises OSError naming
    the step that failed.
    """
    _run_steps([("unshare the network namespace", lambda: unshare(CLONE_NEWNET)),
                ("mount /sys", lambda: mount_job_sys(cg)),
                ("bring up loopback", bring_loopback_up)])


def enter_egress_network(cg, tty):
    """For a job with an egress network: enter the network namespace its shim sent on tty
    (EgressNetwork's, loopback already up), with a /sys that shows it and a resolv.conf
    naming the helper's resolver. Raises OSError naming the step that failed."""
    _, fds = recv_with_fds(tty, 16)
    if not fds:
        raise OSError(errno.EPROTO, "no network namespace came from the job's supervisor")

    def own_resolv_conf():
        # Written in a scratch tmpfs over /tmp (the job's own is back once it is gone),
        # then bound, read-only, over the host's file (or where its link points).
        mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0700")
        try:
            with open("/tmp/resolv.conf", "w") as f:
                f.write(f"nameserver {EGRESS_RESOLVER}\n")
            bind_mount("/tmp/resolv.conf", "/etc/resolv.conf", read_only=True)
        finally:
            umount_lazy("/tmp")

    try:
        _run_steps([("enter the egress network", lambda: setns(fds[0], CLONE_NEWNET)),
                    ("unmount the job's /sys", lambda: umount_lazy("/sys")),
                    ("mount /sys", lambda: mount_job_sys(cg)),
                    ("give the job its resolv.conf", own_resolv_conf)])
    finally:
        os.close(fds[0])


def leave_job_network(host_net):
    """For a job that shares the host's network: back to it, and to the host's /sys."""
    _run_steps([("rejoin the host network", lambda: setns(host_net, CLONE_NEWNET)),
                ("unmount the job's /sys", lambda: umount_lazy("/sys"))])


def become_job_user(uid):
    """Drop to the job's uid, without groups; a --root job (uid 0) keeps root's capabilities
    but CAP_SYS_PTRACE, from its exec on. Then no_new_privs. Raises OSError.

    Why not CAP_SYS_PTRACE: the job's pid 1 is its shim, root and in the host's mount
    namespace; the shim is not dumpable, so only that capability would let a root job reach
    the host's files through /proc/1/root, or ptrace the shim."""
    if uid != 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    else:
        prctl(PR_CAPBSET_DROP, CAP_SYS_PTRACE)
    prctl(PR_SET_NO_NEW_PRIVS, 1)   # setuid binaries cannot give privileges back


def exec_command(req, err_w, syscall_filter):
    """Drop privileges, enter the working folder, exec. Never returns.

    Failures before exec reach the shim through err_w (close-on-exec, so a successful exec
    closes it silently), with shell exit codes: 127 not found, 126 cannot execute.
    """
    argv = req.argv
    stage = "setting up"
    try:
        stage = "dropping privileges"
        become_job_user(req.uid)
        stage = f"cannot enter working directory {req.workdir}"
        os.chdir(req.workdir)
        stage = "cannot install the syscall filter"
        install_syscall_filter(syscall_filter)   # last: it denies what set-up needed
        stage = argv[0]
        os.execvpe(argv[0], argv, req.env)
    except OSError as e:
        not_found = stage == argv[0] and e.errno in (errno.ENOENT, errno.ENOTDIR)
        reason = "command not found" if not_found else (e.strerror or str(e))
        _report_start_failure(err_w, 2, f"{stage}: {reason}")
        os._exit(127 if not_found else 126)
    except BaseException as e:
        _report_start_failure(err_w, 2, f"{stage}: {e}")
        os._exit(126)


JOB_SYSCALL_FILTER = job_syscall_filter()   # built once, when the spawner starts


# -- copies into and out of a job's working folder ---------------------------------------
#
# A copy is made by a helper the spawner forks: it enters the job's folder with chroot, then
# becomes the job's uid (no groups, no_new_privs) before it reads a path or a tar member. So
# no link the job planted can lead it out of the folder, and nothing it writes is root's:
# the files are the job's, within its folder's size. To the server it speaks in frames:
# a kind byte, a length, the payload (COPY_FRAME): "R" a JSON report (the first says
# whether the copy can go on; the last how it ended), "D" tar data (copies out).

COPY_FRAME = struct.Struct("!cI")
MAX_COPY_PATH = 4096
COPY_DATA_BYTES = 256 * KiB          # tar bytes in one "D" frame (and one TarChunk)
COPY_LINK_HOPS = 40                  # links followed in one path, as the kernel's ELOOP


class CopyRefused(Exception):
    """Why a copy cannot be made: kind is an Error's ("not_found", "invalid"...)."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


COPY_REFUSALS = {"not_found": NotFoundError, "invalid": InvalidArgumentError,
                 "failed_precondition": FailedPreconditionError,
                 "resource_exhausted": ResourceExhaustedError,
                 "permission_denied": PermissionDeniedError}


def copy_refusal(report):
    """The Error a copier's report of a refusal stands for."""
    kind = COPY_REFUSALS.get(report.get("kind"), InvalidArgumentError)
    return kind(str(report.get("error", "the copy failed"))[:MAX_ERROR_CHARS])


def send_copy_frame(sock, kind, payload):
    sock.sendall(COPY_FRAME.pack(kind, len(payload)) + payload)


def send_copy_report(sock, **report):
    send_copy_frame(sock, b"R", json.dumps(report).encode())


def resolve_in_folder(path, view, follow_last=True):
    """path (relative to the job's folder, or absolute in the job's view, where the folder
    is at view) as a path from the folder's top ("/" after chroot), links inside it
    followed as the job would see them (its last part's only with follow_last). Raises
    CopyRefused (a path or link that leaves the folder, too many links)."""
    if path.startswith("/"):
        if path != view and not path.startswith(view.rstrip("/") + "/"):
            raise CopyRefused("invalid", f"{path} is not in the job's working folder "
                                         f"({view}): only its files can be copied")
        path = path[len(view):]
    parts, done, hops = [p for p in path.split("/") if p not in ("", ".")], [], 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if not done:
                raise CopyRefused("invalid", f"{path} leaves the job's working folder")
            done.pop()
            continue
        here = "/" + "/".join(done + [part])
        if not os.path.islink(here) or not (parts or follow_last):
            done.append(part)
            continue
        hops += 1
        if hops > COPY_LINK_HOPS:
            raise CopyRefused("invalid", f"{path}: too many links")
        target = os.readlink(here)
        if target.startswith("/"):
            if target != view and not target.startswith(view.rstrip("/") + "/"):
                raise CopyRefused("invalid", f"{here.lstrip('/')} is a link out of the job's "
                                             f"working folder (to {target}): not followed")
            done, target = [], target[len(view):]
        parts = [p for p in target.split("/") if p not in ("", ".")] + parts
    return "/" + "/".join(done)


def copy_out(sock, path, view):
    """Send path (a file or a folder, recursively; links as links, path itself too, as
    docker cp) as a tar stream, its top named as path's last part. Raises CopyRefused,
    OSError."""
    inside = resolve_in_folder(path, view, follow_last=False)
    if not os.path.lexists(inside):
        raise CopyRefused("not_found", f"{path}: no such file in the job's working folder")
    name = os.path.basename(inside.rstrip("/")) or "."
    send_copy_report(sock, ok=True)
    sent = 0
    for data in tar_chunks([(inside, name)], COPY_DATA_BYTES):
        send_copy_frame(sock, b"D", data)
        sent += len(data)
    return {"bytes": sent}


def copy_in(sock, path, view, as_name):
    """Write the tar stream read from sock (to its EOF) into the folder path, or, as_name
    (a stream of one top entry), as path itself when path is no folder (a file there is
    replaced; unpack_tar's
    way: no partial file under its name). Returns {"files", "bytes"}. Raises CopyRefused,
    TarError, OSError."""
    inside = resolve_in_folder(path, view)
    rename = None
    if not os.path.isdir(inside):
        parent = resolve_in_folder(os.path.dirname(path.rstrip("/")) or ".", view)
        if not (as_name and os.path.isdir(parent)):   # (a file there: replaced, as cp does)
            raise CopyRefused("not_found", f"{path}: no such folder in the job's working folder")
        inside, rename = parent, os.path.basename(path.rstrip("/"))
    send_copy_report(sock, ok=True)
    done = unpack_tar(TarReader(sock.recv), inside, rename)
    return {"files": done["files"], "bytes": done["bytes"]}


COPY_ERROR_KINDS = {errno.ENOSPC: "resource_exhausted", errno.EDQUOT: "resource_exhausted",
                    errno.ENOENT: "not_found", errno.EACCES: "permission_denied",
                    errno.EPERM: "permission_denied"}


def copier_main(request, sock):
    """A copy into or out of a job's working folder (request: "direction" in or out,
    "folder" its host path, "view" where the job sees it, "uid", "path", "as_name"), as the
    job's uid, chrooted in the folder. Never returns."""
    code = 1
    try:
        fd = os.open(request["folder"], os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
        os.fchdir(fd)
        os.chroot(".")            # the folder is all there is from here on
        os.chdir("/")
        uid = request["uid"]
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.umask(0o022)
        if request["direction"] == "out":
            done = copy_out(sock, request["path"], request["view"])
        else:
            done = copy_in(sock, request["path"], request["view"], request.get("as_name"))
        send_copy_report(sock, ok=True, **done)
        code = 0
    except CopyRefused as e:
        with contextlib.suppress(OSError):
            send_copy_report(sock, error=str(e), kind=e.kind)
    except (TarError, ValueError, OverflowError) as e:   # (a stream's numbers, names)
        with contextlib.suppress(OSError):
            send_copy_report(sock, error=str(e), kind="invalid")
    except OSError as e:
        kind = COPY_ERROR_KINDS.get(getattr(e, "errno", None), "invalid")
        why = "no room left in the job's working folder" if kind == "resource_exhausted" \
            else (getattr(e, "strerror", None) or str(e) or type(e).__name__)
        with contextlib.suppress(OSError):
            send_copy_report(sock, error=why, kind=kind)
    finally:
        os._exit(code)


# -- exec: a command in a running job -------------------------------------------------
#
# Made by a helper the spawner forks: it joins the job's cgroup and its command's
# namespaces, then forks the command, which drops to the job's uid and syscall filter before it execs.
# The helper relays between the server and the command in frames (COPY_FRAME): from the
# server "I" stdin bytes, "E" stdin's end, "W" a terminal size (JSON [rows, columns]); to
# it "R" a report (JSON: started, or why not), "O" stdout, "e" stderr, and last "X" how the
# command ended (JSON). The server going away (a restart, a client that left) ends the
# command: an exec never runs on unwatched.

# The namespaces an exec joins: its command's (pid 2 of the job's pid namespace; its pid 1,
# the shim, stays in the host's others).
EXEC_NAMESPACES = (("ipc", CLONE_NEWIPC), ("uts", CLONE_NEWUTS), ("net", CLONE_NEWNET),
                   ("cgroup", CLONE_NEWCGROUP), ("pid", CLONE_NEWPID), ("mnt", CLONE_NEWNS))


def command_of(shim):
    """The host pid of a job's command (pid 2 of its namespace) from its record's shim
    facts, or None. (A job started before the shim was its pid 1: its init's child.)"""
    shim = shim or {}
    if shim.get("command_pid"):
        return shim["command_pid"]
    init = shim.get("init_pid")
    return next((p for p in children_of(init) if innermost_pid(p) == 2), None) if init else None


def enter_job(request):
    """Join the job's cgroup and its command's namespaces (this process's children are in
    its pid namespace). Raises OSError; CopyRefused if its command is no longer the job's."""
    command = command_of(request)
    if command is None:
        raise CopyRefused("failed_precondition", "the job has ended")
    handles = []
    try:
        for name, kind in EXEC_NAMESPACES:
            handles.append((os.open(f"/proc/{command}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC),
                            kind))
        # Checked once the handles are open: the pid cannot have been reused before. The
        # job's cgroup holds it, as pid 2 of its namespace.
        procs = os.path.join(request["cgroup_dirs"][0], "cgroup.procs")
        if str(command) not in read_file(procs, "").split() or innermost_pid(command) != 2:
            raise FileNotFoundError
    except FileNotFoundError:
        for fd, _ in handles:
            os.close(fd)
        raise CopyRefused("failed_precondition", "the job has ended") from None
    for folder in request["cgroup_dirs"]:
        write_file(os.path.join(folder, "cgroup.procs"), "0")
    for fd, kind in handles:
        setns(fd, kind)
        os.close(fd)


def exec_child(request, stdio, error_w, syscall_filter):
    """The command's process: its terminal or pipes, the job's uid, folder, filter; exec.
    Never returns."""
    code = 126
    try:
        os.setsid()
        if request.get("terminal"):
            import termios
            fcntl.ioctl(stdio[0], termios.TIOCSCTTY, 0)
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        become_job_user(request["uid"])
        os.chdir(request["workdir"])
        install_syscall_filter(syscall_filter)
        argv = request["argv"]
        code = 127
        os.execvpe(argv[0], argv, request["env"])
    except OSError as e:
        missing = code == 127 and e.errno in (errno.ENOENT, errno.ENOTDIR)
        code = 127 if missing else 126
        why = "command not found" if missing else (e.strerror or str(e))
        with contextlib.suppress(OSError):
            os.write(error_w, json.dumps({"error": f"{request['argv'][0]}: {why}",
                                          "exit_code": code}).encode())
    finally:
        os._exit(code)


def exec_main(request, sock):
    """A command in a running job (request: init_pid, cgroup_dirs, uid, workdir, env, argv,
    terminal [rows, columns] or none), relayed on sock until it ends. Never returns."""
    child, reaped = None, False
    try:
        syscall_filter = prepared_syscall_filter(JOB_SYSCALL_FILTER)
        enter_job(request)
        ours, stdio = exec_stdio(request.get("terminal"))
        error_r, error_w = os.pipe2(os.O_CLOEXEC)
        child = os.fork()
        if child == 0:
            sock.close()
            exec_child(request, stdio, error_w, syscall_filter)
        os.close(error_w)
        for fd in set(stdio):
            os.close(fd)
        failed = _read_all(error_r)
        if failed:
            report = json.loads(failed)
            send_copy_report(sock, ok=True)   # first: the server reads nothing before it
            send_copy_frame(sock, b"e", (report["error"] + "\n").encode())
            send_copy_frame(sock, b"X", json.dumps({"exit_code": report["exit_code"]}).encode())
            os._exit(0)
        send_copy_report(sock, ok=True)
        reaped = relay_exec(sock, child, ours)
    except CopyRefused as e:
        with contextlib.suppress(OSError):
            send_copy_report(sock, error=str(e), kind=e.kind)
    except OSError as e:
        with contextlib.suppress(OSError):
            send_copy_report(sock, error=f"cannot enter the job: {e.strerror or e}",
                             kind="failed_precondition")
    finally:
        if child and not reaped:   # (a command the server no longer watches)
            with contextlib.suppress(OSError):
                os.killpg(child, signal.SIGKILL)
        os._exit(0)


def exec_stdio(terminal):
    """({fd: what the helper reads or writes}, the command's (stdin, stdout, stderr)): a
    pty of the job's own devpts (we are in its mount namespace), or three pipes."""
    if terminal:
        import termios
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *terminal, 0, 0))
        os.set_inheritable(slave, False)
        return {"in": master, "out": master}, (slave, slave, slave)
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    return {"in": stdin_w, "out": out_r, "err": err_r}, (stdin_r, out_w, err_w)


def relay_exec(sock, child, ours):
    """Relay frames from sock to the command's stdin, its output to sock, until it has
    ended and its output is read; then say how it ended. Returns whether it was reaped
    (False: the server went away first, and exec_main's finally kills the command)."""
    reading = {ours[key]: kind for key, kind in (("out", b"O"), ("err", b"e")) if key in ours}
    stdin, pending = ExecStdin(ours["in"], closable="err" in ours), b""
    while reading:
        for fd, events in exec_poll(sock, reading, stdin):
            if fd == sock.fileno():
                pending = exec_input(sock, pending, stdin)
                if pending is None:
                    return False   # the server went away
            elif fd == stdin.fd and events & (select.POLLOUT | select.POLLERR | select.POLLHUP):
                stdin.flush()   # (a closed stdin: POLLERR alone; the write's EPIPE drops it)
            if fd in reading and events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                try:
                    data = os.read(fd, 64 * KiB)
                except BlockingIOError:   # (a terminal's master, shared with stdin)
                    continue
                except OSError:   # EIO: a terminal whose every slave is closed
                    data = b""
                if data:
                    send_copy_frame(sock, reading[fd], data)
                else:
                    del reading[fd]
    _, status = os.waitpid(child, 0)
    ended = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {
        "exit_code": os.WEXITSTATUS(status)}
    send_copy_frame(sock, b"X", json.dumps(ended).encode())
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(64 * KiB):   # (until the server has read it all and hangs up)
            pass
    return True


def exec_poll(sock, reading, stdin):
    """poll() over the command's output, its stdin while it has bytes to take, and sock
    while stdin has none: a command that reads nothing holds the server back (gRPC's
    flow control) and never blocks the helper. sock's hang-up is seen either way."""
    events = dict.fromkeys(reading, select.POLLIN)
    if stdin.backlog:
        events[stdin.fd] = events.get(stdin.fd, 0) | select.POLLOUT
    events[sock.fileno()] = 0 if stdin.backlog else select.POLLIN
    poller = select.poll()
    for fd, wanted in events.items():
        poller.register(fd, wanted)
    return poller.poll()


class ExecStdin:
    """The command's stdin, written without blocking: what it has not taken yet waits in
    backlog (one read of the server's frames at most). closable: a pipe (a terminal is
    not closed at the caller's end of input)."""

    def __init__(self, fd, closable):
        self.fd, self.closable, self.backlog, self.ended = fd, closable, bytearray(), False
        os.set_blocking(fd, False)

    def write(self, data):
        self.backlog += data
        self.flush()

    def end(self):
        self.ended = self.closable
        self.flush()

    def flush(self):
        try:
            while self.backlog:
                del self.backlog[:os.write(self.fd, self.backlog)]
        except BlockingIOError:
            return
        except OSError:   # (a command that closed its stdin: what it did not take is dropped)
            self.backlog.clear()
        if self.ended and self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def exec_input(sock, pending, stdin):
    """Take what the server sent: frames to the command's stdin, end and size. Returns what
    is left of a frame, or None when the server has gone away."""
    data = sock.recv(256 * KiB)
    if not data:
        return None
    pending += data
    while len(pending) >= COPY_FRAME.size:
        kind, size = COPY_FRAME.unpack(pending[:COPY_FRAME.size])
        if len(pending) < COPY_FRAME.size + size:
            break
        payload = pending[COPY_FRAME.size:COPY_FRAME.size + size]
        pending = pending[COPY_FRAME.size + size:]
        if kind == b"I":
            stdin.write(payload)
        elif kind == b"E":
            stdin.end()
        elif kind == b"W" and not stdin.closable:
            import termios
            rows, columns = json.loads(payload)
            with contextlib.suppress(OSError):
                fcntl.ioctl(stdin.fd, termios.TIOCSWINSZ,
                            struct.pack("HHHH", rows, columns, 0, 0))
    return pending


###############################################################################
# Job engine
###############################################################################

class JobOptions(typing.NamedTuple):
    """How a job runs, apart from its limits."""
    env: tuple = ()               # extra (NAME, value) pairs on top of PATH, HOME, LANG
    workdir: str = ""             # absolute path; default: a fresh folder per job
    as_root: bool = False         # run as uid 0 (inside the namespaces); server must allow it
    host_network: bool = False    # share the host's network namespace
    egress: bool = False          # its own network namespace with outbound access (EGRESS)
    rw_host: bool = False         # the host's filesystem writable (else read-only); admins
    stdin: bool = False           # stdin from the job's input socket (else /dev/null)
    terminal: tuple = ()          # (rows, columns): a terminal on stdin, stdout, stderr
    timeout: float = 0.0          # seconds after its start at which it is stopped; 0: never
    remove: bool = False          # removed with its files once ended and followed by none


def job_environment(spec):
    """The environment a job's command (and what exec runs in it) gets, from its record:
    PATH, HOME, LANG, its own, and TRACEPARENT (its tools join the start's trace)."""
    env = {"PATH": JOB_PATH, "HOME": spec["workdir"], "LANG": "C.UTF-8",
           **dict(spec["options"]["env"])}
    if spec.get("traceparent"):
        env.setdefault("TRACEPARENT", spec["traceparent"])
    return env


class QueueRequest(typing.NamedTuple):
    """Whether and how a start waits for a slot (run --queue, --after, --priority)."""
    wanted: bool = None           # wait when the host is full; None: the server's default
    after: tuple = ()             # (job id, "ok" or "any"): wait for these jobs' ends
    priority: int = 0             # higher first (admins decide; the service checks)
    timeout: float = 0.0          # seconds it may wait before it is cancelled; 0: forever


class PreparedStart(typing.NamedTuple):
    """A start made up to its supervisor's: the job's record, folders and uid are ready."""
    spec: dict
    job_dir: str
    env: dict                     # the command's whole environment
    workdir_size: int
    meta: "JobMeta"


class JobMeta(typing.NamedTuple):
    """What a job is called and how its start is retried; nothing of how it runs."""
    name: str = ""                # unique among its owner's jobs kept; usable as its id
    labels: tuple = ()            # sorted (key, value) pairs, for list filters
    request_id: str = ""          # client-chosen: a retried start returns the first's job
    traceparent: str = ""         # W3C trace context of the start: the job's TRACEPARENT


class EngineConfig(typing.NamedTuple):
    """Server-side settings of the engine; every limit has a default and a maximum."""
    state_dir: str = DEFAULT_STATE_DIR
    cgroup_root: str = ""         # '': automatic (see place_jobs); 'name'; or '/exact/path'
    default_limits: Limits = Limits(**{spec.name: spec.default for spec in LIMITS})
    max_limits: Limits = Limits(**{spec.name: spec.most for spec in LIMITS})   # io 0: none
    output_cap: int = 1 * GiB     # bytes of output kept per job; the rest is discarded
    allow_root: bool = False      # may jobs ask to run as root?
    stop_grace: float = 10.0      # seconds between SIGTERM and SIGKILL by default
    uid_base: int = 0x60000000    # jobs run as uid/gid uid_base + n, one fresh uid per job
    uid_count: int = 1 << 20
    max_running_jobs: int = 1024  # more starts get ResourceExhaustedError
    max_jobs_per_user: int = 0    # running jobs of one owner; 0: a quarter of the above
    max_queued_per_user: int = 10_000   # queued jobs of one owner; more: ResourceExhausted
    queue_by_default: bool = False      # a start that does not say waits when the host is full
    min_free: int = -1            # bytes the state filesystem keeps free; -1: 1%, <= 256 MiB
    workdir_size: int = 1 * GiB   # a server-made working folder is a tmpfs this big; 0: disk
    files_quota: int = 4 * GiB    # a user's jobs' kept working folders: no start beyond it
    hidden_paths: tuple = ()      # host folders jobs must not see (the server's certificates)
    egress_deny: tuple = ()       # CIDRs egress jobs cannot reach, besides EGRESS_ALWAYS_DENIED
    egress_dns: tuple = ()        # the resolvers egress jobs' DNS goes to; (): the host's

    def user_job_cap(self):
        return self.max_jobs_per_user or max(1, self.max_running_jobs // 4)


RESULT_FIELDS = ("started_at", "ended_at", "exit_code", "signal", "error", "cpu_seconds",
                 "peak_memory_bytes", "oom_kills", "output_bytes", "output_truncated",
                 "io_read_bytes", "io_write_bytes")


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
    name: str = ""
    labels: tuple = ()            # sorted (key, value) pairs
    request_id: str = ""
    trace_id: str = ""
    sessions: tuple = ()          # SessionEvents (sessions_shown says which)
    sessions_dropped: int = 0     # events the record had no room for
    timed_out: bool = False       # its timeout stopped it
    network_state: str = ""       # egress jobs: "up", or why their network is gone
    pids: int = 0                 # processes and threads now (running jobs)
    io_read_bytes: int = 0        # read from and written to block devices so far
    io_write_bytes: int = 0
    egress_denied: int = 0        # egress jobs: packets the firewall refused them
    queue_position: int = 0       # queued: its place in the start order (1: next)
    after: tuple = ()             # (job id, "ok" or "any"): the jobs it waits (waited) for
    waiting_for: tuple = ()       # queued: the ids of those it still waits for
    priority: int = 0             # its place in the queue among others'
    queue_timeout: float = 0.0    # seconds it may wait queued (0: forever)

    @property
    def network(self):
        """The job's network mode, as run --network names it."""
        return ("host" if self.options.host_network else "egress" if self.options.egress
                else "none")


class StatusOnDemand:
    """A job's JobStatus, made when first read: an event's observers that read none of it
    (a metric counting starts) cost a start nothing."""
    __slots__ = ("_make", "_made")

    def __init__(self, make):
        self._make, self._made = make, None

    def __getattr__(self, name):
        if self._made is None:
            self._made = self._make()
        return getattr(self._made, name)


class SessionEvent(typing.NamedTuple):
    """Someone wrote to a job's input, watched its terminal, or copied its files."""
    time: float
    user: str
    event: str                    # "input", "input-end", "taken-over", "watch", "copy-in"...
    bytes: int = 0


MAX_SESSIONS_SHOWN = 100         # the last writes (input, input-end, taken-over) shown
MAX_WATCHES_SHOWN = 20           # and the last watches, however many watches came since


class JobSessions:
    """Who wrote to a job or watched it, and when: SESSIONS_FILE in its folder, bounded
    (MAX_SESSIONS_BYTES, watches up to WATCH_SESSIONS_BYTES so that writes keep room of
    their own), and a count of the events it had no room for (SESSIONS_DROPPED_FILE)."""

    def __init__(self, job_dir):
        self.dir = job_dir
        self.last_watch = {}          # user -> when their last watch was kept
        self._dropped = None          # (read from SESSIONS_DROPPED_FILE on first use)

    def record(self, user, event, nbytes, now):
        """Keep one SessionEvent; a user's watches within WATCH_WINDOW are one. Returns
        False when it found no room (and was counted). Raises OSError."""
        if event == "watch":
            if now - self.last_watch.get(user, -math.inf) < WATCH_WINDOW:
                return True   # (the same watcher again: kept once a window)
            self.last_watch[user] = now
        line = json.dumps({"time": now, "user": user, "event": event, "bytes": nbytes}) + "\n"
        room = WATCH_SESSIONS_BYTES if event == "watch" else MAX_SESSIONS_BYTES
        with os.fdopen(open_job_file(os.path.join(self.dir, SESSIONS_FILE),
                                     os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a") as f:
            if f.seek(0, os.SEEK_END) + len(line) <= room:
                f.write(line)
                return True
        self._dropped = self.dropped() + 1
        write_json_atomic(os.path.join(self.dir, SESSIONS_DROPPED_FILE), self._dropped)
        return False

    def dropped(self):
        """How many events found no room."""
        if self._dropped is None:
            saved = _load_json(os.path.join(self.dir, SESSIONS_DROPPED_FILE))
            self._dropped = saved if isinstance(saved, int) else 0
        return self._dropped

    def shown(self):
        """The last MAX_SESSIONS_SHOWN writes and last MAX_WATCHES_SHOWN watches,
        SessionEvents in time order: no number of watches hides a write."""
        try:
            with os.fdopen(open_job_file(os.path.join(self.dir, SESSIONS_FILE))) as f:
                text = f.read()
        except OSError:
            text = ""
        writes, watches = [], []
        for line in reversed(text.splitlines()):
            if len(writes) >= MAX_SESSIONS_SHOWN and len(watches) >= MAX_WATCHES_SHOWN:
                break
            with contextlib.suppress(ValueError, TypeError):
                event = SessionEvent(**json.loads(line))
                kept, most = (watches, MAX_WATCHES_SHOWN) if event.event == "watch" else (
                    writes, MAX_SESSIONS_SHOWN)
                if len(kept) < most:
                    kept.append(event)
        return tuple(sorted(writes + watches, key=lambda e: e.time))


class Job:
    """One job's in-memory record; its durable state lives in its folder."""

    def __init__(self, job_id, spec, job_dir):
        self.id, self.spec, self.dir = job_id, spec, job_dir
        self.shim = None              # the supervisor's facts (its record's "shim")
        self.cgroup = None            # JobCgroup, once the shim has said which
        self.result = None            # result.json: how it ended
        self.stop_requested = False
        self.stop_at = 0.0            # when this server was asked to stop it
        self.kill_at = None           # monotonic time its stop's grace ends (the earliest)
        self.kill_error = ""          # why that kill failed, if it did
        self.paused = False
        self.ended = threading.Event()
        self._cond = threading.Condition()
        self._version = 0             # bumped on every output change or end
        self._callbacks = set()
        self.output = JobOutput(job_dir)
        self.sessions = JobSessions(job_dir)
        self.files_bytes = None       # its working folder's bytes, counted at its end
        self.timed_out = False        # its timeout stopped it (TIMED_OUT_FILE)
        self.queued = ""              # "queued": waits in the queue; "starting": leaving it
        self.stop_after_start = None  # a stop's grace, asked while it was "starting"
        self.removing = False         # a remover has claimed it (_remove_for_good)
        self.start_untold = False     # its start (or adoption) is not told yet: nor its end
        self.end_untold = False       # it ended meanwhile (Engine._finish, _start_told)
        self.queue_untold = False     # queued, not told yet: the dispatcher's start waits

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

    def followed(self):
        """True while something (an output stream) is subscribed to this job's changes."""
        with self._cond:
            return bool(self._callbacks)

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
    result = job.result
    if job.queued:
        return QUEUED
    if result is None:
        return PAUSED if job.paused else RUNNING
    if result.get("not_run") in (STOPPED, CANCELLED, FAILED):
        return result["not_run"]   # (ended in the queue)
    if result.get("unknown"):
        return UNKNOWN
    if result.get("failed"):
        return FAILED
    if job.stop_requested:
        return STOPPED
    killed = result.get("signal") == signal.SIGKILL or result.get("exit_code") == 137
    if result.get("oom_kills") and killed:
        return OOM_KILLED
    if result.get("signal") is not None:
        return KILLED
    return EXITED


class JobWatcher:
    """One thread that turns kernel events into engine calls: inotify on job folders (output
    written: Job.notify(); result.json renamed in: on_result(job)), a pidfd per job
    supervisor (it exited: on_supervisor_exit(job), which checks whether it left a result),
    and timers (call_at: a stop's grace ends), so that no thread sleeps through a wait.

    epoll, not select: descriptors numbered past 1024 are the rule on a busy server.
    """

    def __init__(self, on_result, on_supervisor_exit):
        self._inotify = inotify_init()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._epoll = select.epoll()
        self._epoll.register(self._inotify, select.EPOLLIN)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._jobs = {}          # wd -> Job
        self._pidfds = {}        # pidfd -> Job
        self._timers = []        # heap of (monotonic time, number, Job, handler)
        self._timer_numbers = iter(range(1 << 62))
        self._lock = threading.Lock()
        self._on_result, self._on_supervisor_exit = on_result, on_supervisor_exit
        self._thread = threading.Thread(target=self._run, name="job-watcher", daemon=True)
        self._thread.start()

    def watch(self, job):
        """Start delivering events for job's folder. Raises OSError."""
        wd = inotify_add_watch(self._inotify, job.dir, IN_MODIFY | IN_MOVED_TO)
        with self._lock:
            self._jobs[wd] = job
        return wd

    def unwatch(self, wd):
        with self._lock:
            self._jobs.pop(wd, None)
        inotify_rm_watch(self._inotify, wd)

    def watch_supervisor(self, job, pid, start_time):
        """Call on_supervisor_exit(job) once the process (pid, start_time) has exited.
        Returns False, and watches nothing, if it is already gone (or pid names another
        process now)."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return False
        # The pidfd pins the process: only now can its start time say it is the same one.
        if process_start_time(pid) != start_time:
            os.close(pidfd)
            return False
        with self._lock:
            self._pidfds[pidfd] = job
        self._epoll.register(pidfd, select.EPOLLIN)
        return True

    def call_at(self, when, job, handler):
        """Call handler(job) from the watcher's thread once time.monotonic() >= when."""
        import heapq
        with self._lock:
            heapq.heappush(self._timers, (when, next(self._timer_numbers), job, handler))
        with contextlib.suppress(BlockingIOError):   # (a full pipe wakes it all the same)
            os.write(self._wake_w, b"t")   # poll again, with the new first timer's timeout

    def _due_timers(self):
        """The (job, handler) of every timer due now; and the ms until the next (-1: none)."""
        import heapq
        due, now = [], time.monotonic()
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                _, _, job, handler = heapq.heappop(self._timers)
                due.append((job, handler))
            wait = math.ceil((self._timers[0][0] - now) * 1000) if self._timers else -1
        return due, wait

    def close(self):
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        with self._lock:
            pidfds, self._pidfds = list(self._pidfds), {}
        for fd in [self._inotify, self._wake_r, self._wake_w, *pidfds]:
            os.close(fd)
        self._epoll.close()

    def _run(self):
        wait = -1
        while True:
            ready = {fd for fd, _ in self._epoll.poll(wait / 1000 if wait >= 0 else -1)}
            if self._wake_r in ready and b"x" in os.read(self._wake_r, 4096):
                return
            due, wait = self._due_timers()
            for job, handler in due:
                self._call(handler, job)
            if self._inotify in ready:
                self._inotify_events()
            with self._lock:
                exited = [(fd, self._pidfds.pop(fd)) for fd in ready if fd in self._pidfds]
            for pidfd, job in exited:
                self._epoll.unregister(pidfd)
                os.close(pidfd)
                self._call(self._on_supervisor_exit, job)

    def _inotify_events(self):
        changed, finished = {}, {}
        for wd, mask, name in inotify_read(self._inotify):
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
            self._call(self._on_result, job)

    @staticmethod
    def _call(handler, job):
        try:
            handler(job)
        except Exception:
            log.exception("handling an event of job %s failed", job.id)


def make_job_folder(path, spec_bytes):
    """A job's folder: an empty output file, and the room its record (spec_bytes of JSON
    and the supervisor's additions) and its result need at the end, so that writing them
    never fails for want of room. Raises OSError (ENOSPC)."""
    os.mkdir(path, 0o700)
    os.close(os.open(os.path.join(path, OUTPUT_FILE),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    reserve_room(os.path.join(path, SPEC_FILE), spec_bytes + SHIM_RECORD_BYTES)
    reserve_room(os.path.join(path, RESULT_FILE), RESULT_RESERVE)


SHIM_RECORD_BYTES = 1 * KiB       # what the supervisor adds to a job's record
SPARE_SPEC_BYTES = 3 * KiB        # records up to this fit a spare folder (most do)


class SpareJobFolders:
    """Job folders and working folders made ahead of time (make_job_folder, mkdir), so that
    a start renames them into place instead of writing its reserves and making a folder
    (~0.3 ms each on a virtual disk). A thread refills them while no start is under way; a
    start finding none, or needing more room, makes its folders itself."""

    WORK_SPARES = ".spare"   # (working folders' spares: in work/, the mount they move within)

    def __init__(self, state_dir, count=2):
        import shutil
        self.dir, self.count = os.path.join(state_dir, "spare"), count
        self.work_dir = os.path.join(state_dir, "work", self.WORK_SPARES)
        for folder in (self.dir, self.work_dir):
            shutil.rmtree(folder, ignore_errors=True)   # a crashed server's: sizes may differ
            os.makedirs(folder, 0o700, exist_ok=True)
        self._ready, self._ready_work, self._lock = [], [], threading.Lock()
        self._wanted, self._closed = threading.Event(), False
        self._wanted.set()
        self._thread = threading.Thread(target=self._refill, name="spare-folders", daemon=True)
        self._thread.start()

    def take(self, job_dir, spec_bytes):
        """Make job_dir a job folder for a record of spec_bytes. Raises OSError."""
        with self._lock:
            spare = self._ready.pop() if self._ready and spec_bytes <= SPARE_SPEC_BYTES else None
        self._wanted.set()
        if spare is None:
            make_job_folder(job_dir, spec_bytes)
        else:
            os.rename(spare, job_dir)
            os.utime(job_dir)   # its age is its start's: a restart awaits young ones

    def take_workdir(self, workdir, uid):
        """Make workdir an empty folder of uid's, mode 0700. Raises OSError."""
        with self._lock:
            spare = self._ready_work.pop() if self._ready_work else None
        self._wanted.set()
        if spare is None:
            os.mkdir(workdir, 0o700)
        else:
            os.rename(spare, workdir)
        os.chown(workdir, uid, uid)

    def close(self):
        import shutil
        self._closed = True
        self._wanted.set()
        self._thread.join(timeout=5)
        for folder in (self.dir, self.work_dir):
            shutil.rmtree(folder, ignore_errors=True)

    def _refill(self):
        failed = False
        while not self._closed:
            self._wanted.wait()
            self._wanted.clear()
            time.sleep(REFILL_DELAY)   # after the start that asked, not during it
            while not self._closed and len(self._ready) < self.count:
                path = os.path.join(self.dir, random_hex(8))
                try:
                    make_job_folder(path, SPARE_SPEC_BYTES)
                except OSError as e:   # a full disk: starts make their own (and say so)
                    if not failed:
                        log.warning("cannot make spare job folders: %s", e.strerror or e)
                    failed = True
                    import shutil
                    shutil.rmtree(path, ignore_errors=True)
                    break
                failed = False
                with self._lock:
                    self._ready.append(path)
            while not self._closed and len(self._ready_work) < self.count:
                path = os.path.join(self.work_dir, random_hex(8))
                try:
                    os.mkdir(path, 0o700)
                except OSError:
                    break   # (said above, if the disk is full: starts make their own)
                with self._lock:
                    self._ready_work.append(path)


LOCK_FILE = "server.lock"
UID_FILE, UID_BLOCK = "uids.json", 256
CGROUP_LOCK_DIR = "/run/steve-jobs"   # one lock file per jobs' cgroup root: who holds it


def take_lock(path, holder):
    """flock path for this process (released when it ends), writing holder into it.

    Returns the lock's fd, or raises BlockingIOError with the holder's words as its
    filename."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        e.filename = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise
    with contextlib.suppress(OSError):   # only informative: a full disk may refuse it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder}\n".encode(), 0)
    return fd


def lock_state_dir(state_dir):
    """Take the state folder for this process.

    Returns the lock's fd. Raises UnavailableError naming the other server's pid."""
    try:
        return take_lock(os.path.join(state_dir, LOCK_FILE), os.getpid())
    except BlockingIOError as e:
        raise UnavailableError(f"another server (pid {e.filename.split()[0]}) is using the "
                               f"state folder {state_dir}; stop it first or choose another "
                               f"--state-dir") from None


def lock_cgroup_root(folder, state_dir):
    """Take the jobs' cgroup root (folder: its path in the first hierarchy) for this
    process, whatever its state folder: a second server there would take the first one's
    cgroups for its own leftovers. The lock lives in CGROUP_LOCK_DIR (cgroupfs holds no
    files of ours); it writes no cgroup.

    Returns the lock's fd. Raises UnavailableError naming the other server."""
    os.makedirs(CGROUP_LOCK_DIR, mode=0o700, exist_ok=True)
    name = folder.replace("%", "%25").replace("/", "%2F") + ".lock"
    try:
        return take_lock(os.path.join(CGROUP_LOCK_DIR, name[-255:]),
                         f"{os.getpid()} {state_dir}")
    except BlockingIOError as e:
        pid, _, other_state = e.filename.partition(" ")
        raise UnavailableError(
            f"another server (pid {pid}, state folder {other_state or '?'}) runs its jobs "
            f"in the cgroup {folder}; stop it first or give this one another "
            f"--cgroup-root") from None


def cgroup_mark(state_dir):
    """What the names of this state folder's job cgroups begin with ("j-" and 8 hex
    digits of its path): a sweep removes only cgroups that bear it."""
    import zlib
    return f"j-{zlib.crc32(os.path.realpath(state_dir).encode()):08x}-"


# -- egress: the firewall that holds every job's egress helper to what it may reach ----

# Link-local (most clouds' metadata endpoints), Alibaba Cloud's and Azure's wire server.
EGRESS_ALWAYS_DENIED = ("169.254.0.0/16", "100.100.100.200/32", "168.63.129.16/32")
EGRESS_CHECK_INTERVAL = 5.0                  # seconds between checks that the table is there
EGRESS_COUNTS_TTL = 1.0                      # seconds a reading of the denied counts is used
EGRESS_UIDS = 1 << 22                        # helper uids: one per possible pid (pid_max)
EGRESS_GROUPS = 1 << 12                      # the helpers' gids, one per server (by its folder)
EGRESS_PACKAGES = {"slirp4netns": "slirp4netns", "nft": "nftables"}   # command: package


def parse_egress_cidrs(texts):
    """The networks of --egress-deny (CIDRs, or single addresses), as strings nft takes.
    Raises ValueError naming the first bad one."""
    import ipaddress
    networks = []
    for text in texts:
        try:
            networks.append(str(ipaddress.ip_network(text.strip(), strict=False)))
        except ValueError:
            raise ValueError(f"--egress-deny {text!r} is not a CIDR (as 10.0.0.0/8) or an "
                             f"address") from None
    return networks


def is_host_address(address):
    """True if address is one of this host's own (binding to it works)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
            return True
        except OSError:
            return False


def egress_resolvers(configured):
    """The IPv4 resolvers egress jobs' DNS goes to: configured (--egress-dns), else the
    host's (/etc/resolv.conf; behind systemd-resolved's 127.0.0.53 stub, its upstream
    servers), without this host's own addresses, which egress cannot reach.
    Raises ValueError for a configured one that is not a usable IPv4 address."""
    import ipaddress
    for address in configured:
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            raise ValueError(f"--egress-dns {address!r} is not an IPv4 address") from None
        if is_host_address(address):
            raise ValueError(f"--egress-dns {address} is an address of this host, which "
                             f"egress jobs cannot reach: name the resolver it forwards to")
    if configured:
        return list(configured)
    for path in ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"):
        found = []
        for line in read_file(path, "").splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    ipaddress.IPv4Address(words[1])
                    if not is_host_address(words[1]):
                        found.append(words[1])
        if found:
            return found[:3]
    return []


class EgressFirewall:
    """The server's nftables table: sockets of the egress helpers' group (gid) may not
    reach this host's own addresses (loopback among them), broadcast or multicast, the
    denied networks or IPv6 at all. Each refusal (a TCP reset, else ICMP) is counted by
    the helper's uid. The table outlives the server, as the jobs do; install() replaces
    its rules in one transaction, keeping its counts."""

    def __init__(self, state_dir, gid, denied, nft="nft"):
        import zlib
        self.table = f"inet steve_jobs_{zlib.crc32(os.path.realpath(state_dir).encode()):08x}"
        self.gid, self.denied, self.nft = gid, list(denied), nft
        self.installed = False
        self.checked_at = 0.0         # when ensure() last found the table in place
        self._counts, self._counts_at = {}, 0.0

    def ruleset(self):
        """nft -f's input: the table made (or kept) and its rules and sets replaced."""
        t = self.table
        v4 = [n for n in self.denied if ":" not in n]
        return "\n".join([
            f"add table {t}",
            f"add set {t} denied {{ typeof meta skuid; size 65535; flags dynamic; counter; }}",
            f"add set {t} deny4 {{ type ipv4_addr; flags interval; auto-merge; }}",
            # Two looks at each packet: before NAT (a DNAT of the host's address, as
            # Docker's published ports, would hide that it was the host's) and after it
            # (a DNAT to the host itself).
            f"add chain {t} output {{ type filter hook output priority filter; "
            f"policy accept; }}",
            f"add chain {t} before_nat {{ type filter hook output priority -150; "
            f"policy accept; }}",
            f"add chain {t} helper", f"add chain {t} deny",
            *(f"flush chain {t} {chain}"
              for chain in ("output", "before_nat", "helper", "deny")),
            f"flush set {t} deny4",
            *([f"add element {t} deny4 {{ {', '.join(v4)} }}"] if v4 else []),
            # Every rule that matches by socket sits behind these: the resets the kernel
            # sends for a refusal have no socket and must pass.
            f"add rule {t} before_nat meta skgid {self.gid} jump helper",
            f"add rule {t} output meta skgid {self.gid} jump helper",
            f"add rule {t} helper fib daddr type {{ local, broadcast, multicast, anycast }}"
            f" jump deny",
            f"add rule {t} helper ip daddr @deny4 jump deny",
            f"add rule {t} helper meta nfproto ipv6 jump deny",
            f"add rule {t} deny update @denied {{ meta skuid }}",
            f"add rule {t} deny meta l4proto tcp reject with tcp reset",
            f"add rule {t} deny reject", ""])

    def install(self):
        """Make or update the table. Raises OSError (subprocess.TimeoutExpired)."""
        run_nft(self.nft, "-f", "-", text=self.ruleset())
        self.installed = True
        self.checked_at = time.monotonic()

    def ensure(self):
        """Put the table back if something removed it (`nft flush ruleset`, a firewall
        reloaded): checked at most every EGRESS_CHECK_INTERVAL seconds. Raises OSError
        (subprocess.TimeoutExpired) if it cannot be installed."""
        if self.installed and time.monotonic() - self.checked_at < EGRESS_CHECK_INTERVAL:
            return
        if self.installed:
            try:
                run_nft(self.nft, "list", "table", *self.table.split())
                self.checked_at = time.monotonic()
                return
            except OSError as e:
                log.error("the egress firewall (%s) is gone (%s): installing it again",
                          self.table, e)
        self.install()

    def denied_count(self, uid):
        """Packets refused so far to the running helper of uid (read at most every
        EGRESS_COUNTS_TTL seconds, for every job at once); 0 if unknown."""
        if time.monotonic() - self._counts_at > EGRESS_COUNTS_TTL:
            try:
                self._counts = egress_denied_counts(self.nft, self.table)
            except Exception as e:   # (OSError, a bad listing, subprocess.TimeoutExpired)
                self._counts = {}
                if self.installed:   # (else there may be no table: no egress job ever ran)
                    log.warning("cannot read the egress firewall's counts: %s", e)
            self._counts_at = time.monotonic()
        return self._counts.get(uid, 0)


class UidPool:
    """The uids jobs run as: handed out in order from where the last server left off (in
    uids.json), never one a job record holds (its files, keyrings and processes are that
    job's alone), never again one retired. Thread-safe."""

    def __init__(self, state_dir, base, count):
        self._path = os.path.join(state_dir, UID_FILE)
        self._base, self._count = base, count
        self._lock = threading.Lock()
        self._file_lock = threading.Lock()
        self._kept = set()       # uids of every job with a record, running or not
        self._next = 0           # uids are handed out in order, never twice in a row
        self._block_end = 0      # what uids.json says: restarts continue from there
        self._retired = set()    # uids of jobs that could leave files on the host

    def load(self):
        """Where the last server stopped handing out uids, and the retired ones."""
        saved = _load_json(self._path)
        saved = saved if isinstance(saved, dict) else {}
        with self._lock:
            self._next = saved.get("next") if isinstance(saved.get("next"), int) else 0
            self._retired = {u for u in saved.get("retired", ()) if isinstance(u, int)}
            self._block_end = self._next

    def keep(self, uid):
        """uid is held by a job record (root's 0 never is)."""
        if uid:
            with self._lock:
                self._kept.add(uid)

    def release(self, uid):
        """uid's job record is gone: it may come back, in its turn, unless retired."""
        with self._lock:
            self._kept.discard(uid)

    def take(self, leaves_files=False):
        """The next uid no record holds. Raises ResourceExhaustedError when every one is.

        leaves_files: the job can write somewhere on the host that outlives it (a --workdir,
        --rw-host): its uid is retired for good, since files it owns may stay there."""
        with self._lock:
            taken = self._kept | self._retired
            for _ in range(min(self._count, len(taken) + 1)):
                uid = self._base + self._next % self._count
                self._next += 1
                if uid not in taken:
                    break
            else:
                raise ResourceExhaustedError("every job uid is held by a job record: rm some")
            self._kept.add(uid)
            if leaves_files:
                self._retired.add(uid)
            save = leaves_files or self._next >= self._block_end
        if save:
            self._save()
        return uid

    def _save(self):
        """Record in uids.json where the next server starts handing out uids (a block
        ahead, so that this is written once per UID_BLOCK starts) and the retired ones.
        Best effort. Not under the pool's lock: each save writes the latest state."""
        with self._file_lock:
            with self._lock:
                self._block_end = max(self._block_end, self._next + UID_BLOCK)
                saved = {"next": self._block_end, "retired": sorted(self._retired)}
            try:
                write_json_atomic(self._path, saved)
            except OSError as e:
                log.warning("cannot record the next job uid (%s): a restart may hand out "
                            "uids of removed jobs again", e.strerror or e)


class StartClaims:
    """Names and request ids, unique per owner: each held by a start under way (PENDING)
    or by the job that has it. Shares the engine's lock: record, forget and job_named are
    called with it held; hold and release take it."""

    def __init__(self, lock):
        self._names = {}              # (owner, name) -> job id, or PENDING while it starts
        self._requests = {}           # (owner, request id) -> job id, or PENDING
        self._settled = threading.Condition(lock)   # a pending start settled

    def hold(self, owner, argv, meta, job_of):
        """Hold meta's name and request id for a start of owner's (until release).

        Returns the id of the job an earlier start with this request id made, waiting
        (bounded) for one still under way (until its supervisor has it, or it failed);
        None: go on and start one. job_of(id): the Job, or None.
        Raises AlreadyExistsError, InvalidArgumentError (the request id came with another
        command), DeadlineExceededError.
        """
        deadline = time.monotonic() + SPAWN_TIMEOUT + KILL_TIMEOUT
        key = (owner, meta.request_id)
        with self._settled:
            while meta.request_id and key in self._requests:
                held = self._requests[key]
                job = job_of(held) if held is not PENDING else None
                if held is not PENDING and (job is None or time.time() - job.spec[
                        "created_at"] > REQUEST_ID_TTL):
                    del self._requests[key]   # old enough to mean another start now
                elif job is not None and (job.shim is not None or job.result is not None
                                          or job.queued):
                    if job.spec["argv"] != argv:
                        raise InvalidArgumentError(
                            f"request_id {quoted(meta.request_id)} started job {held} with "
                            f"another command", reason="REQUEST_ID_REUSED", field="request_id")
                    return held
                elif time.monotonic() >= deadline:
                    raise DeadlineExceededError("a start with this request_id is still under "
                                                "way; try again later")
                else:
                    self._settled.wait(deadline - time.monotonic())
            if meta.name and (owner, meta.name) in self._names:
                raise AlreadyExistsError(f"{owner} already has a job named {quoted(meta.name)}"
                                         f" (rm it, or choose another name)", field="name")
            if meta.name:
                self._names[(owner, meta.name)] = PENDING
            if meta.request_id:
                self._requests[key] = PENDING
        return None

    def release(self, owner, meta):
        """End hold's claim: what the start made now holds them (record); a start that
        made nothing lets them go. Wakes starts waiting on the same request id."""
        with self._settled:
            for table, key in ((self._names, (owner, meta.name)),
                               (self._requests, (owner, meta.request_id))):
                if table.get(key) is PENDING:
                    del table[key]
            self._settled.notify_all()

    def record(self, job_id, spec):
        """The job of spec holds its name and request id."""
        for table, key in ((self._names, spec.get("name")),
                           (self._requests, spec.get("request_id"))):
            if key:
                table[(spec["owner"], key)] = job_id

    def forget(self, job_id, spec):
        """The job of spec is gone: its name and request id are free."""
        for table, key in ((self._names, spec.get("name")),
                           (self._requests, spec.get("request_id"))):
            if table.get((spec["owner"], key)) == job_id:
                del table[(spec["owner"], key)]

    def job_named(self, owner, name):
        """The id of owner's job called name, or None (also while its start is under way)."""
        named = self._names.get((owner, name))
        return None if named is PENDING else named


class QueueEntry:
    """A queued job's place: its owner, priority and number in the order of arrival, the
    jobs it still waits for (--after: id -> "ok" or "any"), and its journal line."""
    __slots__ = ("job_id", "owner", "priority", "seq", "waiting", "line", "met")

    def __init__(self, job_id, owner, priority, seq, waiting, line):
        self.job_id, self.owner, self.priority, self.seq = job_id, owner, priority, seq
        self.waiting, self.line = waiting, line
        self.met = []             # dependencies met since its line was written

    def key(self):
        """Its place among its owner's ready entries: priority, then arrival."""
        return (-self.priority, self.seq, self.job_id)


class JobQueue:
    """The jobs waiting for a slot, in start order: the highest priority first; between
    owners at one priority, round robin (the owner served longest ago goes first); first
    in, first out within an owner. A job waiting for others (--after) is held apart until
    they have ended. Every change is a line of its journal (QUEUE_FILE: {"q": record},
    {"d": id} gone, {"u": [id, dependency]} met), so that the queue outlives the server in
    order. Not thread-safe: the engine's lock guards it."""

    COMPACT_AT = 100_000          # dead journal lines, and more than 4 a live one

    def __init__(self, state_dir):
        self.path = os.path.join(state_dir, QUEUE_FILE)
        self._entries = {}        # job id -> QueueEntry (ready or held)
        self._ready = {}          # owner -> sorted keys of their ready entries
        self._owned = {}          # owner -> how many entries they have (ready or held)
        self._bytes = {}          # owner -> bytes of their entries' records
        self._served = {}         # owner -> the pick that last served them
        self._picks = itertools.count(1)
        self._seq = 0
        self._dependents = {}     # job id -> ids of queued jobs waiting for it
        self._fd = None           # the journal, appended to
        self._dead = 0            # journal lines of entries gone
        self._picked = 0          # entries picked whose start has not settled (their
                                  # lines stay until gone())

    def __len__(self):
        return len(self._entries)

    # -- the journal ------------------------------------------------------------

    def load(self):
        """The records of the jobs a journal left queued, in order of arrival, with the
        dependencies met (in record["queue"]["met"]). A line that cannot be read is skipped
        (logged). Raises OSError but for a missing journal."""
        records, bad = {}, 0
        try:
            with open(self.path, "rb") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                change = json.loads(line)
                if "q" in change:
                    if not isinstance(change["q"]["queue"]["seq"], int):
                        raise TypeError("no seq")
                    records[change["q"]["id"]] = change["q"]
                elif "d" in change:
                    records.pop(change["d"], None)
                elif change["u"][0] in records:
                    records[change["u"][0]]["queue"].setdefault("met", []).append(change["u"][1])
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                bad += 1
        if bad:
            log_line("queue-journal-lines-skipped", "warning", count=bad, path=self.path)
        return sorted(records.values(), key=lambda r: r["queue"]["seq"])

    def open(self):
        """Rewrite the journal with the entries added so far, and append to it from now.
        Raises OSError."""
        self._rewrite()

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _rewrite(self):
        """The journal anew: a line a live entry (its record), then its dependencies met."""
        lines = [e.line + "".join(json.dumps({"u": [e.job_id, dep]}) + "\n" for dep in e.met)
                 for e in sorted(self._entries.values(), key=lambda e: e.seq)]
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, "".join(lines).encode())
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._dead = 0

    def _append(self, change):
        """One line into the journal; one that cannot be written is logged (the queue in
        memory is right; a restart would see the job still queued, or a dependency unmet)."""
        try:
            _write_all(self._fd, (json.dumps(change) + "\n").encode())
        except (OSError, TypeError, ValueError) as e:   # (TypeError: no journal open)
            log_line("queue-journal-not-written", "warning", why=loggable(str(e)))

    # -- entries ----------------------------------------------------------------

    def add(self, record, waiting, journal=True):
        """Queue the job of record (its "queue" has priority and seq, set here if new),
        held while waiting ({id: kind}) is not empty. Raises OSError (the journal)."""
        queue = record["queue"]
        if queue.get("seq") is None:
            self._seq += 1
            queue["seq"] = self._seq
        self._seq = max(self._seq, queue["seq"])
        line = json.dumps({"q": record}) + "\n"
        if journal:
            _write_all(self._fd, line.encode())
        entry = QueueEntry(record["id"], record["owner"], queue.get("priority", 0),
                           queue["seq"], dict(waiting), line)
        self._entries[entry.job_id] = entry
        self._owned[entry.owner] = self._owned.get(entry.owner, 0) + 1
        self._bytes[entry.owner] = self._bytes.get(entry.owner, 0) + len(line)
        for dep in entry.waiting:
            self._dependents.setdefault(dep, set()).add(entry.job_id)
        if not entry.waiting:
            bisect.insort(self._ready.setdefault(entry.owner, []), entry.key())
        return entry

    def remove(self, job_id):
        """Take job_id's entry out of the queue for good (journaled); None if not queued."""
        entry = self._take(job_id)
        if entry is not None:
            self._gone(job_id)
        return entry

    def gone(self, entry):
        """A picked entry's job has started (or ended): journal that it left."""
        self._picked -= 1
        self._gone(entry.job_id)

    def _gone(self, job_id):
        """Journal that job_id left; an empty journal is cut, a mostly dead one rewritten
        (never while a picked entry's line is still its only record)."""
        self._append({"d": job_id})
        self._dead += 1
        if self._picked:
            return
        if not self._entries:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                self._dead = 0
        elif self._dead > self.COMPACT_AT and self._dead > 4 * len(self._entries):
            try:
                self._rewrite()
            except OSError as e:
                log_line("queue-journal-not-compacted", "warning", why=e.strerror or str(e))

    def _take(self, job_id):
        entry = self._entries.pop(job_id, None)
        if entry is None:
            return None
        ready = self._ready.get(entry.owner)
        if not entry.waiting and ready:
            at = bisect.bisect_left(ready, entry.key())
            if at < len(ready) and ready[at] == entry.key():
                del ready[at]
            if not ready:
                del self._ready[entry.owner]
        self._owned[entry.owner] -= 1
        self._bytes[entry.owner] -= len(entry.line)
        if not self._owned[entry.owner]:
            del self._owned[entry.owner], self._bytes[entry.owner]
        for dep in entry.waiting:
            self._unwait(job_id, dep)
        return entry

    def _unwait(self, job_id, dependency):
        waiters = self._dependents.get(dependency, set())
        waiters.discard(job_id)
        if not waiters:
            self._dependents.pop(dependency, None)

    def startable(self, may_start):
        """The id of the job to start next: of the owners may_start(owner) allows, the one
        whose first ready entry has the highest priority, the one served longest ago among
        equals. None if there is none."""
        best = None
        for owner, keys in self._ready.items():
            rank = (keys[0][0], self._served.get(owner, 0), keys[0][1])
            if (best is None or rank < best[0]) and may_start(owner):
                best = (rank, keys[0][2])
        return None if best is None else best[1]

    def pick(self, may_start):
        """startable()'s entry, taken out of the queue (gone() journals it once its start
        has settled), or None."""
        job_id = self.startable(may_start)
        if job_id is None:
            return None
        entry = self._take(job_id)
        self._served[entry.owner] = next(self._picks)
        self._picked += 1
        return entry

    def met(self, job_id, dependency):
        """dependency has ended as job_id asked: it waits for it no more (journaled).
        Returns whether job_id is now ready."""
        entry = self._entries.get(job_id)
        if entry is None or entry.waiting.pop(dependency, None) is None:
            return False
        self._append({"u": [job_id, dependency]})
        entry.met.append(dependency)
        self._unwait(job_id, dependency)
        if not entry.waiting:
            bisect.insort(self._ready.setdefault(entry.owner, []), entry.key())
        return not entry.waiting

    def has_dependents(self, job_id):
        return job_id in self._dependents

    def dependents(self, job_id):
        """Ids of the queued jobs waiting for job_id, with what they wait for (ok, any)."""
        return [(i, self._entries[i].waiting[job_id])
                for i in sorted(self._dependents.get(job_id, ()))]

    def by_owner(self):
        """{owner: how many jobs they have queued}."""
        return dict(self._owned)

    def bytes_of(self, owner):
        """Bytes of owner's queued jobs' records."""
        return self._bytes.get(owner, 0)

    def queued_of(self, owner):
        """How many jobs owner has queued."""
        return self._owned.get(owner, 0)

    def waiting_for(self, job_id):
        """{id: kind} of the jobs job_id still waits for ({} when ready or not queued)."""
        entry = self._entries.get(job_id)
        return dict(entry.waiting) if entry else {}

    def position(self, job_id):
        """Where job_id stands in the start order as things are (1: next), counting each
        other owner's entries that come before it by priority or round robin; 0 for a job
        held by its dependencies, or not queued."""
        entry = self._entries.get(job_id)
        if entry is None or entry.waiting:
            return 0
        key, mine = entry.key(), self._ready[entry.owner]
        ahead = bisect.bisect_left(mine, key)
        first = bisect.bisect_left(mine, (key[0],))   # its owner's first of its priority
        turn = ahead - first                          # rounds of its priority before its
        order = (self._served.get(entry.owner, 0), mine[first][1])   # (startable's rank)
        for owner, keys in self._ready.items():
            if owner != entry.owner:
                higher = bisect.bisect_left(keys, (key[0],))
                equal = bisect.bisect_left(keys, (key[0] + 1,)) - higher
                sooner = equal and (self._served.get(owner, 0), keys[higher][1]) < order
                ahead += higher + min(equal, turn + bool(sooner))
        return ahead + 1


class Engine:
    """Start, stop, inspect and read the output of jobs. Thread-safe; imports no gRPC.

    Every method raises only Error subclasses for things a caller can cause.
    """

    def __init__(self, config=EngineConfig(), layout=None):
        self.config = config
        self._host_layout = layout    # CgroupLayout.detect()'s at open() if None
        self._jobs = {}
        self._order = []              # list_cursor of every job, sorted: List's order
        self._lock = threading.Lock()
        self._spawner = Spawner()
        self._spare_folders = None
        self._watcher = None
        self._lock_fd = None          # the state folder's lock
        self._cgroup_lock_fd = None   # the cgroup root's
        self._mark = ""               # what our job cgroups' names begin with
        self._uids = UidPool(config.state_dir, config.uid_base, config.uid_count)
        self._running = set()         # ids of jobs without a result (queued ones aside)
        self._running_of = {}         # owner -> how many of _running are theirs
        self._queue = JobQueue(config.state_dir)   # guarded by _lock
        self._queue_changed = threading.Condition(self._lock)   # a slot, or a queued job
        self._ended_with_dependents = []   # ids of ended jobs queued ones wait for
        self._dispatcher = None       # the thread that takes queued jobs out, in turn
        self._dispatching = 0         # queued jobs being started (each holds its slot)
        self._starters = None         # the threads that start them (DISPATCH_WORKERS)
        self._kept_files = {}         # owner -> bytes their ended jobs' folders keep
        self._claims = StartClaims(self._lock)   # names and request ids, held by the jobs
        self._placement = None        # where the server and its jobs are: decided at open()
        self._observers = ()          # on_job_event(kind, status, record) callables
        # (a tuple, replaced, never changed: events are told from any thread)
        self._firewall = None         # the EgressFirewall, once open() has installed it
        self._egress = None           # what a shim needs to start an egress helper
        self._egress_error = "the server is not open"   # why egress starts fail, or ""
        self._egress_lock = threading.Lock()
        self._closing = threading.Event()   # set by close(): background checks end

    @property
    def layout(self):
        """The CgroupLayout jobs are made in (the host's, until open() has placed them)."""
        return self._placement.layout if self._placement else self._host_layout

    @property
    def cgroup_root(self):
        """The cgroup folder of the jobs, in every hierarchy of layout."""
        return (self._placement.root if self._placement else
                self.config.cgroup_root or DEFAULT_CGROUP_ROOT)

    # -- life cycle -----------------------------------------------------------

    def observe(self, on_job_event):
        """Call on_job_event(kind, JobStatus, record) at each event of a job's life:
        "queued", "started", "paused", "resumed", "timed-out", "ended", "removed",
        "adopted" (running when the server started); the status has no live usage (no
        cgroup is read for an event). record: the job's
        spec, with its supervisor's "shim" facts (times: started_at, limits_at, exec_at) and
        "stop_at". From any thread; it must be quick."""
        self._observers = self._observers + (on_job_event,)

    def unobserve(self, on_job_event):
        """Stop calling on_job_event (one observe() made)."""
        self._observers = tuple(o for o in self._observers if o != on_job_event)

    def _event(self, kind, job):
        """Log one line of a job's life, and tell the observers. (From the job's records:
        a start must not pay for reading its cgroup.)"""
        result = job.result or {}
        fields = {"job": job.id, "owner": loggable(job.spec["owner"]),
                  "state": derive_state(job)}
        if kind == "ended":
            fields.update(exit_code=result.get("exit_code"), signal=result.get("signal"),
                          why=loggable(result["error"]) if result.get("error") else None)
        log_line(f"job-{kind}", trace_id=trace_id_of(job.spec.get("traceparent", "")) or "-",
                 **{k: v for k, v in fields.items() if v is not None})
        observers = self._observers
        if not observers:
            return
        st = StatusOnDemand(lambda: self._status(job, live=False))
        record = {**job.spec, "shim": job.shim or {}, "stop_at": job.stop_at}
        for observer in observers:
            try:
                observer(kind, st, record)
            except Exception:
                log.exception("a job event observer failed")

    def open(self):
        """Check the host, start the spawner and the watcher, reload state, sweep leftovers.

        Raises UnavailableError when the host cannot run jobs (not root, no cgroups...).
        """
        if os.geteuid() != 0:
            raise UnavailableError("the job engine must run as root")
        if self._host_layout is None:
            self._host_layout = CgroupLayout.detect()
        placement = detect_placement(self._host_layout, self.config.cgroup_root)
        missing = placement.layout.missing()
        if missing:
            raise UnavailableError(
                f"cgroup controllers missing: {', '.join(missing)}" +
                (f" (not offered to {placement.layout.v2_base}: under systemd, Delegate=yes)"
                 if placement.layout.v2_base else ""))
        state_dir = os.path.realpath(self.config.state_dir)
        if any(state_dir == p or state_dir.startswith(p + "/") for p in STATE_DIR_REFUSED):
            raise UnavailableError("the state directory cannot be under /tmp or /dev/shm: "
                                   "jobs get private ones, so they would not see their files")
        unsafe = unsafe_state_dir(state_dir)
        if unsafe:
            raise UnavailableError(unsafe)
        # Jobs run as other uids and must reach their working folders inside the state dir.
        parent = os.path.dirname(state_dir)
        while parent != "/":
            if os.path.exists(parent) and not os.stat(parent).st_mode & 0o001:
                raise UnavailableError(
                    f"jobs could not reach their working folders: {parent} is not searchable "
                    f"by other users (chmod o+x it, or choose another state directory)")
            parent = os.path.dirname(parent)
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        for sub in ("jobs", "work"):
            os.makedirs(os.path.join(state_dir, sub), mode=0o700, exist_ok=True)
        os.chmod(self.config.state_dir, 0o711)
        os.chmod(os.path.join(self.config.state_dir, "jobs"), 0o700)
        os.chmod(os.path.join(self.config.state_dir, "work"), 0o711)
        keep_mounts_private(os.path.join(self.config.state_dir, "work"))
        # Before anything touches jobs or cgroups: a second server on this folder would
        # take the first one's jobs for leftovers and kill them.
        self._lock_fd = lock_state_dir(self.config.state_dir)
        try:
            self._cgroup_lock_fd = lock_cgroup_root(
                JobCgroup.roots(placement.layout, placement.root)[0], state_dir)
        except (OSError, Error):
            self._release_locks()
            raise
        self._mark = cgroup_mark(state_dir)
        take_placement(placement)
        self._placement = placement
        job_open_files, open_files = raise_open_files_limit()
        if open_files != job_open_files:
            log.info("open files limit raised from %d to %d (jobs keep %d)",
                     job_open_files, open_files, job_open_files)
        if read_file(KSM_RUN, "0").strip() == "1":
            log.info("KSM runs: the job supervisors' identical pages are kept once (README: "
                     "Batch hosts)")
        self._watcher = JobWatcher(self._record_end, self._supervisor_exited)
        self._spare_folders = SpareJobFolders(self.config.state_dir)
        self._uids.load()
        self._open_egress()
        self._load_jobs()
        try:
            self._load_queue()
        except OSError as e:
            self._release_locks()
            raise UnavailableError(f"cannot read or write the queue's journal "
                                   f"{self._queue.path}: {e.strerror or e}") from None
        for job in self._all_jobs():   # (after the queue: what waits for them is known)
            self._arm_removal(job)
        if any(j.spec["options"].get("egress") and j.result is None for j in self._all_jobs()):
            with contextlib.suppress(FailedPreconditionError):
                self._egress_ready()
        self._sweep_working_folders()
        self._sweep_cgroups()
        self._spawner.start({"layout": self.layout.to_dict(),
                             "cgroup_root": self.cgroup_root, "mark": self._mark,
                             "limits": self.effective_limits(Limits())._asdict(),
                             "open_files": job_open_files,
                             "hidden": [os.path.realpath(p) for p in
                                        (self.config.state_dir, *self.config.hidden_paths)],
                             "work": os.path.realpath(os.path.join(state_dir, "work")),
                             "private_size": self.config.workdir_size or PRIVATE_DIR_SIZE,
                             "egress": self._egress})
        self._dispatcher = threading.Thread(target=self._dispatch, name="queue-dispatcher",
                                            daemon=True)
        self._dispatcher.start()
        return self

    def _open_egress(self):
        """Check what egress networks need: the helper and nft found (what is missing fails
        egress starts only, with FailedPreconditionError, never the server). Bad settings
        (--egress-deny, --egress-dns) raise UnavailableError. The firewall is installed
        by the first egress start (_egress_ready), or here if jobs of an earlier server
        have egress networks: its rules are then this server's at once."""
        import shutil
        try:
            denied = parse_egress_cidrs(EGRESS_ALWAYS_DENIED + tuple(self.config.egress_deny))
            resolvers = egress_resolvers(self.config.egress_dns)
        except ValueError as e:
            raise UnavailableError(str(e)) from None
        resolvers = self._reachable_resolvers(resolvers, denied)
        missing = [f"{command} (Debian's {package} package)"
                   for command, package in EGRESS_PACKAGES.items() if not shutil.which(command)]
        if missing:
            self._egress_error = (f"egress networks need {' and '.join(missing)}, which this "
                                  f"host lacks")
            log.warning("%s: egress starts will fail", self._egress_error)
            return
        # The helpers' uids come after the jobs' (one per possible pid of a shim), then
        # their group, one of EGRESS_GROUPS by the state folder (a second server's helpers
        # are not its table's to count): never a job's uid or gid.
        import zlib
        helpers = self.config.uid_base + self.config.uid_count
        gid = helpers + EGRESS_UIDS + zlib.crc32(
            os.path.realpath(self.config.state_dir).encode()) % EGRESS_GROUPS
        self._firewall = EgressFirewall(self.config.state_dir, gid, denied, shutil.which("nft"))
        # Where warm shims' helpers log until a job takes them (their log then moves into
        # its folder): emptied here, as nothing warm outlives a spawner.
        spare_logs = os.path.join(self.config.state_dir, "egress")
        shutil.rmtree(spare_logs, ignore_errors=True)
        os.makedirs(spare_logs, mode=0o700, exist_ok=True)
        self._egress = {"helper": shutil.which("slirp4netns"), "gid": gid, "dns": resolvers,
                        "uid_base": helpers, "table": self._firewall.table,
                        "nft": self._firewall.nft, "spare_logs": spare_logs}
        self._egress_error = ""
        if not resolvers:
            log.warning("egress jobs get no DNS: the host names no resolver they can reach "
                        "(--egress-dns names one)")

    def _reachable_resolvers(self, resolvers, denied):
        """resolvers without those in a denied network (a cloud's 169.254.169.254, a
        private one an operator denied): egress jobs could not reach them. Raises
        UnavailableError for such a one given with --egress-dns."""
        import ipaddress
        networks = [ipaddress.ip_network(n) for n in denied]
        kept = []
        for address in resolvers:
            if not any(ipaddress.ip_address(address) in n for n in networks):
                kept.append(address)
            elif self.config.egress_dns:
                raise UnavailableError(f"--egress-dns {address} is in a network egress jobs "
                                       f"may not reach (--egress-deny, 169.254.0.0/16)")
            else:
                log.warning("egress jobs' DNS does not go to the host's resolver %s: it is in "
                            "a network they may not reach (--egress-dns names another)",
                            address)
        return kept

    def _egress_ready(self):
        """Install the egress firewall (once; put back if it went). Raises
        FailedPreconditionError."""
        with self._egress_lock:   # (starts wait for the first install: they need it)
            if self._egress_error:
                raise FailedPreconditionError(self._egress_error, reason="EGRESS_UNAVAILABLE")
            first = not self._firewall.installed
            try:
                self._firewall.ensure()
            except Exception as e:   # (OSError, subprocess.TimeoutExpired)
                log.warning("cannot install the egress firewall: %s", e)
                raise FailedPreconditionError(f"cannot install the egress firewall: {e}",
                                              reason="EGRESS_UNAVAILABLE") from None
        if first:
            log_line("egress firewall installed", table=self._firewall.table.split()[1],
                     helper=self._egress["helper"], dns=",".join(self._egress["dns"]) or
                     "none", denied=",".join(self._firewall.denied), gid=self._firewall.gid)
            threading.Thread(target=self._keep_firewall, name="egress-firewall",
                             daemon=True).start()

    def _keep_firewall(self):
        """While egress jobs run, check every EGRESS_CHECK_INTERVAL seconds that their
        firewall is still there, and put it back if not (a removed table would let their
        helpers reach the host)."""
        while not self._closing.wait(EGRESS_CHECK_INTERVAL):
            with self._lock:
                running = [self._jobs[i] for i in self._running if i in self._jobs]
            if any(j.spec["options"].get("egress") for j in running):
                with contextlib.suppress(FailedPreconditionError):
                    self._egress_ready()

    def close(self, stop_jobs=False):
        """Stop serving; with stop_jobs, stop every running job first (bounded). Queued
        jobs stay queued, in the journal, for the next server."""
        self._closing.set()   # (first: no queued job starts in the slots stops free)
        with self._queue_changed:
            self._queue_changed.notify()
        if self._dispatcher:   # (it may be starting a job: the spawner must outlive that)
            self._dispatcher.join(SPAWN_TIMEOUT + KILL_TIMEOUT)
        if stop_jobs:
            stopping = []
            for job in [j for j in self._all_jobs() if j.result is None and not j.queued]:
                with contextlib.suppress(Error):
                    stopping.append((job, self.request_stop(
                        job.id, grace=min(self.config.stop_grace, 2.0))))
            for job, deadline in stopping:
                job.ended.wait(max(0.0, (deadline or 0) - time.monotonic()))
        self._spawner.close()
        with self._lock:
            self._queue.close()
        if self._watcher:
            self._watcher.close()
        if self._spare_folders:
            self._spare_folders.close()
        if self._cgroup_lock_fd is None:   # never opened: no cgroup of ours to clean
            self._release_locks()
            return
        # Warm supervisors may still be removing their cgroups: give them a moment.
        owned = {j.cgroup.name for j in self._all_jobs() if j.result is None and j.cgroup}
        deadline = time.monotonic() + 2.0 * TIME_SCALE
        while (JobCgroup.names(self.layout, self.cgroup_root) - owned
               and time.monotonic() < deadline):
            time.sleep(0.02)
        JobCgroup.remove_root(self.layout, self.cgroup_root)
        if self._placement and self._placement.supervisor:
            hand_back_controllers(self._placement)
        self._release_locks()

    def _release_locks(self):
        for attr in ("_cgroup_lock_fd", "_lock_fd"):
            if getattr(self, attr) is not None:
                os.close(getattr(self, attr))
                setattr(self, attr, None)

    def _load_jobs(self):
        """Re-adopt the jobs in the state directory after a restart.

        A folder without a record is a start the last server died in: its supervisor may
        still be starting it. Such starts are awaited (up to SPAWN_TIMEOUT from their
        beginning) so that the job is known, by its request id too, before any call is
        served and before leftover cgroups are swept; the rest are removed."""
        jobs_dir = os.path.join(self.config.state_dir, "jobs")
        unrecorded = []
        for name in os.listdir(jobs_dir):
            job_dir = os.path.join(jobs_dir, name)
            spec = _load_json(os.path.join(job_dir, SPEC_FILE))
            if spec is None:
                unrecorded.append((name, job_dir))
            else:
                self._adopt(name, job_dir, spec)
        while unrecorded:
            for name, job_dir in list(unrecorded):
                spec = _load_json(os.path.join(job_dir, SPEC_FILE))
                if spec is not None:
                    self._adopt(name, job_dir, spec)
                if spec is not None or not self._may_still_start(job_dir):
                    unrecorded.remove((name, job_dir))
                    if spec is None:
                        self._drop_unstarted(name, job_dir)
            if unrecorded:
                time.sleep(0.05)

    def _adopt(self, job_id, job_dir, spec):
        """Take over the job whose folder and record these are."""
        job = self._new_job(job_id, spec)
        job.stop_requested = os.path.exists(os.path.join(job_dir, STOP_FILE))
        job.timed_out = os.path.exists(os.path.join(job_dir, TIMED_OUT_FILE))
        self._set_shim(job, spec.get("shim"))
        self._arm_timeout(job)   # (its removal is armed once the queue is loaded: open())
        if job.result is None:
            job.start_untold = True   # (an end seen from now on is told after "adopted")
            try:
                with contextlib.suppress(OSError, Error):
                    job.paused = job.cgroup.frozen()   # a pause outlives the server too
                self._watch(job)
                if job.result is None and not self._watch_supervisor(job):
                    self._record_unknown_end(job)
                elif job.result is None:
                    self._event("adopted", job)
            finally:
                self._start_told(job)

    @staticmethod
    def _may_still_start(job_dir):
        """Whether a folder without a record is young enough to be a start under way."""
        try:
            return time.time() - os.stat(job_dir).st_mtime < SPAWN_TIMEOUT
        except OSError:
            return False

    def _drop_unstarted(self, job_id, job_dir):
        """A job folder without a record: a start the server died in before any shim took
        it (the shim writes the record as soon as it has answered). Remove it, and its
        working folder."""
        log.warning("removing %s: a start that never reached its supervisor", job_dir)
        self._remove_folders(job_dir, os.path.join(self.config.state_dir, "work", job_id))

    def _sweep_working_folders(self):
        """Remove the working folders of no job (and the tmpfs on each): `rm` removes a
        job's record, then its files, and a server that died between left these."""
        work = os.path.join(self.config.state_dir, "work")
        known = {j.id for j in self._all_jobs()}
        for name in os.listdir(work):
            if name != SpareJobFolders.WORK_SPARES and name not in known:
                log.warning("removing %s: the working folder of no job", name)
                self._remove_folders(None, os.path.join(work, name))

    def _sweep_cgroups(self):
        """Kill and remove job cgroups of this state folder (by their mark) that no
        running job owns: left by a crash. Others' are left alone, with a line.

        Called before the spawner starts, so no warm shim of ours can be among them.
        """
        owned = {j.cgroup.name for j in self._all_jobs() if j.result is None and j.cgroup}
        unowned = JobCgroup.names(self.layout, self.cgroup_root) - owned
        foreign = sorted(n for n in unowned if not n.startswith(self._mark))
        if foreign:
            log_line("job-cgroups-left", "warning", count=len(foreign),
                     first=loggable(foreign[0]), why="not made for this state folder")
        for name in sorted(unowned - set(foreign)):
            cg = JobCgroup(self.layout, self.cgroup_root, name)
            log_line("job-cgroup-swept", "warning", cgroup=name,
                     why="left by a crash; no running job owns it")
            try:
                if cg.populated():
                    cg.kill()
                cg.remove(timeout=KILL_TIMEOUT)
            except (OSError, Error) as e:
                log.error("cannot remove leftover cgroup %s: %s", name, e)

    def _watch_supervisor(self, job):
        """Have the watcher tell of the supervisor's exit; False if it is gone already."""
        s = job.shim
        return bool(s) and self._watcher.watch_supervisor(job, s["shim_pid"], s["shim_start"])

    def _supervisor_exited(self, job):
        """The job's supervisor is gone (watcher thread). If it wrote no result, the job's
        end cannot be known: kill what is left of the job, remove its cgroup, and record
        state unknown. The killing is done off the watcher thread."""
        self._check_result(job)
        if job.result is not None:
            return
        threading.Thread(target=self._record_unknown_end, args=(job,),
                         name="supervisor-died").start()

    def _record_unknown_end(self, job):
        what = "was killed or crashed"
        if job.cgroup is not None:
            try:
                if job.cgroup.populated():
                    job.cgroup.kill()
                    what += "; its processes were killed"
                job.cgroup.remove(timeout=KILL_TIMEOUT)
            except (OSError, Error) as e:
                log.error("job %s: cannot remove the cgroup of a dead supervisor: %s", job.id, e)
        self._check_result(job)   # it may have written one just before it died
        if job.result is None:
            log.warning("job %s: its supervisor %s", job.id, what)
            result = {"unknown": True, "ended_at": time.time(), "error":
                      f"the job's supervisor {what}; the job's end is unknown"}
            helper_uid = (job.shim or {}).get("egress_uid")
            if helper_uid and self._firewall:   # (the next shim of its pid has its uid)
                result["egress_denied"] = self._firewall.denied_count(helper_uid)
                forget_egress_count(self._firewall.nft, self._firewall.table, helper_uid)
            self._finish(job, result, save=True)

    # -- jobs ---------------------------------------------------------------

    def start(self, owner, argv, limits=Limits(), options=JobOptions(), meta=JobMeta(),
              fill=False, queue=QueueRequest()):
        """Start argv as a job owned by owner; returns its id once the command has exec'd.
        With fill, returns a PreparedStart instead, once its folders are made: fill them
        (open_fill), then launch() it, or abandon() it.

        With queue (QueueRequest: wanted, or the server's default, or dependencies), a
        start that finds no slot, or waits for other jobs, returns the id of a job queued
        (state QUEUED) that the dispatcher starts in its turn; it is checked as a start is,
        but what only its launch can tell (a full disk, a command not found) comes then.

        A command that cannot be started (not found, not executable) still makes a job,
        whose status says why (exit code 127 or 126, as a shell would). A start whose
        meta.request_id owner used in the last 24 h starts nothing and returns that job.
        Raises InvalidArgumentError, PermissionDeniedError, UnavailableError,
        AlreadyExistsError (the name is taken), DeadlineExceededError (a start with this
        request id is still under way), ResourceExhaustedError (a cap of running jobs, or
        of queued ones, or a full state filesystem), FailedPreconditionError (IO limits on
        a host or folder that cannot have them), NotFoundError (a dependency).
        """
        argv = validate_argv(argv)
        limits = self.effective_limits(limits)
        if (limits.io_read_bps or limits.io_write_bps) and not self.layout.has_io():
            raise FailedPreconditionError("this host offers the server no io controller: "
                                          "IO limits cannot be applied",
                                          reason="IO_LIMITS_UNAVAILABLE")
        env = validate_env(options.env)
        if options.as_root and not self.config.allow_root:
            raise PermissionDeniedError("this server does not run jobs as root")
        validate_workdir(options.workdir)
        options = options._replace(terminal=validate_terminal(options.terminal))
        if options.egress and options.host_network:
            raise InvalidArgumentError("a job has one network: the host's or egress, not both",
                                       field="network")
        if options.egress:
            self._egress_ready()
        if not (isinstance(options.timeout, (int, float)) and math.isfinite(options.timeout)
                and 0 <= options.timeout <= MAX_TIMEOUT):
            raise InvalidArgumentError(f"timeout must be between 0 (none) and {MAX_TIMEOUT} "
                                       f"seconds", field="timeout_seconds")
        meta = validate_meta(meta)
        if fill and (queue.wanted or queue.after):
            raise InvalidArgumentError("a start with files cannot wait in the queue (yet): "
                                       "queue it without, then copy in (cp) once it runs",
                                       field="queue")
        # (A start with files does not queue by the server's default either: it fails.)
        queue = self._checked_queue_request(queue._replace(wanted=False) if fill else queue)
        earlier = self._claims.hold(owner, argv, meta, self._jobs.get)
        if earlier:
            return earlier
        queued = None
        try:
            if queue.after or (queue.wanted and not self._has_slot_now(owner)):
                queued = self._enqueue(owner, argv, limits, options, env, meta, queue)
            else:
                try:
                    prepared = self._prepare(owner, argv, limits, options, env, meta)
                except ResourceExhaustedError as e:
                    if not queue.wanted or e.reason not in QUEUE_WAITS_FOR:
                        raise
                    queued = self._enqueue(owner, argv, limits, options, env, meta, queue)
        except BaseException:
            self._claims.release(owner, meta)
            raise
        if queued:
            self._claims.release(owner, meta)   # (the queued job holds them now)
            return queued
        return prepared if fill else self.launch(prepared)

    def launch(self, prepared):
        """A prepared start's end: its job's supervisor started, and through it its
        command. Returns the job id. Raises UnavailableError (and start's)."""
        try:
            return self._launch(*prepared[:4])
        finally:
            self._claims.release(prepared.spec["owner"], prepared.meta)

    def abandon(self, prepared):
        """A prepared start that will not launch: its folders and uid given back."""
        spec = prepared.spec
        try:
            self._release_uid(spec["uid"])
            self._remove_folders(prepared.job_dir, spec["workdir"])
        finally:
            self._claims.release(spec["owner"], prepared.meta)

    def open_fill(self, prepared):
        """A copier (copier_main) into a prepared start's working folder, before anything
        runs there. Raises UnavailableError."""
        spec = prepared.spec
        return self._spawner.run_helper("copy", {
            "direction": "in", "folder": spec["workdir"], "view": spec["workdir"],
            "uid": spec["uid"], "path": ".", "as_name": False})

    def _job_record(self, job_id, owner, argv, limits, options, env, meta, uid):
        """A new job's record (its SPEC_FILE): what it runs, how, and as whom."""
        return {"id": job_id, "owner": owner, "argv": argv, "limits": limits._asdict(),
                "options": options._replace(env=tuple(env.items()))._asdict(),
                "created_at": time.time(), "uid": uid,
                "workdir": options.workdir or os.path.join(self.config.state_dir, "work",
                                                           job_id),
                "name": meta.name, "labels": dict(meta.labels), "request_id": meta.request_id,
                "traceparent": meta.traceparent}

    def _prepare(self, owner, argv, limits, options, env, meta, queued=None):
        """start()'s middle: room, quota, uid, the job's folders. Returns a PreparedStart.
        queued: the queued Job this start is (its id, creation time and queue record)."""
        self._check_room()
        if not options.workdir:
            self._check_files_quota(owner)
        job_id = queued.id if queued else new_job_id()
        job_dir = os.path.join(self.config.state_dir, "jobs", job_id)
        uid = self._allocate_uid(owner, root=options.as_root, holds_slot=bool(queued),
                                 leaves_files=bool(options.workdir or options.rw_host))
        spec = self._job_record(job_id, owner, argv, limits, options, env, meta, uid)
        workdir = spec["workdir"]
        if queued:
            spec.update(created_at=queued.spec["created_at"], queue=queued.spec["queue"],
                        dispatched_at=spec["created_at"])
        env = job_environment(spec)
        workdir_size = self._workdir_size(options, limits)
        try:
            limits = self._prepare_folders(spec, options, limits, workdir_size)
        except BaseException:
            self._release_uid(uid)
            self._remove_folders(job_dir, workdir if not options.workdir else "")
            raise
        spec["limits"] = limits._asdict()
        return PreparedStart(spec, job_dir, env, workdir_size, meta)

    def _launch(self, spec, job_dir, env, workdir_size, queued=None):
        """start()'s end: the job recorded and watched, then spawned. Returns its id.
        queued: the queued Job this start is, which becomes a running one."""
        job_id, options = spec["id"], JobOptions(**spec["options"])
        job = self._promote(queued, spec) if queued else self._new_job(job_id, spec)
        # A job can end (its result seen by the watcher thread) before this thread, back
        # from the spawn, has told of its start: its end is told after that, so that an
        # observer never hears "ended" before "started".
        job.start_untold = True
        self._watch(job)   # before the spawn, or a quick job could end unseen
        try:
            reply = self._spawner.spawn(SpawnRequest(
                spec=spec, job_dir=job_dir, env=env, workdir_size=workdir_size,
                output_cap=self.config.output_cap))
            if not reply.get("shim"):   # no supervisor took it: nothing was started
                raise UnavailableError(reply.get("error") or
                                       "the job's supervisor did not start")
        except Error:
            self._start_told(job)
            if queued:
                self._unpromote(job)
                self._remove_folders(job_dir, spec["workdir"] if not options.workdir else "")
            else:
                self._forget(job, remove_workdir=not options.workdir)
            raise
        except BaseException:   # (a bug: the job's end is still told when it comes)
            self._start_told(job)
            raise
        started = reply.get("ok") and not reply.get("error")
        try:
            self._set_shim(job, reply["shim"])
            if not self._watch_supervisor(job):
                self._supervisor_exited(job)
            if started:
                self._event("started", job)
                self._arm_timeout(job)
        finally:
            self._start_told(job)
        if not started:
            # Not started: the shim writes its result at once; show it before returning.
            job.ended.wait(KILL_TIMEOUT)
        self._check_result(job)
        return job_id

    def _start_told(self, job):
        """job's start (or adoption) has been told, or never will be: its end is told as
        it comes, and one that came meanwhile (_finish) now."""
        with self._lock:
            job.start_untold, untold, job.end_untold = False, job.end_untold, False
        if untold:
            self._tell_end(job)

    def _arm_timeout(self, job):
        """A job started with a timeout is stopped, as stop() does, once it has run that
        long (from the watcher's timer). The time is its record's (its start, created_at
        or dispatched_at for one that was queued, + timeout): it holds across restarts,
        and one missed while no server ran is acted on at once."""
        timeout = job.spec["options"].get("timeout") or 0
        if timeout and job.result is None:
            start = job.spec.get("dispatched_at") or job.spec["created_at"]
            due = start + timeout - time.time()
            self._watcher.call_at(time.monotonic() + max(0.0, due), job, self._time_out)

    def _arm_removal(self, job):
        """A run --rm job that has ended is removed, with its files, REMOVE_GRACE after its
        end (so that a follower that comes late, as run -f --rm's own, still reads it
        all), or once no stream follows it any more."""
        if job.spec["options"].get("remove") and job.result is not None:
            due = job.result.get("ended_at", time.time()) + REMOVE_GRACE - time.time()
            self._watcher.call_at(time.monotonic() + max(0.0, due), job, self._remove_ended)

    def _remove_ended(self, job):
        """(From the watcher's timer.) Remove a run --rm job nobody follows; else look again
        later. The removal runs off the watcher's thread: folders take time to go."""
        if self._jobs.get(job.id) is not job:
            return   # (removed meanwhile)
        if job.followed():
            self._watcher.call_at(time.monotonic() + REMOVE_GRACE, job, self._remove_ended)
            return
        def remove():
            if self._remove_for_good(job):
                log_line("job-removed", job=job.id, why="run --rm")
        threading.Thread(target=remove, name="remove-ended", daemon=True).start()

    def _time_out(self, job):
        """A job's timeout has come (from the watcher's timer): record it, and stop the job."""
        if job.result is not None or job.stop_requested:
            return   # (ended, or already being stopped by someone: not the timeout's doing)
        try:
            os.close(open_job_file(os.path.join(job.dir, TIMED_OUT_FILE),
                                   os.O_WRONLY | os.O_CREAT))
        except OSError as e:   # a full disk: it is stopped all the same
            log.warning("job %s: cannot record its timeout: %s", job.id, e.strerror)
        job.timed_out = True
        self._event("timed-out", job)
        with contextlib.suppress(Error):
            self.request_stop(job.id)

    # -- the queue ------------------------------------------------------------

    def _checked_queue_request(self, queue):
        """queue with the server's default applied, its dependencies deduplicated.
        Raises InvalidArgumentError, NotFoundError (a dependency no job is)."""
        wanted = self.config.queue_by_default if queue.wanted is None else bool(queue.wanted)
        priority, timeout = queue.priority, queue.timeout
        if isinstance(priority, bool) or not isinstance(priority, int) or not (
                -MAX_PRIORITY <= priority <= MAX_PRIORITY):
            raise InvalidArgumentError(f"priority must be between {-MAX_PRIORITY} and "
                                       f"{MAX_PRIORITY}", field="priority")
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout)
                and 0 <= timeout <= MAX_TIMEOUT):
            raise InvalidArgumentError(f"queue_timeout_seconds must be between 0 (none) and "
                                       f"{MAX_TIMEOUT} seconds", field="queue_timeout_seconds")
        after = {}
        for job_id, kind in queue.after:
            if kind not in DEPENDENCY_KINDS:
                raise InvalidArgumentError(f"a dependency is ID:ok or ID:any, not "
                                           f"{quoted(f'{job_id}:{kind}')}", field="after")
            self._get(job_id)   # (NotFoundError: unknown, or removed)
            after[job_id] = "ok" if "ok" in (kind, after.get(job_id)) else "any"
        if len(after) > MAX_AFTER:
            raise InvalidArgumentError(f"a job may wait for {MAX_AFTER} jobs at most",
                                       field="after")
        if (timeout or priority) and not (wanted or after):
            raise InvalidArgumentError("a queue timeout or priority is for a start that may "
                                       "wait: add --queue (or --after)",
                                       field="queue_timeout_seconds" if timeout else "priority")
        return QueueRequest(wanted, tuple(after.items()), priority, timeout)

    def _may_start(self, owner):
        """(With the lock held.) Whether owner may have one more job running."""
        return self._running_of.get(owner, 0) < self.config.user_job_cap()

    def _has_slot(self):
        return len(self._running) < self.config.max_running_jobs

    def _has_slot_now(self, owner):
        """Whether a start of owner's may run at once: a slot is free to them, and no
        queued job that could take it waits for one."""
        with self._lock:
            return (self._has_slot() and self._may_start(owner)
                    and self._queue.startable(self._may_start) is None)

    def _enqueue(self, owner, argv, limits, options, env, meta, queue):
        """Queue a job (JobQueue); the dispatcher starts it in its turn. Returns its id.
        Raises ResourceExhaustedError (owner's queued jobs at their caps; a full state
        disk), NotFoundError (a dependency removed meanwhile)."""
        job_id = new_job_id()
        spec = self._job_record(job_id, owner, argv, limits, options, env, meta, 0)
        spec["queue"] = {"priority": queue.priority, "timeout": queue.timeout,
                         "after": [list(a) for a in queue.after], "seq": None}
        self._check_room()   # (the journal is on the state disk)
        size = len(json.dumps(spec))
        job = self._new_job(job_id, spec, queued=True)
        try:
            with self._lock:
                self._check_queue_room(owner, size)
                gone = [d for d, _ in queue.after if d not in self._jobs]
                if gone:   # (removed since the request was checked)
                    raise NotFoundError(f"no job {quoted(gone[0])}", field="after")
                try:
                    self._queue.add(spec, dict(queue.after))
                except OSError as e:
                    raise ResourceExhaustedError(f"cannot queue the job: {e.strerror or e}",
                                                 reason="STATE_DISK_FULL") from None
                job.queue_untold = True   # (its start, if a slot is free now, waits for it)
                ended = [d for d, _ in queue.after if self._jobs[d].result is not None]
                self._queue_changed.notify()
        except BaseException:
            job.queued = ""
            self._forget(job, remove_workdir=False)
            raise
        try:
            self._event("queued", job)
        finally:
            with self._queue_changed:
                job.queue_untold = False
                self._queue_changed.notify_all()
        self._arm_queue_timeout(job)
        self._settle_dependents(ended)   # (here: its start answers with what they decide)
        return job_id

    def _check_queue_room(self, owner, record_bytes):
        """(With the lock held.) Raises ResourceExhaustedError when owner's queued jobs are
        at --max-queued-per-user, or their records at MAX_QUEUED_BYTES_PER_USER."""
        cap = self.config.max_queued_per_user
        if self._queue.queued_of(owner) >= cap:
            raise ResourceExhaustedError(f"{owner} has {cap} jobs queued, the most one user "
                                         f"may have (--max-queued-per-user)",
                                         reason="TOO_MANY_QUEUED")
        if self._queue.bytes_of(owner) + record_bytes > MAX_QUEUED_BYTES_PER_USER:
            raise ResourceExhaustedError(
                f"{owner}'s queued jobs hold {human_bytes(MAX_QUEUED_BYTES_PER_USER)} of "
                f"commands and environments, the most one user may", reason="TOO_MANY_QUEUED")

    def _load_queue(self):
        """Queue again, in order, what the last server's journal left queued (a job it
        started just before it stopped is running already: skipped). Raises OSError."""
        ended, queued = set(), []
        for record in self._queue.load():
            if record["id"] in self._jobs:
                continue
            met = set(record["queue"].get("met", ()))
            waiting = {d: k for d, k in record["queue"].get("after", []) if d not in met}
            queued.append(self._new_job(record["id"], record, queued=True))
            with self._lock:
                self._queue.add(record, waiting, journal=False)
            ended.update(d for d in waiting
                         if d not in self._jobs or self._jobs[d].result is not None)
        with self._lock:
            self._queue.open()   # (before a timeout, or a dependency, can take one out)
            self._ended_with_dependents += sorted(ended)
        for job in queued:
            self._arm_queue_timeout(job)

    def _arm_queue_timeout(self, job):
        """A queued job with a queue timeout is cancelled once it has waited that long
        (from its creation: the time holds across restarts)."""
        timeout = job.spec["queue"].get("timeout") or 0
        if timeout:
            due = job.spec["created_at"] + timeout - time.time()
            self._watcher.call_at(time.monotonic() + max(0.0, due), job,
                                  self._queue_timed_out)

    def _queue_timed_out(self, job):
        """(From the watcher's timer.) Cancel a job still queued after its queue timeout."""
        timeout = job.spec["queue"]["timeout"]
        self._end_unstarted(job, CANCELLED, f"it waited {timeout:g}s in the queue without "
                                            f"starting (its queue timeout)", timed_out=True)

    def _dispatch(self):
        """The dispatcher thread: settles what queued jobs wait for when jobs end, and
        takes queued jobs out of the queue (JobQueue.pick) while slots are free, each with
        its slot held from then on, for a starter thread (up to DISPATCH_WORKERS at once).
        Woken by every end and every queued job; looks again every QUEUE_SAFETY_NET s."""
        import concurrent.futures
        self._starters = concurrent.futures.ThreadPoolExecutor(
            DISPATCH_WORKERS, thread_name_prefix="queue-start")
        while not self._closing.is_set():
            try:
                with self._queue_changed:
                    ended, self._ended_with_dependents = self._ended_with_dependents, []
                    entry = self._take_startable() if not ended else None
                    if entry is None and not ended:
                        self._queue_changed.wait(QUEUE_SAFETY_NET)
                        continue
                if ended:
                    self._settle_dependents(ended)
                else:
                    self._starters.submit(self._start_queued, entry, self._jobs[entry.job_id])
            except Exception:   # (a bug: logged, and the queue goes on)
                log.exception("the queue's dispatcher failed")
                time.sleep(QUEUE_SAFETY_NET)
        self._starters.shutdown(wait=True)   # (each start is bounded: SPAWN_TIMEOUT)

    def _take_startable(self):
        """(With the lock held.) The next queued job to start, out of the queue, holding
        its slot (so no other start takes it); None when no slot or no starter is free."""
        if self._dispatching >= DISPATCH_WORKERS or not self._has_slot():
            return None
        entry = self._queue.pick(self._may_start)
        if entry is not None:
            job = self._jobs[entry.job_id]
            job.queued = "starting"
            self._add_running(job)
            self._dispatching += 1
        return entry

    def _started_one(self):
        """(With the lock held.) A starter is free again."""
        self._dispatching -= 1
        self._queue_changed.notify()

    def _start_queued(self, entry, job):
        """(A starter thread.) Start a job the dispatcher took out of the queue, in the slot
        it holds; a start that fails ends the job, failed, with why."""
        with self._queue_changed:   # (told "queued" first: _enqueue, a moment away)
            self._queue_changed.wait_for(lambda: not job.queue_untold, KILL_TIMEOUT)
        spec = job.spec
        try:
            options = JobOptions(**{**spec["options"],
                                    "env": tuple(map(tuple, spec["options"]["env"])),
                                    "terminal": tuple(spec["options"].get("terminal", ()))})
            meta = JobMeta(spec["name"], tuple(sorted(spec["labels"].items())),
                           spec["request_id"], spec["traceparent"])
            prepared = self._prepare(spec["owner"], spec["argv"], Limits(**spec["limits"]),
                                     options, dict(options.env), meta, queued=job)
            self._launch(*prepared[:4], queued=job)
        except Exception as e:   # (an Error; or a bug, logged: no job may stay "starting")
            if not isinstance(e, Error):
                log.exception("job %s: starting it from the queue failed", job.id)
            with self._lock:
                self._drop_running(job)   # (its slot: a failed start holds none)
                self._started_one()
            self._end_unstarted(job, FAILED, f"it could not start: {e}", picked=entry)
            return
        with self._lock:
            self._queue.gone(entry)
            self._started_one()
        job.notify()   # (its followers: it runs)
        if job.stop_after_start is not None:   # (a stop came while it was leaving)
            with contextlib.suppress(Error):
                self.request_stop(job.id, job.stop_after_start)

    def _promote(self, job, spec):
        """A queued job leaves the queue: it has its running record (and its slot)."""
        with self._lock:
            job.spec, job.queued = spec, ""
            self._add_running(job)
        return job

    def _unpromote(self, job):
        """A launch of a queued job failed: back as it was, without a uid, leaving
        _start_queued its slot to give back."""
        with self._lock:
            self._uids.release(job.spec["uid"])
            job.spec = {**job.spec, "uid": 0}
            job.queued = "starting"

    def _settle_dependents(self, ended):
        """Jobs in ended have ended (or are gone): each queued job waiting for one no
        longer does, or, if it asked for a success (ok) that did not come, is cancelled."""
        for dep_id in ended:
            with self._lock:
                dep = self._jobs.get(dep_id)
                dependents = self._queue.dependents(dep_id)
            state = derive_state(dep) if dep else "removed"
            code = (dep.result or {}).get("exit_code") if dep else None
            for job_id, kind in dependents:
                if kind == "any" or (state == EXITED and code == 0):
                    with self._lock:
                        if self._queue.met(job_id, dep_id):
                            self._queue_changed.notify()   # (it may start now)
                    continue
                job = self._jobs.get(job_id)
                if job is not None:
                    how = ("was removed" if dep is None else f"ended {state}" + (
                        f" with exit code {code}" if state == EXITED else ""))
                    self._end_unstarted(job, CANCELLED, f"job {dep_id}, which it runs after "
                                        f"(--after {dep_id}:ok), {how}")

    def _end_unstarted(self, job, state, why, timed_out=False, picked=None):
        """End a queued job without running it (STOPPED, CANCELLED, or FAILED: its start
        failed), with why. Its folder then holds its record and result, as an ended job's
        does. picked: its entry, if the dispatcher took it out of the queue. Returns
        whether it was queued still."""
        with self._lock:
            if picked is not None:
                self._queue.gone(picked)
            elif job.queued != "queued" or self._queue.remove(job.id) is None:
                return False
            job.queued = ""
            job.stop_requested = state == STOPPED
            job.timed_out = timed_out
        try:
            os.mkdir(job.dir, 0o700)
            write_json_atomic(os.path.join(job.dir, SPEC_FILE), job.spec)
            for kept, name in ((job.stop_requested, STOP_FILE), (timed_out, TIMED_OUT_FILE)):
                if kept:
                    os.close(open_job_file(os.path.join(job.dir, name),
                                           os.O_WRONLY | os.O_CREAT))
        except OSError as e:   # (what is in memory is still right until a restart)
            log.warning("job %s: cannot record its end in the queue: %s", job.id, e)
        self._finish(job, {"not_run": state, "ended_at": time.time(), "error": why},
                     save=True)
        return True

    def count_kept_files(self, job_id):
        """Count, once more, what an ended job's own working folder keeps (after its end,
        or a copy into it) toward its owner's --files-quota. Raises NotFoundError."""
        self._count_kept_files(self._get(job_id))

    def _count_kept_files(self, job):
        if job.result is None or job.spec["options"]["workdir"]:
            return   # (running: counted at its end; a client's folder: not the server's)
        size = folder_bytes(job.spec["workdir"])   # (a tree on disk is walked: once)
        with self._lock:
            if job.id not in self._jobs:
                return
            owner = job.spec["owner"]
            self._kept_files[owner] = self._kept_files.get(owner, 0) + size - (
                job.files_bytes or 0)
            job.files_bytes = size

    def _check_files_quota(self, owner):
        """Raises ResourceExhaustedError when owner's ended jobs keep files_quota bytes or
        more (kept_files: counted at each end, not summed at each start)."""
        quota = self.config.files_quota
        with self._lock:
            kept = self._kept_files.get(owner, 0)
        if quota and kept >= quota:
            raise ResourceExhaustedError(
                f"{owner}'s jobs keep {human_bytes(kept)} of files, their --files-quota is "
                f"{human_bytes(quota)}: remove some (rm ID) before starting more",
                reason="FILES_QUOTA")

    def _workdir_size(self, options, limits):
        """Bytes of the job's private tmpfs working folder, or 0 for a folder on disk: when
        the client named one, or when IO limits apply (they throttle a disk, not memory)."""
        if options.workdir or limits.io_read_bps or limits.io_write_bps:
            return 0
        return self.config.workdir_size

    def _check_room(self):
        """Raises ResourceExhaustedError when the state filesystem is below its reserve."""
        try:
            st = os.statvfs(self.config.state_dir)
        except OSError as e:
            raise UnavailableError(f"cannot read the state folder: {e.strerror}") from None
        free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        reserve = self.config.min_free
        if reserve < 0:
            reserve = min(size // 100, 256 * MiB)
        if free < max(reserve, RESULT_RESERVE) or (st.f_files and st.f_favail < 16):
            raise ResourceExhaustedError(
                f"the state folder {self.config.state_dir} is full ({human_bytes(free)} free, "
                f"{human_bytes(reserve)} kept in reserve): no job can start until there is room",
                reason="STATE_DISK_FULL")

    def _prepare_folders(self, spec, options, limits, workdir_size):
        """Make the job's folders and take the room its records need at the end.

        Returns the limits with io_device filled in. Raises ResourceExhaustedError (the
        disk is full), InvalidArgumentError; the caller removes what was made."""
        job_dir = os.path.join(self.config.state_dir, "jobs", spec["id"])
        workdir = spec["workdir"]
        try:
            if not options.workdir:
                self._spare_folders.take_workdir(workdir, spec["uid"])
            if not options.workdir and workdir_size:
                # Where the host keeps it; its shim gives the job a clone (share_workdir).
                # nosuid, nodev: the job's uid owns it, on the host too.
                mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
                      f"size={workdir_size},mode=0700,uid={spec['uid']},gid={spec['uid']}")
            if (limits.io_read_bps or limits.io_write_bps) and not limits.io_device:
                if options.workdir:
                    # Not looked up here: the server is root, and whether a path exists
                    # is not the client's to learn.
                    raise InvalidArgumentError("IO limits with a --workdir need io_device "
                                               "(MAJOR:MINOR of the disk to limit)")
                device = whole_disk_of(workdir)
                if not device:
                    raise FailedPreconditionError(
                        f"cannot limit IO: the job's folder {workdir} is on no block device "
                        f"(tmpfs, overlay...); name io_device, or give the server a state "
                        f"folder on a disk")
                limits = limits._replace(io_device=device)
            self._spare_folders.take(job_dir, len(json.dumps(spec).encode()))
        except OSError as e:
            if is_out_of_room(e):
                raise ResourceExhaustedError(
                    f"the state folder {self.config.state_dir} is full: {e.strerror}",
                    reason="STATE_DISK_FULL") from None
            raise InvalidArgumentError(f"cannot prepare the job: {e}") from None
        return limits

    @staticmethod
    def _remove_folders(job_dir, workdir):
        """Remove a job's folder and its own working folder (and the tmpfs on it)."""
        import shutil
        if workdir:
            try:
                unmount_if_mounted(workdir)
            except OSError as e:
                log.warning("cannot unmount %s: %s", workdir, e.strerror or e)
        for path in (job_dir, workdir):
            if path:
                shutil.rmtree(path, ignore_errors=True)

    def effective_limits(self, requested):
        """The limits a job gets (checked_limits with this server's defaults and most).
        Raises InvalidArgumentError."""
        return checked_limits(requested, self.config.default_limits, self.config.max_limits)

    def stop(self, job_id, grace=None):
        """SIGTERM the job, then kill everything in its cgroup once grace seconds have
        passed (request_stop), and wait for its end (bounded); holds no lock while
        waiting. Stopping an ended job changes nothing and returns its status, as
        `docker stop` does. Raises what request_stop and check_stopped raise."""
        job = self._get(job_id)
        deadline = self.request_stop(job_id, grace)
        if deadline is not None:
            job.ended.wait(max(0.0, deadline - time.monotonic()))
            self.check_stopped(job_id)
        return self.status(job_id)

    def request_stop(self, job_id, grace=None):
        """Begin the job's stop without waiting for it: SIGTERM now, and SIGKILL to its
        cgroup when grace seconds have passed, from a timer (no thread waits). Stops of a
        job already stopping share its stop; the earliest kill time holds. Returns the
        monotonic time by which the job should have ended (its kill time plus
        KILL_TIMEOUT), or None if it has. Raises NotFoundError, InvalidArgumentError."""
        job = self._get(job_id)
        grace = self.config.stop_grace if grace is None else grace
        if not (isinstance(grace, (int, float)) and math.isfinite(grace) and 0 <= grace <= 3600):
            raise InvalidArgumentError("grace must be between 0 and 3600 seconds")
        if job.queued and self._stop_queued(job, grace):
            return None
        if job.queued:   # (leaving the queue: its starter stops it once it runs)
            return time.monotonic() + SPAWN_TIMEOUT + grace + KILL_TIMEOUT
        kill_at = time.monotonic() + grace
        with job._cond:   # (check and set: concurrent stops make one)
            if job.result is not None:
                return None
            first = not job.stop_requested
            sooner = job.kill_at is None or kill_at < job.kill_at
            if first:
                job.stop_requested, job.stop_at = True, time.time()
            if sooner:
                job.kill_at = kill_at
        if first:
            try:
                os.close(open_job_file(os.path.join(job.dir, STOP_FILE),
                                       os.O_WRONLY | os.O_CREAT))
            except OSError as e:   # a full disk: the stop goes on; a restart says "killed"
                log.warning("job %s: cannot record the stop request: %s", job_id, e.strerror)
            if grace > 0:   # (none: killed at once, as by kill -9, with no SIGTERM first)
                self._signal_command(job, signal.SIGTERM)
            if job.paused:
                self.resume(job_id, quiet=True)   # a frozen job cannot act on SIGTERM
        if sooner and grace == 0:
            self._kill_stopping(job)
        elif sooner:
            self._watcher.call_at(kill_at, job, self._kill_stopping)
        return job.kill_at + KILL_TIMEOUT

    def _stop_queued(self, job, grace):
        """A stop of a queued job ends it without running it (True); one leaving the queue
        is stopped once it runs (by the dispatcher); False: it runs already."""
        if self._end_unstarted(job, STOPPED, "stopped while queued: it never ran"):
            return True
        with self._lock:
            if job.queued == "starting":
                job.stop_after_start = grace
        return False

    def _kill_stopping(self, job):
        """A stop's grace has ended (from the watcher's timer): kill the job's cgroup."""
        if job.result is not None:
            return   # (also the timer of a kill time a later stop brought forward)
        if job.cgroup is None:   # (stopped before its supervisor said where it runs)
            self._watcher.call_at(time.monotonic() + 0.1, job, self._kill_stopping)
            return
        try:
            self._cgroup_of(job).kill()
        except OSError as e:
            if job.result is None and e.errno != errno.ENOENT:
                job.kill_error = f"cannot kill job {job.id}: {e}"
                log.warning("job %s: %s", job.id, job.kill_error)
                job.notify()   # (the stops waiting say so now)

    def kill_failed(self, job_id):
        """Whether the job's stop could not kill it (check_stopped says why)."""
        return bool(self._get(job_id).kill_error)

    def check_stopped(self, job_id):
        """Raises, for a stop that has waited up to request_stop's deadline, what went
        wrong: UnavailableError (its cgroup cannot be killed), DeadlineExceededError (it
        outlived SIGKILL by KILL_TIMEOUT). Nothing if the job has ended."""
        job = self._get(job_id)
        if job.result is not None:
            return
        if job.kill_error:
            raise UnavailableError(job.kill_error)
        raise DeadlineExceededError(
            f"job {job_id} did not end {KILL_TIMEOUT:g}s after SIGKILL; it may still end")

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
        """Freeze every process of the job (a paused job stays paused: no error).
        Raises NotFoundError, FailedPreconditionError (it has ended)."""
        job = self._get(job_id)
        self._require_running(job)
        self._cgroup_of(job).freeze()
        job.paused = True
        self._event("paused", job)
        return self.status(job_id)

    def resume(self, job_id, quiet=False):
        """Thaw a paused job (a running one goes on: no error).
        Raises NotFoundError, FailedPreconditionError (it has ended)."""
        job = self._get(job_id)
        if not quiet:
            self._require_running(job)
        try:
            self._cgroup_of(job).thaw()
        except (OSError, Error):
            if not quiet:
                raise
        job.paused = False
        if not quiet:
            self._event("resumed", job)
        return self.status(job_id)

    def remove(self, job_id):
        """Delete an ended job's record, output and (server-made) working folder.

        Raises NotFoundError, FailedPreconditionError while the job runs.
        """
        job = self._get(job_id)
        with self._lock:   # (a queued job goes at once: it has nothing to stop)
            if job.queued == "queued" and self._queue.remove(job_id) is not None:
                job.queued, job.stop_requested = "", True
                job.result = {"not_run": STOPPED, "ended_at": time.time(),
                              "error": "removed while queued: it never ran"}
                job.ended.set()
        job.notify()
        if job.end_untold:   # (it has just ended: "removed" must not be told before "ended")
            job.ended.wait(KILL_TIMEOUT)
        if job.result is None:
            raise FailedPreconditionError(f"job {job_id} is still running; stop it first",
                                          reason="JOB_STILL_RUNNING")
        if not self._remove_for_good(job):
            raise NotFoundError(f"no job {quoted(job_id)}")   # (another remover's)

    def _remove_for_good(self, job):
        """An ended job's removal: "removed" told, its dependents settled, its record,
        folders and uid given up. Returns False, doing nothing, if another remover (a
        user's remove, retention, run --rm) has claimed the job: each job goes once, or its
        uid would be given back twice (and could then go to two jobs at once)."""
        with self._lock:
            if job.removing or self._jobs.get(job.id) is not job:
                return False
            job.removing = True
        self._event("removed", job)
        self._settle_dependents([job.id])   # (by its end, before it goes)
        self._forget(job, remove_workdir=not job.spec["options"]["workdir"])
        return True

    def prune(self, max_age=None, max_bytes=None, now=None):
        """Retention: remove ended jobs older than max_age seconds, then the oldest ended
        jobs until the rest's output (with its index) and kept working folders total at most
        max_bytes. Running jobs are never touched. Returns the ids removed.
        """
        now = time.time() if now is None else now
        ended = sorted((j for j in self._all_jobs()   # (an end not told yet: not yet)
                        if j.result is not None and not j.end_untold),
                       key=lambda j: j.result.get("ended_at", 0))
        doomed = [j for j in ended if max_age is not None
                  and now - j.result.get("ended_at", 0) > max_age]
        kept = [j for j in ended if j not in doomed]
        def stored(job):   # its output, with its index, and its kept working folder
            return (job.result.get("output_bytes", 0) + job.result.get("index_bytes", 0)
                    + (job.files_bytes or 0))
        total = sum(map(stored, kept))
        while max_bytes is not None and kept and total > max_bytes:
            oldest = kept.pop(0)
            total -= stored(oldest)
            doomed.append(oldest)
        return [job.id for job in doomed if self._remove_for_good(job)]

    def load_by_user(self):
        """{"running": {owner: jobs}, "queued": {owner: jobs}} now (paused ones run)."""
        with self._lock:
            return {"running": dict(self._running_of), "queued": self._queue.by_owner()}

    def owner(self, job_id):
        """Who started the job. Raises NotFoundError."""
        return self._get(job_id).spec["owner"]

    def status(self, job_id):
        """A JobStatus snapshot, with its sessions (input, watches, copies). Raises
        NotFoundError."""
        job = self._get(job_id)
        return self._status(job)._replace(sessions=job.sessions.shown(),
                                          sessions_dropped=job.sessions.dropped())

    def has_terminal(self, job_id):
        """Whether the job was started with a terminal. Raises NotFoundError."""
        return bool(self._get(job_id).spec["options"].get("terminal"))

    def input_folder(self, job_id):
        """The folder of the running job's input socket (INPUT_SOCKET).
        Raises NotFoundError, FailedPreconditionError (it has ended, or takes no input)."""
        job = self._get(job_id)
        options = job.spec["options"]
        if not (options.get("stdin") or options.get("terminal")):
            raise FailedPreconditionError(
                f"job {job_id} was started without stdin or a terminal (run -i or -t)",
                reason="NO_INPUT")
        self._require_running(job)
        return job.dir

    def open_copy(self, job_id, direction, path, as_name=False):
        """A socket to a copier ("in" or "out") of path in the job's working folder, running
        or ended (copier_main: its frames say whether the copy can go on, then how it
        went; copy_refusal turns a refusal into an Error). Raises NotFoundError,
        InvalidArgumentError, FailedPreconditionError (a job in a host folder),
        UnavailableError."""
        job = self._get(job_id)
        if not isinstance(path, str) or "\0" in path or len(path) > MAX_COPY_PATH:
            raise InvalidArgumentError(f"path must be text of at most {MAX_COPY_PATH} bytes, "
                                       f"without NUL bytes", field="path")
        if job.queued:
            raise FailedPreconditionError(f"job {job_id} is queued: it has no files yet",
                                          reason="JOB_QUEUED")
        if job.spec["options"]["workdir"]:
            raise FailedPreconditionError(
                f"job {job_id} ran in a host folder (--workdir {job.spec['workdir']}): copy "
                f"with the host's own tools", reason="NOT_ITS_OWN_FOLDER")
        folder = job.spec["workdir"]
        if not os.path.isdir(folder):
            raise NotFoundError(f"job {job_id}'s working folder is gone")
        return self._spawner.run_helper("copy", {
            "direction": direction, "folder": folder, "view": folder,
            "uid": job.spec["uid"], "path": path or ".", "as_name": as_name})

    def open_exec(self, job_id, argv, terminal=()):
        """A socket to a helper running argv in the running job (exec_main), as its command
        runs: its namespaces, cgroup, uid, folder, environment and syscall filter; with a
        terminal (rows, columns) of its own. Raises NotFoundError, InvalidArgumentError,
        FailedPreconditionError (the job has ended, or is paused), UnavailableError."""
        job = self._get(job_id)
        argv = validate_argv(argv)
        terminal = validate_terminal(terminal)
        self._require_running(job)
        if job.paused:
            raise FailedPreconditionError(f"job {job_id} is paused: resume it first",
                                          reason="JOB_PAUSED")
        if not (job.shim and job.shim.get("init_pid") and job.cgroup):
            raise FailedPreconditionError(f"job {job_id} did not start",
                                          reason="JOB_NOT_RUNNING")
        return self._spawner.run_helper("exec", {
            "init_pid": job.shim["init_pid"], "command_pid": job.shim.get("command_pid"),
            "cgroup_dirs": job.cgroup.dirs(),
            "uid": job.spec["uid"], "workdir": job.spec["workdir"],
            "env": job_environment(job.spec), "argv": argv, "terminal": list(terminal)})

    def record_session(self, job_id, user, event, nbytes=0):
        """Keep, in the job's folder, that user wrote to (or watched) the job: event is one
        of SessionEvent's (JobSessions.record says what is kept); the log has them all and
        warns once a job when its record is full. Never raises: a record that cannot be
        written is logged."""
        log.info("session job=%s user=%s event=%s bytes=%d", job_id, loggable(user), event,
                 nbytes)
        try:
            sessions = self._get(job_id).sessions
            if not sessions.record(user, event, nbytes, time.time()) and sessions.dropped() == 1:
                log.warning("job %s: its session record is full (%d bytes): further events "
                            "are counted (sessions_dropped), not kept; this log has them all",
                            job_id, MAX_SESSIONS_BYTES)
        except (OSError, Error) as e:
            log.warning("cannot keep job %s's session record: %s", job_id, e)

    def list(self, owner=None, **filters):
        """Statuses of every job (or only owner's), oldest first; filters as iter_jobs."""
        return list(self.iter_jobs(owner, **filters))

    def iter_jobs(self, owner=None, states=(), labels=(), name="", after=None):
        """Statuses of every job (or only owner's) in order of creation, made one by one as
        they are taken, after the cursor `after` (a job's list_cursor). Filters: states
        (any of), labels ((key, value) pairs, all of), name."""
        def wanted(job):
            spec = job.spec
            return ((owner is None or spec["owner"] == owner)
                    and (not name or spec.get("name") == name)
                    and all(spec.get("labels", {}).get(k) == v for k, v in labels)
                    and (not states or derive_state(job) in states))
        with self._lock:   # (a copy of the order: pages are read while jobs come and go)
            order = self._order[bisect.bisect_right(self._order, tuple(after)):] if (
                after is not None) else list(self._order)
        for _, job_id in order:
            job = self._jobs.get(job_id)
            if job is not None and wanted(job):
                yield self._status(job)

    def resolve(self, ref, caller=None, sees_all=True):
        """The id of the job ref names: an id, the name of one of caller's jobs, or a prefix
        of the id of exactly one job the caller sees (every job's with sees_all).

        An id is returned as it is, whoever owns it (the caller's authorization decides).
        Raises InvalidArgumentError (empty, or a prefix of several ids), NotFoundError.
        """
        if not isinstance(ref, str) or not ref:
            raise InvalidArgumentError("job_id is required", field="job_id")
        with self._lock:
            if ref in self._jobs:
                return ref
            named = self._claims.job_named(caller, ref)
            if named is not None:
                return named
            matches = [] if not re.fullmatch(r"[0-9a-f-]{1,35}", ref) else [
                i for i, j in self._jobs.items()
                if i.startswith(ref) and (sees_all or j.spec["owner"] == caller)][:2]
        if len(matches) > 1:
            raise InvalidArgumentError(f"{quoted(ref)} is the start of several job ids; give "
                                       f"more of it", reason="AMBIGUOUS_JOB_ID", field="job_id")
        if not matches:
            raise NotFoundError(f"no job {quoted(ref)}")
        return matches[0]

    def signal(self, job_id, signum, all_processes=False):
        """Send signal signum to the job's command, or with all_processes to every process
        of the job (its init aside); returns its JobStatus.

        Raises NotFoundError, InvalidArgumentError (not a signal number),
        FailedPreconditionError (the job has ended, or its command has and all_processes
        is not set).
        """
        if isinstance(signum, bool) or not isinstance(signum, int) or not 0 < signum < NSIG:
            raise InvalidArgumentError(f"{signum!r} is not a signal number (1-{NSIG - 1})",
                                       field="signal")
        job = self._get(job_id)
        self._require_running(job)
        init_pid = (job.shim or {}).get("init_pid")
        pids = []
        if all_processes:   # (not its init, nor its egress helper: the job's processes)
            helper = (job.shim or {}).get("egress_pid")
            with contextlib.suppress(OSError):
                pids = [p for p in self._cgroup_of(job).pids() if p not in (init_pid, helper)]
        else:
            pids = [command] if (command := command_of(job.shim)) else []
        if not sum(self._signal_job_process(job, pid, signum) for pid in pids):
            self._require_running(job)
            raise FailedPreconditionError(
                f"job {job.id}'s command has exited" + ("" if all_processes else
                "; --all signals what it left running"), reason="COMMAND_EXITED")
        return self._status(job)

    def read_output(self, job_id, offset=0, size=CHUNK):
        """JobOutput.read of the job. Raises NotFoundError, InvalidArgumentError."""
        return self._get(job_id).output.read(offset, size)

    def read_runs(self, job_id, offset=0, size=CHUNK, stream=0, by_time=False,
                  most_runs=RECORDS_PER_READ):
        """JobOutput.runs of the job. Raises NotFoundError, InvalidArgumentError."""
        return self._get(job_id).output.runs(offset, size, stream, by_time, most_runs)

    def output_start(self, job_id, stream=0, tail_lines=0, tail_bytes=0, since=0.0,
                     cancelled=lambda: False):
        """JobOutput.start of the job. Raises NotFoundError."""
        return self._get(job_id).output.start(stream, tail_lines, tail_bytes, since, cancelled)

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

    def _new_job(self, job_id, spec, queued=False):
        job = Job(job_id, spec, os.path.join(self.config.state_dir, "jobs", job_id))
        result = _load_json(os.path.join(job.dir, RESULT_FILE))
        if result is not None:
            job.result = result
            job.ended.set()
        with self._lock:
            self._jobs[job_id] = job
            bisect.insort(self._order, list_cursor(job))
            self._claims.record(job_id, spec)
            if queued:
                job.queued = "queued"
            else:
                self._uids.keep(spec["uid"])
            if job.result is None and not queued:
                self._add_running(job)
        self._count_kept_files(job)   # (an ended one, loaded at start-up)
        return job

    def _add_running(self, job):
        """(With the lock held.) job holds a slot until its end."""
        if job.id not in self._running:
            self._running.add(job.id)
            owner = job.spec["owner"]
            self._running_of[owner] = self._running_of.get(owner, 0) + 1

    def _drop_running(self, job):
        """(With the lock held.) job's slot is free: the dispatcher may fill it."""
        if job.id in self._running:
            self._running.discard(job.id)
            owner = job.spec["owner"]
            self._running_of[owner] -= 1
            if not self._running_of[owner]:
                del self._running_of[owner]
            self._queue_changed.notify()

    def _set_shim(self, job, shim):
        """Record the shim's facts (pids, cgroup), from its reply or the job's record."""
        job.shim = shim
        if shim and shim.get("cgroup"):
            # Where the supervisor made it: a server placed otherwise since still finds it.
            layout = self.layout._replace(v2_base=shim.get("v2_base", self.layout.v2_base))
            job.cgroup = JobCgroup(layout, shim.get("cgroup_root", self.cgroup_root),
                                   shim["cgroup"])

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
        """Record the job's end in memory (and with save, in its result.json: best effort,
        since a full disk must not stop the server from serving what it knows), and tell
        of it (_tell_end): now, or once its start is told (_start_told)."""
        if save:
            try:
                write_json_atomic(os.path.join(job.dir, RESULT_FILE), result)
            except OSError as e:
                log.warning("job %s: cannot write its result (%s); it is decided again at "
                            "the next start", job.id, e.strerror or e)
        with self._lock:
            if job.result is not None:
                return
            job.result = result
            job.paused = False
            self._drop_running(job)
            if self._queue.has_dependents(job.id):
                self._ended_with_dependents.append(job.id)
                self._queue_changed.notify()
            if job.start_untold:   # (told after its start: _start_told)
                job.end_untold = True
                return
        self._tell_end(job)

    def _tell_end(self, job):
        """Tell of job's end (recorded: job.result): observers, removal, waiters."""
        self._event("ended", job)   # first: nobody learns of the end before the log does
        self._arm_removal(job)
        self._count_kept_files(job)   # (before a waiter hears of the end and starts more)
        job.ended.set()
        job.notify()

    def _forget(self, job, remove_workdir):
        """Drop a job: its record, its folder and (if the server made it) its workdir."""
        with self._lock:
            if self._jobs.pop(job.id, None) is not None:
                at = bisect.bisect_left(self._order, list_cursor(job))
                del self._order[at]
            self._claims.forget(job.id, job.spec)
            self._uids.release(job.spec["uid"])
            self._drop_running(job)
            owner = job.spec["owner"]
            if job.files_bytes:
                self._kept_files[owner] = self._kept_files.get(owner, 0) - job.files_bytes
        # (Removing the folder also ends its inotify watch.)
        self._remove_folders(job.dir, job.spec["workdir"] if remove_workdir else "")

    def _allocate_uid(self, owner, root=False, leaves_files=False, holds_slot=False):
        """A uid for a new job of owner (0 for root; else the UidPool's). Raises
        ResourceExhaustedError at the maximum of running jobs, in all or of this owner (but
        for a queued job, which holds its slot already), or when every uid is held."""
        with self._lock:
            if len(self._running) >= self.config.max_running_jobs and not holds_slot:
                raise ResourceExhaustedError(
                    f"{self.config.max_running_jobs} jobs are running, the server's maximum",
                    reason="TOO_MANY_JOBS")
            cap = self.config.user_job_cap()
            if self._running_of.get(owner, 0) >= cap and not holds_slot:
                raise ResourceExhaustedError(
                    f"{owner} has {cap} job{'s' * (cap != 1)} running, the most one user "
                    f"may have (--max-jobs-per-user)", reason="TOO_MANY_JOBS_OF_USER")
        return 0 if root else self._uids.take(leaves_files)

    def _release_uid(self, uid):
        self._uids.release(uid)

    def _get(self, job_id):
        job = None
        if isinstance(job_id, str) and JOB_ID_FORMAT.fullmatch(job_id):   # no lookup else
            with self._lock:
                job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no job {quoted(job_id)}")
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
        if job.queued:
            raise FailedPreconditionError(f"job {job.id} is queued: it has not started yet",
                                          reason="JOB_QUEUED")
        if job.result is not None:
            raise FailedPreconditionError(f"job {job.id} has ended", reason="JOB_NOT_RUNNING")

    def _signal_command(self, job, signum):
        """Signal the job's command (a job's init before this version: it forwarded them),
        never a reused pid."""
        command = command_of(job.shim)
        if command:
            self._signal_job_process(job, command, signum)

    @staticmethod
    def _signal_job_process(job, pid, signum):
        """Send signum to pid if it is a process of this job (not a reused pid).
        Returns whether it was sent."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return False   # already gone
        try:
            # The pidfd pins the process; check it is still in the job's cgroup.
            if job.cgroup and f"/{job.cgroup.name}\n" in read_file(f"/proc/{pid}/cgroup", ""):
                signal.pidfd_send_signal(pidfd, signum)
                return True
            return False
        except ProcessLookupError:
            return False
        finally:
            os.close(pidfd)

    def _status(self, job, live=True):
        """The JobStatus of job; live: with a running job's usage now (its cgroup read)."""
        spec, result = job.spec, job.result
        fields = dict(
            id=job.id, owner=spec["owner"], argv=list(spec["argv"]), state=derive_state(job),
            limits=Limits(**spec["limits"]),
            options=JobOptions(**{**spec["options"],
                                  "env": tuple(map(tuple, spec["options"]["env"])),
                                  "terminal": tuple(spec["options"].get("terminal", ()))}),
            created_at=spec["created_at"], uid=spec["uid"],
            started_at=(job.shim or {}).get("started_at", 0.0), name=spec.get("name", ""),
            labels=tuple(sorted(spec.get("labels", {}).items())),
            request_id=spec.get("request_id", ""),
            trace_id=trace_id_of(spec.get("traceparent", "")), timed_out=job.timed_out)
        if "queue" in spec:
            fields.update(self._queue_status(job))
        if job.queued:
            return JobStatus(**fields)
        if spec["options"].get("egress") and (live or result is not None):
            fields.update(self._egress_status(job))
        if result is None and not live:
            return JobStatus(**fields)
        if result is None:   # running: live figures from the cgroup and the output file
            try:
                fields.update(job.cgroup.usage() if job.cgroup else {})
                fields["output_bytes"] = job.output.size()
            except OSError:
                pass
            return JobStatus(**fields)
        fields.update((k, result[k]) for k in RESULT_FIELDS if k in result)
        return JobStatus(**fields)

    def _queue_status(self, job):
        """A job that was queued: how, and while it is, where it stands."""
        queue = job.spec["queue"]
        fields = {"after": tuple(tuple(a) for a in queue.get("after", ())),
                  "priority": queue.get("priority", 0),
                  "queue_timeout": queue.get("timeout", 0.0)}
        if job.queued:
            with self._lock:
                fields.update(queue_position=self._queue.position(job.id),
                              waiting_for=tuple(sorted(self._queue.waiting_for(job.id))))
        return fields

    def _egress_status(self, job):
        """An egress job's network_state and egress_denied. Its helper is up while the
        process its shim recorded lives; a helper that ended before its job is down, with
        the last words of its log."""
        shim, result = job.shim or {}, job.result
        if result is not None:
            lost = result.get("network_lost", "")
            return {"network_state": f"down: {lost}" if lost else "",
                    "egress_denied": result.get("egress_denied", 0)}
        denied = (self._firewall.denied_count(shim["egress_uid"])
                  if self._firewall and shim.get("egress_uid") else 0)
        pid = shim.get("egress_pid")
        if not pid:
            state = "starting"
        elif process_start_time(pid) == shim.get("egress_start"):
            state = "up"
        else:
            last = egress_last_words(os.path.join(job.dir, EGRESS_LOG))
            state = f"down: the network helper ended{' (' + last + ')' if last else ''}"
        return {"network_state": state, "egress_denied": denied}


class OutputPiece(typing.NamedTuple):
    """Bytes of one stream from a job's merged output, starting at offset."""
    offset: int
    data: bytes
    stream: int = 0               # STDOUT, STDERR; 0: not recorded (jobs of older servers)
    time: float = 0.0             # when written (INDEX_GRANULE precision); 0: not recorded


class OutputRuns(typing.NamedTuple):
    """Runs of a job's merged output, one after another in data: run i is sizes[i] bytes of
    streams[i] (0: not recorded) from offsets[i] in the merged output, written at times[i]
    (0.0: not recorded). after: the offset the next read starts at."""
    data: bytes
    offsets: list
    sizes: list
    streams: list
    times: list
    after: int


class JobOutput:
    """One job's output as its shim wrote it: the merged output file and its index. Read
    only (the shim alone writes them), a chunk at a time, whatever its size."""

    def __init__(self, job_dir):
        self.path = os.path.join(job_dir, OUTPUT_FILE)
        self.index = OutputIndex(os.path.join(job_dir, OUTPUT_INDEX_FILE))

    def size(self):
        """Bytes written so far. Raises OSError but for a missing file (0)."""
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0

    def read(self, offset=0, size=CHUNK):
        """Up to size bytes (at most CHUNK) from offset (b'' at the current end).
        Raises InvalidArgumentError."""
        if not (isinstance(offset, int) and offset >= 0 and isinstance(size, int) and size > 0):
            raise InvalidArgumentError("offset must be >= 0 and size > 0")
        return read_output_file(self.path, offset, min(size, CHUNK))

    def runs(self, offset=0, size=CHUNK, stream=0, by_time=False, most_runs=RECORDS_PER_READ):
        """OutputRuns at offset: up to size bytes (at most CHUNK) in at most most_runs runs
        of stream (0: both), and with by_time of one write time each (read_runs: what that
        costs). No data at the current end (after == offset), or after only output of the
        other stream (after > offset). Raises InvalidArgumentError."""
        if not (isinstance(offset, int) and offset >= 0 and isinstance(size, int) and size > 0
                and isinstance(most_runs, int) and most_runs > 0):
            raise InvalidArgumentError("offset must be >= 0, size and most_runs > 0")
        end = self.size()   # the size first: every byte below it has its index record by now
        if offset >= end:
            return OutputRuns(b"", [], [], [], [], offset)
        return read_runs(self.index, self.path, offset, end, min(size, CHUNK), stream,
                         by_time, most_runs)

    def start(self, stream=0, tail_lines=0, tail_bytes=0, since=0.0, cancelled=lambda: False):
        """Where reading starts for the last tail_lines lines and tail_bytes bytes of stream
        (0: both), and what was written since (a time): the latest of those set, else 0.
        Reads the output backwards as far as the lines go (tail_start: what that costs),
        and stops early (0) once cancelled() says so."""
        end = self.size()
        if not end:
            return 0
        start = self.index.first_written_at(since, end) if since else 0
        if tail_lines or tail_bytes:
            start = max(start, tail_start(self.index, self.path, end, stream, tail_lines,
                                          tail_bytes, cancelled))
        return start


class IndexRecords:
    """An open output index's records (INDEX_RECORD) as they are now, read by number with
    pread: a sequence, so that bisect can search the file where it lies."""

    def __init__(self, fd):
        self.fd = fd
        self.count = os.fstat(fd).st_size // INDEX_RECORD.size if fd is not None else 0

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        size = INDEX_RECORD.size
        return INDEX_RECORD.unpack(os.pread(self.fd, size, i * size))

    def column(self, field):
        """Field (0: offset, 1: time, 2: stream) of every record, as a sequence."""
        return IndexColumn(self, field)

    def block(self, first, count, with_times=True):
        """(offsets, times, streams) of records first .. first+count-1 (fewer at the end),
        as lists, times only with_times (else zeros): unpacked by typed arrays in C."""
        import array
        size = INDEX_RECORD.size
        data = os.pread(self.fd, count * size, first * size)
        words = array.array("Q", data[:len(data) - len(data) % size])   # 3 words a record
        if sys.byteorder != "little":
            words.byteswap()
        offsets, streams = words[0::3].tolist(), words[2::3].tolist()   # (pad bytes: 0)
        times = array.array("d", words[1::3].tobytes()).tolist() if with_times else [
            0.0] * len(offsets)
        return offsets, times, streams


class IndexColumn(typing.NamedTuple):
    """One field of every record of IndexRecords, as a sequence (for bisect)."""
    records: IndexRecords
    field: int

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i][self.field]


class OutputIndex:
    """A job's output index (OUTPUT_INDEX_FILE): which stream each byte of the merged output
    came from, and when it was written. Read where it lies (bisected, a block at a time),
    nothing of it kept between calls: it can be as big as the output. Thread-safe."""

    def __init__(self, path):
        self.path = path

    @contextlib.contextmanager
    def records(self):
        """IndexRecords of the index as it is now (none if there is no index)."""
        fd = open_output(self.path)
        try:
            yield IndexRecords(fd)
        finally:
            if fd is not None:
                os.close(fd)

    def first_written_at(self, since, end):
        """The offset of the first byte written at or after since (end if none yet)."""
        with self.records() as records:
            if not records:
                return 0   # nothing recorded: a job of an older server, keep it all
            i = bisect.bisect_left(records.column(1), since)
            return min(records[i][0], end) if i < len(records) else end

    def runs_backwards(self, end):
        """(start, stop, stream) of each run of one stream before end, the last first; a
        block of records at a time."""
        with self.records() as records:
            last = bisect.bisect_left(records.column(0), end)   # records below end
            stop, run = end, None
            while last > 0:
                first = max(0, last - RECORDS_PER_READ)
                offsets, _, streams = records.block(first, last - first)
                for offset, stream in zip(reversed(offsets), reversed(streams)):
                    if run and run[2] != stream:
                        yield run
                        run = None
                    run = (offset, run[1] if run else stop, stream)
                    stop = offset
                last = first
            if run:
                yield run
            if stop > 0:
                yield 0, stop, 0   # before the first record: not recorded


def index_block(records, pos, end, most, with_times):
    """(starts, times, streams, stop): the records of the output from pos, at most `most`,
    the first starting at pos and the last stopping at stop (<= end); times only
    with_times (else zeros)."""
    i = bisect.bisect_right(records.column(0), pos) - 1
    if i < 0:   # before the first record, or no index: not recorded
        return [pos], [0.0], [0], min(records[0][0], end) if records else end
    offsets, times, streams = records.block(i, most + 1, with_times)
    kept = bisect.bisect_left(offsets, end)   # (records of bytes still on their way)
    if kept < len(offsets) or i + len(offsets) == len(records):
        stop = end
    else:   # the block's last record only says where the one before it stops
        kept, stop = len(offsets) - 1, offsets[-1]
    offsets[0] = pos
    return offsets[:kept], times[:kept], streams[:kept], stop


def compressed(columns, keep):
    """Each of columns (lists) with only the items keep says, unless keep keeps all."""
    if False not in keep:
        return columns
    return [list(itertools.compress(c, keep)) for c in columns]


def read_runs(index, path, pos, end, size, stream=0, by_time=False, most_runs=RECORDS_PER_READ):
    """OutputRuns of the output at path from pos (< end: the output's size, taken before the
    index is read, so every byte below it has its records): up to size bytes in at most
    most_runs runs, each of one stream (0: both are asked for) and, with by_time, of one
    write time (else times are 0). Output of the other stream is skipped: after then
    moves on, with no data.

    Costs a bisection of the index, a read of at most RECORDS_PER_READ of its records (a
    smaller block for few runs) and of the output's bytes, and C loops over the records
    (itertools and operator: never a Python step a record). Raises OSError."""
    with index.records() as records:
        starts, times, streams, stop = index_block(
            records, pos, end, min(RECORDS_PER_READ, 64 * most_runs), by_time)
    if not by_time:   # records where the stream stays the same: one run
        starts, times, streams = compressed((starts, times, streams), [True] + list(
            map(operator.ne, streams[1:], streams[:-1])))
    sizes = list(map(operator.sub, starts[1:] + [stop], starts))
    if stream:
        starts, sizes, streams, times = compressed((starts, sizes, streams, times), list(map(
            operator.and_, map(bool, sizes), map((0, stream).__contains__, streams))))
    elif 0 in sizes:   # (two records at one offset)
        starts, sizes, streams, times = compressed((starts, sizes, streams, times),
                                                   list(map(bool, sizes)))
    if not starts:
        return OutputRuns(b"", [], [], [], [], stop)
    taken = runs_within(starts, sizes, size, most_runs, spread=bool(stream))
    whole = taken == len(sizes)
    starts, sizes, streams, times = starts[:taken], sizes[:taken], streams[:taken], times[:taken]
    over = sum(sizes) - size
    if over > 0:
        sizes[-1] -= over
    data = read_run_bytes(path, starts, sizes, contiguous=not stream)
    if len(data) < sum(sizes):   # (an output cut short under us: only what is there)
        ends = list(itertools.accumulate(sizes))
        taken = bisect.bisect_left(ends, len(data)) + 1
        starts, sizes, streams, times = starts[:taken], sizes[:taken], streams[:taken], times[:taken]
        sizes[-1] -= ends[taken - 1] - len(data)
        whole = over = 1
    after = stop if whole and over <= 0 else starts[-1] + sizes[-1]
    return OutputRuns(data, starts, sizes, streams, times, after)


def runs_within(starts, sizes, size, most_runs, spread):
    """How many of the runs (starts, sizes) a read of size bytes and most_runs runs takes
    (the last may be cut); spread: runs with gaps between, read in one, whose span is
    kept within twice the size."""
    taken = min(most_runs, len(sizes))
    if starts[taken - 1] + sizes[taken - 1] - starts[0] > size or spread:
        taken = min(taken, bisect.bisect_left(list(itertools.accumulate(sizes)), size) + 1)
    if spread:
        taken = min(taken, bisect.bisect_right(list(map(operator.add, starts, sizes)),
                                               starts[0] + 2 * size))
    return max(1, taken)


def read_run_bytes(path, starts, sizes, contiguous):
    """The bytes of runs (starts, sizes) of the output at path, one after another: one
    read from the first run's start to the last one's end (b'' if there is no output)."""
    fd = open_output(path)
    if fd is None:
        return b""
    try:
        base = starts[0]
        span = os.pread(fd, starts[-1] + sizes[-1] - base, base)
    finally:
        os.close(fd)
    if contiguous:
        return span
    cuts = map(slice, map(operator.sub, starts, itertools.repeat(base)),
               map(operator.sub, map(operator.add, starts, sizes), itertools.repeat(base)))
    return b"".join(map(span.__getitem__, cuts))


TAIL_BLOCK = 256 * KiB   # what a tail reads and counts at a time, from the end


def tail_start(index, path, end, stream, lines, nbytes, cancelled=lambda: False):
    """Where the last `lines` lines (or `nbytes` bytes, whichever is less) of stream (0:
    both) before end start. 0 if there are fewer, or once cancelled() says so.

    Costs a read of what it returns, at most, and a count of its newlines in C, a block
    at a time (never a Python step per newline): a tail of 2**63 lines of a job of empty
    lines costs what reading the output costs."""
    runs = [(0, end, 0)] if not stream else index.runs_backwards(end)
    taken, newlines, at_end = 0, 0, True
    fd = open_output(path)
    if fd is None:
        return 0
    try:
        for start, stop, s in runs:
            if stream and s and s != stream:
                continue
            if nbytes and taken + stop - start >= nbytes:
                return stop - (nbytes - taken)
            pos = stop
            while lines and pos > start:
                if cancelled():
                    return 0
                block = max(start, pos - TAIL_BLOCK)
                data = os.pread(fd, pos - block, block)
                if at_end and data.endswith(b"\n"):
                    data = data[:-1]   # the last line's own end
                at_end = False
                here = data.count(b"\n")
                if newlines + here >= lines:
                    return block + nth_newline_from_end(data, lines - newlines) + 1
                newlines += here
                pos = block
            taken += stop - start
        return 0
    finally:
        os.close(fd)


def nth_newline_from_end(data, n):
    """The index of data's n-th newline from its end (data has at least n): a bisection
    of counts, so a block of many newlines costs a few counts, not a step each."""
    lo, hi = 0, len(data)   # invariant: data[lo:] has >= n newlines, data[hi:] fewer
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if data.count(b"\n", mid) >= n:
            lo = mid
        else:
            hi = mid
    return lo


def list_cursor(job):
    """Where a job stands in list order (creation time, then id): a page token's content."""
    return (job.spec["created_at"], job.id)


def open_output(path):
    """A descriptor of the job's output file to read, None if it does not exist yet."""
    try:
        return open_job_file(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        log.warning("%s is a link, not a job's output: not followed", path)
        return None


def read_output_file(path, offset, size):
    """pread up to size bytes at offset; b'' past the end or before the file exists."""
    fd = open_output(path)
    if fd is None:
        return b""
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _load_json(path):
    try:
        with os.fdopen(open_job_file(path)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


UNBOUNDED = 1 << 62   # the most of a limit whose server sets none


def checked_limits(requested, defaults, most):
    """The limits a job gets: each of requested, or else its default, within its row's
    bounds (LIMITS) and the server's most.

    Raises InvalidArgumentError naming the API's field: a value that is no number, out of
    range, or a malformed or partial io_device."""
    try:
        values = {spec.name: type(spec.least)(getattr(requested, spec.name) or
                                               getattr(defaults, spec.name))
                  for spec in LIMITS}
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgumentError("limits must be numbers", field="limits") from None
    for spec in LIMITS:
        value = values[spec.name]
        if isinstance(value, str) or (spec.optional and value == 0):
            continue
        top = getattr(most, spec.name) or (UNBOUNDED if spec.optional else 0)
        if not (math.isfinite(value) and spec.least <= value <= top):
            raise InvalidArgumentError(
                f"{spec.proto} must be between {spec.show(spec.least)} and {spec.show(top)}"
                f"{' ' + spec.unit if spec.unit else ''}{' (or 0: none)' if spec.optional else ''}",
                field=f"limits.{spec.proto}",
                reason="LIMIT_ABOVE_MAX" if value > top else "LIMIT_BELOW_MIN")
    device = values["io_device"]
    if device and not re.fullmatch(r"\d{1,4}:\d{1,7}", device):
        raise InvalidArgumentError("io_device must be MAJOR:MINOR", field="limits.io_device")
    if device and (values["io_read_bps"] or values["io_write_bps"]):
        check_whole_disk(device)
    return Limits(**values)


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


def validate_meta(meta):
    """meta with its labels sorted. Raises InvalidArgumentError for a bad name, label or
    request id."""
    if meta.name and (not isinstance(meta.name, str) or not NAME_FORMAT.fullmatch(meta.name)
                      or JOB_ID_FORMAT.fullmatch(meta.name)):
        raise InvalidArgumentError(
            f"invalid name {quoted(meta.name)}: up to 64 letters, digits, '_', '.' or '-', "
            f"starting with a letter or digit", field="name")
    labels = dict(meta.labels)
    if len(labels) > MAX_LABELS:
        raise InvalidArgumentError(f"at most {MAX_LABELS} labels", field="labels")
    for key, value in labels.items():
        if not (isinstance(key, str) and LABEL_KEY_FORMAT.fullmatch(key)):
            raise InvalidArgumentError(f"invalid label key {quoted(key)}: up to 63 letters, "
                                       f"digits, '_', '.', '/' or '-'", field="labels")
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE or \
                CONTROL_CHARACTERS.search(value):
            raise InvalidArgumentError(f"label {key}: a value of at most {MAX_LABEL_VALUE} "
                                       f"printable characters (no control characters)",
                                       field="labels")
    if meta.request_id and not (isinstance(meta.request_id, str)
                                and REQUEST_ID_FORMAT.fullmatch(meta.request_id)):
        raise InvalidArgumentError("request_id: 1 to 128 printable ASCII characters",
                                   field="request_id")
    if meta.traceparent and not parse_traceparent(meta.traceparent):
        raise InvalidArgumentError("traceparent: not a W3C trace context", field="traceparent")
    return meta._replace(labels=tuple(sorted(labels.items())))


def validate_terminal(size):
    """size as (rows, columns), or () for no terminal. Raises InvalidArgumentError."""
    if not size:
        return ()
    try:
        rows, cols = (int(n) for n in size)
    except (TypeError, ValueError):
        raise InvalidArgumentError("terminal: (rows, columns)", field="terminal") from None
    if not (0 < rows < 65536 and 0 < cols < 65536):
        raise InvalidArgumentError("terminal: rows and columns from 1 to 65535",
                                   field="terminal")
    return rows, cols


def validate_workdir(path):
    """Raises InvalidArgumentError unless path is empty (a fresh folder) or absolute, without
    NUL bytes, and outside the job's private /tmp and /dev/shm (empty when it starts)."""
    if not path:
        return
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise InvalidArgumentError("workdir must be an absolute path without NUL bytes")
    inside = [p for p in JOB_PRIVATE_DIRS if os.path.normpath(path).startswith(p + "/")]
    if inside:
        raise InvalidArgumentError(f"workdir {path} cannot exist: a job's {inside[0]} is its "
                                   f"own, empty when it starts")


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
# Auth: who is calling (certificate + JWT) and what they may do (roles)
###############################################################################
#
# The user is the verified client certificate's CN, never a name the client asserts. The
# JWT (ES256, server holds only the public key) must name the same user, be unexpired,
# carry a role, and be bound to that very certificate (RFC 8705 cnf/x5t#S256), so a stolen
# token is useless without the certificate's private key.

JWT_ALGORITHM = "ES256"
JWT_ISSUER = JWT_AUDIENCE = "steve-jobs"
JWT_LEEWAY = 30                     # seconds of clock skew tolerated
MAX_TOKEN_BYTES = 16 * KiB          # a bearer token with many claims still fits
MAX_METADATA_BYTES = MAX_TOKEN_BYTES + 8 * KiB   # grpc's limit: the token and the rest

# Every RPC and what it needs. "job" RPCs act on one job and are scoped by ownership.
RPC_ACTIONS = {
    "Start": "write", "Stop": "write", "Pause": "write", "Resume": "write", "Remove": "write",
    "Status": "read", "Output": "read", "List": "read", "Wait": "read", "Signal": "write",
    "Input": "write", "CopyOut": "read", "CopyIn": "write", "StartWithFiles": "write",
    "Exec": "write", "Events": "read",
}
JOB_RPCS = ("Stop", "Pause", "Resume", "Remove", "Status", "Output", "Wait", "Signal",
            "CopyOut", "Events")
JOB_OPTIONAL_RPCS = ("Events",)   # of JOB_RPCS, those whose job_id may be empty (every job)


class Role(typing.NamedTuple):
    """What a role may do."""
    actions: frozenset          # subset of {"read", "write"}
    all_jobs: bool              # sees every user's jobs, not only its own
    root_jobs: bool             # may start jobs as root
    up_to_max_limits: bool      # limits up to the server's maximums (else its defaults)


ROLES = {
    "admin": Role(frozenset({"read", "write"}), all_jobs=True, root_jobs=True,
                  up_to_max_limits=True),
    "user": Role(frozenset({"read", "write"}), all_jobs=False, root_jobs=False,
                 up_to_max_limits=False),
    "reader": Role(frozenset({"read"}), all_jobs=True, root_jobs=False, up_to_max_limits=False),
}


class Identity(typing.NamedTuple):
    """A caller whose certificate and token were both verified."""
    user: str
    role: str
    trace: str = ""      # traceparent of the server's span of this call


def certificate_thumbprint(der):
    """RFC 8705 x5t#S256: base64url (unpadded) SHA-256 of the certificate's DER bytes."""
    import base64
    import hashlib
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


class TokenVerifier:
    """Checks bearer tokens against the signing public key and the caller's certificate."""

    CACHE_SIZE = 4096

    def __init__(self, public_key_pem, issuer=JWT_ISSUER, audience=JWT_AUDIENCE,
                 client_ca_path=None):
        import jwt   # PyJWT, with cryptography for ES256
        self._jwt = jwt
        self._issuer_check = ClientCertificateCheck(client_ca_path) if client_ca_path else None
        self._key = jwt.algorithms.ECAlgorithm(jwt.algorithms.ECAlgorithm.SHA256) \
            .prepare_key(public_key_pem)
        self.issuer, self.audience = issuer, audience
        # Verified (token, certificate) pairs -> (Identity, exp): a follower reconnecting or
        # a burst of calls pays for one signature check, not one each.
        self._verified = {}

    def verify(self, token, cert_cn, cert_pem):
        """The caller's Identity. Raises UnauthenticatedError saying what is wrong."""
        if not cert_cn or not cert_pem:
            raise UnauthenticatedError("no verified client certificate")
        if not token:
            raise UnauthenticatedError("no bearer token (metadata 'authorization: Bearer ...')")
        if len(token) > MAX_TOKEN_BYTES:
            raise UnauthenticatedError(f"the token is {len(token)} bytes: at most "
                                       f"{human_bytes(MAX_TOKEN_BYTES)}",
                                       reason="TOKEN_TOO_LARGE")
        if self._issuer_check:
            self._issuer_check.check(cert_pem)
        cached = self._verified.get((token, cert_pem))
        if cached and time.time() < cached[1] + JWT_LEEWAY:
            return cached[0]
        import ssl
        identity, exp = self._verify(token, cert_cn, ssl.PEM_cert_to_DER_cert(cert_pem))
        if len(self._verified) >= self.CACHE_SIZE:
            self._verified.clear()
        self._verified[(token, cert_pem)] = (identity, exp)
        return identity

    def _verify(self, token, cert_cn, cert_der):
        jwt = self._jwt

        def decode(**options):
            return jwt.decode(
                token, self._key, algorithms=[JWT_ALGORITHM], audience=self.audience,
                issuer=self.issuer, leeway=JWT_LEEWAY,
                options={"require": ["exp", "iat", "sub", "aud", "iss"], **options})
        try:
            claims = decode()
        except jwt.ExpiredSignatureError:
            exp = decode(verify_exp=False)["exp"]   # (signed by us: its time can be said)
            raise UnauthenticatedError(f"token expired at {rfc3339(exp)}",
                                       reason="TOKEN_EXPIRED") from None
        except jwt.InvalidTokenError as e:
            raise UnauthenticatedError(f"invalid token: {e}") from None
        for name, kind in CLAIM_TYPES.items():   # a signed token is not a well-formed one
            if name in claims and not isinstance(claims[name], kind):
                raise UnauthenticatedError(f"invalid token: claim {name!r} has the wrong type")
        if claims["sub"] != cert_cn:
            raise UnauthenticatedError("token is for another user than the certificate")
        cnf = claims.get("cnf")
        if not isinstance(cnf, dict) or cnf.get("x5t#S256") != certificate_thumbprint(cert_der):
            raise UnauthenticatedError("token is not bound to this client certificate")
        role = claims.get("role")
        if role not in ROLES:
            raise UnauthenticatedError(f"token has no valid role (one of {', '.join(ROLES)})")
        return Identity(user=cert_cn, role=role), claims["exp"]


# Claims and the types they must have (PyJWT itself checks only exp, iat and nbf).
CLAIM_TYPES = {"sub": str, "role": str, "iss": str, "jti": str, "cnf": dict,
               "exp": (int, float), "iat": (int, float), "nbf": (int, float)}


class ClientCertificateCheck:
    """A client certificate must be issued directly by a CA certificate in ca_path, and must
    not be a CA itself. Why: grpc's TLS stack accepts longer chains and ignores the CA's
    pathlen:0, so a sub-CA that somehow got signed could mint users. ca_path is re-read
    when it changes (rotation)."""

    def __init__(self, ca_path):
        self.path = ca_path
        self._stamp, self._cas, self._passed = None, [], set()

    def check(self, cert_pem):
        """Raises UnauthenticatedError saying what is wrong."""
        self._reload_if_changed()
        if cert_pem in self._passed:
            return
        from cryptography import x509
        leaf = x509.load_pem_x509_certificate(cert_pem.encode())
        try:
            is_ca = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if is_ca:
            raise UnauthenticatedError("the client certificate is a CA certificate")
        if not any(self._issued_by(leaf, ca) for ca in self._cas):
            raise UnauthenticatedError(
                "the client certificate is not issued directly by the server's CA")
        if len(self._passed) >= TokenVerifier.CACHE_SIZE:
            self._passed.clear()
        self._passed.add(cert_pem)

    @staticmethod
    def _issued_by(leaf, ca):
        try:
            leaf.verify_directly_issued_by(ca)
            return True
        except Exception:   # ValueError, TypeError, InvalidSignature: not this one
            return False

    def _reload_if_changed(self):
        try:
            stamp = os.stat(self.path).st_mtime_ns
        except OSError:
            return   # keep the last good set (grpc keeps its old CA too)
        if stamp == self._stamp:
            return
        from cryptography import x509
        with open(self.path, "rb") as f:
            self._cas = x509.load_pem_x509_certificates(f.read())
        self._stamp, self._passed = stamp, set()


def issue_token(signing_key_pem, user, role, cert_der, lifetime,
                issuer=JWT_ISSUER, audience=JWT_AUDIENCE):
    """A signed ES256 token for user with role, bound to the certificate cert_der.

    Raises InvalidArgumentError for an unknown role or lifetime out of range.
    """
    import jwt
    if role not in ROLES:
        raise InvalidArgumentError(f"role must be one of {', '.join(ROLES)}")
    if not 60 <= lifetime <= 5 * 366 * 86400:
        raise InvalidArgumentError("lifetime must be between 1 minute and 5 years")
    now = int(time.time())
    claims = {"iss": issuer, "aud": audience, "sub": user, "role": role, "iat": now,
              "nbf": now, "exp": now + int(lifetime), "jti": random_hex(16),
              "cnf": {"x5t#S256": certificate_thumbprint(cert_der)}}
    return jwt.encode(claims, signing_key_pem, algorithm=JWT_ALGORITHM)


def authorize(identity, rpc, job_owner=None):
    """The one place that decides whether identity may make this call.

    job_owner: the owner of the job the call is about, for job RPCs.
    Raises PermissionDeniedError, or NotFoundError for a job the caller may not see
    (so that job ids cannot be probed).
    """
    role = ROLES[identity.role]
    if RPC_ACTIONS[rpc] not in role.actions:
        raise PermissionDeniedError(f"role {identity.role} may not call {rpc}")
    if job_owner is not None and not role.all_jobs and job_owner != identity.user:
        raise NotFoundError("no such job")


def check_start_allowed(identity, limits, options, default_limits,
                        host_network_roles=("admin",), egress_roles=("admin", "user"),
                        priority=0):
    """Role limits on Start. Raises PermissionDeniedError.

    host_network_roles: the roles that may share the host's network namespace (it reaches
    the server's own port and every loopback service of the host); egress_roles: those
    that may ask for an egress network; priority: the start's place in the queue (admins
    only)."""
    role = ROLES[identity.role]
    if options.as_root and not role.root_jobs:
        raise PermissionDeniedError(f"role {identity.role} may not run jobs as root")
    if priority and identity.role != "admin":
        raise PermissionDeniedError(f"role {identity.role} may not set a priority (admins "
                                    f"only)", field="priority")
    if options.rw_host and not role.root_jobs:
        raise PermissionDeniedError(f"role {identity.role} may not make the host writable")
    if options.host_network and identity.role not in host_network_roles:
        raise PermissionDeniedError(
            f"role {identity.role} may not share the host's network (the server's "
            f"--allow-host-network-role opens it)")
    if options.egress and identity.role not in egress_roles:
        raise PermissionDeniedError(f"role {identity.role} may not run jobs with an egress "
                                    f"network (the server's --egress-role opens it)")
    if not role.up_to_max_limits:
        for spec in LIMITS:
            asked, cap = getattr(limits, spec.name), getattr(default_limits, spec.name)
            if spec.role_capped and asked and asked > cap:
                raise PermissionDeniedError(
                    f"role {identity.role} may ask for at most {spec.proto}={spec.show(cap)}",
                    reason="LIMIT_ABOVE_ROLE_MAX", field=f"limits.{spec.proto}")


###############################################################################
# Tracing: W3C trace context for every call; spans exported by OpenTelemetry when the
# operator sets it up (the OTEL_* variables), else nothing imported
###############################################################################

def otel_requested(environ=os.environ):
    """Whether the standard OTEL_* variables ask for exported traces."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "")
    if exporter:
        return exporter != "none"
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


class RpcSpan:
    """A call's span where nothing is exported: its traceparent only (log, job)."""

    def __init__(self, traceparent):
        self.traceparent = traceparent

    def end(self, outcome, **attributes):
        pass


class Tracing:
    """Traces without export: each call continues the client's trace (or starts one)."""
    exports = False

    def rpc_span(self, method, header):
        parsed = parse_traceparent(header)
        return RpcSpan(new_traceparent(parsed[0], parsed[2]) if parsed else new_traceparent())

    def on_job_event(self, kind, st, record):
        pass

    def shutdown(self):
        pass


def make_tracing():
    """OtelTracing if OTEL_* asks for it and OpenTelemetry is installed, else Tracing."""
    if not otel_requested():
        return Tracing()
    try:
        tracing = OtelTracing()
    except ImportError as e:
        log.warning("OTEL_* variables ask for traces, but %s is not installed (pip install "
                    "opentelemetry-sdk opentelemetry-exporter-otlp): not exporting", e.name)
        return Tracing()
    log.info("exporting traces with OpenTelemetry (%s)", type(tracing.exporter).__name__)
    return tracing


class OtelSpan(RpcSpan):
    """A call's span, exported."""

    def __init__(self, span, method):
        ctx = span.get_span_context()
        super().__init__(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}")
        self.span, self.method = span, method

    def end(self, outcome, **attributes):
        from opentelemetry.trace import Status, StatusCode
        self.span.set_attributes({"rpc.system": "grpc", "rpc.service": "steve_jobs.v1.JobService",
                                  "rpc.method": self.method, "rpc.grpc.status": outcome["result"],
                                  **{f"steve_jobs.{k}": v for k, v in attributes.items() if v}})
        if outcome["result"] not in ("OK", "CANCELLED"):
            self.span.set_status(Status(StatusCode.ERROR, outcome.get("why", "")))
        self.span.end()


class OtelTracing(Tracing):
    """Spans exported by the OpenTelemetry SDK (batched, off the event loop): one per call,
    and once a job has ended its life: job > start (spawn, cgroup, exec), run, stop."""
    exports = True

    def __init__(self):
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        self.exporter = otel_exporter()
        self.provider = TracerProvider(resource=Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", "steve-jobs"),
             "service.version": __version__}))
        self.provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("steve-jobs", __version__)
        self.propagator = TraceContextTextMapPropagator()
        self.closed = False

    def _parent(self, traceparent):
        return self.propagator.extract({"traceparent": traceparent} if traceparent else {})

    def rpc_span(self, method, header):
        from opentelemetry.trace import SpanKind
        span = self.tracer.start_span(f"steve_jobs.v1.JobService/{method}",
                                      context=self._parent(header), kind=SpanKind.SERVER)
        return OtelSpan(span, method)

    def on_job_event(self, kind, st, record):
        if kind != "ended" or not record.get("traceparent") or self.closed:
            return
        from opentelemetry import trace
        shim = record["shim"]
        created = st.created_at
        ended = st.ended_at or time.time()
        times = [created, shim.get("started_at"), shim.get("limits_at"), shim.get("exec_at")]
        times = [t or created for t in times]
        ns = lambda t: int(t * 1e9)
        job = self.tracer.start_span("job", context=self._parent(record["traceparent"]),
                                     start_time=ns(created), attributes={
                                         "steve_jobs.job_id": st.id, "steve_jobs.owner": st.owner,
                                         "steve_jobs.state": st.state,
                                         "process.exit.code": st.exit_code if st.exit_code
                                         is not None else -1})
        inside = trace.set_span_in_context(job)
        start = self.tracer.start_span("job.start", context=inside, start_time=ns(created))
        steps = trace.set_span_in_context(start)
        for name, begin, end in zip(("spawn", "cgroup", "exec"), times, times[1:]):
            self.tracer.start_span(f"job.start.{name}", context=steps,
                                   start_time=ns(begin)).end(end_time=ns(max(begin, end)))
        start.end(end_time=ns(times[-1]))
        self.tracer.start_span("job.run", context=inside, start_time=ns(times[-1])).end(
            end_time=ns(max(ended, times[-1])))
        if record.get("stop_at"):
            self.tracer.start_span("job.stop", context=inside,
                                   start_time=ns(record["stop_at"])).end(end_time=ns(ended))
        job.end(end_time=ns(ended))

    def shutdown(self):
        self.closed = True         # (jobs stopped at exit end untraced)
        self.provider.shutdown()   # exports what is batched (bounded by the exporter)


def otel_exporter():
    """The exporter OTEL_TRACES_EXPORTER names: otlp (the default; protocol from
    OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL, endpoint and the rest read by the exporter
    itself) or console. Raises ImportError if its package is missing."""
    name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip()
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        return ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + "\n")
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
    if protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


###############################################################################
# Metrics: what the server does, for Prometheus (prometheus_client, imported only when
# --metrics-listen asks for it)
###############################################################################

# Buckets (seconds) of the histograms: starts take milliseconds, queue waits up to hours.
START_BUCKETS = (.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30)
QUEUE_WAIT_BUCKETS = (.01, .05, .1, .5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)
RPC_BUCKETS = (.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 60, 600)


class NoMetrics:
    """What the service counts when no endpoint is served: nothing, at no cost."""

    def on_job_event(self, kind, st, record):
        pass

    def on_rpc(self, method, code, seconds):
        pass

    def on_bytes_sent(self, size):
        pass

    def close(self):
        pass


class Metrics(NoMetrics):
    """The server's Prometheus metrics (README: Metrics), served over HTTP (HTTPS with a
    certificate) by prometheus_client's own thread. Counters move on the engine's events
    and the service's calls; gauges (jobs by state and user, open streams) are read at
    each scrape. Raises ImportError (no prometheus_client)."""

    def __init__(self, engine, streams_open):
        import prometheus_client as prom
        self.prom, self.engine, self.streams_open = prom, engine, streams_open
        self.registry = registry = prom.CollectorRegistry()
        prom.ProcessCollector(registry=registry)   # memory, CPU, file handles
        registry.register(self)
        def counter(name, about, labels=()):
            return prom.Counter(name, about, labels, registry=registry)
        self.starts = counter("steve_jobs_starts", "jobs started (their command exec'd)")
        self.start_seconds = prom.Histogram(
            "steve_jobs_start_seconds", "from a start's request (or its leaving the queue) "
            "to its command's exec", buckets=START_BUCKETS, registry=registry)
        self.queued = counter("steve_jobs_queued", "jobs that waited in the queue")
        self.queue_wait = prom.Histogram(
            "steve_jobs_queue_wait_seconds", "how long started jobs waited in the queue",
            buckets=QUEUE_WAIT_BUCKETS, registry=registry)
        self.ended = counter("steve_jobs_jobs_ended", "jobs ended, by state", ("state",))
        self.supervisor_deaths = counter("steve_jobs_supervisor_deaths", "job supervisors "
                                         "that died without recording the job's end")
        self.oom_kills = counter("steve_jobs_oom_kills", "processes of jobs the kernel "
                                 "killed for their memory limit")
        self.deadline_stops = counter("steve_jobs_deadline_stops", "jobs stopped by their "
                                      "timeout (timeout) or cancelled by their queue "
                                      "timeout (queue_timeout)", ("deadline",))
        self.rpcs = counter("steve_jobs_rpcs", "calls answered, by method and gRPC status "
                            "code", ("method", "code"))
        self.rpc_seconds = prom.Histogram("steve_jobs_rpc_duration_seconds", "calls' "
                                          "durations (streams: until they ended), by method",
                                          ("method",), buckets=RPC_BUCKETS, registry=registry)
        self.bytes_sent = counter("steve_jobs_output_sent_bytes", "bytes of jobs' output "
                                  "sent to clients")
        self.server = None

    def collect(self):
        """(prometheus_client's, at each scrape.) The gauges read now."""
        from prometheus_client.core import GaugeMetricFamily
        jobs = GaugeMetricFamily("steve_jobs_jobs", "jobs running (paused ones too) and "
                                 "queued now, by user", labels=("state", "user"))
        for state, per_user in self.engine.load_by_user().items():
            for user, count in sorted(per_user.items()):
                jobs.add_metric((state, user), count)
        yield jobs
        streams = GaugeMetricFamily("steve_jobs_open_streams", "streaming calls open now, "
                                    "by kind (output, input, events)", labels=("kind",))
        for kind, count in self.streams_open().items():
            streams.add_metric((kind,), count)
        yield streams

    def serve(self, host, port, certfile="", keyfile="", client_ca=""):
        """Listen on host:port: HTTPS with certfile and keyfile (and a client certificate
        client_ca signed), else HTTP. Raises UnavailableError."""
        tls = {"certfile": certfile, "keyfile": keyfile, "client_cafile": client_ca,
               "client_auth_required": True} if certfile else {}
        try:
            self.server, _ = self.prom.start_http_server(port, host, self.registry, **tls)
        except (OSError, ValueError) as e:
            raise UnavailableError(f"cannot serve metrics on {join_address(host, port)}: "
                                   f"{e}") from None

    def close(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def on_job_event(self, kind, st, record):
        """(The engine's observer: any thread, quick.)"""
        if kind == "started":
            self.starts.inc()
            shim, begun = record["shim"], record.get("dispatched_at") or record["created_at"]
            if shim.get("exec_at"):
                self.start_seconds.observe(max(0.0, shim["exec_at"] - begun))
            if record.get("dispatched_at"):
                self.queue_wait.observe(max(0.0, record["dispatched_at"] - record["created_at"]))
        elif kind == "queued":
            self.queued.inc()
        elif kind == "timed-out":
            self.deadline_stops.labels("timeout").inc()
        elif kind == "ended":
            self.ended.labels(st.state).inc()
            self.oom_kills.inc(st.oom_kills)
            if st.state == UNKNOWN:
                self.supervisor_deaths.inc()
            if st.state == CANCELLED and st.timed_out:
                self.deadline_stops.labels("queue_timeout").inc()

    def on_rpc(self, method, code, seconds):
        self.rpcs.labels(method, code).inc()
        self.rpc_seconds.labels(method).observe(seconds)

    def on_bytes_sent(self, size):
        self.bytes_sent.inc(size)


def is_loopback(host):
    """Whether host names this machine's loopback only ("localhost", 127.0.0.0/8, ::1)."""
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_metrics(engine, address, certfile, keyfile, client_ca, streams_open):
    """The Metrics served on address, or NoMetrics without one: plain HTTP on loopback,
    or HTTPS (certfile, keyfile) to clients with a certificate client_ca signed, as the
    API's are: job counts by user are not for anyone on the network. Raises
    UnavailableError."""
    if not address:
        return NoMetrics()
    try:
        host, port = split_address(address, "--metrics-listen")
    except ValueError as e:
        raise UnavailableError(str(e)) from None
    if bool(certfile) != bool(keyfile):
        raise UnavailableError("--metrics-cert and --metrics-key go together")
    if not certfile and not is_loopback(host):
        raise UnavailableError(f"--metrics-listen {address} is not a loopback address: give "
                               f"--metrics-cert and --metrics-key (HTTPS), or listen on "
                               f"127.0.0.1")
    try:
        metrics = Metrics(engine, streams_open)
    except ImportError:
        raise UnavailableError("--metrics-listen needs prometheus_client: pip install "
                               "prometheus-client (README: Batch hosts)") from None
    metrics.serve(host, port, certfile, keyfile, client_ca)
    engine.observe(metrics.on_job_event)
    log.info("metrics on %s://%s/metrics", "https" if certfile else "http", address)
    return metrics


###############################################################################
# gRPC service (the only section besides the client that imports grpc)
###############################################################################

# TLS 1.2 suites: ECDHE key exchange, AEAD ciphers, ECDSA certificates. TLS 1.3 suites are
# fixed by BoringSSL (all AEAD); grpc's minimum version is already TLS 1.2.
TLS12_CIPHER_SUITES = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305"])


def import_grpc(aio=True):
    """Import grpc and the generated stubs: the one place the file does.

    grpc reads GRPC_SSL_CIPHER_SUITES once, when it is first imported. The client skips
    grpc.aio (aio=False): every millisecond counts in a command's round trip.
    Returns (grpc, jobs_pb2, jobs_pb2_grpc).
    """
    os.environ["GRPC_SSL_CIPHER_SUITES"] = TLS12_CIPHER_SUITES
    if not aio:   # a client's failed handshake is told in one line of ours, not grpc's log
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import grpc
    if aio:
        import grpc.aio
    import jobs_pb2
    import jobs_pb2_grpc
    return grpc, jobs_pb2, jobs_pb2_grpc


# jobs.proto's numbers of State (STATE_ and the state's name) and View, written here so
# that the CLI and the spawner need not import protobuf to use them; a unit test keeps
# them equal to the generated jobs_pb2's.
STATE_TO_PB = {RUNNING: 1, PAUSED: 2, EXITED: 3, FAILED: 4, STOPPED: 5, KILLED: 6,
               OOM_KILLED: 7, UNKNOWN: 8, QUEUED: 9, CANCELLED: 10}
VIEW_SUMMARY = 1
PB_TO_STATE = {v: k for k, v in STATE_TO_PB.items()}

ERROR_CODES = {   # engine errors -> gRPC status code names: the one mapping
    NotFoundError: "NOT_FOUND", InvalidArgumentError: "INVALID_ARGUMENT",
    AlreadyExistsError: "ALREADY_EXISTS",
    FailedPreconditionError: "FAILED_PRECONDITION", ResourceExhaustedError: "RESOURCE_EXHAUSTED",
    PermissionDeniedError: "PERMISSION_DENIED", UnauthenticatedError: "UNAUTHENTICATED",
    UnavailableError: "UNAVAILABLE", DeadlineExceededError: "DEADLINE_EXCEEDED",
}
# Trailing metadata on every error status the server itself sends, so a client can tell
# "the server says it is unavailable" from "the server could not be reached".
ERROR_ORIGIN_KEY = "steve-jobs-status"
OUT_OF_HANDLES = (errno.EMFILE, errno.ENFILE)

DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000   # jobs in one List response
LIST_PAGE_BYTES = 3 * MiB           # and at most this much of them: any client can take it
SUMMARY_ARGV_BYTES = 256            # of a job's command in List's summary view


def page_token(created_at, job_id):
    """The opaque token of the page after the job (created_at, job_id) in list order."""
    import base64
    return base64.urlsafe_b64encode(json.dumps([created_at, job_id]).encode()).decode()


def parse_page_token(token):
    """The list cursor in a page token (None for ''). Raises InvalidArgumentError."""
    if not token:
        return None
    import base64
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        if isinstance(created_at, (int, float)) and isinstance(job_id, str):
            return (created_at, job_id)
    except (ValueError, TypeError):
        pass
    raise InvalidArgumentError("page_token is not one a List returned", field="page_token")


def cut_argv(argv, limit):
    """argv cut to about limit bytes of UTF-8 in all (the cut marked with '...')."""
    out, left = [], limit
    for arg in argv:
        data = arg.encode()
        if len(data) > left:
            out.append(data[:max(0, left)].decode(errors="ignore") + "...")
            break
        out.append(arg)
        left -= len(data) + 1
    return out


OUTPUT_MEMORY_BUDGET = 128 * MiB    # all output streams' in-flight chunks together
MIN_STREAM_CHUNK = 16 * KiB          # what a stream may read even when the budget is spent
# The most a stream's chunk holds: its read and write are one step of the event loop, and
# another user's call may wait for one (512 KiB: about a ms; as fast as 1 MiB, measured).
STREAM_CHUNK = CHUNK // 2
FOLLOW_SAFETY_NET = 1.0             # seconds: followers are woken this often even unasked
EVENTS_BACKLOG = 1000               # events an Events stream may fall behind before it ends
LANE_HOLD = 0.02                    # seconds a chunk's write may hold its user's lane
# A client that asks no runs (OutputRequest.runs) gets a message a run; this many of them
# come from one read of the index and output, as one chunk's worth of writes under the lane
# (a read a message cost such a client's reads ~200 times one stream's server CPU).
RUNS_PER_ONE_RUN_READ = 64
MAX_STOPS_PER_USER = 64              # Stop calls of one user waiting for their jobs' ends
SERVICE_THREADS = 16                 # for blocking engine calls, every user's together
SERVICE_THREADS_PER_USER = SERVICE_THREADS // 4   # of them one user's calls hold at once
MAX_INPUTS_PER_USER = 32             # Input calls of one user at once (each holds a message)
MAX_EVENT_STREAMS_PER_USER = 16      # Events calls of one user at once (each may hold a backlog)
MAX_RECEIVED_MESSAGE = 2 * MiB       # the largest message a client may send (Start, Input)
INPUT_FIRST_MESSAGE_TIMEOUT = 10.0 * TIME_SCALE   # s an Input call has to name its job
COPIER_TIMEOUT = 60.0 * TIME_SCALE               # s a copy's helper may take for one step


class ServerConfig(typing.NamedTuple):
    """Where the server listens, what it trusts, how long it keeps ended jobs."""
    listen: str = "127.0.0.1:50051"
    certs_dir: str = "certs"
    stop_jobs_on_exit: bool = False
    shutdown_grace: float = 5.0
    retain_seconds: float = 7 * 86400     # ended jobs older than this are removed
    retain_bytes: int = 10 * GiB          # then the oldest, until ended jobs' output fits
    prune_every: float = 60.0
    max_streams_per_user: int = 1024      # concurrent Output streams of one user
    handshake_timeout: float = 10.0       # seconds a new connection has to finish TLS
    open_files: int = 1024                # the server's RLIMIT_NOFILE, once raised
    host_network_roles: tuple = ("admin",)  # roles that may ask for the host's network
    egress_roles: tuple = ("admin", "user")  # roles that may ask for an egress network
    metrics_listen: str = ""              # host:port of the Prometheus endpoint; "": none
    metrics_cert: str = ""                # with metrics_key: HTTPS (needed off loopback)
    metrics_key: str = ""

    def connection_cap(self, max_jobs):
        """Connections the server accepts at once: what its file handles allow, less a
        reserve for jobs (a pidfd each), output reads and supervisors."""
        return max(64, self.open_files - max_jobs - 512)


def listen_address(text):
    """--listen as "host:port" (the default port added). Raises InvalidArgumentError."""
    try:
        return join_address(*split_address(text, "--listen"))
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None


def check_can_listen(listen):
    """Bind (and let go of) every address listen resolves to, so that what stands in the
    way is said in our words before grpc tries (its own words are a C-core log line).

    Raises UnavailableError: not resolvable, in use, not this host's."""
    host, port = split_address(listen, "--listen")
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UnavailableError(f"cannot listen on {listen}: {host!r} does not resolve "
                               f"({e.strerror})") from None
    for family, kind, proto, _, where in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as grpc binds
            try:
                probe.bind(where)
            except OSError as e:
                why = {errno.EADDRINUSE: "address in use (another server?)",
                       errno.EADDRNOTAVAIL: "not an address of this host",
                       errno.EACCES: "permission denied"}.get(e.errno, e.strerror)
                raise UnavailableError(f"cannot listen on {listen}: {why}") from None


class CertificateStore:
    """The server's TLS files; reloaded when they change (rotation without restart)."""

    FILES = ("server.key", "server.crt", "ca.crt")

    def __init__(self, certs_dir):
        self.dir = certs_dir
        self._stamp = None

    def read(self):
        """(key, cert, ca) bytes. Raises UnavailableError naming a missing file."""
        out = []
        for name in self.FILES:
            path = os.path.join(self.dir, name)
            try:
                with open(path, "rb") as f:
                    out.append(f.read())
            except OSError as e:
                raise UnavailableError(f"cannot read {path}: {e.strerror}") from None
        self._stamp = self._mtimes()
        return tuple(out)

    def changed(self):
        return self._mtimes() != self._stamp

    def _mtimes(self):
        stamps = []
        for name in self.FILES:
            try:
                stamps.append(os.stat(os.path.join(self.dir, name)).st_mtime_ns)
            except OSError:
                stamps.append(None)
        return tuple(stamps)


OPERATOR_KEYS = ("ca.key", "jwt-signing.key")   # they mint users and tokens: never on the host


def certificate_folder_problems(certs_dir):
    """Why certs_dir is unsafe to serve from: a list of one-line reasons (empty: safe).

    Jobs run as other users on this host: a private key or token they can read, or a key
    that can mint certificates or tokens, would make any job an admin."""
    problems = [f"{os.path.join(certs_dir, name)} is here: it can mint users or tokens; "
                f"keep it with the operator, off the job host"
                for name in OPERATOR_KEYS if os.path.exists(os.path.join(certs_dir, name))]
    for entry in sorted(os.scandir(certs_dir), key=lambda e: e.name):
        if entry.name.endswith((".key", ".jwt")) and entry.stat().st_mode & 0o077:
            problems.append(f"{entry.path} is readable by other users: chmod 600 it")
    return problems


def make_keys_private(certs_dir):
    """chmod 600 the private keys and tokens (*.key, *.jwt: regular files, not links) of
    certs_dir that others can read (after a clone, all of them: git keeps no modes), and
    say so. What --insecure-dev-certs does first: a development set on a shared host must
    not make every local user an admin."""
    made = []
    for entry in sorted(os.scandir(certs_dir), key=lambda e: e.name):
        if (entry.name.endswith((".key", ".jwt")) and entry.is_file(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_mode & 0o077):
            os.chmod(entry.path, 0o600)
            made.append(entry.name)
    if made:
        log.warning("--insecure-dev-certs: made %d keys and tokens in %s readable by their "
                    "owner only (chmod 600): %s", len(made), certs_dir, " ".join(made))


def is_development_ca(ca_pem):
    return b"steve-jobs DEVELOPMENT CA" in _subject_of(ca_pem)


def _subject_of(pem):
    try:
        from cryptography import x509
        return x509.load_pem_x509_certificate(pem).subject.rfc4514_string().encode()
    except Exception:
        return b""


class RpcStatus(typing.NamedTuple):
    """What a failed call answers: a gRPC status code name, a message, and the error's
    reason and field for google.rpc.ErrorInfo and BadRequest."""
    code: str
    message: str
    reason: str = "INTERNAL"
    field: str = None


def rpc_status(error):
    """The RpcStatus of an exception: the one mapping point.

    Anything unexpected is logged with its traceback and told as INTERNAL, no details.
    """
    for cls, code in ERROR_CODES.items():
        if isinstance(error, cls):
            return RpcStatus(code, str(error), error.reason, error.field)
    if isinstance(error, OSError) and error.errno in OUT_OF_HANDLES:
        log.error("out of file handles: %s", error)   # one line: it may come often
        return RpcStatus("RESOURCE_EXHAUSTED", "the server is out of file handles; try "
                         "again later", "SERVER_OUT_OF_FILE_HANDLES")
    log.error("internal error", exc_info=error)
    return RpcStatus("INTERNAL", "internal error")


@functools.cache
def rpc_error_messages():
    """The google.rpc Status, ErrorInfo and BadRequest message classes (a namespace).

    Built from their descriptors in a pool of their own: the googleapis-common-protos
    package would be a dependency for three small messages, and a private pool cannot
    clash with it if a program imports both."""
    from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
    F = descriptor_pb2.FieldDescriptorProto
    string, repeated, message = F.TYPE_STRING, F.LABEL_REPEATED, F.TYPE_MESSAGE

    def field(name, number, kind=string, label=F.LABEL_OPTIONAL, type_name=None):
        return F(name=name, number=number, type=kind, label=label, type_name=type_name)
    proto = descriptor_pb2.FileDescriptorProto(
        name="google/rpc/steve_jobs_error_model.proto", package="google.rpc",
        syntax="proto3", dependency=["google/protobuf/any.proto"])
    proto.message_type.add(name="Status", field=[
        field("code", 1, F.TYPE_INT32), field("message", 2),
        field("details", 3, message, repeated, ".google.protobuf.Any")])
    proto.message_type.add(name="ErrorInfo", field=[field("reason", 1), field("domain", 2)])
    bad_request = proto.message_type.add(name="BadRequest", field=[
        field("field_violations", 1, message, repeated, ".google.rpc.BadRequest.FieldViolation")])
    bad_request.nested_type.add(name="FieldViolation", field=[
        field("field", 1), field("description", 2)])
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(any_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(proto)
    classes = {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(
        f"google.rpc.{name}")) for name in ("Status", "ErrorInfo", "BadRequest")}
    return types.SimpleNamespace(**classes)


ERROR_DOMAIN = "steve-jobs"
STATUS_DETAILS_KEY = "grpc-status-details-bin"   # where gRPC's richer error model lives


def status_details(grpc, status):
    """A google.rpc.Status for RpcStatus status, serialized for STATUS_DETAILS_KEY."""
    m = rpc_error_messages()
    details = m.Status(code=getattr(grpc.StatusCode, status.code).value[0],
                       message=status.message)
    details.details.add().Pack(m.ErrorInfo(reason=status.reason, domain=ERROR_DOMAIN))
    if status.field:
        violations = m.BadRequest()
        violations.field_violations.add(field=status.field, description=status.message)
        details.details.add().Pack(violations)
    return details.SerializeToString()


def error_reason(details_bin):
    """(reason, field) from a serialized google.rpc.Status; ('', '') if it has none."""
    m = rpc_error_messages()
    reason, field = "", ""
    try:
        for detail in m.Status.FromString(details_bin).details:
            if detail.Is(m.ErrorInfo.DESCRIPTOR):
                info = m.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(m.BadRequest.DESCRIPTOR):
                bad = m.BadRequest()
                detail.Unpack(bad)
                field = bad.field_violations[0].field if bad.field_violations else ""
    except Exception:   # an odd server's details: the code and message still say enough
        pass
    return reason, field


def encode_output_chunk(piece, with_time=False):
    """An OutputPiece as a serialized OutputChunk: byte for byte what protobuf makes of it,
    with one copy of the data where protobuf's constructor and serializer make two (on a
    fast job's 1 MiB chunks, copies are much of the server's CPU)."""
    parts = [b"\x0a", _encoded_varint(len(piece.data)), piece.data]   # 1: data
    if piece.offset:
        parts += [b"\x10", _encoded_varint(piece.offset)]                # 2: offset
    if piece.stream:
        parts += [b"\x18", _encoded_varint(piece.stream)]                # 3: stream
    if with_time and piece.time:                                        # 4: time
        seconds, nanos = divmod(round(piece.time * 1e9), 10 ** 9)
        stamp = (b"\x08" + _encoded_varint(seconds) if seconds else b"") + (
            b"\x10" + _encoded_varint(nanos) if nanos else b"")
        parts += [b"\x22", _encoded_varint(len(stamp)), stamp]
    return b"".join(parts)


def one_run_pieces(runs):
    """OutputRuns as an OutputPiece a run (views of its data, not copies)."""
    data, start = memoryview(runs.data), 0
    for offset, size, stream, when in zip(runs.offsets, runs.sizes, runs.streams, runs.times):
        yield OutputPiece(offset, data[start:start + size], stream, when)
        start += size


def encode_output_runs(runs, jobs_pb2, with_time=False):
    """OutputRuns as a serialized OutputChunk: one run as encode_output_chunk makes it;
    several with their boundaries in the run_ fields (OutputRequest.runs), serialized by
    protobuf in C (the fields of a message may come in any order, so the two parts join)."""
    if len(runs.sizes) == 1:
        return encode_output_chunk(OutputPiece(runs.offsets[0], runs.data, runs.streams[0],
                                               runs.times[0]), with_time)
    boundaries = jobs_pb2.OutputChunk(run_offsets=runs.offsets, run_sizes=runs.sizes,
                                      run_streams=runs.streams,
                                      run_times=runs.times if with_time else ())
    return encode_output_chunk(OutputPiece(runs.offsets[0], runs.data)) + \
        boundaries.SerializeToString()


def _encoded_varint(value):
    """A non-negative int as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class OutputHub:
    """Fan-out of followed jobs: one engine subscription per job wakes every follower,
    and followers at the same offset share one read and one serialized message."""

    def __init__(self, engine, jobs_pb2, config):
        import asyncio
        self.engine, self.pb, self.config = engine, jobs_pb2, config
        self.loop = asyncio.get_running_loop()
        self.events = {}        # job id -> set of asyncio.Event
        self.unsubscribe = {}
        self.chunks = {}        # job id -> {offset: serialized OutputChunk}, until a wake
        self.streams = 0
        self.per_user = {}      # user -> streams open
        self.in_flight = {}     # user -> bytes of chunks read, not yet written out
        self.pending, self.pending_lock = set(), threading.Lock()   # wakes on their way
        self.loop.call_later(FOLLOW_SAFETY_NET, self._tick)

    def open_stream(self, user):
        """Count one more stream (Output or Input) of user's. Raises
        ResourceExhaustedError when user has max_streams_per_user streams open."""
        if self.per_user.get(user, 0) >= self.config.max_streams_per_user:
            raise ResourceExhaustedError(
                f"{user} has {self.config.max_streams_per_user} streams open (Output and "
                f"Input), the most one user may have (--max-streams-per-user)",
                reason="TOO_MANY_STREAMS")
        self.per_user[user] = self.per_user.get(user, 0) + 1
        self.streams += 1

    def close_stream(self, user):
        self.streams -= 1
        self.per_user[user] -= 1
        if not self.per_user[user]:
            del self.per_user[user]

    def watch(self, job_id, user):
        """An event set on every change of the job's output; a stream of user's
        (open_stream: raises ResourceExhaustedError over the cap)."""
        import asyncio
        self.open_stream(user)
        if job_id not in self.events:
            self.events[job_id] = set()
            self.unsubscribe[job_id] = self.engine.subscribe(
                job_id, lambda: self._wake_soon(job_id))
        event = asyncio.Event()
        self.events[job_id].add(event)
        return event

    def unwatch(self, job_id, event, user):
        self.close_stream(user)
        self.events[job_id].discard(event)
        if not self.events[job_id]:
            del self.events[job_id]
            self.chunks.pop(job_id, None)
            self.unsubscribe.pop(job_id)()
        if not self.streams:
            # The chunks streams held are freed now: give the memory back at once.
            trim_freed_memory()

    def read(self, job_id, offset, user, stream=0, by_time=False, runs=False):
        """(next offset, size, messages) of the output at offset, of stream (0: both), with
        write times if by_time: messages is a list of serialized OutputChunks, one holding
        many runs if runs, else one a run (up to RUNS_PER_ONE_RUN_READ); size 0 at its end
        (the offset may still move on: past output of the other stream).

        Only a job with several followers keeps chunks, and at most two (the offset
        followers are at, and the end they reach next): the cache then stays within the
        streams' budget. Raises the engine's errors.
        """
        key = (offset, stream, by_time, runs)
        cached = self.chunks.get(job_id)
        if cached is not None and key in cached:
            return cached[key]
        got = self.engine.read_runs(job_id, offset, self.chunk_size(user), stream, by_time,
                                    most_runs=RECORDS_PER_READ if runs else
                                    RUNS_PER_ONE_RUN_READ)
        if not got.data:
            messages = []
        elif runs:
            messages = [encode_output_runs(got, self.pb, with_time=by_time)]
        else:
            messages = [encode_output_chunk(piece, by_time) for piece in one_run_pieces(got)]
        chunk = got.after, len(got.data), messages
        if len(self.events[job_id]) > 1:
            cached = self.chunks.setdefault(job_id, {})
            if len(cached) >= 2:
                del cached[next(iter(cached))]
            cached[key] = chunk
        return chunk

    def _wake_soon(self, job_id):
        """From the watcher thread: have _wake(job_id) run on the loop, once however many
        writes come before it runs (each call_soon_threadsafe costs the loop a wake-up)."""
        with self.pending_lock:
            if job_id in self.pending:
                return
            self.pending.add(job_id)
        self.loop.call_soon_threadsafe(self._wake, job_id)

    def _wake(self, job_id):
        with self.pending_lock:
            self.pending.discard(job_id)
        self.chunks.pop(job_id, None)   # the end moved: cached chunks may be short
        for event in self.events.get(job_id, ()):
            event.set()

    def wake_all(self):
        for job_id in list(self.events):
            self._wake(job_id)

    def _tick(self):
        # Safety net: a missed inotify event delays followers by a second at most.
        self.wake_all()
        self.loop.call_later(FOLLOW_SAFETY_NET, self._tick)

    def chunk_size(self, user):
        """How much user's next read may take: half of what user's share of the budget
        has left. However many streams stall holding a chunk, together they hold at
        most the budget, plus MIN_STREAM_CHUNK each (every stream can always move on);
        and one user's stalled streams never shrink another user's share."""
        # A chunk in flight exists about three times (the bytes read, the serialized
        # message, grpc's copy of it): the budget counts all three.
        share = OUTPUT_MEMORY_BUDGET // 3 // max(1, len(self.per_user))
        left = share - self.in_flight.get(user, 0)
        return max(MIN_STREAM_CHUNK, min(STREAM_CHUNK, left // 2))

    def hold(self, user, size):
        """size bytes of user's are on their way out: they count against the budget until
        release(user, size)."""
        self.in_flight[user] = self.in_flight.get(user, 0) + size

    def release(self, user, size):
        self.in_flight[user] -= size
        if not self.in_flight[user]:
            del self.in_flight[user]

    @contextlib.contextmanager
    def sending(self, user, size):
        """Context of one write of size bytes: they count against the budget meanwhile."""
        self.hold(user, size)
        try:
            yield
        finally:
            self.release(user, size)


class UserShares:
    """Each user's share of something all users' calls use (the service's threads): at
    most `share` of one user's calls hold it at once; the others wait on the event loop,
    holding nothing, so that one user's many slow calls leave the rest to the others."""

    def __init__(self, share):
        self.share, self._of = share, {}   # user -> asyncio.Semaphore

    def of(self, user):
        """The async context of one of user's calls holding its share."""
        import asyncio
        return self._of.setdefault(user, asyncio.Semaphore(self.share))


class ClientGone(Exception):
    """A streaming call's client went away while we wrote to it (it cancelled)."""


async def write_or_gone(context, *messages):
    """context.write(message) of each, in order. Raises ClientGone if the client went away
    meanwhile: grpc then fails the write with its own ExecuteBatchError (of a private
    module), or says the call is cancelled."""
    try:
        for message in messages:
            await context.write(message)
    except Exception as e:
        if type(e).__name__ == "ExecuteBatchError" or context.cancelled():
            raise ClientGone() from None
        raise


class JobService:
    """Every RPC: identify, authorize, call the engine, translate, log one line. It only
    translates between protobuf and the engine; add_job_service registers it."""

    def __init__(self, grpc, jobs_pb2, engine, verifier, config=None, tracing=None):
        import concurrent.futures
        self.grpc, self.pb, self.engine, self.verifier = grpc, jobs_pb2, engine, verifier
        self.tracing = tracing or Tracing()
        self.config = config or ServerConfig()
        # Blocking engine calls run here, never on the event loop. Nothing waits here for
        # long: Wait and Stop await the job's end on the loop.
        self.start_pool = concurrent.futures.ThreadPoolExecutor(SERVICE_THREADS,
                                                                thread_name_prefix="start")
        self.thread_shares = UserShares(SERVICE_THREADS_PER_USER)   # of start_pool's, for
        # unary calls (a user's many removes of big folders must not stall every user)
        self.scan_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="scan")
        self.scan_lanes = {}    # user -> asyncio.Lock: one output scan of theirs at a time
        self.send_lanes = {}    # user -> asyncio.Lock: one chunk of theirs on the loop at a time
        self.hub = None
        self.waiting = {}       # (user, "Wait" or "Stop") -> such calls waiting for an end
        self.writers = {}       # job id -> the InputWriter writing to it
        self.shutting_down = False
        self.event_streams = frozenset()   # on_event(kind, JobStatus) of each Events call
        # (replaced, never changed: the engine's threads read it while the loop adds; the
        # engine tells us of events only while one is open: a start pays nothing else)
        self.metrics = NoMetrics()   # (serve() sets the Metrics it serves)

    def streams_open(self):
        """Streaming calls open now, by kind (a metric)."""
        inputs, hub = len(self.writers), self.hub
        return {"output": (hub.streams if hub else 0) - inputs, "input": inputs,
                "events": len(self.event_streams)}

    def _job_event(self, kind, st, _record):
        """(The engine's observer: any thread, quick.) Hand the event to each stream."""
        for on_event in self.event_streams:
            on_event(kind, st)

    def status_pb(self, st, summary=False):
        """A JobStatus message; summary: the List view (argv cut, no limits or workdir)."""
        message = self.pb.JobStatus(
            job_id=st.id, owner=st.owner, state=STATE_TO_PB[st.state],
            error=st.error, created_at=st.created_at,
            started_at=st.started_at, ended_at=st.ended_at, cpu_seconds=st.cpu_seconds,
            memory_bytes=st.memory_bytes, peak_memory_bytes=st.peak_memory_bytes,
            oom_kills=st.oom_kills, output_bytes=st.output_bytes,
            output_truncated=st.output_truncated, as_root=st.options.as_root,
            host_network=st.options.host_network, uid=st.uid, rw_host=st.options.rw_host,
            name=st.name, labels=dict(st.labels), request_id=st.request_id,
            stdin=st.options.stdin, trace_id=st.trace_id,
            sessions_dropped=st.sessions_dropped, timeout_seconds=st.options.timeout,
            timed_out=st.timed_out, network=st.network, network_state=st.network_state,
            egress_denied=st.egress_denied, remove_when_ended=st.options.remove,
            pids=st.pids, io_read_bytes=st.io_read_bytes, io_write_bytes=st.io_write_bytes,
            queue_position=st.queue_position, waiting_for=st.waiting_for,
            priority=st.priority, queue_timeout_seconds=st.queue_timeout,
            after=[self.pb.Dependency(job_id=i, kind=k) for i, k in st.after],
            view=self.pb.VIEW_SUMMARY if summary else self.pb.VIEW_FULL)
        if st.options.terminal:
            message.terminal.rows, message.terminal.columns = st.options.terminal
        for event in st.sessions:
            e = message.sessions.add(user=event.user, event=event.event, bytes=event.bytes)
            e.time.FromNanoseconds(int(event.time * 1e9))
        if summary:
            message.argv.extend(cut_argv(st.argv, SUMMARY_ARGV_BYTES))
        else:
            message.argv.extend(st.argv)
            message.limits.CopyFrom(self.limits_pb(st.limits))
            message.workdir = st.options.workdir
        for name, t in (("create_time", st.created_at), ("start_time", st.started_at),
                        ("end_time", st.ended_at)):
            if t:
                getattr(message, name).FromNanoseconds(int(t * 1e9))
        if st.exit_code is not None:
            message.exit_code = st.exit_code
        if st.signal is not None:
            message.signal = st.signal
        return message

    def limits_pb(self, limits):
        return self.pb.Limits(**{spec.proto: getattr(limits, spec.name) for spec in LIMITS})

    async def abort(self, context, status):
        """End the call with RpcStatus status, marked as the server's own (ERROR_ORIGIN_KEY),
        its reason and field in a google.rpc.Status (STATUS_DETAILS_KEY)."""
        await context.abort(getattr(self.grpc.StatusCode, status.code), status.message,
                            trailing_metadata=((ERROR_ORIGIN_KEY, status.code.lower()),
                                               (STATUS_DETAILS_KEY,
                                                status_details(self.grpc, status))))

    def identify(self, context, trace=""):
        """The verified Identity of the caller, with trace (the call's server span).
        Raises UnauthenticatedError."""
        return self._verify(context)._replace(trace=trace)

    def call_span(self, context, rpc):
        """The server's span of this call: in the client's trace when it sent a valid
        traceparent, else in a new one."""
        return self.tracing.rpc_span(
            rpc, dict(context.invocation_metadata()).get("traceparent", ""))

    def _verify(self, context):
        auth = context.auth_context()
        cn = (auth.get("x509_common_name") or [b""])[0].decode(errors="replace")
        pem = (auth.get("x509_pem_cert") or [b""])[0].decode(errors="replace")
        header = dict(context.invocation_metadata()).get("authorization", "")
        token = header[len("Bearer "):] if header.startswith("Bearer ") else ""
        return self.verifier.verify(token, cn, pem)

    def admit_and_resolve(self, identity, rpc, request):
        """Allow rpc with request to identity and, for a call about a job, set request.job_id
        to the id of the job it names. Raises InvalidArgumentError (a malformed request:
        said only to those identified), PermissionDeniedError, NotFoundError."""
        if request is MALFORMED:
            raise InvalidArgumentError("malformed request")
        authorize(identity, rpc)
        if rpc in JOB_RPCS and (request.job_id or rpc not in JOB_OPTIONAL_RPCS):
            request.job_id = self.job_for(identity, rpc, request.job_id)

    def job_for(self, identity, rpc, ref):
        """Authorize a call about the job ref names (an id, a name, a prefix); returns its id.
        Raises NotFoundError, InvalidArgumentError, PermissionDeniedError."""
        job_id = self.engine.resolve(ref, identity.user, ROLES[identity.role].all_jobs)
        try:
            authorize(identity, rpc, job_owner=self.engine.owner(job_id))
        except NotFoundError:
            # Word for word what the engine says of an id that does not exist.
            raise NotFoundError(f"no job {quoted(ref)}") from None
        return job_id

    async def Start(self, request, context):
        return await self.unary(context, "Start", self._start, request)

    async def Stop(self, request, context):
        return await self.unary(context, "Stop", self._stop, request)

    def _on_job(self, method):
        """An RPC body: the engine's method on the request's job, answered with its status."""
        return lambda identity, r: self.status_pb(method(r.job_id))

    async def Status(self, request, context):
        return await self.unary(context, "Status", self._on_job(self.engine.status),
                                request)

    async def Pause(self, request, context):
        return await self.unary(context, "Pause", self._on_job(self.engine.pause),
                                request)

    async def Resume(self, request, context):
        return await self.unary(context, "Resume", self._on_job(self.engine.resume),
                                request)

    async def Remove(self, request, context):
        def remove(identity, request):
            self.engine.remove(request.job_id)
            return self.pb.RemoveResponse()
        return await self.unary(context, "Remove", remove, request)

    async def List(self, request, context):
        return await self.unary(context, "List", self._list, request)

    async def Wait(self, request, context):
        return await self.unary(context, "Wait", self._wait, request)

    async def Signal(self, request, context):
        return await self.unary(context, "Signal", lambda identity, request: self.status_pb(
            self.engine.signal(request.job_id, request.signal, request.all)), request)

    def _list(self, identity, request):
        """One page of jobs: at most page_size, and at most LIST_PAGE_BYTES of them."""
        role = ROLES[identity.role]
        if (request.all_users or request.owner not in ("", identity.user)) and not role.all_jobs:
            raise PermissionDeniedError(f"role {identity.role} sees only its own jobs")
        if request.page_size > MAX_PAGE_SIZE:
            raise InvalidArgumentError(f"page_size is at most {MAX_PAGE_SIZE}",
                                       field="page_size")
        owner = request.owner or (None if request.all_users else identity.user)
        states = {PB_TO_STATE[s] for s in request.states if s in PB_TO_STATE}
        statuses = self.engine.iter_jobs(owner, states, sorted(request.labels.items()),
                                         request.name, after=parse_page_token(request.page_token))
        response, size = self.pb.ListResponse(), 0
        for st in statuses:
            if len(response.jobs) == (request.page_size or DEFAULT_PAGE_SIZE):
                break
            message = self.status_pb(st, summary=request.view != self.pb.VIEW_FULL)
            size += message.ByteSize() + 8
            if size > LIST_PAGE_BYTES and response.jobs:
                break
            response.jobs.append(message)
        else:
            return response
        last = response.jobs[-1]
        response.next_page_token = page_token(last.created_at, last.job_id)
        return response

    async def _wait(self, identity, request):
        """Wait's body: sleeps on the engine's notification of the job's end; the call's
        deadline, or the server's shutdown, ends it first."""
        with self._waiting(identity, "Wait", self.config.max_streams_per_user,
                           "--max-streams-per-user"):
            await self._until_ended(request.job_id)
        return self.status_pb(self.engine.status(request.job_id))

    async def _stop(self, identity, request):
        """Stop's body: the engine's stop begun (a timer kills at the grace's end), then
        its end awaited here, so a stop's grace holds no thread."""
        grace = request.grace_seconds if request.HasField("grace_seconds") else None
        with self._waiting(identity, "Stop", MAX_STOPS_PER_USER):
            deadline = self.engine.request_stop(request.job_id, grace)   # (quick: no waiting)
            if deadline is not None:
                await self._until_ended(request.job_id, deadline)
                self.engine.check_stopped(request.job_id)
        return self.status_pb(self.engine.status(request.job_id))

    @contextlib.contextmanager
    def _waiting(self, identity, rpc, cap, flag=""):
        """Context of a call of rpc that waits for a job's end: at most cap per user.
        Raises ResourceExhaustedError (over cap) before anything is done."""
        key = (identity.user, rpc)
        if self.waiting.get(key, 0) >= cap:
            raise ResourceExhaustedError(
                f"{identity.user} has {cap} {rpc} calls under way, the most one user may have"
                + (f" ({flag})" if flag else ""),
                reason=f"TOO_MANY_{rpc.upper().rstrip('S')}S")
        self.waiting[key] = self.waiting.get(key, 0) + 1
        try:
            yield
        finally:
            self.waiting[key] -= 1
            if not self.waiting[key]:
                del self.waiting[key]

    async def _until_ended(self, job_id, deadline=None):
        """Sleep (on the loop, on the engine's notification: no thread, no polling) until
        the job has ended and all its output is on disk, or until deadline (monotonic)
        passes, or the job's kill failed. Raises UnavailableError (shutting down)."""
        import asyncio
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        unsubscribe = self.engine.subscribe(
            job_id, lambda: loop.call_soon_threadsafe(changed.set))
        try:
            while self.engine.output_end(job_id) is None and not self.engine.kill_failed(job_id):
                if self.shutting_down:
                    raise UnavailableError("the server is shutting down; the job goes on")
                left = FOLLOW_SAFETY_NET if deadline is None else min(
                    FOLLOW_SAFETY_NET, deadline - time.monotonic())
                if left <= 0:
                    return
                changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), left)
        finally:
            unsubscribe()

    def _start(self, identity, request):
        job_id = self.engine.start(identity.user, list(request.argv),
                                   *self._start_arguments(identity, request),
                                   queue=self._queue_request(identity, request))
        return self.status_pb(self.engine.status(job_id))

    def _start_arguments(self, identity, request):
        """(Limits, JobOptions, JobMeta) of a StartRequest, allowed to identity. Raises
        PermissionDeniedError."""
        limits = Limits(**{spec.name: getattr(request.limits, spec.proto) for spec in LIMITS})
        if request.network not in NETWORK_MODES:
            raise InvalidArgumentError(f"network {request.network!r} is not one of "
                                       f"{', '.join(m for m in NETWORK_MODES if m)}",
                                       field="network")
        options = JobOptions(env=tuple(sorted(request.env.items())), workdir=request.workdir,
                             as_root=request.as_root,
                             host_network=request.host_network or request.network == "host",
                             egress=request.network == "egress",
                             rw_host=request.rw_host, stdin=request.stdin,
                             terminal=(request.terminal.rows, request.terminal.columns)
                             if request.HasField("terminal") else (),
                             timeout=request.timeout_seconds,
                             remove=request.remove_when_ended)
        check_start_allowed(identity, limits, options, self.engine.config.default_limits,
                            self.config.host_network_roles, self.config.egress_roles,
                            request.priority)
        meta = JobMeta(name=request.name, labels=tuple(request.labels.items()),
                       request_id=request.request_id, traceparent=identity.trace)
        return limits, options, meta

    def _queue_request(self, identity, request):
        """The QueueRequest of a StartRequest (check_start_allowed has checked its
        priority): its dependencies resolved as the caller sees jobs (another user's is no
        job to them). Raises NotFoundError, InvalidArgumentError."""
        after = []
        for dep in request.after[:MAX_AFTER + 1]:
            if dep.kind not in ("", *DEPENDENCY_KINDS):
                raise InvalidArgumentError(f"a dependency's kind is ok or any, not "
                                           f"{quoted(dep.kind)}", field="after")
            after.append((self.job_for(identity, "Status", dep.job_id), dep.kind or "ok"))
        return QueueRequest(wanted=request.queue if request.HasField("queue") else None,
                            after=tuple(after), priority=request.priority,
                            timeout=request.queue_timeout_seconds)

    async def unary(self, context, rpc, func, request):
        """Run one unary RPC: auth, engine call in a thread, errors mapped, one log line."""
        import asyncio
        started, user, outcome = time.monotonic(), "-", {"result": "OK"}
        job_id = getattr(request, "job_id", "")
        span = self.call_span(context, rpc)
        try:
            async with self.answering(context, outcome):
                identity = self.identify(context, span.traceparent)
                user = identity.user
                self.admit_and_resolve(identity, rpc, request)
                job_id = getattr(request, "job_id", "")   # now the id, not the name given
                result = await (func(identity, request) if asyncio.iscoroutinefunction(func)
                                else self.in_users_thread(user, func, identity, request))
                job_id = job_id or getattr(result, "job_id", "")
                return result
        finally:
            self.log_rpc(context, rpc, user, job_id, outcome, started, span)

    async def in_users_thread(self, user, func, *args, **kwargs):
        """func(*args, **kwargs) (a blocking engine call) in one of the service's threads,
        once one of user's share of them is free; returns what it returns."""
        async with self.thread_shares.of(user):
            return await asyncio_run_in(self.start_pool, functools.partial(func, *args, **kwargs))

    @contextlib.asynccontextmanager
    async def answering(self, context, outcome):
        """The body of a call: what it raises becomes the call's status (the one mapping,
        rpc_status), and outcome (for the log line) says which."""
        import asyncio
        try:
            yield
        except asyncio.CancelledError:
            outcome["result"] = "CANCELLED"
            raise
        except ClientGone:
            outcome["result"] = "CANCELLED"   # nothing to answer, nothing went wrong here
        except Exception as e:
            status = rpc_status(e)
            outcome.update(result=status.code, why=loggable(status.message))
            await self.abort(context, status)

    def log_rpc(self, context, rpc, user, job_id, outcome, started, span, **more):
        """The one line every RPC logs, and counts; its span ends."""
        seconds = time.monotonic() - started
        log_line("rpc", user=loggable(user), peer=loggable(context.peer()), method=rpc,
                 job=loggable(job_id or "-"), **outcome, **more,
                 duration_ms=round(seconds * 1000, 1), trace_id=trace_id_of(span.traceparent))
        self.metrics.on_rpc(rpc, outcome["result"], seconds)
        span.end(outcome, user=user if user != "-" else "", job_id=job_id, **more)

    async def Output(self, request, context):
        started, user, outcome, sent = time.monotonic(), "-", {"result": "OK"}, [0]
        event, span = None, self.call_span(context, "Output")
        try:
            async with self.answering(context, outcome):
                identity = self.identify(context, span.traceparent)
                user = identity.user
                self.admit_and_resolve(identity, "Output", request)
                if request.follow and self.engine.has_terminal(request.job_id):
                    self.engine.record_session(request.job_id, user, "watch")
                if request.stream not in (0, STDOUT, STDERR):
                    raise InvalidArgumentError("stream must be STDOUT, STDERR or unset (both)",
                                               field="stream")
                event = self.streams().watch(request.job_id, user)   # (the cap: first)
                offset = max(request.offset, await self._output_start(request, user))
                await self._send_output(request, context, event, offset, user, sent)
        finally:
            if event is not None:
                self.hub.unwatch(request.job_id, event, user)
            self.log_rpc(context, "Output", user, getattr(request, "job_id", ""), outcome,
                         started, span, bytes=sent[0])

    async def Events(self, request, context):
        started, user, outcome, sent = time.monotonic(), "-", {"result": "OK"}, [0]
        span = self.call_span(context, "Events")
        try:
            async with self.answering(context, outcome):
                identity = self.identify(context, span.traceparent)
                user = identity.user
                self.admit_and_resolve(identity, "Events", request)
                wanted = self._events_wanted(identity, request)
                with self._waiting(identity, "Events", MAX_EVENT_STREAMS_PER_USER):
                    await self._send_events(context, wanted, sent)
        finally:
            self.log_rpc(context, "Events", user, getattr(request, "job_id", ""), outcome,
                         started, span, events=sent[0])

    def _events_wanted(self, identity, request):
        """Events' filter: wanted(JobStatus) says whether the caller gets its events.
        Raises PermissionDeniedError (others' jobs asked by who may not see them),
        NotFoundError, InvalidArgumentError."""
        role = ROLES[identity.role]
        if (request.all_users or request.owner not in ("", identity.user)) and not role.all_jobs:
            raise PermissionDeniedError(f"role {identity.role} sees only its own jobs")
        job_id = request.job_id   # (resolved and authorized by admit_and_resolve)
        owner = request.owner or (None if request.all_users else identity.user)
        labels = dict(request.labels)
        return lambda st: ((st.id == job_id) if job_id else
                           (owner is None or st.owner == owner)) and all(
            dict(st.labels).get(k) == v for k, v in labels.items())

    async def _send_events(self, context, wanted, sent):
        """Events' loop: each wanted event as it comes, until the call or the server ends.
        A reader that falls EVENTS_BACKLOG events behind is ended (RESOURCE_EXHAUSTED)
        rather than let them pile up here."""
        import asyncio
        loop, backlog, dropped = asyncio.get_running_loop(), asyncio.Queue(), [0]

        def keep(item):   # (on the loop)
            if backlog.qsize() >= EVENTS_BACKLOG:
                dropped[0] += 1
            else:
                backlog.put_nowait(item)

        def on_event(kind, st):   # (on the engine's threads: quick)
            if wanted(st):
                with contextlib.suppress(RuntimeError):   # (the loop has closed)
                    loop.call_soon_threadsafe(keep, (time.time(), kind, st))
        if not self.event_streams:
            self.engine.observe(self._job_event)
        self.event_streams = self.event_streams | {on_event}
        try:
            while True:
                if self.shutting_down:
                    raise UnavailableError("the server is shutting down")
                try:
                    when, kind, st = await asyncio.wait_for(backlog.get(), FOLLOW_SAFETY_NET)
                except asyncio.TimeoutError:
                    continue
                if dropped[0]:
                    raise ResourceExhaustedError(
                        f"this stream fell {EVENTS_BACKLOG} events behind and lost "
                        f"{dropped[0]}: read faster, or ask for fewer (a job, a label)",
                        reason="EVENTS_BEHIND")
                message = self.pb.JobEvent(kind=kind, job=self.status_pb(st, summary=True))
                message.time.FromNanoseconds(int(when * 1e9))
                await write_or_gone(context, message)
                sent[0] += 1
        finally:
            self.event_streams = self.event_streams - {on_event}
            if not self.event_streams:
                self.engine.unobserve(self._job_event)

    async def _send_output(self, request, context, event, offset, user, sent):
        """Output's loop: chunks from offset until the end (with follow: until the job has
        ended and all was sent), counting the bytes in sent[0]."""
        import asyncio
        lane = self.send_lanes.setdefault(user, asyncio.Lock())
        while True:
            event.clear()
            after, size = await self._send_chunk(request, context, offset, user, lane)
            if size:
                offset = after
                sent[0] += size
                continue
            if after > offset:   # past output of the other stream
                offset = after
                await asyncio.sleep(0)   # (a long skip: a block at a time, others between)
                continue
            if not request.follow:
                return
            end = self.engine.output_end(request.job_id)
            if end is not None and offset >= end:
                return
            if self.shutting_down:
                raise UnavailableError("the server is shutting down; the job goes on")
            await event.wait()   # the hub's tick is the safety net

    async def _send_chunk(self, request, context, offset, user, lane):
        """(after, size): the next chunk of Output's from offset, read and written (size 0:
        nothing to send; after may still move on, past output of the other stream).
        Raises ClientGone."""
        import asyncio
        # Reads and writes run on the loop (a read takes a few ms at most: read_runs; a
        # write serializes, encrypts and sends), one chunk of each user's at a time under
        # their lane: however many streams one user reads, another's call waits for one
        # chunk of theirs at most, and each user gets one share of the loop.
        writing = None
        try:
            async with lane:
                after, size, chunk = self.hub.read(request.job_id, offset, user,
                                                   request.stream, request.timestamps,
                                                   request.runs)
                if not size:
                    return after, 0
                self.hub.hold(user, size)
                self.metrics.on_bytes_sent(size)
                writing = asyncio.ensure_future(write_or_gone(context, *chunk))
                # A client that does not read (flow control) frees the lane after LANE_HOLD:
                # a slow reader holds one chunk and slows nobody else.
                await asyncio.wait({writing}, timeout=LANE_HOLD)
            await writing
            return after, size
        finally:
            if writing is not None:
                writing.cancel()
                self.hub.release(user, size)

    def streams(self):
        """The OutputHub: every Output and Input stream counts there (made on first use)."""
        if self.hub is None:
            self.hub = OutputHub(self.engine, self.pb, self.config)
        return self.hub

    async def Input(self, request_iterator, context):
        started, user, outcome, job_id = time.monotonic(), "-", {"result": "OK"}, ""
        span, writer, counted = self.call_span(context, "Input"), None, False
        try:
            async with self.answering(context, outcome):
                identity = self.identify(context, span.traceparent)
                user = identity.user
                authorize(identity, "Input")
                with self._waiting(identity, "Input", MAX_INPUTS_PER_USER):
                    self.streams().open_stream(user)
                    counted = True
                    first = await self._first_message(request_iterator, "Input")
                    job_id = self.job_for(identity, "Input", first.job_id)
                    writer = await self._take_input(job_id, user, first.take_over)
                    try:
                        await writer.relay(first, request_iterator, self.hub, user)
                    finally:
                        if not (writer.sent_eof or writer.ended_because or self.shutting_down
                                or self.engine.has_terminal(job_id)):
                            await writer.end_input()   # (a terminal waits for attach)
                return self.pb.InputSummary(bytes=writer.written)
        finally:
            if counted:
                self.hub.close_stream(user)
            if writer is not None:
                self._release_input(writer)
            self.log_rpc(context, "Input", user, job_id, outcome, started, span,
                         bytes=writer.written if writer else 0)

    @staticmethod
    async def _first_message(messages, rpc):
        """A client stream's (Input's, CopyIn's) first message, which names the job. Raises
        InvalidArgumentError (none, or malformed), DeadlineExceededError (none came in
        INPUT_FIRST_MESSAGE_TIMEOUT: a call that says nothing holds nothing for long)."""
        import asyncio
        try:
            first = await asyncio.wait_for(anext(messages, None), INPUT_FIRST_MESSAGE_TIMEOUT)
        except asyncio.TimeoutError:
            raise DeadlineExceededError(f"{rpc}'s first message did not come in "
                                        f"{INPUT_FIRST_MESSAGE_TIMEOUT:g} s") from None
        if first is None or first is MALFORMED:
            raise InvalidArgumentError(f"{rpc}'s first message must name the job")
        return first

    async def _take_input(self, job_id, user, take_over):
        """Become the job's one writer: an InputWriter connected to its supervisor.
        Raises FailedPreconditionError (another writes, and no take_over), the engine's."""
        import asyncio
        folder = self.engine.input_folder(job_id)
        other = self.writers.get(job_id)
        if other is not None:
            if not take_over:
                raise FailedPreconditionError(
                    f"{other.user} is writing to job {job_id} (since "
                    f"{rfc3339(other.since)}); take over to replace them", reason="INPUT_BUSY")
            other.end(f"{user} took over job {job_id}'s input")
            self.engine.record_session(job_id, user, "taken-over")
        writer = InputWriter(job_id, user)
        self.writers[job_id] = writer
        try:
            await writer.connect(asyncio.get_running_loop(), folder,
                                 lambda: self.engine.input_folder(job_id))
        except BaseException:
            self._release_input(writer)
            raise
        self.engine.record_session(job_id, user, "input")
        return writer

    def _release_input(self, writer):
        writer.close()
        if self.writers.get(writer.job_id) is writer:
            del self.writers[writer.job_id]
        self.engine.record_session(writer.job_id, writer.user, "input-end", writer.written)

    async def _admit_job_stream(self, context, rpc, span, messages, call):
        """A client stream about one job (CopyIn, Exec): its caller identified and allowed
        rpc, one of their streams counted, and its first message, whose job they may act
        on; call (a JobStreamCall) keeps who and which job. Returns the first message.
        Raises UnauthenticatedError, PermissionDeniedError, ResourceExhaustedError,
        NotFoundError, InvalidArgumentError, DeadlineExceededError."""
        identity = self.identify(context, span.traceparent)
        call.user = identity.user
        authorize(identity, rpc)
        call.counted = self._count_stream(call.user)
        first = await self._first_message(messages, rpc)
        call.job_id = self.job_for(identity, rpc, first.job_id)
        return first

    def _count_stream(self, user):
        """Count a call in user's streams (the per-user cap). Returns True. Raises
        ResourceExhaustedError."""
        self.streams().open_stream(user)
        return True

    def _end_file_call(self, counted_user, copier):
        """A file call's end: its stream given back (if it was counted), its copier closed."""
        if counted_user is not None:
            self.hub.close_stream(counted_user)
        if copier is not None:
            copier.close()

    async def CopyOut(self, request, context):
        started, user, outcome, sent = time.monotonic(), "-", {"result": "OK"}, [0]
        span, counted, copier = self.call_span(context, "CopyOut"), False, None
        try:
            async with self.answering(context, outcome):
                identity = self.identify(context, span.traceparent)
                user = identity.user
                self.admit_and_resolve(identity, "CopyOut", request)
                counted = self._count_stream(user)
                copier = HelperConnection(self.engine.open_copy(request.job_id, "out",
                                                                request.path))
                await copier.report()   # (may it go on?)
                self.engine.record_session(request.job_id, user, "copy-out")
                while (data := await copier.data()) is not None:
                    await write_or_gone(context, self.pb.TarChunk(data=data))
                    sent[0] += len(data)
        finally:
            self._end_file_call(user if counted else None, copier)
            self.log_rpc(context, "CopyOut", user, getattr(request, "job_id", ""), outcome,
                         started, span, bytes=sent[0])

    async def CopyIn(self, request_iterator, context):
        started, outcome, call = time.monotonic(), {"result": "OK"}, JobStreamCall()
        span, copier, sent = self.call_span(context, "CopyIn"), None, 0
        try:
            async with self.answering(context, outcome):
                first = await self._admit_job_stream(context, "CopyIn", span,
                                                     request_iterator, call)
                copier = HelperConnection(self.engine.open_copy(call.job_id, "in",
                                                                first.path, first.as_name))
                await copier.report()
                self.engine.record_session(call.job_id, call.user, "copy-in")
                done = await self._relay_copy_in(copier, first, request_iterator)
                sent = done.get("bytes", 0)
                return self.pb.CopySummary(files=done.get("files", 0), bytes=sent)
        finally:
            self._end_file_call(call.counted_user(), copier)
            if copier is not None:   # (its files count toward the quota: not on the loop)
                with contextlib.suppress(Error):
                    await asyncio_run_in(self.start_pool, self.engine.count_kept_files,
                                         call.job_id)
            self.log_rpc(context, "CopyIn", call.user, call.job_id, outcome, started, span,
                         bytes=sent)

    async def StartWithFiles(self, request_iterator, context):
        started, user, outcome, job_id = time.monotonic(), "-", {"result": "OK"}, ""
        span, counted, copier, prepared = self.call_span(context, "StartWithFiles"), False, \
            None, None
        try:
            async with self.answering(context, outcome):
                identity = self.identify(context, span.traceparent)
                user = identity.user
                authorize(identity, "StartWithFiles")
                counted = self._count_stream(user)
                first = await self._first_message(request_iterator, "StartWithFiles")
                request = first.start
                if request.workdir:
                    raise InvalidArgumentError("files go into the job's own working folder: "
                                               "not with a workdir", field="workdir")
                arguments = self._start_arguments(identity, request)
                prepared = await self.in_users_thread(
                    user, self.engine.start, user, list(request.argv), *arguments,
                    fill=True, queue=self._queue_request(identity, request))
                if isinstance(prepared, str):   # a retry: the first attempt's job
                    job_id, prepared = prepared, None
                    return self.status_pb(self.engine.status(job_id))
                copier = HelperConnection(self.engine.open_fill(prepared))
                await copier.report()
                done = await self._relay_copy_in(copier, first, request_iterator)
                job_id = await self.in_users_thread(user, self.engine.launch, prepared)
                prepared = None
                self.engine.record_session(job_id, user, "copy-in", done.get("bytes", 0))
                return self.status_pb(self.engine.status(job_id))
        finally:
            self._end_file_call(user if counted else None, copier)
            if prepared is not None:   # (its folders may be large: not on the loop; a
                # clean-up, so outside the user's share: it must not wait behind their calls)
                await asyncio_run_in(self.start_pool, self.engine.abandon, prepared)
            self.log_rpc(context, "StartWithFiles", user, job_id, outcome, started, span)

    @staticmethod
    async def _relay_copy_in(copier, first, messages):
        """Send first's and every later message's tar data to a copier; its last report."""
        message = first
        while message is not None:
            if message is MALFORMED:
                raise InvalidArgumentError("malformed message")
            if not await copier.send(message.data):
                break   # it stopped reading: its report says why
            message = await anext(messages, None)
        return await copier.finish()

    async def Exec(self, request_iterator, context):
        started, outcome, call = time.monotonic(), {"result": "OK"}, JobStreamCall()
        span, helper, feeding = self.call_span(context, "Exec"), None, None
        try:
            async with self.answering(context, outcome):
                first = await self._admit_job_stream(context, "Exec", span, request_iterator,
                                                     call)
                terminal = (first.terminal.rows, first.terminal.columns) \
                    if first.HasField("terminal") else ()
                helper = HelperConnection(self.engine.open_exec(
                    call.job_id, list(first.argv), terminal))
                await helper.report()
                self.engine.record_session(call.job_id, call.user, "exec")
                log_line("exec", job=call.job_id, user=loggable(call.user),
                         argv=loggable(" ".join(first.argv)))
                feeding = asyncio_task(self._feed_exec(helper, first, request_iterator))
                await self._relay_exec_output(context, helper)
        finally:
            if feeding is not None:
                feeding.cancel()
            self._end_file_call(call.counted_user(), helper)
            self.log_rpc(context, "Exec", call.user, call.job_id, outcome, started, span)

    @staticmethod
    async def _feed_exec(helper, first, messages):
        """Exec's input: each message's data, size and eof, to the helper, until the
        client's stream ends (which ends nothing: the command may still write)."""
        message = first
        while message is not None:
            if message is MALFORMED:
                return
            if message.HasField("size"):
                await helper.send_frame(b"W", json.dumps(
                    [message.size.rows, message.size.columns]).encode())
            if message.data:
                await helper.send_frame(b"I", message.data)
            if message.eof:
                await helper.send_frame(b"E", b"")
            message = await anext(messages, None)

    async def _relay_exec_output(self, context, helper):
        """Exec's output: the helper's frames as ExecOutputs, the last saying how it ended.
        Raises UnavailableError (the helper went away: the job ended meanwhile)."""
        streams = {b"O": STDOUT, b"e": STDERR}
        while True:
            kind, payload = await helper.frame()
            if kind in streams:
                await write_or_gone(context, self.pb.ExecOutput(data=payload,
                                                                stream=streams[kind]))
            elif kind == b"X":
                ended = json.loads(payload)
                await write_or_gone(context, self.pb.ExecOutput(
                    ended=True, exit_code=ended.get("exit_code", 0),
                    signal=ended.get("signal", 0)))
                return

    async def _output_start(self, request, user):
        """Where an Output request's tail_lines, tail_bytes and since start it (0: unset).
        Found in the scan pool (tail_lines reads the output backwards), one scan of each
        user's at a time, so that one user's tails delay neither the calls of the start
        pool nor another user's tails; a cancelled call's scan stops at its next block."""
        import asyncio
        since = request.since.ToNanoseconds() / 1e9 if request.HasField("since") else 0.0
        if not (request.tail_lines or request.tail_bytes or since):
            return 0
        lane = self.scan_lanes.setdefault(user, asyncio.Lock())
        cancelled = threading.Event()
        try:
            async with lane:
                return await asyncio.get_running_loop().run_in_executor(
                    self.scan_pool, functools.partial(
                        self.engine.output_start, request.job_id, request.stream,
                        request.tail_lines, request.tail_bytes, since,
                        cancelled=cancelled.is_set))
        finally:
            cancelled.set()

    def begin_shutdown(self):
        self.shutting_down = True
        if self.hub is not None:
            self.hub.wake_all()


class JobStreamCall:
    """What a streaming call's end and log line need: who called, about which job, and
    whether one of their streams was counted."""

    def __init__(self):
        self.user, self.job_id, self.counted = "-", "", False

    def counted_user(self):
        return self.user if self.counted else None


async def asyncio_run_in(pool, func, *args):
    import asyncio
    return await asyncio.get_running_loop().run_in_executor(pool, func, *args)


def asyncio_task(coroutine):
    import asyncio
    return asyncio.ensure_future(coroutine)


class HelperConnection:
    """The service's end of a helper (copier_main, exec_main): its frames read and what it
    is sent, on the event loop; a copy's waits bounded by COPIER_TIMEOUT."""

    def __init__(self, sock):
        import asyncio
        self.sock, self.loop = sock, asyncio.get_running_loop()
        sock.setblocking(False)

    async def _exactly(self, size, timeout=COPIER_TIMEOUT):
        import asyncio
        data = bytearray()
        while len(data) < size:
            try:
                got = await asyncio.wait_for(self.loop.sock_recv(self.sock, size - len(data)),
                                             timeout)
            except asyncio.TimeoutError:
                raise UnavailableError("the helper (copy or exec) stopped answering") from None
            if not got:
                raise UnavailableError("the helper (copy or exec) went away: the job may "
                                       "have ended")
            data += got
        return bytes(data)

    async def _frame(self, timeout=COPIER_TIMEOUT):
        kind, size = COPY_FRAME.unpack(await self._exactly(COPY_FRAME.size, timeout))
        return kind, await self._exactly(size)

    async def frame(self):
        """The next (kind, payload), however long it takes to come (an exec's output may
        pause for hours). Raises UnavailableError (the helper went away)."""
        return await self._frame(timeout=None)

    async def send_frame(self, kind, payload):
        """Send one frame (an exec's input); False if the helper no longer reads."""
        return await self.send(COPY_FRAME.pack(kind, len(payload)) + payload)

    async def report(self):
        """The next report (a dict). Raises the Error of a refusal, UnavailableError."""
        kind, payload = await self._frame()
        report = json.loads(payload) if kind == b"R" else {}
        if not report.get("ok"):
            raise copy_refusal(report)
        return report

    async def data(self):
        """The next tar bytes of a copy out; None once it is whole. Raises as report."""
        kind, payload = await self._frame()
        if kind == b"D":
            return payload
        report = json.loads(payload)
        if not report.get("ok"):
            raise copy_refusal(report)
        return None

    async def send(self, data):
        """Send tar bytes of a copy in; False if the helper no longer reads them."""
        import asyncio
        try:
            await asyncio.wait_for(self.loop.sock_sendall(self.sock, data), COPIER_TIMEOUT)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False
        except asyncio.TimeoutError:
            raise UnavailableError("the helper (copy or exec) stopped reading") from None

    async def finish(self):
        """The end of a copy in: the stream's end said, the helper's last report read."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        return await self.report()

    def close(self):
        self.sock.close()


class InputWriter:
    """One Input call's connection to a job's supervisor (see InputRelay): sends data,
    terminal sizes, redraws and eof as they come. A send waits while the supervisor does
    not read (the job does not read its input), and the client's stream waits with it."""

    def __init__(self, job_id, user):
        self.job_id, self.user, self.since = job_id, user, time.time()
        self.written, self.ended_because, self.sent_eof = 0, "", False
        self.sock, self.loop, self.taken = None, None, None   # taken: set by end()

    async def connect(self, loop, folder, check_running):
        """Connect to the job's supervisor. A job just started may not listen yet: while
        check_running() (which raises the engine's error once the job has ended) passes,
        the connect is tried again, for up to INPUT_CONNECT_TIMEOUT in all.

        Raises FailedPreconditionError (the job ended), DeadlineExceededError (its
        supervisor did not take the connection in time)."""
        import asyncio
        self.loop = loop
        deadline, pause = loop.time() + INPUT_CONNECT_TIMEOUT, 0.002
        while True:
            self.close()
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.sock.setblocking(False)
            with contextlib.suppress(OSError):   # room for whole pieces (root may exceed max)
                self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 * INPUT_PIECE)
            try:
                with opened_folder(folder) as fd:   # (see bind_in_folder)
                    await asyncio.wait_for(loop.sock_connect(
                        self.sock, f"/proc/self/fd/{fd}/{INPUT_SOCKET}"),
                        max(0.0, deadline - loop.time()))
                return
            except asyncio.TimeoutError:
                break
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                    raise FailedPreconditionError(f"cannot connect to job {self.job_id}'s "
                                                  f"supervisor: {e.strerror}") from None
            check_running()
            if loop.time() + pause > deadline:
                break
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)
        raise DeadlineExceededError(f"job {self.job_id}'s supervisor does not take input "
                                    f"now; try again")

    async def relay(self, first, messages, hub, user):
        """Send first's and every later message's content until the stream ends or eof;
        while the supervisor takes a message, its bytes count in user's share of hub's
        memory budget (hub.sending), as output chunks do. Raises InvalidArgumentError (a
        malformed message), FailedPreconditionError (the job ended, or another took over)."""
        import asyncio
        self.taken = asyncio.Event()
        message = first
        while message is not None:
            if message is MALFORMED:
                raise InvalidArgumentError("malformed message")
            with hub.sending(user, len(message.data)):
                await self._send_message(message)
            if message.eof:
                return
            # A writer taken over is told at once, not at its next message.
            coming = asyncio.ensure_future(anext(messages, None))
            taken = asyncio.ensure_future(self.taken.wait())
            await asyncio.wait((coming, taken), return_when=asyncio.FIRST_COMPLETED)
            taken.cancel()
            if not coming.done():
                coming.cancel()
                raise FailedPreconditionError(self.ended_because, reason="INPUT_TAKEN_OVER")
            message = coming.result()

    async def _send_message(self, m):
        if m.HasField("size"):
            await self._send(INPUT_SIZE + INPUT_SIZE_FORMAT.pack(
                min(m.size.rows, 65535), min(m.size.columns, 65535)))
        data = memoryview(m.data)
        for at in range(0, len(data), INPUT_PIECE):
            piece = data[at:at + INPUT_PIECE]
            await self._send(INPUT_DATA + piece)
            self.written += len(piece)
        if m.redraw:
            await self._send(INPUT_REDRAW)
        if m.eof:
            await self._send(INPUT_EOF)
            self.sent_eof = True

    async def end_input(self):
        """The writer went away without eof (Ctrl-C, a lost connection): end the job's
        stdin, bounded, so that no job waits for ever on an input nobody holds. Never
        raises."""
        import asyncio
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._send(INPUT_EOF), INPUT_CONNECT_TIMEOUT)
            self.sent_eof = True

    async def _send(self, message):
        try:
            await self.loop.sock_sendall(self.sock, message)
        except OSError:
            raise FailedPreconditionError(
                self.ended_because or f"job {self.job_id} takes no more input (it has ended)",
                reason="INPUT_TAKEN_OVER" if self.ended_because else "JOB_NOT_RUNNING",
            ) from None

    def end(self, why):
        """Another writer takes over: the supervisor hangs up on us now, and our next send
        fails with why. (shutdown, not close: the loop may be waiting on the socket.)"""
        self.ended_because = why
        if self.taken is not None:
            self.taken.set()
        with contextlib.suppress(OSError, AttributeError):   # (None: not connected yet)
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class _Malformed:
    """Stands for a request that could not be decoded (the handler answers INVALID_ARGUMENT)."""


MALFORMED = _Malformed()


def add_job_service(grpc, jobs_pb2, server, servicer):
    """Register servicer like the generated code does, but with decoders that turn a
    malformed request into MALFORMED instead of an UNKNOWN error naming our internals."""
    from google.protobuf.message import DecodeError

    def tolerant(message_class):
        def decode(data):
            try:
                return message_class.FromString(data)
            except DecodeError:
                return MALFORMED
        return decode

    handlers = {}
    service = jobs_pb2.DESCRIPTOR.services_by_name["JobService"]
    for method in service.methods:
        make = {(True, True): grpc.stream_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (False, False): grpc.unary_unary_rpc_method_handler}[
                    (method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=tolerant(getattr(jobs_pb2, method.input_type.name)),
            # Output writes messages serialized once for all its followers (OutputHub).
            response_serializer=None if method.name == "Output"
            else getattr(jobs_pb2, method.output_type.name).SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))


async def serve(engine, config, verifier, on_started=None):
    """Run the gRPC server until SIGTERM or SIGINT, then shut down gracefully."""
    import asyncio
    grpc, jobs_pb2, jobs_pb2_grpc = import_grpc()
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    store = CertificateStore(config.certs_dir)
    key, cert, ca = store.read()

    def fetch_certificates():
        # Called by grpc before each handshake: a changed file takes effect at once.
        if not store.changed():
            return None
        try:
            k, c, a = store.read()
            log.warning("TLS certificates reloaded from %s", config.certs_dir)
            return grpc.ssl_server_certificate_configuration([(k, c)], root_certificates=a)
        except Error as e:
            log.error("keeping the old TLS certificates: %s", e)
            return None

    credentials = grpc.dynamic_ssl_server_credentials(
        grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca),
        fetch_certificates, require_client_authentication=True)
    connections = config.connection_cap(engine.config.max_running_jobs)
    server = grpc.aio.server(options=[
        # (What one Input message can hold in memory: the CLI sends at most INPUT_MESSAGE.)
        ("grpc.max_receive_message_length", MAX_RECEIVED_MESSAGE), ("grpc.so_reuseport", 0),
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        # A connection that has not finished its TLS handshake by then is dropped: idle
        # sockets must not hold the server's file handles.
        ("grpc.server_handshake_timeout_ms", int(config.handshake_timeout * 1000)),
        # Fewer connections than file handles: a flood of connections then meets a closed
        # door instead of leaving the server unable to open a job's files.
        ("grpc.max_allowed_incoming_connections", connections)])
    return_freed_memory_to_the_system()
    tracing = make_tracing()
    if tracing.exports:
        engine.observe(tracing.on_job_event)
    service = JobService(grpc, jobs_pb2, engine, verifier, config, tracing)
    add_job_service(grpc, jobs_pb2, server, service)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        server.add_secure_port(config.listen, credentials)
    except RuntimeError as e:
        raise UnavailableError(f"cannot listen on {config.listen}: {e}") from None
    service.metrics = serve_metrics(engine, config.metrics_listen, config.metrics_cert,
                                    config.metrics_key, os.path.join(config.certs_dir, "ca.crt"),
                                    service.streams_open)
    # Only with the port ours do we take the engine's locks and write cgroups: a server
    # that cannot listen leaves everything as it found it.
    try:
        await asyncio.get_running_loop().run_in_executor(None, engine.open)
    except BaseException:
        service.metrics.close()
        raise
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set("steve_jobs.v1.JobService", health_pb2.HealthCheckResponse.SERVING)
    if is_development_ca(ca):
        log.warning("running on the bundled DEVELOPMENT certificates: never use them in "
                    "production (see README: Security)")
    log.info("listening on %s (mutual TLS), state in %s, at most %d connections",
             config.listen, engine.config.state_dir, connections)
    if on_started:
        on_started()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def retention():
        while True:
            removed = await loop.run_in_executor(
                None, engine.prune, config.retain_seconds, config.retain_bytes)
            if removed:
                log.info("retention removed %d ended jobs", len(removed))
            await asyncio.sleep(config.prune_every)

    pruner = asyncio.ensure_future(retention())
    await stop.wait()
    pruner.cancel()
    log.info("shutting down: ending streams (grace %gs)", config.shutdown_grace)
    await health.enter_graceful_shutdown()
    service.begin_shutdown()
    await server.stop(config.shutdown_grace)
    service.metrics.close()
    await loop.run_in_executor(None, tracing.shutdown)


###############################################################################
# Client
###############################################################################

class Client:
    """A connection to a steve-jobs server, authenticated as one user. Raises ClientError."""

    def __init__(self, server, certs_dir, user, token=None, origin="--server"):
        self.grpc, self.pb, pb_grpc = import_grpc(aio=False)
        grpc = self.grpc
        self.server, self.certs_dir, self.user = server, certs_dir, user
        self.origin, self._diagnosis = origin, None   # where server came from; what failed
        self._diagnosing = threading.Lock()   # (calls side by side fail together: one tries)
        files = {name: os.path.join(certs_dir, name)
                 for name in ("ca.crt", f"{user}.crt", f"{user}.key", f"{user}.jwt")}
        try:
            ca, cert = (open(files[n], "rb").read() for n in ("ca.crt", f"{user}.crt"))
            key = read_private(files[f"{user}.key"], user)
            if token is None:
                token = read_private(files[f"{user}.jwt"], user).decode(errors="replace").strip()
                if not token:
                    raise ClientError(EXIT_USAGE, f"the token file {files[f'{user}.jwt']} is "
                                                  f"empty (ask the operator for {user}'s token)")
        except FileNotFoundError as e:
            raise ClientError(EXIT_USAGE, f"no {os.path.basename(e.filename)} in {certs_dir} "
                              f"(looked there for {user}'s certificate, key and token: "
                              f"give the folder with --certs, STEVE_JOBS_CERTS or a context "
                              f"(context add), and the user with --user)") from None
        except OSError as e:
            raise ClientError(EXIT_USAGE, f"cannot read {e.filename}: {e.strerror} "
                                          f"(see --certs and --user)") from None
        if len(token) > MAX_TOKEN_BYTES:
            raise ClientError(EXIT_CODES["UNAUTHENTICATED"],
                              f"the token {files[f'{user}.jwt']} is {len(token)} bytes: a "
                              f"server takes at most {human_bytes(MAX_TOKEN_BYTES)}")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert)
        self.channel = grpc.secure_channel(
            server, credentials, options=[("grpc.max_receive_message_length", 8 * MiB),
                                          ("grpc.max_metadata_size", MAX_METADATA_BYTES)])
        self.stub = pb_grpc.JobServiceStub(self.channel)
        # One span for this command's calls; in the caller's trace if it runs in one.
        self.traceparent = new_traceparent(trace_id_of(os.environ.get("TRACEPARENT", "")))
        self.metadata = (("authorization", f"Bearer {token}"),
                         ("traceparent", self.traceparent))

    def call(self, method, request, timeout=30, wait_for_ready=None):
        try:
            return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout,
                                              wait_for_ready=wait_for_ready)
        except self.grpc.RpcError as e:
            raise self.error(e) from None

    def error(self, rpc_error):
        """The ClientError for a failed call, in this connection's terms: a connection
        that failed is tried again by hand (diagnose_connection) to say what really did."""
        e = ClientError.from_rpc(rpc_error, self.server, self.certs_dir, self.user)
        if e.reason == "CONNECTION_FAILED":
            with self._diagnosing:
                if self._diagnosis is None:
                    self._diagnosis = diagnose_connection(self.server, self.certs_dir,
                                                          self.user, self.origin) or ""
            if self._diagnosis:
                e.args = (f"unavailable: {self._diagnosis}",)
        return e

    @staticmethod
    def never_reached(error):
        """Whether a failed call's ClientError says no connection was ever made (grpc
        could not resolve or connect), as opposed to one lost during the call."""
        said = error.grpc_details.lower()
        return error.reason == "CONNECTION_FAILED" and (
            "failed to connect" in said or "errors resolving" in said)

    def nothing_listens(self):
        """Whether, tried by hand now, the server's address refuses connections (a server
        restarting, or none there), as opposed to a wrong address or certificate."""
        self._diagnosis = diagnose_connection(self.server, self.certs_dir, self.user,
                                              self.origin) or ""
        return NOTHING_LISTENS in self._diagnosis

    def output(self, request):
        """An OutputStream of the OutputRequest's chunks, as OutputPieces."""
        call = self.channel.unary_stream(
            "/steve_jobs.v1.JobService/Output",
            request_serializer=self.pb.OutputRequest.SerializeToString,
            response_deserializer=None)   # raw bytes: decode_output_chunk, no copies
        return OutputStream(call(request, metadata=self.metadata), self.pb)

    def input(self, messages):
        """Start an Input call sending the InputMessages messages yields (from grpc's
        thread); returns its future (result: InputSummary; raises grpc.RpcError)."""
        return self.stub.Input.future(iter(messages), metadata=self.metadata)

    def close(self):
        self.channel.close()


def read_private(path, user):
    """The bytes of a private key or token file, refused (as ssh does) when group or
    others may read it: whoever can read it can act as user. Raises ClientError, OSError."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_mode & 0o077:
            raise ClientError(EXIT_USAGE, f"{path} can be read by other users, who could act "
                                          f"as {user} with it: chmod 600 {path}")
        return f.read()


class OutputStream:
    """An Output call's chunks as OutputPieces; cancel() (from another thread) ends it.
    Raises grpc.RpcError while iterating."""

    def __init__(self, call, jobs_pb2):
        self.call, self.pb = call, jobs_pb2

    def __iter__(self):
        for raw in self.call:
            yield from decode_output_pieces(raw, self.pb)

    def cancel(self):
        self.call.cancel()


def decode_output_pieces(raw, jobs_pb2):
    """A serialized OutputChunk as OutputPieces: one (decode_output_chunk), or one a run
    when it holds many (OutputRequest.runs), parsed by protobuf. Raises ValueError for a
    malformed message."""
    piece = decode_output_chunk(raw)
    if piece is not None:
        return (piece,)
    try:
        chunk = jobs_pb2.OutputChunk.FromString(raw)
    except Exception as e:   # (protobuf's DecodeError)
        raise ValueError(f"malformed OutputChunk: {e}") from None
    data, pieces, at = memoryview(chunk.data), [], 0
    if not (len(chunk.run_offsets) == len(chunk.run_sizes) == len(chunk.run_streams)
            and sum(chunk.run_sizes) == len(data)):
        raise ValueError("OutputChunk: its runs do not add up to its data")
    for offset, size, stream, t in itertools.zip_longest(
            chunk.run_offsets, chunk.run_sizes, chunk.run_streams, chunk.run_times[
                :len(chunk.run_sizes)], fillvalue=0.0):
        pieces.append(OutputPiece(offset, data[at:at + size], stream, t))
        at += size
    return pieces


RUN_FIELDS = (5, 6, 7, 8)   # OutputChunk's run_offsets, run_sizes, run_streams, run_times


def decode_output_chunk(raw):
    """A serialized OutputChunk as an OutputPiece whose data is a memoryview of raw; None
    if it holds many runs (decode_output_pieces).

    Why not protobuf: parsing copies the data, and reading the field copies it again; on
    a follower's 1 MiB chunks that was a quarter of the client's CPU, and the client is
    what limits `run -f` of a fast job. Raises ValueError for a malformed message."""
    view, pos, end = memoryview(raw), 0, len(raw)
    offset = stream = 0
    data, when = view[0:0], 0.0
    while pos < end:
        key, pos = _varint(raw, pos)
        field, wire = key >> 3, key & 7
        if field in RUN_FIELDS:
            return None
        if wire == 0:
            value, pos = _varint(raw, pos)
            if field == 2:
                offset = value
            elif field == 3:
                stream = value
        elif wire in (1, 2, 5):
            size, pos = _varint(raw, pos) if wire == 2 else (8 if wire == 1 else 4, pos)
            if pos + size > end:
                raise ValueError("truncated OutputChunk")
            if field == 1:
                data = view[pos:pos + size]
            elif field == 4:
                when = _timestamp_seconds(raw[pos:pos + size])
            pos += size
        else:
            raise ValueError(f"OutputChunk: wire type {wire}")
    return OutputPiece(offset, data, stream, when)


def _varint(raw, pos):
    """(value, position after it) of the protobuf varint at pos. Raises ValueError."""
    value = shift = 0
    while pos < len(raw) and shift < 70:
        byte = raw[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos
    raise ValueError("bad varint")


def _timestamp_seconds(raw):
    """A serialized google.protobuf.Timestamp as seconds since the epoch."""
    seconds = nanos = pos = 0
    while pos < len(raw):
        key, pos = _varint(raw, pos)
        value, pos = _varint(raw, pos)
        if key == 0x08:     # field 1, varint
            seconds = value
        elif key == 0x10:   # field 2, varint
            nanos = value
    return seconds + nanos / 1e9


# CLI exit codes: distinct per kind of failure. `run -f` and `wait` exit with the job's own
# code (128+signal when killed), and 125 for a failure of steve-jobs itself, as docker does.
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_CODES = {"NOT_FOUND": 3, "INVALID_ARGUMENT": 4, "FAILED_PRECONDITION": 5,
              "PERMISSION_DENIED": 6, "UNAUTHENTICATED": 7, "UNAVAILABLE": 8,
              "RESOURCE_EXHAUSTED": 9, "DEADLINE_EXCEEDED": 10, "ALREADY_EXISTS": 11}
EXIT_RUN_FAILED, EXIT_INTERRUPTED = 125, 130

# What grpc says of a failed TLS handshake or connection, in the user's terms: the first
# entry all of whose words (any of each tuple) grpc's message has.
CONNECTION_PROBLEMS = (
    ((("certificate_verify_failed", "certificate verify failed"),),
     "the server's certificate is not signed by {certs}/ca.crt: this is not the server "
     "you trust (or --certs is the wrong folder)"),
    ((("peer name", "hostname", "subject alternative name"),),
     "the server's certificate is not for the name in --server {server}"),
    # The server ends a handshake whose client certificate it refuses by closing.
    ((("failed to connect",), ("socket closed", "alert", "handshake")),
     "the server refused the client certificate {certs}/{user}.crt (not signed by its CA, "
     "expired, or not a client certificate)"),
    ((("socket closed", "connection reset", "broken pipe"),),
     "the connection to the server at {server} was lost (did it stop?)"),
)


NOTHING_LISTENS = "nothing listens there"   # diagnose_connection's word for a refused connect


def diagnose_connection(server, certs_dir, user, origin, timeout=5.0):
    """Why a connection to server (host:port, from origin: a flag, a variable or a
    context) failed, found by doing its steps by hand: resolve, connect, TLS with our
    certificates, HTTP/2. One line, or None if every step works. Never raises."""
    import ssl
    host, port = split_address(server)
    at = f"{server} ({origin})"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return f"cannot reach the server: {host!r} in {origin} does not resolve"
    sock, why = None, ""
    for family, kind, proto, _, where in addresses:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(where)
            break
        except OSError as e:
            sock.close()
            sock = None
            why = (NOTHING_LISTENS if isinstance(e, ConnectionRefusedError) else
                   f"no answer in {timeout:g} s" if isinstance(e, TimeoutError) else
                   e.strerror or str(e))
    if sock is None:
        return (f"cannot reach the server at {at}: {why} (is it running, and is that its "
                f"address?)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_alpn_protocols(["h2"])
    try:
        ctx.load_verify_locations(os.path.join(certs_dir, "ca.crt"))
        ctx.load_cert_chain(os.path.join(certs_dir, f"{user}.crt"),
                            os.path.join(certs_dir, f"{user}.key"))
    except (OSError, ssl.SSLError):
        sock.close()
        return None
    refused = (f"the server at {at} refused the client certificate "
               f"{os.path.join(certs_dir, user + '.crt')} (not signed by its CA, expired, or "
               f"not a client certificate)")
    try:
        with ctx.wrap_socket(sock, server_hostname=host) as tls:
            if tls.selected_alpn_protocol() != "h2":
                return f"{at} speaks TLS but not gRPC (HTTP/2): not a steve-jobs server"
            # TLS 1.3: a refused client certificate is said after the handshake, at the
            # first read; a gRPC server answers the HTTP/2 preface with its SETTINGS.
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            if not tls.recv(9):
                return refused
    except ssl.SSLCertVerificationError as e:
        if e.verify_code in (62, 64):   # X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_
            return (f"the server's certificate at {server} is not for the name {host!r} "
                    f"(in {origin})")
        return (f"the server's certificate is not signed by {certs_dir}/ca.crt: this is not "
                f"the server you trust (or --certs is the wrong folder) [{e.verify_message}]")
    except ssl.SSLError as e:
        if "WRONG_VERSION_NUMBER" in str(e) or "RECORD_LAYER" in str(e) or \
                "PACKET_LENGTH_TOO_LONG" in str(e) or "HTTP_REQUEST" in str(e):
            return f"{at} answered, but is not a TLS server (plain HTTP, or another service?)"
        if "ALERT" in str(e).upper():
            return refused
        return None
    except (ConnectionError, TimeoutError, OSError):
        return refused
    finally:
        sock.close()
    return None


class ClientError(Exception):
    """A failed client operation: one line for the user, and an exit code; for a status
    from the server, its code, reason and field too."""

    def __init__(self, exit_code, message, code="", reason="", field=""):
        super().__init__(message)
        self.exit_code, self.code, self.reason, self.field = exit_code, code, reason, field
        self.grpc_details = ""   # a failed call's own words from grpc

    @classmethod
    def from_rpc(cls, error, server="", certs_dir="", user=""):
        code = error.code().name if hasattr(error, "code") and error.code() else "UNKNOWN"
        details = (error.details() if hasattr(error, "details") else "") or code
        said_by_grpc = details
        trailer = dict(error.trailing_metadata() or ()) if hasattr(
            error, "trailing_metadata") else {}
        reason, field = error_reason(trailer[STATUS_DETAILS_KEY]) if (
            STATUS_DETAILS_KEY in trailer) else ("", "")
        if code == "UNAVAILABLE" and ERROR_ORIGIN_KEY not in trailer:
            # grpc's words, not the server's: say which part of the connection failed.
            said = details.lower()
            why = next((text for words, text in CONNECTION_PROBLEMS
                        if all(any(w in said for w in any_of) for any_of in words)),
                       "cannot reach the server at {server} (is it running, and is that its "
                       "address?)")
            details = why.format(server=server, certs=certs_dir, user=user) + \
                f" [{details.strip()[:200]}]"
            reason = reason or "CONNECTION_FAILED"
        if reason == "TOKEN_EXPIRED":
            details += (f" (the token {os.path.join(certs_dir, user + '.jwt')}: ask the "
                        f"operator for a new one, made with `steve_jobs.py token`)")
        made = cls(EXIT_CODES.get(code, EXIT_ERROR), f"{code.lower()}: {details}", code,
                   reason, field)
        made.grpc_details = said_by_grpc
        return made

    def as_json(self):
        """What --json prints for this error."""
        return {"error": {"code": self.code or "CLIENT", "reason": self.reason or None,
                          "field": self.field or None, "message": str(self),
                          "exit_code": self.exit_code}}


###############################################################################
# CLI
###############################################################################

def exit_without_teardown(code):
    """Flush stdout and stderr, then end the process at once with code.

    Why: interpreter teardown and grpc's C-core shutdown take 20-40 ms, a quarter of a
    `status` round trip, and a finished client command has nothing left to tear down: its
    channel is closed and its only buffered output is flushed here. (The server does not
    use this: its thread pools may still be finishing a call.)
    """
    # What a flush may meet: a reader that went away (`| head`), a closed stream, or (as a
    # signal handler's) a write to the same stream it interrupted (RuntimeError).
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, RuntimeError):
            pass
    os._exit(code)


def parse_since(text, now=None):
    """'10m', '2h', '90s', '1d' ago, or an RFC 3339 time -> seconds since the epoch.
    Raises ValueError."""
    import datetime
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * DURATION_UNITS[
            m.group(2)]
    try:
        t = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"invalid time {quoted(text)}: use e.g. 10m, 2h, 1d (ago) or "
                         f"2026-12-02T10:00:00Z") from None
    if t.tzinfo is None:
        t = t.astimezone()   # a time without a zone is local time
    return t.timestamp()


def parse_signal(text):
    """'KILL', 'SIGKILL', 'kill', '9' -> 9. Raises ValueError."""
    name = text.strip().upper()
    if name.isdigit() and 0 < int(name) < NSIG:
        return int(name)
    try:
        return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
    except KeyError:
        raise ValueError(f"unknown signal {quoted(text)}: use a name (TERM, KILL, HUP, "
                         f"INT, USR1...) or a number") from None


def flag_dest(flag):
    """The argparse destination of --a-flag: a_flag."""
    return flag[2:].replace("-", "_")


# The limits the server has --default-X and --max-X flags for (the IO device is the disk of
# the job's files unless a start names one).
SERVER_LIMITS = [spec for spec in LIMITS if spec.name != "io_device"]


def argument_type(parse):
    """An argparse type from a parser raising ValueError: its message shown as it is (a
    type of Python's own, as argparse says it: "invalid int value: '1.5'")."""
    import argparse
    if parse in (int, float, str):
        return parse

    def convert(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


def env_setting(text):
    """'NAME=VALUE' -> (NAME, VALUE); 'NAME' -> (NAME, its value in our environment), as
    docker's -e. Raises ValueError."""
    if "=" in text:
        return key_value(text)
    if not text or text not in os.environ:
        raise ValueError(f"{quoted(text)} is not set here: use NAME=VALUE, or NAME of a set "
                         f"variable")
    return text, os.environ[text]


def read_env_file(path):
    """An --env-file's settings: NAME=VALUE or NAME lines, blank lines and # comments
    skipped. Raises ClientError naming the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ClientError(EXIT_USAGE, f"--env-file {path}: {getattr(e, 'strerror', None) or e}") \
            from None
    settings = []
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                settings.append(env_setting(line))
            except ValueError as e:
                raise ClientError(EXIT_USAGE, f"--env-file {path}, line {number}: {e}") from None
    return settings


def key_value(text):
    """'NAME=VALUE' -> (NAME, VALUE). Raises ValueError."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"{quoted(text)}: use NAME=VALUE")
    return name, value


def seconds_of(timestamp):
    """A google.protobuf.Timestamp as seconds since the epoch (0.0: unset)."""
    return timestamp.ToNanoseconds() / 1e9


def format_status(st):
    """Readable multi-line status of a JobStatus message."""
    state = PB_TO_STATE.get(st.state, "unknown")
    lines = [f"job      {st.job_id}" + (f"  ({st.name})" if st.name else ""),
             f"owner    {st.owner}",
             f"command  {' '.join(shell_quote(a) for a in st.argv)}",
             f"state    {state}"]
    if st.labels:
        lines.append("labels   " + " ".join(f"{k}={v}" for k, v in sorted(st.labels.items())))
    if st.HasField("exit_code"):
        lines.append(f"exit     {st.exit_code}")
    if st.HasField("signal"):
        lines.append(f"signal   {st.signal} ({signal_name(st.signal)})")
    if st.error:
        lines.append(f"error    {st.error}")
    if st.timeout_seconds:
        lines.append(f"timeout  {st.timeout_seconds:g}s" + (" (reached: it was stopped)"
                                                             if st.timed_out and
                                                             state != CANCELLED else ""))
    lines += queue_lines(st, state)
    if st.network and st.network != "none":
        said = [st.network_state] if st.network_state else []
        if st.network == "egress":
            said.append(f"{st.egress_denied} packet{'s' * (st.egress_denied != 1)} refused")
        lines.append(f"network  {st.network}" + (f" ({'; '.join(said)})" if said else ""))
    lines.append("limits   " + " ".join(
        f"{spec.flag[2:]}={spec.show(getattr(st.limits, spec.proto))}" for spec in LIMITS
        if getattr(st.limits, spec.proto)))
    started, ended = seconds_of(st.start_time), seconds_of(st.end_time)
    lines.append(f"started  {format_time(started)}")
    if ended:
        lines.append(f"ended    {format_time(ended)} " + (
            f"(ran {ended - started:.3f}s)" if started else "(it never ran)"))
    running = PB_TO_STATE.get(st.state) in (RUNNING, PAUSED)
    lines.append(f"usage    cpu={st.cpu_seconds:.3f}s " + (
        f"memory={human_bytes(st.memory_bytes)} pids={st.pids} " if running else "") +
        f"peak-memory={human_bytes(st.peak_memory_bytes)} oom-kills={st.oom_kills} "
        f"io-read={human_bytes(st.io_read_bytes)} io-write={human_bytes(st.io_write_bytes)}")
    lines.append(f"output   {human_bytes(st.output_bytes)}"
                 + (" (truncated at the server's output cap)" if st.output_truncated else ""))
    if st.HasField("terminal"):
        lines.append(f"terminal {st.terminal.rows}x{st.terminal.columns}")
    elif st.stdin:
        lines.append("stdin    from Input (run -i, attach -i)")
    for e in st.sessions:
        lines.append(f"session  {format_time(e.time.ToNanoseconds() / 1e9)} {e.user} {e.event}"
                     + (f" {human_bytes(e.bytes)}" if e.event == "input-end" else ""))
    if st.sessions_dropped:
        lines.append(f"session  {st.sessions_dropped} more not kept (the record is full; the "
                     f"server's log has them)")
    if st.trace_id:
        lines.append(f"trace    {st.trace_id}")
    return "\n".join(for_terminal(line) for line in lines)


def queue_lines(st, state):
    """format_status's lines of a job that was queued: where it stands, what it waits for."""
    lines = []
    if state == QUEUED:
        lines.append(f"queue    {queue_note(st)}")
    if st.after:
        lines.append("after    " + " ".join(f"{d.job_id}:{d.kind or 'ok'}" for d in st.after))
    if st.priority:
        lines.append(f"priority {st.priority}")
    if st.queue_timeout_seconds:
        lines.append(f"queue-timeout {st.queue_timeout_seconds:g}s")
    return lines


def queue_note(st):
    """Where a queued job stands, in a few words."""
    if st.waiting_for:
        return (f"waits for job{'s' * (len(st.waiting_for) > 1)} "
                f"{', '.join(st.waiting_for)} to end")
    ahead = max(0, st.queue_position - 1)
    return f"waits for a slot: {ahead} job{'s' * (ahead != 1)} ahead of it"


def status_dict(st):
    """A JobStatus message as plain JSON types (README: JSON output): numbers stay
    numbers, unset codes are null, times RFC 3339, what is not known yet absent."""
    d = {f.name: getattr(st, f.name) for f in st.DESCRIPTOR.fields
         if f.message_type is None}
    d["argv"] = list(st.argv)
    d["labels"] = dict(st.labels)
    d["waiting_for"] = list(st.waiting_for)
    d["after"] = [{"job_id": a.job_id, "kind": a.kind or "ok"} for a in st.after]
    d["state"] = PB_TO_STATE.get(st.state, "unknown")
    d["view"] = "summary" if st.view == VIEW_SUMMARY else "full"
    if st.view == VIEW_SUMMARY:
        d.pop("workdir", None)
    else:
        d["limits"] = {f.name: getattr(st.limits, f.name)
                       for f in st.limits.DESCRIPTOR.fields}
    for field in ("exit_code", "signal"):
        d[field] = getattr(st, field) if st.HasField(field) else None
    for field in ("create_time", "start_time", "end_time"):
        if st.HasField(field):
            d[field] = rfc3339(getattr(st, field).ToNanoseconds() / 1e9)
    for field in ("started_at", "ended_at"):
        if not d[field]:
            del d[field]
    if st.HasField("terminal"):
        d["terminal"] = {"rows": st.terminal.rows, "columns": st.terminal.columns}
    if st.sessions:
        d["sessions"] = [{"time": rfc3339(e.time.ToNanoseconds() / 1e9), "user": e.user,
                          "event": e.event, "bytes": e.bytes} for e in st.sessions]
    return d


def shell_quote(arg):
    import shlex
    return shlex.quote(arg)


def signal_name(num):
    try:
        return signal.Signals(num).name
    except ValueError:
        return "?"


def format_time(t):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def exit_code_of(st):
    """A shell's exit code for an ended job: its own, 128+signal, or 125 (no code)."""
    if st.HasField("signal"):
        return 128 + st.signal
    return st.exit_code if st.HasField("exit_code") else EXIT_RUN_FAILED


# -- configuration: flags, then STEVE_JOBS_* variables, then the context, then defaults ---

class BadValue(typing.NamedTuple):
    """An argument default from an environment variable that does not parse: reported
    (ClientError) only if the command that reads it runs."""
    variable: str
    problem: str


def env_flag_default(variable, kind, default):
    """The value of $variable parsed by kind, default if unset, or a BadValue."""
    raw = os.environ.get(variable)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError as e:
        return BadValue(variable, str(e) if str(e).startswith("invalid") else
                        f"invalid value {quoted(raw)}")


def add_env_flag(parser, flag, kind, default, help_text):
    """Add --flag, parsed by kind, whose default comes from STEVE_JOBS_<FLAG> if set."""
    env = "STEVE_JOBS_" + flag.lstrip("-").upper().replace("-", "_")
    parser.add_argument(flag, type=argument_type(kind), default=env_flag_default(
        env, kind, default), help=f"{help_text} (env {env})")


def check_env_values(args):
    """Raises ClientError naming the first STEVE_JOBS_* variable args took that is bad,
    or the first argument that is not valid UTF-8 (the API carries text)."""
    for dest, value in vars(args).items():
        if isinstance(value, BadValue):
            raise ClientError(EXIT_USAGE, f"{value.variable}: {value.problem}")
        for item in value if isinstance(value, (list, tuple)) else (value,):
            for text in item if isinstance(item, tuple) else (item,):
                if isinstance(text, str) and not is_utf8(text):
                    name = "--" + dest.replace("_", "-") if dest not in POSITIONAL_NAMES \
                        else POSITIONAL_NAMES[dest]
                    raise ClientError(EXIT_USAGE, f"{name} {quoted(text)} is not valid UTF-8 "
                                                  f"(the API carries text)")


POSITIONAL_NAMES = {"job_id": "the job", "job_ids": "a job", "cmd": "the command's word"}


def is_utf8(text):
    """Whether a str from argv or the environment came from valid UTF-8 (no surrogates)."""
    try:
        text.encode()
        return True
    except UnicodeEncodeError:
        return False


def config_path():
    """The client's configuration file (named contexts): $STEVE_JOBS_CONFIG, else
    $XDG_CONFIG_HOME/steve-jobs/config.toml (~/.config by default)."""
    if os.environ.get("STEVE_JOBS_CONFIG"):
        return os.environ["STEVE_JOBS_CONFIG"]
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return os.path.join(base, "steve-jobs", "config.toml")


def load_config(path):
    """The configuration file as a dict ({} if there is none). Raises ClientError."""
    import tomllib
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ClientError(EXIT_USAGE, f"cannot read {path}: {e}") from None
    contexts = config.get("contexts", {})
    if not isinstance(contexts, dict) or not all(isinstance(c, dict)
                                                 for c in contexts.values()):
        raise ClientError(EXIT_USAGE, f"{path}: [contexts.NAME] tables expected")
    return config


def connection_settings(args):
    """(server, certs folder, user) for a client command: each from its flag, else its
    STEVE_JOBS_* variable, else the context (--context, $STEVE_JOBS_CONTEXT or the
    file's current-context), else the default. Raises ClientError."""
    path = config_path()
    given = lambda key: getattr(args, key) or os.environ.get(f"STEVE_JOBS_{key.upper()}")
    name = given("context")
    # The file is read only when it can matter: a broken one breaks no command that
    # names everything itself.
    config = load_config(path) if name or not all(map(given, ("server", "certs", "user"))) \
        else {}
    name = name or config.get("current-context", "")
    context = {}
    if name:
        context = config.get("contexts", {}).get(name)
        if context is None:
            raise ClientError(EXIT_USAGE, f"no context {quoted(name)} in {path} "
                                          f"(`context list` shows them)")
    def setting(key, default):
        value = str(getattr(args, key) or os.environ.get(f"STEVE_JOBS_{key.upper()}") or
                    context.get(key) or default)
        if not is_utf8(value):
            raise ClientError(EXIT_USAGE, f"the {key} {quoted(value)} is not valid UTF-8")
        return value
    certs = setting("certs", default_certs_dir(os.path.join(os.path.dirname(path), "certs")))
    if not getattr(args, "certs") and not os.environ.get("STEVE_JOBS_CERTS") and \
            context.get("certs"):   # a context's relative folder is relative to its file
        certs = os.path.join(os.path.dirname(path), os.path.expanduser(certs))
    origin = ("--server" if args.server else "STEVE_JOBS_SERVER" if os.environ.get(
        "STEVE_JOBS_SERVER") else f"context {name}'s server" if context.get("server")
        else "the default server")
    try:
        server = join_address(*split_address(setting("server", DEFAULT_SERVER), origin))
    except ValueError as e:
        raise ClientError(EXIT_USAGE, str(e)) from None
    return server, certs, setting("user", DEFAULT_USER), origin


DEFAULT_SERVER, DEFAULT_USER = "127.0.0.1:50051", "mrarsenal"


def default_certs_dir(installed):
    """certs/ beside this script when it runs from a clone (the bundled set), else
    installed: where an installed command looks (site-packages holds no certificates)."""
    beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), "certs")
    return beside if os.path.isdir(beside) else installed


def cmd_context(args):
    """`context list` and `context use NAME`: the contexts of the configuration file."""
    path = config_path()
    config = load_config(path)
    contexts = config.get("contexts", {})
    current = config.get("current-context", "")
    if args.action == "add":
        return add_context(path, config, args)
    if args.action == "use":
        if args.name not in contexts:
            raise ClientError(EXIT_USAGE, f"no context {quoted(args.name)} in {path}")
        set_current_context(path, args.name)
        print(f"using context {args.name} ({contexts[args.name].get('server', DEFAULT_SERVER)})")
        return EXIT_OK
    if not contexts and not args.json:
        print(f"steve-jobs: no contexts in {path} (context add NAME --server HOST:PORT "
              f"--certs DIR --user USER makes one)", file=sys.stderr)
        return EXIT_OK
    if args.quiet:
        print("\n".join(contexts))
    elif args.json:
        print_json({"current": current or None, "contexts": contexts})
    else:
        for name, c in contexts.items():
            print(f"{'*' if name == current else ' '} {name:16} {c.get('server', '-'):28} "
                  f"{c.get('user', '-')}")
    return EXIT_OK


CONTEXT_NAME_FORMAT = re.compile(r"[A-Za-z0-9_-]{1,64}")   # a bare TOML key


def add_context(path, config, args):
    """`context add NAME --server --certs --user`: a new [contexts.NAME] table at the end of
    the file (made if missing, and then the current context). Raises ClientError."""
    name = args.name
    if not CONTEXT_NAME_FORMAT.fullmatch(name):
        raise ClientError(EXIT_USAGE, f"a context's name is letters, digits, - and _: "
                                      f"{quoted(name)}")
    if name in config.get("contexts", {}):
        raise ClientError(EXIT_CODES["ALREADY_EXISTS"], f"context {name} exists in {path}")
    settings = {"server": getattr(args, "server", ""), "user": getattr(args, "user", ""),
                "certs": os.path.abspath(args.certs) if getattr(args, "certs", "") else ""}
    if not settings["server"]:
        raise ClientError(EXIT_USAGE, "context add NAME needs --server HOST:PORT")
    try:
        split_address(settings["server"])
    except ValueError as e:
        raise ClientError(EXIT_USAGE, str(e)) from None
    table = f"\n[contexts.{name}]\n" + "".join(
        f"{key} = {json.dumps(value)}\n" for key, value in settings.items() if value)
    text = read_file(path, "")
    first = not config.get("contexts")
    if first and "current-context" not in config:
        text = f"current-context = {json.dumps(name)}\n" + text
    write_config(path, text.rstrip("\n") + "\n" + table if text.strip() else
                 text + table.lstrip("\n"))
    print(f"added context {name} ({settings['server']})" +
          (" and made it current" if first else f"; context use {name} makes it current"))
    return EXIT_OK


def set_current_context(path, name):
    """Make name the file's current-context, keeping the rest of the file as it is."""
    with open(path) as f:
        text = f.read()
    line = f"current-context = {json.dumps(name)}"
    text, n = re.subn(r"(?m)^current-context\s*=.*$", line, text)
    if not n:
        text = f"{line}\n{text}"
    write_config(path, text)


def write_config(path, text):
    """Replace the configuration file's text at once: a temporary file beside it (beside
    the link's target, if it is a link) with its mode (0600 for a new one), renamed over
    it. Raises ClientError."""
    import tempfile
    target = os.path.realpath(path)
    try:
        mode = os.stat(target).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    try:
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".config-")
        try:
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), mode)
                f.write(text)
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError as e:
        raise ClientError(EXIT_USAGE, f"cannot write {path}: {e.strerror}") from None


# -- the parser -------------------------------------------------------------------

JOB_COMMANDS = ("status", "output", "stream", "logs", "wait", "kill", "stop", "pause", "resume",
                "rm", "attach")
EXIT_CODE_HELP = """exit codes:
  0 ok; 1 error; 2 usage; 3 not found; 4 invalid argument; 5 failed precondition
  (e.g. the job has ended); 6 permission denied; 7 unauthenticated; 8 unavailable (the
  server cannot be reached, or says so); 9 resource exhausted; 10 deadline exceeded;
  11 already exists (a name); 130 interrupted (Ctrl-C).
  run -f and wait: the job's own exit code (128+N when killed by signal N), 125 when
  steve-jobs itself failed."""


CONNECTION_FLAGS = ("--context", "--server", "--user", "--certs")


def build_parser():
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):   # one line, not the usage block ("steve-jobs: " is added)
            name = self.prog.split()[-1]
            raise ClientError(EXIT_USAGE, ("" if name == "steve-jobs" else f"{name}: ") +
                              f"{message} (see --help)")

    class Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        def _get_help_string(self, action):   # no "(default: )" where there is none
            if action.default in (None, "", False, [], 0, 0.0):
                return action.help
            return super()._get_help_string(action)
    # --json is accepted before or after the subcommand; SUPPRESS keeps a subcommand's
    # default from overwriting a --json given before it.
    common = Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output (README: JSON output)")
    connection = Parser(add_help=False)   # as after the command too: `list --user alice`
    for flag in CONNECTION_FLAGS:
        connection.add_argument(flag, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p = Parser(prog="steve-jobs", formatter_class=Help, epilog=EXIT_CODE_HELP,
               description="Run commands on a remote Linux host as isolated, "
                           "resource-limited jobs.")
    p.add_argument("--version", action="version", version=f"steve-jobs {__version__}")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--context", default="",
                   help="a context of the configuration file (env STEVE_JOBS_CONTEXT; "
                        "see `context list`)")
    p.add_argument("--server", default="", help=f"HOST:PORT of the server (env "
                   f"STEVE_JOBS_SERVER; else the context's; else {DEFAULT_SERVER})")
    p.add_argument("--user", default="", help=f"identity to use: USER.crt, USER.key and "
                   f"USER.jwt in --certs (env STEVE_JOBS_USER; else the context's; else "
                   f"{DEFAULT_USER})")
    p.add_argument("--certs", default="", help="certificate folder (env STEVE_JOBS_CERTS; "
                   "else the context's; else certs/ beside this script, if there, else "
                   "~/.config/steve-jobs/certs)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=Parser)

    def command(name, help_text, client=True, **kw):
        """A subcommand's parser (client: it takes the connection flags); it runs
        CLIENT_COMMANDS[name] with a Client, or LOCAL_COMMANDS[name]."""
        c = sub.add_parser(name, parents=[common, connection] if client else [common],
                           help=help_text, description=help_text, formatter_class=Help, **kw)
        c.set_defaults(run=CLIENT_COMMANDS.get(name) or LOCAL_COMMANDS[name],
                       talks_to_server=name in CLIENT_COMMANDS)
        return c
    add_server_parser(command("server", "run the job server (as root)", client=False))
    add_run_parser(command("run", "start a job", epilog=EXIT_CODE_HELP))
    add_job_parsers(command)
    add_exec_parser(command("exec", "run a command inside a running job (its namespaces, "
                                    "uid, folder), as docker exec; -it: a shell"))
    add_cp_parser(command("cp", "copy files into or out of a job's working folder, as docker "
                                "cp: cp LOCAL ID:PATH, cp ID:PATH LOCAL ('-': a tar stream)"))
    stats = command("stats", "running jobs' CPU, memory, pids and IO, refreshed every second, "
                             "as docker stats (^C ends it)")
    stats.add_argument("job_id", nargs="*", metavar="ID",
                       help="these jobs (default: your running ones)")
    stats.add_argument("--all", action="store_true",
                       help="every user's running jobs (admins and readers)")
    stats.add_argument("--no-stream", action="store_true",
                       help="print once (CPU %% over a short sample) and exit")
    events = command("events", "jobs' lives as they happen: queued, started, paused, resumed, "
                               "timed-out, ended, removed (as docker events; ^C ends it)")
    events.add_argument("job_id", nargs="?", default="", metavar="ID",
                        help="only this job's events")
    events.add_argument("--all", action="store_true",
                        help="every user's jobs (admins and readers)")
    events.add_argument("--owner", default="", help="only this user's jobs (admins, readers)")
    events.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                        type=argument_type(key_value), help="only jobs with this label")
    add_list_parser(command("list", "list jobs"))
    add_list_parser(command("ps", "list running (and paused) jobs, as docker ps; -a: all"),
                    ps=True)
    ctx = command("context", "show or choose a context of the configuration file "
                             f"({config_path()})")
    ctx.add_argument("action", choices=("list", "use", "add"))
    ctx.add_argument("name", nargs="?", default="")
    ctx.add_argument("-q", "--quiet", action="store_true", help="names only")
    comp = command("completion", "print a shell completion script: "
                                 'eval "$(steve-jobs completion bash)"')
    comp.add_argument("shell", choices=("bash", "zsh"))
    t = command("token", "issue a JWT for a user (operator command: needs the signing key)",
                client=False)
    t.add_argument("--for-user", required=True, dest="token_user")
    t.add_argument("--role", required=True, choices=sorted(ROLES))
    t.add_argument("--cert", required=True, help="the user's client certificate (PEM)")
    t.add_argument("--signing-key", required=True, help="the ES256 private key (PEM)")
    t.add_argument("--days", type=float, default=30.0, help="lifetime in days")
    return p


MANY_JOBS_COMMANDS = ("wait", "stop", "rm", "pause", "resume", "kill")   # ID...


def add_job_parsers(command):
    """The commands about jobs by ID (JOB_COMMANDS); command(name, help) makes a parser."""
    for name, help_text in (("status", "show a job"),
                            ("output", "print a job's output so far"),
                            ("stream", "print a job's output from the start, following it"),
                            ("wait", "wait until jobs have ended; exit with the first one's "
                                     "exit code (128+N if killed by signal N), or the "
                                     "first failure's"),
                            ("kill", "send a signal to a job's command"),
                            ("pause", "freeze a job"), ("resume", "thaw a paused job"),
                            ("rm", "delete an ended job and its output"),
                            ("stop", "stop a job: SIGTERM, then SIGKILL after a grace period")):
        c = command(name, help_text)
        c.add_argument("job_id", metavar="ID", nargs="+" if name in MANY_JOBS_COMMANDS
                       else None, help="a job id, a unique start of one, or a name")
        if name == "rm":
            c.add_argument("-f", "--force", action="store_true",
                           help="a running job too: stop it (SIGKILL), then remove it")
        if name == "stop":
            c.add_argument("--grace", type=float, default=None,
                           help="seconds between SIGTERM and SIGKILL (default: the server's)")
        if name == "wait":
            c.add_argument("--timeout", type=float, default=None,
                           help="give up after this many seconds (exit 10); default: never")
        if name == "kill":
            c.add_argument("-s", "--signal", type=argument_type(parse_signal),
                           default="KILL", help="a name or number")   # (typed: 9)
            c.add_argument("--all", action="store_true",
                           help="every process of the job, not only its command")
        if name in ("output", "stream"):
            add_output_flags(c)
        if name == "output":
            c.add_argument("--asciicast", action="store_true",
                           help="a terminal job's session in asciinema's asciicast v2 format")
    logs = command("logs", "print a job's output (as docker logs); -f follows it")
    logs.add_argument("job_id", metavar="ID", help="a job id, a unique start of one, or a name")
    logs.add_argument("-f", "--follow", action="store_true", help="follow until it ends")
    add_output_flags(logs)
    a = command("attach", "rejoin a job: watch its terminal (or output) and type into it; "
                          "~. detaches")
    a.add_argument("job_id", metavar="ID", help="a job id, a unique start of one, or a name")
    a.add_argument("-i", "--interactive", action="store_true",
                   help="a job without a terminal: send our stdin to it")
    a.add_argument("--tail", type=int, default=-1, metavar="N",
                   help="start N lines before the end (default: a screenful)")
    a.add_argument("--read-only", action="store_true", help="watch, do not type")
    a.add_argument("--take-over", action="store_true",
                   help="replace whoever is writing to the job (its owner, or an admin)")


def add_exec_parser(e):
    import argparse
    e.add_argument("-i", "--interactive", action="store_true", help="send our stdin to it")
    e.add_argument("-t", "--tty", action="store_true", help="give it a terminal of the job's")
    e.add_argument("job_id", metavar="ID", help="a job id, a unique start of one, or a name")
    e.add_argument("cmd", nargs=argparse.REMAINDER, help="CMD ARG... or -- PROG ARG...")


def add_cp_parser(c):
    c.add_argument("source", metavar="SRC", help="LOCAL, ID:PATH, or - (a tar stream on stdin)")
    c.add_argument("destination", metavar="DST",
                   help="ID:PATH, LOCAL, or - (a tar stream on stdout)")


def add_run_parser(r):
    import argparse
    r.description = ('run CMD ARG... runs the words joined by spaces with /bin/sh -c, as ssh '
                     'does; run -- PROG ARG... runs that argv without a shell.')
    r.add_argument("-f", "--follow", action="store_true",
                   help="stream the output and exit with the job's exit code")
    r.add_argument("-i", "--interactive", action="store_true",
                   help="send our stdin to the job's (implies -f)")
    r.add_argument("-t", "--tty", action="store_true",
                   help="give the job a terminal (implies -f; -it: an interactive shell, "
                        "~. detaches)")
    r.add_argument("--name", default="", help="a name for the job, usable as its id")
    r.add_argument("--label", action="append", default=[], type=argument_type(key_value),
                   metavar="KEY=VALUE", help="may be repeated")
    for spec in LIMITS:
        r.add_argument(spec.flag, type=argument_type(spec.parse), default=type(spec.least)(),
                       dest=flag_dest(spec.flag), help=spec.help)
    r.add_argument("--network", nargs="?", const="host", default="", metavar="MODE",
                   help="egress: outbound TCP, UDP and DNS, never to the host itself; host "
                        "(or --network alone): the host's network (admins); none (default): "
                        "loopback only")
    r.add_argument("--timeout", type=argument_type(parse_duration), default=0.0,
                   metavar="DURATION", help="stop the job (as stop does) this long after its "
                                            "start: 90s, 10m, 1h30m")
    r.add_argument("--rm", action="store_true",
                   help="remove the job and its files once it has ended (with -f: once its "
                        "output has all come; else some seconds after its end)")
    r.add_argument("--queue", action=argparse.BooleanOptionalAction, default=None,
                   help="when the server is full, wait in its queue (state queued) instead "
                        "of failing; --no-queue: fail (default: the server's)")
    r.add_argument("--after", action="append", default=[], metavar="ID[:ok|:any]",
                   type=argument_type(dependency_setting),
                   help="queued until job ID has ended: :ok (the default) cancels this job "
                        "unless ID exits 0; may be repeated")
    r.add_argument("--priority", type=int, default=0, metavar="N",
                   help="queued jobs of higher priority start first (-1000..1000; admins)")
    r.add_argument("--queue-timeout", type=argument_type(parse_duration), default=0.0,
                   metavar="DURATION", help="cancel the job if it is still queued this long "
                                            "after: 90s, 10m, 1h30m")
    r.add_argument("--root", action="store_true", help="run as root (admins only)")
    r.add_argument("--rw-host", action="store_true",
                   help="see the host's filesystem writable, not read-only (admins only)")
    r.add_argument("-e", "--env", action="append", default=[], metavar="NAME[=VALUE]",
                   type=argument_type(env_setting),
                   help="an environment variable; NAME alone: its value here; may be repeated")
    r.add_argument("--env-file", action="append", default=[], metavar="FILE",
                   help="NAME=VALUE (or NAME) lines; # comments; may be repeated")
    r.add_argument("-w", "--workdir", default="", help="absolute path on the server")
    r.add_argument("--copy", action="append", default=[], metavar="LOCAL[:PATH]",
                   type=argument_type(copy_setting),
                   help="put LOCAL (a file or folder) in the job's folder as PATH (default: "
                        "its name) before the command starts; may be repeated")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="CMD ARG... or -- PROG ARG...")


def dependency_setting(text):
    """(ref, kind) of run's --after ID[:ok|:any]. Raises ValueError."""
    ref, sep, kind = text.rpartition(":")
    if not sep:
        ref, kind = text, "ok"
    if kind not in DEPENDENCY_KINDS or not ref:
        raise ValueError(f"{quoted(text)}: use ID, ID:ok or ID:any")
    return ref, kind


def copy_setting(text):
    """(local, path) of run's --copy LOCAL[:PATH]. Raises ValueError."""
    local, _, path = text.partition(":")
    path = path or os.path.basename(os.path.abspath(local))
    if not os.path.lexists(local):
        raise ValueError(f"{local}: no such file or folder")
    if path.startswith("/") or ".." in path.split("/"):
        raise ValueError(f"{path}: PATH is a relative path in the job's folder, without ..")
    return local, path


def add_output_flags(c):
    c.add_argument("-n", "--tail", type=int, default=0, metavar="N",
                   help="start N lines before the end")
    c.add_argument("--since", type=argument_type(parse_since), default=0.0,
                   metavar="WHEN", help="what was written since 10m, 2h, 1d... ago or an "
                                        "RFC 3339 time")
    c.add_argument("-t", "--timestamps", action="store_true",
                   help="start each line with the time it was written")
    which = c.add_mutually_exclusive_group()
    which.add_argument("--stdout", dest="stream", action="store_const", const=STDOUT,
                       default=0, help="the job's stdout only")
    which.add_argument("--stderr", dest="stream", action="store_const", const=STDERR,
                       help="the job's stderr only")


def add_list_parser(ls, ps=False):
    """list's flags; ps's are the same, but -a/--all means jobs in every state (as docker's)
    and --all-users every user's."""
    import argparse
    if ps:
        ls.add_argument("-a", "--all", dest="every_state", action="store_true",
                        help="jobs in every state, not only running and paused ones")
    ls.add_argument("--all-users" if ps else "--all", dest="all", action="store_true",
                    help="every user's jobs (admins, readers)")
    ls.add_argument("--owner", default="", help="that user's jobs (admins, readers)")
    ls.add_argument("--state", action="append", default=[], choices=list(STATE_TO_PB),
                    help="only jobs in this state; may be repeated")
    ls.add_argument("--label", action="append", default=[], type=argument_type(key_value),
                    metavar="KEY=VALUE", help="only jobs with this label; may be repeated")
    ls.add_argument("--name", default="", help="only the job of this name")
    ls.add_argument("--full", action="store_true",
                    help="with --json: every field (as status), not the summary")
    ls.add_argument("-q", "--quiet", action="store_true", help="job ids only, one a line")
    ls.add_argument("--with-names", action="store_true", help=argparse.SUPPRESS)   # completion


def add_server_parser(s):
    import argparse
    s.add_argument("--listen", default=env_default("STEVE_JOBS_LISTEN", "127.0.0.1:50051"),
                   help="address to listen on (env STEVE_JOBS_LISTEN)")
    s.add_argument("--log-format", choices=("text", "json"),
                   default=env_default("STEVE_JOBS_LOG_FORMAT", "text"),
                   help="text (with <N> priorities under journald) or json: one object per "
                        "line (env STEVE_JOBS_LOG_FORMAT)")
    s.add_argument("--certs", default=argparse.SUPPRESS,
                   help="certificate folder: ca.crt, server.crt, server.key, jwt-signing.pub "
                        "(env STEVE_JOBS_CERTS; default: certs/ beside this script, if there, "
                        "else /etc/steve-jobs/certs)")
    s.add_argument("--state-dir", default=env_default("STEVE_JOBS_STATE_DIR", DEFAULT_STATE_DIR),
                   help="job records and output (env STEVE_JOBS_STATE_DIR)")
    s.add_argument("--cgroup-root", default=env_default("STEVE_JOBS_CGROUP_ROOT", ""),
                   help="cgroup folder for jobs: a name, under the server's delegated cgroup "
                        "(systemd Delegate=yes, a container) or else under the root "
                        "(default: 'jobs' or 'steve-jobs'); or /a/path, exactly there in "
                        "every hierarchy (env STEVE_JOBS_CGROUP_ROOT)")
    for spec in SERVER_LIMITS:
        name, kind = spec.flag[2:], spec.parse
        env = "STEVE_JOBS_" + flag_dest(spec.flag).upper()
        s.add_argument(f"--default-{name}", type=argument_type(kind),
                       default=env_flag_default(f"{env}_DEFAULT", kind, spec.default),
                       help=f"per-job default (env {env}_DEFAULT; io 0: unlimited)")
        s.add_argument(f"--max-{name}", type=argument_type(kind),
                       default=env_flag_default(f"{env}_MAX", kind, spec.most),
                       help=f"per-job maximum (env {env}_MAX; io 0: none)")
    for flag, kind, default, help_text in (
            ("--output-cap", parse_size, 1 * GiB,
             "output kept per job; the rest is discarded"),
            ("--max-jobs", int, EngineConfig().max_running_jobs,
             "running jobs at most; more starts are RESOURCE_EXHAUSTED"),
            ("--max-queued-per-user", int, EngineConfig().max_queued_per_user,
             "jobs of one user waiting in the queue (run --queue) at most; more are "
             "RESOURCE_EXHAUSTED"),
            ("--max-jobs-per-user", int, 0,
             "running jobs of one user at most; 0: a quarter of --max-jobs"),
            ("--max-streams-per-user", int, ServerConfig().max_streams_per_user,
             "output streams one user may have open at once"),
            ("--min-free", parse_size, -1, "free space the state filesystem keeps; starts "
             "below it are refused (-1: 1%% of it, at most 256M)"),
            ("--workdir-size", parse_size, EngineConfig().workdir_size, "a job's own working "
             "folder is a tmpfs this big, charged to its memory and kept after its end until "
             "rm; 0: on the state disk (its /tmp and the like share a tmpfs this big, 1G "
             "if 0)"),
            ("--files-quota", parse_size, EngineConfig().files_quota, "a user's jobs' kept "
             "working folders: starts beyond it are refused until rm; 0: no quota"),
            ("--handshake-timeout", float, ServerConfig().handshake_timeout,
             "seconds a connection has to finish its TLS handshake"),
            ("--retain-days", float, 7.0, "remove ended jobs after this many days"),
            ("--retain-size", parse_size, 10 * GiB,
             "then remove the oldest ended jobs until their output and files fit")):
        add_env_flag(s, flag, kind, default, help_text)
    s.add_argument("--allow-host-network-role", action="append", default=[],
                   choices=sorted(ROLES), metavar="ROLE",
                   help="let this role (besides admin) run jobs in the host's network "
                        "namespace (--network); may be repeated")
    s.add_argument("--egress-role", action="append", default=[], metavar="ROLE",
                   choices=sorted(ROLES) + ["none"],
                   help="a role that may run jobs with an egress network (run --network "
                        "egress); may be repeated; default: user and admin; none: nobody")
    s.add_argument("--egress-deny", action="extend", nargs="+", default=[], metavar="CIDR",
                   help="networks egress jobs cannot reach, besides this host's own "
                        "addresses and the clouds' metadata ones (169.254.0.0/16...): "
                        "add your private networks")
    s.add_argument("--egress-dns", action="extend", nargs="+", default=[], metavar="ADDR",
                   help="the resolvers egress jobs' DNS goes to (default: the host's)")
    s.add_argument("--insecure-dev-certs", action="store_true",
                   help="start even though --certs holds the CA's or token signer's private "
                        "key, or keys readable by others (the bundled development set)")
    s.add_argument("--metrics-listen", default=env_default("STEVE_JOBS_METRICS_LISTEN", ""),
                   metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (loopback "
                        "only without --metrics-cert and --metrics-key; needs "
                        "prometheus_client; env STEVE_JOBS_METRICS_LISTEN; default: none)")
    s.add_argument("--metrics-cert", default="", metavar="FILE",
                   help="with --metrics-key: serve metrics over HTTPS with this certificate")
    s.add_argument("--metrics-key", default="", metavar="FILE",
                   help="the private key of --metrics-cert")
    s.add_argument("--queue-by-default", action="store_true",
                   help="a start that finds the server full waits in the queue unless it "
                        "says --no-queue (default: only with run --queue)")
    s.add_argument("--no-root-jobs", action="store_true",
                   help="refuse root jobs even for admins")
    s.add_argument("--stop-jobs-on-exit", action="store_true",
                   help="stop every running job when the server shuts down "
                        "(default: jobs keep running and are re-adopted at the next start)")


def env_default(name, fallback):
    return os.environ.get(name, fallback)


# -- server and token commands -----------------------------------------------------

def cmd_server(args):
    """Run the server. Returns an exit code."""
    import asyncio
    setup_logging(args.log_format)
    args.certs = args.certs or os.environ.get("STEVE_JOBS_CERTS") or default_certs_dir(
        "/etc/steve-jobs/certs")
    if os.geteuid() != 0:
        raise ClientError(EXIT_ERROR, "the server must run as root (it makes cgroups and "
                                      "namespaces)")
    try:
        with open(os.path.join(args.certs, "jwt-signing.pub"), "rb") as f:
            verifier = TokenVerifier(f.read(), client_ca_path=os.path.join(args.certs, "ca.crt"))
    except OSError as e:
        raise ClientError(EXIT_ERROR, f"cannot read the token key {e.filename}: {e.strerror} "
                                      f"(make certificates with gen_certs.sh)") from None
    except ValueError as e:
        raise ClientError(EXIT_ERROR, f"bad token key in {args.certs}: {e}") from None
    limits = {which: Limits(**{spec.name: getattr(args, f"{which}_{flag_dest(spec.flag)}")
                               for spec in SERVER_LIMITS})
              for which in ("default", "max")}
    engine = Engine(EngineConfig(
        state_dir=args.state_dir, cgroup_root=args.cgroup_root, default_limits=limits["default"],
        max_limits=limits["max"], output_cap=args.output_cap, allow_root=not args.no_root_jobs,
        max_running_jobs=args.max_jobs, max_jobs_per_user=args.max_jobs_per_user,
        max_queued_per_user=args.max_queued_per_user, queue_by_default=args.queue_by_default,
        min_free=args.min_free, workdir_size=args.workdir_size, files_quota=args.files_quota,
        hidden_paths=(args.certs,), egress_deny=tuple(args.egress_deny),
        egress_dns=tuple(args.egress_dns)))
    try:
        CertificateStore(args.certs).read()
        if args.insecure_dev_certs:
            make_keys_private(args.certs)
        problems = certificate_folder_problems(args.certs)
        if problems and not args.insecure_dev_certs:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UnavailableError(f"{problems[0]}{more}; --insecure-dev-certs starts anyway")
        for problem in problems:
            log.warning("--insecure-dev-certs: %s", problem)
        listen = listen_address(args.listen)
        check_can_listen(listen)
    except Error as e:
        raise ClientError(EXIT_ERROR, f"cannot start: {e}") from None
    import resource
    config = ServerConfig(listen=listen, certs_dir=args.certs,
                          stop_jobs_on_exit=args.stop_jobs_on_exit,
                          retain_seconds=args.retain_days * 86400, retain_bytes=args.retain_size,
                          max_streams_per_user=args.max_streams_per_user,
                          handshake_timeout=args.handshake_timeout,
                          host_network_roles=("admin", *args.allow_host_network_role),
                          egress_roles=tuple(r for r in args.egress_role if r != "none")
                          if args.egress_role else ("admin", "user"),
                          metrics_listen=args.metrics_listen, metrics_cert=args.metrics_cert,
                          metrics_key=args.metrics_key,
                          # (what engine.open() raises the soft limit to: the hard one)
                          open_files=resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    served = []
    try:
        asyncio.run(serve(engine, config, verifier, on_started=lambda: served.append(True)))
    except Error as e:
        raise ClientError(EXIT_ERROR, f"cannot start: {e}") from None
    finally:
        if config.stop_jobs_on_exit and served:
            log.info("stopping every running job (--stop-jobs-on-exit)")
        engine.close(stop_jobs=config.stop_jobs_on_exit)
        if served:
            log.info("server stopped")
    return EXIT_OK


JOURNAL_PRIORITIES = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}


def under_journald():
    """Whether our stderr is journald's (systemd sets JOURNAL_STREAM to its device:inode)."""
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return os.environ.get("JOURNAL_STREAM", "") == f"{st.st_dev}:{st.st_ino}"


def setup_logging(log_format):
    """The server's log on stderr: "text" (under journald, each line with its <N> priority
    and no time of its own) or "json" (one object per line: time, level, message and the
    line's fields, e.g. an RPC's trace_id)."""
    import logging

    class JsonFormatter(logging.Formatter):
        def format(self, record):
            line = {"time": rfc3339(record.created), "level": record.levelname.lower(),
                    "message": record.getMessage(), **getattr(record, "fields", {})}
            if record.exc_info:
                line["exception"] = self.formatException(record.exc_info)
            return json.dumps(line, default=str)

    class JournalFormatter(logging.Formatter):
        def format(self, record):
            prefix = f"<{JOURNAL_PRIORITIES.get(record.levelname, 6)}>"
            return "\n".join(prefix + line for line in super().format(record).splitlines())

    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    elif under_journald():
        handler.setFormatter(JournalFormatter("%(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def cmd_token(args):
    try:
        with open(args.signing_key, "rb") as f:
            key = f.read()
        with open(args.cert, "rb") as f:
            pem = f.read().decode()
    except OSError as e:
        raise ClientError(EXIT_USAGE, f"cannot read {e.filename}: {e.strerror}") from None
    import ssl
    try:
        der = ssl.PEM_cert_to_DER_cert(pem)
        token = issue_token(key, args.token_user, args.role, der, int(args.days * 86400))
    except (ValueError, InvalidArgumentError) as e:
        raise ClientError(EXIT_USAGE, str(e)) from None
    print(token)
    return EXIT_OK


# -- client commands --------------------------------------------------------------

def print_json(obj, lines=False):
    """obj as JSON: indented, or with lines one object per line (JSON Lines)."""
    print(json.dumps(obj, indent=None if lines else 2), flush=lines)


class OutputPrinter:
    """Writes OutputPieces as they come: the job's stdout to ours and its stderr to ours,
    raw; with timestamps, each line begun with its write time; with json_lines, one JSON
    object per chunk."""

    def __init__(self, json_lines=False, timestamps=False):
        self.json_lines, self.timestamps = json_lines, timestamps
        self.line_start = {STDOUT: True, STDERR: True, 0: True}

    def write(self, chunk):
        if self.json_lines:
            import base64
            line = {"offset": chunk.offset, "stream": STREAM_NAMES.get(chunk.stream, "output"),
                    "data_b64": base64.b64encode(chunk.data).decode()}
            if chunk.time:
                line["time"] = rfc3339(chunk.time)
            print(json.dumps(line), flush=True)
            return
        out = sys.stderr if chunk.stream == STDERR else sys.stdout
        data = chunk.data
        if self.timestamps:
            data = self.stamped(chunk)
        out.flush()   # what was printed to it as text comes first
        out.buffer.write(data)
        out.buffer.flush()

    def stamped(self, chunk):
        """chunk's data with its write time (or '-') at the start of each line."""
        # As precise as the index records the times (INDEX_GRANULE: 10 ms).
        stamp = (rfc3339(chunk.time, digits=2) if chunk.time else "-").encode() + b" "
        data = bytes(chunk.data)
        lines = data.splitlines(keepends=True)
        at_start = self.line_start[chunk.stream]
        out = b"".join((stamp if at_start or i else b"") + line for i, line in enumerate(lines))
        self.line_start[chunk.stream] = data.endswith(b"\n")
        return out


STREAM_NAMES = {STDOUT: "stdout", STDERR: "stderr"}


def output_request(client, args, job_id, follow):
    """The OutputRequest for output, stream and run -f."""
    r = client.pb.OutputRequest(job_id=job_id, follow=follow, runs=True,
                                stream=getattr(args, "stream", 0),
                                tail_lines=max(0, getattr(args, "tail", 0)),
                                timestamps=getattr(args, "timestamps", False))
    if getattr(args, "since", 0):
        r.since.FromNanoseconds(int(args.since * 1e9))
    return r


def stream_output(client, args, job_id, follow):
    """Copy a job's output to stdout and stderr (or JSON Lines with --json).

    Ctrl-C detaches (the job goes on). Returns the number of bytes.
    """
    stream = client.output(output_request(client, args, job_id, follow))
    printer = OutputPrinter(args.json, getattr(args, "timestamps", False))
    total = 0
    with detach_on_ctrl_c(stream, job_id) as detached:
        try:
            for chunk in stream:
                total += len(chunk.data)
                printer.write(chunk)
        except client.grpc.RpcError as e:
            if not detached:
                raise client.error(e) from None
    return total


@contextlib.contextmanager
def detach_on_ctrl_c(stream, job_id):
    """While following: Ctrl-C cancels the stream (the job goes on) and the command exits
    130; a second Ctrl-C, or a cancel that has not ended the stream within 2 s, ends the
    process at once. Yields a list that is non-empty once detached.

    Why a handler and not KeyboardInterrupt: an exception raised at an arbitrary point of
    grpc's iterator can leave the call half-registered, and the exit then hangs on it."""
    detached = []

    def leave():
        sys.stderr.write(f"\ndetached from job {job_id}; it keeps running\n")
        exit_without_teardown(EXIT_INTERRUPTED)

    def on_sigint(_signum, _frame):
        if detached:
            leave()
        detached.append(True)
        timer = threading.Timer(2.0, leave)
        timer.daemon = True
        timer.start()
        stream.cancel()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield detached
    finally:
        signal.signal(signal.SIGINT, previous)
    if detached:
        leave()


class RawTerminal:
    """Our terminal (fd 0) in raw mode while in the with block: keys go to the job as typed
    (Ctrl-C too: the job's terminal makes the signal), and its modes come back on every
    way out of the block. SIGTERM, SIGHUP and SIGINT (from kill: the keys make none) put
    the modes back and exit 128+signal at once (exit_on_ctrl_c says why at once)."""

    def __init__(self, fd=0):
        self.fd, self.saved, self.previous = fd, None, {}

    def __enter__(self):
        import termios
        import tty
        self.saved = termios.tcgetattr(self.fd)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._exit)
        tty.setraw(self.fd, termios.TCSADRAIN)
        return self

    def _exit(self, signum, _frame):
        import termios
        try:
            self._restore()
        except termios.error:   # a terminal hung up (SIGHUP) has no modes to restore
            pass
        exit_without_teardown(128 + signum)

    def _restore(self):
        import termios
        # TCSAFLUSH: what is left unread in our terminal's input was meant for the job (keys
        # after ~., a read-only viewer's terminal's answers to the job's queries such as
        # ESC [6n): the shell we give the terminal back to must not read it as typed.
        termios.tcsetattr(self.fd, termios.TCSAFLUSH, self.saved)

    def __exit__(self, *_exc):
        self._restore()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def terminal_size():
    """(rows, columns) of the terminal on stdin or stdout, else the VT100's 24x80."""
    for fd in (0, 1):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            if size.lines and size.columns:
                return size.lines, size.columns
    return 24, 80


def stdin_is_ignorable():
    """Whether our stdin is nothing a user would expect a job to get: a terminal (they type
    into the job only with -i), /dev/null, or closed."""
    try:
        st = os.fstat(0)
    except OSError:
        return True
    null = os.stat(os.devnull)
    import stat
    return os.isatty(0) or (stat.S_ISCHR(st.st_mode) and st.st_rdev == null.st_rdev)


RESIZED = object()   # InputFeed's queue: send the terminal's new size


class InputFeed:
    """The InputMessages of one Input call: a first that names the job, then what a reader
    thread reads from our stdin (with ssh's escapes: ~. detaches, ~~ sends ~), the
    terminal's size after each SIGWINCH, and eof when a stdin that is no terminal ends.
    The queue is short: a job that does not read holds our reads back, not our memory."""

    def __init__(self, pb, first, escapes=False, send_eof=True, on_detach=None):
        import queue
        self.pb, self.first, self.queue = pb, first, queue.Queue(maxsize=8)
        self.escapes, self.send_eof, self.on_detach = escapes, send_eof, on_detach
        self.at_line_start, self.tilde, self.closed = True, False, False

    def __iter__(self):
        yield self.first
        while True:
            item = self.queue.get()
            if item is None or self.closed:
                return
            if item is RESIZED:
                rows, cols = terminal_size()
                item = self.pb.InputMessage(size=self.pb.TerminalSize(rows=rows, columns=cols))
            yield item

    def start(self):
        threading.Thread(target=self._read_stdin, name="stdin", daemon=True).start()

    def resize(self):
        """Send the terminal's size. Never blocks: a full queue is being read anyway."""
        with contextlib.suppress(Exception):
            self.queue.put_nowait(RESIZED)

    def close(self):
        self.closed = True
        with contextlib.suppress(Exception):
            self.queue.put_nowait(None)

    def _read_stdin(self):
        with contextlib.suppress(OSError):   # a pipe: fewer, larger reads
            fcntl.fcntl(0, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        while not self.closed:
            data = read_what_is_there(0, INPUT_MESSAGE)
            if not data:
                if self.send_eof:
                    self.queue.put(self.pb.InputMessage(eof=True))
                self.queue.put(None)
                return
            if self.escapes:
                data = self._escape(data)
            if data:
                self.queue.put(self.pb.InputMessage(data=data))

    def _escape(self, data):
        """data less ssh's escape sequences; ~. calls on_detach."""
        if not self.tilde and b"~" not in data:
            self.at_line_start = data[-1] in b"\r\n"
            return data
        out = bytearray()
        for b in data:
            if self.tilde:
                self.tilde = False
                if b == ord("."):
                    self.closed = True
                    self.on_detach()
                    return bytes(out)
                if b != ord("~"):
                    out.append(ord("~"))
            elif b == ord("~") and self.at_line_start:
                self.tilde, self.at_line_start = True, False
                continue
            out.append(b)
            self.at_line_start = b in b"\r\n"
        return bytes(out)


def read_what_is_there(fd, most):
    """Block for some bytes of fd, then take what more is there at once, up to most: a key
    goes alone and at once, a stream in large messages (each costs the same to send)."""
    try:
        data = os.read(fd, most)
    except OSError:
        return b""   # (a terminal hung up): as EOF
    with contextlib.suppress(OSError):   # a later error: the next read sees it again
        while len(data) < most and wait_readable(fd, 0):
            more = os.read(fd, most - len(data))
            if not more:
                break   # EOF: the next read says so
            data += more
    return data


def interactive_session(client, job_id, terminal, send_input, tail_lines=0,
                        take_over=False, redraw=False):
    """Follow the job's output to ours and, with send_input, send it our stdin (a terminal:
    raw, sized, with escapes) until the job has ended or ~. detaches.
    Returns the job's final JobStatus, or None once detached. Raises ClientError."""
    pb = client.pb
    stream = client.output(pb.OutputRequest(job_id=job_id, follow=True, runs=True,
                                            tail_lines=tail_lines))
    raw = terminal and os.isatty(0)
    detached, problems = [], []

    def detach():
        detached.append(True)
        stream.cancel()

    future = feed = None
    if send_input:
        first = pb.InputMessage(job_id=job_id, take_over=take_over, redraw=redraw)
        if terminal:
            first.size.rows, first.size.columns = terminal_size()
        feed = InputFeed(pb, first, escapes=raw, send_eof=not terminal, on_detach=detach)
        future = client.input(feed)
        # Said at once, from grpc's thread, and once (not when the next output comes).
        future.add_done_callback(lambda f: problems or problems.append(
            _tell_input_problem(client, f, raw, ending=detached)))
        feed.start()
    try:
        with RawTerminal() if raw else contextlib.nullcontext(), (
                on_resize(feed.resize) if feed and terminal else contextlib.nullcontext()):
            _print_session(client, stream, job_id, raw, detached, problems)
    finally:
        if feed is not None:
            feed.close()
            future.cancel()
    if detached:
        print(f"steve-jobs: detached from job {job_id}; it keeps running (attach "
              f"{job_id} rejoins it)", file=sys.stderr)
        return None
    return client.call("Status", pb.JobRef(job_id=job_id))


@contextlib.contextmanager
def on_resize(callback):
    """Call callback() on each SIGWINCH, at once, from a thread of its own. (A Python
    handler runs only once the main thread wakes, and it waits in grpc: the new size would
    reach the job after keys typed since.) The signal's C handler writes to a wakeup fd."""
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    os.set_blocking(r, True)

    def watch():
        while data := os.read(r, 64):   # EOF once w is closed
            if signal.SIGWINCH.value in data:
                callback()

    previous = signal.signal(signal.SIGWINCH, lambda *_: None)
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    thread = threading.Thread(target=watch, name="resizes", daemon=True)
    thread.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGWINCH, previous)
        os.close(w)
        thread.join(1.0)
        os.close(r)


def _print_session(client, stream, job_id, raw, detached, problems):
    """interactive_session's output loop; says once why input ended early, if it did."""
    printer = OutputPrinter()
    guard = contextlib.nullcontext([]) if raw else detach_on_ctrl_c(stream, job_id)
    with guard as interrupted:
        try:
            for chunk in stream:
                printer.write(chunk)
        except client.grpc.RpcError as e:
            if not (detached or interrupted):
                raise client.error(e) from None


def _tell_input_problem(client, future, raw, ending=()):
    """Say why the Input call ended, if it failed (and the session is not ending: ending
    non-empty). Returns True."""
    if ending or future.cancelled() or future.exception() is None:
        return True
    e = client.error(future.exception())
    if e.reason == "JOB_NOT_RUNNING":
        return True   # it ended without reading all of it: its output and status tell
    end = "\r\n" if raw else "\n"
    sys.stderr.write(f"{end}steve-jobs: not sending input: {for_terminal(str(e))}{end}")
    sys.stderr.flush()
    return True


def command_argv(words):
    """run's words as an argv: ssh's rule (joined by spaces, run by /bin/sh -c), or after
    '--' as they are. Raises ClientError."""
    argv = words[1:] if words[:1] == ["--"] else ["/bin/sh", "-c", " ".join(words)] if (
        words) else []
    if not argv or not argv[-1]:
        raise ClientError(EXIT_USAGE, "nothing to run: give CMD ARG... or -- PROG ARG...")
    for arg in argv:
        try:
            arg.encode()
        except UnicodeEncodeError:
            raise ClientError(EXIT_USAGE, f"the command's word {quoted(arg)} is not valid "
                                          f"UTF-8 (the API carries text)") from None
    return argv


def start_request(client, args):
    """The StartRequest of run's flags, with a fresh request id for safe retries."""
    pb = client.pb
    env = dict([setting for path in args.env_file for setting in read_env_file(path)] +
               args.env)   # (-e after the files: it wins, as docker's does)
    request = pb.StartRequest(
        argv=command_argv(list(args.cmd)), env=env, workdir=args.workdir,
        as_root=args.root, host_network=args.network == "host", network=args.network,
        rw_host=args.rw_host, name=args.name,
        labels=dict(args.label), request_id=random_hex(16),
        stdin=args.interactive and not args.tty, timeout_seconds=args.timeout,
        remove_when_ended=args.rm, queue=args.queue,
        after=[pb.Dependency(job_id=ref, kind=kind) for ref, kind in args.after],
        priority=args.priority, queue_timeout_seconds=args.queue_timeout,
        limits=pb.Limits(**{spec.proto: getattr(args, flag_dest(spec.flag))
                            for spec in LIMITS}))
    if args.tty:
        request.terminal.rows, request.terminal.columns = terminal_size()
        request.env.setdefault("TERM", os.environ.get("TERM") or "xterm-256color")
    return request


# A request field, in a start's errors, as the flag of run that sets it.
FLAG_OF_FIELD = {**{f"limits.{spec.proto}": spec.flag for spec in LIMITS},
                 "workdir": "--workdir", "env": "--env", "name": "--name", "labels": "--label",
                 "timeout_seconds": "--timeout", "network": "--network",
                 "queue_timeout_seconds": "--queue-timeout", "priority": "--priority",
                 "after": "--after", "queue": "--queue"}


def in_flag_terms(error):
    """A start's ClientError with the request field it names said as run's flag."""
    flag = FLAG_OF_FIELD.get(error.field)
    api_name = error.field.rsplit(".", 1)[-1]
    if flag and api_name in str(error):
        error.args = (str(error).replace(api_name, flag, 1),)
    return error


RESTART_WAIT = 5.0   # s a start waits for an address that refuses connections to listen


def start_with_retry(client, request):
    """Start, and once more if the answer was lost (UNAVAILABLE, DEADLINE_EXCEEDED): the
    request id makes the server return the first attempt's job rather than start another.
    The retry waits (up to 30 s) for a server that is restarting. A start that never
    reached a server fails at once if the address or certificates are wrong, and after
    RESTART_WAIT s if nothing listens there (time enough for a restart). Raises
    ClientError."""
    try:
        return client.call("Start", request)
    except ClientError as e:
        if e.code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            raise
        if client.never_reached(e):
            if not client.nothing_listens():
                raise   # (a wrong address or certificate: waiting changes nothing)
            try:
                return client.call("Start", request, timeout=RESTART_WAIT, wait_for_ready=True)
            except ClientError as again:
                if again.code != "DEADLINE_EXCEEDED":
                    raise
                # Still refused: say so. Otherwise this start may have reached a server
                # and its answer got lost: ask again below.
                if client.nothing_listens():
                    raise e from None
    time.sleep(0.5)
    return client.call("Start", request, wait_for_ready=True)


def cmd_run(client, args):
    if args.tty and args.interactive and not os.isatty(0):
        raise ClientError(EXIT_USAGE, "the input device is not a terminal: -it needs one "
                                      "(-i alone sends a pipe or a file)")
    request = start_request(client, args)
    args.follow = args.follow or args.interactive or args.tty
    if not args.interactive and not stdin_is_ignorable():
        print("steve-jobs: stdin is not sent to the job (its stdin is /dev/null): "
              "run -i sends it", file=sys.stderr)
    try:
        st = start_with_files(client, request, args.copy) if args.copy else \
            start_with_retry(client, request)
    except ClientError as e:
        if args.follow:
            e.exit_code = EXIT_RUN_FAILED
        raise in_flag_terms(e) from None
    if not args.follow:
        print_json(status_dict(st)) if args.json else print(st.job_id)
        return EXIT_OK
    if args.json:
        print_json({"job_id": st.job_id, "name": st.name}, lines=True)
    else:
        print(f"job {st.job_id}", file=sys.stderr)
        if PB_TO_STATE.get(st.state) == QUEUED:   # (once: the output follows when it runs)
            print(f"job {st.job_id} is queued: it {queue_note(st)}", file=sys.stderr)
    try:
        if args.interactive or args.tty:
            until_started(client, st)   # (its input and terminal exist once it runs)
            st = interactive_session(client, st.job_id, terminal=args.tty,
                                     send_input=args.interactive)
            if st is None:
                return EXIT_OK   # detached
        else:
            stream_output(client, args, st.job_id, follow=True)
            st = client.call("Status", client.pb.JobRef(job_id=st.job_id))
    except ClientError as e:
        if e.exit_code != EXIT_INTERRUPTED:
            e.exit_code = EXIT_RUN_FAILED
        raise
    if args.rm:   # (all its output has come: at once, not when the server would)
        with contextlib.suppress(ClientError):
            client.call("Remove", client.pb.JobRef(job_id=st.job_id))
    return report_end(st, args)


QUEUE_POLL = 0.5   # s between looks at a queued job that run -i or -t waits to start


def until_started(client, st):
    """Return once the job st is has left the queue (at once if it was not queued)."""
    while PB_TO_STATE.get(st.state) == QUEUED:
        time.sleep(QUEUE_POLL)
        st = client.call("Status", client.pb.JobRef(job_id=st.job_id))


def report_end(st, args):
    """Say how a followed job ended (its status with --json); returns our exit code."""
    if args.json:
        print_json(status_dict(st), lines=True)
    state = PB_TO_STATE.get(st.state)
    if state != EXITED and not args.json:   # say why, where it cannot mix with the output
        why = {OOM_KILLED: "killed for exceeding its memory limit", STOPPED: "stopped",
               FAILED: f"failed to start: {st.error}", UNKNOWN: f"ended unknown: {st.error}",
               KILLED: f"killed by {signal_name(st.signal)}",
               CANCELLED: f"cancelled: {st.error}"}.get(state, state)
        print(for_terminal(f"job {st.job_id} {why}"), file=sys.stderr)
    return exit_code_of(st)


def cmd_attach(client, args):
    """Rejoin a running job: its terminal (typing into it unless --read-only), or its
    output (with -i, our stdin to its). Exits with its exit code once it ends."""
    st = client.call("Status", client.pb.JobRef(job_id=args.job_id))
    if PB_TO_STATE.get(st.state) in ENDED_STATES:
        raise ClientError(EXIT_CODES["FAILED_PRECONDITION"], f"job {st.job_id} has ended "
                          f"(output {st.job_id} prints what it wrote)")
    terminal = st.HasField("terminal")
    tail = args.tail if args.tail >= 0 else terminal_size()[0]
    print(f"job {st.job_id}" + (" (~. detaches)" if terminal and os.isatty(0) else ""),
          file=sys.stderr)
    st = interactive_session(
        client, st.job_id, terminal, tail_lines=tail, take_over=args.take_over,
        send_input=not args.read_only and (args.interactive or terminal), redraw=terminal)
    if st is None:
        return EXIT_OK
    return report_end(st, args)


def cmd_asciicast(client, args):
    """Print a job's output as an asciicast v2 recording (asciinema play plays it)."""
    import codecs
    st = client.call("Status", client.pb.JobRef(job_id=args.job_id))
    rows, cols = ((st.terminal.rows, st.terminal.columns) if st.HasField("terminal")
                  else (24, 80))
    start = st.start_time.ToNanoseconds() / 1e9 or st.created_at
    print(json.dumps({"version": 2, "width": cols, "height": rows,
                      "timestamp": int(start),
                      "title": " ".join(st.argv)[:200]}), flush=True)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")   # a character may be cut
    stream = client.output(client.pb.OutputRequest(job_id=st.job_id, timestamps=True,
                                                   runs=True))
    at = 0.0
    try:
        for chunk in stream:
            text = decoder.decode(bytes(chunk.data))
            if not st.HasField("terminal"):   # a player is a terminal: lines need CR LF
                text = text.replace("\n", "\r\n")
            if text:
                at = max(0.0, (chunk.time or start) - start)
                sys.stdout.write(json.dumps([round(at, 6), "o", text]) + "\n")
    except client.grpc.RpcError as e:
        raise client.error(e) from None
    rest = decoder.decode(b"", final=True)   # a cut character at the very end
    if rest:
        sys.stdout.write(json.dumps([round(at, 6), "o", rest]) + "\n")
    sys.stdout.flush()
    return EXIT_OK


def cmd_wait(client, args):
    """Wait for each job in turn; print each exit code (or status), a failure on its own
    line; exit with the first failure's code, else the first job's exit code. Past the
    --timeout, the jobs not yet waited for are named on one line."""
    first_code, first_failure = None, EXIT_OK
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    for n, ref in enumerate(args.job_id):
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            st = client.call("Wait", client.pb.JobRef(job_id=ref), timeout=left)
        except ClientError as e:
            late = e.code == "DEADLINE_EXCEEDED" and args.timeout is not None
            print_failure(args, e, f"{ref} had not ended at the --timeout "
                                   f"({args.timeout:g} s)" if late else str(e))
            first_failure = first_failure or e.exit_code
            if late and args.job_id[n + 1:]:
                print("steve-jobs: not waited for: " + for_terminal(
                    " ".join(args.job_id[n + 1:])), file=sys.stderr)
                break
            continue
        code = exit_code_of(st)
        first_code = code if first_code is None else first_code
        print_json(status_dict(st), lines=True) if args.json else print(code)
    return first_failure or first_code


def print_failure(args, error, text):
    """One job's ClientError among several jobs' answers, on its own line: with --json
    on stdout with the answers, else text on stderr."""
    print_json(error.as_json(), lines=True) if args.json else print(
        f"steve-jobs: {for_terminal(text)}", file=sys.stderr)


def cmd_list(client, args):
    """Every page of the List, printed as it comes."""
    pb = client.pb
    states = args.state or ([RUNNING, PAUSED] if args.command == "ps" and
                            not args.every_state else [])
    request = pb.ListRequest(all_users=args.all, owner=args.owner, name=args.name,
                             labels=dict(args.label),
                             states=[STATE_TO_PB[s] for s in states],
                             view=pb.VIEW_FULL if args.full else pb.VIEW_SUMMARY)
    jobs, header = [], not (args.json or args.quiet)
    while True:
        page = client.call("List", request)
        if header:   # (only once the server has answered: an error comes alone)
            print(f"{'JOB':36}  {'NAME':16} {'OWNER':12} {'STATE':10} {'EXIT':>4}  COMMAND")
            header = False
        for j in page.jobs:
            if args.quiet:
                print(for_terminal(j.job_id) + (f"\n{for_terminal(j.name)}"
                                                if j.name and args.with_names else ""))
            elif args.json:
                jobs.append(status_dict(j))
            else:
                code = (j.exit_code if j.HasField("exit_code")
                        else 128 + j.signal if j.HasField("signal") else "")
                print(for_terminal(f"{j.job_id:36}  {j.name[:16]:16} {j.owner[:12]:12} "
                                   f"{PB_TO_STATE.get(j.state, '?'):10} {code!s:>4}  ")
                      + for_terminal(" ".join(j.argv))[:60])
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    if args.json:
        print_json(jobs)
    return EXIT_OK


STATS_INTERVAL = 1.0              # seconds between stats' refreshes (and its first sample)


def stats_rows(before, now, seconds):
    """One dict per job in now (JobStatus messages by id) with its usage; CPU % (of one
    core) from the CPU time it used since before, seconds ago."""
    rows = []
    for job_id, st in now.items():
        used = st.cpu_seconds - before[job_id].cpu_seconds if job_id in before else 0.0
        cpu = round(100.0 * max(0.0, used) / seconds, 1) if seconds > 0 else 0.0
        rows.append({"job_id": job_id, "name": st.name, "cpu_percent": cpu,
                     "memory_bytes": st.memory_bytes,
                     "memory_limit_bytes": st.limits.memory_bytes,
                     "peak_memory_bytes": st.peak_memory_bytes, "pids": st.pids,
                     "pids_limit": st.limits.pids, "io_read_bytes": st.io_read_bytes,
                     "io_write_bytes": st.io_write_bytes})
    return rows


def cmd_stats(client, args):
    """stats: running jobs' usage, a table refreshed every STATS_INTERVAL (as docker
    stats); --no-stream: once; --json: an object per job per refresh (JSON Lines)."""
    pb = client.pb

    def sample():
        if args.job_id:
            found = [client.call("Status", pb.JobRef(job_id=ref)) for ref in args.job_id]
        else:
            found, request = [], pb.ListRequest(
                states=[STATE_TO_PB[RUNNING], STATE_TO_PB[PAUSED]], view=pb.VIEW_FULL,
                all_users=args.all)
            while True:
                page = client.call("List", request)
                found.extend(page.jobs)
                if not page.next_page_token:
                    break
                request.page_token = page.next_page_token
        return {st.job_id: st for st in found}, time.monotonic()
    before, then = sample()
    clear = sys.stdout.isatty() and not args.json and not args.no_stream
    while True:
        time.sleep(STATS_INTERVAL)
        now, at = sample()
        rows = stats_rows(before, now, at - then)
        if args.json:
            for row in rows:
                print_json(row, lines=True)
        else:
            if clear:
                sys.stdout.write("\033[H\033[2J")   # (a refreshing table, as docker's)
            print(f"{'JOB':12}  {'NAME':16} {'CPU %':>6}  {'MEMORY / LIMIT':>21} {'PEAK':>9}"
                  f" {'PIDS':>9}  {'IO READ / WRITE':>19}")
            for r in rows:
                size = {k: human_bytes(v) for k, v in r.items() if k.endswith("_bytes")}
                print(for_terminal(
                    f"{r['job_id'][:12]:12}  {r['name'][:16]:16} {r['cpu_percent']:6.1f}  "
                    f"{size['memory_bytes']:>9} / {size['memory_limit_bytes']:>9} "
                    f"{size['peak_memory_bytes']:>9} {r['pids']:>4}/{r['pids_limit']:<4} "
                    f"{size['io_read_bytes']:>9} / {size['io_write_bytes']:<9}"))
        sys.stdout.flush()
        if args.no_stream:
            return EXIT_OK
        before, then = now, at


def cmd_events(client, args):
    """events: a line per event (time, what, job, name, state, exit code), or with --json
    an object per event ({"time", "kind", "job": its status}), until ^C."""
    pb = client.pb
    request = pb.EventsRequest(job_id=args.job_id, all_users=args.all, owner=args.owner,
                               labels=dict(args.label))
    try:
        for event in client.stub.Events(request, metadata=client.metadata):
            when = rfc3339(seconds_of(event.time), digits=3)
            if args.json:
                print_json({"time": when, "kind": event.kind, "job": status_dict(event.job)},
                           lines=True)
            else:
                st = event.job
                code = f" exit {exit_code_of(st)}" if event.kind == "ended" else ""
                print(for_terminal(f"{when}  {event.kind:9}  {st.job_id}  "
                                   f"{PB_TO_STATE.get(st.state, '?')}{code}"
                                   + (f"  {st.name}" if st.name else "")))
            sys.stdout.flush()
    except client.grpc.RpcError as e:
        raise client.error(e) from None
    return EXIT_OK


# A command about many jobs: its calls at once. A stop waits for its job on the server's
# event loop (a user may run four such stops at once); each other call holds one of the
# threads every user's calls share while it runs, and a user's share of them is this.
CLI_STOPS_IN_FLIGHT = MAX_STOPS_PER_USER // 4
CLI_CALLS_IN_FLIGHT = SERVICE_THREADS_PER_USER


def cmd_job(client, args):
    """status, pause, resume, stop, kill, rm: one call about each job named. With several,
    the calls go out side by side (CLI_STOPS_IN_FLIGHT, else CLI_CALLS_IN_FLIGHT at once:
    the grace periods of a stop run together, not one after another); each answer is
    printed in the order the jobs were named, a failure on its own line; the exit code is
    the first failure's."""
    refs = args.job_id if isinstance(args.job_id, list) else [args.job_id]
    if len(refs) == 1:
        _print_job_answer(args, _one_job_command(client, args, refs[0]), lines=False)
        return EXIT_OK
    first_failure = EXIT_OK
    for answer in calls_side_by_side(lambda ref: _one_job_command(client, args, ref), refs,
                                     CLI_STOPS_IN_FLIGHT if args.command == "stop"
                                     else CLI_CALLS_IN_FLIGHT):
        if isinstance(answer, ClientError):
            print_failure(args, answer, str(answer))
            first_failure = first_failure or answer.exit_code
        else:
            _print_job_answer(args, answer, lines=True)
    return first_failure


def calls_side_by_side(call, items, at_once):
    """call(item) for each item, at_once of them running at a time (threads: the client's
    channel serves them all); yields each result, or the ClientError it raised, in the
    order of items, as soon as it and those before it are in."""
    import concurrent.futures

    def answer(item):
        try:
            return call(item)
        except ClientError as e:
            return e
    with concurrent.futures.ThreadPoolExecutor(min(at_once, len(items))) as pool:
        yield from pool.map(answer, items)


JOB_RPC = {"status": "Status", "pause": "Pause", "resume": "Resume"}   # the JobRef calls


def _one_job_command(client, args, ref):
    """The call args.command makes about the job ref. Returns its answer: a JobStatus, or
    for rm the id removed. Raises ClientError."""
    pb = client.pb
    if args.command == "rm":
        if args.force:
            client.call("Stop", pb.StopRequest(job_id=ref, grace_seconds=0), timeout=None)
        client.call("Remove", pb.JobRef(job_id=ref))
        return ref
    if args.command == "stop":
        request = pb.StopRequest(job_id=ref)
        if args.grace is not None:
            request.grace_seconds = args.grace
        return client.call("Stop", request, timeout=None)
    if args.command == "kill":
        return client.call("Signal", pb.SignalRequest(job_id=ref, signal=args.signal,
                                                      all=args.all))
    return client.call(JOB_RPC[args.command], pb.JobRef(job_id=ref))


def _print_job_answer(args, answer, lines):
    """Print what _one_job_command returned, as args.command and --json say (lines: one
    JSON object a line, as for several jobs)."""
    if args.command == "rm":
        print_json({"removed": answer}, lines=lines) if args.json else print(answer)
    elif args.json:
        print_json(status_dict(answer), lines=lines)
    else:
        print(format_status(answer) if args.command == "status"
              else for_terminal(f"{answer.job_id} {PB_TO_STATE.get(answer.state)}"))


def exit_on_ctrl_c(_signum, _frame):
    """A client command's SIGINT handler: exit 130 at once (what is printed is flushed).

    Why not KeyboardInterrupt: raised between two bytecodes of grpc's own Python code (a
    `with` of its channel's lock), it can leave a call registered in the channel, and the
    channel's close() then waits for that call for ever (seen once: `wait` hung on Ctrl-C).
    A client has nothing to tear down that the exit does not (RawTerminal restores the
    terminal in a handler of its own)."""
    exit_without_teardown(EXIT_INTERRUPTED)


def cmd_client(args):
    """Every client subcommand that talks to the server. Returns an exit code; raises
    ClientError."""
    previous = signal.signal(signal.SIGINT, exit_on_ctrl_c)
    try:
        server, certs, user, origin = connection_settings(args)
        return _client_command(Client(server, certs, user, origin=origin), args)
    finally:
        signal.signal(signal.SIGINT, previous)


def _client_command(client, args):
    try:
        return args.run(client, args)
    finally:
        client.close()


def cmd_output(client, args):
    """output, stream, logs: the job's output so far, or following it."""
    if getattr(args, "asciicast", False):
        return cmd_asciicast(client, args)
    stream_output(client, args, args.job_id, follow=args.command == "stream" or (
        args.command == "logs" and args.follow))
    return EXIT_OK


COMPLETION_BASH = r'''# steve-jobs completion for bash (and zsh, through bashcompinit)
_steve_jobs() {
    local cur=${COMP_WORDS[COMP_CWORD]} cmd="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
            --server|--user|--certs|--context) ((i++)) ;;
            -*) ;;
            *) cmd=${COMP_WORDS[i]}; break ;;
        esac
    done
    if [ -z "$cmd" ]; then
        COMPREPLY=($(compgen -W "%(commands)s" -- "$cur")); return
    fi
    case $cmd in
        %(job_commands)s)
            [[ $cur == -* ]] && return
            COMPREPLY=($(compgen -W "$("${COMP_WORDS[0]}" "${COMP_WORDS[@]:1:i-1}" list -q --with-names 2>/dev/null)" -- "$cur")) ;;
        context)
            COMPREPLY=($(compgen -W "list use $("${COMP_WORDS[0]}" context list -q 2>/dev/null)" -- "$cur")) ;;
        completion) COMPREPLY=($(compgen -W "bash zsh" -- "$cur")) ;;
    esac
}
complete -F _steve_jobs steve-jobs steve_jobs.py
'''


def cmd_exec(client, args):
    """exec: a command in a running job, its output here, its exit code ours (128+N when
    signal N ended it)."""
    pb = client.pb
    first = pb.ExecInput(job_id=args.job_id, argv=command_argv(list(args.cmd)))
    if args.tty:
        first.terminal.rows, first.terminal.columns = terminal_size()
    inputs = ExecInputs(pb, first, args.interactive, args.tty)
    outputs = client.stub.Exec(iter(inputs), metadata=client.metadata)
    ended = None
    try:
        with RawTerminal() if args.tty and os.isatty(0) else contextlib.nullcontext():
            for message in outputs:
                if message.ended:
                    ended = message
                    break
                target = sys.stderr if message.stream == STDERR else sys.stdout
                target.buffer.write(message.data)
                target.buffer.flush()
    except client.grpc.RpcError as e:
        raise client.error(e) from None
    finally:
        inputs.close()
    if ended is None:
        raise ClientError(EXIT_ERROR, "the exec ended without saying how")
    return 128 + ended.signal if ended.signal else ended.exit_code


class ExecInputs:
    """An Exec call's messages: first, then our stdin (with -i) and terminal sizes (with
    -t), from a thread, as they come."""

    def __init__(self, pb, first, interactive, tty):
        import queue
        self.pb, self.queue, self.closed = pb, queue.Queue(), False
        self.queue.put(first)
        if interactive:
            threading.Thread(target=self._read_stdin, args=(tty,), daemon=True).start()
        if tty and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGWINCH, self._resized)

    def _read_stdin(self, tty):
        while data := os.read(0, 64 * KiB):
            self.queue.put(self.pb.ExecInput(data=data))
        if not tty:
            self.queue.put(self.pb.ExecInput(eof=True))

    def _resized(self, _signum, _frame):
        rows, columns = terminal_size()
        self.queue.put(self.pb.ExecInput(size=self.pb.TerminalSize(rows=rows,
                                                                    columns=columns)))

    def __iter__(self):
        while not self.closed:
            message = self.queue.get()
            if message is None:
                return
            yield message

    def close(self):
        self.closed = True
        self.queue.put(None)


def job_path(arg):
    """(job, path) of an ID:PATH argument, or None for a local path (one with a slash or a
    dot before its first colon: ./a:b is local)."""
    ref, colon, path = arg.partition(":")
    if not colon or not ref or "/" in ref or ref.startswith("."):
        return None
    return ref, path


def cmd_cp(client, args):
    """cp: a tar stream from a job's folder (CopyOut) or into one (CopyIn)."""
    source, destination = job_path(args.source), job_path(args.destination)
    if bool(source) == bool(destination):
        raise ClientError(EXIT_USAGE, "cp copies between a job and here: one of SRC and DST "
                                      "is ID:PATH, the other a local path or -")
    if source:
        return copy_from_job(client, *source, args.destination)
    return copy_into_job(client, args.source, *destination, args.json)


def copy_from_job(client, job, path, local):
    """CopyOut into local: written to stdout as it comes ('-'), else unpacked beside it and
    moved into place once whole (as docker cp: into local if it is a folder, else as it)."""
    calls = client.stub.CopyOut(client.pb.CopyOutRequest(job_id=job, path=path),
                                metadata=client.metadata)
    chunks = (chunk.data for chunk in calls)
    try:
        if local == "-":
            for data in chunks:
                sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return EXIT_OK
        into = local if os.path.isdir(local) else os.path.dirname(os.path.abspath(local))
        staging = tempfile_dir(into)
        try:
            done = unpack_tar(TarReader(lambda _size: next(chunks, b"")), staging,
                              into_job=False)
            if done["tops"] == ["."]:   # the job's whole folder: what it holds is the copy
                move_into_place(staging, local)
                return EXIT_OK
            names = os.listdir(staging)
            if len(names) != 1:
                raise ClientError(EXIT_ERROR, f"{job}:{path}: the copy held {len(names)} "
                                              f"entries, not one")
            target = os.path.join(local, names[0]) if os.path.isdir(local) else local
            move_into_place(os.path.join(staging, names[0]), target)
        finally:
            import shutil
            shutil.rmtree(staging, ignore_errors=True)
    except client.grpc.RpcError as e:
        raise client.error(e) from None
    except TarError as e:
        raise ClientError(EXIT_ERROR, f"cannot unpack {job}:{path}: {e}") from None
    except OSError as e:
        raise ClientError(EXIT_ERROR, f"cannot write {local}: {e.strerror or e}") from None
    return EXIT_OK


def tempfile_dir(folder):
    import tempfile
    try:
        return tempfile.mkdtemp(prefix=".steve-jobs-cp-", dir=folder)
    except OSError as e:
        raise ClientError(EXIT_ERROR, f"cannot write in {folder}: {e.strerror}") from None


def move_into_place(source, target):
    """Rename source to target; a folder onto a folder merges, what it holds replacing."""
    if os.path.isdir(source) and not os.path.islink(source) and os.path.isdir(target) \
            and not os.path.islink(target):
        for name in os.listdir(source):
            move_into_place(os.path.join(source, name), os.path.join(target, name))
        return
    os.replace(source, target)


def start_with_files(client, request, copies):
    """StartWithFiles: request, then one tar stream of every (local, path) of copies.
    Returns the JobStatus. Raises ClientError."""
    pb = client.pb
    upload = TarUpload(pb.StartWithFilesMessage(start=request), copies,
                       lambda data: pb.StartWithFilesMessage(data=data))
    return upload.call(client, client.stub.StartWithFiles)


def copy_into_job(client, local, job, path, as_json):
    """CopyIn of local (a file or a folder, as a tar stream of one top entry: written as
    path, or into it if it is a folder there), or of the tar stream on stdin ('-')."""
    if local != "-" and not os.path.lexists(local):
        raise ClientError(EXIT_USAGE, f"{local}: no such file or folder")
    if local != "-" and not (os.path.islink(local) or os.path.isfile(local)
                             or os.path.isdir(local)):
        raise ClientError(EXIT_USAGE, f"{local}: not a file, folder or link (sockets, FIFOs "
                                      f"and devices are not copied)")
    pb = client.pb
    first = pb.CopyInMessage(job_id=job, path=path, as_name=local != "-")
    copies = None if local == "-" else [(local, os.path.basename(os.path.abspath(local)))]
    upload = TarUpload(first, copies, lambda data: pb.CopyInMessage(data=data))
    summary = upload.call(client, client.stub.CopyIn)
    if as_json:
        print_json({"files": summary.files, "bytes": summary.bytes})
    return EXIT_OK


class TarUpload:
    """The requests of a copy in: first, then message(data) of a tar stream of copies'
    (local, name) pairs, made by a thread a few chunks ahead of the call (reading files
    overlaps sending them), or of stdin's bytes (copies None). A local file that cannot be
    read ends the stream short of its end blocks: the server refuses the copy, and call()
    says which file."""

    AHEAD = 4   # chunks made ahead of the call

    def __init__(self, first, copies, message):
        self.first, self.copies, self.message, self.failed = first, copies, message, None

    def call(self, client, method):
        """method's response to these requests. Raises ClientError."""
        try:
            return method(self.requests(), metadata=client.metadata)
        except client.grpc.RpcError as e:
            if self.failed:
                raise ClientError(EXIT_ERROR, f"cannot read {self.failed.filename or 'a file'}"
                                              f": {self.failed.strerror}") from None
            raise client.error(e) from None

    def requests(self):
        yield self.first
        if self.copies is None:
            while data := sys.stdin.buffer.read(CHUNK // 4):
                yield self.message(data)
            return
        import queue
        chunks = queue.Queue(self.AHEAD)
        threading.Thread(target=self._make, args=(chunks,), daemon=True).start()
        while (data := chunks.get()) is not None:
            yield self.message(data)

    def _make(self, chunks):
        try:
            for data in tar_chunks(self.copies, COPY_DATA_BYTES):
                chunks.put(data)
        except OSError as e:
            self.failed = e
        finally:   # (whatever stopped it: the stream ends, short of its end blocks)
            chunks.put(None)


def cmd_completion(args):
    """Print the completion script for args.shell."""
    script = COMPLETION_BASH % {
        "commands": "run list ps context completion token server " + " ".join(JOB_COMMANDS),
        "job_commands": "|".join(JOB_COMMANDS)}
    if args.shell == "zsh":
        script = "autoload -U +X bashcompinit && bashcompinit\n" + script
    sys.stdout.write(script)
    return EXIT_OK


# What each subcommand runs: those that talk to a server with a Client (cmd_client's),
# the others by themselves.
CLIENT_COMMANDS = {"run": cmd_run, "wait": cmd_wait, "list": cmd_list, "ps": cmd_list,
                   "stats": cmd_stats, "events": cmd_events,
                   "cp": cmd_cp, "exec": cmd_exec,
                   "output": cmd_output, "stream": cmd_output, "logs": cmd_output,
                   "attach": cmd_attach, **{name: cmd_job for name in (
                       "status", "pause", "resume", "stop", "kill", "rm")}}
LOCAL_COMMANDS = {"server": cmd_server, "token": cmd_token, "context": cmd_context,
                  "completion": cmd_completion}


###############################################################################
# main()
###############################################################################

def main(argv=None, exit_at_once=False):
    """Dispatch: hidden helper modes first (before anything imports grpc), then the CLI.

    Returns the exit code; with exit_at_once, a client command ends the process itself
    (exit_without_teardown).
    """
    if signal.getsignal(signal.SIGINT) is _exit_quietly_on_ctrl_c:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_spawner"]:
        return spawner_main(int(argv[1]), json.loads(argv[2]))
    args = None

    def parse():
        nonlocal args
        args = parse_command_line(argv)
        check_env_values(args)
        return cmd_client(args) if args.talks_to_server else args.run(args)
    code = report_errors(parse, json_errors="--json" in argv)
    if exit_at_once and getattr(args, "command", "") != "server":
        exit_without_teardown(code)
    return code


def parse_command_line(argv):
    """argv's Namespace, with what argparse cannot say itself: run --network alone still
    means the host's network (as before it took a MODE), so a word after it that is no
    mode is the command's (run --network make -j4); and exec ID -- PROG keeps its '--'.
    Raises ClientError."""
    args, extra = build_parser().parse_known_args(argv)
    mode = getattr(args, "network", "")
    if mode not in NETWORK_MODES:   # the first --network before the command took its word
        flags = argv[:len(argv) - len(args.cmd)]
        at = next((i for i, word in enumerate(flags[:-1]) if word == "--network" and
                   flags[i + 1] not in NETWORK_MODES and not flags[i + 1].startswith("-")),
                  None)
        if at is None:   # (--network=WORD: no command's word, a mode mistyped)
            raise ClientError(EXIT_USAGE, f"--network takes {', '.join(NETWORK_MODES[1:])}, "
                                          f"not {mode!r}")
        argv = [*argv[:at], "--network=host", *argv[at + 1:]]
    if extra or mode not in NETWORK_MODES:
        args = build_parser().parse_args(argv)   # (its errors, if any, as ever)
    if getattr(args, "network", "") == "none":
        args.network = ""
    keep_double_dash(args, argv)
    return args


def keep_double_dash(args, argv):
    """Put back the '--' that argparse drops before a command that follows a positional
    (exec ID -- PROG ARG...): without it the argv would be run by /bin/sh -c, joined."""
    words = getattr(args, "cmd", None)
    if words and words[0] != "--" and "--" in argv:
        after = argv[argv.index("--") + 1:]
        if after == list(words):
            args.cmd = ["--", *words]


def report_errors(command, json_errors=False):
    """Run command(); a ClientError becomes one line on stderr (a JSON object on stdout
    with json_errors), Ctrl-C a quiet exit 130. Returns the exit code."""
    try:
        return command()
    except ClientError as e:
        if json_errors:
            print_json(e.as_json())
        elif str(e):
            print(f"steve-jobs: {for_terminal(str(e))}", file=sys.stderr)
        return e.exit_code
    except ModuleNotFoundError as e:   # started outside the environment it was set up in
        print(f"steve-jobs: {sys.executable} has no module {e.name!r}: set up with "
              f"`python3 -m venv .venv && .venv/bin/pip install -r requirements.txt` and run "
              f".venv/bin/python steve_jobs.py (or `pip install .` for steve-jobs)",
              file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:   # e.g. `steve_jobs.py output ID | head`
        sys.stderr.close()
        return EXIT_OK


def console_main():
    """The `steve-jobs` command of an installed package (pyproject.toml)."""
    sys.exit(main(exit_at_once=True))


if __name__ == "__main__":
    console_main()
