"""Least privilege: a job that is root inside still cannot escape.

Pure logic first (capability names, --user, the seccomp program, decoded and
run by a small BPF interpreter here), then black-box: the real jrun, as root,
with a static probe program (tests/probe/probe.c, compiled here with gcc
-static) fed to the job on stdin, since the job's root has no compiler.
Each black-box test fails on a runner that lacks the defence it names.
"""
import ctypes
import errno
import os
import pty
import shutil
import signal
import subprocess
import time

import pytest

import jrun
from conftest import JRUN, jrun as run_jrun, needs_root, state_dirs

HERE = os.path.dirname(os.path.abspath(__file__))
MACHINE = os.uname().machine


# ---------------------------------------------------------------------------
# Pure logic
# ---------------------------------------------------------------------------


def spec(*argv):
    return jrun.parse_run(list(argv) + ["true"])


@pytest.mark.parametrize("name", ["NET_ADMIN", "net_admin", "CAP_NET_ADMIN", "cap_Net_Admin"])
def test_cap_names_any_case_with_or_without_prefix(name):
    assert spec("--cap-add", name).cap_add == ("NET_ADMIN",)


@pytest.mark.parametrize("opt", ["--cap-add", "--cap-drop"])
@pytest.mark.parametrize("name", ["NET_ADMINS", "CAP_", "", "ALLL", "7"])
def test_unknown_capability_is_refused_at_parse_time(opt, name):
    with pytest.raises(jrun.UsageError, match=opt):
        spec(opt, name)


def test_capability_table_matches_python_prctl():
    prctl = pytest.importorskip("prctl")
    for n, name in enumerate(jrun.CAPABILITIES):
        if hasattr(prctl, "CAP_" + name):
            assert getattr(prctl, "CAP_" + name) == n, name


@pytest.mark.parametrize("argv,caps", [
    ((), jrun.DEFAULT_CAPS),
    (("--cap-drop", "ALL"), set()),
    (("--cap-drop", "ALL", "--cap-add", "chown"), {"CHOWN"}),
    (("--cap-add", "ALL"), set(jrun.CAPABILITIES)),
    (("--cap-add", "ALL", "--cap-drop", "SYS_ADMIN"), set(jrun.CAPABILITIES) - {"SYS_ADMIN"}),
    (("--cap-add", "SYS_TIME", "--cap-drop", "KILL"), (jrun.DEFAULT_CAPS | {"SYS_TIME"}) - {"KILL"}),
    (("--cap-add", "SYS_TIME", "--cap-drop", "SYS_TIME"), jrun.DEFAULT_CAPS),
    (("-u", "1000"), set()),
    (("-u", "nobody", "--cap-drop", "KILL"), set()),
    (("-u", "0"), jrun.DEFAULT_CAPS),
    (("-u", "root:users", "--cap-add", "MKNOD"), jrun.DEFAULT_CAPS | {"MKNOD"}),
])
def test_job_capabilities(argv, caps):
    assert jrun.job_capabilities(spec(*argv)) == set(caps)


def test_default_set_has_none_of_the_dangerous_ones():
    assert not jrun.DEFAULT_CAPS & {"SYS_ADMIN", "SYS_MODULE", "SYS_RAWIO", "SYS_PTRACE", "SYS_BOOT",
                                    "SYS_TIME", "MKNOD", "NET_ADMIN", "NET_RAW", "DAC_READ_SEARCH",
                                    "BPF", "PERFMON", "SYS_RESOURCE", "AUDIT_WRITE"}


@pytest.mark.parametrize("text,parsed", [
    ("1000", ("1000", None)), ("1000:100", ("1000", "100")), ("nobody", ("nobody", None)),
    ("user:users", ("user", "users")), ("0", ("0", None)), ("4294967294", ("4294967294", None)),
])
def test_parse_user(text, parsed):
    assert spec("-u", text).user == parsed


@pytest.mark.parametrize("text", ["", ":", "1000:", ":100", "a b", "4294967295", "1000:99999999999",
                                  "-1", "a:b:c", "../x"])
def test_parse_user_refuses(text):
    with pytest.raises(jrun.UsageError, match="--user"):
        spec("-u", text)


def test_cap_add_with_a_user_is_refused():
    with pytest.raises(jrun.UsageError, match="--cap-add: a -u/--user job runs with no capabilities"):
        spec("-u", "1000", "--cap-add", "NET_ADMIN")


# The seccomp program, decoded: a classic-BPF interpreter for the opcodes
# jrun emits (anything else fails the test).

