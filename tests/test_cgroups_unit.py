"""Pure logic of the cgroup section: CPU lists, sizes, device discovery,
the child's verification, the status record.  Fast; no job is run."""
import os
import subprocess

import pytest

import jrun as J


@pytest.mark.parametrize("text,cpus", [
    ("0", (0,)), ("0-1", (0, 1)), ("0-1,3", (0, 1, 3)), ("3,0-1", (0, 1, 3)), ("2,2", (2,)),
    ("0-3,2", (0, 1, 2, 3)), (" 1 ", (1,)),
])
def test_parse_cpuset(text, cpus):
    assert J.parse_cpuset("--cores", text) == cpus


@pytest.mark.parametrize("text", ["", "a", "-1", "1-", "3-1", "0,,1", "0-1-2", "1.5", "0x1"])
def test_parse_cpuset_refuses(text):
    with pytest.raises(J.UsageError, match="^--cores: .* is not a CPU list"):
        J.parse_cpuset("--cores", text)


@pytest.mark.parametrize("cpus,text", [((0,), "0"), ((0, 1), "0-1"), ((0, 1, 3), "0-1,3"),
                                       ((0, 2, 4), "0,2,4"), ((5, 6, 7, 9, 10), "5-7,9-10")])
def test_format_cpuset_is_the_kernels_spelling(cpus, text):
    assert J.format_cpuset(cpus) == text
    assert J.parse_cpuset("x", text) == cpus


@pytest.mark.parametrize("n,text", [(64 << 20, "64 MiB"), (1 << 30, "1 GiB"), (1536 << 20, "1.5 GiB"),
                                    (4096, "4 KiB"), (100, "100 B"), (int(12.25 * (1 << 20)), "12.2 MiB")])
def test_fmt_size(n, text):
    assert J.fmt_size(n) == text


def test_block_devices_skips_memory_filesystems(tmp_path):
    # /proc and /dev/shm are not on a disk: nothing to throttle there.
    assert J.block_devices(["/proc", "/dev/shm", "/no/such/path"]) == []


def test_block_devices_finds_the_whole_disk_of_root():
    devs = J.block_devices(["/"])
    if not devs:
        pytest.skip("/ is not on a block device here")
    for d in devs:
        assert os.path.isdir("/sys/dev/block/" + d)
        assert not os.path.exists("/sys/dev/block/%s/partition" % d)


