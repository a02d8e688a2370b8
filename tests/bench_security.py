#!/opt/jrun/bin/python3
"""What the least-privilege defences cost a job's start (standalone, as root):

    /opt/jrun/bin/python3 tests/bench_security.py [RUNS]

Three measures.  Inside the child, from jrun's own audit trail (--log-level
debug --log-format json stamps every step to the microsecond): the /proc and
/sys hardening, and the last steps (user namespace, capabilities, user,
no_new_privs, seccomp) from "new session" to "exec".  The wall-clock time
of `jrun --net none -- /bin/true` with the defaults, with
`--seccomp unconfined`, and with --userns.  And what the filter costs a
syscall at run time (the static probe of tests/probe, with gcc): ioctl, which
the filter checks by argument (it runs the program on every call), and
getppid, whose verdict the kernel caches.  Medians; other jobs running on the
machine make the wall clock noisy.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
JRUN = [sys.executable, os.path.join(os.path.dirname(HERE), "jrun.py")]
SYSCALLS = 200000  # per probe run


def run(opts):
    t0 = time.perf_counter()
    p = subprocess.run(JRUN + ["--net", "none", "--log-level", "debug", "--log-format", "json"] + opts
                       + ["--", "/bin/true"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr
    return wall, [(rec["msg"], rec["time"]) for rec in map(json.loads, p.stderr.splitlines())]


def span(stamps, start, end):
    """Seconds from the audit line starting with START (None: the line
    just before END) to the one starting with END."""
    e = next(i for i, (msg, _) in enumerate(stamps) if msg.startswith(end))
    s = e - 1 if start is None else next(i for i, (msg, _) in enumerate(stamps) if msg.startswith(start))
    return stamps[e][1] - stamps[s][1]


def syscall_costs(runs):
    """ns per ioctl(TCGETS) and per getppid, in a job, with and without the filter."""
    if not shutil.which("gcc"):
        return None
    with tempfile.TemporaryDirectory() as d:
        probe = os.path.join(d, "probe")
        subprocess.run(["gcc", "-static", "-O2", "-o", probe, os.path.join(HERE, "probe", "probe.c")], check=True)
        with open(probe, "rb") as f:
            code = f.read()
    out = {"default": [], "--seccomp unconfined": []}
    for _ in range(runs):
        for name, opts in (("default", []), ("--seccomp unconfined", ["--seccomp", "unconfined"])):
            p = subprocess.run(JRUN + ["--net", "none"] + opts + ["--", "/bin/sh", "-c",
                               "cat > /tmp/p; chmod 755 /tmp/p; /tmp/p ioctl-loop %d < /dev/null" % SYSCALLS],
                               input=code, capture_output=True, check=True)
            out[name].append([float(x) for x in p.stdout.split()])
    return {k: [statistics.median(v[i] for v in out[k]) for i in (0, 1)] for k in out}


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    configs = {"default": [], "--seccomp unconfined": ["--seccomp", "unconfined"], "--userns": ["--userns"]}
    wall = {k: [] for k in configs}
    harden, last = {k: [] for k in configs}, {k: [] for k in configs}
    for _ in range(runs):  # interleaved, so that load changes hit every configuration alike
        for name, opts in configs.items():
            w, st = run(opts)
            wall[name].append(w)
            harden[name].append(span(st, None, "/proc and /sys hardened"))
            last[name].append(span(st, "new session", "exec "))
    ms = lambda xs: "%6.2f ms" % (1000 * statistics.median(xs))  # noqa: E731
    print("%d runs each, medians" % runs)
    print("%-22s %12s %16s %18s" % ("", "wall clock", "/proc hardening", "last steps+seccomp"))
    for name in configs:
        print("%-22s %12s %16s %18s" % (name, ms(wall[name]), ms(harden[name]), ms(last[name])))
    cost = statistics.median(harden["default"]) + statistics.median(last["default"])
    print("defences inside the child (default): %.2f ms (target < 2 ms)" % (1000 * cost))
    print("of which seccomp and the rest of the last steps vs unconfined: %.2f ms"
          % (1000 * (statistics.median(last["default"]) - statistics.median(last["--seccomp unconfined"]))))
    costs = syscall_costs(max(3, runs // 3))
    if costs:
        print("per syscall (%d calls per run, medians): ioctl %.0f ns with the filter, %.0f ns without "
              "(checked by argument); getppid %.0f ns vs %.0f ns (cached verdict)"
              % (SYSCALLS, costs["default"][0], costs["--seccomp unconfined"][0], costs["default"][1],
                 costs["--seccomp unconfined"][1]))


if __name__ == "__main__":
    main()
