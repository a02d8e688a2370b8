"""The cgroup battery on a real cgroup-v2 kernel (and on a second v1 layout).

The dev host runs cgroup v1, so this boots Debian's user-mode-linux (a 6.1
kernel that runs as an ordinary process, cpu, io, memory and pids in cgroup2)
and runs test_cgroups.py and test_cgroups_unit.py inside it, against this
checkout's jrun.py; conftest.py's leftover check runs there too.  A second
boot lays the same kernel's controllers out as cgroup v1 the way systemd does
(cpu and cpuacct co-mounted), which the dev host cannot show.  The guests boot
one after the other in the background while the host's tests run (see
start_lanes); their tests run last and wait for them.  In each guest
`jrun verify` runs in its default mode, and in the v2 guest also with every
other run option that changes what it judges (--rootfs host --init
--read-only --userns --user and a read-only volume, at once).

The guest's root is the host's / over hostfs, mounted READ-ONLY (hostfs
writes through to the host's disk); everything the guest writes goes to its
own tmpfs (/run, /tmp, /dev/shm).  The job's rootfs lower layer must sit on a
block device for --io-bps to have a disk to throttle, and on a filesystem that
can be idmapped (--userns), so the host's rootfs is copied into an ext4 image
(mke2fs -d, no root needed) given to the guest as ubd0 and mounted read-only
on /var/lib/jrun/rootfs.  Kernel modules (overlayfs, veth, bridge, nftables)
are loaded from /usr/lib/uml/modules in the order modules.dep gives.

The network battery (test_network.py) runs where the guest's kernel can hold
jrun's firewall, an nftables table of the inet family with a NAT chain.
Debian's UML kernel (6.1um4) cannot: it is built without NF_TABLES_INET,
NF_TABLES_IPV4/IPV6 and NFT_NAT (only the bridge family is there), so there
the lane checks instead that jrun refuses a networked job (125, naming nft)
and leaves nothing.  Results come back on the console: pytest's -rA lines
between markers.  Nothing of the host is touched (guest_only): the lane needs
no host lock.
"""
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

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
        "test_one_budget_bounds_all_the_writable_space")]
# The network battery, where the guest's kernel can hold jrun's firewall.
GUEST_NET_TESTS = ["tests/test_network.py"]
BOOT_TIMEOUT = 600

# Loads kernel modules with finit_module(2), each after those it needs
# (modules.dep): kmod may not be installed, and that is all insmod does.
LOADER = r"""
import ctypes, errno, os, sys
base, wanted = sys.argv[1], sys.argv[2:]
deps = {}
for line in open(os.path.join(base, "modules.dep")):
    mod, _, rest = line.partition(":")
    deps[os.path.basename(mod)[:-3]] = (mod, rest.split())
done = []
def load(name):
    if name in done:
        return
    path, needs = deps[name]
    for dep in reversed(needs):
        load(os.path.basename(dep)[:-3])
    fd = os.open(os.path.join(base, path), os.O_RDONLY | os.O_CLOEXEC)
    if ctypes.CDLL(None, use_errno=True).syscall(313, fd, b"", 0) and ctypes.get_errno() != errno.EEXIST:
        print("UML-NO-MODULE", name, os.strerror(ctypes.get_errno()))
    os.close(fd)
    done.append(name)
for name in wanted:
    load(name)
print("UML-MODULES", " ".join(done))
"""
# overlayfs for the jobs' roots; the network's devices and nftables with
# what jrun's table uses (conntrack for 'ct state', NAT for 'masquerade').
MODULES = "overlay veth bridge nf_tables nft_ct nft_masq"

INIT = r"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp PYTHONDONTWRITEBYTECODE=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
{cgroups}
mount -t tmpfs tmpfs /run
# The checkout may live under /tmp (CI clones anywhere): keep it reachable
# before /tmp gets the guest's own tmpfs; the same for this lane's files.
mkdir /run/checkout /run/lane && mount --bind {worktree} /run/checkout && mount --bind {lane} /run/lane
{python} /run/lane/loadmods.py {modules}/$(uname -r) {module_names}
for d in /tmp /var/log; do mount -t tmpfs tmpfs $d; done
mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm
mount -t ext4 -o ro /dev/ubda {rootfs}
# jrun's firewall is an nftables table of the inet family: can this kernel hold one?
net=none; nft add table inet jrun-probe 2>&1 && nft delete table inet jrun-probe && net=bridge
echo "UML-NFT-INET $net"
echo "UML-READY kernel $(uname -r) cgroups: $(grep -o 'cgroup2\? [^ ]*' /proc/mounts | tr '\n' ' ')cpus: $(nproc)"
cd /run/checkout
# Without its firewall jrun must refuse a networked job, cleanly.
if [ $net = none ]; then
    echo "UML-NET-REFUSED $( ({python} jrun.py -- true 2>&1; echo "exit $?") | tr '\n' ' ')left: $(ls -A /run/jrun 2>/dev/null)"
