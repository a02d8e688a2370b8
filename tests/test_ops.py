"""Operating jrun, black-box: ps, kill, gc, the audit log, --log-format json,
the configuration file, completion, verify and the manual page."""
import json
import os
import signal
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import JRUN, ROOT, jrun, needs_root, rmdir_when_empty, state_dirs

pytestmark = needs_root


def _name(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:8])


def _start(*args, config=None):
    """Start a job that prints 'ready' once running; return the Popen."""
    pre = ["--config", str(config)] if config else []
    proc = subprocess.Popen(JRUN + pre + list(args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def _stop(proc):
    """End a job so that its jrun cleans up: stdin closed (jobs wait on
    'read'), else SIGTERM (relayed, SIGKILL after the stop timeout); SIGKILL
    of jrun only as a last resort."""
    for step in ("stdin", "term", "kill"):
        if proc.poll() is not None:
            break
        if step == "stdin":
            proc.stdin.close()
            proc.stdin = None  # communicate() must not flush it
        else:
            proc.terminate() if step == "term" else proc.kill()
        try:
            proc.wait(timeout=5 if step == "stdin" else 20)
        except subprocess.TimeoutExpired:
            pass
    proc.communicate(timeout=30)


def _config(tmp_path, text, name="jrun.toml"):
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, 0o644)
    return path


# ps, kill and gc tests keep their jobs in a state directory of their own, so
# that their gc never touches the jobs (or leftovers) of other test runs.
OWN = {}


@pytest.fixture(scope="module", autouse=True)
def _own_state_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ops")
    OWN["state"] = str(d / "state")
    OWN["cfg"] = str(_config(d, 'state-dir = "%s"\naudit-log = "%s"\n' % (OWN["state"], d / "audit.log")))
    yield
    assert not odirs(), "a test left state behind"


def oj(*args, **kw):
    return jrun("--config", OWN["cfg"], *args, **kw)


def ostart(*args):
    return _start(*args, config=OWN["cfg"])


def odirs():
    try:
        return sorted(os.listdir(OWN["state"]))
    except FileNotFoundError:
        return []


def _ps_json(*pre):
    p = jrun(*pre, "ps", "--json", check=0)
    return json.loads(p.stdout)


# --- ps -------------------------------------------------------------------


def test_ps_lists_running_jobs_with_their_fields():
    name = _name("ps")
    proc = ostart("--net", "none", "--name", name, "--timeout", "5m", "--", "/bin/sh", "-c",
                  "echo ready; read x")
    try:
        jobs = {j["id"]: j for j in _ps_json("--config", OWN["cfg"])}
        assert name in jobs
        j = jobs[name]
        assert j["command"] == ["/bin/sh", "-c", "echo ready; read x"]
        assert j["jrun_pid"] == proc.pid and j["net"] == "none"
        assert j["limits"] == {"timeout_s": 300.0}
        assert abs(j["started"] - time.time()) < 30
        with open("/proc/%d/stat" % j["pid"]) as f:  # the job's PID 1 is jrun's child
            assert int(f.read().rsplit(")", 1)[1].split()[1]) == proc.pid
        table = oj("ps", check=0).stdout.splitlines()
        assert table[0].split()[:4] == ["ID", "PID", "STARTED", "UP"]
        row = next(line for line in table if line.startswith(name + " "))
        assert str(j["pid"]) in row.split() and "timeout=5m" in row and row.endswith("read x")
        assert "/jrun/%s" % name in row.split()  # the job's cgroup
    finally:
        _stop(proc)
    assert name not in {j["id"] for j in _ps_json("--config", OWN["cfg"])}


def test_ps_shows_an_argument_that_is_not_utf8_exactly_and_safely():
    name = _name("ps8")
    proc = ostart("--net", "none", "--name", name, "--", "/bin/sh", "-c", "echo ready; read x", "sh",
                  b"caf\xe9\x1b[2J")
    try:
        j = next(j for j in _ps_json("--config", OWN["cfg"]) if j["id"] == name)
        # JSON: a string that is not UTF-8 is the array of its bytes.
        assert j["command"][-1] == list(b"caf\xe9\x1b[2J")
        row = next(line for line in oj("ps", check=0).stdout.splitlines() if line.startswith(name + " "))
        # The table: \xNN for what is not UTF-8 and for control characters.
        assert row.endswith("read x sh caf\\xe9\\x1b[2J"), row
    finally:
        _stop(proc)


def test_ps_does_not_list_a_dead_jobs_stale_state():
    name = _name("stale")
    proc = ostart("--net", "none", "--name", name, "--", "/bin/sh", "-c", "echo ready; sleep 60")
    proc.kill()  # SIGKILL of jrun: its state directory stays behind
    proc.communicate()
    try:
        assert name in odirs()
        assert name not in {j["id"] for j in _ps_json("--config", OWN["cfg"])}
        assert name not in oj("ps", check=0).stdout
    finally:
        oj("gc")


def test_ps_with_no_jobs_prints_only_the_header(tmp_path):
    cfg = _config(tmp_path, 'state-dir = "%s"\n' % (tmp_path / "state"))
    p = jrun("--config", cfg, "ps", check=0)
    assert p.stdout.split() == ["ID", "PID", "STARTED", "UP", "LIMITS", "NETWORK", "CGROUP", "COMMAND"]
    assert jrun("--config", cfg, "ps", "--json", check=0).stdout.strip() == "[]"
    assert oj("ps", "--bogus").returncode == 125


# --- kill -----------------------------------------------------------------


@pytest.mark.parametrize("sig", ["TERM", "SIGTERM", "15", "term", None])
def test_kill_sends_sigterm_by_any_name(sig):
    name = _name("kill")
    proc = ostart("--net", "none", "--name", name, "--", "/bin/sh", "-c",
                  "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done")
    try:
        p = oj("kill", *(["-s", sig] if sig else []), name, check=0)
        assert p.stdout == ""
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 7 and "got-term" in out
    finally:
        _stop(proc)


def test_kill_term_escalates_to_sigkill_as_in_the_foreground():
    name = _name("esc")
    proc = ostart("--net", "none", "--name", name, "--stop-timeout", "1", "--", "/bin/sh", "-c",
                  "trap '' TERM; echo ready; while :; do sleep 0.1; done")
    try:
        oj("kill", name, check=0)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 128 + signal.SIGKILL
        assert "SIGTERM received" in err and "sending SIGKILL" in err
    finally:
        _stop(proc)
    assert name not in odirs()  # the foreground jrun cleaned up


def test_kill_s_kill_and_usr1_go_to_the_job():
    name = _name("k9")
    proc = ostart("--net", "none", "--name", name, "--", "/bin/sh", "-c",
                  "trap 'echo usr1' USR1; echo ready; while :; do sleep 0.1; done")
    try:
        oj("kill", "-s", "USR1", name, check=0)
        assert proc.stdout.readline().strip() == "usr1"  # jrun itself did not die of USR1
        assert proc.poll() is None
        oj("kill", "-s", "KILL", name, check=0)
        proc.communicate(timeout=15)
        assert proc.returncode == 137
    finally:
        _stop(proc)
    assert name not in odirs()


def test_kill_refuses_unknown_jobs_and_signals():
    p = oj("kill", "no-such-job-" + uuid.uuid4().hex[:6])
    assert p.returncode == 125 and p.stderr.startswith("jrun: kill: no running job")
    p = oj("kill", "-s", "NOPE", "whatever")
    assert p.returncode == 125 and "'NOPE' is not a signal" in p.stderr
    assert oj("kill").returncode == 125


# --- gc -------------------------------------------------------------------


def test_gc_after_kill_9_of_jrun_mid_job():
    name = _name("gc9")
    proc = ostart("--net", "none", "--name", name, "--memory", "64M", "--", "/bin/sh", "-c",
                  "echo ready; sleep 60")
    (job,) = [j for j in json.loads(oj("ps", "--json", check=0).stdout) if j["id"] == name]
    cgroups = job["cgroup"]["dirs"]
    assert cgroups and all(name in d and os.path.isdir(d) for d in cgroups)
    proc.kill()
    proc.communicate()
    assert name in odirs() and all(os.path.isdir(d) for d in cgroups)  # left behind
    p = oj("gc", check=0)
    assert "gc: removed leftovers of job %s" % name in p.stderr
    assert name not in odirs() and not any(os.path.exists(d) for d in cgroups)
    # A second gc has nothing of this job to do and says nothing about it.
    assert name not in oj("gc", check=0).stderr


def test_gc_never_touches_live_or_starting_jobs():
    names = [_name("live") for _ in range(4)]
    procs = [ostart("--net", "none", "--name", n, "--", "/bin/sh", "-c",
                    "echo ready; read x; echo got $x; cat /etc/hostname") for n in names]
    # A job that is starting has a state directory but no lock yet.
    starting = os.path.join(OWN["state"], _name("starting"))
    os.mkdir(starting, 0o700)
    try:
        for _ in range(3):
            oj("gc", check=0)
        assert set(names) <= set(odirs()) and os.path.isdir(starting)
        assert {n for n in names} <= {j["id"] for j in _ps_json("--config", OWN["cfg"])}
        for n, proc in zip(names, procs):
            out, _ = proc.communicate("ok\n", timeout=15)
            assert proc.returncode == 0 and out.split() == ["got", "ok", n]
        # Once old enough, a directory that never got its lock is a crashed start.
        old = time.time() - 60
        os.utime(starting, (old, old))
        oj("gc", check=0)
        assert not os.path.exists(starting)
    finally:
        for proc in procs:
            _stop(proc)
        if os.path.isdir(starting):
            os.rmdir(starting)


def test_gc_concurrently_with_many_jobs():
    names = [_name("cgc") for _ in range(24)]
    stop = []

    def gc_loop():
        n = 0
        while not stop:
            oj("gc", check=0)
            n += 1
        return n

    def job(n):
        return oj("--net", "none", "--name", n, "--", "/bin/sh", "-c", "sleep 0.3; hostname")

    with ThreadPoolExecutor(15) as ex:
        gcs = [ex.submit(gc_loop) for _ in range(3)]
        results = list(ex.map(job, names))
        stop.append(True)
        assert all(g.result() >= 1 for g in gcs)
    for n, p in zip(names, results):
        assert p.returncode == 0 and p.stdout.strip() == n, p.stderr
    assert not set(names) & set(odirs())


def test_gc_prints_nothing_when_there_is_nothing_to_do(tmp_path):
    cfg = _config(tmp_path, 'state-dir = "%s"\n' % (tmp_path / "state"))
    p = jrun("--config", cfg, "gc", check=0)
    assert p.stdout == "" and p.stderr == ""
    assert oj("gc", "--extra").returncode == 125


def test_gc_calls_the_orphans_hook(monkeypatch, tmp_path):
    import jrun as J

    monkeypatch.setattr(J, "HOST", J.HOST.replace(state_dir=str(tmp_path)))
    os.mkdir(tmp_path / "alive")
    torn = []

    class Fake(J.Resource):
        def __init__(self, job):
            self.job, self.name = job, "fake %s" % job

        def teardown(self):
            torn.append(self.job)

        def remains(self):  # its teardown failed: not reported as removed
            return ["stuck"] if self.job == "stuck" else []

        @classmethod
        def orphans(cls, known_ids):
            seen = ["alive", "gone", "stuck"]  # enumerate first, then ask
            known = known_ids()
            return [cls(j) for j in seen if j not in known]

    monkeypatch.setattr(J, "RESOURCE_CLASSES", (Fake,))
    assert J.collect_orphans() == ["fake gone"] and torn == ["gone", "stuck"]


def test_the_resource_protocol_is_declared_on_resource_with_where_each_verb_runs():
    import jrun as J

    for verb in ("check", "setup", "attach", "enter", "root_owner", "etc_files", "enter_root", "collect",
                 "teardown", "remains", "from_state", "orphans"):
        assert "Runs in:" in getattr(J.Resource, verb).__doc__, verb
    for cls in J.RESOURCE_CLASSES + (J.NetworkLeftover,):
        assert issubclass(cls, J.Resource), cls
    # What a resource does not implement is a no-op, never a missing hook.
    r = J.Resource(None)
    assert r.root_owner() is None and r.etc_files() == {} and r.remains() == []
    assert list(J.Resource.orphans(set)) == [] and J.Resource.from_state({}) is None


def test_an_exit_status_and_its_error_map_both_ways_from_one_table():
    import jrun as J

    assert dict(J.STATUS_ERRORS) == {126: J.NotExecutable, 127: J.NotFound}
    for status, error in J.STATUS_ERRORS:
        assert error.exit_code == status and J.error_of_status(status) is error
    assert J.error_of_status(J.EXIT_JRUN) is J.SetupError
    assert J.SetupError.exit_code == J.UsageError.exit_code == J.JrunError.exit_code == J.EXIT_JRUN


def test_the_child_is_a_flat_list_of_named_steps_ending_in_exec():
    import jrun as J

    names = [name for name, _ in J.CHILD_STEPS]
    assert len(set(names)) == len(names) and names[-1] == "execve"
    order = ("namespaces", "wait for release", "enter resources", "build root", "pivot_root", "/proc and /sys",
             "stdio and session", "drop privileges", "execve")
    assert [names.index(n) for n in order] == sorted(names.index(n) for n in order)


# --- scoped gc, ps --all, Slurm names (Slurm's variables set by hand; the
# real thing, with the step's cgroups, is tests/test_slurm.py) -------------


def _slurm_start(job_id, *args):
    """A job as if jrun were rank 1 of step 0 of Slurm job JOB_ID, on n7."""
    env = dict(os.environ, SLURM_JOB_ID=job_id, SLURM_STEP_ID="0", SLURM_PROCID="1", SLURMD_NODENAME="n7")
    proc = subprocess.Popen(JRUN + ["--config", OWN["cfg"]] + list(args), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def test_slurm_names_are_unique_on_the_node_and_gc_is_scoped():
    slurm_job = str(900000 + uuid.uuid4().int % 99999)
    name = "slurm-%s.0.1" % slurm_job
    wait = "echo ready; hostname; read x"
    first = _slurm_start(slurm_job, "--net", "none", "--", "/bin/sh", "-c", wait)
    second = _slurm_start(slurm_job, "--net", "none", "--", "/bin/sh", "-c", wait)  # same task, same time
    other = ostart("--net", "none", "--name", _name("other"), "--", "/bin/sh", "-c", "echo ready; sleep 60")
    other_name = [n for n in odirs() if n.startswith("other-")][0]
    try:
        assert first.stdout.readline().strip() == "slurm-%s-0-1" % slurm_job
        assert second.stdout.readline().strip() == "slurm-%s-0-1-2" % slurm_job
        live = {j["id"]: j for j in _ps_json("--config", OWN["cfg"])}
        assert {name, name + "-2"} <= set(live)
        assert live[name]["slurm"] == {"job_id": slurm_job, "step": "0", "rank": "1", "local_rank": "0",
                                       "node": "n7"}
        first.kill()  # SIGKILL of jrun: its state and cgroups stay
        other.kill()
        first.communicate()
        other.communicate()
        # ps lists only running jobs; ps --all also the dead ones with leftovers.
        assert name not in {j["id"] for j in _ps_json("--config", OWN["cfg"])}
        every = {j["id"]: j for j in json.loads(oj("ps", "--all", "--json", check=0).stdout)}
        assert every[name]["state"] == every[other_name]["state"] == "dead"
        assert every[name + "-2"]["state"] == "running" and every[name]["slurm"]["job_id"] == slurm_job
        table = oj("ps", "--all", check=0).stdout
        assert any(line.startswith(name + " ") and " dead " in line for line in table.splitlines()), table
        # gc --slurm-job: the dead job of that Slurm job goes; its running one
        # stays (exit 1: not everything of it is gone), another job's too.
        p = oj("gc", "--slurm-job", slurm_job)
        assert p.returncode == 1, p.stderr
        assert "gc: removed leftovers of job %s\n" % name in p.stderr
        assert "gc: job %s-2 is running: left alone" % name in p.stderr
        assert name not in odirs() and {name + "-2", other_name} <= set(odirs())
        # gc JOB: that job only.
        assert oj("gc", other_name, name + "-2").returncode == 1
        assert other_name not in odirs() and name + "-2" in odirs()
        second.stdin.write("x\n")
        second.stdin.flush()
        assert second.wait(timeout=15) == 0
        p = oj("gc", "--slurm-job", slurm_job, name)
        assert (p.returncode, p.stdout, p.stderr) == (0, "", "")  # nothing left of either
    finally:
        for proc in (first, second, other):
            _stop(proc)
        oj("gc", name, other_name)


def test_scoped_gc_and_slurm_names_refuse_bad_input():
    for args, msg in ((("gc", "../x"), "gc: JOB: '../x' is not a valid name"),
                      (("gc", "--slurm-job", "12;rm"), "gc: --slurm-job: '12;rm' is not a Slurm job id"),
                      (("--cgroup-parent", "slurm", "--", "true"), "--cgroup-parent: slurm: jrun is not in a "
                                                                    "Slurm step's cgroup")):
        p = oj(*args)
        assert p.returncode == 125 and p.stderr.startswith("jrun: " + msg), p.stderr
    p = jrun("--config", OWN["cfg"], "--", "true", env=dict(os.environ, SLURM_JOB_ID="12", SLURM_PROCID="a/b"))
    assert p.returncode == 125 and p.stderr.startswith("jrun: SLURM_PROCID: 'a/b' is not a Slurm number")
    assert odirs() == []


# --- audit log ------------------------------------------------------------


def _audit(tmp_path):
    log = tmp_path / "log" / "audit.log"
    cfg = _config(tmp_path, 'audit-log = "%s"\nnet = "none"\n' % log)
    return cfg, log


def _lines(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_audit_log_start_and_end(tmp_path):
    cfg, log = _audit(tmp_path)
    name = _name("aud")
    env = dict(os.environ, SUDO_UID="1234", SUDO_USER="alice")
    p = jrun("--config", cfg, "--name", name, "--timeout", "1m", "--", "sh", "-c", "exit 3", env=env)
    assert p.returncode == 3
    assert oct(os.stat(log.parent).st_mode & 0o777) == "0o750"
    start, end = _lines(log)
    assert start["event"] == "start" and end["event"] == "end"
    for rec in (start, end):
        assert rec["job"] == name and rec["user"] == "alice" and rec["uid"] == 1234
        assert rec["command"] == ["sh", "-c", "exit 3"] and rec["net"] == "none"
        assert rec["limits"] == {"timeout_s": 60.0}
        assert rec["time"].endswith("Z")
    assert end["exit_code"] == 3 and end["signal"] is None and end["oom_killed"] is False
    assert end["timed_out"] is False and 0 <= end["duration_s"] < 30


def test_audit_log_and_json_status_of_a_job_with_arguments_that_are_not_utf8(tmp_path):
    cfg, log = _audit(tmp_path)
    status = os.path.join(os.fsencode(tmp_path), b"st-\xe9.json")
    arg = b"\xe9t\xe9"
    p = subprocess.run(JRUN + ["--config", str(cfg), "--json-status", status, "--", "/bin/sh", "-c", "exit 4",
                               "sh", arg, "ok"], capture_output=True, timeout=60)
    assert p.returncode == 4, p.stderr
    for raw in log.read_bytes().splitlines():
        rec = json.loads(raw.decode("utf-8"))  # valid UTF-8, valid JSON
        assert rec["command"] == ["/bin/sh", "-c", "exit 4", "sh", list(arg), "ok"]
        assert bytes(rec["command"][4]) == arg
    with open(status, "rb") as f:
        assert json.loads(f.read().decode("utf-8"))["exit_code"] == 4


def test_audit_log_timeout_signal_and_failure(tmp_path):
    cfg, log = _audit(tmp_path)
    assert jrun("--config", cfg, "--timeout", "1", "--stop-timeout", "1", "--", "sleep", "30").returncode == 124
    assert jrun("--config", cfg, "--", "no-such-cmd").returncode == 127
    assert jrun("--config", cfg, "--memory", "12Q", "--", "true").returncode == 125  # nothing started
    assert jrun("--config", cfg, "--memory", "16M", "--", "dd", "if=/dev/zero", "of=/dev/null",
                "bs=64M", "count=1").returncode == 137
    recs = _lines(log)
    assert [r["event"] for r in recs] == ["start", "end"] * 3
    assert recs[1]["timed_out"] is True and recs[1]["exit_code"] == 124 and recs[1]["signal"] == 9
    assert recs[3]["exit_code"] == 127 and "not found" in recs[3]["error"]
    assert recs[4]["limits"] == {"memory": 16 << 20}
    assert recs[5]["exit_code"] == 137 and recs[5]["oom_killed"] is True and recs[5]["memory_peak_bytes"] > 0
    assert recs[1]["oom_killed"] is False


def test_audit_log_twenty_concurrent_jobs(tmp_path):
    cfg, log = _audit(tmp_path)
    names = [_name("a%02d" % i) for i in range(20)]
    # Long command lines make each record far longer than one page.
    big = "x" * 6000

    def one(n):
        return jrun("--config", cfg, "--name", n, "--", "sh", "-c", "exit ${#1}", "sh", n, big)

    with ThreadPoolExecutor(20) as ex:
        results = list(ex.map(one, names))
    recs = _lines(log)  # every line parses: none interleaved
    assert len(recs) == 40
    for n, p in zip(names, results):
        mine = [r for r in recs if r["job"] == n]
        assert [r["event"] for r in mine] == ["start", "end"]
        assert mine[1]["exit_code"] == p.returncode == len(n)
        assert mine[0]["command"][-1] == big


def test_audit_log_unwritable_is_a_warning(tmp_path):
    cfg = _config(tmp_path, 'audit-log = "/proc/jrun-audit/x.log"\nnet = "none"\n')
    p = jrun("--config", cfg, "--", "sh", "-c", "echo ran")
    assert p.returncode == 0 and p.stdout == "ran\n" and "audit log" in p.stderr


# --- --log-format json ----------------------------------------------------


def _json_lines(text):
    recs = [json.loads(line) for line in text.strip().splitlines()]
    assert all(r["level"] in ("debug", "info", "warning", "error") and "msg" in r for r in recs)
    return recs


def test_log_format_json_on_every_path(tmp_path):
    p = jrun("--log-format", "json", "--timeout", "never", "--", "true")  # a parse error
    assert p.returncode == 125
    (rec,) = _json_lines(p.stderr)
    assert rec["level"] == "error" and "--timeout" in rec["msg"]
    p = jrun("--net", "none", "--log-format=json", "--bogus", "--", "true")
    assert p.returncode == 125 and "--bogus" in _json_lines(p.stderr)[0]["msg"]
    p = jrun("--net", "none", "--log-format", "json", "--", "no-such-cmd")  # a child error
    assert p.returncode == 127 and "not found" in _json_lines(p.stderr)[0]["msg"]
    p = jrun("--net", "none", "--log-format", "json", "--timeout", "1", "--stop-timeout", "1",
             "--", "sleep", "30")  # supervision: timed out, and SIGKILL at once (sleep has no handler)
    recs = _json_lines(p.stderr)
    assert p.returncode == 124 and [r["level"] for r in recs] == ["warning"] and "SIGKILL" in recs[0]["msg"]
    assert all(r["job"] for r in recs)
    p = jrun("--net", "none", "--log-format", "json", "--log-level", "debug", "--", "true")
    assert len(_json_lines(p.stderr)) > 5
    cfg = _config(tmp_path, 'log-format = "json"\n')
    p = jrun("--config", cfg, "kill", "nope")  # a subcommand, format from the config file
    assert p.returncode == 125 and "no running job" in _json_lines(p.stderr)[0]["msg"]


# --- the configuration file -----------------------------------------------


def test_config_defaults_and_command_line_wins(tmp_path):
    cfg = _config(tmp_path, '# host defaults\nnet = "none"\ntimeout = "1"\nstop-timeout = 1\n'
                            'workdir = "/srv"\n')
    p = jrun("--config", cfg, "--", "sh", "-c", "pwd; sleep 10")
    assert p.returncode == 124 and p.stdout == "/srv\n"  # net none, workdir and timeout from the file
    p = jrun("--config", cfg, "--timeout", "30", "-w", "/work", "--", "sh", "-c", "sleep 1.5; pwd")
    assert p.returncode == 0 and p.stdout == "/work\n"
    p = jrun("--config=%s" % cfg, "run", "--", "pwd")
    assert p.returncode == 0 and p.stdout == "/srv\n"


@pytest.mark.parametrize("text,msg", [
    ('memory = "12Q"\n', "memory: '12Q' is not a size"),
    ('net = "none"\nbogus = 1\n', "bogus: unknown key"),
    ('timeout = true\n', "timeout: True should be a number or a string"),
    ('init = "yes"\n', "init: 'yes' should be true or false"),
    ('log-level = "loud"\n', "log-level: 'loud' is not one of"),
    ('state-dir = "relative"\n', "state-dir: 'relative' must be an absolute path"),
    ('subnet = "10.1.2.0/33"\n', "subnet:"),
    ('net-pool = "10.1.2.0/28"\n', "net-pool: '10.1.2.0/28': the prefix length must be from /8 to /24"),
    ('subnet = "10.1.2.0/29"\n', "subnet: '10.1.2.0/29': the prefix length must be from /8 to /28"),
    ('subnet = "10.1.2.1/24"\n', "subnet: '10.1.2.1/24' has host bits set (did you mean 10.1.2.0/24?)"),
])
def test_invalid_config_values(tmp_path, text, msg):
    cfg = _config(tmp_path, text)
    name = _name("badcfg")
    p = jrun("--config", cfg, "--net", "none", "--name", name, "--", "true")
    assert p.returncode == 125
    assert p.stderr.startswith("jrun: %s: " % cfg) and msg in p.stderr, p.stderr
    assert len(p.stderr.splitlines()) == 1 and name not in state_dirs()


def test_invalid_toml_names_path_and_line(tmp_path):
    cfg = _config(tmp_path, 'net = "none"\n\nmemory = 12Q\n')
    p = jrun("--config", cfg, "--", "true")
    assert p.returncode == 125 and str(cfg) in p.stderr and "line 3" in p.stderr


def test_config_must_be_roots_and_not_writable_by_others(tmp_path):
    cfg = _config(tmp_path, 'net = "none"\n')
    os.chmod(cfg, 0o666)
    p = jrun("--config", cfg, "--", "true")
    assert p.returncode == 125 and "writable by group or others" in p.stderr
    p = jrun("--config", tmp_path / "missing.toml", "--", "true")
    assert p.returncode == 125 and "no such file" in p.stderr


def test_config_unit_parsing(tmp_path):
    import jrun as J

    before = J.HOST
    cfg = _config(tmp_path, 'timeout = 30\nmemory = 512\ninit = true\nread-only = false\n'
                            'state-dir = "/tmp/x"\naudit-log = ""\nsubnet = "10.99.0.0/24"\n'
                            'net-pool = "10.98.0.0/16"\n')
    d, host = J.load_config(str(cfg))
    assert d == {"timeout": "30", "memory": "512", "init": True}
    assert (host.state_dir, host.audit_log, host.config, host.named) == ("/tmp/x", "", str(cfg), False)
    assert (host.subnet, host.net_pool) == ((0x0A630000, 24), (0x0A620000, 16))
    assert (host.rootfs_dir, host.network_idle) == (J.DEFAULT_ROOTFS_DIR, J.DEFAULT_NETWORK_IDLE)
    assert J.HOST is before  # a record: nothing changed behind the caller's back
    s = J.parse_run(["--timeout", "5", "true"], {"timeout": "30", "init": True, "net": "none"})
    assert s.timeout == 5 and s.init is True and s.net == "none"
    d, host = J.load_config(str(tmp_path / "absent.toml"))
    assert d == {} and repr(host) == repr(J.DEFAULT_HOST.replace(config=str(tmp_path / "absent.toml")))
    with pytest.raises(J.UsageError):
        J.load_config(str(tmp_path / "absent.toml"), explicit=True)


# --- verify ---------------------------------------------------------------

CORE_CHECKS = ("Process isolation", "Filesystem isolation", "Mount isolation", "Network namespace")
ALL_CHECKS = set(CORE_CHECKS) | {"Network readiness", "Network isolation", "Memory limit", "PIDs limit", "CPU limit",
                                 "cgroup membership", "I/O limit", "Upload isolation", "Capabilities", "no_new_privs",
                                 "Seccomp"}


def _verify(*args):
    p = jrun("verify", "--json", *args, timeout=300)
    report = json.loads(p.stdout)
    return p, report, {c["name"]: c for c in report["checks"]}


def test_verify_passes_on_this_host():
    """This host has every controller and the network: every check runs
    and passes (a skip would hide one)."""
    p, report, checks = _verify()
    assert set(checks) >= ALL_CHECKS
    for c in report["checks"]:
        assert c["status"] == "pass" and c["evidence"], c
    assert report["ok"] is True and p.returncode == 0
    assert report["host"]["cgroup"].startswith(("v1", "v2"))


def test_verify_fails_a_check_when_a_defence_is_turned_off():
    p, report, checks = _verify("--seccomp", "unconfined")
    assert p.returncode == 1 and report["ok"] is False
    assert checks["Seccomp"]["status"] == "fail" and "Seccomp: 0" in checks["Seccomp"]["evidence"]
    assert "unshare(CLONE_NEWUSER): ALLOWED" in checks["Seccomp"]["evidence"]
    assert report["host"]["extra_options"] == ["--seccomp", "unconfined"]
    for name in CORE_CHECKS:
        assert checks[name]["status"] == "pass"
    text = jrun("verify", "--seccomp", "unconfined", timeout=300)
    assert text.returncode == 1
    line = next(x for x in text.stdout.splitlines() if "Seccomp" in x and "why" not in x)
    assert line.startswith("\u274c") and "Seccomp: 0" in line
    assert any(x.startswith("\u2705 Process isolation") and "PID 1 sh (parent 0)" in x
               for x in text.stdout.splitlines())
    assert "checks:" in text.stdout.splitlines()[-1]


def test_verify_fails_capabilities_when_sys_admin_is_added():
    p, report, checks = _verify("--cap-add", "SYS_ADMIN")
    assert p.returncode == 1
    c = checks["Capabilities"]
    assert c["status"] == "fail" and "holds SYS_ADMIN" in c["evidence"] and "sethostname: ALLOWED" in c["evidence"]
    # The default filter is relaxed for CAP_SYS_ADMIN (as docker's is): namespaces become possible.
    c = checks["Seccomp"]
    assert c["status"] == "fail" and "Seccomp: 2" in c["evidence"] and "SYS_ADMIN" in c["fix"]
    assert checks["no_new_privs"]["status"] == "pass"


def test_verify_with_net_none_skips_the_network_checks():
    p, report, checks = _verify("--net", "none")
    for name in ("Network readiness", "Network isolation"):
        assert checks[name]["status"] == "skip" and "--net none" in checks[name]["why"]
    assert checks["Network namespace"]["status"] == "pass"
    text = jrun("verify", "--net", "none", timeout=300).stdout
    assert any(x.startswith("\u26a0\ufe0f") and "Network readiness" in x for x in text.splitlines())


def test_verify_refuses_a_command_and_bad_options():
    assert jrun("verify", "--", "ls").returncode == 125
    assert jrun("verify", "--memory", "12Q").returncode == 125


def test_verify_skips_what_the_host_cannot_support(monkeypatch):
    import jrun as J

    monkeypatch.setattr(J, "verify_cgroup_host", lambda: ({"cpu"}, "v1 (cpu)"))
    with pytest.raises(J._Skip, match="no memory cgroup controller.*refuses --memory"):
        J._need_controller("memory")
    J._need_controller("cpu")
    monkeypatch.setattr(J, "VERIFY_CHECKS", [("Memory limit", J.verify_memory)])
    (r,) = J.run_verification([])
    assert r["status"] == "skip" and "memory" in r["why"]


# --- completion -----------------------------------------------------------


def _complete(line, tmp_path):
    out = tmp_path / "completions"
    env = dict(os.environ, _ARGCOMPLETE="1", _ARGCOMPLETE_IFS="\n", COMP_LINE=line, COMP_POINT=str(len(line)),
               _ARGCOMPLETE_STDOUT_FILENAME=str(out))
    p = subprocess.run(JRUN, env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return {c.strip() for c in out.read_text().split("\n")} - {""}  # a unique match ends in a space


def test_completion_of_options_and_subcommands(tmp_path):
    import jrun as J

    got = _complete("jrun ", tmp_path)
    assert {"run", "ps", "kill", "gc", "verify", "rootfs", "--config", "--version"} <= got
    assert {o.long for o in J.RUN_OPTIONS} <= got
    assert _complete("jrun --me", tmp_path) == {"--memory"}
    assert _complete("jrun --net ", tmp_path) >= {"bridge", "none"}
    assert _complete("jrun --log-level ", tmp_path) == {"debug", "info", "warning", "error"}
    assert _complete("jrun run --seccomp ", tmp_path) == {"default", "unconfined"}
    assert _complete("jrun ps --j", tmp_path) == {"--json"}
    assert "TERM" in _complete("jrun kill -s ", tmp_path)
    assert _complete("jrun rootfs ", tmp_path) >= {"build", "path"}


def test_completion_of_network_names(tmp_path, monkeypatch):
    import jrun as J

    net = tmp_path / ".net"
    net.mkdir()
    (net / "jrun-0a1b2c3d4e").write_text("name lab\nsubnet 172.31.128.0/24\n")
    (net / "jrun-0a1b2c3d4e.tmp").write_text("name half-written\n")
    monkeypatch.setattr(J, "NET_DIR", str(net))
    assert J.network_names() == ["bridge", "lab", "none"]


def test_completion_of_running_job_ids(tmp_path):
    name = _name("comp")
    assert name not in _complete("jrun kill ", tmp_path)
    proc = _start("--net", "none", "--name", name, "--", "/bin/sh", "-c", "echo ready; read x")
    try:
        assert name in _complete("jrun kill ", tmp_path)
        assert _complete("jrun kill %s" % name[:-2], tmp_path) == {name}
    finally:
        _stop(proc)


def test_a_normal_run_imports_no_heavy_module():
    p = subprocess.run(JRUN[:1] + ["-X", "importtime"] + JRUN[1:] + ["--net", "none", "--", "true"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0
    mods = {line.split("|")[-1].strip() for line in p.stderr.splitlines() if "|" in line}
    assert not mods & {"argparse", "argcomplete", "json", "re", "tomllib", "subprocess", "dataclasses"}, mods


# --- the manual page ------------------------------------------------------

MAN = os.path.join(ROOT, "man", "jrun.1")


def test_man_page_is_clean():
    p = subprocess.run(["groff", "-man", "-ww", "-z", MAN], capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    p = subprocess.run(["man", "--warnings", "-l", MAN], capture_output=True, text=True,
                       env=dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8", MANPAGER="cat", PAGER="cat"))
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert "EXAMPLES" in p.stdout and "systemd-run --scope -p Delegate=yes" in p.stdout.replace("‐", "-")


def _man_options():
    """The options of the OPTIONS section: the first line after each .TP."""
    lines = open(MAN).read().splitlines()
    start = lines.index(".SH OPTIONS")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(".SH "))
    opts = []
    for i in range(start, end):
        if lines[i] == ".TP":
            for word in lines[i + 1].replace("\\-", "-").replace('"', " ").replace(",", " ").split()[1:]:
                if word.startswith("-"):
                    opts.append(word)
    return opts


def test_man_options_match_help():
    import jrun as J

    table = []
    for o in J.RUN_OPTIONS:
        table += ([o.short] if o.short else []) + [o.long]
    table += ["--config", "-h", "--help", "--version"]
    man = _man_options()
    assert set(man) == set(table), (set(man) ^ set(table))
    longs = [o for o in man if o.startswith("--")]
    assert longs == [o for o in table if o.startswith("--")], "the man page lists options in --help's order"
    help_text = jrun("--help", check=0).stdout
    help_opts = {w.rstrip(",") for line in help_text.splitlines() if line.startswith("  ")
                 for w in line.split()[:3] if w.startswith("-")}
    assert help_opts == set(table)


def test_no_top_level_name_is_defined_twice():
    # jrun.py is one namespace: a helper merged in from another branch must
    # not silently replace one of the same name.
    import ast

    tree = ast.parse(open(os.path.join(ROOT, "jrun.py")).read())
    names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    names += [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
              and t.id != "_o"]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_gc_removes_orphan_cgroups_but_never_busy_or_young_ones():
    import jrun as J

    host = J.cgroup_host()
    points = [J.CGROUP_ROOT] if host.version == 2 else sorted({p for p, _ in host.mounts.values()})[:2]
    old, young, busy = (_name("orphan"), _name("young"), _name("busy"))
    made = []
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for name in (old, young, busy):
            for point in points:
                d = os.path.join(point, J.CGROUP_SUBTREE, name)
                os.makedirs(d)
                made.append(d)
                if name != young:
                    os.utime(d, (time.time() - 600,) * 2)
        with open(os.path.join(points[-1], J.CGROUP_SUBTREE, busy, "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))
        found = {r.name: r for r in J.Cgroup.orphans(lambda: set(J.job_ids()))}
        assert "cgroup " + old in found
        assert "cgroup " + young not in found and "cgroup " + busy not in found
        assert sorted(found["cgroup " + old].dirs) == sorted(d for d in made if d.endswith(old))
        found["cgroup " + old].teardown()  # only ours: others' orphans are theirs
        assert not any(os.path.exists(d) for d in made if d.endswith(old))
    finally:
        sleeper.kill()
        sleeper.wait()
        for d in made:
            rmdir_when_empty(d)
        J.remove_unused_subtrees(J.jrun_subtrees())  # the jrun/ parents this test made


@pytest.mark.parametrize("cmd", [["ps"], ["kill", "x"], ["gc"], ["verify"]])
def test_subcommands_refuse_non_root_with_one_line(cmd):
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + JRUN + cmd,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 125 and p.stdout == ""
    assert p.stderr.startswith("jrun: ") and len(p.stderr.splitlines()) == 1 and "root" in p.stderr
