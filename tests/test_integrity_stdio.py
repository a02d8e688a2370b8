"""A hostile job leaves the host as it found it: its stdio and its supervision.

Black-box, as root: each attack test snapshots what the job could touch
through its fds 0-2 on the host (the files, fifo, terminal or /dev/null
behind them: mode, owner, size, content, mtime), runs the hostile job, asserts
that nothing changed and restores whatever did, so that a failure never
leaves the machine damaged.  Then what must keep working: output byte for
byte, ordering, EOF, exit codes, the job's own terminal; and the
supervision: ptrace, stop semantics, the death of jrun's caller, fds above
2^20.
"""
import fcntl
import hashlib
import json
import os
import pty
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import termios
import time

import pytest

from conftest import JRUN, needs_root

pytestmark = needs_root

HERE = os.path.dirname(os.path.abspath(__file__))
MACHINE = os.uname().machine
MODES = {"default": (), "rootfs-host": ("--rootfs", "host"), "user": ("-u", "1000"), "userns": ("--userns",)}

# What a hostile job tries on its fds 0-2, through copies (5-7) that no
# redirection moves (busybox runs chmod inside the shell, redirections and
# all): setuid, chown, a new mtime, truncation and a write through /proc
# (reopened read-write).  It reports what fds 0-2 are and their modes: its
# chmod went through, on what jrun gave it (its user owns that).  Nothing is
# redirected to /dev/null, which may still be the host's node in the job.
ATTACK = r"""
cat > /tmp/stdin
exec 5<&0 6>&1 7>&2
{
  for n in 5 6 7; do
    chmod 4777 /proc/$$/fd/$n
    chown 1234:1234 /proc/$$/fd/$n
    touch -d '2001-02-03 04:05' /proc/$$/fd/$n
  done
  (echo EVIL 1<>/proc/$$/fd/5; : > /proc/$$/fd/5)
} 2>>/tmp/errors
exec 5<&- 6>&- 7>&-
for n in 0 1 2; do echo "fd$n $(stat -L -c '%a %u' /proc/$$/fd/$n) $(readlink /proc/$$/fd/$n)" >&2; done
exit 7
"""


def jrun_proc(args, timeout=60, **kw):
    return subprocess.run(JRUN + ["--net", "none"] + list(args), timeout=timeout, **kw)


def snapshot(path, written=False):
    """What a job could change about PATH (following no link).  For a file
    the job's output is WRITTEN to, only its mode and owner, and that its
    mtime is not in the past (a `touch -d` through /proc/self/fd)."""
    st = os.lstat(path)
    if written:
        return {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "mtime": st.st_mtime > 1e9 + 3e8}
    digest = None
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    return {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "size": st.st_size,
            "mtime": st.st_mtime_ns, "sha256": digest}


def restore(path, snap):
    """Put back mode, owner and times that a failed defence let a job change."""
    st = os.lstat(path)
    if (st.st_uid, st.st_gid) != (snap["uid"], snap["gid"]):
        os.chown(path, snap["uid"], snap["gid"])
    if stat.S_IMODE(st.st_mode) != stat.S_IMODE(snap["mode"]):
        os.chmod(path, stat.S_IMODE(snap["mode"]))
    if snap["mtime"] is not True and st.st_mtime_ns != snap["mtime"] and stat.S_ISREG(st.st_mode):
        os.utime(path, ns=(snap["mtime"], snap["mtime"]))


def assert_unchanged(paths_before, written=()):
    """Compare, restore what changed, then fail naming it."""
    changed = {}
    for path, before in paths_before.items():
        after = snapshot(path, path in written)
        if after != before:
            changed[path] = (before, after)
            restore(path, before)
    assert not changed, "the job changed host files: %r" % changed


def _host_null_is_the_jobs():
    """True while the job's /dev/null is a bind of the host's node (before
    the /dev change of issue 10's second item): then no stdio fix can keep a
    job from chmodding it, through its fd or by path."""
    p = jrun_proc(["--", "stat", "-L", "-c", "%d %i", "/dev/null"], capture_output=True, text=True)
    st = os.stat("/dev/null")
    return p.stdout.split() == [str(st.st_dev), str(st.st_ino)]


