"""The mode matrix: the documented combinations of --rootfs minimal|host|PATH,
--net none|bridge|NAME, --init, -u/--user, --userns and --read-only.

No combination of these is refused: all 144 ran once by hand (each with a
read-only volume and a memory limit).  The suite covers them pairwise (every
value of every option meets every value of every other one in some row),
one job per row that checks several things at once: PID 1, the user inside
and on the host, capabilities, the root's listing and what is writable, the
network, a read-only volume, a limit read back from the host, and that
nothing is left afterwards.  Then `jrun verify` in those modes (every check
judges what the options promise) and verify's judges on recorded
observations made leaky: each fails on a real leak.  Budget: ~40 s.
"""
import itertools
import json
import os
import subprocess
import uuid

import pytest

import jrun as J
from conftest import JRUN, job_links, jrun, needs_root, network_leftovers

HOST = J.cgroup_host()
NAMED = "m-" + uuid.uuid4().hex[:8]  # this run's named network

# (rootfs, net, --init, --user 1000, --userns, --read-only): 9 rows cover every
# pair of values; then all-defaults and all-on.
MATRIX = [
    ("minimal", "none", 1, 0, 1, 0), ("minimal", "bridge", 0, 1, 0, 1), ("minimal", "NAME", 1, 1, 1, 1),
    ("host", "none", 0, 1, 0, 0), ("host", "bridge", 1, 0, 1, 1), ("host", "NAME", 0, 0, 0, 0),
    ("PATH", "none", 1, 1, 0, 1), ("PATH", "bridge", 0, 0, 1, 0), ("PATH", "NAME", 1, 1, 0, 0),
    ("minimal", "bridge", 0, 0, 0, 0), ("host", "NAME", 1, 1, 1, 1),
]
FACTORS = (("minimal", "host", "PATH"), ("none", "bridge", "NAME"), (0, 1), (0, 1), (0, 1), (0, 1))


def test_matrix_covers_every_pair_of_option_values():
    for i, j in itertools.combinations(range(len(FACTORS)), 2):
        seen = {(row[i], row[j]) for row in MATRIX}
        assert seen == set(itertools.product(FACTORS[i], FACTORS[j])), (i, j)


def _row_id(row):
    rootfs, net, init, user, userns, ro = row
    return "-".join([rootfs, net] + [n for n, on in (("init", init), ("user", user), ("userns", userns),
                                                       ("ro", ro)) if on])


@pytest.fixture(scope="module")
def custom_rootfs(tmp_path_factory):
    """--rootfs PATH: a minimal rootfs built by `jrun rootfs build` in a
    directory of its own (config key rootfs-dir), with a file of its own."""
    d = tmp_path_factory.mktemp("modes")
    cfg = d / "jrun.toml"
    cfg.write_text('rootfs-dir = "%s"\n' % (d / "rootfs"))
    os.chmod(cfg, 0o644)
    jrun("--config", cfg, "rootfs", "build", check=0)
    (d / "rootfs" / "custom-rootfs-file").write_text("mine\n")
    return d / "rootfs"


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    d = tmp_path_factory.mktemp("vol")
    (d / "v").write_text("from the volume\n")
    os.chmod(d, 0o755)  # for the unprivileged host uids of --userns and --user
    return d


@needs_root
def test_rootfs_build_leaves_nothing_of_jrun_in_the_jobs_root(custom_rootfs):
    """The stamp is beside the tree; busybox's linuxrc is not made."""
    top = set(os.listdir(custom_rootfs))
    assert ".jrun-rootfs" not in top and "linuxrc" not in top
    assert {"bin", "etc", "usr", "tmp", "work"} <= top
    stamp = str(custom_rootfs) + ".stamp"
    assert open(stamp).read().startswith("built by jrun %s from %s" % (J.__version__, J.BUSYBOX))
    assert os.path.islink(custom_rootfs / "bin" / "ls") and os.path.isfile(custom_rootfs / "bin" / "busybox")
    p = jrun("--net", "none", "--rootfs", custom_rootfs, "--", "ls", "-a", "/", check=0)
    assert not {".jrun-rootfs", "linuxrc"} & set(p.stdout.split())


# One job per row: its observations, printed before 'ready'; it then waits on
# stdin while the host looks at it.
PROBE = r"""read -r s < /proc/1/stat; echo "pid1=$s"; echo "uid=$(id -u)"
read -r m < /proc/self/uid_map; echo "uidmap=$m"; echo "capeff=$(grep '^CapEff' /proc/self/status | cut -f2)"
echo "ls=$(ls -a / | tr '\n' ' ')"; for d in / /tmp /work /data; do touch $d/.w 2>/dev/null && echo "w=$d"; done
echo "ifs=$(cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' ' | sort | tr '\n' ' ')"
echo "vol=$(cat /data/v)"; echo ready; read x; true"""


