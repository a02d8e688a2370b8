"""A one-box Slurm cluster for the tests: munged, slurmctld and slurmd
(nodes n1 and n2 by default, all on this host: Debian builds Slurm with
--enable-multiple-slurmd) as plain root processes, everything under one
temporary directory, on loopback ports picked free.

Nothing of a system Slurm or munge is used or touched: the daemons and the
clients read only the files written here (slurm.conf through -f and
SLURM_CONF; cgroup.conf and plugstack.conf beside it), munged gets its own
key, socket, pid, log and seed paths, and the cluster, node names, state,
spool, pid and log files are private.  Debian's packages start nothing on
install (.ci/setup sees to that).

The daemons run in the foreground under Popen, so their PIDs are ours to
stop.  Slurm makes cgroups of its own (proctrack/cgroup, task/cgroup): one
tree per v1 hierarchy and node, /sys/fs/cgroup/<ctrl>/slurm_<node>.  start()
refuses to run if such a tree exists already (another slurmd with that node
name); stop() kills what is left in the trees it made and removes them.
"""
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from conftest import rmdir_when_empty

CGROUP_ROOT = "/sys/fs/cgroup"
SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"
PACKAGES = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "munged": "munge",
            "mungekey": "munge"}
KILL_WAIT = 3  # s: Slurm's grace between SIGTERM and SIGKILL on scancel and at the time limit
NO_ARRAY = "4294967294"  # what sbatch's %a is for a job that is not an array task


class LaneError(RuntimeError):
    """The lane itself failed (not jrun): a daemon, a client, a timeout."""


def missing_packages():
    """Debian packages the lane needs that are not installed."""
    return sorted({pkg for prog, pkg in PACKAGES.items() if not shutil.which(prog, path=SBIN)})