@pytest.fixture(scope="module")
def host_null():
    if _host_null_is_the_jobs():
        pytest.skip("the job's /dev/null is still a bind of the host's (its /dev of its own is another change)")


class Terminal:
    """A pty standing in for the invoker's terminal; jrun runs with it as its
    controlling terminal and in its foreground, as from an interactive shell."""

    def __init__(self, rows=33, cols=111):
        self.master, self.slave = pty.openpty()
        self.path = os.ttyname(self.slave)
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.attrs = termios.tcgetattr(self.slave)
        self.out = b""

    def take(self):  # preexec_fn: a session of its own, this terminal its controlling one
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    def start(self, args, background=False):
        argv = JRUN + ["--net", "none"] + list(args)
        if background:  # a shell runs jrun as a background job: another process group than the terminal's
            argv = [sys.executable, "-c", "import os, sys\n"
                    "pid = os.fork()\n"
                    "if pid == 0:\n    os.setpgid(0, 0); os.execv(sys.argv[1], sys.argv[1:])\n"
                    "sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))"] + argv
        return subprocess.Popen(argv, stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                preexec_fn=self.take)

    def read_until(self, marker, proc=None, timeout=15):
        deadline = time.monotonic() + timeout
        while marker not in self.out and time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.out += os.read(self.master, 65536)
                except OSError:
                    break
            elif proc is not None and proc.poll() is not None:
                break
        return marker in self.out

    def run(self, args, keys=(), timeout=20, background=False):
        """Run jrun; for each (marker, bytes) in KEYS, type BYTES once MARKER
        was shown (MARKER may also be a test of jrun's process, polled).
        Returns the exit status."""
        proc = self.start(args, background)
        try:
            for marker, data in keys:
                if callable(marker):
                    deadline = time.monotonic() + 15
                    while not marker(proc) and proc.poll() is None and time.monotonic() < deadline:
                        self.read_until(b"\0never", timeout=0.05)
                    assert marker(proc), self.out
                else:
                    assert self.read_until(marker, proc), self.out
                os.write(self.master, data)
            proc.wait(timeout=timeout)
            self.read_until(b"\0never", timeout=0.3)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return proc.returncode

    def close(self):
        os.close(self.slave)
        os.close(self.master)


@pytest.fixture
def terminal():
    t = Terminal()
    yield t
    t.close()


# ---------------------------------------------------------------------------
# Attacks through fds 0-2
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["file", "fifo", "pipe"])
def test_a_hostile_job_cannot_change_the_files_behind_its_stdio(tmp_path, kind, mode):
    paths = {}
    opened = []
    if kind == "file":
        for n, content in ((0, b"input\x00\xff no newline"), (1, b""), (2, b"")):
            path = tmp_path / ("fd%d" % n)
            path.write_bytes(content)
            os.chmod(path, 0o644)
            paths[n] = str(path)
        stdio = [open(paths[0], "rb"), open(paths[1], "wb"), open(paths[2], "wb")]
        opened += stdio
    elif kind == "fifo":  # named fifos are host inodes like any file
        for n in (0, 1):
            paths[n] = str(tmp_path / ("fifo%d" % n))
            os.mkfifo(paths[n], 0o644)
        feeder = subprocess.Popen(["sh", "-c", "printf 'in' > %s" % paths[0]])
        drainer = subprocess.Popen(["cat", paths[1]], stdout=subprocess.PIPE)
        stdio = [open(paths[0], "rb"), open(paths[1], "wb"), subprocess.PIPE]
        opened += stdio[:2]
    else:  # anonymous pipes pass through: nothing of the host is behind them
        stdio = [subprocess.PIPE] * 3
    written = {paths[n] for n in (1, 2) if n in paths}
    if kind == "fifo":  # a fifo's mtime is its last write's, the feeder's too
        written.add(paths[0])
    before = {p: snapshot(p, p in written) for p in list(paths.values()) + ["/dev/null"]}
    try:
        p = subprocess.Popen(JRUN + ["--net", "none", *MODES[mode], "--", "/bin/sh", "-c", ATTACK],
                             stdin=stdio[0], stdout=stdio[1], stderr=stdio[2])
        for f in opened:
            f.close()
        out, err = p.communicate(b"input" if kind == "pipe" else None, timeout=60)
        if kind == "fifo":
            feeder.wait(timeout=10)
            drainer.communicate(timeout=10)
        assert p.returncode == 7
    finally:
        assert_unchanged(before, written)
    report = err if kind != "file" else open(paths[2], "rb").read()
    lines = report.decode().splitlines()
    assert [x.split()[0] for x in lines if x.startswith("fd")] == ["fd0", "fd1", "fd2"], report
    for line in lines:
        if line.startswith("fd") and line[2] in "012"[:len(paths)]:  # the fds that were host files
            # The attack ran (chmod, and chown if root: it clears the setuid bit), on jrun's pipes.
            assert "pipe:[" in line and line.split()[1].endswith("777"), line


