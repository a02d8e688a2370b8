#!/opt/jrun/bin/python3
"""jrun side by side with its peers, in ONE run (not collected by pytest):

    sudo /opt/jrun/bin/python3 tests/bench_peers.py [--rounds N] [--jrun CMD] [--markdown]

Every contender runs /bin/true over the same minimal rootfs, interleaved
round by round (the order shuffled each round, after warm-up runs), so that
a busy moment of the machine hits all of them alike:

  jrun --net none --memory 256M      jrun's cheapest useful job
  jrun (default bridge network)      what most people run
  bwrap                              pid, net, uts, ipc and mount namespaces
  crun, cgroupfs, 256 MiB limit      an OCI bundle over the same rootfs
  shell veth, bridge per run         unshare + bridge + veth + address + route with `ip`,
                                     the bridge made and deleted by every run
  shell veth, bridge kept            the same, on a bridge that stays (as docker0 does)
  podman run --rootfs, network none  where it runs
  python3 -S -c pass                 the interpreter alone (a floor for jrun)

then the throughput of 50 jobs, 8 at a time, and each runner's resident
memory (VmRSS of the launcher) while its job sleeps.  The table prints the
medians and the ratios that issue 11 sets goals for.

crun and podman refuse a hybrid cgroup host whose /sys/fs/cgroup/unified is
mounted: the whole benchmark re-executes itself in a private mount namespace
with that mount detached (nothing changes for the rest of the host; jrun
uses the v1 hierarchies either way).  Traffic: none; the shell model's
bridges use 198.18.0.0/15 (RFC 2544, for benchmarks) and are removed.
"""
import argparse
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from bench import rss_kib_while_running

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ROOTFS = "/var/lib/jrun/rootfs"
MEMORY = 256 << 20

# One shell model of a networked job: a network namespace with a veth on a
# bridge, addressed and routed, /bin/true run in it, everything removed.
# $1: the bridge ("" = make and delete one of its own), $2: the job's address.
SHELL_VETH = r"""
set -e
n=$$; ns=bp$n; v=bpv$n; kept=$1; br=${1:-bpb$n}
cleanup() {
  ip link del $v 2>/dev/null || true
  umount /run/netns/$ns 2>/dev/null || true; rm -f /run/netns/$ns
  [ -n "$kept" ] || ip link del $br 2>/dev/null || true
}
trap cleanup EXIT
if [ -z "$kept" ]; then
  ip link add $br type bridge; ip addr add 198.18.254.1/24 dev $br; ip link set $br up
fi
mkdir -p /run/netns; touch /run/netns/$ns
unshare --net=/run/netns/$ns true
ip link add $v type veth peer name eth0 netns $ns
ip link set $v master $br up
ip -n $ns link set lo up
ip -n $ns addr add $2/24 dev eth0
ip -n $ns link set eth0 up
ip -n $ns route add default via 198.18.254.1
nsenter --net=/run/netns/$ns unshare --pid --fork --mount --uts --ipc --root=%(rootfs)s --mount-proc /bin/true
""" % {"rootfs": ROOTFS}
KEPT_BRIDGE = "bpkept0"


def default_jrun():
    """The installed entry point, what users run; never the pyenv shim."""
    for path in ("/usr/local/bin/jrun", "/opt/jrun/bin/jrun"):
        if os.path.exists(path):
            return [path]
    return [sys.executable, os.path.join(ROOT, "jrun.py")]


def crun_bundle(tmp):
    """An OCI bundle over ROOTFS (read-only) with a 256 MiB memory limit."""
    import json

    bundle = os.path.join(tmp, "bundle")
    os.mkdir(bundle)
    subprocess.run(["crun", "spec"], cwd=bundle, check=True)
    with open(os.path.join(bundle, "config.json")) as f:
        spec = json.load(f)
    spec["root"] = {"path": ROOTFS, "readonly": True}
    spec["process"].update(args=["/bin/true"], terminal=False)
    spec["linux"]["resources"]["memory"] = {"limit": MEMORY}
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(spec, f)
    return bundle


class Counter:
    """Unique names and addresses for concurrent runs of one contender."""

    def __init__(self):
        self.n = 0

    def next(self):
        self.n += 1
        return self.n


