"""What the tests (test_steve_jobs.py) and the benchmarks (bench_steve_jobs.py) share.

Where the script is, grpc and the generated stubs (imported once), state folders removed
with what was mounted in them, free loopback ports, time
budgets stretched on slow machines, sets of certificates, a user's gRPC credentials and
channels (user_credentials, user_channel, bearer), an OTLP trace collector in the
process, and a remote host in a network namespace for egress jobs (RemoteHost): one copy
of each, so that the benchmarks need not import the tests.

For tests and benchmarks only: not part of the product. pyproject.toml installs steve_jobs,
jobs_pb2 and jobs_pb2_grpc, not this file; pytest collects no tests here (its name does not
start with test_).
"""

import os
import shutil
import socket
import subprocess
import sys
import uuid

import steve_jobs as sj

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable
SCRIPT = os.path.join(HERE, "steve_jobs.py")

# grpc and the generated stubs, imported once, as the CLI imports them (aio=False also keeps
# grpc's own log to errors, GRPC_VERBOSITY=ERROR, in this process and what it starts);
# importing grpc imports grpc.aio with it.
grpc, pb, pb_grpc = sj.import_grpc(aio=False)


def scaled(seconds):
    """A time budget, stretched by STEVE_JOBS_TIME_SCALE on slow machines."""
    return seconds * sj.TIME_SCALE


def mounts_under(folder):
    """Mount points at or below folder, in this process's mount namespace."""
    folder = os.path.realpath(folder)
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")   # \040 is a space
            if point == folder or point.startswith(folder + "/"):
                points.append(point)
    return points


def remove_state_dir(state_dir):
    """Remove a server's state folder: first what it mounted there (jobs' working folders,
    which outlive their jobs, and work/ bound onto itself)."""
    import contextlib
    import shutil
    points = mounts_under(state_dir)
    while points:   # one at a time, the last made first (mounts may be stacked)
        with contextlib.suppress(OSError):
            sj.umount_lazy(points[-1])
        left = mounts_under(state_dir)
        if len(left) >= len(points):
            break   # (not ours to remove, whatever it is: the caller's check says so)
        points = left
    shutil.rmtree(state_dir, ignore_errors=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cert_set(directory, users=("mrarsenal:admin", "alice:user", "rita:reader")):
    """A CA, a server certificate and each USER:ROLE's certificate and token (gen_certs.sh)
    in directory; returns directory."""
    env = {**os.environ, "PYTHON": PYTHON}
    subprocess.run(["bash", os.path.join(HERE, "gen_certs.sh"), "--dir", directory, *users],
                   check=True, capture_output=True, env=env)
    return directory


def _read(path, mode="rb"):
    with open(path, mode) as f:
        return f.read()


def bearer(certs_dir, user="mrarsenal"):
    """gRPC metadata carrying user's token from the certificate folder."""
    return (("authorization", "Bearer " + _read(os.path.join(certs_dir, f"{user}.jwt"), "r")
             .strip()),)


def user_credentials(certs_dir, user="mrarsenal", ca_dir=None, cert=None, key=None):
    """(channel credentials, call metadata) of user in certs_dir: their certificate and key
    there (or cert and key, PEM bytes: a pair made elsewhere), trusting the CA of ca_dir
    (default: certs_dir's), and their token (bearer(); no metadata, (), when certs_dir holds
    none for user)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(os.path.join(ca_dir or certs_dir, "ca.crt")),
        private_key=key if key is not None else _read(os.path.join(certs_dir, f"{user}.key")),
        certificate_chain=cert if cert is not None else _read(os.path.join(certs_dir,
                                                                           f"{user}.crt")))
    has_token = os.path.exists(os.path.join(certs_dir, f"{user}.jwt"))
    return credentials, bearer(certs_dir, user) if has_token else ()


def user_channel(certs_dir, address, user="mrarsenal", aio=False, options=None, **keys):
    """A channel to address with user_credentials(certs_dir, user, **keys) (ca_dir=, cert=,
    key=); aio: a grpc.aio channel; options: a stock client's channel options, a dict (e.g.
    the 4 MiB "grpc.max_receive_message_length" of any gRPC client). Calls on it carry no
    token: pass bearer(certs_dir, user) as their metadata."""
    credentials, _ = user_credentials(certs_dir, user, **keys)
    return (grpc.aio if aio else grpc).secure_channel(
        address, credentials, options=list(options.items()) if options else None)


class SpanCollector:
    """An OTLP/gRPC trace collector in this process, on loopback: what a server exports."""

    def __init__(self):
        import concurrent.futures
        from opentelemetry.proto.collector.trace.v1 import (trace_service_pb2,
                                                           trace_service_pb2_grpc)
        spans, self.spans = [], []

        class Collector(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        spans.extend(scope.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.spans = spans
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def env(self):
        """What an operator sets for the server to export here."""
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
                "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "50"}

    def named(self, name, trace_id=None):
        return [s for s in list(self.spans) if s.name == name
                and (trace_id is None or s.trace_id.hex() == trace_id)]

    def close(self):
        self.server.stop(0)


# -- a remote host for egress jobs ---------------------------------------------------
#
# A network namespace of the test's (or benchmark's) own, joined to the host by a veth
# pair on 198.51.100.0/24 (TEST-NET-2; this machine's own network is never touched): a TCP
# echo server on port REMOTE_PORT of all its addresses, a sink on SINK_PORT (reads to EOF,
# answers the byte count), a DNS responder answering names in .test with REMOTE_ADDRESS,
# and two addresses the jobs must not reach: 169.254.169.254 (a cloud's metadata
# endpoint) and DENIED_ADDRESS (in the servers' --egress-deny range).

REMOTE_ADDRESS, HOST_SIDE, DENIED_ADDRESS = "198.51.100.2", "198.51.100.1", "198.51.100.200"
METADATA_ADDRESS, REMOTE_PORT, DENIED_RANGE = "169.254.169.254", 7777, "198.51.100.128/25"
SINK_PORT = 7778
REMOTE_SERVICES = r"""
import socket, struct, threading
def sink(conn):
    with conn:
        total = 0
        while data := conn.recv(1 << 20):
            total += len(data)
        conn.sendall(str(total).encode())