@pytest.mark.parametrize("mode", MODES)
def test_a_hostile_job_cannot_change_the_callers_terminal(terminal, mode):
    # jrun writes the job's output to the terminal, and the kernel stamps a
    # tty's mtime on writes (rounded down to 8 s): it counts as written to.
    before = {terminal.path: snapshot(terminal.path, written=True), "/dev/null": snapshot("/dev/null")}
    try:
        status = terminal.run([*MODES[mode], "--", "/bin/sh", "-c", ATTACK.replace("cat > /tmp/stdin", "")])
    finally:
        assert_unchanged(before, written={terminal.path})
    assert status == 7, terminal.out
    report = [x.split() for x in terminal.out.decode().splitlines() if x.startswith("fd")]
    assert len(report) == 3 and all(x[1].endswith("777") and x[3] == "/dev/pts/0" for x in report), report
    assert termios.tcgetattr(terminal.slave) == terminal.attrs


def test_a_hostile_job_cannot_change_the_hosts_dev_null(host_null):
    before = {"/dev/null": snapshot("/dev/null")}
    try:
        with open("/dev/null", "rb+") as null:
            p = jrun_proc(["--", "/bin/sh", "-c", ATTACK], stdin=null, stdout=null, stderr=null)
    finally:
        assert_unchanged(before)
    assert p.returncode == 7


