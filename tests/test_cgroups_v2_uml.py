"""The cgroup battery on a real cgroup-v2 kernel (and on a second v1 layout).

The dev host runs cgroup v1, so this boots Debian's user-mode-linux (a 6.1
kernel that runs as an ordinary process, cpu, io, memory and pids in cgroup2)
and runs test_cgroups.py and test_cgroups_unit.py inside it, against this
checkout's jrun.py, then test_zz_leftovers.py (nothing left on the guest).
A second boot lays the same kernel's controllers out as cgroup v1 the way
systemd does (cpu and cpuacct co-mounted), which the dev host cannot show.

The guest's root is the host's / over hostfs, mounted READ-ONLY (hostfs
writes through to the host's disk); everything the guest writes goes to its
own tmpfs (/run, /tmp, /dev/shm).  The job's rootfs lower layer must sit on a
block device for --io-bps to have a disk to throttle, so the host's rootfs is
copied into an ext2 image (mke2fs -d, no root needed) given to the guest as
ubd0 and mounted read-only on /var/lib/jrun/rootfs.  Results come back on the
console: pytest's -rA lines between markers.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import IS_ROOT, ROOT

UML = "/usr/bin/linux.uml"
UML_MODULES = "/usr/lib/uml/modules"
ROOTFS = "/var/lib/jrun/rootfs"
GUEST_TESTS = ["tests/test_cgroups_unit.py", "tests/test_cgroups.py"] + [
    "tests/test_integrity_dev.py::" + t for t in (  # the device allow-list of each layout, and the budget
        "test_a_hostile_job_cannot_change_the_hosts_device_nodes",
        "test_the_device_allow_list_refuses_what_the_job_makes_with_mknod",
        "test_mknod_is_refused_where_no_allow_list_can_be_set",
        "test_the_ebpf_device_program_allows_the_jobs_nodes_only",
        "test_one_budget_bounds_all_the_writable_space")] + ["tests/test_zz_leftovers.py"]
BOOT_TIMEOUT = 600

INIT = r"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp PYTHONDONTWRITEBYTECODE=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
{cgroups}
mount -t tmpfs tmpfs /run
# The checkout may live under /tmp (CI clones anywhere): keep it reachable
# before /tmp gets the guest's own tmpfs.
mkdir /run/checkout && mount --bind {worktree} /run/checkout
for d in /tmp /var/log; do mount -t tmpfs tmpfs $d; done
mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm
# overlayfs is a module in this kernel; kmod may not be installed, and
# finit_module(2) is all insmod would do.
for m in $(find {modules} -name overlay.ko); do
    {python} -c 'import ctypes, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY)
sys.exit(ctypes.CDLL(None, use_errno=True).syscall(313, fd, b"", 0) != 0)' $m || echo "UML-NO-OVERLAY $m"
done
mount -t ext2 -o ro /dev/ubda {rootfs}
echo "UML-READY kernel $(uname -r) cgroups: $(grep -o 'cgroup2\? [^ ]*' /proc/mounts | tr '\n' ' ')cpus: $(nproc)"
cd /run/checkout
# jrun verify on this cgroup layout (no network modules in the guest: --net none)
{python} jrun.py verify --net none 2>&1
echo "UML-VERIFY $?"
t0=$(cut -d' ' -f1 /proc/uptime)
{python} -m pytest -q -rA --color=no -p no:cacheprovider {tests} 2>&1
rc=$?
echo "UML-RESULT $rc seconds $(echo $t0 $(cut -d' ' -f1 /proc/uptime) | awk '{{print $2-$1}}')"
echo o > /proc/sysrq-trigger
sleep 30  # init must not exit before the power-off: that is a kernel panic
"""


# The guest's cgroup layout: a pure cgroup2 host (what most users run), and
# a v1 host laid out as systemd does it (cpu and cpuacct co-mounted), which
# the dev host (one controller per hierarchy) cannot show.
LAYOUTS = {
    "v2": "mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup",
    "v1-comounted": "mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup\n"
                    "for c in cpu,cpuacct memory pids blkio; do mkdir /sys/fs/cgroup/$c; "
                    "mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c; done\n"
                    "ln -s cpu,cpuacct /sys/fs/cgroup/cpu; ln -s cpu,cpuacct /sys/fs/cgroup/cpuacct",
}


