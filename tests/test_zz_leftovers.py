"""Runs last: the suite must leave nothing of jrun behind on the host."""
import glob
import os

from conftest import jrun, needs_root, state_dirs

pytestmark = needs_root


def test_no_state_left():
    assert state_dirs() == []


def test_no_mount_left():
    with open("/proc/self/mountinfo") as f:
        leftovers = [line for line in f if "/run/jrun" in line or "jrun-" in line]
    assert leftovers == []


def test_no_job_cgroup_left():
    left = [d for d in glob.glob("/sys/fs/cgroup/**/jrun/*", recursive=True) if os.path.isdir(d)]
    assert left == []
    # jrun's shared parent goes with the last job that used it
    assert glob.glob("/sys/fs/cgroup/jrun") + glob.glob("/sys/fs/cgroup/*/jrun") == []


def test_no_job_veth_left():
    left = [n for n in os.listdir("/sys/class/net") if n.startswith("jr") and not n.startswith("jrun")]
    assert left == []


def test_gc_has_nothing_to_do():
    p = jrun("gc", check=0)
    assert p.stderr == ""
