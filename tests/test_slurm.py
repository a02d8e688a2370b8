"""jrun under a real Slurm (issue 12): a one-box cluster of this host's own
slurmctld and two slurmd (nodes n1 and n2), started and torn down by this
module (tests/slurm_cluster.py), running this checkout's jrun in real batch
jobs, job arrays and srun steps.

The lane's slurm.conf is a production one in miniature: proctrack/cgroup and
task/cgroup with cgroup/v1 (the step's freezer, cpuset and memory cgroups,
--mem enforced), KillWait=3, and an Epilog that runs
`jrun gc --slurm-job $SLURM_JOB_ID` as the README asks sites to; one test
uses a second cluster with proctrack/linuxproc.
"""
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import time
import uuid

import pytest

import jrun as J
from conftest import JRUN, job_links, jrun, needs_root
from slurm_cluster import KILL_WAIT, LaneError, SlurmCluster, alive, missing_packages, rmdir_tree

MISSING = missing_packages()
pytestmark = [needs_root, pytest.mark.skipif(bool(MISSING), reason="the Slurm lane needs the Debian packages %s "
                                             "(.ci/setup installs them)" % " ".join(MISSING))]

JR = shlex.join(JRUN)  # Slurm runs jobs as root: the interpreter and jrun.py, spelled out
TOKEN = uuid.uuid4().hex[:6]
NAMES = set()  # every --name this module gives, for the leftover checks


def name(tag):
    n = "sl%s-%s" % (TOKEN, tag)
    NAMES.add(n)
    return n


def script(*lines):
    return "#!/bin/sh\n" + "\n".join(lines) + "\n"


# busybox has no allocator: tail buffers its whole input (/dev/zero has no
# newline), so it allocates what head feeds it.
ALLOC = "head -c %d /dev/zero | tail > /dev/null"

EPILOG = """#!/bin/sh
# Slurm's Epilog=, as root on each node after each job: what the README asks
# sites to run.  Always exits 0 (a failing epilog drains the node).
log="$(dirname "$0")/epilog.log"
out=$(%s gc --slurm-job "$SLURM_JOB_ID" 2>&1); rc=$?
printf '%%s\\n' "$out" | sed "s/^/$SLURM_JOB_ID $SLURMD_NODENAME: /" >> "$log"
echo "$SLURM_JOB_ID $SLURMD_NODENAME: gc exit $rc" >> "$log"
exit 0
""" % JR


class Lane(SlurmCluster):
    def epilog_lines(self, job_id):
        """What the Epilog's `jrun gc --slurm-job` said for JOB_ID."""
        try:
            with open(self.path("epilog.log")) as f:
                return [line.split(": ", 1)[1] for line in f.read().splitlines()
                        if line.startswith("%s " % job_id) and ": " in line]
        except FileNotFoundError:
            return []


# A job array whose tasks end in every way jrun reports: task -> (jrun's
# arguments, the exit status jrun and Slurm must both report).
ARRAY = {
    0: ("--net none -- /bin/sh -c 'exit 0'", 0),
    1: ("--net none -- /bin/sh -c 'exit 3'", 3),
    2: ("--net none -- /bin/sh -c 'exit 42'", 42),
    3: ("--net none --init -- /bin/sh -c 'kill -KILL $$'", 137),  # COMMAND killed by signal 9
    4: ("--net none --memory 1K -- true", 125),  # refused by jrun: nothing started
    5: ("--net none -- /no/such/command", 127),
}


@pytest.fixture(scope="module")
def lane():
    c = Lane(epilog=EPILOG).start()
    try:
        # Jobs that take a while and need nothing from their test while they
        # run start with the lane, so that they run while other tests do.
        c.early = {
            "array": c.sbatch(script('case "$SLURM_ARRAY_TASK_ID" in')
                              + "".join("%d) exec %s %s;;\n" % (t, JR, a) for t, (a, _) in ARRAY.items())
                              + "esac\n", "--array=0-%d" % (len(ARRAY) - 1)),
            "oom": c.sbatch(script("exec %s --net none --memory 32M -- /bin/sh -c %s"
                                   % (JR, shlex.quote(ALLOC % (200 << 20))))),
            "timeout": c.sbatch(script("s=$(date +%s.%N)",
                                       "%s --net none --timeout 1 -- sleep 300" % JR,
                                       "rc=$?",
                                       'echo "rc=$rc elapsed=$(awk "BEGIN { print $(date +%s.%N) - $s }")"',
                                       "exit $rc")),
        }
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def linuxproc_lane():
    c = Lane(name="jrunlane2", nodes=("p1",), proctrack="linuxproc").start()
    try:
        yield c
    finally:
        c.stop()