def _fields(lines):
    out = {}
    for line in lines:
        k, _, v = line.partition("=")
        out.setdefault(k, v.strip())
        if k == "w":
            out.setdefault("writable", set()).add(v.strip())
    return out


def _expected_top(rootfs, custom):
    made = {"dev", "proc", "sys", "tmp", "work", "etc", "data"}
    if rootfs == "host":
        return {n for n in J.HOST_SYSTEM_DIRS if os.path.lexists("/" + n)} | {
            d for d, _ in J.HOST_ROOT_OWN_DIRS if "/" not in d} | made
    return set(os.listdir(J.HOST.rootfs_dir if rootfs == "minimal" else custom)) | made


def _host_view(name):
    """The job's PID 1 and cgroup, as the host sees them while it runs."""
    rec = json.load(open("/run/jrun/%s/job.json" % name))
    pid = rec["pid"]
    status = J._proc_status(open("/proc/%d/status" % pid).read())
    mem = J._job_cgroup_dir(pid, "memory")
    limit = J._read(os.path.join(mem, "memory.max" if HOST.version == 2 else "memory.limit_in_bytes")).strip()
    return int(status["Uid"].split()[0]), int(limit), J._job_cgroup_dir(pid, "pids")


def _nothing_left(name, net):
    assert not os.path.exists("/run/jrun/" + name)
    assert not [s for s in J.jrun_subtrees() if os.path.exists(os.path.join(s, name))]
    assert J.veth_name("/run/jrun/" + name) not in job_links()
    if net != "none":  # its network stays, idle, for network-idle
        assert network_leftovers() == set()


