"""Resource limits, black-box: each limit is proved by its effect on a real
job, on whatever cgroup version this kernel runs (v1 on the dev host; the
same file runs inside a cgroup-v2 user-mode-linux guest, see
test_cgroups_v2_uml.py)."""
import glob
import json
import os
import signal
import subprocess
import time
import uuid

import pytest

import jrun as J
from conftest import JRUN, jrun, needs_root, rmdir_when_empty, sh, state_dirs

pytestmark = needs_root

HOST = J.cgroup_host()
V2 = HOST.version == 2


def name(tag):
    return "cg%s-%s" % (tag, uuid.uuid4().hex[:6])


def job_cgroups(job="*"):
    return [d for d in glob.glob("/sys/fs/cgroup/**/jrun/%s" % job, recursive=True) if os.path.isdir(d)]


def status(tmp_path, *opts, script, **kw):
    """Run SCRIPT with --json-status; return (CompletedProcess, record)."""
    path = tmp_path / ("st-%s.json" % uuid.uuid4().hex[:6])
    p = sh(script, "--json-status", path, *opts, **kw)
    with open(path) as f:
        return p, json.load(f)


def available(ctrl_v1, ctrl_v2):
    if V2:
        return ctrl_v2 in HOST.controllers("")
    return ctrl_v1 in HOST.mounts


# --- memory -----------------------------------------------------------------

# busybox has no allocator: tail must buffer its whole input (no newline in
# /dev/zero), so it allocates what head feeds it, in anonymous memory.
ALLOC = "head -c %d /dev/zero | tail > /dev/null"


def test_memory_over_limit_is_oom_killed_137(tmp_path):
    n = name("oom")
    p, st = status(tmp_path, "--name", n, "--memory", "32M", script=ALLOC % (200 << 20), timeout=60)
    assert p.returncode == 137, p.stderr
    assert "jrun: job killed: out of memory (limit 32 MiB)\n" in p.stderr
    assert st["oom_killed"] is True and st["exit_code"] == 137
    assert (24 << 20) <= st["memory_peak_bytes"] <= (32 << 20) or st["memory_peak_bytes"] is None
    assert job_cgroups(n) == []


def test_memory_under_limit_succeeds(tmp_path):
    p, st = status(tmp_path, "--memory", "64M", script=ALLOC % (20 << 20) + " && echo done")
    assert p.returncode == 0 and p.stdout == "done\n", p.stderr
    assert st["oom_killed"] is False and "out of memory" not in p.stderr
    if st["memory_peak_bytes"] is not None:  # v2 before 5.19 has no memory.peak
        assert st["memory_peak_bytes"] >= 20 << 20


def test_memory_limit_holds_in_tmpfs_too():
    # Files in the job's tmpfs are memory charged to the job: no way around.
    p = sh("dd if=/dev/zero of=/dev/shm/fill bs=1M count=100 2>/dev/null; echo $?", "--memory", "32M")
    assert p.returncode == 137 and p.stdout.strip() != "0", (p.returncode, p.stdout, p.stderr)
    assert "out of memory (limit 32 MiB)" in p.stderr


def test_swap_is_no_way_around_the_limit():
    # The child verifies the swap ceiling it runs under (audit trail); this
    # host may have no swap to prove it with.
    p = sh("true", "--memory", "32M", "--log-level", "debug", check=0)
    verified = [line for line in p.stderr.splitlines() if "cgroup verified" in line][0]
    if V2:
        assert "memory.swap.max=0" in verified or not os.path.exists("/sys/fs/cgroup/memory.swap.max") \
            and "memory.max=33554432" in verified
    else:
        assert "memory.memsw.limit_in_bytes=33554432" in verified or "memory.swappiness=0" in verified


# --- pids -------------------------------------------------------------------

def test_pids_limit_blocks_the_next_fork():
    four = "sleep 5 & sleep 5 & sleep 5 & sleep 5 & echo forked"
    assert sh(four + "; kill $(jobs -p) 2>/dev/null; true", "--pids", "5").stdout == "forked\n"
    p = sh("sleep 5 & " + four, "--pids", "5")  # sh + 5 sleeps: one too many
    assert p.returncode != 0 and "forked" not in p.stdout
    assert "fork" in p.stderr


