#!/opt/jrun/bin/python3
"""Benchmark of jrun's networking, standalone (not collected by pytest):

    sudo /opt/jrun/bin/python3 tests/bench_network.py [ROUNDS]

Times, interleaved in the same run: `jrun --net none -- /bin/true`, a
default-networked `jrun -- /bin/true` (alone: it creates and removes the
bridge and nft table; and next to a running job: the bridge exists), the same
bridge/veth/address steps done by a shell script with `ip` around `unshare`,
`systemd-nspawn --network-veth` and `podman run --rootfs ... --network none`
where they run here; then 30 concurrent networked jobs.  Prints medians, and
where a networked jrun's milliseconds go (from its --log-level debug trail).
Traffic: none leaves the host; the script's bridge uses 198.18.0.0/15
(RFC 2544, for benchmarks).
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JRUN = [sys.executable, os.path.join(ROOT, "jrun.py")]
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 15

IP_SCRIPT = r"""
set -e
ns=bench$$; br=bnb$$; v=bnv$$
ip link add $br type bridge
ip addr add 198.18.253.1/24 dev $br
ip link set $br up
mkdir -p /run/netns; touch /run/netns/$ns
unshare --net=/run/netns/$ns true
ip link add $v type veth peer name eth0 netns $ns
ip link set $v master $br up
ip -n $ns link set lo up
ip -n $ns addr add 198.18.253.2/24 dev eth0
ip -n $ns link set eth0 up
ip -n $ns route add default via 198.18.253.1
nsenter --net=/run/netns/$ns /bin/true
ip link del $v
umount /run/netns/$ns; rm /run/netns/$ns
ip link del $br
"""


def timed(cmd, **kw):
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    return time.perf_counter() - t, p


def works(cmd):
    _, p = timed(cmd)
    return p.returncode == 0, (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]


def main():
    if os.geteuid() != 0:
        sys.exit("bench_network.py: run as root")
    tmp = tempfile.mkdtemp(prefix="jrun-bench-")
    rootfs = os.path.join(tmp, "rootfs")  # a copy: nspawn and podman write into the rootfs they get
    subprocess.run(["cp", "-a", "/var/lib/jrun/rootfs", rootfs], check=True)
    conf = os.path.join(tmp, "containers.conf")
    with open(conf, "w") as f:  # podman's default nofile (1048576) needs CAP_SYS_RESOURCE
        f.write('[containers]\ndefault_ulimits = ["nofile=%d:%d", "nproc=%d:%d"]\n'
                % ((os.sysconf("SC_OPEN_MAX"),) * 2 + (os.sysconf("SC_CHILD_MAX"),) * 2))
    skipped = {}
    cases = {
        "jrun --net none -- /bin/true": JRUN + ["--net", "none", "--", "/bin/true"],
        "jrun -- /bin/true (alone: makes and removes jrun0)": JRUN + ["--", "/bin/true"],
        "jrun -- /bin/true (jrun0 held by another job)": "warm",
        "shell: ip bridge+veth+addr+route around unshare": ["sh", "-c", IP_SCRIPT],
    }
    if shutil.which("systemd-nspawn"):
        cases["systemd-nspawn --network-veth"] = ["systemd-nspawn", "-q", "--register=no", "--keep-unit",
                                                  "-D", rootfs, "--network-veth", "/bin/true"]
    podman = "podman run --rootfs --network none"
    if not shutil.which("podman"):
        skipped[podman] = "not installed (apt-get install podman)"
    elif os.path.isdir("/sys/fs/cgroup/unified"):
        # Not even tried: it would fail, after setting up its CNI bridge and
        # iptables tables on this host all the same.
        skipped[podman] = "crun refuses hybrid cgroup v1/v2 hosts such as this one"
    else:
        cases[podman] = ["podman", "run", "--rm", "--rootfs", rootfs, "--network", "none", "/bin/true"]
    env = dict(os.environ, CONTAINERS_CONF=conf)
    for name, cmd in list(cases.items()):
        if cmd == "warm":
            continue
        _, p = timed(cmd, env=env)
        if p.returncode != 0:
            skipped[name] = (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]
            del cases[name]

    holder = None
    times = {name: [] for name in cases}
    try:
        for _ in range(ROUNDS):
            for name, cmd in cases.items():
                if cmd == "warm":
                    holder = subprocess.Popen(JRUN + ["--init", "--", "sleep", "30"], stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL)
                    while "jrun0" not in os.listdir("/sys/class/net"):
                        time.sleep(0.01)
                    time.sleep(0.05)
                    dt, p = timed(JRUN + ["--", "/bin/true"])
                    holder.terminate()
                    holder.wait()
                else:
                    dt, p = timed(cmd, env=env)
                if p.returncode != 0:
                    sys.exit("%s failed: %s" % (name, p.stderr))
                times[name].append(dt)
    finally:
        if holder and holder.poll() is None:
            holder.kill()
            holder.wait()

    print("\n%d rounds, interleaved; median and spread in ms" % ROUNDS)
    print("%-52s %8s %8s %8s" % ("", "median", "min", "max"))
    for name, ts in times.items():
        print("%-52s %8.1f %8.1f %8.1f" % (name, statistics.median(ts) * 1e3, min(ts) * 1e3, max(ts) * 1e3))
    for name, why in skipped.items():
        print("%-52s %8s   (%s)" % (name, "skipped", why[:90]))

    # 30 concurrent networked jobs.
    def one(_):
        return subprocess.run(JRUN + ["--", "sh", "-c", "ip -4 -o addr show eth0"], capture_output=True, text=True)

    t = time.perf_counter()
    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(one, range(30)))
    wall = time.perf_counter() - t
    bad = [p for p in results if p.returncode != 0]
    addrs = {p.stdout.split()[3] for p in results if p.returncode == 0}
    print("\n30 concurrent networked jobs: %.2f s wall, %d errors, %d distinct addresses"
          % (wall, len(bad), len(addrs)))
    for p in bad[:3]:
        print("  error:", p.stderr.strip())

    with open(JRUN[1]) as f:
        src = f.read()
    t = time.perf_counter()
    compile(src, JRUN[1], "exec")
    print("\ncompiling jrun.py (%d lines), paid by every run without a .pyc (a script run, or "
          "PYTHONDONTWRITEBYTECODE): %.1f ms" % (src.count("\n"), (time.perf_counter() - t) * 1e3))
    breakdown()
    shutil.rmtree(tmp)


PHASES = (  # (label, audit message that ends the phase)
    ("interpreter, imports, route check, state dir", "created and locked"),
    ("nft table + ip_forward (first job only)", "holds 1 network"),
    ("bridge + gateway address (first job only)", "bridge jrun0 created"),
    ("lease written", "leased on"),
    ("fork, child unshares its namespaces", "namespaces created"),
    ("veth pair, eth0 in the job (attach)", "its other end eth0"),
    ("eth0 address, up, default route", "network: ready"),
    ("root, pivot, exec", "exec "),
    ("/bin/true, job exit, veth deleted", "deleted"),
    ("bridge deleted (last job)", "bridge jrun0 deleted"),
    ("nft table deleted (last job)", "table inet jrun deleted"),
    ("state removed, exit", None),
)


def breakdown():
    """Where a lone networked job's milliseconds go, from its audit trail."""
    runs = []
    for _ in range(ROUNDS):
        t0 = time.time()
        p = subprocess.run(JRUN + ["--log-level", "debug", "--log-format", "json", "--", "/bin/true"],
                           capture_output=True, text=True)
        end = time.time()
        recs = [json.loads(line) for line in p.stderr.splitlines()]
        marks, prev, i = {}, t0, 0
        for label, text in PHASES:
            if text is None:
                marks[label] = end - prev
                break
            while i < len(recs) and text not in recs[i]["msg"]:
                i += 1
            if i == len(recs):
                break
            marks[label] = recs[i]["time"] - prev
            prev = recs[i]["time"]
        runs.append(marks)
    print("\nA lone `jrun -- /bin/true`, phase by phase (median ms of %d runs)" % ROUNDS)
    total = 0
    for label, _ in PHASES:
        vals = [r[label] for r in runs if label in r]
        if vals:
            med = statistics.median(vals) * 1e3
            total += med
            print("  %-48s %7.1f" % (label, med))
    print("  %-48s %7.1f" % ("sum of medians", total))


if __name__ == "__main__":
    main()
