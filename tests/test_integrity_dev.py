"""A hostile job leaves the host as it found it: the job's own side (issue 10).

Its device nodes (the host's are never reachable, whatever the job does to
/dev or to the /proc files they mask), the device allow-list of its cgroup,
nodev on every writable mount, one bounded writable space, and core dumps
that never reach a pipe core_pattern helper running as host root.

Every test snapshots what the hostile job could reach on the host, asserts
it unchanged afterwards, and restores whatever changed in a finally, so a
failing test never breaks the machine.
"""
import contextlib
import errno
import os
import stat
import subprocess
import time
import uuid

import pytest

import jrun as J
from conftest import JRUN, jrun, needs_root, sh, state_dirs

pytestmark = needs_root

MODES = {
    "default": ("--init",),  # --init: /dev/init, a read-only bind of the host's tini, is a target too
    "rootfs-host": ("--rootfs", "host"),
    "user": ("--user", "1000"),
    "userns": ("--userns",),
}
HOST_NODES = ["/dev/" + name for name, _, _ in J.DEV_NODES] + ["/dev/ptmx", J.TINI]
MASKED = " ".join(J.MASKED_FILES)
_userns = {}


def need_userns(mode="userns"):
    """Skip a --userns test where this host cannot give it (idmapped mounts:
    the user-mode-linux guest's ext2 rootfs cannot)."""
    if mode != "userns":
        return
    if "ok" not in _userns:
        p = jrun("--net", "none", "--userns", "--", "true")
        _userns.update(ok=p.returncode == 0, why=p.stderr.strip())
    if not _userns["ok"]:
        pytest.skip("--userns does not work here: %s" % _userns["why"])