def run_bpf(prog, nr, arch, args=(0,) * 6, loads=None):
    """The verdict; LOADS, a set, collects the seccomp_data offsets read."""
    data = {0: nr, 4: arch}
    for i, a in enumerate(args):
        data[16 + 8 * i] = a & 0xFFFFFFFF
        data[20 + 8 * i] = a >> 32
    for off in range(16, 64, 4):
        data.setdefault(off, 0)
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == jrun.BPF_LD_W_ABS:
            acc = data[k]
            if loads is not None:
                loads.add(k)
        elif code == jrun.BPF_RET_K:
            return k
        elif code in (jrun.BPF_JEQ_K, jrun.BPF_JGE_K, jrun.BPF_JSET_K):
            cond = {jrun.BPF_JEQ_K: acc == k, jrun.BPF_JGE_K: acc >= k, jrun.BPF_JSET_K: acc & k}[code]
            pc += jt if cond else jf
        else:
            raise AssertionError("unexpected opcode %#x at %d" % (code, pc))
        pc += 1


ALLOW, KILL = jrun.SECCOMP_RET_ALLOW, jrun.SECCOMP_RET_KILL_PROCESS
EPERM, ENOSYS = jrun.SECCOMP_RET_ERRNO | errno.EPERM, jrun.SECCOMP_RET_ERRNO | errno.ENOSYS
EAFNOSUPPORT = jrun.SECCOMP_RET_ERRNO | errno.EAFNOSUPPORT


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_seccomp_program_verdicts(machine):
    prog = jrun.seccomp_program(machine, jrun.DEFAULT_CAPS)
    nrs, arch = jrun._SYSCALLS[machine], jrun.AUDIT_ARCH[machine]
    assert len(prog) < 200 and all(0 <= jt < 256 and 0 <= jf < 256 for _, jt, jf, _ in prog)
    for pc, (code, jt, jf, _) in enumerate(prog):
        if code != jrun.BPF_RET_K:
            assert pc + 1 + max(jt, jf) < len(prog)  # every jump lands inside the program
    denied = [n for cap, names in jrun.SECCOMP_DENY for n in names if nrs[n] is not None]
    assert len(denied) > 40
    for name in denied:
        assert run_bpf(prog, nrs[name], arch) == EPERM, name
    assert run_bpf(prog, nrs["clone3"], arch) == ENOSYS
    assert run_bpf(prog, nrs["clone"], arch, (jrun.CLONE_NEWUSER | 17,)) == EPERM
    assert run_bpf(prog, nrs["clone"], arch, (jrun.CLONE_NEWNET,)) == EPERM
    assert run_bpf(prog, nrs["clone"], arch, (0x003D0F00 | 17,)) == ALLOW  # pthread_create's flags
    assert run_bpf(prog, nrs["clone"], arch, (17,)) == ALLOW  # fork
    # Checked by argument: vsock sockets, pushing input into a terminal,
    # changing RLIMIT_CORE.  The kernel reads int arguments as their low 32
    # bits: high bits set change nothing.
    for name in ("socket", "socketpair"):
        assert run_bpf(prog, nrs[name], arch, (jrun.AF_VSOCK, 1, 0)) == EAFNOSUPPORT, name
        assert run_bpf(prog, nrs[name], arch, (jrun.AF_VSOCK | 1 << 32, 1, 0)) == EAFNOSUPPORT, name
        for family in (1, 2, 10, 16, 17, 41):  # unix, inet, inet6, netlink, packet, the one after vsock
            assert run_bpf(prog, nrs[name], arch, (family, 1, 0)) == ALLOW, (name, family)
    for request in (jrun.TIOCSTI, jrun.TIOCLINUX, jrun.TIOCSTI | 0xFFFFFFFF << 32):
        assert run_bpf(prog, nrs["ioctl"], arch, (0, request, 0)) == EPERM, request
    for request in (0x5401, 0x5402, 0x5413, 0x541B, 0x5411, 0x5421):  # TCGETS TCSETS TIOCGWINSZ FIONREAD ...
        assert run_bpf(prog, nrs["ioctl"], arch, (0, request, 0)) == ALLOW, request
    assert run_bpf(prog, nrs["ioctl"], arch, (jrun.TIOCSTI, 0x5401, 0)) == ALLOW  # fd 0x5412: not a request
    assert run_bpf(prog, nrs["setrlimit"], arch, (jrun.RLIMIT_CORE, 0x7FFF0000)) == EPERM
    assert run_bpf(prog, nrs["setrlimit"], arch, (7, 0x7FFF0000)) == ALLOW  # RLIMIT_NOFILE
    for new in (0x7FFF0000, 0x7F << 32, 1):
        assert run_bpf(prog, nrs["prlimit64"], arch, (0, jrun.RLIMIT_CORE, new, 0)) == EPERM, new
    assert run_bpf(prog, nrs["prlimit64"], arch, (0, jrun.RLIMIT_CORE, 0, 0x7FFF0000)) == ALLOW  # getrlimit
    assert run_bpf(prog, nrs["prlimit64"], arch, (0, 7, 0x7FFF0000, 0)) == ALLOW
    for nr in (0, 1, 2, 59, 60, 63, 221, 231, 257, 293, 334, 435 - 1):  # read, write, execve, ...
        if nr not in [nrs[n] for n in denied] + [nrs[n] for n in ("clone", "clone3", "ioctl", "socket",
                                                                   "socketpair", "setrlimit", "prlimit64")]:
            assert run_bpf(prog, nr, arch) == ALLOW, nr
    # Another architecture, whose numbers mean other syscalls, is killed.
    other = jrun.AUDIT_ARCH["aarch64" if machine == "x86_64" else "x86_64"]
    for foreign in (0x40000003, other, 0x40000028):  # i386, the other one, arm32
        assert run_bpf(prog, 0, foreign) == KILL
    if machine == "x86_64":
        assert run_bpf(prog, 0x40000000 | 1, arch) == KILL  # x32 write


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_seccomp_program_reads_arguments_only_for_the_checked_syscalls(machine):
    """The kernel caches the verdict of every syscall whose path through the
    filter reads no argument (seccomp_cache_prepare_bitmap emulates it the
    same way): only the few checked by argument run the program per call."""
    prog = jrun.seccomp_program(machine, jrun.DEFAULT_CAPS)
    nrs, arch = jrun._SYSCALLS[machine], jrun.AUDIT_ARCH[machine]
    uncached = set()
    for nr in range(600):
        loads = set()
        run_bpf(prog, nr, arch, loads=loads)
        if loads - {0, 4}:
            uncached.add(nr)
    assert uncached == {nrs[n] for n in ("ioctl", "socket", "socketpair", "setrlimit", "prlimit64", "clone")}