def _boot(tmp_path, layout):
    image = tmp_path / "rootfs.ext2"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext2", "-d", ROOTFS, str(image), "64M"], check=True,
                   env=dict(os.environ, PATH="/usr/sbin:/sbin:" + os.environ.get("PATH", "")))
    if os.uname().machine != "x86_64":
        pytest.skip("user-mode-linux here is x86_64 only")
    init = tmp_path / "init.sh"
    init.write_text(INIT.format(cgroups=LAYOUTS[layout], modules=UML_MODULES, rootfs=ROOTFS, worktree=ROOT, python=sys.executable,
                                tests=" ".join(GUEST_TESTS)))
    init.chmod(0o755)
    argv = [UML, "mem=768M", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "ro",
            "ubd0r=%s" % image, "init=%s" % init, "con=null", "con0=fd:0,fd:1", "quiet"]
    t = time.monotonic()
    # Its own session: on timeout exactly the UML processes started here are
    # killed (UML forks helpers of its own), by process group id.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True, cwd=str(tmp_path),
                            env=dict(os.environ, TMPDIR=str(tmp_path)))
    try:
        console, _ = proc.communicate(timeout=BOOT_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        console, _ = proc.communicate()
        pytest.fail("the UML guest did not finish in %ds:\n%s" % (BOOT_TIMEOUT, console[-4000:]))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return console, time.monotonic() - t


@pytest.mark.skipif(not IS_ROOT, reason="needs root (jrun inside the guest runs as the guest's root)")
@pytest.mark.skipif(not os.path.exists(UML), reason="%s missing (apt-get install user-mode-linux)" % UML)
@pytest.mark.skipif(not shutil.which("mke2fs", path="/usr/sbin:/sbin:/usr/bin"), reason="mke2fs missing")
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cgroup_battery_in_a_uml_guest(tmp_path, layout):
    console, took = _boot(tmp_path, layout)
    ready = re.search(r"UML-READY .*", console)
    assert ready, "the guest did not come up:\n" + console[-4000:]
    if layout == "v2":
        assert "cgroup2 /sys/fs/cgroup " in ready.group(0)
    else:
        assert "cgroup /sys/fs/cgroup/cpu,cpuacct " in ready.group(0)
    result = re.search(r"UML-RESULT (\d+) seconds ([\d.]+)", console)
    assert result, "no result from the guest:\n" + console[-6000:]
    outcomes = re.findall(r"^(PASSED|FAILED|ERROR|SKIPPED) (\S+)", console, re.M)
    summary = [line for line in console.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    sys.stderr.write("\nUML %s lane: boot+tests %.1fs (tests %ss in the guest); %s; %s\n"
                     % (layout, took, result.group(2), ready.group(0), summary[-1] if summary else "no summary"))
    failed = [name for kind, name in outcomes if kind in ("FAILED", "ERROR")]
    verify = re.search(r"UML-VERIFY (\d+)", console)
    sys.stderr.write("jrun verify in the %s guest:\n%s\n" % (layout, "\n".join(
        line for line in console.splitlines() if line.startswith(("\u2705", "\u274c", "\u26a0")) or " checks: " in line)))
    assert verify and verify.group(1) == "0", "jrun verify failed in the %s guest:\n%s" % (layout, console[-8000:])
    assert re.search(r"^\d+ checks: \d+ passed, 0 failed", console, re.M), console[-8000:]
    for check in ("Memory limit", "PIDs limit", "CPU limit", "cgroup membership", "I/O limit", "Seccomp",
                  "Device nodes"):
        assert re.search("^\u2705 %s " % check, console, re.M), "verify's %s check did not pass in the %s guest" % (
            check, layout)
    assert result.group(1) == "0" and not failed, "failed in the guest: %s\n%s" % (failed, console[-8000:])
    passed = [name for kind, name in outcomes if kind == "PASSED"]
    # The battery really ran: the limits' own tests passed on v2.
    for must in ("test_memory_over_limit_is_oom_killed_137", "test_cpu_50_uses_half_a_cpu",
                 "test_fork_bomb_is_contained_and_jrun_returns", "test_io_bps_throttles_direct_reads",
                 "test_job_sees_its_own_cgroup_read_only", "test_gc_removes_the_cgroup_of_a_killed_jrun",
                 "test_cgroup_parent_places_the_job_under_it", "test_an_existing_cgroup_is_refused_and_left_alone",
                 "test_one_budget_bounds_all_the_writable_space") + (
            # v2's allow-list, the eBPF program; this v1 layout mounts no devices hierarchy.
            ("test_the_device_allow_list_refuses_what_the_job_makes_with_mknod",
             "test_the_ebpf_device_program_allows_the_jobs_nodes_only") if layout == "v2" else
            ("test_mknod_is_refused_where_no_allow_list_can_be_set",)):
        assert any(must in name for name in passed), "%s did not pass in the %s guest" % (must, layout)