def contenders(jrun, tmp):
    """[(label, argv factory)]: a factory gives the argv of one run, so that
    concurrent runs get their own container names and addresses."""
    seq = Counter()
    mem = ["--memory", "%dM" % (MEMORY >> 20)]
    c = [("jrun --net none --memory 256M", lambda: jrun + ["--net", "none"] + mem + ["--", "/bin/true"]),
         ("jrun (default bridge network)", lambda: jrun + ["--", "/bin/true"])]
    if shutil.which("bwrap"):
        c.append(("bwrap (pid, net, uts, ipc, mount ns)", lambda: [
            "bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
            "--new-session", "--ro-bind", ROOTFS, "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
            "/bin/true"]))
    if shutil.which("crun"):
        bundle = crun_bundle(tmp)
        c.append(("crun, cgroupfs, 256 MiB limit", lambda: [
            "crun", "--cgroup-manager=cgroupfs", "run", "-b", bundle, "bench-%d-%d" % (os.getpid(), seq.next())]))
    c.append(("shell veth, bridge per run", lambda: ["sh", "-c", SHELL_VETH, "sh", "", "198.18.254.2"]))
    c.append(("shell veth, bridge kept", lambda: [
        "sh", "-c", SHELL_VETH, "sh", KEPT_BRIDGE, "198.18.254.%d" % (2 + seq.next() % 250)]))
    if shutil.which("podman"):
        rootfs = os.path.join(tmp, "rootfs")  # podman writes into the rootfs it is given
        subprocess.run(["cp", "-a", ROOTFS, rootfs], check=True)
        c.append(("podman run --rootfs, network none", lambda: [
            "podman", "--cgroup-manager=cgroupfs", "run", "--rm", "--network", "none", "--rootfs", rootfs,
            "/bin/true"]))
    c.append(("python3 -S -c pass (interpreter alone)", lambda: [os.path.realpath(sys.executable), "-S", "-c",
                                                                 "pass"]))
    return c


def run_once(argv, env):
    t = time.perf_counter()
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError("exit %d: %s" % (p.returncode, p.stderr.decode(errors="replace").strip()[-200:]))
    return dt


def rss_kib(argv, env):
    """VmRSS of the launcher while its job sleeps (argv ends in /bin/true:
    replaced by sleep 1.5; crun's bundle fixes its command: see crun_rss)."""
    argv = argv[:-1] + ["/bin/sleep", "1.5"] if argv[-1] == "/bin/true" else argv
    return rss_kib_while_running(argv, settle=0.6, env=env)


def crun_rss(tmp, env):
    import json

    os.mkdir(os.path.join(tmp, "rss"))
    bundle = crun_bundle(os.path.join(tmp, "rss"))
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        spec = json.load(f)
    spec["process"]["args"] = ["/bin/sleep", "1.5"]
    with open(path, "w") as f:
        json.dump(spec, f)
    return rss_kib_while_running(["crun", "--cgroup-manager=cgroupfs", "run", "-b", bundle,
                                  "bench-rss-%d" % os.getpid()], settle=0.6, env=env)