def free_ports(n):
    """N distinct TCP ports on loopback that are free right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent():
    """In the daemon, before exec: SIGTERM when the test process dies, so
    that a killed pytest does not leave the lane running."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _listening(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid):
    """PID exists and is not a zombie (a killed job's PID 1 waits as a
    zombie until whoever inherited it reaps it)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _procs_below(top):
    pids = set()
    for d, _subdirs, _files in os.walk(top):
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            pass
    return pids


def rmdir_tree(top):
    """rmdir a cgroup tree bottom-up (a cgroup's files cannot be unlinked;
    rmdir refuses one that still has processes)."""
    for d, _subdirs, _files in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
        rmdir_when_empty(d, tries=100)


class SlurmCluster:
    """start() brings up idle nodes; stop() leaves nothing behind."""

    def __init__(self, name="jrunlane", nodes=("n1", "n2"), proctrack="cgroup", epilog=None):
        self.name = name
        self.nodes = tuple(nodes)
        self.proctrack = proctrack
        self.epilog = epilog  # the text of a shell script run as Epilog= on each node
        self.dir = None
        self.procs = {}  # daemon name -> Popen
        self.env = None

    # -- files -----------------------------------------------------------

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def config(self, ports):
        d = self.dir
        cgroups = self.proctrack == "cgroup"
        lines = [
            "ClusterName=%s" % self.name,
            "SlurmctldHost=localhost",
            "SlurmctldPort=%d" % ports[0],
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "AuthInfo=socket=%s/munge.sock" % d,
            "StateSaveLocation=%s/ctld" % d,
            "SlurmdSpoolDir=%s/spool/%%n" % d,
            "SlurmctldPidFile=%s/slurmctld.pid" % d,
            "SlurmdPidFile=%s/slurmd-%%n.pid" % d,
            "SlurmctldLogFile=%s/slurmctld.log" % d,
            "SlurmdLogFile=%s/slurmd-%%n.log" % d,
            "PlugStackConfig=%s/plugstack.conf" % d,
            "TmpFS=%s/tmp" % d,
            "ProctrackType=proctrack/%s" % self.proctrack,
            # task/cgroup makes the step's cpuset and memory cgroups (with
            # the job's CPUs and --mem in them), as on a production cluster.
            "TaskPlugin=%s" % ("task/cgroup" if cgroups else "task/none"),
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            # Exit codes without slurmdbd: `scontrol show job` (MinJobAge
            # keeps a finished job known) and this file.
            "JobCompType=jobcomp/filetxt",
            "JobCompLoc=%s/jobcomp.txt" % d,
            "MinJobAge=120",
            "KillWait=%d" % KILL_WAIT,
            "InactiveLimit=0",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=batch_sched_delay=0",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU_Memory",
            "DefMemPerCPU=256",
            # The node lines below are the truth (two slurmd share this host's CPUs and memory).
            "SlurmdParameters=config_overrides",
        ]
        if self.epilog is not None:
            lines.append("Epilog=%s/epilog.sh" % d)
        for node, port in zip(self.nodes, ports[1:]):
            lines.append("NodeName=%s NodeHostname=localhost NodeAddr=127.0.0.1 Port=%d CPUs=2 "
                         "RealMemory=2048 State=UNKNOWN" % (node, port))
        # Up to 4 jobs share a CPU: the lane's jobs are short and mostly idle.
        lines.append("PartitionName=lane Nodes=%s Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP"
                     % ",".join(self.nodes))
        return "\n".join(lines) + "\n"

    @staticmethod
    def cgroup_config():
        # This host is hybrid (v1 controllers, a controller-less v2 mount):
        # say cgroup/v1, autodetection could pick v2.  The step's memory
        # cgroup carries the job's memory (--mem or DefMemPerCPU), swap
        # included, as on a production cluster.
        return ("CgroupPlugin=cgroup/v1\nCgroupMountpoint=%s\nConstrainCores=yes\nConstrainRAMSpace=yes\n"
                "AllowedRAMSpace=100\nConstrainSwapSpace=yes\nAllowedSwapSpace=0\nConstrainDevices=no\n"
                % CGROUP_ROOT)

    def _write(self, rel, text, mode=0o644):
        with open(self.path(rel), "w") as f:
            f.write(text)
        os.chmod(self.path(rel), mode)

    # -- life ------------------------------------------------------------

    def own_cgroups(self):
        """Slurm's trees of this cluster's nodes, in every hierarchy."""
        return sorted(d for node in self.nodes for d in glob.glob(os.path.join(CGROUP_ROOT, "*", "slurm_" + node)))

    def start(self, timeout=20):
        if self.own_cgroups():
            raise LaneError("Slurm cgroups of nodes %s exist already (%s): another slurmd uses these node names, "
                            "or a lane was killed (then rmdir them)" % (", ".join(self.nodes),
                                                                       ", ".join(self.own_cgroups())))
        self.dir = tempfile.mkdtemp(prefix="jrun-slurm-")
        # munged wants every directory above its socket searchable by all,
        # and its key in a directory nobody else may write.
        os.chmod(self.dir, 0o755)
        for sub in ("munge", "ctld", "spool", "tmp"):
            os.mkdir(self.path(sub), 0o700 if sub == "munge" else 0o755)
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout):
        ports = free_ports(1 + len(self.nodes))
        self._write("slurm.conf", self.config(ports))
        self._write("cgroup.conf", self.cgroup_config())
        self._write("plugstack.conf", "")
        if self.epilog is not None:
            self._write("epilog.sh", self.epilog, 0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "SBATCH_", "SRUN_", "SALLOC_",
                                                                          "SQUEUE_", "SINFO_", "SCONTROL_"))}
        env["SLURM_CONF"] = self.path("slurm.conf")
        env["PATH"] = env.get("PATH", "") + ":" + SBIN
        self.env = env
        subprocess.run(["mungekey", "--create", "--keyfile", self.path("munge", "munge.key")],
                       check=True, capture_output=True)
        self._spawn("munged", ["munged", "-F", "--socket", self.path("munge.sock"),
                               "--key-file", self.path("munge", "munge.key"),
                               "--pid-file", self.path("munge", "munged.pid"),
                               "--seed-file", self.path("munge", "munged.seed"),
                               "--log-file", self.path("munge", "munged.log")])
        self._wait_for(lambda: os.path.exists(self.path("munge.sock")), timeout, "munged's socket")
        conf = self.path("slurm.conf")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", conf])
        # A slurmd that finds no controller yet retries only a second later.
        self._wait_for(lambda: _listening(ports[0]), timeout, "slurmctld on port %d" % ports[0])
        for node in self.nodes:
            self._spawn("slurmd-" + node, ["slurmd", "-D", "-N", node, "-f", conf])
        self._wait_for(self._all_idle, timeout, "idle nodes in sinfo")

    def _spawn(self, name, argv):
        with open(self.path(name + ".out"), "wb") as log:
            self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT, env=self.env, cwd=self.dir,
                                                preexec_fn=_die_with_parent)

    def _wait_for(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        while not pred():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise LaneError("slurm lane: no %s after %ss (dead: %s)\n%s" % (what, timeout, dead, self.logs()))
            time.sleep(0.05)

    def _all_idle(self):
        p = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in p.stdout.splitlines() if len(line.split()) == 2)
        return all(states.get(n) == "idle" for n in self.nodes)

    def logs(self):
        out = []
        for f in sorted(glob.glob(self.path("*.log")) + glob.glob(self.path("*.out"))):
            with open(f, errors="replace") as fh:
                out.append("== %s\n%s" % (os.path.basename(f), fh.read()[-3000:]))
        return "\n".join(out)

    def stop(self):
        """Cancel what still runs, stop the daemons by PID, remove the
        cgroups Slurm made, then the directory."""
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            self.run("scancel", "--full", "--quiet", "-u", "root", check=False)
            deadline = time.monotonic() + KILL_WAIT + 5
            while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                time.sleep(0.1)
        for name in ["slurmd-" + n for n in self.nodes] + ["slurmctld", "munged"]:
            p = self.procs.pop(name, None)
            if p is None:
                continue
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        # slurmstepd and whatever a job started are in Slurm's trees of our
        # nodes: processes there are this lane's.
        for top in self.own_cgroups():
            for pid in _procs_below(top):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            rmdir_tree(top)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    # -- clients ---------------------------------------------------------

    def run(self, *argv, check=True, timeout=30, **kw):
        p = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise LaneError("%s: exit %d\n%s%s" % (" ".join(argv), p.returncode, p.stdout, p.stderr))
        return p

    def sbatch(self, script, *opts):
        """Submit SCRIPT (the text of a shell script); return the job id.
        Its stdout and stderr go to output()."""
        p = self.run("sbatch", "--parsable", "--chdir", self.dir, "-o", self.path("job-%A_%a.out"), *opts,
                     input=script)
        return p.stdout.strip().split(";")[0]

    def output(self, job_id, task=NO_ARRAY):
        try:
            with open(self.path("job-%s_%s.out" % (job_id, task)), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def job(self, job_id):
        """`scontrol show job -o` as one {field: value} per record (an array
        job gives one per task)."""
        p = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        recs = []
        for line in p.stdout.splitlines():
            rec = dict(f.partition("=")[::2] for f in line.split())
            if rec.get("JobId"):
                recs.append(rec)
        return recs

    def state(self, job_id):
        recs = self.job(job_id)
        return recs[0].get("JobState") if recs else None

    def wait(self, job_id, timeout=60):
        """Wait until every record of JOB_ID has ended, its epilog included
        (COMPLETING is over); return the records."""
        deadline = time.monotonic() + timeout
        while True:
            recs = self.job(job_id)
            if recs and all(r.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING",
                                                      "SUSPENDED") for r in recs):
                return recs
            if time.monotonic() > deadline:
                raise LaneError("job %s not done after %ss: %s\n%s" % (job_id, timeout, recs, self.logs()))
            time.sleep(0.1)

    def jobcomp(self):
        """jobcomp/filetxt's records: {job id: {field: value}}."""
        try:
            with open(self.path("jobcomp.txt")) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return {}
        recs = (dict(f.partition("=")[::2] for f in line.split()) for line in lines)
        return {r["JobId"]: r for r in recs if "JobId" in r}
