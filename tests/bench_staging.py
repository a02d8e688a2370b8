#!/usr/bin/env python3
"""Benchmark: `jrun --upload` of a ~1 GB tree against `cp -a` of the same tree
into a tmpfs, in the same run.  Standalone (not a test): run as root,

    /opt/jrun/bin/python3 tests/bench_staging.py [--runs N] [--small N] [--big-mb N]

The tree (many small files in nested directories plus a few big ones) is made
once under /var/tmp and removed at the end, as is the tmpfs cp -a copies into.
jrun's staging time is measured two ways: the copy time jrun itself reports
("uploaded ... in X s"), and the whole run minus a run without the upload.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JRUN = [sys.executable, os.path.join(ROOT, "jrun.py")]


def make_tree(top, small, big_mb):
    """SMALL files of 1-64 KiB spread over nested directories, a few
    symlinks, and three files of BIG_MB MiB."""
    rnd = os.urandom(1 << 16)
    total = 0
    for i in range(small):
        d = os.path.join(top, "src", "d%02d" % (i % 50), "sub%d" % (i % 7))
        os.makedirs(d, exist_ok=True)
        size = 1024 * (1 + (i * 7919) % 64)
        with open(os.path.join(d, "f%06d.dat" % i), "wb") as f:
            f.write(rnd[:size])
        total += size
        if i % 500 == 0:
            os.symlink("f%06d.dat" % i, os.path.join(d, "link%06d" % i))
    block = os.urandom(1 << 20)
    for n in range(3):
        with open(os.path.join(top, "src", "big%d.bin" % n), "wb") as f:
            for _ in range(big_mb):
                f.write(block)
        total += big_mb << 20
    return os.path.join(top, "src"), total


def timed(argv, **kw):
    t = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    took = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit("failed: %s\n%s" % (" ".join(argv), p.stderr))
    return took, p


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small", type=int, default=20000, help="number of small files")
    ap.add_argument("--big-mb", type=int, default=128, help="size of each of the 3 big files, MiB")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    top = tempfile.mkdtemp(prefix="jrun-bench-", dir="/var/tmp")
    mnt = os.path.join(top, "tmpfs")
    os.mkdir(mnt)
    mounted = False
    try:
        t = time.perf_counter()
        src, total = make_tree(top, args.small, args.big_mb)
        nfiles = sum(len(f) for _, _, f in os.walk(src))
        print("tree: %d files, %.1f MB (made in %.1fs)" % (nfiles, total / 1e6, time.perf_counter() - t))
        subprocess.run(["sync"], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%dm" % (total * 2 // (1 << 20) + 64),
                        "jrun-bench", mnt], check=True)
        mounted = True
        # Warm the page cache for every contender alike.
        subprocess.run("tar cf - -C %s src | cat > /dev/null" % top, shell=True, check=True)
        rows = {"cp -a into a tmpfs": [], "jrun --upload (whole run)": [], "jrun (no upload)": [],
                "jrun --upload minus no-upload run": [], "jrun's own copy time": []}
        for _ in range(args.runs):
            took, _ = timed(["cp", "-a", src, os.path.join(mnt, "copy")])
            rows["cp -a into a tmpfs"].append(took)
            subprocess.run(["rm", "-rf", os.path.join(mnt, "copy")], check=True)
            base, _ = timed(JRUN + ["--net", "none", "--", "/bin/true"])
            rows["jrun (no upload)"].append(base)
            took, p = timed(JRUN + ["--net", "none", "--upload", src, "--", "/bin/true"])
            rows["jrun --upload (whole run)"].append(took)
            rows["jrun --upload minus no-upload run"].append(took - base)
            own = [w for w in p.stderr.split() if w.endswith("s") and w[:-1].replace(".", "").isdigit()]
            rows["jrun's own copy time"].append(float(own[-1][:-1]) if own else float("nan"))
        print("\n%-36s %9s %9s %10s" % ("", "median s", "min s", "MB/s (med)"))
        for name, vals in rows.items():
            med = statistics.median(vals)
            rate = "" if name == "jrun (no upload)" else "%10.0f" % (total / 1e6 / med)
            print("%-36s %9.3f %9.3f %s" % (name, med, min(vals), rate))
        ratio = statistics.median(rows["jrun --upload minus no-upload run"]) / statistics.median(
            rows["cp -a into a tmpfs"])
        print("\njrun's staging / cp -a: %.2fx" % ratio)
    finally:
        if mounted:
            subprocess.run(["umount", mnt])
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