fi
# --userns needs an idmapped mount of the rootfs: tmpfs has none before 6.3.
cp -a {rootfs} /tmp/tmpfs-root
echo "UML-USERNS-TMPFS $( ({python} jrun.py --net none --userns --rootfs /tmp/tmpfs-root -- true 2>&1; echo "exit $?") | tr '\n' ' ')"
# jrun verify on this cgroup layout: its default mode, then the other modes
# the run options make, in one run (the minimal rootfs and --rootfs PATH take
# the same path: an overlay of a directory).
# The network and the other modes do not depend on the cgroup layout: the v2
# lane runs them (and the network battery), the v1 lane its default mode.
modes="--net none"
[ {layout} = v2 ] && modes="--net $net|--net none --rootfs host --init --read-only --userns --user 1000 -v /run/checkout/tests:/data:ro"
IFS='|'; set -- $modes; unset IFS
for mode in "$@"; do
    echo "UML-VERIFY-MODE $mode"
    {python} jrun.py verify $mode 2>&1
    echo "UML-VERIFY $? $mode"
done
tests="{tests}"
[ $net = bridge ] && [ {layout} = v2 ] && tests="$tests {net_tests}"
t0=$(cut -d' ' -f1 /proc/uptime)
{python} -m pytest -q -rA --color=no -p no:cacheprovider $tests 2>&1
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
    image = tmp_path / "rootfs.ext4"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", ROOTFS, str(image), "64M"], check=True,
                   capture_output=True,
                   env=dict(os.environ, PATH="/usr/sbin:/sbin:" + os.environ.get("PATH", "")))
    if os.uname().machine != "x86_64":
        pytest.skip("user-mode-linux here is x86_64 only")
    init = tmp_path / "init.sh"
    (tmp_path / "loadmods.py").write_text(LOADER)
    init.write_text(INIT.format(cgroups=LAYOUTS[layout], modules=UML_MODULES, module_names=MODULES, rootfs=ROOTFS,
                                worktree=ROOT, lane=tmp_path, python=sys.executable, tests=" ".join(GUEST_TESTS), layout=layout,
                                net_tests=" ".join(GUEST_NET_TESTS)))
    init.chmod(0o755)
    argv = [UML, "mem=768M", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "ro",
            "ubd0r=%s" % image, "init=%s" % init, "con=null", "con0=fd:0,fd:1", "quiet"]
    t = time.monotonic()
    # Its own session: on timeout exactly the UML processes started here are
    # killed (UML forks helpers of its own), by process group id.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True, cwd=str(tmp_path),
                            env=dict(os.environ, TMPDIR=str(tmp_path)))
    _guests.add(proc)
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
        _guests.discard(proc)
    return console, time.monotonic() - t


# The lanes run in the background from the moment pytest has collected them
# (conftest.py calls start_lanes, and runs their tests last), one guest after
# the other, while the host's tests run: a guest keeps one CPU busy for two or
# three minutes, and the host's tests leave one mostly idle (two guests at
# once would starve the timing tests of the host and of each guest).
_lanes = {}
_guests = set()  # the guests running now, killed if the session ends first


def _can_boot():
    return (IS_ROOT and os.path.exists(UML) and os.uname().machine == "x86_64"
            and shutil.which("mke2fs", path="/usr/sbin:/sbin:/usr/bin") is not None
            and os.path.isfile(os.path.join(ROOTFS, "bin", "busybox")))


def _boot_or_exception(tmp_path, layout):
    try:
        return _boot(tmp_path, layout)
    except BaseException as e:  # pytest's skip and fail are BaseExceptions
        return e


