"""pytest's configuration for test_steve_jobs.py: its test groups, registered as marks.

Each test carries one of these marks (@pytest.mark.kernel...), to run some groups alone:
pytest -m "kernel or e2e or hosts", as .ci/run does on its cgroup v2 VM. Registered, they
raise no unknown-mark warning. test_steve_jobs.py's docstring says more of each group.
"""

GROUPS = {
    "unit": "no root needed: parsing, validation, the cgroup v2 path against a fake cgroupfs",
    "kernel": "the job engine against the real kernel: real cgroups, namespaces, processes",
    "e2e": "a real server process over real mutual TLS on loopback",
    "security": "every way in: certificates, tokens, roles, TLS probes",
    "faults": "full disks, killed supervisors and servers, file handle limits, idle and "
              "stalled clients",
    "tenants": "what a hostile user can do to other users and to the host",
    "hosts": "the server in a delegated (systemd) or a container's cgroup, old kernels",
    "api": "the v1 API and CLI as docker, kubectl and ssh users use them",
    "sessions": "stdin, terminals, attach, recordings, traces and logs",
    "newcomer": "a fresh clone's Quickstart, two servers on one host, the usual mistakes",
    "files": "a job's files kept after it, copies in and out, exec, as users and hostile "
             "tenants",
    "batch": "a batch host: the queue, dependencies, deadlines, removal, metrics, events",
    "network": "egress networks: a remote host of the test's own, DNS, what the firewall "
               "refuses, restarts, a helper that dies, a host without the package",
    "scale": "hundreds of jobs at once through a real server: each one's exact end, restarts",
}


def pytest_configure(config):
    for name, about in GROUPS.items():
        config.addinivalue_line("markers", f"{name}: {about}")