# --- helpers ----------------------------------------------------------------


def leftovers(names):
    """What jobs of these names left on the host: state directory, cgroups
    (in any hierarchy, under any parent), veth, address lease."""
    left = []
    leases = ""
    veths = job_links()  # after the kernel deleted those of ended jobs (with their namespace)
    for f in glob.glob(os.path.join(J.NET_DIR, "*")):
        try:
            with open(f) as fh:
                leases += fh.read()
        except OSError:
            pass
    for n in sorted(names):
        state = os.path.join(J.HOST.state_dir, n)
        if os.path.exists(state):
            left.append(state)
        left += [d for d in glob.glob(os.path.join(J.CGROUP_ROOT, "**", n), recursive=True) if os.path.isdir(d)]
        veth = J.veth_name(state)
        if veth in veths:
            left.append("veth " + veth)
        if " %s\n" % state in leases:
            left.append("lease of " + state)
    return left


def gc_names(names):
    """A test's own cleanup: gc exactly these jobs (never a live one)."""
    for n in names:
        J.gc_job(n)


def slurm_job_cgroups(lane, job_id):
    """Slurm's cgroups of one job, in every hierarchy, on every node."""
    return sorted(d for node in lane.nodes for d in
                  glob.glob(os.path.join(J.CGROUP_ROOT, "*", "slurm_" + node, "uid_*", "job_%s" % job_id)))


def wait_running(lane, job_id, state_name, timeout=30):
    """Wait until the job's jrun has exec'd COMMAND; return its job.json."""
    path = os.path.join(J.HOST.state_dir, state_name, "job.json")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                rec = json.load(f)
            if rec.get("pid") and _exec_done(rec["pid"]):
                return rec
        except (OSError, ValueError):
            pass
        if lane.state(job_id) not in (None, "PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError("job %s ended before its jrun ran: %s\n%s" % (
                job_id, lane.job(job_id), lane.output(job_id)))
        time.sleep(0.05)
    raise LaneError("job %s: jrun %s did not start in %ss\n%s" % (job_id, state_name, timeout, lane.logs()))


