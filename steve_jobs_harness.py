"""What the tests (test_steve_jobs.py) and the benchmarks (bench_steve_jobs.py) share.

Where the script is, grpc and the generated stubs (imported once), state folders removed
with what was mounted in them, free loopback ports, time
budgets stretched on slow machines, sets of certificates, a user's gRPC credentials and
channels (user_credentials, user_channel, bearer) and an OTLP trace collector in the
process: one copy of each, so that the benchmarks need not import the tests.

For tests and benchmarks only: not part of the product. pyproject.toml installs steve_jobs,
jobs_pb2 and jobs_pb2_grpc, not this file; pytest collects no tests here (its name does not
start with test_).
"""

import os
import socket
import subprocess
import sys

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