def throughput(factory, env, jobs=50, parallel=8):
    t = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(lambda _: run_once(factory(), env), range(jobs)))
    return jobs / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--jrun", help="command that runs jrun (default: %s)" % shlex.join(default_jrun()))
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown (for README)")
    ap.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_peers.py: run as root")
    if not a.in_namespace:
        # See the docstring: crun and podman need the unified mount out of the way.
        script = "umount -l /sys/fs/cgroup/unified 2>/dev/null; exec \"$@\""
        os.execvp("unshare", ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                              sys.executable] + sys.argv + ["--in-namespace"])
    jrun = shlex.split(a.jrun) if a.jrun else default_jrun()
    tmp = tempfile.mkdtemp(prefix="jrun-bench-peers-")
    conf = os.path.join(tmp, "containers.conf")
    with open(conf, "w") as f:
        # podman's default ulimits are refused by crun here (EPERM); low ones are not.
        f.write('[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]\n')
    env = dict(os.environ, CONTAINERS_CONF=conf)
    subprocess.run("ip link add %s type bridge && ip addr add 198.18.254.1/24 dev %s && ip link set %s up"
                   % ((KEPT_BRIDGE,) * 3), shell=True, check=True)
    try:
        bench(a, jrun, tmp, env)
    finally:
        subprocess.run(["ip", "link", "del", KEPT_BRIDGE], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def bench(a, jrun, tmp, env):
    cases, skipped = [], []
    for label, factory in contenders(jrun, tmp):
        try:
            for _ in range(a.warmup):
                run_once(factory(), env)
            cases.append((label, factory))
        except (RuntimeError, OSError) as e:
            skipped.append((label, str(e)))
    times = {label: [] for label, _ in cases}
    for _ in range(a.rounds):
        order = list(cases)
        random.shuffle(order)
        for label, factory in order:
            times[label].append(run_once(factory(), env))
    med = {label: statistics.median(ts) * 1e3 for label, ts in times.items()}

    print("== start-up, %d interleaved rounds, %s, %s ==" % (a.rounds, time.strftime("%Y-%m-%d"), os.uname().release))
    print("jrun: %s" % shlex.join(jrun))
    rows = [(label, "%.1f ms" % med[label], "%.1f-%.1f" % (min(times[label]) * 1e3, max(times[label]) * 1e3))
            for label, _ in cases]
    table(a.markdown, ("runner", "median", "min-max"), rows)
    for label, why in skipped:
        print("  skipped: %s: %s" % (label, why))

    def ratio(x, y):
        return "%.2f×" % (med[x] / med[y]) if x in med and y in med else "n/a"

    jn, jb = "jrun --net none --memory 256M", "jrun (default bridge network)"
    crun, veth, kept, podman = ("crun, cgroupfs, 256 MiB limit", "shell veth, bridge per run",
                                "shell veth, bridge kept", "podman run --rootfs, network none")
    print()
    table(a.markdown, ("ratio", "value", "goal (issue 11)"), [
        ("jrun --net none --memory 256M / crun+256M", ratio(jn, crun), "≤ 2.0× (stretch 1.5×)"),
        ("jrun bridge / shell veth (bridge per run)", ratio(jb, veth), "≤ 2× (stretch 1.2×)"),
        ("jrun bridge / shell veth (bridge kept)", ratio(jb, kept), "(for reference)"),
        ("jrun bridge / podman", ratio(jb, podman), "≤ 0.5×"),
    ])

    print()
    by_label = dict(cases)
    tp_rows, tp = [], {}
    for label in (jn, crun, jb, veth, kept):
        if label in by_label:
            tp[label] = throughput(by_label[label], env)
            tp_rows.append((label, "%.1f jobs/s" % tp[label]))
    print("== throughput: 50 jobs, 8 at a time ==")
    table(a.markdown, ("runner", "throughput"), tp_rows)
    if jn in tp and crun in tp:
        print("  jrun --net none / crun+256M: %.0f %% (goal ≥ 50 %%)" % (100 * tp[jn] / tp[crun]))
    if jb in tp and veth in tp:
        print("  jrun bridge / shell veth (bridge per run): %.0f %% (goal ≥ 50 %%)" % (100 * tp[jb] / tp[veth]))

    print()
    print("== runner RSS while its job sleeps (VmRSS of the launcher) ==")
    rss_rows = []
    for label in (jn, jb, "bwrap (pid, net, uts, ipc, mount ns)"):
        if label in by_label:
            kib = rss_kib(by_label[label](), env)
            rss_rows.append((label, "%.1f MB" % (kib / 1024) if kib else "n/a"))
    if crun in by_label:
        kib = crun_rss(tmp, env)
        rss_rows.append((crun, "%.1f MB" % (kib / 1024) if kib else "n/a"))
    table(a.markdown, ("runner", "RSS"), rss_rows)
    print("  goals: jrun ≤ 12 MB (--net none), ≤ 15 MB (bridge)")


def table(markdown, head, rows):
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|")
        for r in rows:
            print("| " + " | ".join(str(x) for x in r) + " |")
        return
    for r in [head] + rows:
        print("  " + "  ".join(str(x).ljust(w) for x, w in zip(r, widths)))


if __name__ == "__main__":
    main()