@needs_root
@pytest.mark.parametrize("row", MATRIX, ids=_row_id)
def test_mode_combination(row, custom_rootfs, volume):
    rootfs, net, init, user, userns, ro = row
    net = NAMED if net == "NAME" else net
    name = "mode-" + uuid.uuid4().hex[:8]
    opts = ["--name", name, "--rootfs", str(custom_rootfs) if rootfs == "PATH" else rootfs, "--net", net,
            "--memory", "64M", "-v", "%s:/data:ro" % volume]
    opts += (["--init"] if init else []) + (["--user", "1000"] if user else []) + (["--userns"] if userns else [])
    opts += ["--read-only"] if ro else []
    proc = subprocess.Popen(JRUN + opts + ["--", "/bin/sh", "-c", PROBE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stdout:
            if line.strip() == "ready":
                break
            lines.append(line.rstrip("\n"))
        assert lines and proc.poll() is None, proc.stderr.read()
        host_uid, limit, cg = _host_view(name)
    finally:
        proc.stdin.close()
        rc = proc.wait(timeout=60)
    assert rc == 0, proc.stderr.read()
    f = _fields(lines)

    # PID 1: the init (tini at /dev/init) or the job's own command.
    assert f["pid1"].split()[1] == ("(init)" if init else "(sh)"), f["pid1"]
    # The user inside, and the same process as the host sees it.
    base = int(f["uidmap"].split()[1])
    assert int(f["uid"]) == (1000 if user else 0)
    if userns:
        assert f["uidmap"].split() == [str(0), str(base), "65536"] and base >= J.USERNS_BASE
    else:
        assert f["uidmap"].split() == ["0", "0", "4294967295"]
    assert host_uid == (base if userns else 0) + (1000 if user else 0)
    caps = sum(1 << J.CAPABILITIES.index(c) for c in J.DEFAULT_CAPS)
    assert int(f["capeff"], 16) == (0 if user else caps)
    # The root: the rootfs's files and jrun's mount points, nothing else.
    assert set(f["ls"].split()) - {".", ".."} == _expected_top(rootfs, custom_rootfs)
    want_w = {"/tmp", "/work"} | (set() if ro or user else {"/"})
    assert f.get("writable", set()) == want_w
    assert f["vol"] == "from the volume"
    assert f["ifs"].split() == (["lo"] if net == "none" else ["eth0", "lo"])
    # A limit, read back from the host, in the job's own cgroup.
    assert limit == 64 << 20 and cg.endswith("/" + name)
    _nothing_left(name, net)


# --- jrun verify in the modes ---------------------------------------------------


def _verify_all_pass(*opts):
    p = jrun("verify", "--json", *opts, timeout=300)
    report = json.loads(p.stdout)
    bad = [c for c in report["checks"] if c["status"] == "fail" or
           c["status"] == "skip" and "--net none" not in c["why"]]
    assert not bad and p.returncode == 0, json.dumps(bad, indent=1)
    return {c["name"]: c for c in report["checks"]}


@needs_root
def test_verify_passes_with_rootfs_host_init_read_only_on_a_named_network():
    checks = _verify_all_pass("--rootfs", "host", "--init", "--read-only", "--net", NAMED)
    assert "PID 1 init" in checks["Process isolation"]["evidence"]
    assert "/usr" in checks["Mount isolation"]["evidence"]
    assert "reached (--net %s" % NAMED in checks["Network isolation"]["evidence"]
    assert "io.max" in checks["I/O limit"]["evidence"] or "blkio" in checks["I/O limit"]["evidence"]


@needs_root
def test_verify_passes_with_a_custom_rootfs_userns_user_and_a_read_only_volume(custom_rootfs, volume):
    checks = _verify_all_pass("--rootfs", str(custom_rootfs), "--userns", "--user", "1000",
                              "-v", "%s:/data:ro" % volume, "--net", "none")
    assert "custom-rootfs-file" in checks["Filesystem isolation"]["evidence"]
    assert "--userns" in checks["Capabilities"]["evidence"] and "uid 1000" in checks["Capabilities"]["evidence"]
    assert "/data" in checks["Mount isolation"]["evidence"]


# --- verify's judges fail on a real leak ------------------------------------------
#
# Each observation is recorded from a real job (the judge passes it), then
# made leaky: by the host's own view of the same thing (what a job with no
# isolation at all would see) or by the one line a broken defence changes.


def _record(check, *extra):
    """Run verify's CHECK in the mode EXTRA; (verifier, what its job printed)."""
    v = J._Verifier(list(extra))
    seen = []
    run = v.run

    def recording(*a, **kw):
        p = run(*a, **kw)
        seen.append(p.stdout)
        return p

    v.run = recording
    ok, ev, _, _ = check(v)
    assert ok, ev
    return v, seen[-1]


def _on_host(script):
    return subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True).stdout


@needs_root
def test_process_judge_fails_on_host_processes():
    v, out = _record(J.verify_processes, "--net", "none")
    assert J.judge_processes(v.spec, out)[0]
    assert not J.judge_processes(v.spec, _on_host(J._PROC_PROBE))[0]  # every process of the host
    assert not J.judge_processes(v.spec, out + "4242 (sshd) S 1 4242 4242 0 -1\n")[0]
    # --init promises the init as PID 1: the probe alone is not that.
    assert not J.judge_processes(v.spec.replace(init=True), out)[0]
    v, out = _record(J.verify_processes, "--net", "none", "--init")
    assert J.judge_processes(v.spec, out)[0] and not J.judge_processes(v.spec.replace(init=False), out)[0]


@needs_root
@pytest.mark.parametrize("mode", [("--rootfs", "host"), ("--read-only",)], ids=["host", "read-only"])
def test_filesystem_judge_fails_on_host_files_and_broken_promises(mode):
    v, out = _record(J.verify_filesystem, "--net", "none", *mode)
    root, dev, found, shadow, writable = out.split("---\n")
    shadow_host = open("/etc/shadow").read()
    marker = "/root/jrun-verify-marker-0123456789ab"

    def judge(**part):
        parts = {**dict(root=root, dev=dev, found=found, shadow=shadow, writable=writable), **part}
        text = "---\n".join(parts[k] for k in ("root", "dev", "found", "shadow", "writable"))
        return J.judge_filesystem(v.spec, text, [marker], shadow_host)

    assert judge()[0]
    assert not judge(root="\n".join(os.listdir("/")) + "\n")[0]  # the host's own root
    assert not judge(found=marker + "\n")[0]
    assert not judge(found="/mnt" + marker + "\n")[0]  # moved, still the host's file
    assert not judge(shadow=shadow_host)[0]
    assert not judge(dev=dev + "sda\n")[0]
    if v.spec.read_only:
        assert not judge(writable="/\n" + writable)[0]
    # A marker seen through a volume of its directory is what -v asked for.
    vol = J._Verifier(["--net", "none", "-v", "/root:/hostroot"] + list(mode))
    assert J.judge_filesystem(vol.spec, "---\n".join([root + "hostroot\n", dev, "/hostroot/" + marker[6:] + "\n",
                                                      shadow, writable]), [marker], shadow_host)[0]


@needs_root
def test_mount_judge_fails_on_host_mounts_and_writable_promises(volume):
    v, out = _record(J.verify_mounts, "--net", "none", "--rootfs", "host", "--init", "-v", "%s:/data:ro" % volume)
    host = open("/proc/self/mountinfo").read()
    assert J.judge_mounts(v.spec, out, host)[0]
    assert not J.judge_mounts(v.spec, host + "---\n1\n", host)[0]  # the host's own mounts
    mountinfo, procs = out.split("---\n")
    lines = mountinfo.splitlines()

    def point(line):
        return line.split()[4]

    def changed(pt, old, new):
        return "\n".join(x.replace(old, new, 1) if point(x) == pt else x for x in lines) + "\n---\n" + procs

    for pt in ("/usr", "/data", "/dev/init", "/sys"):  # each promised read-only
        assert " %s ro," % pt in mountinfo, pt
        assert not J.judge_mounts(v.spec, changed(pt, " %s ro," % pt, " %s rw," % pt), host)[0], pt
    usr = next(x for x in lines if point(x) == "/usr")
    assert not J.judge_mounts(v.spec, out.replace(usr, usr.replace(" /usr ro,", " /mnt ro,")), host)[0]  # not promised
    assert not J.judge_mounts(v.spec, out.replace(usr, usr.replace(" - ", " shared:7 - ", 1)), host)[0]
    assert not J.judge_mounts(v.spec.replace(volumes=()), out, host)[0]  # /data without -v
    assert not J.judge_mounts(v.spec, out.replace(usr + "\n", ""), host)[0]  # /usr missing
    assert not J.judge_mounts(v.spec, mountinfo + "---\n1\n" + "\n".join(map(str, range(2, 300))), host)[0]


@needs_root
def test_network_judges_fail_on_the_hosts_namespace_and_on_reached_services():
    host_ns = os.readlink("/proc/self/ns/net")
    v, out = _record(J.verify_netns, "--net", "none")
    assert J.judge_netns(v.spec.replace(net="none"), out, host_ns)[0]
    assert not J.judge_netns(v.spec.replace(net="none"), _on_host(J._NETNS_PROBE), host_ns)[0]
    assert not J.judge_netns(v.spec.replace(net="bridge"), out, host_ns)[0]  # no eth0
    v, out = _record(J.verify_net_isolation, "--net", "bridge")
    assert "SELF-REACHED" in out and J.judge_net_isolation(v.spec, out, 1, ["172.31.254.2"])[0]
    for leak in ("HOST-REACHED", "HOST-LOOPBACK-REACHED", "JOB-REACHED"):
        assert not J.judge_net_isolation(v.spec, out + leak + "\n", 1, ["172.31.254.2"])[0], leak
    assert not J.judge_net_isolation(v.spec, out.replace("SELF-REACHED", ""), 1, ["172.31.254.2"])[0]
    named = v.spec.replace(net=NAMED)
    # A named network promises that its jobs talk, and no more.
    assert not J.judge_net_isolation(named, out, 1, ["172.31.190.2", "172.31.254.3"])[0]
    assert J.judge_net_isolation(named, out + "JOB-REACHED\n", 1, ["172.31.190.2", "172.31.254.3"])[0]
    assert not J.judge_net_isolation(named, out + "JOB-REACHED\nOTHER-NET-JOB-REACHED\n", 1,
                                     ["172.31.190.2", "172.31.254.3"])[0]


@needs_root
def test_capability_judge_fails_on_roots_own_and_on_an_identity_map_under_userns():
    def observe(*mode):
        v = J._Verifier(["--net", "none"] + list(mode))
        st, probe = J._job_status(v, J._CAPS_PROBE)
        assert J.judge_caps(v.spec, st, probe)[0], J.judge_caps(v.spec, st, probe)
        return v, st, probe

    host_st = J._proc_status(open("/proc/self/status").read())
    host_probe = _on_host("cat /proc/self/uid_map")
    v, st, probe = observe()
    assert not J.judge_caps(v.spec, host_st, host_probe)[0]  # the host's root: every capability
    v, st, probe = observe("--userns")
    assert not J.judge_caps(v.spec, st, host_probe)[0]  # root inside would be root outside
    v, st, probe = observe("--user", "1000")
    assert not J.judge_caps(v.spec, dict(st, CapEff="00000000800405fb"), probe)[0]
    assert not J.judge_caps(v.spec, dict(st, CapAmb="0000000000000400"), probe)[0]
    # A defence really turned off by an option: the check fails.
    ok, ev, why, _ = J.verify_caps(J._Verifier(["--net", "none", "--cap-add", "ALL"]))
    assert not ok and "holds" in ev and "root over the host" in why