def start_lanes():
    if _lanes or not _can_boot():
        return
    _lanes["dir"] = tempfile.mkdtemp(prefix="jrun-uml-")
    pool = ThreadPoolExecutor(1)
    for layout in sorted(LAYOUTS):
        lane = pathlib.Path(_lanes["dir"], layout)
        lane.mkdir()
        _lanes[layout] = pool.submit(_boot_or_exception, lane, layout)
    pool.shutdown(wait=False)


def stop_lanes():
    for proc in list(_guests):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if "dir" in _lanes:
        shutil.rmtree(_lanes["dir"], ignore_errors=True)


@pytest.fixture(scope="module")
def guests():
    """Each layout's console and time, or what its boot raised (a skip, a
    failure), for its own test to raise."""
    start_lanes()
    return {layout: _lanes[layout].result() for layout in LAYOUTS}


@pytest.mark.guest_only
@pytest.mark.skipif(not IS_ROOT, reason="needs root (jrun inside the guest runs as the guest's root)")
@pytest.mark.skipif(not os.path.exists(UML), reason="%s missing (apt-get install user-mode-linux)" % UML)
@pytest.mark.skipif(not shutil.which("mke2fs", path="/usr/sbin:/sbin:/usr/bin"), reason="mke2fs missing")
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cgroup_battery_in_a_uml_guest(guests, layout):
    booted = guests[layout]
    if isinstance(booted, BaseException):
        raise booted
    console, took = booted
    ready = re.search(r"UML-READY .*", console)
    if not ready and "ptrace set fp regs failed" in console:
        # UML 6.1 keeps its processes' FPU state in a buffer of a fixed size
        # (PTRACE_SETREGSET, NT_X86_XSTATE); a host kernel takes that state
        # only whole, and a CPU with AMX has a larger one (11 KB): every
        # SETREGSET fails with EFAULT and the guest's init dies.  Nothing
        # short of another UML kernel (6.9 sizes it at boot) runs there.
        amx = "amx_tile" in open("/proc/cpuinfo").read()
        pytest.skip("user-mode-linux 6.1 cannot run processes on this CPU%s (ptrace set fp regs failed, "
                    "errno 14): the cgroup lane needs a host without that" % (" (AMX)" if amx else ""))
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
    sys.stderr.write("jrun verify in the %s guest:\n%s\n" % (layout, "\n".join(
        line for line in console.splitlines() if line.startswith(("\u2705", "\u274c", "\u26a0", "UML-VERIFY-MODE"))
        or " checks: " in line)))
    runs = re.findall(r"^UML-VERIFY (\d+) (.*)$", console, re.M)
    assert len(runs) == (2 if layout == "v2" else 1) and all(code == "0" for code, _ in runs), \
        "jrun verify failed in the %s guest: %s\n%s" % (layout, runs, console[-8000:])
    default = console[console.index("UML-VERIFY-MODE"):console.index("UML-VERIFY 0")]
    for check in ("Process isolation", "Filesystem isolation", "Mount isolation", "Memory limit", "PIDs limit",
                  "CPU limit", "cgroup membership", "I/O limit", "Capabilities", "Seccomp", "Device nodes"):
        assert re.search("^\u2705 %s " % check, default, re.M), "verify's %s check did not pass in the %s guest" % (
            check, layout)
    refused = re.search(r"UML-USERNS-TMPFS (.*) exit (\d+)", console)
    assert refused and refused.group(2) == "125" and "--userns: the rootfs /tmp/tmpfs-root is on tmpfs, which cannot " \
        "be idmapped" in refused.group(1), console[-4000:]
    # The network: its battery where the kernel holds jrun's nftables table,
    # else at least jrun's refusal to run a job without its firewall.
    nft = re.search(r"UML-NFT-INET (\w+)", console).group(1)
    if layout != "v2":
        assert nft == "bridge" or "UML-NET-REFUSED" in console, console[-4000:]
    elif nft == "bridge":
        assert re.search("^\u2705 Network isolation ", default, re.M), default
        assert any("test_network.py::test_egress_is_masqueraded" in n for k, n in outcomes if k == "PASSED")
    else:
        refused = re.search(r"UML-NET-REFUSED (.*) exit (\d+) left: (.*)", console)
        assert refused and refused.group(2) == "125" and "nft" in refused.group(1) and not refused.group(3), \
            console[-4000:]
        sys.stderr.write("the %s guest's kernel cannot hold jrun's nftables table (no inet family): "
                         "the network battery did not run; a networked job was refused: %s\n"
                         % (layout, refused.group(1).strip()))
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
