"""Host integrity, the files jrun writes or reads as root on the host.

The threat model: COMMAND is hostile and root inside (without --userns what it
makes in a -v volume is host root's); local users are hostile (they plant
symlinks in /tmp, and fs.protected_symlinks is off on this host); the invoker
is trusted.  Each test puts a canary (a file or directory of the test's own,
never a system file) where an attack would land, runs the attack, checks the
canary is unchanged, and restores it whatever happened.
"""
import json
import os
import shutil
import glob
import subprocess
import time
import uuid

import pytest

from conftest import JRUN, jrun, needs_root, sh, state_dirs

pytestmark = needs_root

USER = 1000  # a local, non-root user (setpriv needs no passwd entry for it)


def _as_user(*argv):
    subprocess.run(["setpriv", "--reuid", str(USER), "--regid", str(USER), "--clear-groups", *argv], check=True)


@pytest.fixture
def canary(tmp_path):
    """A file and a directory that no jrun may write; checked and restored."""
    d = tmp_path / "canary-dir"
    d.mkdir()
    f = tmp_path / "canary"
    f.write_text("canary\n")
    yield f, d
    assert f.read_text() == "canary\n", "the canary file was written through a symlink"
    assert os.listdir(d) == [], "jrun wrote into the canary directory: %s" % os.listdir(d)


@pytest.fixture
def sticky_dir():
    """A sticky, world-writable directory like /tmp, reachable by USER."""
    d = "/tmp/jrun-itest-%s" % uuid.uuid4().hex[:8]
    os.mkdir(d)
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _config(tmp_path, text):
    path = tmp_path / "jrun.toml"
    path.write_text(text)
    os.chmod(path, 0o644)
    return path


# --- --json-status ------------------------------------------------------------

@pytest.mark.parametrize("when", ["same run", "earlier run"])
def test_json_status_replaces_a_symlink_the_job_left_in_its_volume(tmp_path, canary, when):
    """The job, root inside, leaves a symlink to a host file in its -v volume
    where --json-status will write: the record replaces the link; the file
    it pointed to is unchanged."""
    vol = tmp_path / "vol"
    vol.mkdir()
    plant = "ln -s %s /v/status.json" % canary[0]
    status = vol / "status.json"
    if when == "earlier run":
        sh(plant, "-v", "%s:/v" % vol, check=0)
        assert os.path.islink(status)
        p = sh("true", "--json-status", status)
    else:
        p = sh(plant, "-v", "%s:/v" % vol, "--json-status", status)
    assert p.returncode == 0, p.stderr
    assert not os.path.islink(status) and os.path.isfile(status)
    assert json.loads(status.read_text())["exit_code"] == 0
    st = os.stat(status)
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o644)
    assert [n for n in os.listdir(vol) if n != "status.json"] == []  # no temporary file left


def test_json_status_through_a_directory_symlink_of_another_user_is_refused(tmp_path, canary, sticky_dir):
    """A local user's symlink in /tmp standing for the status file's
    directory: jrun refuses to follow it (exit 125, nothing run); the same
    link made by the invoker (SUDO_UID) is followed."""
    link = os.path.join(sticky_dir, "d")
    _as_user("ln", "-s", str(canary[1]), link)
    name = "itest-" + uuid.uuid4().hex[:8]
    p = sh("echo ran", "--name", name, "--json-status", os.path.join(link, "s.json"))
    assert p.returncode == 125 and p.stdout == "", p.stderr
    assert p.stderr.startswith("jrun: --json-status: %s is a symlink of uid %d" % (link, USER)), p.stderr
    assert len(p.stderr.splitlines()) == 1 and name not in state_dirs()
    # The invoker's own link (sudo says who invoked it) is the invoker's choice.
    p = sh("true", "--json-status", os.path.join(link, "s.json"), env=dict(os.environ, SUDO_UID=str(USER)))
    assert p.returncode == 0, p.stderr
    os.unlink(canary[1] / "s.json")


def test_json_status_onto_another_users_file_or_link_in_tmp_is_refused(canary, sticky_dir):
    """In a sticky directory, an entry of another user at FILE (a link to a
    host file, or a file of theirs) is refused before the job runs."""
    link = os.path.join(sticky_dir, "s.json")
    _as_user("ln", "-s", str(canary[0]), link)
    p = sh("echo ran", "--json-status", link)
    assert p.returncode == 125 and p.stdout == "" and "belongs to uid %d" % USER in p.stderr, p.stderr
    assert os.path.islink(link)
    os.unlink(link)
    _as_user("touch", link)
    p = sh("echo ran", "--json-status", link)
    assert p.returncode == 125 and "belongs to uid %d" % USER in p.stderr, p.stderr


