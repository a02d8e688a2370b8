"""Shared helpers for jrun's tests.

Unit tests import jrun.py directly.  Integration tests are black-box: they
run the real jrun (this checkout's jrun.py under the interpreter that has its
dependencies, or $JRUN if set) as root on this kernel and observe from
outside.
"""
import os
import shlex
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

JRUN = shlex.split(os.environ.get("JRUN", "")) or [sys.executable, os.path.join(ROOT, "jrun.py")]
IS_ROOT = os.geteuid() == 0

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root and a real kernel")


def jrun(*args, input=None, timeout=60, check=None, **kw):
    """Run jrun with ARGS; return the CompletedProcess (text mode)."""
    p = subprocess.run(JRUN + [str(a) for a in args], input=input, capture_output=True,
                       text=True, timeout=timeout, **kw)
    if check is not None:
        assert p.returncode == check, "exit %d, wanted %d\nstdout: %s\nstderr: %s" % (
            p.returncode, check, p.stdout, p.stderr)
    return p


def jrun_in_pty(*args, input=b"", timeout=15):
    """Run jrun with ARGS on a new terminal; return (output, exit status)."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:
        os.execv(JRUN[0], JRUN + [str(a) for a in args])
    out = b""
    try:
        if input:
            os.write(fd, input)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return out, os.waitstatus_to_exitcode(status)


def sh(script, *opts, **kw):
    """Run a busybox sh script in a job with --net none unless opts say otherwise."""
    if not any(str(o).startswith("--net") for o in opts):
        opts = ("--net", "none") + tuple(opts)
    return jrun(*opts, "--", "/bin/sh", "-c", script, **kw)


def rmdir_when_empty(path, tries=200):
    """rmdir a cgroup (whose files cannot be unlinked) once its last
    process is gone: the kernel refuses it (EBUSY) until then."""
    for _ in range(tries):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)


def state_dirs():
    try:
        return sorted(os.listdir("/run/jrun"))
    except FileNotFoundError:
        return []


def pytest_configure(config):
    config.addinivalue_line("markers", "guest_only: runs jrun only inside a VM; touches nothing of the host")


_lane_modules = []


@pytest.hookimpl(trylast=True)  # after -k and --deselect
def pytest_collection_modifyitems(config, items):
    """The guest_only tests (the UML lanes) run last, and their guests boot in
    the background from now on (their module's start_lanes), while the
    host's tests run."""
    lanes = [item for item in items if item.get_closest_marker("guest_only")]
    if not lanes:
        return
    items[:] = [item for item in items if not item.get_closest_marker("guest_only")] + lanes
    module = lanes[0].module
    if hasattr(module, "start_lanes"):
        _lane_modules.append(module)
        module.start_lanes()


@pytest.fixture(scope="session", autouse=True)
def _rootfs():
    if IS_ROOT and not os.path.isfile("/var/lib/jrun/rootfs/bin/busybox"):
        subprocess.run(JRUN + ["rootfs", "build"], check=True)


# --- nothing of jrun is left on the host: checked around every test ------------
#
# What jrun makes on the host, listed cheaply (a few listdirs and one read of
# mountinfo, ~1 ms; the nft table costs one `nft` run, ~5 ms, after each test
# only: the state before a test is the one after the previous test).  A test
# that leaves something is named; one that deliberately leaves a job for gc
# must run gc itself.  What may stay is exactly an idle network (jrun keeps
# it for network-idle, as docker keeps docker0): its bridge, its file with no
# lease, and jrun's nft table, each whole; never a lease, a veth (the kernel
# deletes it with the job's network namespace, shortly after the job: the
# check waits for that) or anything of a job.  A test marked guest_only (it runs jrun in a VM of its
# own) touches nothing of the host: it is not checked, and needs no host lock.


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


def _cgroup_hierarchies():
    with open("/proc/self/mounts") as f:
        return sorted({line.split()[1] for line in f if line.split()[2] in ("cgroup", "cgroup2")})


_HIERARCHIES = _cgroup_hierarchies()


def _nft_table():
    p = subprocess.run(["nft", "list", "table", "inet", "jrun"], capture_output=True)
    return {"nft table inet jrun"} if p.returncode == 0 else set()


def jrun_objects():
    """Every object of jrun on this host now, by kind and name: state
    directories and network files, job cgroups and jrun's subtrees, job
    veths and jrun bridges ('jr*' links), mounts of jobs."""
    found = {"state " + n for n in _listdir("/run/jrun")}
    for n in _listdir("/run/jrun/.net"):
        found.add("network file " + n)
        try:
            with open(os.path.join("/run/jrun/.net", n)) as f:
                found |= {"%s of network %s" % (line.strip(), n) for line in f if line.startswith("lease ")}
        except OSError:
            pass
    for h in _HIERARCHIES:
        sub = os.path.join(h, "jrun")
        if os.path.isdir(sub):
            found.add("cgroup " + sub)
            found |= {"cgroup " + os.path.join(sub, n) for n in _listdir(sub) if os.path.isdir(os.path.join(sub, n))}
    found |= {"link " + n for n in _listdir("/sys/class/net") if n.startswith("jr")}
    with open("/proc/self/mountinfo") as f:
        found |= {"mount " + line.split()[4] for line in f if "/run/jrun" in line or " jrun-" in line}
    return found


def idle_networks(objects):
    """The objects that make up idle networks, if they are whole: every jrun
    bridge with its network file and the other way round, and jrun's nft
    table exactly when there is a network.  (Leases are objects of their own.)"""
    files = {o.split()[-1] for o in objects if o.startswith("network file ")}
    bridges = {o.split()[-1] for o in objects if o.startswith("link jrun")}
    if files != bridges or ("nft table inet jrun" in objects) != bool(files):
        return set()
    return {o for o in objects if o.startswith(("network file ", "link jrun", "nft table "))} | (
        {"state .net"} if files else set())  # their directory


def job_links():
    """The job veths on the host ('jr' + 10 hex; bridges are 'jrun...'),
    after waiting up to 5 s for those whose namespace died: the kernel
    deletes a veth in its cleanup of the namespace, shortly after the job."""
    deadline = time.monotonic() + 5
    while True:
        veths = {n for n in _listdir("/sys/class/net") if n.startswith("jr") and not n.startswith("jrun")}
        if not veths or time.monotonic() > deadline:
            return veths
        time.sleep(0.02)


def network_leftovers():
    """What jobs left of the networks: veths, leases, and networks that are
    not whole and idle; empty when the networks are as jrun keeps them."""
    veths = job_links()  # first: waits for the veths of ended jobs
    objs = jrun_objects() | _nft_table()
    net = {o for o in objs if o.startswith(("network file ", "lease ", "link ", "nft table "))}
    return veths | (net - idle_networks(objs))


_last = {}


@pytest.fixture(autouse=True)
def _leaves_nothing_of_jrun(request):
    if not IS_ROOT or request.node.get_closest_marker("guest_only"):
        yield
        return
    if "nft" not in _last:
        _last["nft"] = _nft_table()
        _last["session"] = jrun_objects() | _last["nft"]
    before = jrun_objects() | _last["nft"]
    yield
    # A jrun the test ended may still be tearing down; a veth goes when the
    # kernel's cleanup of its namespace has run.
    deadline = time.monotonic() + 5
    while True:
        _last["nft"] = _nft_table()
        now = jrun_objects() | _last["nft"]
        left = now - before - idle_networks(now)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if left:
        pytest.fail("%s left on the host: %s" % (request.node.nodeid, ", ".join(sorted(left))), pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    """What no single test left, but the session did (a fixture's job)."""
    for module in _lane_modules:
        module.stop_lanes()
    if not IS_ROOT or "session" not in _last:
        return
    now = jrun_objects() | _nft_table()
    left = now - _last["session"] - idle_networks(now)
    if left:
        session.config.get_terminal_writer().line(
            "jrun objects left on the host by the session (outside any test): %s" % ", ".join(sorted(left)), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