def node_state(path):
    """Type, mode, owner, device and (but for ttys: the kernel stamps a
    tty's inode when anyone on the host uses it) modification time."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    tty = path in ("/dev/tty", "/dev/ptmx")
    return stat.S_IFMT(st.st_mode), st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_rdev, tty or st.st_mtime_ns


@contextlib.contextmanager
def host_nodes_guarded(paths=HOST_NODES):
    """Yield the snapshot of PATHS; afterwards put back whatever changed
    (made again if gone, owner, mode, times), then assert nothing had."""
    before = {p: (node_state(p), os.lstat(p) if os.path.lexists(p) else None) for p in paths}
    changed = []
    try:
        yield before
    finally:
        for path, (state, st) in before.items():
            if node_state(path) == state or st is None:
                continue
            changed.append(path)
            if not os.path.lexists(path):
                os.mknod(path, st.st_mode, st.st_rdev)
            os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
            os.chmod(path, st.st_mode & 0o7777)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    assert changed == [], "the job changed the host's %s (restored)" % changed


def mounts(text):
    """/proc/self/mountinfo lines -> [(mount point, per-mount options, fstype)]."""
    out = []
    for line in text.strip().splitlines():
        pre, _, post = line.partition(" - ")
        fields = pre.split()
        out.append((fields[4], set(fields[5].split(",")), post.split()[0]))
    return out


# --- /dev: the job's nodes are its own ---------------------------------------


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_hostile_job_cannot_change_the_hosts_device_nodes(mode):
    """chmod, chown, touch, rm, mv, mknod on every node of /dev and on the
    /proc files masked by /dev/null; then the nodes must still work inside,
    and be unchanged on the host."""
    need_userns(mode)
    targets = " ".join(["/dev/" + n for n, _, _ in J.DEV_NODES] + ["/dev/ptmx", "/dev/pts/ptmx", "/dev/init"])
    script = ("for n in %s %s; do test -e $n || continue; chmod 600 $n; chmod u+s $n; chown 1:1 $n; "
              "touch $n; echo x > $n; mv $n /tmp/x; rm -f $n; mknod $n c 1 1; done 2>/dev/null; "
              "echo x > /dev/null && echo null-ok; head -c 4 /dev/zero | wc -c; head -c 4 /dev/urandom | wc -c; "
              "dd if=/dev/zero of=/dev/full bs=1 count=1 2>&1 | grep -c 'No space left'; (: < /dev/tty) 2>&1 | "
              "grep -c 'No such device or address';"
              " cat %s 2>/dev/null | wc -c; stat -c '%%a %%t:%%T' /dev/null" % (targets, MASKED, MASKED))
    with host_nodes_guarded():
        p = sh(script, *MODES[mode])
    assert p.returncode == 0, p.stderr
    # The job's nodes still work (under --userns they are owned by nobody,
    # mode 0666), and chmod could not even change the job's own.
    assert p.stdout.split() == ["null-ok", "4", "4", "1", "1", "0", "666", "1:3"], p.stdout


@pytest.mark.parametrize("mode", ["default", "rootfs-host", "userns"])
def test_nodev_everywhere_but_the_jobs_own_nodes(tmp_path, mode):
    """Only two mounts may hold usable device nodes: the job's own nodes,
    read-only, and its private devpts (which makes its ptys itself).  Every
    other mount, writable or not, including volumes and the cgroup fs, is
    nodev or read-only."""
    need_userns(mode)
    vol = tmp_path / "vol"
    vol.mkdir()
    up = tmp_path / "up"
    up.write_text("x")
    p = sh("cat /proc/self/mountinfo", "-v", "%s:/data" % vol, "--upload", "%s:/opt/up" % up, *MODES[mode],
           check=0)
    seen = mounts(p.stdout)
    assert len(seen) > 15 and "/data" in [m for m, _, _ in seen] and "/dev/shm" in [m for m, _, _ in seen]
    for point, opts, fstype in seen:
        assert "nodev" in opts or "ro" in opts or fstype == "devpts", (point, opts, fstype)
        if "nodev" not in opts and fstype != "devpts":  # the job's own nodes, and the /proc files they mask
            assert point in ["/dev/" + n for n, _, _ in J.DEV_NODES] or point in J.MASKED_FILES, point
    assert [m for m, _, f in seen if f == "devtmpfs"] == []  # nothing of the host's /dev


def test_the_device_allow_list_refuses_what_the_job_makes_with_mknod():
    """With --cap-add MKNOD the job may make its own kinds of nodes only,
    and can open none of them (nodev); /dev/mem (c 1:1) and a disk (b 8:0)
    are refused by the cgroup's allow-list itself.  Read from the host while
    the job runs: v1's devices.list, or v2's attached eBPF program."""
    host = J.cgroup_host()
    if host.version == 1 and "devices" not in host.mounts:
        pytest.skip("no v1 devices hierarchy here: no allow-list (MKNOD is refused, see the next test)")
    name = "integ-devlist-" + uuid.uuid4().hex[:6]
    proc = subprocess.Popen(JRUN + ["--net", "none", "--name", name, "--cap-add", "MKNOD", "--", "/bin/sh", "-c",
                                    "for d in 'c 1 1' 'b 8 0' 'c 1 3'; do mknod /tmp/n $d 2>&1 && { echo made; "
                                    "head -c 1 /tmp/n 2>&1 >/dev/null; rm /tmp/n; }; done; echo ready; read x; true"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:
            if line.strip() == "ready":
                break
            lines.append(line.strip())
        if host.version == 1:
            listed = open("/sys/fs/cgroup/devices/jrun/%s/devices.list" % name).read().split("\n")
            assert listed[:-1] == ["c %d:%d rwm" % (ma, mi) for _, ma, mi in J.DEV_NODES] + [
                "c 5:2 rw", "c 136:* rw"]
        else:
            assert len(J.attached_device_filters("/sys/fs/cgroup/jrun/%s" % name)) == 1
    finally:
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert lines[0].endswith("Operation not permitted") and lines[1].endswith("Operation not permitted"), lines
    assert lines[2] == "made" and lines[3].endswith("Permission denied"), lines  # c 1:3 may be made, not opened


def test_mknod_is_refused_where_no_allow_list_can_be_set():
    """cgroup v1 without a devices hierarchy for the job (none mounted, or a
    --cgroup-parent outside it): the job runs, but not with --cap-add MKNOD
    (exit 125, nothing left)."""
    host = J.cgroup_host()
    if host.version != 1:
        pytest.skip("cgroup v2: the allow-list is an eBPF program (see the test above)")
    parent = "integ-nodev-" + uuid.uuid4().hex[:6] if "devices" in host.mounts else None
    made = []
    try:
        for ctrl in ("memory", "pids", "cpuacct", "blkio") if parent else ():
            if ctrl in host.mounts:
                made.append(os.path.join(host.mounts[ctrl][0], parent))
                os.mkdir(made[-1])
        where = ("--cgroup-parent", parent) if parent else ()
        assert jrun("--net", "none", *where, "--", "true").returncode == 0
        name = "integ-nodev-" + uuid.uuid4().hex[:6]
        p = jrun("--net", "none", "--name", name, *where, "--cap-add", "MKNOD", "--", "true")
        assert p.returncode == 125 and "--cap-add MKNOD" in p.stderr and "allow-list" in p.stderr, p.stderr
        assert name not in state_dirs() and not any(os.path.isdir(os.path.join(d, name)) for d in made)
    finally:
        for d in made:
            os.rmdir(d)


def _cgroup2_mount():
    with open("/proc/self/mounts") as f:
        for line in f:
            _, point, fstype = line.split()[:3]
            if fstype == "cgroup2":
                return point
    return None


# Nodes the eBPF test opens: allowed ones, then a few the list refuses
# (/dev/kmsg, /dev/fuse, a disk).
PROBE_NODES = (("null", stat.S_IFCHR, 1, 3), ("zero", stat.S_IFCHR, 1, 5), ("urandom", stat.S_IFCHR, 1, 9),
               ("kmsg", stat.S_IFCHR, 1, 11), ("fuse", stat.S_IFCHR, 10, 229), ("sda", stat.S_IFBLK, 8, 0))


def _try_nodes(tmp_path):
    """Open each probe node, then make nodes: errno names (or ok/made)."""
    out = []
    for name, _, _, _ in PROBE_NODES:
        try:
            os.close(os.open(str(tmp_path / name), os.O_RDONLY | os.O_NONBLOCK))
            out.append("ok")
        except OSError as e:
            out.append(errno.errorcode[e.errno])
    for kind, major, minor in ((stat.S_IFCHR, 1, 3), (stat.S_IFCHR, 1, 1), (stat.S_IFBLK, 8, 0),
                               (stat.S_IFCHR, 136, 0)):
        node = str(tmp_path / "made")
        try:
            os.mknod(node, kind | 0o600, os.makedev(major, minor))
            os.unlink(node)
            out.append("made")
        except OSError as e:
            out.append(errno.errorcode[e.errno])
    return out


def test_the_ebpf_device_program_allows_the_jobs_nodes_only(tmp_path):
    """The program of cgroup v2's allow-list, run by this kernel: attached to
    a fresh cgroup2 directory (on this v1 host, the hybrid 'unified' mount:
    the program works there too), a forked process in it opens nodes made
    here, and makes some; the same from outside is the control (a node whose
    driver is missing fails there too, but never with EPERM)."""
    top = _cgroup2_mount()
    if top is None:
        pytest.skip("no cgroup2 mount")
    for name, kind, major, minor in PROBE_NODES:
        os.mknod(str(tmp_path / name), kind | 0o600, os.makedev(major, minor))
    control = _try_nodes(tmp_path)
    cg = os.path.join(top, "integ-bpf-" + uuid.uuid4().hex[:6])
    os.mkdir(cg)
    try:
        prog = J.attach_device_filter(cg, J.DEVICE_RULES)
        assert J.attached_device_filters(cg) == [prog]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
                os.write(w, " ".join(_try_nodes(tmp_path)).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            got = f.read().split()
        os.waitpid(pid, 0)
    finally:
        os.rmdir(cg)
    assert control[:3] == ["ok"] * 3 and "EPERM" not in control and control[6:] == ["made"] * 4, control
    assert got == ["ok"] * 3 + ["EPERM"] * 3 + ["made", "EPERM", "EPERM", "EPERM"], (got, control)


def test_device_program_encodes_each_rule():
    """The program's shape: 6 loads, one block per rule (type, access,
    major, minor, allow: 8 instructions; a minor-less rule one fewer), the
    final refusal; every jump lands on its block's last instruction."""
    code = J.device_filter_program(J.DEVICE_RULES)
    insns = [code[i:i + 8] for i in range(0, len(code), 8)]
    blocks = [8 if minor is not None else 7 for _, _, minor, _ in J.DEVICE_RULES]
    assert len(insns) == 6 + sum(blocks) + 2
    for i, insn in enumerate(insns):
        if insn[0] == J.BPF_JNE_K:
            off = int.from_bytes(insn[2:4], "little", signed=True)
            assert 0 < i + 1 + off < len(insns) and insns[i + off][0] == J.BPF_EXIT
    assert insns[-2][0] == J.BPF_MOV64_K and insns[-2][4:] == bytes(4) and insns[-1][0] == J.BPF_EXIT


