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


def test_validate_limits_refuses_an_escaping_parent():
    with pytest.raises(J.UsageError, match="^--cgroup-parent: .* must not contain '..'"):
        J.validate_limits(_spec("--cgroup-parent", "a/../../etc"))


def test_validate_limits_cpu_range():
    n = os.cpu_count()
    with pytest.raises(J.UsageError, match="^--cpu: '%d' is out of range \\(1 to %d" % (100 * n + 1, 100 * n)):
        J.validate_limits(_spec("--cpu", str(100 * n + 1)))


def test_validate_limits_memory_floor():
    with pytest.raises(J.UsageError, match="^--memory: .* below the 4 MiB"):
        J.validate_limits(_spec("--memory", "512K"))


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