def test_fork_bomb_is_contained_and_jrun_returns():
    n = name("bomb")
    # PID 1 starts the bomb, then spins without forking (it could not).
    # (In a subshell: ash forks each element of the pipeline from the shell
    # that runs it, so PID 1 itself would race the bomb for the last PIDs.)
    bomb = "(b() { b | b & }; b) 2>/dev/null; while :; do :; done"
    t = time.monotonic()
    proc = subprocess.Popen(JRUN + ["--net", "none", "--name", n, "--pids", "20", "--timeout", "3",
                                    "--stop-timeout", "1", "--", "/bin/sh", "-c", bomb],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = refused = 0
    try:
        while proc.poll() is None and time.monotonic() - t < 3:
            for d in job_cgroups(n):
                try:
                    with open(os.path.join(d, "pids.current")) as f:
                        peak = max(peak, int(f.read()))
                    with open(os.path.join(d, "pids.events")) as f:
                        refused = max(refused, int(f.read().split()[1]))  # "max N": forks refused
                except (OSError, IndexError):
                    pass
            time.sleep(0.05)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    took = time.monotonic() - t
    assert proc.returncode == 124, proc.stderr.read()
    # The bomb hit the limit (ash dies when a fork fails, so it burns out
    # fast), and never had more than 20 processes.
    assert refused > 0 and 1 <= peak <= 20, (refused, peak)
    assert took < 15
    assert job_cgroups(n) == []


# --- cpu --------------------------------------------------------------------

BUSY = "timeout 3 sh -c 'while :; do :; done'; true"  # not exec'd: PID 1 ignores SIGTERM


def test_cpu_50_uses_half_a_cpu(tmp_path):
    # The share alone would not tell the limit from a busy host (another
    # test, a guest): the kernel's own count of the periods it throttled the
    # job (cpu.stat nr_throttled, v1 and v2) says the quota held it back; it
    # stays 0 without one.
    n = name("cpu")
    path = tmp_path / "st.json"
    proc = subprocess.Popen(JRUN + ["--net", "none", "--name", n, "--cpu", "50", "--json-status", str(path), "--",
                                    "/bin/sh", "-c", BUSY], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    throttled = 0
    try:
        while proc.poll() is None:
            for d in job_cgroups(n):
                try:
                    with open(os.path.join(d, "cpu.stat")) as f:
                        stat = dict(line.split() for line in f)
                    throttled = max(throttled, int(stat.get("nr_throttled", 0)))
                except (OSError, ValueError):
                    pass
            time.sleep(0.1)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with open(path) as f:
        st = json.load(f)
    share = st["cpu_s"] / st["duration_s"]
    assert 0.25 <= share <= 0.65, st
    assert throttled > 0, st


def test_cores_pins_the_job():
    if not available("cpuset", "cpuset"):
        p = sh("true", "--cores", "0")
        assert p.returncode == 125 and "cpuset" in p.stderr
        pytest.skip("no cpuset controller here: --cores is refused (checked)")
    for cores in ("0", "1") if len(os.sched_getaffinity(0)) > 1 else ("0",):
        p = sh("grep Cpus_allowed_list /proc/self/status", "--cores", cores, check=0)
        assert p.stdout.split() == ["Cpus_allowed_list:", cores]


# --- io ---------------------------------------------------------------------

# Direct reads of the rootfs's busybox (through the overlay, from the disk the
# lower layer lives on), timed inside the job.  The job's writable places are
# tmpfs until volumes land, so reads are what reaches a disk here.
READ3 = ("a=$(cut -d' ' -f1 /proc/uptime); for i in 1 2 3; do "
         "dd if=/bin/busybox of=/dev/null bs=256k iflag=direct 2>/dev/null || exit 9; done; "
         "b=$(cut -d' ' -f1 /proc/uptime); echo $a $b")


def _read_rate(tmp_path, *opts):
    p, st = status(tmp_path, *opts, script=READ3, timeout=60)
    assert p.returncode == 0, p.stderr
    a, b = map(float, p.stdout.split())
    size = 3 * os.path.getsize("/var/lib/jrun/rootfs/bin/busybox")
    return size / max(b - a, 0.01), st


def test_io_bps_throttles_direct_reads(tmp_path):
    rate = 2 << 20
    got, st = _read_rate(tmp_path, "--io-bps", "2M")
    assert got <= 1.3 * rate, "read %.0f B/s with --io-bps 2M" % got
    assert st["io_read_bytes"] >= 0.9 * 3 * os.path.getsize("/var/lib/jrun/rootfs/bin/busybox")
    free, _ = _read_rate(tmp_path)
    assert free > 2 * rate, "unthrottled direct reads are too slow here to prove anything: %.0f B/s" % free


def test_io_bps_with_rootfs_host_throttles_the_hosts_system_disk(tmp_path):
    """--rootfs host: the job reads the host's /usr, so that disk is throttled."""
    n = name("ioh")
    want = J.block_devices(["/usr"])
    if not want:
        pytest.skip("/usr is on no block device here")
    proc = subprocess.Popen(JRUN + ["--net", "none", "--name", n, "--rootfs", "host", "--io-bps", "1M", "--",
                                    "/bin/sh", "-c", "echo ready; read x; true"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n", proc.stderr.read()
        d = job_cgroups(n)[0] if V2 else next(c for c in job_cgroups(n) if "blkio" in c)
        text = J._read(os.path.join(d, "io.max" if V2 else "blkio.throttle.read_bps_device"))
        for dev in want:
            assert ("%s rbps=1048576" % dev if V2 else "%s 1048576" % dev) in text, text
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0, proc.stderr.read()


def test_io_paths_follow_the_rootfs_mode_and_the_volumes():
    spec = J.parse_run(["--rootfs", "host", "-v", "/srv:/data", "true"])
    paths = J.io_paths(spec)
    assert "/usr" in paths and "/etc" in paths and "host" not in paths and paths[-1] == "/srv"
    assert J.io_paths(J.parse_run(["true"])) == [J.HOST.rootfs_dir]
    assert J.io_paths(J.parse_run(["--rootfs", "/opt/img", "true"])) == ["/opt/img"]


def test_io_devices_are_found_at_run_time():
    devs = J.block_devices(["/var/lib/jrun/rootfs"])
    assert devs and all(os.path.isdir("/sys/dev/block/%s" % d) for d in devs)
    assert not os.path.exists("/sys/dev/block/%s/partition" % devs[0])  # the whole disk, not a partition


# --- accounting -------------------------------------------------------------

CONTRACT_FIELDS = {"id", "exit_code", "signal", "oom_killed", "timed_out", "duration_s", "cpu_s",
                   "memory_peak_bytes", "io_read_bytes", "io_write_bytes"}


def test_json_status_matches_reality(tmp_path):
    n = name("js")
    p, st = status(tmp_path, "--name", n, script="sleep 0.5; exit 3")
    assert p.returncode == 3
    assert set(st) == CONTRACT_FIELDS
    assert (st["id"], st["exit_code"], st["signal"], st["oom_killed"], st["timed_out"]) == (n, 3, None, False, False)
    assert 0.5 <= st["duration_s"] < 10
    assert 0 <= st["cpu_s"] < 0.5  # sleeping costs no CPU
    assert isinstance(st["memory_peak_bytes"], int) or st["memory_peak_bytes"] is None
    # sh as PID 1 has no handler for the timeout's SIGTERM: SIGKILL ends it at once.
    p, st = status(tmp_path, "--timeout", "1", "--stop-timeout", "5", script="sleep 30; true")
    assert (p.returncode, st["exit_code"], st["timed_out"], st["signal"]) == (124, 124, True, signal.SIGKILL)
    assert 1 <= st["duration_s"] < 5


def test_stats_prints_one_summary_line():
    n = name("st")
    p = sh("echo out", "--name", n, "--stats", "--memory", "64M")
    assert p.stdout == "out\n"
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jrun: job %s: exit 0, wall " % n), p.stderr
    for word in ("cpu ", "memory peak ", "io read ", "oom kills 0"):
        assert word in lines[0]


# --- validation: stage 1 ----------------------------------------------------

@pytest.mark.parametrize("opts,opt", [
    (("--memory", "1M"), "--memory"), (("--memory", "12Q"), "--memory"),
    (("--cpu", "0"), "--cpu"), (("--cpu", "100000"), "--cpu"), (("--cpu", "half"), "--cpu"),
    (("--cores", "4096"), "--cores"), (("--cores", "0-x"), "--cores"), (("--cores", "3-1"), "--cores"),
    (("--pids", "0"), "--pids"), (("--io-bps", "fast"), "--io-bps"),
    (("--cgroup-parent", "/no-such-parent-cg"), "--cgroup-parent"),
    (("--cgroup-parent", "../escape"), "--cgroup-parent"),
    (("--json-status", "/no/such/dir/st.json"), "--json-status"),
])
def test_bad_values_refused_and_nothing_created(opts, opt):
    n = name("bad")
    p = sh("true", "--name", n, *opts)
    assert p.returncode == 125
    assert p.stderr.startswith("jrun: " + opt) and len(p.stderr.splitlines()) == 1, p.stderr
    assert n not in state_dirs() and job_cgroups(n) == []


# --- lifecycle --------------------------------------------------------------

def test_cgroup_exists_during_the_job_and_is_gone_after():
    n = name("life")
    proc = subprocess.Popen(JRUN + ["--net", "none", "--name", n, "--memory", "64M", "--stop-timeout", "1",
                                    "--", "/bin/sh", "-c", "sleep 30 & echo ready; wait"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        dirs = job_cgroups(n)
        assert dirs, "no cgroup for the running job"
        with open(os.path.join(dirs[0], "cgroup.procs")) as f:
            assert len(f.read().split()) == 2  # sh and sleep
    finally:
        proc.send_signal(signal.SIGTERM)  # forwarded; sh as PID 1 ignores it: SIGKILL after 1s
        proc.wait(timeout=30)
    assert job_cgroups(n) == []


def test_timeout_removes_the_cgroup():
    n = name("to")
    p = sh("sleep 30", "--name", n, "--timeout", "1", "--stop-timeout", "1", "--pids", "10")
    assert p.returncode == 124 and job_cgroups(n) == []


def test_gc_removes_the_cgroup_of_a_killed_jrun():
    n = name("gc")
    proc = subprocess.Popen(JRUN + ["--net", "none", "--name", n, "--memory", "64M", "--",
                                    "/bin/sh", "-c", "echo ready; sleep 30"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.kill()  # SIGKILL: jrun cannot clean up; the job dies with it (pdeathsig)
    proc.wait()
    try:
        left = job_cgroups(n)
        assert left, "the killed jrun's cgroup should be there for gc to find"
        jrun("gc")  # (its status may tell of other runs' leftovers)
        assert job_cgroups(n) == [] and n not in state_dirs()
    finally:
        jrun("gc")


def test_cgroup_parent_places_the_job_under_it():
    parent = "jrun-test-parent-%s" % uuid.uuid4().hex[:6]
    roots = [os.path.join("/sys/fs/cgroup", parent)] if V2 else \
        [os.path.join(point, parent) for point, _ in set(HOST.mounts.values())]
    for r in roots:
        os.mkdir(r)
    try:
        if V2:  # delegate as a manager would: controllers enabled down to the parent
            for cg in ("/sys/fs/cgroup", roots[0]):
                with open(os.path.join(cg, "cgroup.subtree_control"), "w") as f:
                    f.write("+memory +pids")
        n = name("par")
        proc = subprocess.Popen(JRUN + ["--net", "none", "--name", n, "--cgroup-parent", "/" + parent,
                                        "--memory", "64M", "--stop-timeout", "1", "--",
                                        "/bin/sh", "-c", "echo ready; sleep 30; true"],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline() == "ready\n"
            mem = roots[0] if V2 else os.path.join(HOST.mounts["memory"][0], parent)
            assert os.path.isdir(os.path.join(mem, n))
            assert job_cgroups(n) == []  # not in the default jrun subtree
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        assert not any(os.path.exists(os.path.join(r, n)) for r in roots)
        # After kill -9 of jrun, gc finds the job's cgroup under the parent
        # from the path recorded in the job's state.
        proc = subprocess.Popen(JRUN + ["--net", "none", "--name", n, "--cgroup-parent", "/" + parent,
                                        "--", "/bin/sh", "-c", "echo ready; sleep 30"],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        proc.kill()
        proc.wait()
        assert any(os.path.exists(os.path.join(r, n)) for r in roots)
        jrun("gc")
        assert not any(os.path.exists(os.path.join(r, n)) for r in roots)
    finally:
        for r in roots:
            os.rmdir(r)


def _move(pid, d):
    with open(os.path.join(d, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def _mkcg(d):
    """mkdir a cgroup; a v1 cpuset gets its parent's CPUs and memory nodes
    (no task may join one without)."""
    os.mkdir(d)
    for f in ("cpuset.cpus", "cpuset.mems"):
        mine = os.path.join(d, f)
        if os.path.exists(mine) and not open(mine).read().strip():
            with open(os.path.join(os.path.dirname(d), f)) as src, open(mine, "w") as dst:
                dst.write(src.read().strip())


@pytest.mark.parametrize("where", ["cgroup-parent", "default", "one-hierarchy"])
def test_an_existing_cgroup_is_refused_and_left_alone(where):
    """P/X made by someone else, with a process of theirs in it: jrun --name X
    refuses (125), and P/X and its process are untouched.  'default' is
    jrun's own subtree (jrun/X: an orphan, or a job of a jrun with another
    state-dir); 'one-hierarchy' has P in every v1 hierarchy but X in one:
    what jrun made in the others goes, the existing one stays."""
    if where == "one-hierarchy" and V2:
        pytest.skip("cgroup v2 has one hierarchy")
    n = name("exists")
    parent = "jrun-test-owner-%s" % uuid.uuid4().hex[:6]
    points = ["/sys/fs/cgroup"] if V2 else sorted({point for point, _ in HOST.mounts.values()})
    top = [os.path.join(pt, "jrun" if where == "default" else parent) for pt in points]
    mem = os.path.join(HOST.mounts["memory"][0], parent if where != "default" else "jrun") if not V2 else top[0]
    made = [t for t in top if not os.path.isdir(t)]
    for t in made:
        _mkcg(t)
    if V2:  # controllers delegated down to the parent, as a manager would
        with open("/sys/fs/cgroup/cgroup.subtree_control", "w") as f:
            f.write("+memory +pids")
    existing = [os.path.join(t, n) for t in top] if where != "one-hierarchy" else [os.path.join(mem, n)]
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for d in existing:
            _mkcg(d)
            _move(sleeper.pid, d)
        opts = () if where == "default" else ("--cgroup-parent", "/" + parent)
        p = sh("true", "--name", n, "--memory", "64M", *opts)
        assert p.returncode == 125 and "already exists" in p.stderr and any(d in p.stderr for d in existing), \
            p.stderr
        assert sleeper.poll() is None, "jrun killed a process of a cgroup it did not make"
        for d in existing:
            with open(os.path.join(d, "cgroup.procs")) as f:
                assert str(sleeper.pid) in f.read().split(), d
        made_by_jrun = [os.path.join(t, n) for t in top if os.path.join(t, n) not in existing]
        assert [d for d in made_by_jrun if os.path.exists(d)] == [], "what jrun made should be gone"
        assert n not in state_dirs()
    finally:
        sleeper.kill()
        sleeper.wait()
        for d in existing:
            rmdir_when_empty(d)
        for t in made:
            rmdir_when_empty(t)


def _slurm_step_layout(tok):
    """Slurm's cgroups of one step, made here as Slurm makes them (not by
    Slurm: tests/test_slurm.py has the real thing, on v1 only): v1
    slurm_NODE/uid_0/job_1/step_0 in the cpuset (if any) and memory
    hierarchies only (task/cgroup); v2 .../job_1/step_0/user/task_0 with only memory
    enabled for the step's children.  Return (the cgroups, bottom last;
    where a task of the step goes)."""
    if V2:
        top = "/sys/fs/cgroup/jrun-test-slurm-%s" % tok
        made = [top] + [top + p for p in ("/job_1", "/job_1/step_0", "/job_1/step_0/user",
                                           "/job_1/step_0/user/task_0")]
        for d in made:
            os.mkdir(d)
        for d in ["/sys/fs/cgroup"] + made[:3]:  # memory, and only memory, down to step_0's children
            with open(os.path.join(d, "cgroup.subtree_control"), "w") as f:
                f.write("+memory")
        return made, [made[-1]]
    made = []
    for ctrl in [c for c in ("cpuset", "memory") if c in HOST.mounts]:  # a v1 host may have no cpuset
        d = HOST.mounts[ctrl][0]
        for part in ("slurm_t%s" % tok, "uid_0", "job_1", "step_0"):
            d = os.path.join(d, part)
            _mkcg(d)
            made.append(d)
    return made, made[3::4]


def test_a_job_in_a_slurm_step_nests_inside_it_and_gc_lets_slurm_clean_up():
    """jrun started in a step's cgroups (found in /proc/self/cgroup, with no
    SLURM_* variable) makes the job's cgroup inside the step's where the
    step has one, jrun/<id> elsewhere; on v2 a limit whose controller the
    step did not enable is refused, naming it.  After kill -9 of jrun, gc
    removes the job's cgroup and then the empty step cgroups it kept."""
    tok = uuid.uuid4().hex[:6]
    made, steps = _slurm_step_layout(tok)
    n = name("slurm")
    enter = "for d in %s; do echo $$ > $d/cgroup.procs; done; exec \"$@\"" % " ".join(steps)
    task = ["/bin/sh", "-c", enter, "task"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    # v1: a cpuset inside the step's too, where the host has the controller.
    cores = ["--cores", str(min(os.sched_getaffinity(0)))] if not V2 and "cpuset" in HOST.mounts else []
    proc = None
    try:
        if V2:
            p = subprocess.run(task + JRUN + ["--net", "none", "--pids", "20", "--", "true"], env=env,
                               capture_output=True, text=True, timeout=60)
            assert p.returncode == 125 and p.stderr.startswith(
                "jrun: --pids: Slurm did not enable the cgroup v2 'pids' controller for this step"), p.stderr
        proc = subprocess.Popen(task + JRUN + ["--net", "none", "--name", n, "--memory", "64M", *cores, "--",
                                               "/bin/sh", "-c", "echo ready; sleep 30"], env=env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        # v1: step_0/<id>; v2: step_0/user/<id>, beside task_0.
        inside = [os.path.join(os.path.dirname(s) if V2 else s, n) for s in steps]
        assert all(os.path.isdir(d) for d in inside), inside
        mem = inside[-1]
        with open(os.path.join(mem, "memory.max" if V2 else "memory.limit_in_bytes")) as f:
            assert int(f.read()) == 64 << 20
        own = job_cgroups(n)  # v1: pids, cpuacct, blkio, devices in jrun/<id>; none on v2
        assert own == [] if V2 else own and not [d for d in own if "/memory/" in d or "/cpuset/" in d], own
        proc.kill()  # jrun SIGKILLed: the job's cgroups stay, and keep the step's
        proc.wait()
        if V2:  # at the step's end slurmstepd removes its tasks' cgroups, then tries user/ and up
            rmdir_when_empty(steps[0])
        assert all(os.path.isdir(d) for d in inside)
        p = jrun("gc", n)
        assert p.returncode == 0 and "gc: removed leftovers of job %s" % n in p.stderr, p.stderr
        assert not any(os.path.exists(d) for d in inside) and job_cgroups(n) == []
        # ... and the step's, job's (and v1 user's) empty cgroups, kept by it.
        left = [d for d in made if os.path.isdir(d)]
        assert left == ([made[0]] if V2 else [d for d in made if d.endswith("/slurm_t%s" % tok)]), left
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        jrun("gc", n)
        for d in reversed(made):
            rmdir_when_empty(d)


@pytest.mark.skipif(not V2, reason="the no-internal-process rule is cgroup v2's")
def test_cgroup_parent_with_processes_of_its_own_is_refused():
    parent = "/sys/fs/cgroup/jrun-test-busy-%s" % uuid.uuid4().hex[:6]
    os.mkdir(parent)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        with open(os.path.join(parent, "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))
        n = name("busy")
        p = sh("true", "--name", n, "--cgroup-parent", parent[len("/sys/fs/cgroup"):], "--memory", "64M")
        assert p.returncode == 125 and "no-internal-process" in p.stderr, p.stderr
        assert not os.path.exists(os.path.join(parent, n)) and n not in state_dirs()
    finally:
        sleeper.kill()
        sleeper.wait()
        for _ in range(100):
            try:
                os.rmdir(parent)
                break
            except OSError:
                time.sleep(0.01)


# --- what the job sees ------------------------------------------------------

def test_job_sees_its_own_cgroup_read_only():
    mem_file = "/sys/fs/cgroup/memory.max" if V2 else "/sys/fs/cgroup/memory/memory.limit_in_bytes"
    p = sh("cat %s; touch /sys/fs/cgroup/x 2>&1; { echo 1 > %s; } 2>&1; mkdir /sys/fs/cgroup/%s/y 2>&1; true"
           % (mem_file, mem_file, "" if V2 else "memory"), "--memory", "64M", check=0)
    lines = p.stdout.splitlines()
    assert lines[0] == str(64 << 20)  # the mount's root is the job's own cgroup
    assert all("Read-only file system" in line for line in lines[1:]) and len(lines) == 4, lines


def test_proc_self_cgroup_shows_the_namespace_root():
    p = sh("cat /proc/self/cgroup", "--memory", "64M", check=0)
    lines = p.stdout.split()
    assert lines and all(line.endswith(":/") for line in lines), lines