def _job_pid(name, timeout=15):
    """The host PID of the job's PID 1 once it has exec'd COMMAND (before,
    it is jrun's child, which holds the caller's fds until its last steps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open("/run/jrun/%s/job.json" % name) as f:
                pid = json.load(f).get("pid")
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                if not f.read().startswith(JRUN[0].encode()):
                    return pid
        except (OSError, ValueError, TypeError):
            pass
        time.sleep(0.05)
    raise AssertionError("job %s did not start" % name)


@pytest.mark.parametrize("kind", ["file", "terminal", "null"])
def test_no_fd_of_the_job_is_a_host_inode(tmp_path, kind, terminal):
    """Seen from the host: every fd of the job's PID 1, none the caller's."""
    if kind == "null" and _host_null_is_the_jobs():
        pytest.skip("the job's /dev/null is still a bind of the host's (its /dev of its own is another change)")
    name = "stdio-fds-%d-%s" % (os.getpid(), kind)
    args = ["--net", "none", "--name", name, "--", "sleep", "30"]
    if kind == "terminal":
        proc, host = terminal.start(args[2:]), [terminal.path]
    else:
        path = tmp_path / "f" if kind == "file" else "/dev/null"
        if kind == "file":
            path.write_bytes(b"x")
        f = open(path, "rb+")
        proc, host = subprocess.Popen(JRUN + args, stdin=f, stdout=f, stderr=f), [str(path)]
        f.close()
    try:
        pid = _job_pid(name)
        ours = {(os.stat(p).st_dev, os.stat(p).st_ino) for p in host}
        fds = {}
        for fd in os.listdir("/proc/%d/fd" % pid):
            st = os.stat("/proc/%d/fd/%s" % (pid, fd))
            fds[fd] = (st.st_dev, st.st_ino)
        assert {"0", "1", "2"} <= set(fds)
        assert not ours & set(fds.values()), (fds, ours)
    finally:
        proc.send_signal(signal.SIGTERM)  # sleep as PID 1: SIGKILL at once
        proc.wait(timeout=15)
    assert proc.returncode == 128 + signal.SIGKILL


def test_verify_has_a_stdio_check_that_passes_here():
    import jrun as J

    assert "Stdio" in dict(J.VERIFY_CHECKS)
    ok, evidence, why, fix = J.verify_stdio(J._Verifier([]))
    assert ok and "the job holds pipe:[" in evidence and "mode 644" in evidence, evidence
    assert "chmod 4755 through /proc ran" in evidence  # the job tried, on its own pipe


# ---------------------------------------------------------------------------
# What must keep working
# ---------------------------------------------------------------------------

BLOB = os.urandom(3 << 20) + b"no trailing newline"


@pytest.mark.parametrize("to", ["file", "append", "pipe"])
def test_output_is_delivered_byte_for_byte(tmp_path, to):
    blob = tmp_path / "blob"
    blob.write_bytes(BLOB)
    args = ["--upload", "%s:/work/blob" % blob, "-q", "--", "/bin/sh", "-c", "cat /work/blob; cat /work/blob >&2; exit 5"]
    if to == "pipe":
        p = jrun_proc(args, capture_output=True)
        out, err = p.stdout, p.stderr
    else:
        mode = "ab" if to == "append" else "wb"  # append: O_APPEND, which splice refuses (read/write)
        with open(tmp_path / "out", mode) as o, open(tmp_path / "err", mode) as e:
            p = jrun_proc(args, stdout=o, stderr=e)
        out, err = (tmp_path / "out").read_bytes(), (tmp_path / "err").read_bytes()
    assert p.returncode == 5
    assert out == BLOB and err == BLOB


def test_stdout_and_stderr_to_one_file_keep_their_order(tmp_path):
    script = "i=0; while [ $i -lt 2000 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done"
    with open(tmp_path / "log", "wb") as f:
        p = jrun_proc(["--", "/bin/sh", "-c", script], stdout=f, stderr=subprocess.STDOUT)
    assert p.returncode == 0
    want = "".join("out%d\nerr%d\n" % (i, i) for i in range(2000))
    assert (tmp_path / "log").read_text() == want


def test_jrun_s_own_messages_come_after_the_job_s_output(tmp_path):
    with open(tmp_path / "err", "wb") as f:
        p = jrun_proc(["--timeout", "1", "--", "/bin/sh", "-c", "echo before >&2; exec sleep 10"], stderr=f)
    assert p.returncode == 124
    lines = (tmp_path / "err").read_text().splitlines()
    assert lines[0] == "before" and "timed out" in lines[1], lines


def test_a_reader_that_stops_reading_does_not_keep_jrun_past_its_timeout(tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    reader = subprocess.Popen(["sh", "-c", "exec cat > /dev/null < %s" % fifo])
    try:
        with open(fifo, "wb") as f:
            reader.send_signal(signal.SIGSTOP)  # it has the fifo open, and reads nothing more
            t = time.monotonic()
            p = jrun_proc(["--timeout", "2", "--stop-timeout", "1", "--", "head", "-c", "50000000", "/dev/zero"],
                          stdout=f, stderr=subprocess.PIPE, text=True)
        assert p.returncode == 124 and time.monotonic() - t < 8
        assert "output was not all delivered" in p.stderr, p.stderr
    finally:
        reader.send_signal(signal.SIGCONT)
        reader.kill()
        reader.wait()


def test_a_stdin_file_is_read_to_its_end_and_eof_is_seen(tmp_path):
    data = os.urandom(2 << 20)
    (tmp_path / "in").write_bytes(data)
    with open(tmp_path / "in", "rb") as f:
        p = jrun_proc(["--", "/bin/sh", "-c", "md5sum; echo eof-seen; exit 3"], stdin=f, capture_output=True)
    assert p.returncode == 3
    assert p.stdout.decode().split() == [hashlib.md5(data).hexdigest(), "-", "eof-seen"]


def test_a_job_that_does_not_read_a_large_stdin_does_not_hang_jrun(tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(256 << 20)
    with open(big, "rb") as f:
        p = jrun_proc(["--", "/bin/sh", "-c", "sleep 0.2; exit 4"], stdin=f, timeout=30)
        assert p.returncode == 4
        assert os.lseek(f.fileno(), 0, os.SEEK_CUR) == 0  # what the job did not read is given back
    with open(big, "rb") as f:  # the caller's offset is where the job stopped reading
        p = jrun_proc(["--", "dd", "bs=1", "count=10", "status=none"], stdin=f, stdout=subprocess.DEVNULL)
        assert p.returncode == 0 and os.lseek(f.fileno(), 0, os.SEEK_CUR) == 10


@pytest.mark.parametrize("how", ["closed", "null"])
def test_closed_or_null_stdio_is_the_jobs_own_dev_null(how):
    script = "ls -l /proc/self/fd/0 /proc/self/fd/2 > /proc/self/fd/1; read x; echo read=$?; exit 6"
    kw = {"stdin": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} if how == "null" else {
        "preexec_fn": lambda: (os.close(0), os.close(2)), "close_fds": False}
    p = jrun_proc(["--", "/bin/sh", "-c", script], stdout=subprocess.PIPE, **kw)
    out = p.stdout.decode()
    assert p.returncode == 6 and out.count("-> /dev/null") == 2 and "read=1" in out, out


def test_the_job_has_a_terminal_of_its_own(terminal):
    status = terminal.run(["--", "/bin/sh", "-c", "[ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo all-ttys; "
                           "stty size; tty; exit 3"])
    assert status == 3
    out = terminal.out.replace(b"\r\n", b"\n")
    assert b"all-ttys\n33 111\n/dev/pts/0\n" in out, out
    assert termios.tcgetattr(terminal.slave) == terminal.attrs


WAIT_FOR_INT = "trap 'echo caught; exit 130' INT; echo ready; sleep 100 & wait"


@pytest.mark.parametrize("job", [("--", "/bin/sh", "-c", WAIT_FOR_INT),
                                 ("--init", "--", "/bin/sh", "-c", "echo ready; exec sleep 100")],
                         ids=["trap", "init"])
def test_ctrl_c_typed_into_the_callers_terminal_interrupts_the_job(terminal, job):
    status = terminal.run(job, keys=[(b"ready", b"\x03")])
    assert status == 130, terminal.out
    assert termios.tcgetattr(terminal.slave) == terminal.attrs  # raw mode undone


def _descendants(pid):
    kids = []
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return []
    for task in tasks:
        try:
            with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                kids += [int(k) for k in f.read().split()]
        except OSError:
            pass
    return kids + [d for k in kids for d in _descendants(k)]


def _job_runs(comm):
    """A test of jrun's process: one of its descendants (the job's PID 1)
    is COMM now."""
    def test(proc):
        for pid in _descendants(proc.pid):
            try:
                with open("/proc/%d/comm" % pid) as f:
                    if f.read().strip() == comm:
                        return True
            except OSError:
                pass
        return False
    return test


def test_ctrl_c_ends_a_pid_1_that_has_no_handler_for_it(terminal):
    # ^C only once sleep is PID 1: typed while sh (which catches SIGINT
    # under -c) is in its execve, the kernel drops the signal once the
    # handler is reset, and only a second ^C would end the job.
    t = time.monotonic()
    status = terminal.run(["--", "/bin/sh", "-c", "echo ready; exec sleep 100"],
                          keys=[(_job_runs("sleep"), b"\x03")])
    assert status == 128 + signal.SIGKILL and time.monotonic() - t < 10
    assert b"no handler for SIGINT" in terminal.out and b"sending SIGKILL\r\n" in terminal.out


def test_the_window_size_follows_the_callers(terminal):
    script = "trap 'stty size' WINCH; trap 'exit 0' INT; echo ready; while :; do sleep 0.05; done"
    proc = terminal.start(["--", "/bin/sh", "-c", script])
    try:
        assert terminal.read_until(b"ready", proc)
        fcntl.ioctl(terminal.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 44, 99, 0, 0))  # SIGWINCH to jrun
        assert terminal.read_until(b"44 99", proc), terminal.out
        os.write(terminal.master, b"\x03")
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("end", ["exit", "timeout", "sigterm", "not-found"])
def test_the_callers_terminal_modes_are_restored(terminal, end):
    args = {"exit": ["--", "true"], "timeout": ["--timeout", "1", "--", "sleep", "30"],
            "sigterm": ["--", "/bin/sh", "-c", "echo ready; exec sleep 30"], "not-found": ["--", "no-such"]}[end]
    proc = terminal.start(args)
    try:
        if end == "sigterm":
            assert terminal.read_until(b"ready", proc)
            assert termios.tcgetattr(terminal.slave) != terminal.attrs  # raw while the job runs
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert termios.tcgetattr(terminal.slave) == terminal.attrs
    assert proc.returncode == {"exit": 0, "timeout": 124, "sigterm": 137, "not-found": 127}[end]


def test_in_the_background_jrun_neither_changes_nor_reads_the_terminal(terminal):
    proc = terminal.start(["--", "/bin/sh", "-c", "echo ready; read -t 1 x; echo got:$x.; exit 2"],
                          background=True)
    try:
        assert terminal.read_until(b"ready", proc), terminal.out
        assert termios.tcgetattr(terminal.slave) == terminal.attrs  # not raw
        os.write(terminal.master, b"typed\n")  # for the shell in the foreground, not for jrun
        assert proc.wait(timeout=15) == 2  # not stopped by SIGTTOU or SIGTTIN
        assert terminal.read_until(b"got:.", proc), terminal.out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------
# Supervision: ptrace, stopping, the caller's death, leaked fds
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traceme(tmp_path_factory):
    if not shutil.which("gcc") or not os.path.exists("/usr/lib/%s-linux-gnu/libc.a" % MACHINE):
        pytest.skip("gcc and libc6-dev are needed to build the static probe")
    out = str(tmp_path_factory.mktemp("traceme") / "traceme")
    subprocess.run(["gcc", "-static", "-O2", "-pthread", "-o", out, os.path.join(HERE, "probe", "traceme.c")],
                   check=True)
    return out


@pytest.mark.parametrize("args,status", [
    (["exit", "7"], 7),
    (["signals"], 12),  # SIGSTOP, SIGTSTP, SIGTERM dropped as for an untraced init; SIGUSR1 handled twice
    (["exec", "/bin/sh", "-c", "exit 6"], 6),
    (["thread", "9"], 9),  # a traced thread's zombie must be reaped before PID 1 can be
    (["tracer"], 0),  # the job's own ptrace of its own child still works
], ids=["exit", "signals", "exec", "thread", "tracer"])
def test_ptrace_traceme_cannot_fake_the_exit_status(traceme, args, status):
    t = time.monotonic()
    p = jrun_proc(["--timeout", "20", "--upload", traceme + ":/t", "-q", "--", "/t"] + args,
                  capture_output=True, timeout=40)
    assert p.returncode == status, p.stderr
    assert time.monotonic() - t < 10
    if args == ["tracer"]:
        assert p.stdout.strip() == b"ok"


def test_ptrace_traceme_does_not_outlive_the_timeout(traceme):
    t = time.monotonic()
    p = jrun_proc(["--timeout", "1", "--upload", traceme + ":/t", "--", "/t", "sleep"], capture_output=True)
    assert p.returncode == 124 and time.monotonic() - t < 5, p.stderr


def test_timeout_ends_a_pid_1_without_a_handler_at_once():
    t = time.monotonic()
    p = jrun_proc(["--timeout", "1", "--", "sleep", "10"], capture_output=True, text=True)
    assert p.returncode == 124 and time.monotonic() - t < 3
    assert "timed out after 1s; PID 1 has no handler for SIGTERM" in p.stderr and "sending SIGKILL" in p.stderr


def _started(args, **kw):
    proc = subprocess.Popen(JRUN + ["--net", "none"] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    assert proc.stdout.readline().strip() == b"ready"
    return proc


def test_a_pid_1_that_traps_sigterm_gets_its_grace_period():
    proc = _started(["--stop-timeout", "5", "--", "/bin/sh", "-c",
                     "trap 'sleep 0.5; echo bye; exit 3' TERM; echo ready; while :; do sleep 0.1; done"])
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 3 and out == b"bye\n" and b"SIGKILL" not in err, err


def test_sigterm_to_jrun_ends_sleep_as_pid_1_at_once():
    proc = _started(["--", "/bin/sh", "-c", "echo ready; exec sleep 300"])
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 128 + signal.SIGKILL and time.monotonic() - t < 3
    assert b"SIGTERM received; PID 1 has no handler for SIGTERM" in err, err


def test_a_configured_stop_timeout_is_the_default(tmp_path):
    cfg = tmp_path / "jrun.toml"
    cfg.write_text('stop-timeout = "1s"\n')
    os.chmod(cfg, 0o644)
    proc = subprocess.Popen(JRUN + ["--config", str(cfg), "--net", "none", "--", "/bin/sh", "-c",
                                    "trap 'echo ignored' TERM; echo ready; while :; do sleep 0.1; done"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 128 + signal.SIGKILL and time.monotonic() - t < 5  # not the default 10 s
    assert b"still running 1s after SIGTERM" in err, err


def test_when_jrun_s_caller_dies_the_job_ends_and_nothing_is_left():
    name = "stdio-orphan-%d" % os.getpid()
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL,"
                               " stderr=subprocess.DEVNULL)\nprint(p.pid, flush=True)\ntime.sleep(300)"]
                              + JRUN + ["--net", "none", "--name", name, "--", "sleep", "300"],
                              stdout=subprocess.PIPE, text=True)
    jrun_pid = int(parent.stdout.readline())
    try:
        _job_pid(name)
        parent.kill()  # the caller is gone: PR_SET_PDEATHSIG makes it a SIGTERM to jrun
        parent.wait()
        deadline = time.monotonic() + 10
        while os.path.exists("/proc/%d" % jrun_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists("/proc/%d" % jrun_pid), "jrun outlived its caller"
        assert not os.path.exists("/run/jrun/" + name)
    finally:
        if os.path.exists("/proc/%d" % jrun_pid):
            os.kill(jrun_pid, signal.SIGKILL)
            subprocess.run(JRUN + ["gc"], capture_output=True)
        parent.stdout.close()


@pytest.fixture
def high_fd_allowed():
    """fs.nr_open and this process's RLIMIT_NOFILE raised above 2^20 (host
    settings: put back), if this session may (CAP_SYS_RESOURCE)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    old_limit = (ctypes.c_ulong * 2)()
    libc.getrlimit(7, old_limit)  # RLIMIT_NOFILE
    path = "/proc/sys/fs/nr_open"
    with open(path) as f:
        old = f.read().strip()
    with open(path, "w") as f:
        f.write(str((1 << 20) + 64))
    try:
        if libc.setrlimit(7, (ctypes.c_ulong * 2)((1 << 20) + 16, (1 << 20) + 16)) != 0:
            pytest.skip("raising RLIMIT_NOFILE above 2^20 needs CAP_SYS_RESOURCE, which this session lacks")
        yield
    finally:
        libc.setrlimit(7, old_limit)
        with open(path, "w") as f:
            f.write(old)