# --- one bounded writable space ----------------------------------------------


def test_one_budget_bounds_all_the_writable_space():
    """--workdir-size 64M: /tmp, /dev/shm, /work and the root's writable
    layer each fill to about 64M alone, and together never pass it."""
    fill = "dd if=/dev/zero of=%s bs=1M count=%d 2>/dev/null; echo $(( $(du -k %s | cut -f1) / 1024 ))"
    places = ("/tmp/f", "/dev/shm/f", "/work/f", "/var/f")
    script = "; ".join("%s; rm %s" % (fill % (f, 80, f), f) for f in places)
    script += "; %s; " % (fill % ("/tmp/a", 60, "/tmp/a"))
    script += "; ".join("dd if=/dev/zero of=%s bs=1M count=8 2>&1 | grep -c 'No space left'" % f
                        for f in places[1:])
    script += "; df -k /tmp /dev/shm /work / | tail -n +2"
    p = sh(script, "--workdir-size", "64M", check=0)
    out = p.stdout.split()
    alone = [int(x) for x in out[:4]]
    assert all(60 <= mb <= 64 for mb in alone), alone  # each fills (near) the whole budget alone
    assert out[4:8] == ["60", "1", "1", "1"], out  # with 60M in /tmp, 8M more fit nowhere
    sizes = [int(out[i + 1]) for i in range(8, len(out), 6)]
    assert sizes == [65536] * 4, out[8:]  # one tmpfs, one size, seen everywhere


