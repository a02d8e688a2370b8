#!/opt/jrun/bin/python3
"""What the stdio relay costs (standalone, as root, under the host lock):

    flock /tmp/jrun-host.lock /opt/jrun/bin/python3 tests/bench_stdio.py [--runs N] [--jrun CMD]

A job never holds an fd on a host file or terminal: jrun relays a file
through a pipe (splice) and a terminal through the job's own pty, and passes
anonymous pipes, sockets and /dev/null (as the job's own) straight through.
Two measures:

  start-up   `jrun --net none -- /bin/true` with stdout to /dev/null, to a
             pipe (no relay: what scripts and benchmarks use), to a file
             (one relayed pipe) and with all of stdio a terminal (the pty);
             RUNS interleaved runs each, medians.
  1 GB       `dd if=/dev/zero bs=1M count=1024` in a job, its stdout to a
             file on /tmp (relayed: splice), appended to one (`>>`: splice
             refuses O_APPEND, so read/write), to `| cat > /dev/null` (a pipe:
             passed through), and the same dd on the host into the file;
             best of 3.

--jrun runs another jrun; given twice or more, the start-up runs of each
are interleaved (e.g. to compare with an older checkout).  A benchmark,
not a test: it asserts nothing and the suite does not run it.
"""
import argparse
import fcntl
import os
import pty
import shlex
import statistics
import subprocess
import sys
import termios
import time

HERE = os.path.dirname(os.path.abspath(__file__))
JRUN = [sys.executable, os.path.join(os.path.dirname(HERE), "jrun.py")]
OUT = "/tmp/jrun-bench-stdio.out"
DD = ["dd", "if=/dev/zero", "bs=1M", "count=1024", "status=none"]


def timed(argv, **kw):
    t = time.perf_counter()
    p = subprocess.run(argv, **kw)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError("%s: exit %d" % (shlex.join(argv), p.returncode))
    return dt


def startup(jruns, runs):
    null = subprocess.DEVNULL

    def to_file(true):
        with open(OUT, "wb") as f:
            return timed(true, stdin=null, stdout=f, stderr=null)

    def on_a_terminal(true):  # jrun in the foreground of its controlling terminal, as in a shell
        master, slave = pty.openpty()

        def take_the_terminal():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        try:
            return timed(true, stdin=slave, stdout=slave, stderr=slave, preexec_fn=take_the_terminal)
        finally:
            os.close(slave)
            os.close(master)

    configs = {
        "stdout /dev/null": lambda true: timed(true, stdin=null, stdout=null, stderr=null),
        "stdout a pipe": lambda true: timed(true, stdin=null, stdout=subprocess.PIPE, stderr=null),
        "stdout a file": to_file,
        "stdio a terminal": on_a_terminal,
    }
    trues = [jrun + ["--net", "none", "--", "/bin/true"] for jrun in jruns]
    times = {(k, i): [] for k in configs for i in range(len(trues))}
    for r in range(runs + 3):  # interleaved, so that load changes hit every one alike; 3 to warm up
        for name, run in configs.items():
            for i, true in enumerate(trues):
                dt = run(true)
                if r >= 3:
                    times[name, i].append(dt)
    print("== start-up: jrun --net none -- /bin/true (%d runs each, medians) ==" % runs)
    print("  %-18s" % "" + "".join("%14s" % ("jrun #%d" % (i + 1)) for i in range(len(trues))))
    for name in configs:
        print("  %-18s" % name + "".join("%11.1f ms" % (1000 * statistics.median(times[name, i]))
                                         for i in range(len(trues))))
    for i, true in enumerate(trues):
        print("  jrun #%d: %s" % (i + 1, shlex.join(true[:-4])))


def one_gb(jrun):
    job = jrun + ["--net", "none", "--"] + DD

    def into(mode):
        def run():
            with open(OUT, mode) as f:
                return timed(job, stdin=subprocess.DEVNULL, stdout=f)
        return run

    def host():
        with open(OUT, "wb") as f:
            return timed(DD, stdout=f)

    configs = {
        "jrun > file (splice)": into("wb"),
        "jrun >> file (read/write)": into("ab"),
        "jrun | cat > /dev/null": lambda: timed(["sh", "-c", shlex.join(job) + " | cat > /dev/null"]),
        "dd > file on the host": host,
    }
    print("== 1 GB of stdout: %s (best of 3) ==" % shlex.join(DD))
    for name, run in configs.items():
        best = min(run() for _ in range(3))
        print("  %-26s %6.2f s  %5.2f GB/s" % (name, best, (1 << 30) / best / 1e9))
        if os.path.exists(OUT):
            os.unlink(OUT)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--jrun", action="append",
                    help="command that runs jrun (default: %s); repeat it to compare" % shlex.join(JRUN))
    ap.add_argument("--only", choices=("startup", "1gb"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_stdio.py: run as root")
    jruns = [shlex.split(j) for j in a.jrun] if a.jrun else [JRUN]
    if a.only != "1gb":
        startup(jruns, a.runs)
    if a.only != "startup":
        for jrun in jruns:
            one_gb(jrun)


if __name__ == "__main__":
    main()
