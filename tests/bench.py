#!/opt/jrun/bin/python3
"""jrun's benchmark: start-up cost and memory, side by side with its peers.

    sudo /opt/jrun/bin/python3 tests/bench.py [--runs N] [--jrun CMD]

Run as root on an otherwise idle machine.  Each contender runs /bin/true
(or a short sleep, for memory) in comparable isolation over the same minimal
rootfs; the table shows medians and ratios to bwrap.  This is a benchmark,
not a test: it asserts nothing and is not run by the test suite.

Other sections (cgroups, network, staging, security) live in bench_*.py beside this
file and run after the core table when present.
"""
import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ROOTFS = "/var/lib/jrun/rootfs"


def default_jrun():
    """The installed console script (what users run) when present, else this
    checkout's jrun.py under the interpreter that has its dependencies.  Never
    the pyenv shim: it adds ~30 ms to every start."""
    if os.path.exists("/opt/jrun/bin/jrun"):
        return ["/opt/jrun/bin/jrun"]
    return [sys.executable, os.path.join(ROOT, "jrun.py")]


def time_runs(argv, runs, warmup=3):
    """Wall-clock seconds of each of RUNS runs of ARGV (after WARMUP runs)."""
    out = []
    for i in range(warmup + runs):
        t = time.perf_counter()
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
        dt = time.perf_counter() - t
        if p.returncode != 0:
            raise RuntimeError("%s failed (%d): %s" % (shlex.join(argv), p.returncode, p.stderr.decode()[-300:]))
        if i >= warmup:
            out.append(dt)
    return out


def rss_kib_while_running(argv, settle=0.5, env=None):
    """Resident memory (VmRSS) of the launcher process while its job sleeps
    (None if it ended before)."""
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=env)
    try:
        time.sleep(settle)
        with open("/proc/%d/status" % p.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    finally:
        p.wait()
    return None


def contenders(jrun):
    c = [("jrun --net none", jrun + ["--net", "none", "--", "/bin/true"])]
    if shutil.which("bwrap"):
        c.append(("bwrap", ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                            "--die-with-parent", "--new-session", "--ro-bind", ROOTFS, "/", "--proc", "/proc",
                            "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/work", "/bin/true"]))
    c.append(("unshare(1)", ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--net", "--kill-child",
                             "--root=" + ROOTFS, "--mount-proc", "/bin/true"]))
    c.append(("python3 -c pass", [sys.executable, "-c", "pass"]))
    return c


def core_table(jrun, runs):
    print("== start-up: /bin/true in a fresh pid/mount/uts/ipc/net namespace over %s (%d runs) ==" % (ROOTFS, runs))
    rows = []
    for name, argv in contenders(jrun):
        try:
            rows.append((name, statistics.median(time_runs(argv, runs)), argv))
        except (RuntimeError, OSError) as e:
            print("  %-18s skipped: %s" % (name, e))
    ref = dict((n, m) for n, m, _ in rows).get("bwrap")
    print("  %-18s %10s %8s" % ("contender", "median", "÷ bwrap"))
    for name, med, _ in rows:
        print("  %-18s %8.1f ms %8s" % (name, med * 1000, ("%.1f×" % (med / ref)) if ref else "-"))
    rss = rss_kib_while_running(jrun + ["--net", "none", "--", "sleep", "1.5"])
    print("  jrun's own resident memory while its job runs: %.1f MB" % (rss / 1024.0))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--jrun", help="command that runs jrun (default: %s)" % shlex.join(default_jrun()))
    ap.add_argument("--only", choices=("core", "cgroups", "network", "staging", "security"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench.py: run as root")
    jrun = shlex.split(a.jrun) if a.jrun else default_jrun()
    if not a.only or a.only == "core":
        core_table(jrun, a.runs)
    sys.path.insert(0, HERE)
    for section in ("cgroups", "network", "staging", "security"):
        if a.only and a.only != section:
            continue
        path = os.path.join(HERE, "bench_%s.py" % section)
        if not os.path.exists(path):
            continue
        print(flush=True)
        mod = __import__("bench_%s" % section)
        if hasattr(mod, "bench"):
            mod.bench(jrun, a.runs)
        else:  # a standalone section script with its own defaults
            subprocess.run([sys.executable, path], check=False)


if __name__ == "__main__":
    main()
