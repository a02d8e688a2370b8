"""The core runner, black-box: the real jrun, as root, on this kernel."""
import os
import signal
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import JRUN, jrun, jrun_in_pty, needs_root, sh, state_dirs

pytestmark = needs_root

# The rootfs's own entries and jrun's mount points: nothing of jrun's (its
# stamp is beside the rootfs) and no busybox linuxrc.
MINIMAL_TOP = {"bin", "dev", "etc", "home", "mnt", "proc", "root", "run", "sbin", "sys", "tmp", "usr", "var", "work"}


def test_job_sees_only_its_own_processes_and_is_pid_1():
    p = sh("ps -o pid,args; true", check=0)
    rows = [line.split(None, 1) for line in p.stdout.strip().splitlines()[1:]]
    assert rows[0] == ["1", "/bin/sh -c ps -o pid,args; true"]
    assert len(rows) == 2, p.stdout  # sh and ps, nothing of the host
    assert str(os.getpid()) not in [r[0] for r in rows[2:]]


def test_root_is_the_minimal_rootfs():
    p = sh("ls -a /", check=0)
    assert set(p.stdout.split()) - {".", ".."} == MINIMAL_TOP


def test_host_marker_is_unreachable(tmp_path):
    marker = "jrun-marker-" + uuid.uuid4().hex
    for d in ("/tmp", "/root", str(tmp_path)):
        with open(os.path.join(d, marker), "w") as f:
            f.write("secret")
    try:
        p = sh("find / -name '%s' 2>/dev/null; cat /tmp/%s /root/%s %s/%s; echo done"
               % (marker, marker, marker, tmp_path, marker), check=0)
        assert "secret" not in p.stdout and marker not in p.stdout
        assert p.stdout.strip().endswith("done")
    finally:
        for d in ("/tmp", "/root"):
            os.unlink(os.path.join(d, marker))


def test_mountinfo_names_no_host_path_and_old_root_is_gone():
    host_root_dev = os.stat("/").st_dev
    host_majmin = "%d:%d" % (os.major(host_root_dev), os.minor(host_root_dev))
    p = sh("cat /proc/self/mountinfo", check=0)
    lines = p.stdout.strip().splitlines()
    points = {line.split()[4] for line in lines}
    assert "/" in points and "/proc" in points
    for line in lines:
        fields = line.split()
        assert fields[2] != host_majmin, "a host filesystem is mounted in the job: " + line
        for host_path in ("/run/jrun", "/var/lib/jrun", "/root", "/home", "/work/main"):
            assert host_path not in line.split(" - ")[1], line
    # Everything is mounted at or below the new root; no mount named after a
    # directory of the old root (oldroot, .pivot, ...) remains.
    assert all(pt.split("/")[1] in MINIMAL_TOP | {""} for pt in points), points


def test_mounts_are_private():
    p = sh("cat /proc/self/mountinfo", check=0)
    for line in p.stdout.strip().splitlines():
        optional = line.split(" - ")[0].split()[6:]
        assert not any(o.startswith(("shared:", "master:")) for o in optional), line


def test_minimal_dev_only():
    p = sh("ls /dev; ls /dev/pts", check=0)
    names = set(p.stdout.split())
    assert names == {"fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin",
                     "stdout", "tty", "urandom", "zero"}
    p = sh("echo x > /dev/null && head -c 4 /dev/zero | od -An -tx1 && test ! -e /dev/sda && "
           "test ! -e /dev/mem && test ! -e /dev/kmsg", check=0)
    assert p.stdout.split() == ["00", "00", "00", "00"]


def test_proc_is_the_jobs_own():
    p = sh("ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '", check=0)
    pids = [int(x) for x in p.stdout.split()]
    assert pids and max(pids) < 10, pids


@pytest.mark.parametrize("cmd,code", [
    ("exit 0", 0), ("exit 3", 3), ("exit 255", 255),
])
def test_exit_status_is_commands_own(cmd, code):
    assert sh(cmd).returncode == code


def test_exit_127_not_found():
    p = jrun("--net", "none", "--", "no-such-command-xyz")
    assert p.returncode == 127
    assert p.stderr.startswith("jrun: ") and "no-such-command-xyz" in p.stderr
    assert "not found" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_exit_126_not_executable():
    p = jrun("--net", "none", "--", "/etc/passwd")
    assert p.returncode == 126
    assert p.stderr.startswith("jrun: ") and "/etc/passwd" in p.stderr