def test_an_fd_above_2_20_is_not_inherited(tmp_path, high_fd_allowed):
    high = (1 << 20) + 5
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")

    def leak():
        os.dup2(os.open(secret, os.O_RDONLY), high, inheritable=True)

    script = "ls /proc/self/fd | tr '\\n' ' '; echo; cat /proc/self/fd/%d 2>/dev/null || echo no-such-fd" % high
    control = subprocess.run(["/bin/sh", "-c", script], preexec_fn=leak, close_fds=False,
                             capture_output=True, text=True)
    assert str(high) in control.stdout and "host secret" in control.stdout  # what a caller leaks
    p = jrun_proc(["--", "/bin/sh", "-c", script], preexec_fn=leak, close_fds=False, capture_output=True,
                  text=True)
    assert p.returncode == 0, p.stderr
    fds, rest = p.stdout.split("\n", 1)
    assert set(fds.split()) <= {"0", "1", "2", "3"} and rest == "no-such-fd\n", p.stdout


def test_the_job_closes_every_fd_a_caller_could_leak(tmp_path):
    """Where the limit cannot be raised (above): the close_range the job's
    last steps make reaches INT_MAX - 1, past any fs.nr_open (2^31 - 64 at
    most), seen with strace."""
    if not shutil.which("strace"):
        pytest.skip("strace is needed")
    log = tmp_path / "strace"
    p = subprocess.run(["strace", "-f", "-qq", "-e", "trace=close_range", "-o", str(log)] + JRUN
                       + ["--net", "none", "--", "true"], capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    calls = log.read_text().splitlines()
    assert any(", 2147483646, 0)" in c and c.endswith("= 0") for c in calls), calls