def test_seccomp_program_follows_the_capabilities():
    nrs, arch = jrun._SYSCALLS["x86_64"], jrun.AUDIT_ARCH["x86_64"]
    prog = jrun.seccomp_program("x86_64", jrun.DEFAULT_CAPS | {"SYS_ADMIN", "SYS_TIME"})
    for name in ("mount", "unshare", "setns", "settimeofday", "clone3"):
        assert run_bpf(prog, nrs[name], arch) == ALLOW, name
    assert run_bpf(prog, nrs["clone"], arch, (jrun.CLONE_NEWUSER,)) == ALLOW
    for name in ("keyctl", "io_uring_setup", "reboot", "init_module", "bpf"):
        assert run_bpf(prog, nrs[name], arch) == EPERM, name


@pytest.mark.parametrize("machine,header", [
    ("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    ("aarch64", "/usr/include/asm-generic/unistd.h"),
])
def test_syscall_numbers_match_the_kernel_headers(machine, header):
    if not os.path.exists(header):
        pytest.skip("%s not installed (linux-libc-dev)" % header)
    defined = {}
    with open(header) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "#define" and parts[1].startswith(("__NR_", "__NR3264_")):
                name = parts[1].split("_", 3)[-1] if parts[1].startswith("__NR3264_") else parts[1][5:]
                if parts[2].isdigit():
                    defined[name] = int(parts[2])
    checked = 0
    assert len(jrun._SYSCALLS[machine]) == len(jrun._SYSCALL_NAMES)
    for name, nr in jrun._SYSCALLS[machine].items():
        if name in defined:
            assert nr == defined[name], name
            checked += 1
        else:  # newer than the headers (open_tree_attr, 6.15), or not on this architecture
            assert nr is None or nr > max(defined.values()), name
    assert checked >= len(jrun._SYSCALLS[machine]) - 3


@pytest.mark.skipif(MACHINE not in jrun.AUDIT_ARCH, reason="jrun supports x86_64 and aarch64")
def test_seccomp_filter_installed_in_a_forked_process():
    """The real kernel runs the program: in a forked child (the filter cannot
    be removed), with no_new_privs so that no privilege is needed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            libc = ctypes.CDLL(None, use_errno=True)
            jrun.sys_prctl(38, 1)  # PR_SET_NO_NEW_PRIVS
            jrun.seccomp_set_filter(jrun.seccomp_program(MACHINE, jrun.DEFAULT_CAPS))
            nrs = jrun._SYSCALLS[MACHINE]
            out = []
            for name, args in (("keyctl", (0, -3, 0)), ("unshare", (jrun.CLONE_NEWUSER,)),
                               ("clone3", (0, 0)), ("mount", (None, None, None, 0, None))):
                ret = libc.syscall(ctypes.c_long(nrs[name]), *[ctypes.c_long(a) if isinstance(a, int)
                                                              else a for a in args])
                out.append("%s=%s" % (name, errno.errorcode.get(ctypes.get_errno(), "?") if ret < 0 else "ok"))
            out.append("getpid=%s" % ("ok" if os.getpid() > 0 else "?"))
            child = os.fork()  # clone without namespace flags
            if child == 0:
                os._exit(7)
            out.append("fork=%d" % os.WEXITSTATUS(os.waitpid(child, 0)[1]))
            os.write(w, " ".join(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got = f.read()
    os.waitpid(pid, 0)
    assert got == "keyctl=EPERM unshare=EPERM clone3=ENOSYS mount=EPERM getpid=ok fork=7"


# ---------------------------------------------------------------------------
# Black-box: the real jrun, as root
# ---------------------------------------------------------------------------

DEFAULT_MASK = sum(1 << jrun.CAPABILITIES.index(c) for c in jrun.DEFAULT_CAPS)


@pytest.fixture(scope="session")
def probe(tmp_path_factory):
    if not shutil.which("gcc") or not os.path.exists("/usr/lib/%s-linux-gnu/libc.a" % MACHINE):
        pytest.skip("gcc and libc6-dev are needed to build the static probe")
    out = str(tmp_path_factory.mktemp("probe") / "probe")
    subprocess.run(["gcc", "-static", "-O2", "-o", out, os.path.join(HERE, "probe", "probe.c")], check=True)
    with open(out, "rb") as f:
        return f.read()


@pytest.fixture(params=["minimal", "host"])
def rootfs(request):
    """The battery runs with the minimal rootfs and with --rootfs host."""
    return ("--rootfs", request.param)


def job(script, *opts, probe=None, check=0, **kw):
    """Run a sh script in a job (--net none); with PROBE, /tmp/p is the probe."""
    if probe is not None:
        script = "cat > /tmp/p && chmod 755 /tmp/p && " + script
    p = subprocess.run(JRUN + ["--net", "none"] + list(opts) + ["--", "/bin/sh", "-c", script],
                       input=probe, capture_output=True, timeout=60, **kw)
    out = p.stdout.decode("utf-8", "replace")
    if check is not None:
        assert p.returncode == check, "exit %d\nstdout: %s\nstderr: %s" % (p.returncode, out, p.stderr)
    return out


def status(text):
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: v.strip() for k, v in fields.items()}


def _job_process(p, name):
    """The host pid of the job started by jrun process P, once it runs NAME."""
    for _ in range(200):
        try:
            with open("/proc/%d/task/%d/children" % (p.pid, p.pid)) as f:
                kids = f.read().split()
            if kids:
                with open("/proc/%s/status" % kids[0]) as f:
                    st = status(f.read())
                if st["Name"] == name:
                    return int(kids[0]), st
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise AssertionError("the job never ran %s" % name)


def _uid_map(text):
    inside, outside, count = text.split()
    return int(inside), int(outside), int(count)


@needs_root
def test_default_capabilities_in_every_set(rootfs):
    st = status(job("cat /proc/self/status", *rootfs))
    for key in ("CapEff", "CapPrm", "CapBnd"):
        assert int(st[key], 16) == DEFAULT_MASK, (key, st[key])
    assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    assert st["Uid"].split() == ["0"] * 4 and st["Groups"] == ""


@needs_root
def test_user_has_no_capabilities_and_no_groups(rootfs):
    st = status(job("cat /proc/self/status", "--user", "1000", *rootfs))
    for key in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(st[key], 16) == 0, (key, st[key])
    assert st["Uid"].split() == ["1000"] * 4 and st["Gid"].split() == ["1000"] * 4
    assert st["Groups"] == "" and st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"


@needs_root
@pytest.mark.parametrize("user", [[], ["--user", "1000"]], ids=["root", "user"])
def test_an_inheritable_set_jrun_was_started_with_does_not_reach_the_job(user):
    """CVE-2022-24769: jrun started with capabilities in its inheritable set
    (here by capsh) empties it before exec."""
    if not shutil.which("capsh"):
        pytest.skip("capsh (libcap2-bin) is not installed")
    cmd = " ".join(JRUN + ["--net", "none"] + user + ["--", "cat", "/proc/self/status"])
    p = subprocess.run(["capsh", "--inh=cap_sys_admin,cap_net_raw", "--", "-c", cmd], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    st = status(p.stdout)
    assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0, st


@needs_root
def test_user_names_resolved_in_the_jobs_own_passwd():
    out = job("id -u; id -g; id -G; echo $HOME; touch /work/f && stat -c %u:%g /work/f", "-u", "user:users")
    assert out.split() == ["1000", "100", "100", "/home/user", "1000:100"]
    out = job("id -u; id -g; echo $HOME", "-u", "4242")  # no entry: GID = UID, HOME = /
    assert out.split() == ["4242", "4242", "/"]
    # Names only the host has are unknown in the job.
    host_only = next((line.split(":")[0] for line in open("/etc/passwd")
                      if line.split(":")[0] not in ("root", "daemon", "bin", "sys", "nobody", "user")), None)
    for n, (user, msg) in enumerate(((host_only, "no user %r in the job's /etc/passwd" % host_only),
                                     ("1000:nosuchgroup", "no group 'nosuchgroup' in the job's /etc/group"))):
        name = "sec-baduser-%d-%d" % (os.getpid(), n)
        p = run_jrun("--net", "none", "--name", name, "-u", user, "--", "id")
        assert p.returncode == 125 and msg in p.stderr, p.stderr
        assert name not in state_dirs()


@needs_root
def test_cap_add_and_drop():
    st = status(job("cat /proc/self/status", "--cap-drop", "ALL"))
    assert int(st["CapBnd"], 16) == 0 and int(st["CapEff"], 16) == 0
    st = status(job("cat /proc/self/status", "--cap-add", "cap_sys_time", "--cap-drop", "CHOWN"))
    want = DEFAULT_MASK | 1 << jrun.CAPABILITIES.index("SYS_TIME")
    want &= ~(1 << jrun.CAPABILITIES.index("CHOWN"))
    assert int(st["CapEff"], 16) == int(st["CapBnd"], 16) == want
    # Without CHOWN root cannot give a file away; the default set can.
    assert "refused" in job("touch /tmp/f; chown 1000 /tmp/f 2>/dev/null || echo refused", "--cap-drop", "chown")
    assert "refused" not in job("touch /tmp/f; chown 1000 /tmp/f 2>/dev/null || echo refused")
    for argv in (("--cap-add", "FLY"), ("--cap-drop", "CAP_"), ("-u", "1000", "--cap-add", "NET_RAW")):
        p = run_jrun("--net", "none", *argv, "--", "true")
        assert p.returncode == 125 and p.stderr.startswith("jrun: --cap-"), p.stderr


@needs_root
def test_seccomp_unconfined():
    st = status(job("cat /proc/self/status", "--seccomp", "unconfined"))
    assert st["Seccomp"] == "0" and st["NoNewPrivs"] == "1"
    assert int(st["CapEff"], 16) == DEFAULT_MASK


@needs_root
def test_admin_operations_fail(rootfs):
    out = job("mount -t tmpfs none /mnt 2>/dev/null && echo MOUNTED-TMPFS; "
              "mkdir -p /tmp/pr; mount -t proc proc /tmp/pr 2>/dev/null && echo MOUNTED-PROC; "
              "mknod /tmp/sda b 8 0 2>/dev/null && echo MKNOD; "
              "unshare -U true 2>/dev/null && echo UNSHARE-USER; "
              "unshare -m true 2>/dev/null && echo UNSHARE-MOUNT; "
              "unshare -n true 2>/dev/null && echo UNSHARE-NET; "
              "modprobe dummy 2>/dev/null && echo MODPROBE; "
              "insmod /tmp/none.ko 2>/dev/null && echo INSMOD; "
              "hostname evil 2>/dev/null && echo HOSTNAME; "
              "date -s 2000-01-01 >/dev/null 2>&1; [ $(date +%Y) = 2000 ] && echo DATE; "
              "echo done", *rootfs)
    assert out.split() == ["done"]


@needs_root
@pytest.mark.parametrize("what,want", [
    ("keyctl", "EPERM"), ("add_key", "EPERM"), ("init_module", "EPERM"), ("bpf", "EPERM"),
    ("userfaultfd", "EPERM"), ("perf_event_open", "EPERM"), ("open_by_handle_at", "EPERM"),
    ("io_uring_setup", "EPERM"), ("clone3", "ENOSYS"), ("clone-newuser", "EPERM"),
    ("unshare-user", "EPERM"), ("mount-proc", "EPERM"), ("clone-plain", "ok"),
    ("raw-socket", "EPERM"), ("icmp-socket", "ok"),  # no NET_RAW, yet ping's datagram socket works
    ("vsock", "EAFNOSUPPORT"), ("vsock-pair", "EAFNOSUPPORT"), ("tiocsti-own", "EPERM"),
    ("tioclinux", "EPERM"), ("rlimit-core", "EPERM"), ("prlimit-core", "EPERM"),
])
def test_syscalls_refused_in_the_job(probe, what, want):
    assert job("/tmp/p " + what, probe=probe, check=None).strip() == want


@needs_root
def test_the_filter_is_what_refuses_vsock_terminal_input_and_core_limits(probe, tmp_path):
    """Without the filter the kernel allows each of them here (the same
    probe on the host says what the kernel does with an AF_VSOCK socket:
    this VM has a vsock transport)."""
    host = tmp_path / "probe"
    host.write_bytes(probe)
    host.chmod(0o755)
    vsock = subprocess.run([str(host), "vsock"], capture_output=True, text=True).stdout.strip()
    with open("/proc/sys/dev/tty/legacy_tiocsti") as f:
        tiocsti = "ok" if f.read().strip() == "1" else "EIO"
    out = job("for w in vsock tiocsti-own tioclinux rlimit-core prlimit-core; do /tmp/p $w; done",
              "--seccomp", "unconfined", probe=probe, check=None)
    assert out.split() == [vsock, tiocsti, "ENOTTY", "ok", "ok"]
    if vsock == "EAFNOSUPPORT":
        pytest.skip("this kernel has no AF_VSOCK: the filter's refusal is not told apart")


@needs_root
def test_the_filter_is_what_refuses_the_keyring_and_user_namespaces(probe):
    out = job("/tmp/p keyctl; /tmp/p unshare-user; /tmp/p clone-newuser", "--seccomp", "unconfined",
              probe=probe, check=None)
    assert out.split() == ["ok", "ok", "ok"]


@needs_root
def test_user_job_is_refused_too(probe):
    out = job("/tmp/p keyctl; /tmp/p unshare-user; /tmp/p mount-proc", "-u", "1000", probe=probe, check=None)
    assert out.split() == ["EPERM", "EPERM", "EPERM"]


@needs_root
def test_proc_and_sys_hardened(rootfs):
    out = job("for f in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug /proc/latency_stats; do "
              "  test -e $f || continue; echo $f $(cat $f 2>/dev/null | wc -c); done; "
              "test ! -e /proc/sysrq-trigger || echo b > /proc/sysrq-trigger || echo sysrq-refused; "
              "for f in /proc/sys/kernel/hostname /proc/sys/vm/drop_caches /proc/sys/kernel/core_pattern "
              "         /proc/sys/net/ipv4/ip_forward; do "
              "  (echo 1 > $f) 2>/dev/null && echo WROTE $f; done; "
              "ls -A /proc/acpi /sys/firmware 2>/dev/null; "
              "mkdir /sys/fs/cgroup/evil 2>/dev/null && echo CGROUP-MKDIR; "
              "touch /sys/fs/cgroup/evil 2>/dev/null && echo CGROUP-WRITE; "
              "for f in /sys/fs/cgroup/*/cgroup.procs /sys/fs/cgroup/cgroup.procs; do "
              "  test -e $f && (echo 1 > $f) 2>/dev/null && echo WROTE $f; done; "
              "cat /proc/sys/net/ipv4/ping_group_range; echo done", *rootfs)
    lines = out.strip().splitlines()
    assert lines[-1] == "done"
    for line in lines[:-2]:
        assert line.endswith(" 0") or line in ("sysrq-refused", "/proc/acpi:", "/sys/firmware:", ""), line
    assert lines[-2].split() == ["0", "2147483647"]


@needs_root
def test_core_dumps_off_for_good():
    """RLIMIT_CORE is 1 byte (no dump of any kind, see test_integrity_dev),
    soft and hard, and cannot be changed, lowered or raised."""
    out = job("grep 'core file' /proc/self/limits; ulimit -c 1024 2>/dev/null && echo RAISED; "
              "ulimit -S -c 0 2>/dev/null && echo LOWERED; echo done")
    assert out.split() == ["Max", "core", "file", "size", "1", "1", "bytes", "done"]


@needs_root
@pytest.mark.parametrize("opts", [(), ("--init",), ("-u", "1000")])
def test_no_host_binary_is_a_process_in_the_job(opts, rootfs):
    out = job("sleep 5 & pid=$!; ls -l /proc/[0-9]*/exe 2>&1; kill $pid", *opts, *rootfs)
    assert "/proc/1/exe -> " in out, out
    for bad in ("python", "/opt/jrun", "jrun.py"):
        assert bad not in out, out


@needs_root
def test_tiocsti_cannot_push_keystrokes_into_the_callers_terminal(probe):
    """The caller's terminal is jrun's controlling terminal; the job runs in
    a new session, so TIOCSTI on it is refused (CVE-2017-5226)."""
    master, slave = pty.openpty()

    def become_session_leader_of_the_pty():
        os.setsid()
        import fcntl
        import termios
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    try:
        p = subprocess.run(JRUN + ["--net", "none", "--", "/bin/sh", "-c",
                                   "cat > /tmp/p && chmod 755 /tmp/p && /tmp/p tiocsti"],
                           input=probe, stdout=subprocess.PIPE, stderr=slave, timeout=60,
                           preexec_fn=become_session_leader_of_the_pty)
    finally:
        os.close(slave)
        os.close(master)
    assert p.stdout.decode().strip() == "EPERM", p.stdout


@needs_root
def test_setuid_root_binary_gains_nothing(probe):
    out = job("chmod 4755 /tmp/p && /tmp/p as 1000 /tmp/p ids", probe=probe)
    assert out.split() == ["1000", "1000", "1000"]


@needs_root
@pytest.mark.parametrize("variant", ["cwd", "fd"])
def test_chroot_escape_stays_in_the_jobs_root(probe, variant, rootfs):
    out = job("ls -A / | sort | tr '\\n' ' '; echo; /tmp/p chroot-escape %s | tr ' ' '\\n' | sort | "
              "grep . | tr '\\n' ' '" % ("fd" if variant == "fd" else ""), *rootfs, probe=probe)
    mine, escaped = out.splitlines()
    assert escaped.split() == mine.split()  # the job's own root, not the host's
    assert "opt" not in escaped.split() or rootfs[1] == "host"


@needs_root
def test_job_dies_with_jrun_after_switching_user():
    """Switching uid clears PR_SET_PDEATHSIG; jrun arms it again."""
    name = "sec-pdeath-%d" % os.getpid()
    p = subprocess.Popen(JRUN + ["--net", "none", "--name", name, "-u", "1000", "--", "sleep", "300"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = None
    try:
        child, st = _job_process(p, "sleep")
        assert st["Uid"].split()[0] == "1000"
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        for _ in range(100):
            if not os.path.exists("/proc/%d" % child):
                break
            time.sleep(0.05)
        assert not os.path.exists("/proc/%d" % child)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if child and os.path.exists("/proc/%d" % child):  # the defence failed: end the orphan
            os.kill(child, signal.SIGKILL)
        jrun.gc_job(name)  # the state a SIGKILLed jrun left (this job's only)


@needs_root
def test_userns_maps_root_to_an_unprivileged_host_uid():
    name = "sec-userns-%d" % os.getpid()
    p = subprocess.Popen(JRUN + ["--net", "none", "--name", name, "--userns", "--", "/bin/sh", "-c",
                                 "cat /proc/self/uid_map /proc/self/gid_map; exec sleep 30"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pid, st = _job_process(p, "sleep")
        p.kill()
        out, _ = p.communicate()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        jrun.gc_job(name)
    uid_map, gid_map = out.decode().strip().splitlines()
    inside, base, count = _uid_map(uid_map)
    assert (inside, count) == (0, 65536) and _uid_map(gid_map) == (0, base, 65536)
    assert base >= 1 << 31 and base + count <= 1 << 32  # no host user, no /etc/subuid range
    # What the host sees: the job's root is that unprivileged uid, without
    # any capability in the host's namespaces.
    assert st["Uid"].split() == [str(base)] * 4 and st["Gid"].split() == [str(base)] * 4


@needs_root
def test_userns_root_has_power_over_nothing_but_its_own_files():
    out = job("cat /proc/self/status; "
              "mount -t tmpfs none /mnt 2>/dev/null && echo MOUNTED; "
              "hostname evil 2>/dev/null && echo HOSTNAME; "
              "mknod /tmp/sda b 8 0 2>/dev/null && echo MKNOD; "
              "(echo 1 > /proc/sys/kernel/ns_last_pid) 2>/dev/null && echo SYSCTL; "
              "echo done", "--userns", "--cap-add", "ALL", "--seccomp", "unconfined")
    st = status(out)
    assert int(st["CapEff"], 16) & (1 << jrun.CAPABILITIES.index("SYS_ADMIN"))  # all of them, inside
    assert out.split()[-1] == "done" and not {"MOUNTED", "HOSTNAME", "MKNOD", "SYSCTL"} & set(out.split())


@needs_root
def test_userns_job_root_owns_its_root_filesystem():
    out = job("stat -c %u:%g /bin/busybox /etc /work /tmp /; stat -c %u /dev /proc; "
              "echo hi > /etc/motd && echo x >> /etc/hosts && mkdir /srv/new -p && touch /work/f && echo wrote",
              "--userns")
    assert out.split() == ["0:0"] * 5 + ["65534", "65534", "wrote"]  # /dev, /proc: the host's, unmapped
    out = job("id -u; stat -c %u /work; grep CapEff /proc/self/status", "--userns", "-u", "1000")
    assert out.split() == ["1000", "1000", "CapEff:", "0000000000000000"]


def _colliding_names():
    """Two job names whose uid range slot (jrun's hash) is the same."""
    first = "sec-slot-a%d" % os.getpid()
    want = jrun._fnv1a(first) % jrun.USERNS_SLOTS
    for i in range(2_000_000):
        other = "sec-slot-b%d" % i
        if jrun._fnv1a(other) % jrun.USERNS_SLOTS == want:
            return first, other
    pytest.skip("no collision found")


@needs_root
def test_userns_ranges_are_per_job_and_stable_per_name():
    a, b = _colliding_names()
    first = _uid_map(job("cat /proc/self/uid_map", "--userns", "--name", a))
    assert _uid_map(job("cat /proc/self/uid_map", "--userns", "--name", a)) == first  # same name, same uids
    # While A runs, B (same slot) gets the next free range.
    p = subprocess.Popen(JRUN + ["--net", "none", "--name", a, "--userns", "--", "sleep", "30"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _job_process(p, "sleep")
        second = _uid_map(job("cat /proc/self/uid_map", "--userns", "--name", b))
    finally:
        p.kill()
        p.wait()
        jrun.gc_job(a)
    assert second[1] != first[1] and second[1] % 65536 == 0


@needs_root
def test_userns_files_in_a_volume_are_owned_by_the_mapped_uid(tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    os.chmod(vol, 0o1777)
    p = run_jrun("--net", "none", "--userns", "-v", "%s:/data" % vol, "--", "/bin/sh", "-c",
                 "cat /proc/self/uid_map; touch /data/made-by-job")
    assert p.returncode == 0, p.stderr
    base = _uid_map(p.stdout)[1]
    st = os.stat(vol / "made-by-job")
    assert (st.st_uid, st.st_gid) == (base, base)


@pytest.fixture
def probe_rootfs(tmp_path, probe):
    """A copy of the minimal rootfs with the probe installed setuid root
    and a user whose uid is above --userns's range."""
    root = tmp_path / "rootfs"
    subprocess.run(["cp", "-a", "/var/lib/jrun/rootfs", str(root)], check=True)
    path = root / "usr/bin/probe"
    path.write_bytes(probe)
    os.chown(path, 0, 0)
    os.chmod(path, 0o4755)
    with open(root / "etc/passwd", "a") as f:
        f.write("big:x:70000:70000:big:/:/bin/sh\n")
    return str(root)


@needs_root
def test_setuid_root_binary_of_the_rootfs_gains_nothing_for_a_user(probe_rootfs):
    out = job("ls -ln /usr/bin/probe; /usr/bin/probe ids", "--rootfs", probe_rootfs, "-u", "1000")
    mode, _, owner = out.split()[:3]
    assert mode == "-rwsr-xr-x" and owner == "0"
    assert out.split()[-3:] == ["1000", "1000", "1000"]


@needs_root
def test_userns_refuses_a_user_outside_the_mapped_range(probe_rootfs):
    assert job("id -u", "--rootfs", probe_rootfs, "-u", "big").split() == ["70000"]
    p = run_jrun("--net", "none", "--rootfs", probe_rootfs, "--userns", "-u", "big", "--", "id")
    assert p.returncode == 125 and "is not mapped under --userns" in p.stderr, p.stderr
    p = run_jrun("--net", "none", "--userns", "-u", "70000", "--", "id")
    assert p.returncode == 125 and "is not mapped under --userns" in p.stderr, p.stderr