def test_exit_126_directory_given_as_a_path():
    # As the shell and docker: found, but a directory cannot be executed.
    for cmd in ("/tmp", "/tmp/"):
        p = jrun("--net", "none", "--", cmd)
        assert p.returncode == 126, p.stderr
        assert p.stderr == "jrun: %s: is a directory, not a program\n" % cmd
    p = jrun("--net", "none", "--", "/no/such/program")
    assert p.returncode == 127 and "not found" in p.stderr


def test_path_lookup_skips_directories(tmp_path):
    """A directory on PATH named like COMMAND is not COMMAND (sh and Go's
    LookPath skip it): the next PATH entry wins, or 127 if none has it."""
    for d in ("true", "nothere"):
        (tmp_path / "bin" / d).mkdir(parents=True)
    opts = ("-q", "--net", "none", "--upload", "%s:/opt/bin" % (tmp_path / "bin"), "-e", "PATH=/opt/bin:/bin")
    assert jrun(*opts, "--", "true").returncode == 0
    p = jrun(*opts, "--", "nothere")
    assert p.returncode == 127 and p.stderr == "jrun: nothere: command not found in the job's root\n"


def test_arguments_and_environment_that_are_not_utf8_pass_byte_exact():
    """Linux allows any bytes but NUL in an argument (file names in other
    encodings): the job gets exactly those bytes, and jrun names them
    exactly in its messages."""
    arg, val = b"caf\xe9 \xff\x80\\x", b"\xe8t\xe9"
    p = subprocess.run(JRUN + ["--net", "none", "-e", b"X=" + val, "--", "/bin/sh", "-c",
                               'printf %s "$1" | od -An -tx1; echo -; printf %s "$X" | od -An -tx1', "sh", arg],
                       capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    got_arg, got_val = p.stdout.split(b"-\n")
    assert got_arg.split() == [b"%02x" % c for c in arg]
    assert got_val.split() == [b"%02x" % c for c in val]
    p = subprocess.run(JRUN + ["--net", "none", "--", b"/no/such/\xe9"], capture_output=True, timeout=60)
    assert p.returncode == 127 and p.stderr == b"jrun: /no/such/\xe9: command not found in the job's root\n"


def test_exit_126_script_without_interpreter_is_127():
    p = sh("printf '#!/usr/bin/python3\\nprint(1)\\n' > /tmp/s; chmod +x /tmp/s; /tmp/s")
    assert p.returncode == 127  # the shell's own verdict, passed through


def test_exit_125_bad_option_creates_nothing():
    name = "badopt-" + uuid.uuid4().hex[:6]
    p = jrun("--name", name, "--memory", "12Q", "--", "true")
    assert p.returncode == 125
    assert p.stderr.startswith("jrun: --memory") and len(p.stderr.strip().splitlines()) == 1
    p = jrun("--name", name, "--timeout", "never", "--", "true")
    assert p.returncode == 125 and "--timeout" in p.stderr
    assert name not in state_dirs()


def test_exit_128_plus_signal_with_init():
    p = jrun("--net", "none", "--init", "--", "/bin/sh", "-c", "kill -USR1 $$")
    assert p.returncode == 128 + signal.SIGUSR1, p.stderr


def test_stdin_is_piped_through():
    p = jrun("--net", "none", "--", "cat", input="hi\n", check=0)
    assert p.stdout == "hi\n"


def test_environment_is_clean():
    env = dict(os.environ, JRUN_TEST_SECRET="leak", TERM="xterm-256color")
    p = jrun("--net", "none", "--name", "envtest-" + uuid.uuid4().hex[:6], "--", "env", env=env, check=0)
    got = dict(line.split("=", 1) for line in p.stdout.strip().splitlines())
    assert "JRUN_TEST_SECRET" not in got and "SUDO_USER" not in got
    assert got["PATH"].startswith("/usr/local/sbin") and got["HOME"] == "/root"
    assert got["TERM"] == "xterm-256color"
    assert got["JRUN_JOB_ID"].startswith("envtest-")
    assert set(got) <= {"PATH", "HOME", "TERM", "HOSTNAME", "JRUN_JOB_ID", "container", "PWD", "SHLVL"}


def test_name_is_hostname_and_hostname_option_wins():
    name = "host-" + uuid.uuid4().hex[:6]
    assert sh("hostname", "--name", name, check=0).stdout.strip() == name
    assert sh("hostname; cat /etc/hostname", "--name", name, "--hostname", "box",
              check=0).stdout.split() == ["box", "box"]


def test_workdir_and_tmp_are_writable():
    p = sh("pwd; echo a > /work/a && echo b > /tmp/b && echo c > /etc/c && cat /work/a /tmp/b /etc/c", check=0)
    assert p.stdout.split() == ["/work", "a", "b", "c"]


def test_prebuilt_rootfs_is_never_modified():
    before = sorted(os.listdir("/var/lib/jrun/rootfs/bin"))
    sh("rm -f /bin/ls; echo x > /bin/new-file; rm -rf /etc", check=0)
    assert sorted(os.listdir("/var/lib/jrun/rootfs/bin")) == before
    assert os.path.isfile("/var/lib/jrun/rootfs/etc/passwd")


def test_two_jobs_writes_are_invisible_to_each_other():
    tag = uuid.uuid4().hex
    a = subprocess.Popen(JRUN + ["--net", "none", "--", "/bin/sh", "-c",
                                 "echo %s > /etc/marker; echo ready; sleep 5" % tag],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert a.stdout.readline().strip() == "ready"
        p = sh("cat /etc/marker 2>/dev/null; ls /etc")
        assert tag not in p.stdout and "marker" not in p.stdout
    finally:
        a.kill()
        a.wait()
        jrun("gc")  # the state and cgroup that the SIGKILLed jrun left


def test_leaked_fd_is_not_inherited():
    r, w = os.pipe()
    fd = os.dup2(w, 19)
    try:
        p = subprocess.run(JRUN + ["--net", "none", "--", "/bin/sh", "-c",
                                   "ls /proc/self/fd; test -e /proc/self/fd/19 && echo LEAK; true"],
                           pass_fds=(fd,), capture_output=True, text=True, timeout=30)
        assert p.returncode == 0 and "LEAK" not in p.stdout
        assert set(p.stdout.split()) <= {"0", "1", "2", "3"}  # 3: the directory ls reads
    finally:
        for f in (r, w, fd):
            os.close(f)


def test_timeout_exits_124_and_says_so():
    t = time.monotonic()
    p = jrun("--net", "none", "--timeout", "1", "--stop-timeout", "1", "--", "sleep", "60")
    took = time.monotonic() - t
    assert p.returncode == 124
    assert "timed out" in p.stderr and "SIGKILL" in p.stderr  # sleep as PID 1 ignores SIGTERM
    assert took < 10


def test_timeout_with_handler_exits_124_without_sigkill():
    p = jrun("--net", "none", "--timeout", "1", "--", "/bin/sh", "-c",
             "trap 'exit 0' TERM; while :; do sleep 0.1; done")
    assert p.returncode == 124 and "SIGKILL" not in p.stderr


def _start(*args):
    proc = subprocess.Popen(JRUN + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def test_sigterm_reaches_the_job():
    proc = _start("--net", "none", "--", "/bin/sh", "-c",
                  "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 7 and "got-term" in out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGQUIT])
def test_other_signals_reach_the_job(sig):
    proc = _start("--net", "none", "--", "/bin/sh", "-c",
                  "trap 'echo got-it; exit 9' %s; echo ready; while :; do sleep 0.1; done"
                  % sig.name[3:])
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 9 and "got-it" in out


def test_the_job_starts_with_no_signal_ignored_or_blocked():
    """What jrun's caller ignores or blocks (a shell ignores SIGINT and
    SIGQUIT in what it starts with `&`; `trap '' TERM` in a batch script)
    is not the job's: its PID 1 could not trap a signal ignored on entry,
    and would be deaf to what jrun relays."""
    def caller_ignores_and_blocks():
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2, signal.SIGHUP})
    p = subprocess.run(JRUN + ["--net", "none", "--", "/bin/grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"],
                       capture_output=True, text=True, preexec_fn=caller_ignores_and_blocks, timeout=30)
    assert p.returncode == 0, p.stderr
    masks = dict(line.split(":\t") for line in p.stdout.splitlines())
    assert int(masks["SigIgn"], 16) == 0 and int(masks["SigBlk"], 16) == 0, masks
    # And so a trap for SIGINT works, and jrun's relayed SIGINT reaches it.
    proc = subprocess.Popen(JRUN + ["--net", "none", "--", "/bin/sh", "-c",
                                    "trap 'echo got-it; exit 9' INT; echo ready; while :; do sleep 0.1; done"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGQUIT, signal.SIG_IGN))
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 9 and "got-it" in out


def test_sigterm_escalates_to_sigkill_after_grace():
    proc = _start("--net", "none", "--stop-timeout", "1", "--", "/bin/sh", "-c",
                  "trap '' TERM; echo ready; while :; do sleep 0.1; done")
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 128 + signal.SIGKILL
    assert "SIGKILL" in err and time.monotonic() - t < 8


def test_init_is_pid_1_and_forwards_signals():
    p = sh("ps -o pid,args; true", "--init", check=0)
    rows = [line.split(None, 1) for line in p.stdout.strip().splitlines()[1:]]
    assert rows[0][0] == "1" and rows[0][1].startswith("/dev/init")
    assert rows[1][1].startswith("/bin/sh")
    proc = _start("--net", "none", "--init", "--", "/bin/sh", "-c",
                  "trap 'exit 5' TERM; echo ready; while :; do sleep 0.1; done")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=10)
    assert proc.returncode == 5


def test_init_reaps_zombies():
    # An orphan that exits is re-parented to PID 1; tini reaps it.
    p = sh("(sh -c 'sleep 0.2 &' ); sleep 1; ps -o stat,args | grep -c '^Z' || true", "--init", check=0)
    assert p.stdout.strip().splitlines()[-1] == "0"


def test_init_is_read_only_and_no_host_interpreter_inside():
    p = sh("echo x > /dev/init; ls -l /proc/*/exe 2>/dev/null", "--init")
    assert "python" not in p.stdout
    assert "Read-only" in p.stderr or "read-only" in p.stderr.lower()


def _job_pids(tag):
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    if tag.encode() in f.read():
                        pids.append(int(pid))
            except OSError:
                pass
    return pids


def test_kill_9_of_jrun_kills_the_job_and_gc_cleans_up():
    tag = "jrun-kill9-" + uuid.uuid4().hex[:8]
    name = tag[:30]
    proc = subprocess.Popen(JRUN + ["--net", "none", "--name", name, "--", "/bin/sh", "-c",
                                    "echo ready; sleep 1000 & sleep 1001; : %s" % tag],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    job = [p for p in _job_pids(tag) if p != proc.pid]
    assert job, "job process not found"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while _job_pids(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _job_pids(tag) == []
    assert name in state_dirs()  # left behind by the SIGKILLed jrun ...
    jrun("gc", check=0)
    assert name not in state_dirs()  # ... and removed by gc


def test_duplicate_name_is_refused_while_running():
    name = "dup-" + uuid.uuid4().hex[:6]
    proc = _start("--net", "none", "--name", name, "--", "/bin/sh", "-c", "echo ready; sleep 30")
    try:
        p = jrun("--net", "none", "--name", name, "--", "true")
        assert p.returncode == 125 and "already running" in p.stderr and name in p.stderr
    finally:
        proc.kill()
        proc.wait()
    jrun("gc")
    assert sh("true", "--name", name).returncode == 0  # free again after gc


def test_twenty_concurrent_jobs():
    names = ["conc-%02d-%s" % (i, uuid.uuid4().hex[:4]) for i in range(20)]

    def one(n):
        return sh("hostname; echo data > /work/f; cat /work/f", "--name", n)

    with ThreadPoolExecutor(20) as ex:
        results = list(ex.map(one, names))
    for n, p in zip(names, results):
        assert p.returncode == 0, p.stderr
        assert p.stdout.split() == [n, "data"]


def test_debug_audit_trail():
    p = sh("true", "--log-level", "debug", check=0)
    for step in ("namespaces created", "mounts made private", "root pivoted", "old root detached",
                 "/proc remounted", "minimal /dev", "file descriptors above 2 closed", "exec "):
        assert step in p.stderr, step
    q = sh("true", check=0)
    assert q.stderr == ""


def test_interactive_shell_in_a_terminal():
    out, status = jrun_in_pty("--net", "none", "--", "/bin/sh", "-i", input=b"echo $((6*7))x\nexit 4\n")
    assert b"42x" in out, out
    assert status == 4
