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


def state_dirs():
    try:
        return sorted(os.listdir("/run/jrun"))
    except FileNotFoundError:
        return []


@pytest.fixture(scope="session", autouse=True)
def _rootfs():
    if IS_ROOT and not os.path.isfile("/var/lib/jrun/rootfs/bin/busybox"):
        subprocess.run(JRUN + ["rootfs", "build"], check=True)