def test_cgroup_host_is_detected_once():
    assert J.cgroup_host() is J.cgroup_host()
    # Told apart as stat(1) tells them: /sys/fs/cgroup itself is cgroup2 on
    # a v2 host, a tmpfs holding the v1 hierarchies otherwise.
    fstype = subprocess.run(["stat", "-f", "-c", "%T", "/sys/fs/cgroup"], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert J.cgroup_host().version == (2 if fstype == "cgroup2fs" else 1), fstype


def _spec(*argv):
    return J.parse_run(list(argv) + ["true"])


def test_cgroup_parent_default_and_given():
    assert J.cgroup_parent(_spec()) == "jrun"
    assert J.cgroup_parent(_spec("--cgroup-parent", "/system.slice/slurm/")) == "system.slice/slurm"


def test_cgroup_check_refuses_an_escaping_parent():
    with pytest.raises(J.UsageError, match="^--cgroup-parent: .* must not contain '..'"):
        J.Cgroup.check(_spec("--cgroup-parent", "a/../../etc"))


def test_cgroup_check_cpu_range():
    n = os.cpu_count()
    with pytest.raises(J.UsageError, match="^--cpu: '%d' is out of range \\(1 to %d" % (100 * n + 1, 100 * n)):
        J.Cgroup.check(_spec("--cpu", str(100 * n + 1)))


def test_cgroup_check_memory_floor():
    with pytest.raises(J.UsageError, match="^--memory: .* below the 4 MiB"):
        J.Cgroup.check(_spec("--memory", "512K"))


# The child's verification: it must refuse to run the job unless it is in
# exactly its own cgroup with exactly the requested limits.

def _cg(tmp_path, where, checks=()):
    cg = J.CgroupV2(_spec())
    cg.where = where
    cg.checks = list(checks)
    return cg


def test_enter_refuses_when_not_in_the_job_cgroup(tmp_path, monkeypatch):
    monkeypatch.setattr(J, "unshare", lambda flags: pytest.fail("unshared before verifying"))
    cg = _cg(tmp_path, {"": "/sys/fs/cgroup/jrun/not-this-process"})
    monkeypatch.setattr(J.CgroupV2, "mountpoint", lambda self, c: "/sys/fs/cgroup")
    monkeypatch.setattr(J, "_read", lambda path, default=None: "0::/\n" if path == "/proc/self/cgroup" else default)
    with pytest.raises(J.SetupError, match="cgroup verification failed: in unified:/, not in the job's "
                                           "/jrun/not-this-process"):
        cg.enter()


def test_enter_refuses_a_limit_that_reads_back_different(tmp_path, monkeypatch):
    limit = tmp_path / "memory.max"
    limit.write_text("max\n")
    monkeypatch.setattr(J, "unshare", lambda flags: pytest.fail("unshared before verifying"))
    cg = _cg(tmp_path, {}, [(str(limit), "67108864\n")])
    with pytest.raises(J.SetupError, match="memory.max is 'max\\\\n', not '67108864\\\\n'"):
        cg.enter()


def test_enter_accepts_exact_membership_and_limits(tmp_path, monkeypatch):
    limit = tmp_path / "io.max"
    limit.write_text("254:0 rbps=1048576 wbps=1048576 riops=max wiops=max\n")
    done = []
    monkeypatch.setattr(J, "unshare", lambda flags: done.append(flags))
    real_read = J._read
    monkeypatch.setattr(J, "_read", lambda path, default=None: "0::/jrun/x\n" if path == "/proc/self/cgroup"
                        else real_read(path, default))
    cg = _cg(tmp_path, {"": "/sys/fs/cgroup/jrun/x"}, [(str(limit), limit.read_text())])
    monkeypatch.setattr(J.CgroupV2, "mountpoint", lambda self, c: "/sys/fs/cgroup")
    cg.enter()
    assert done == [J.CLONE_NEWCGROUP]


def test_status_record_has_exactly_the_contract_fields():
    out = J.Outcome()
    out.exit_code, out.duration_s, out.cpu_s, out.oom_kills = 137, 1.23456, 0.5, 1
    rec = out.status_record(_spec("--name", "x"))
    assert rec == {"id": "x", "exit_code": 137, "signal": None, "oom_killed": True, "timed_out": False,
                   "duration_s": 1.235, "cpu_s": 0.5, "memory_peak_bytes": None, "io_read_bytes": None,
                   "io_write_bytes": None}
    import json

    assert json.loads(J.dumps_json(rec)) == rec


def test_from_state_rebuilds_for_gc():
    cg = J.Cgroup.from_state({"cgroup": {"version": 2, "dirs": ["/sys/fs/cgroup/jrun/x"]}})
    assert isinstance(cg, J.CgroupV2) and cg.dirs == ["/sys/fs/cgroup/jrun/x"]
    cg = J.Cgroup.from_state({"cgroup": {"version": 1, "dirs": ["/a/jrun/x", "/b/jrun/x"]}})
    assert isinstance(cg, J.CgroupV1) and len(cg.dirs) == 2
    assert J.Cgroup.from_state({}) is None


# --- Slurm: names, the step's cgroup ----------------------------------------

SLURM_ENV = {"SLURM_JOB_ID": "4712", "SLURMD_NODENAME": "n1", "SLURM_CLUSTER_NAME": "c"}


@pytest.mark.parametrize("env,name,hostname", [
    ({}, "slurm-4712.batch.0", "slurm-4712-batch-0"),  # a batch script: no SLURM_STEP_ID
    ({"SLURM_STEP_ID": "4294967294"}, "slurm-4712.batch.0", "slurm-4712-batch-0"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}, "slurm-4712.0.5", "slurm-4712-0-5"),
    ({"SLURM_ARRAY_JOB_ID": "4711", "SLURM_ARRAY_TASK_ID": "3"}, "slurm-4711_3.batch.0", "slurm-4711-3-batch-0"),
    ({"SLURM_STEP_ID": "4294967295"}, "slurm-4712.extern.0", "slurm-4712-extern-0"),
])
def test_a_job_under_slurm_is_named_after_its_task(monkeypatch, env, name, hostname):
    for k, v in dict(SLURM_ENV, **env).items():
        monkeypatch.setenv(k, v)
    spec = _spec()
    assert (spec.id, spec.hostname, spec.named) == (name, hostname, False)
    assert spec.slurm["job_id"] == "4712" and spec.slurm["node"] == "n1" and spec.slurm["cluster"] == "c"
    assert spec.slurm["rank"] == env.get("SLURM_PROCID", "0")
    assert spec.slurm.get("array_task_id") == env.get("SLURM_ARRAY_TASK_ID")
    # --name and --hostname still win; the task is recorded all the same.
    named = _spec("--name", "mine", "--hostname", "h")
    assert (named.id, named.hostname, named.slurm) == ("mine", "h", spec.slurm)