def test_the_budget_holds_for_rootfs_host_and_read_only():
    out = sh("dd if=/dev/zero of=/root/f bs=1M count=40 2>&1 | grep -c 'No space left'; "
             "dd if=/dev/zero of=/tmp/f bs=1M count=1 2>&1 | grep -c 'No space left'",
             "--rootfs", "host", "--workdir-size", "32M", check=0).stdout.split()
    assert out == ["1", "1"]  # the root's own files are in the budget too
    out = sh("touch /x 2>&1 | grep -c Read-only; for d in /tmp /work /dev/shm; do touch $d/f && echo ok; done",
             "--read-only", "--workdir-size", "8M", check=0).stdout.split()
    assert out == ["1", "ok", "ok", "ok"]


def test_the_writable_space_belongs_to_the_jobs_root_under_userns():
    need_userns()
    for rootfs in ("minimal", "host"):
        out = sh("stat -c %u:%g:%a /tmp /work /dev/shm /; for d in /tmp /work /dev/shm ''; do "
                 "touch $d/f && echo ok; done", "--userns", "--rootfs", rootfs, check=0).stdout.split()
        assert out == ["0:0:1777", "0:0:755", "0:0:1777", "0:0:755", "ok", "ok", "ok", "ok"], (rootfs, out)


def test_posix_shared_memory_works_in_the_bound_dev_shm():
    """glibc's shm_open (through Python's multiprocessing) on /dev/shm, a
    bind of a directory of the job's tmpfs; SysV shared memory is bounded
    by the same size, in the job's own IPC namespace."""
    script = ("python3 -c 'from multiprocessing import shared_memory as s; m = s.SharedMemory(create=True, "
              "size=1 << 20); m.buf[0] = 7; o = s.SharedMemory(m.name); print(m.size, o.buf[0]); o.close(); "
              "m.close(); m.unlink()'; cat /proc/sys/kernel/shmmax /proc/sys/kernel/shmall")
    with open("/proc/sys/kernel/shmmax") as f:
        host_shmmax = f.read()
    out = sh(script, "--rootfs", "host", "--workdir-size", "16M", check=0).stdout.split()
    assert out == [str(1 << 20), "7", str(16 << 20), str((16 << 20) // os.sysconf("SC_PAGE_SIZE"))]
    with open("/proc/sys/kernel/shmmax") as f:
        assert f.read() == host_shmmax


def _shmem_kb():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Shmem:"))


def test_the_hosts_memory_is_given_back_after_the_job():
    before = _shmem_kb()
    p = sh("dd if=/dev/zero of=/tmp/f bs=1M count=200 2>/dev/null; dd if=/dev/zero of=/dev/shm/f bs=1M count=100 "
           "2>/dev/null; du -sk /tmp /dev/shm", "--workdir-size", "512M", check=0)
    assert [int(x) for x in p.stdout.split()[::2]] == [200 << 10, 100 << 10]
    for _ in range(50):
        if _shmem_kb() < before + (32 << 10):
            break
        time.sleep(0.1)
    assert _shmem_kb() < before + (32 << 10), (before, _shmem_kb())  # other jobs may run meanwhile: 32 MiB slack


def test_uploads_that_do_not_fit_the_writable_space_are_refused(tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(2 << 20)
    many = tmp_path / "many"
    many.mkdir()
    for i in range(1100):
        (many / str(i)).touch()
    for args, fragment in ((("--upload", "%s:/tmp/" % big), "the uploads need 2 MiB"),
                           (("--upload", "%s:/etc/big" % big), "the uploads need 2 MiB"),
                           (("--upload", many), "the uploads hold 1,101 files and directories")):
        name = "integ-refused-" + uuid.uuid4().hex[:6]
        p = jrun("--net", "none", "--name", name, "--workdir-size", "1M", *args, "--", "true")
        assert p.returncode == 125 and fragment in p.stderr and "--workdir-size 1 MiB" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and name not in state_dirs()


# --- core dumps never reach the host's pipe helper ---------------------------


@contextlib.contextmanager
def core_pattern(pattern):
    with open("/proc/sys/kernel/core_pattern") as f:
        original = f.read().rstrip("\n")
    try:
        with open("/proc/sys/kernel/core_pattern", "w") as f:
            f.write(pattern)
        yield
    finally:
        with open("/proc/sys/kernel/core_pattern", "w") as f:
            f.write(original)


def test_a_crash_in_the_job_never_runs_the_hosts_core_pattern_helper(tmp_path):
    """A pipe core_pattern runs its helper as host root whatever RLIMIT_CORE
    is, except 1.  The job crashes a process before and after trying to
    lower the limit to 0 (refused); a crash on the host, after the job's,
    shows the helper does run (so its absence for the job means something)."""
    log = tmp_path / "helper.log"
    helper = tmp_path / "helper"
    helper.write_text("#!/bin/sh\necho \"$1 $2\" >> %s\ncat > /dev/null\n" % log)
    helper.chmod(0o755)
    name = "integ-core-" + uuid.uuid4().hex[:6]
    crash = "sh -c 'kill -SEGV $$'; echo $?"
    with core_pattern("|%s %%h %%P" % helper):
        p = jrun("--net", "none", "--name", name, "--", "/bin/sh", "-c",
                 "%s; ulimit -S -c 0 2>/dev/null || echo refused; %s" % (crash, crash))
        control = subprocess.Popen(["/bin/sh", "-c", "ulimit -c 0; kill -SEGV $$"])
        control.wait()
        for _ in range(100):
            if log.exists() and " %d\n" % control.pid in log.read_text():
                break
            time.sleep(0.05)
    assert p.stdout.split() == ["139", "refused", "139"], (p.stdout, p.stderr)
    seen = log.read_text() if log.exists() else ""
    assert " %d\n" % control.pid in seen, "the control crash did not run the helper: %r" % seen
    assert name not in seen, seen