def sink_server():
    with socket.create_server(("0.0.0.0", %d), backlog=64) as s:
        while True:
            threading.Thread(target=sink, args=(s.accept()[0],), daemon=True).start()
def echo(conn):
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)
def tcp():
    with socket.create_server(("0.0.0.0", %d), backlog=64) as s:
        while True:
            threading.Thread(target=echo, args=(s.accept()[0],), daemon=True).start()
def dns():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 53))
    while True:
        query, peer = s.recvfrom(512)
        labels, at = [], 12
        while query[at]:
            labels.append(query[at + 1:at + 1 + query[at]].decode()); at += 1 + query[at]
        question = query[12:at + 5]
        known = labels[-1:] == ["test"] and query[at + 1:at + 3] == b"\x00\x01"
        flags = 0x8180 if known else 0x8183
        head = query[:2] + struct.pack(">HHHHH", flags, 1, int(known), 0, 0)
        answer = (b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) +
                  socket.inet_aton("%s")) if known else b""
        s.sendto(head + question + answer, peer)
threading.Thread(target=dns, daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
threading.Thread(target=sink_server, daemon=True).start()
print("ready", flush=True)
import sys; sys.stdin.read()
""" % (SINK_PORT, REMOTE_PORT, REMOTE_ADDRESS)


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def remove_egress_firewall(state_dir):
    """Delete the nftables table a server on state_dir made for egress jobs, if any."""
    if shutil.which("nft"):
        table = sj.EgressFirewall(state_dir, 0, ()).table
        subprocess.run(["nft", "delete", "table", *table.split()], capture_output=True)


class RemoteHost:
    """`with RemoteHost() as netns:` the remote host's namespace, its veth pair and its
    services, all removed at the end however it comes."""

    def __enter__(self):
        tag = uuid.uuid4().hex[:6]
        self.netns, self.host_if, remote_if = f"sjtest-{tag}", f"sjt{tag}h", f"sjt{tag}r"
        self.services = None
        try:
            ip("netns", "add", self.netns)
            ip("link", "add", self.host_if, "type", "veth", "peer", "name", remote_if)
            ip("link", "set", remote_if, "netns", self.netns)
            ip("addr", "add", f"{HOST_SIDE}/24", "dev", self.host_if)
            ip("link", "set", self.host_if, "up")
            # (a host route for the metadata address, to this namespace only: a job's
            # packets there, were the firewall to let them pass, stay on this machine)
            ip("route", "add", f"{METADATA_ADDRESS}/32", "via", REMOTE_ADDRESS,
               "dev", self.host_if)
            inside = ["ip", "netns", "exec", self.netns]
            for command in (["ip", "link", "set", "lo", "up"],
                            ["ip", "addr", "add", f"{REMOTE_ADDRESS}/24", "dev", remote_if],
                            ["ip", "addr", "add", f"{DENIED_ADDRESS}/24", "dev", remote_if],
                            ["ip", "addr", "add", f"{METADATA_ADDRESS}/32", "dev", remote_if],
                            ["ip", "link", "set", remote_if, "up"]):
                subprocess.run([*inside, *command], check=True, capture_output=True)
            self.services = subprocess.Popen([*inside, PYTHON, "-c", REMOTE_SERVICES],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            if self.services.stdout.readline() != b"ready\n":
                raise RuntimeError("the remote host's services did not start")
            return self.netns
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc):
        if self.services:
            self.services.kill()
            self.services.wait()
        ip("link", "del", self.host_if, check=False)   # (its peer goes with it)
        ip("netns", "del", self.netns, check=False)