def _exec_done(pid):
    """The job's PID 1 is no longer jrun's child code (python)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return b"python" not in f.read().split(b"\0")[0]
    except OSError:
        return False


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open("/proc/%d/task/%d/children" % (p, p)) as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def cgroup_of(pid):
    """{hierarchy: path} from /proc/PID/cgroup (v1 names)."""
    with open("/proc/%d/cgroup" % pid) as f:
        return {line.split(":", 2)[1]: line.split(":", 2)[2] for line in f.read().splitlines()}


def read(path):
    with open(path) as f:
        return f.read()


# --- the lane ---------------------------------------------------------------


def test_lane_is_private_and_both_nodes_are_idle(lane):
    out = lane.run("scontrol", "show", "config").stdout
    conf = dict(re.findall(r"^(\w+)\s+=\s+(.*)$", out, re.M))
    assert conf["SLURM_CONF"] == lane.path("slurm.conf")
    assert conf["ProctrackType"] == "proctrack/cgroup" and conf["KillWait"] == "%d sec" % KILL_WAIT
    assert conf["StateSaveLocation"].startswith(lane.dir) and conf["SlurmdSpoolDir"].startswith(lane.dir)
    assert conf["SlurmctldPort"] not in ("6817", "6817-6817")  # the default port of a system install
    states = dict(line.split() for line in lane.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.splitlines())
    assert set(states) == {"n1", "n2"} and set(states.values()) <= {"idle", "mix", "alloc"}, states
    # The system's own munged and slurm units stay off (.ci/setup).
    for unit in ("munge", "slurmctld", "slurmd"):
        assert not os.path.exists("/etc/systemd/system/multi-user.target.wants/%s.service" % unit)


# --- srun: ranks on two nodes -----------------------------------------------

RANK = r"""
me=$SLURM_PROCID
a=$(ip -4 -o addr show eth0 | sed -n 's/.* inet \([0-9.]*\)\/.*/\1/p')
(while :; do echo hello | nc -l -p 5000 >/dev/null 2>&1; done) &
while ! netstat -ltn | grep -q ':5000 '; do sleep 0.02; done
echo "$a $SLURMD_NODENAME" > /ranks/a.$me.tmp && mv /ranks/a.$me.tmp /ranks/addr.$me
while [ $(ls /ranks | grep -c '^addr\.') -lt 4 ]; do sleep 0.05; done
if nc -w 1 $a 5000 </dev/null | grep -q hello; then echo "rank $me self reached"; fi
pids=
for f in /ranks/addr.*; do
  r=${f##*.}; [ "$r" = "$me" ] && continue
  set -- $(cat $f)
  (if nc -w 1 $1 5000 </dev/null | grep -q hello; then echo "rank $me peer $r REACHED"
   else echo "rank $me peer $r blocked"; fi) &
  pids="$pids $!"
done
wait $pids
echo "rank $me at $a on $SLURMD_NODENAME"
while [ ! -e /ranks/go ]; do sleep 0.05; done
"""


def test_srun_two_nodes_four_networked_ranks_share_this_hosts_bridge(lane, tmp_path):
    """Each of 4 ranks (2 on n1, 2 on n2) is a jrun job on the default
    bridge.  On a real cluster every node has its own jrun0 with the same
    subnet (addresses may repeat across nodes; no rank reaches another).
    Here both "nodes" are this one host: all ranks are ports of one jrun0,
    with distinct addresses from one lease file, and the default bridge's
    isolation still keeps every rank from every other one."""
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    stem = name("rank")
    wrapper = "exec %s --name %s-$SLURM_PROCID -e SLURM_PROCID -e SLURMD_NODENAME -v %s:/ranks -- /bin/sh -c %s" % (
        JR, stem, ranks, shlex.quote(RANK))
    names = ["%s-%d" % (stem, i) for i in range(4)]
    NAMES.update(names)
    srun = subprocess.Popen(["srun", "-N2", "-n4", "--ntasks-per-node=2", "-l", "/bin/sh", "-c", wrapper],
                            env=lane.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(glob.glob(str(ranks / "addr.*"))) < 4:
            if srun.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("ranks did not come up: %s" % srun.communicate()[0])
            time.sleep(0.05)
        bridges = {}
        for n in names:
            veth = J.veth_name(os.path.join(J.HOST.state_dir, n))
            bridges[n] = os.path.basename(os.readlink("/sys/class/net/%s/master" % veth))
    finally:
        (ranks / "go").touch()
        out = srun.communicate(timeout=30)[0]
    assert srun.returncode == 0, out
    assert set(bridges.values()) == {J.DEFAULT_BRIDGE}, bridges
    at = dict((int(m[0]), (m[1], m[2])) for m in re.findall(r"rank (\d) at ([\d.]+) on (\w+)", out))
    assert sorted(at) == [0, 1, 2, 3], out
    assert sorted(node for _, node in at.values()) == ["n1", "n1", "n2", "n2"]
    addrs = [a for a, _ in at.values()]
    assert len(set(addrs)) == 4 and all(a.startswith(J.DEFAULT_SUBNET.rsplit(".", 1)[0] + ".") for a in addrs)
    assert len(re.findall(r"rank \d self reached", out)) == 4, out  # the listeners and nc work
    assert len(re.findall(r"rank \d peer \d blocked", out)) == 12 and "REACHED" not in out, out
    assert leftovers(names) == []


# --- exit codes -------------------------------------------------------------


def test_array_task_exit_codes_map_one_to_one(lane):
    recs = lane.wait(lane.early["array"])
    got = {int(r["ArrayTaskId"]): r for r in recs}
    assert sorted(got) == sorted(ARRAY)
    comp = lane.jobcomp()
    for task, (_, code) in ARRAY.items():
        r = got[task]
        assert r["ExitCode"] == "%d:0" % code, (task, r["ExitCode"], lane.output(lane.early["array"], task))
        assert r["JobState"] == ("COMPLETED" if code == 0 else "FAILED")
        assert comp[r["JobId"]]["ExitCode"] == r["ExitCode"]  # jobcomp/filetxt agrees
    assert "jrun: --memory" in lane.output(lane.early["array"], 4)


def test_oom_under_memory_is_137_for_slurm(lane):
    (r,) = lane.wait(lane.early["oom"])
    out = lane.output(lane.early["oom"])
    assert (r["JobState"], r["ExitCode"]) == ("FAILED", "137:0"), out
    assert "jrun: job killed: out of memory (limit 32 MiB)" in out


# --- stopping: --timeout, scancel -------------------------------------------


def _run_and_cancel(lane, state_name, *lines):
    """Submit a batch script, wait for its jrun job, scancel it: return
    (job id, seconds until its processes were gone, the final record)."""
    job = lane.sbatch(script(*lines))
    rec = wait_running(lane, job, state_name)
    return (job,) + _cancel_and_watch(lane, job, rec)


def _cancel_and_watch(lane, job_id, rec):
    """scancel JOB_ID; return (seconds until every process of the jrun job
    was gone, the Slurm record once the job has ended, epilog included)."""
    pids = [rec["jrun_pid"], rec["pid"]] + descendants(rec["pid"])
    t0 = time.monotonic()
    lane.run("scancel", job_id)
    while any(alive(p) for p in pids) and time.monotonic() - t0 < KILL_WAIT + 0.5:
        time.sleep(0.01)
    gone = time.monotonic() - t0
    # Past that the test has its answer: end what still runs (ours, by PID)
    # rather than wait for Slurm's SIGKILL or jrun's own --stop-timeout.
    for p in pids:
        if alive(p):
            os.kill(p, signal.SIGKILL)
    (r,) = lane.wait(job_id)
    return gone, r


# How the batch script runs jrun; whether jrun must clean up by itself;
# Slurm's ExitCode.  On scancel, proctrack/cgroup sends SIGTERM only to the
# step's task (the process slurmstepd started: the batch shell, or jrun with
# exec) and, KillWait later, SIGKILL to every process of the step.  With exec
# jrun gets the SIGTERM and KillWait to clean up; without, the shell dies at
# once, slurmstepd SIGKILLs the rest of the step, jrun included, and the
# Epilog's gc is what cleans up.
SCANCEL = [
    # PID 1 (sleep) has no SIGTERM handler: jrun sends SIGKILL at once.
    pytest.param("exec %s --name %s -- sleep 300", True, None, id="exec"),
    pytest.param("%s --name %s -- sleep 300\necho jrun-exit=$?", False, None, id="no-exec"),
    pytest.param("exec %s --name %s --init -- sleep 300", True, "143:0", id="exec-init"),  # tini: sleep got SIGTERM
    # The README's way for a script that goes on after jrun: Slurm's
    # SIGTERM (proctrack/cgroup) reaches only the step's task, the shell,
    # which hands it on to jrun and waits for jrun's cleanup.
    pytest.param("%s --name %s --init -- sleep 300 &\npid=$!\ntrap 'kill -TERM $pid' TERM\n"
                 "while kill -0 $pid 2>/dev/null; do wait $pid; rc=$?; done\necho jrun-exit=$rc", True, None,
                 id="no-exec-forward-init"),
]


@pytest.mark.parametrize("body, by_itself, exit_code", SCANCEL)
def test_scancel_stops_the_job_within_killwait_and_leaves_nothing(lane, request, body, by_itself, exit_code):
    n = name("cancel-" + request.node.callspec.id)
    try:
        job, gone, r = _run_and_cancel(lane, n, body % (JR, n))
        assert r["JobState"] == "CANCELLED" and r["ExitCode"] == (exit_code or r["ExitCode"]), r
        assert gone < KILL_WAIT, "the job's processes lived %.1f s after scancel (KillWait %d s)" % (gone, KILL_WAIT)
        epilog = lane.epilog_lines(job)
        assert leftovers([n]) == [], epilog
        if by_itself:  # the Epilog's gc found nothing of it
            assert not [line for line in epilog if n in line], epilog
        else:
            assert "gc exit 0" in epilog, epilog
    finally:
        gc_names([n])


def test_stop_timeout_below_killwait_lets_jrun_stop_a_slow_job_and_clean_up(lane, tmp_path):
    """A PID 1 that handles SIGTERM and takes its time: with the README's
    `stop-timeout` below KillWait, jrun's own SIGKILL comes first and jrun
    cleans up before Slurm's SIGKILL could reach it."""
    cfg = tmp_path / "jrun.toml"
    cfg.write_text('stop-timeout = "1s"\nnet = "none"\n')
    n = name("slow")
    slow = "trap 'echo TERM ignored' TERM; while :; do sleep 0.1; done"
    try:
        job, gone, r = _run_and_cancel(lane, n, "exec %s --config %s --name %s -- /bin/sh -c %s"
                                       % (JR, cfg, n, shlex.quote(slow)))
        assert r["JobState"] == "CANCELLED" and r["ExitCode"] == "137:0", r
        assert 1 <= gone < KILL_WAIT, gone
        assert "TERM ignored" in lane.output(job) and "sending SIGKILL" in lane.output(job)
        assert leftovers([n]) == []
        assert not [line for line in lane.epilog_lines(job) if n in line]
    finally:
        gc_names([n])


def test_linuxproc_scancel_jrun_without_exec_stops_within_killwait(linuxproc_lane):
    lane = linuxproc_lane
    n = name("lp")
    try:
        _, gone, r = _run_and_cancel(lane, n, "%s --net none --name %s -- sleep 300" % (JR, n), "echo jrun-exit=$?")
        assert r["JobState"] == "CANCELLED"
        assert gone < KILL_WAIT, "the job's processes lived %.1f s after scancel (KillWait %d s)" % (gone, KILL_WAIT)
        assert leftovers([n]) == []  # no Epilog here: jrun itself
    finally:
        gc_names([n])


# --- cgroups: nesting under the step ----------------------------------------

# The step's cgroup, as the batch script sees it (v1: the same path in each
# hierarchy Slurm made it in; freezer is proctrack/cgroup's).
STEP = "P=$(grep ':freezer:' /proc/self/cgroup | cut -d: -f3)"
GO = "while [ ! -e /x/go ]; do sleep 0.05; done"


def _hold(tmp_path):
    """A host directory for -v DIR:/x and the go file that ends GO."""
    d = tmp_path / "x"
    d.mkdir()
    return d


def test_cgroup_parent_step_with_every_limit(lane, tmp_path):
    x = _hold(tmp_path)
    n = name("nest")
    job = lane.sbatch(script(
        STEP, "cpu=$(grep Cpus_allowed_list /proc/self/status | awk '{print $2}' | cut -d, -f1 | cut -d- -f1)",
        "exec %s --net none --name %s -v %s:/x --cgroup-parent $P --memory 64M --pids 20 --cpu 50 "
        "--cores $cpu --io-bps 10M -- /bin/sh -c %s" % (JR, n, x, shlex.quote(GO))))
    try:
        rec = wait_running(lane, job, n)
        cg = cgroup_of(rec["pid"])
        step = cgroup_of(rec["jrun_pid"])["freezer"]
        assert re.fullmatch(r"/slurm_n[12]/uid_0/job_%s/step_batch" % job, step), step
        # Nested under the step wherever Slurm made it, jrun's own elsewhere:
        assert cg["freezer"] == step  # proctrack/cgroup still sees (and kills) every process
        assert cg["memory"].startswith(step + "/") and cg["memory"].endswith("/" + n)
        assert cg["cpuset"].startswith(step + "/") and cg["cpuset"].endswith("/" + n)
        for h in ("pids", "cpu", "blkio"):
            assert cg[h] == "/jrun/" + n, (h, cg[h])
        path = lambda h, f: os.path.join(J.CGROUP_ROOT, h, cg[h].lstrip("/"), f)  # noqa: E731
        assert int(read(path("memory", "memory.limit_in_bytes"))) == 64 << 20
        assert read(path("pids", "pids.max")).strip() == "20"
        assert read(path("cpu", "cpu.cfs_quota_us")).strip() == "50000"
        assert read(path("cpuset", "cpuset.cpus")).strip() == read(
            os.path.join(J.CGROUP_ROOT, "cpuset", step.lstrip("/"), "cpuset.cpus")).strip()
        assert " 10485760" in read(path("blkio", "blkio.throttle.read_bps_device"))
    finally:
        (x / "go").touch()
        lane.wait(job)
        gc_names([n])
    assert leftovers([n]) == [] and slurm_job_cgroups(lane, job) == []


def test_a_job_under_slurm_stays_inside_the_steps_memory_limit(lane):
    job = lane.sbatch(script("exec %s --net none -- /bin/sh -c %s" % (JR, shlex.quote(ALLOC % (150 << 20)))),
                      "--mem=64M")
    (r,) = lane.wait(job)
    out = lane.output(job)
    assert r["ExitCode"] == "137:0", (r["JobState"], r["ExitCode"], out)
    assert "jrun: job killed: out of memory (limit none of its own: the Slurm step's)" in out


def test_sigkilled_nested_jrun_does_not_block_slurms_cleanup(lane):
    n = name("kill9")
    job = lane.sbatch(script(
        STEP, "%s --net none --name %s --cgroup-parent $P -- sleep 300 &" % (JR, n),
        "while ! grep -q '\"pid\"' /run/jrun/%s/job.json 2>/dev/null; do sleep 0.05; done; sleep 0.3" % n,
        "kill -KILL $!"))
    try:
        (r,) = lane.wait(job)
        assert r["JobState"] == "COMPLETED", lane.output(job)
        assert leftovers([n]) == [], lane.epilog_lines(job)
        assert slurm_job_cgroups(lane, job) == []
    finally:
        gc_names([n])
        for d in slurm_job_cgroups(lane, job):  # what the blocked cleanup left of Slurm's
            rmdir_tree(d)


# --- scoped cleanup ---------------------------------------------------------


def test_ps_all_and_gc_of_one_job_and_of_one_slurm_job(lane, tmp_path):
    a, b = name("dead-a"), name("dead-b")
    out = tmp_path / "out"
    out.mkdir()
    job = lane.sbatch(script(
        "%s --name %s -- sleep 300 & pa=$!" % (JR, a),
        "%s --name %s -- sleep 300 & pb=$!" % (JR, b),
        "for n in %s %s; do while ! grep -q '\"pid\"' /run/jrun/$n/job.json 2>/dev/null; do sleep 0.05; done; done"
        % (a, b),
        "kill -KILL $pa $pb; sleep 0.3",
        "%s ps --all --json > %s/all.json; echo ps-all=$?" % (JR, out),
        "%s ps --json > %s/live.json; echo ps=$?" % (JR, out),
        "%s gc %s; echo gc-one=$?" % (JR, a),
        "[ -e /run/jrun/%s ] && echo a-left; [ -e /run/jrun/%s ] && echo b-kept" % (a, b),
        "%s gc --slurm-job $SLURM_JOB_ID; echo gc-slurm=$?" % JR,
        "[ -e /run/jrun/%s ] && echo b-left" % b,
        "true"))
    try:
        lane.wait(job)
        text = lane.output(job)
        assert "ps-all=0" in text and "ps=0" in text, text
        dead = {j["id"]: j for j in json.loads((out / "all.json").read_text())}
        assert {a, b} <= set(dead), dead
        assert str(dead[a]["slurm"]["job_id"]) == job
        assert not {a, b} & {j["id"] for j in json.loads((out / "live.json").read_text())}
        assert "gc-one=0" in text and "a-left" not in text and "b-kept" in text, text
        assert "gc-slurm=0" in text and "b-left" not in text, text
        assert leftovers([a, b]) == []
    finally:
        gc_names([a, b])


# --- names ------------------------------------------------------------------


def slurm_name(job, step, proc, array=None):
    """The default job name under Slurm: slurm-JOB[_TASK].STEP.PROCID, as
    sacct spells a step (12.0, 11_1.batch) plus the rank."""
    return "slurm-%s%s.%s.%s" % (job, "_%s" % array[1] if array else "", step, proc)


def test_jobs_under_slurm_get_slurm_derived_names(lane, tmp_path):
    x = _hold(tmp_path)
    st = tmp_path / "st"
    st.mkdir()
    audit = tmp_path / "audit.log"
    cfg = tmp_path / "jrun.toml"
    cfg.write_text('audit-log = "%s"\nnet = "none"\n' % audit)
    run = "%s --config %s --json-status %s/$S.json -v %s:/x -- /bin/sh -c %s" % (
        JR, cfg, st, x, shlex.quote(GO + " # " + TOKEN))
    arr = lane.sbatch(script("S=a$SLURM_ARRAY_TASK_ID; exec " + run), "--array=0-1")
    ranks = lane.sbatch(script("srun -n2 /bin/sh -c %s" % shlex.quote("S=r$SLURM_PROCID; exec " + run)), "-n2")
    want = {slurm_name(arr, "batch", 0, (arr, 0)), slurm_name(arr, "batch", 0, (arr, 1)),
            slurm_name(ranks, 0, 0), slurm_name(ranks, 0, 1)}
    try:
        deadline = time.monotonic() + 30
        mine = []
        while len(mine) < 4 and time.monotonic() < deadline:
            mine = [j for j in json.loads(jrun("ps", "--json", check=0).stdout) if TOKEN in " ".join(j["command"])]
            time.sleep(0.1)
        if len(mine) < 4:
            raise LaneError("4 jobs did not come up: %s\n%s" % (mine, lane.logs()))
        NAMES.update(j["id"] for j in mine)
        assert {j["id"] for j in mine} == want, [j["id"] for j in mine]
        table = jrun("ps", check=0).stdout
        assert all(w in table for w in want)
        for j in mine:
            rec = json.loads(read(os.path.join(J.HOST.state_dir, j["id"], "job.json")))
            assert str(rec["slurm"]["job_id"]) in {arr, ranks} or rec["slurm"].get("array_job_id") == arr
    finally:
        (x / "go").touch()
        lane.wait(arr)
        lane.wait(ranks)
    statuses = {p.stem: json.loads(p.read_text()) for p in st.iterdir()}
    assert {s["id"] for s in statuses.values()} == want
    assert statuses["r1"]["id"] == slurm_name(ranks, 0, 1) and statuses["a1"]["id"] == slurm_name(arr, "batch", 0,
                                                                                                   (arr, 1))
    logged = [json.loads(line) for line in audit.read_text().splitlines()]
    assert {r["job"] for r in logged} == want and all("slurm" in r for r in logged)


# --- --timeout (its job was submitted with the lane: it ran meanwhile) ---


def test_timeout_is_124_and_prompt(lane):
    job = lane.early["timeout"]
    (r,) = lane.wait(job, timeout=60)
    out = lane.output(job)
    assert r["ExitCode"] == "124:0" and "rc=124" in out, out
    assert "timed out after 1s" in out
    elapsed = float(re.search(r"elapsed=([\d.]+)", out).group(1))
    # Not the default --stop-timeout (10 s) after it: start-up on a loaded
    # 2-CPU host (the UML lanes boot meanwhile) takes the rest.
    assert elapsed < 1 + 4, "--timeout 1 took %.1f s:\n%s" % (elapsed, out)



# --- at the end -------------------------------------------------------------


def test_ps_and_gc_are_clean_at_the_end(lane):
    """Runs last: nothing of this module's jobs runs or is left, and Slurm's
    own cleanup of every job's cgroups was never blocked."""
    live = json.loads(jrun("ps", "--json", check=0).stdout)
    assert not [j["id"] for j in live if j["id"] in NAMES or j["id"].startswith("slurm-")]
    gc = jrun("gc", check=0)
    assert not [n for n in NAMES if n in gc.stderr], gc.stderr
    assert leftovers(NAMES) == []
    left = [d for node in lane.nodes for d in glob.glob(os.path.join(J.CGROUP_ROOT, "*", "slurm_" + node, "uid_*"))]
    assert left == []