def test_slurm_numbers_are_checked_before_they_become_a_name(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    for var, value in (("SLURM_PROCID", "../x"), ("SLURM_ARRAY_TASK_ID", "1/2"), ("SLURM_STEP_ID", "batch;")):
        monkeypatch.setenv(var, value)
        with pytest.raises(J.UsageError, match="^%s: .* is not a Slurm number" % var):
            _spec()
        monkeypatch.delenv(var)
    assert _spec().id == "slurm-12.batch.0"


def test_outside_slurm_nothing_of_it(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    spec = _spec()
    assert spec.slurm is None and len(spec.id) == 12 and spec.hostname == spec.id
    assert "slurm" not in J.Outcome().status_record(spec) and "slurm" not in J.start_record(spec)


def test_the_status_and_audit_records_carry_the_slurm_task(monkeypatch):
    for k, v in SLURM_ENV.items():
        monkeypatch.setenv(k, v)
    spec = _spec()
    out = J.Outcome()
    out.exit_code = 0
    for rec in (out.status_record(spec), J.start_record(spec), J.end_record(spec, out, 1.0)):
        assert rec["slurm"] == spec.slurm


@pytest.mark.parametrize("path,version,step", [
    ("/slurm/uid_1000/job_12/step_0", 1, "slurm/uid_1000/job_12/step_0"),
    ("/slurm_n1/uid_0/job_12/step_batch/task_0", 1, "slurm_n1/uid_0/job_12/step_batch"),
    ("/slurm/uid_0/job_12/step_extern", 1, "slurm/uid_0/job_12/step_extern"),
    ("/slurm/uid_0/job_12", 1, None),  # slurmstepd itself sits in the job's cgroup
    ("/system.slice/slurm/uid_0/job_12/step_0", 1, None),  # not Slurm's v1 layout
    ("/slurm/uid_x/job_12/step_0", 1, None),
    ("/slurm/uid_0/job_1x/step_0", 1, None),
    ("/jrun/x", 1, None), ("/", 1, None), ("", 1, None),
    ("/system.slice/slurmstepd.scope/job_3/step_0/user/task_0", 2, "system.slice/slurmstepd.scope/job_3/step_0/user"),
    ("/system.slice/slurmstepd.scope/job_3/step_0/slurm", 2, None),  # slurmstepd, not a task
    ("/system.slice/slurmstepd.scope/job_3/step_0", 2, None),
    ("/user.slice/user-0.slice/session-1.scope", 2, None),
])
def test_slurm_step_of(path, version, step):
    assert J.slurm_step_of(path, version) == step


class _Host:
    version = 1

    def __init__(self, root, steps):
        self.mounts = {}
        for c in ("memory", "cpuset", "pids", "cpu", "cpuacct", "blkio", "devices"):
            os.makedirs(root / c, exist_ok=True)
            self.mounts[c] = (str(root / c), c)
        self.slurm_steps = steps


def test_job_cgroup_parents_inside_a_slurm_step(tmp_path, monkeypatch):
    step = "slurm_n1/uid_0/job_7/step_batch"
    monkeypatch.setattr(J, "_cgroup_host", [_Host(tmp_path, {"memory": step, "cpuset": step, "freezer": step})])
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    # Found in /proc/self/cgroup: automatic, and the same with "slurm".
    for argv in ((), ("--cgroup-parent", "slurm")):
        parents, in_step = J.job_cgroup_parents(_spec(*argv))
        assert in_step and parents == {"memory": step, "cpuset": step, "pids": "jrun", "cpu": "jrun",
                                       "cpuacct": "jrun", "blkio": "jrun", "devices": "jrun"}
        assert J.memory_bound(_spec(*argv)) == "none of its own: the Slurm step's"
    assert J.memory_bound(_spec("--memory", "64M")) == "64 MiB"
    # Another PATH: in every hierarchy, as always.
    parents, in_step = J.job_cgroup_parents(_spec("--cgroup-parent", "/jrun.slice"))
    assert not in_step and set(parents.values()) == {"jrun.slice"}
    # The step's own path as --cgroup-parent: where it exists, jrun/ elsewhere.
    os.makedirs(tmp_path / "memory" / step)
    parents, in_step = J.job_cgroup_parents(_spec("--cgroup-parent", "/" + step))
    assert in_step and parents["memory"] == step and parents["cpuset"] == parents["pids"] == "jrun"


def test_cgroup_parent_slurm_outside_a_step_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(J, "_cgroup_host", [_Host(tmp_path, {})])
    assert J.job_cgroup_parents(_spec()) == ({c: "jrun" for c in _Host(tmp_path, {}).mounts}, False)
    assert J.memory_bound(_spec()) == "none: the host's"
    with pytest.raises(J.UsageError, match="^--cgroup-parent: slurm: jrun is not in a Slurm step's cgroup"):
        J.job_cgroup_parents(_spec("--cgroup-parent", "slurm"))