def test_json_status_written_after_a_swap_during_the_run_goes_to_the_directory_checked_first(tmp_path, canary):
    """The directory is opened at validation: renaming it away during the
    run and putting a symlink to elsewhere in its place changes nothing."""
    d = tmp_path / "out"
    d.mkdir()
    proc = subprocess.Popen(JRUN + ["--net", "none", "--json-status", str(d / "s.json"), "--",
                                    "/bin/sh", "-c", "echo ready; read x"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        os.rename(d, tmp_path / "out.moved")
        os.symlink(canary[1], d)
    finally:
        out, err = proc.communicate("go\n", timeout=30)
    assert proc.returncode == 0, err
    assert json.loads((tmp_path / "out.moved" / "s.json").read_text())["exit_code"] == 0


# --- the audit log, the state directory, the config file's directory -----------------

def test_audit_log_never_follows_a_symlink(tmp_path, canary):
    """audit-log's directory and file replaced by symlinks: the job runs, a
    warning says why nothing was logged, and the targets are unchanged."""
    (tmp_path / "logs").symlink_to(canary[1])
    cfg = _config(tmp_path, 'audit-log = "%s"\nnet = "none"\n' % (tmp_path / "logs" / "audit.log"))
    p = jrun("--config", cfg, "--", "sh", "-c", "echo ran")
    assert p.returncode == 0 and p.stdout == "ran\n"
    assert "audit log" in p.stderr and "symlink" in p.stderr, p.stderr
    real = tmp_path / "real"
    real.mkdir(mode=0o750)
    (real / "audit.log").symlink_to(canary[0])
    cfg = _config(tmp_path, 'audit-log = "%s"\nnet = "none"\n' % (real / "audit.log"))
    p = jrun("--config", cfg, "--", "sh", "-c", "echo ran")
    assert p.returncode == 0 and p.stdout == "ran\n" and "audit log" in p.stderr, p.stderr


def test_audit_log_in_a_directory_others_may_write_is_refused(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    os.chmod(logs, 0o777)
    cfg = _config(tmp_path, 'audit-log = "%s"\nnet = "none"\n' % (logs / "audit.log"))
    p = jrun("--config", cfg, "--", "sh", "-c", "echo ran")
    assert p.returncode == 0 and p.stdout == "ran\n"
    assert "writable by group or others" in p.stderr, p.stderr
    assert os.listdir(logs) == []


@pytest.mark.parametrize("how", ["owned by a user", "world-writable"])
def test_state_dir_that_others_may_write_is_refused(tmp_path, how):
    """A state directory a user may write (they could plant the job.json
    that `jrun kill` acts on, or a symlink where jrun writes): exit 125
    before anything is made; ps and gc refuse it too."""
    state = tmp_path / "state"
    state.mkdir()
    if how == "owned by a user":
        os.chown(state, USER, USER)
    else:
        os.chmod(state, 0o777)
    cfg = _config(tmp_path, 'state-dir = "%s"\naudit-log = ""\n' % state)
    name = "itest-" + uuid.uuid4().hex[:8]
    p = jrun("--config", cfg, "--net", "none", "--name", name, "--", "true")
    assert p.returncode == 125 and p.stderr.startswith("jrun: state-dir %s is " % state), p.stderr
    assert "chmod go-w" in p.stderr and len(p.stderr.splitlines()) == 1
    assert os.listdir(state) == []
    assert glob.glob("/sys/fs/cgroup/jrun/%s" % name) + glob.glob("/sys/fs/cgroup/*/jrun/%s" % name) == []
    for sub in ("ps", "gc"):
        p = jrun("--config", cfg, sub)
        assert p.returncode == 125 and "state-dir %s" % state in p.stderr, (sub, p.stderr)


def test_config_in_a_directory_others_may_write_is_refused(tmp_path):
    d = tmp_path / "etc"
    d.mkdir()
    cfg = _config(d, 'net = "none"\n')
    os.chmod(d, 0o777)
    p = jrun("--config", cfg, "--", "true")
    assert p.returncode == 125 and "its directory %s is writable by group or others" % d in p.stderr, p.stderr
    os.chmod(d, 0o755)
    os.chown(d, USER, USER)
    p = jrun("--config", cfg, "--", "true")
    assert p.returncode == 125 and "owned by uid %d" % USER in p.stderr, p.stderr
    os.chown(d, 0, 0)
    assert jrun("--config", cfg, "--", "true").returncode == 0


# --- host-side sources are resolved once ------------------------------------------

STRACE = shutil.which("strace")


@pytest.mark.skipif(not STRACE, reason="strace missing (apt-get install strace)")
def test_volume_source_swapped_after_validation_is_not_followed(tmp_path):
    """A concurrent job, root inside, swaps a path component of another
    job's volume source for a symlink to a secret, after that job's
    validation and before its mount (strace holds the job between the two:
    each unshare(2) is delayed by a second).  The bind is of the original."""
    share = tmp_path / "share"
    (share / "data").mkdir(parents=True)
    (share / "data" / "marker").write_text("original\n")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "marker").write_text("secret\n")
    swapper = subprocess.Popen(JRUN + ["--net", "none", "-v", "%s:/share" % share, "--", "/bin/sh", "-c",
                                       "echo ready; while [ ! -e /share/go ]; do sleep 0.01; done; "
                                       "mv /share/data /share/data.orig; ln -s %s /share/data; echo swapped"
                                       % secret], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    name = "itest-" + uuid.uuid4().hex[:8]
    victim = None
    try:
        assert swapper.stdout.readline() == "ready\n"
        victim = subprocess.Popen([STRACE, "-f", "-qq", "-o", "/dev/null", "-e", "trace=unshare",
                                   "-e", "inject=unshare:delay_enter=1000000"] + JRUN +
                                  ["--net", "none", "--name", name, "-v", "%s:/d" % (share / "data"),
                                   "--", "cat", "/d/marker"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        deadline = time.monotonic() + 20
        while name not in state_dirs():  # validated: the state directory comes right after
            assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()
            time.sleep(0.005)
        (share / "go").touch()
        assert swapper.stdout.readline() == "swapped\n"
        out, err = victim.communicate(timeout=30)
        assert os.path.islink(share / "data")  # the swap happened before the mount
        assert victim.returncode == 0 and out == "original\n", (out, err)
    finally:
        for proc in (swapper, victim):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.communicate()


@pytest.mark.skipif(not STRACE, reason="strace missing (apt-get install strace)")
def test_upload_source_swapped_after_validation_is_not_followed(tmp_path):
    """The same window for --upload SRC: the copy is of what was validated."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "marker").write_text("original\n")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "marker").write_text("secret\n")
    name = "itest-" + uuid.uuid4().hex[:8]
    victim = subprocess.Popen([STRACE, "-f", "-qq", "-o", "/dev/null", "-e", "trace=unshare",
                               "-e", "inject=unshare:delay_enter=1000000"] + JRUN +
                              ["--net", "none", "--name", name, "--upload", "%s:up" % src,
                               "--", "cat", "/work/up/marker"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 20
        while name not in state_dirs():
            assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()
            time.sleep(0.005)
        os.rename(src, tmp_path / "src.orig")
        os.symlink(secret, src)
        out, err = victim.communicate(timeout=30)
        assert victim.returncode == 0 and out == "original\n", (out, err)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.communicate()


# --- the entry point's interpreter flags --------------------------------------------

LAUNCHER = "/usr/local/bin/jrun"  # .ci/setup writes it


def test_launcher_runs_python_isolated(tmp_path):
    """PYTHONPATH (kept by `sudo -E` or env_keep) naming a directory with a
    sitecustomize and a jrun module of someone else's: the launcher that
    .ci/setup installs runs neither.  (Control: the same launcher run by a
    python without -I does run them, so the test can see it.)"""
    evil = tmp_path / "evil"
    evil.mkdir()
    ran = tmp_path / "ran"
    (evil / "sitecustomize.py").write_text("open(%r, 'a').write('sitecustomize\\n')\n" % str(ran))
    (evil / "jrun.py").write_text("open(%r, 'a').write('jrun\\n')\ndef main():\n    print('evil')\n" % str(ran))
    env = dict(os.environ, PYTHONPATH=str(evil), PYTHONSTARTUP=str(evil / "jrun.py"), PYTHONINSPECT="1")
    if not os.path.exists(LAUNCHER):
        pytest.skip("%s is not installed here (.ci/setup writes it)" % LAUNCHER)
    with open(LAUNCHER) as f:
        first = f.readline()
    assert first.startswith("#!") and first.split()[1:] == ["-IS"], first
    interpreter = first[2:].split()[0]
    if not os.path.exists(interpreter):
        pytest.skip("%s is not installed here (.ci/setup makes it)" % interpreter)
    p = subprocess.run([LAUNCHER, "--version"], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert p.returncode == 0 and p.stdout.startswith("jrun "), (p.stdout, p.stderr)
    assert not ran.exists(), ran.read_text()
    # The control: the same script without -I honours PYTHONPATH.
    subprocess.run([interpreter, LAUNCHER, "--version"], env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    assert "sitecustomize" in ran.read_text()


def test_the_launcher_finds_the_installed_rootfs_skeleton(tmp_path):
    """Without the site module (-S) sys.prefix is the base interpreter's,
    not the virtualenv's: the installed jrun still finds the rootfs skeleton
    pip put in the virtualenv's share/jrun, and builds a rootfs with it."""
    if not os.path.exists(LAUNCHER):
        pytest.skip("%s is not installed here (.ci/setup writes it)" % LAUNCHER)
    cfg = tmp_path / "jrun.toml"
    cfg.write_text('rootfs-dir = "%s"\n' % (tmp_path / "rootfs"))
    p = subprocess.run([LAUNCHER, "--config", str(cfg), "rootfs", "build"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "rootfs" / "etc" / "passwd").is_file() and (tmp_path / "rootfs" / "bin" / "busybox").exists()


def test_installed_entry_point_is_the_launcher():
    """What .ci/setup installs as jrun is the -IS launcher (skipped where jrun
    was installed otherwise, e.g. by hand)."""
    path = shutil.which("jrun", path="/usr/local/bin:/usr/bin")
    if path is None or os.environ.get("CI") != "true":
        pytest.skip("checked on CI, where .ci/setup has just installed jrun")
    with open(path) as f:
        assert f.readline().split()[1:] == ["-IS"]
