#!/usr/bin/env python3
# PYTHON_ARGCOMPLETE_OK
"""jrun: run one command isolated, in the foreground, and leave nothing behind.

    sudo jrun [RUN OPTIONS] [--] COMMAND [ARG...]

One privileged invocation, no daemon, no setuid helper.  The order of a run:

  1. parse argv once into a frozen JobSpec, then validate all of it against
     this host before the first side effect (bad input: exit 125, nothing made);
  2. parent: create the job's state directory /run/jrun/<id> (held by a lock),
     its cgroup and its network plumbing, each registered for teardown;
  3. fork a child into a new PID namespace (it is PID 1 there); the child
     unshares mount, UTS, IPC and network namespaces and reports "ready";
  4. parent: put the child in its cgroup, move its veth in, release it
     through the sync pipe;
  5. child: cgroup namespace, private mounts, a per-job overlay root on a
     tmpfs, /proc, a minimal /dev, pivot_root, old root detached, hostname,
     new session, privileges dropped, seccomp, exec COMMAND (a failure before
     exec is reported through a close-on-exec error pipe);
  6. parent: forward signals, enforce --timeout, reap, tear down in reverse.

Exit status: COMMAND's own; 128+N if killed by signal N; 137 OOM-killed;
124 --timeout expired; 125 jrun failed (nothing started, nothing left);
126 COMMAND not executable; 127 COMMAND not found.

Start-up time is part of every job, so the run path avoids heavy imports
(re, json, argparse, dataclasses cost 7-18 ms each here); they are imported
only by the commands that need them.
"""

__version__ = "0.1.0"

import errno
import fcntl
import os
import signal
import sys
import time

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

STATE_DIR = "/run/jrun"
ROOTFS_DIR = "/var/lib/jrun/rootfs"
TINI = "/usr/bin/tini-static"
BUSYBOX = "/bin/busybox"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_WORKDIR = "/work"
DEFAULT_STOP_TIMEOUT = 10.0

# Networks (see the Network section).  The default subnet: podman takes
# 10.88/16, docker 172.17-172.30/16 first and 192.168/16 in /20s, libvirt
# 192.168.122/24, Kubernetes 10.96/12 and 10.244/16, Tailscale 100.64/10;
# 172.31.128/17 is reached by docker only at its 15th network, and AWS
# default VPCs (172.31/16) put their subnets and DNS resolver in the low
# half.  A clash with a route of the host is refused, never silently used.
NET_DIR = STATE_DIR + "/.net"  # never a job id: names cannot start with '.'
DEFAULT_BRIDGE = "jrun0"
DEFAULT_SUBNET = "172.31.254.0/24"
DEFAULT_NET_POOL = "172.31.128.0/17"  # named networks take a /24 each
NAMED_PREFIXLEN = 24
NFT_TABLE = "inet jrun"
NFT_PATHS = ("/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft")  # no PATH lookup for root
RESOLVED_UPSTREAM = "/run/systemd/resolve/resolv.conf"
RESERVED_NETS = ("bridge", "none")

EXIT_TIMEOUT = 124
EXIT_JRUN = 125
EXIT_NOEXEC = 126
EXIT_NOTFOUND = 127

# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# <linux/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

# Signals jrun relays to the job; each asks it to end, so each starts the
# grace period after which jrun sends SIGKILL.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

_SYSCALLS = {  # <asm/unistd.h>: pivot_root, close_range
    "x86_64": {"pivot_root": 155},
    "aarch64": {"pivot_root": 41},
}

# ---------------------------------------------------------------------------
# Errors: one root; main() alone prints them and turns them into a status.
# ---------------------------------------------------------------------------


class JrunError(Exception):
    """jrun itself failed; nothing was started and nothing is left behind."""

    exit_code = EXIT_JRUN


class UsageError(JrunError):
    """A bad option or value on the command line or in the config file."""


class SetupError(JrunError):
    """The host could not be prepared for the job."""


class NotExecutable(JrunError):
    exit_code = EXIT_NOEXEC


class NotFound(JrunError):
    exit_code = EXIT_NOTFOUND


# ---------------------------------------------------------------------------
# Messages.  Everything jrun says goes to stderr and starts with "jrun: ".
# ---------------------------------------------------------------------------

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_log = {"level": 20, "format": "text", "job": None}


def log(level, msg):
    if LEVELS[level] < _log["level"]:
        return
    if _log["format"] == "json":
        rec = {"time": round(time.time(), 6), "level": level, "msg": msg}
        if _log["job"]:
            rec["job"] = _log["job"]
        line = dumps_json(rec) + "\n"
    else:
        line = "jrun: " + msg + "\n"
    try:
        os.write(2, line.encode("utf-8", "replace"))
    except OSError:
        pass


def audit(msg):
    """One line of the isolation audit trail, shown with --log-level debug."""
    log("debug", msg)


_JSON_ESC = {i: "\\u%04x" % i for i in range(32)}
_JSON_ESC.update({ord('"'): '\\"', ord("\\"): "\\\\", 10: "\\n", 9: "\\t", 13: "\\r"})


def dumps_json(obj):
    """A small JSON encoder for flat records: the json module imports re,
    which costs 7 ms of every job's start here."""
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, (int, float)):
        return repr(obj)
    if isinstance(obj, str):
        return '"' + obj.translate(_JSON_ESC) + '"'
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(dumps_json(x) for x in obj) + "]"
    if isinstance(obj, dict):
        return "{" + ", ".join(dumps_json(str(k)) + ": " + dumps_json(v) for k, v in obj.items()) + "}"
    return dumps_json(str(obj))


# ---------------------------------------------------------------------------
# Syscall helpers: thin ctypes wrappers named after the syscall.
# ---------------------------------------------------------------------------

_libc = None


def _c():
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(ret, what):
    if ret < 0:
        import ctypes

        e = ctypes.get_errno()
        raise OSError(e, "%s: %s" % (what, os.strerror(e)))
    return ret


def _b(s):
    return None if s is None else os.fsencode(s)


def mount(source, target, fstype, flags=0, data=None):
    _check(_c().mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
           "mount %s on %s" % (fstype or source, target))


def umount2(target, flags=0):
    _check(_c().umount2(_b(target), flags), "umount %s" % target)


def unshare(flags):
    _check(_c().unshare(flags), "unshare")


def setns(fd, nstype):
    _check(_c().setns(fd, nstype), "setns")


def pivot_root(new_root, put_old):
    nr = _SYSCALLS[os.uname().machine]["pivot_root"]
    _check(_c().syscall(nr, _b(new_root), _b(put_old)), "pivot_root")


def sethostname(name):
    raw = name.encode()
    _check(_c().sethostname(raw, len(raw)), "sethostname")


SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 1  # <linux/sockios.h>, <net/if.h>


def loopback_up():
    """lo of a new network namespace starts down.  Two ioctls on a plain
    socket bring it up: no netlink library (pyroute2 costs 36 ms to import)
    on the --net none path."""
    # AF_INET, SOCK_DGRAM | SOCK_CLOEXEC (the socket module costs 7 ms to import)
    fd = _check(_c().socket(2, 2 | 0o2000000, 0), "socket")
    try:
        ifreq = bytearray(b"lo".ljust(40, b"\0"))  # struct ifreq: name[16], short flags
        fcntl.ioctl(fd, SIOCGIFFLAGS, ifreq)
        flags = int.from_bytes(ifreq[16:18], sys.byteorder) | IFF_UP
        ifreq[16:18] = flags.to_bytes(2, sys.byteorder)
        fcntl.ioctl(fd, SIOCSIFFLAGS, ifreq)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# JobSpec & parsing.  argv is parsed once, by one table, into a frozen
# JobSpec; nothing below the parser sees raw options.  The same table writes
# --help, feeds argcomplete and is checked against man/jrun.1 by the tests.
# ---------------------------------------------------------------------------


class _Frozen:
    """A record that cannot change after construction.  (dataclasses would
    do, but importing it costs 18 ms here, longer than a whole bwrap run.)"""

    __slots__ = ()

    def __init__(self, **kw):
        for k in self.__slots__:
            object.__setattr__(self, k, kw.pop(k, None))
        if kw:
            raise TypeError("unknown fields: %s" % ", ".join(kw))

    def __setattr__(self, k, v):
        raise AttributeError("%s is frozen" % type(self).__name__)

    def replace(self, **kw):
        d = {k: getattr(self, k) for k in self.__slots__}
        d.update(kw)
        return type(self)(**d)

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__,
                           ", ".join("%s=%r" % (k, getattr(self, k)) for k in self.__slots__))


class Upload(_Frozen):
    __slots__ = ("src", "dest")


class Volume(_Frozen):
    __slots__ = ("src", "dest", "read_only")


class Limits(_Frozen):
    __slots__ = ("cpu", "cores", "memory", "io_bps", "pids")


class JobSpec(_Frozen):
    __slots__ = (
        "id", "named", "command", "hostname", "timeout", "stop_timeout", "init",
        "limits", "uploads", "volumes", "workdir", "env", "rootfs", "read_only",
        "net", "user", "cap_add", "cap_drop", "seccomp", "userns", "stats",
        "json_status", "cgroup_parent", "log_level", "log_format",
    )


class Opt:
    __slots__ = ("long", "short", "metavar", "help", "dest", "repeat", "choices")

    def __init__(self, long, short=None, metavar=None, help="", dest=None, repeat=False, choices=None):
        self.long, self.short, self.metavar, self.help = long, short, metavar, help
        self.dest = dest or long[2:].replace("-", "_")
        self.repeat, self.choices = repeat, choices


RUN_OPTIONS = (
    Opt("--name", None, "NAME", "job id (default: 12 random hex chars); also the hostname"),
    Opt("--hostname", None, "NAME", "hostname inside the job (default: the job id)"),
    Opt("--timeout", None, "DURATION", "kill the job after DURATION (30, 30s, 5m, 1h); exit 124"),
    Opt("--stop-timeout", None, "DURATION",
        "grace period between SIGTERM and SIGKILL (default 10s)"),
    Opt("--init", None, None, "run a small reaper (tini) as PID 1 that forwards signals and reaps zombies"),
    Opt("--cpu", None, "PCT", "CPU bandwidth in percent of one CPU (25 = a quarter core)"),
    Opt("--cores", None, "LIST", "pin to CPUs, cpuset syntax 0-1,3"),
    Opt("--memory", None, "SIZE", "hard memory limit: 64M, 1G, 512K; a plain number is MiB"),
    Opt("--io-bps", None, "RATE", "read and write bandwidth limit in bytes/s (K/M/G suffix)"),
    Opt("--pids", None, "N", "maximum number of processes and threads in the job"),
    Opt("--upload", None, "SRC[:DEST]", "copy a host file or directory into the job (repeatable)", repeat=True),
    Opt("--volume", "-v", "SRC:DEST[:ro]", "bind a host path into the job (repeatable)", repeat=True),
    Opt("--workdir", "-w", "DIR", "working directory inside the job (default /work)"),
    Opt("--env", "-e", "KEY[=VALUE]", "set a variable, or pass the caller's value (repeatable)", repeat=True),
    Opt("--env-file", None, "FILE", "read KEY=VALUE lines from FILE (repeatable)", repeat=True),
    Opt("--rootfs", None, "minimal|host|PATH", "the job's root filesystem (default minimal)"),
    Opt("--read-only", None, None, "make the root filesystem read-only (workdir and /tmp stay writable)"),
    Opt("--net", None, "bridge|none|NAME", "network: bridge (default), none (loopback only) or a named network"),
    Opt("--user", "-u", "UID[:GID]", "run COMMAND as this user, with no capabilities"),
    Opt("--cap-add", None, "CAP", "add a capability to the default set (repeatable)", repeat=True),
    Opt("--cap-drop", None, "CAP|ALL", "drop a capability from the default set (repeatable)", repeat=True),
    Opt("--seccomp", None, "default|unconfined", "the default syscall filter, or none",
        choices=("default", "unconfined")),
    Opt("--userns", None, None, "map the job's root to an unprivileged host uid range"),
    Opt("--stats", None, None, "print a resource-usage summary on stderr when the job ends"),
    Opt("--json-status", None, "FILE", "write the job's result as JSON to FILE"),
    Opt("--cgroup-parent", None, "PATH", "create the job's cgroup under PATH"),
    Opt("--quiet", "-q", None, "only print errors"),
    Opt("--log-level", None, "LEVEL", "debug, info, warning or error; debug shows the isolation audit trail",
        choices=tuple(LEVELS)),
    Opt("--log-format", None, "text|json", "format of jrun's own messages on stderr", choices=("text", "json")),
)
FLAG_OPTIONS = {"--init", "--read-only", "--userns", "--stats", "--quiet"}
_BY_NAME = {}
for _o in RUN_OPTIONS:
    _BY_NAME[_o.long] = _o
    if _o.short:
        _BY_NAME[_o.short] = _o

SUBCOMMANDS = ("run", "ps", "kill", "gc", "rootfs", "verify")


def parse_size(opt, text, default_unit=1 << 20):
    """'64M' -> 67108864.  A plain number is in default_unit (MiB)."""
    t = text.strip()
    units = {"": default_unit, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    u = t[-1:].upper() if t[-1:].isalpha() else ""
    num = t[: len(t) - len(u)]
    if u.endswith("B") and len(num) > 1 and num[-1:].upper() in "KMGT" and num[-1:].isalpha():
        u, num = num[-1].upper(), num[:-1]  # "64MB"
    if u and u not in units:
        raise UsageError("%s: %r is not a size (use e.g. 64M, 1G)" % (opt, text))
    try:
        value = float(num)
    except ValueError:
        raise UsageError("%s: %r is not a size (use e.g. 64M, 1G)" % (opt, text)) from None
    if not value > 0 or value != value or value == float("inf"):
        raise UsageError("%s: %r must be a positive size" % (opt, text))
    return int(value * units[u])


def parse_duration(opt, text):
    """'30' or '30s' -> 30.0; '5m' -> 300.0; '1h' -> 3600.0; '500ms' -> 0.5."""
    t = text.strip().lower()
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    unit = "ms" if t.endswith("ms") else (t[-1:] if t[-1:].isalpha() else "s")
    num = t[: len(t) - len(unit)] if t[-1:].isalpha() else t
    try:
        value = float(num) * scale[unit]
    except (ValueError, KeyError):
        raise UsageError("%s: %r is not a duration (use e.g. 30, 30s, 5m, 1h)" % (opt, text)) from None
    if not value > 0 or value == float("inf"):
        raise UsageError("%s: %r must be a positive duration" % (opt, text))
    return value


def parse_int(opt, text, lo=None, hi=None):
    try:
        value = int(text, 10)
    except ValueError:
        raise UsageError("%s: %r is not a whole number" % (opt, text)) from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = "at least %d" % lo if hi is None else "from %d to %d" % (lo, hi)
        raise UsageError("%s: %r is out of range (%s)" % (opt, text, rng))
    return value


_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def check_name(opt, text, maxlen=63):
    if not text or len(text) > maxlen or not set(text) <= _NAME_CHARS or text[0] in ".-_":
        raise UsageError("%s: %r is not a valid name (letters, digits, '_', '.', '-'; at most %d, "
                         "starting with a letter or digit)" % (opt, text, maxlen))
    return text


def check_net(opt, text):
    if text == "host":
        raise UsageError("%s: 'host' (the host's own network) is not offered: every job has its own network "
                         "namespace (use bridge, none or a network NAME)" % opt)
    if text in RESERVED_NETS:
        return text
    if not text or len(text) > 63 or not set(text) <= _NAME_CHARS or text[0] in ".-_":
        raise UsageError("%s: %r is not bridge, none or a network name (letters, digits, '_', '.', '-'; "
                         "at most 63, starting with a letter or digit)" % (opt, text))
    return text


def check_hostname(opt, text):
    ok = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")
    if not text or len(text) > 63 or not set(text) <= ok or text[0] in "-." or text[-1] in "-.":
        raise UsageError("%s: %r is not a valid hostname (letters, digits, '-', '.'; at most 63)" % (opt, text))
    return text


def split_argv(argv):
    """Split run argv into ({dest: value or [values]}, command).  Everything
    after the first non-option word, or after '--', belongs to COMMAND."""
    seen = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            return seen, list(argv[i + 1:])
        if not a.startswith("-") or a == "-":
            return seen, list(argv[i:])
        if a in ("-h", "--help"):
            raise HelpRequested(run_help())
        if a == "--version":
            raise HelpRequested("jrun %s\n" % __version__)
        name, value = a, None
        if a.startswith("--") and "=" in a:
            name, value = a.split("=", 1)
        elif not a.startswith("--") and len(a) > 2:
            name, value = a[:2], a[2:]  # -eFOO=bar, -qv is not supported
        opt = _BY_NAME.get(name)
        if opt is None:
            raise UsageError("unknown option %r (see jrun --help)" % name)
        if opt.long in FLAG_OPTIONS:
            if value is not None:
                raise UsageError("%s takes no value" % opt.long)
            value = True
        elif value is None:
            i += 1
            if i >= len(argv):
                raise UsageError("%s needs a value (%s)" % (opt.long, opt.metavar))
            value = argv[i]
        if opt.choices and value not in opt.choices:
            raise UsageError("%s: %r is not one of %s" % (opt.long, value, ", ".join(opt.choices)))
        if opt.repeat:
            seen.setdefault(opt.dest, []).append(value)
        else:
            seen[opt.dest] = value
        i += 1
    return seen, []


class HelpRequested(Exception):
    """--help or --version: print the text and exit 0."""


def parse_run(argv, config=None):
    """argv (after 'run', if given) -> JobSpec.  Values are checked for form
    here; checks against this host are in validate()."""
    o, command = split_argv(argv)
    if not command:
        raise UsageError("no COMMAND given (usage: jrun [OPTIONS] [--] COMMAND [ARG...])")
    named = "name" in o
    job_id = check_name("--name", o["name"]) if named else os.urandom(6).hex()
    hostname = check_hostname("--hostname", o["hostname"]) if "hostname" in o else (
        job_id if all(c.isalnum() or c == "-" for c in job_id) else "jrun")
    level = "error" if o.get("quiet") else o.get("log_level", "info")
    limits = Limits(
        cpu=parse_int("--cpu", o["cpu"], 1) if "cpu" in o else None,
        cores=o.get("cores"),
        memory=parse_size("--memory", o["memory"]) if "memory" in o else None,
        io_bps=parse_size("--io-bps", o["io_bps"], default_unit=1) if "io_bps" in o else None,
        pids=parse_int("--pids", o["pids"], 1) if "pids" in o else None,
    )
    workdir = o.get("workdir", DEFAULT_WORKDIR)
    if not workdir.startswith("/") or "\0" in workdir:
        raise UsageError("-w/--workdir: %r must be an absolute path inside the job" % workdir)
    return JobSpec(
        id=job_id, named=named, command=tuple(command), hostname=hostname,
        timeout=parse_duration("--timeout", o["timeout"]) if "timeout" in o else None,
        stop_timeout=(parse_duration("--stop-timeout", o["stop_timeout"]) if "stop_timeout" in o
                      else DEFAULT_STOP_TIMEOUT),
        init=bool(o.get("init")), limits=limits,
        uploads=tuple(o.get("upload", ())), volumes=tuple(o.get("volume", ())),
        workdir=os.path.normpath(workdir), env=tuple(parse_env(o)),
        rootfs=o.get("rootfs", "minimal"), read_only=bool(o.get("read_only")),
        net=check_net("--net", o.get("net", "bridge")), user=o.get("user"),
        cap_add=tuple(o.get("cap_add", ())), cap_drop=tuple(o.get("cap_drop", ())),
        seccomp=o.get("seccomp", "default"), userns=bool(o.get("userns")),
        stats=bool(o.get("stats")), json_status=o.get("json_status"),
        cgroup_parent=o.get("cgroup_parent"), log_level=level,
        log_format=o.get("log_format", "text"),
    )


def parse_env(o):
    """-e and --env-file, in order of the command line; later wins."""
    out = {}
    for path in o.get("env_file", ()):
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise UsageError("--env-file: cannot read %r: %s" % (path, e.strerror)) from None
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("export "):
                line = line[7:].lstrip()
            key, eq, value = line.partition("=")
            if not eq or not _env_key_ok(key):
                raise UsageError("--env-file: %s:%d: expected KEY=VALUE" % (path, n))
            out[key] = value
    for item in o.get("env", ()):
        key, eq, value = item.partition("=")
        if not _env_key_ok(key):
            raise UsageError("-e/--env: %r is not KEY=VALUE or KEY" % item)
        if eq:
            out[key] = value
        elif key in os.environ:
            out[key] = os.environ[key]
    return out.items()


def _env_key_ok(key):
    return bool(key) and not key[0].isdigit() and all(c.isalnum() or c == "_" for c in key)


def run_help():
    lines = [
        "usage: jrun [OPTIONS] [--] COMMAND [ARG...]",
        "       jrun run [OPTIONS] [--] COMMAND [ARG...]",
        "       jrun ps [--json] | kill [-s SIGNAL] JOB | gc | verify [--json]",
        "       jrun rootfs build [--force] | rootfs path",
        "       jrun --version | --help",
        "",
        "Run COMMAND isolated (own PID, mount, UTS, IPC and network namespaces, a",
        "per-job root filesystem) in the foreground, and return its exit status.",
        "",
        "options:",
    ]
    for o in RUN_OPTIONS:
        flag = (o.short + ", " if o.short else "    ") + o.long + (" " + o.metavar if o.metavar else "")
        lines.append("  %-30s %s" % (flag, o.help) if len(flag) <= 30 else "  %s\n  %30s %s" % (flag, "", o.help))
    lines += [
        "  %-30s %s" % ("-h, --help", "show this help and exit"),
        "  %-30s %s" % ("    --version", "print the version and exit"),
        "",
        "exit status: COMMAND's own; 128+N killed by signal N; 137 out of memory;",
        "124 --timeout; 125 jrun failed; 126 not executable; 127 not found.",
        "See jrun(1).",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Validation: every check against this host, before the first side effect.
# ---------------------------------------------------------------------------


def rootfs_path(spec):
    return ROOTFS_DIR if spec.rootfs == "minimal" else spec.rootfs


def validate(spec):
    unsupported = []
    lim = spec.limits
    # Options whose implementation has not landed yet are refused, never
    # silently ignored.
    unsupported += [o for o, v in (("--cpu", lim.cpu), ("--cores", lim.cores), ("--memory", lim.memory),
                                   ("--io-bps", lim.io_bps), ("--pids", lim.pids), ("--stats", spec.stats),
                                   ("--json-status", spec.json_status),
                                   ("--cgroup-parent", spec.cgroup_parent)) if v]
    unsupported += [o for o, v in (("--upload", spec.uploads), ("-v/--volume", spec.volumes),
                                   ("--read-only", spec.read_only), ("--rootfs", spec.rootfs != "minimal")) if v]
    unsupported += [o for o, v in (("-u/--user", spec.user), ("--cap-add", spec.cap_add),
                                   ("--cap-drop", spec.cap_drop), ("--userns", spec.userns)) if v]
    if unsupported:
        raise UsageError("%s: not supported by this version of jrun yet" % ", ".join(unsupported))
    if os.geteuid() != 0:
        raise UsageError("must run as root (try: sudo jrun ...)")
    root = rootfs_path(spec)
    if not os.path.isfile(os.path.join(root, "bin/busybox")) and spec.rootfs == "minimal":
        raise SetupError("the minimal rootfs is not built at %s (run: sudo jrun rootfs build)" % root)
    if spec.init and not os.path.isfile(TINI):
        raise SetupError("--init needs %s (apt-get install tini)" % TINI)
    if os.uname().machine not in _SYSCALLS:
        raise SetupError("unsupported architecture %s (x86_64 and aarch64 are)" % os.uname().machine)


# ---------------------------------------------------------------------------
# Job state: /run/jrun/<id>, held by an flock for the job's whole life, so a
# dead job (its lock free) is told from a live one without guessing by pid.
# ---------------------------------------------------------------------------


class Teardown:
    """Undo steps, run in reverse order, each at most once, logging instead of
    raising (the same steps serve `jrun gc`)."""

    def __init__(self):
        self.steps = []

    def push(self, what, fn, *args):
        self.steps.append((what, fn, args))

    def run(self):
        while self.steps:
            what, fn, args = self.steps.pop()
            try:
                fn(*args)
                audit("teardown: %s" % what)
            except Exception as e:  # noqa: BLE001 - teardown must go on
                log("warning", "teardown: %s: %s" % (what, e))


class JobState:
    """The state directory of one job, in the parent (host namespaces)."""

    def __init__(self, job_id):
        self.id = job_id
        self.dir = os.path.join(STATE_DIR, job_id)
        self.lock_fd = None
        self.record = {}

    def create(self):
        os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
        for _ in range(3):
            try:
                os.mkdir(self.dir, 0o700)
                break
            except FileExistsError:
                other = JobState(self.id)
                if other.is_live():
                    raise UsageError("--name %s: a job with this name is already running" % self.id) from None
                gc_job(self.id)  # a dead job's leftovers: clean, then take the name
        else:
            raise SetupError("cannot create %s" % self.dir)
        self.lock_fd = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        audit("state: %s created and locked" % self.dir)

    def is_live(self):
        try:
            fd = os.open(os.path.join(self.dir, "lock"), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # Between mkdir and the lock a starting job has no lock file yet.
            try:
                return time.time() - os.stat(self.dir).st_mtime < 5
            except FileNotFoundError:
                return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def save(self, **fields):
        """Record what was created, so that gc can undo it after a crash."""
        self.record.update(fields)
        tmp = os.path.join(self.dir, "job.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(dumps_json(self.record) + "\n")
        os.rename(tmp, os.path.join(self.dir, "job.json"))

    def load(self):
        import json

        try:
            with open(os.path.join(self.dir, "job.json"), encoding="utf-8") as f:
                self.record = json.load(f)
        except (OSError, ValueError):
            self.record = {}
        return self.record

    def remove(self):
        for name in ("job.json", "job.json.tmp", "root", "lock"):
            p = os.path.join(self.dir, name)
            try:
                os.rmdir(p) if name == "root" else os.unlink(p)
            except FileNotFoundError:
                pass
        os.rmdir(self.dir)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


# ---------------------------------------------------------------------------
# Host resources.  One small class per resource, all with the same verbs:
#   setup(state)   parent, before the fork; records in state what it made
#   attach(pid)    parent, once the child has its namespaces, before release
#   check(spec)    parent, classmethod, before the first side effect
#   enter()        child, after release, before the root is built
#   etc_files()    child, while the root is built: files such as /etc/hosts
#   collect(out)   parent, after the job ended (accounting)
#   teardown()     parent or gc; idempotent, logs instead of raising
# ---------------------------------------------------------------------------


class Resource:
    name = "resource"

    def __init__(self, spec):
        self.spec = spec

    @classmethod
    def check(cls, spec):
        """Parent, before the first side effect: refuse (UsageError,
        SetupError) what this host cannot give the job."""

    def setup(self, state):
        pass

    def attach(self, pid):
        pass

    def enter(self):
        pass

    def etc_files(self):
        """Child: {path in the root: content} written while the root is built."""
        return {}

    def collect(self, out):
        pass

    def teardown(self):
        pass

    @classmethod
    def from_state(cls, record):
        """Rebuild from a dead job's job.json so gc can tear it down; None
        if the job made nothing of this kind."""
        return None


def host_resources(spec):
    """The resources a job needs, in setup order (torn down in reverse)."""
    return [Network(spec)] if spec.net != "none" else []


# ---------------------------------------------------------------------------
# Network.  Runs in the parent, as root, in the host's namespaces (attach()
# borrows the job's network namespace for one socket).  Every netlink message
# is encoded and decoded by pyroute2; jrun only sends a batch and reads the
# acks.  Shared state (leases, which bridges exist, the nftables table) lives
# in /run/jrun/.net, changed only under the flock of that directory, so that
# concurrent jruns never collide and no daemon is needed.
# ---------------------------------------------------------------------------


def network_config():
    """The subnets jrun's networks use: the default bridge's and the pool the
    named networks take a /24 each from.  One function, so that the config
    file (/etc/jrun/jrun.toml) can feed it; validated by Network.check."""
    return {"subnet": DEFAULT_SUBNET, "pool": DEFAULT_NET_POOL}


def parse_ip(text):
    """'172.31.254.1' -> int; ValueError unless four decimal octets."""
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 and int(p) < 256 for p in parts):
        raise ValueError(text)
    return int(parts[0]) << 24 | int(parts[1]) << 16 | int(parts[2]) << 8 | int(parts[3])


def format_ip(n):
    return "%d.%d.%d.%d" % (n >> 24, n >> 16 & 255, n >> 8 & 255, n & 255)


def parse_subnet(what, text):
    """'172.31.254.0/24' -> (network int, prefix length), for /8 to /29."""
    addr, slash, plen = text.partition("/")
    try:
        net, plen = parse_ip(addr), int(plen)
    except ValueError:
        raise UsageError("%s: %r is not an IPv4 subnet (use e.g. %s)" % (what, text, DEFAULT_SUBNET)) from None
    if not slash or not 8 <= plen <= 29:
        raise UsageError("%s: %r: the prefix length must be from /8 to /29" % (what, text))
    if net & ~_mask(plen) & 0xFFFFFFFF:
        raise UsageError("%s: %r has host bits set (did you mean %s/%d?)"
                         % (what, text, format_ip(net & _mask(plen)), plen))
    return net, plen


def _mask(plen):
    return (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF


def subnets_overlap(a, b):
    plen = min(a[1], b[1])
    return a[0] & _mask(plen) == b[0] & _mask(plen)


def bridge_name(net):
    """The host bridge of a network.  Every jrun bridge starts with 'jrun' and
    no job veth does ('jr' + hex), so each is told apart by name alone; a
    hash keeps any NAME within IFNAMSIZ (15) and free of odd characters."""
    if net == "bridge":
        return DEFAULT_BRIDGE
    import hashlib

    return "jrun-" + hashlib.blake2s(net.encode(), digest_size=5).hexdigest()


def veth_name(job_id):
    """The host end of a job's veth pair: 'jr' + 10 hex, unique per live job."""
    import hashlib

    return "jr" + hashlib.blake2s(job_id.encode(), digest_size=5).hexdigest()


def named_subnet(name, pool, used):
    """A /24 from the pool for a named network: the same one for the same
    NAME whenever it is free, else the next free one; None if none is.
    `used` holds the subnets that are taken (other networks, host routes)."""
    import hashlib

    count = 1 << max(0, NAMED_PREFIXLEN - pool[1])
    start = int.from_bytes(hashlib.blake2s(name.encode(), digest_size=4).digest(), "big") % count
    for i in range(count):
        cand = (pool[0] + ((start + i) % count << (32 - NAMED_PREFIXLEN)), NAMED_PREFIXLEN)
        if not any(subnets_overlap(cand, u) for u in used):
            return cand
    return None


def nft_ruleset(networks):
    """The whole `inet jrun` table for the networks that exist now, as nft
    input; [] of networks deletes it.  The table is replaced in one
    transaction: 'add; flush; define' is idempotent, and 3 ms when the table
    is new where 'add; delete; define' takes 16 ms (the chains keep their
    hooks, so the kernel waits for no RCU grace period).

    networks: [(bridge, 'a.b.c.d/n', isolated)].  inet, not ip: a job also
    has an IPv6 link-local address, and the host's services listen on [::]
    too."""
    if not networks:
        return "add table %s\ndelete table %s\n" % (NFT_TABLE, NFT_TABLE)
    head = "add table %s\nflush table %s\n" % (NFT_TABLE, NFT_TABLE)
    bridges = "{ %s }" % ", ".join('"%s"' % b for b, _, _ in networks)
    rules = [
        "table %s {" % NFT_TABLE,
        # A job reaches nothing of the host itself (gateway, other host
        # addresses, [::]); replies to connections the host opened pass.
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        "    iifname %s ct state established,related accept" % bridges,
        "    iifname %s drop" % bridges,
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        # No IPv6 is routed for jobs, and no job sends from an address that is
        # not its network's (it is root in its netns and could try).
        "    iifname %s meta nfproto ipv6 drop" % bridges,
    ]
    rules += ['    iifname "%s" ip saddr != %s drop' % (b, s) for b, s, _ in networks]
    rules.append("    oifname %s ct state established,related accept" % bridges)
    # br_netfilter (loaded by docker and others) passes bridged frames through
    # this hook as bridge -> same bridge: jobs of a named network talk; on the
    # isolated default bridge the same path is a job routing to another job
    # through the host, which must not pass.
    rules += ['    iifname "%s" oifname "%s" accept' % (b, b) for b, _, iso in networks if not iso]
    # Nothing else starts a connection into a jrun network: not another
    # network's job, not the LAN.
    rules += ["    oifname %s drop" % bridges, "  }",
              "  chain postrouting {",
              "    type nat hook postrouting priority srcnat; policy accept;"]
    rules += ['    ip saddr %s oifname != "%s" masquerade' % (s, b) for b, s, _ in networks]
    rules += ["  }", "}"]
    return head + "\n".join(rules) + "\n"


def host_resolvers(conf="/etc/resolv.conf", upstream=RESOLVED_UPSTREAM):
    """/etc/resolv.conf for a job: the host's upstream resolvers.  A 127.0.0.x
    stub (systemd-resolved, dnsmasq) is unreachable from the job's network
    namespace, so resolved's upstream list is used instead, and loopback and
    IPv6 nameservers (jobs have no IPv6 route) are dropped."""
    text = _read_text(conf)
    servers = [ln.split()[1] for ln in text.splitlines() if ln.split()[:1] == ["nameserver"] and len(ln.split()) > 1]
    if any(s.startswith("127.") for s in servers) and os.path.isfile(upstream):
        text = _read_text(upstream)
    out = ["# written by jrun from the host's resolvers"]
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith(("#", ";")):
            continue
        if words[0] == "nameserver":
            try:
                if len(words) < 2 or parse_ip(words[1]) >> 24 == 127:
                    continue
            except ValueError:
                continue  # IPv6
        elif words[0] not in ("search", "domain", "options"):
            continue
        out.append(" ".join(words))
    return "\n".join(out) + "\n"


def _read_text(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _pyroute2():
    """pyroute2's rtnetlink message modules, and nothing else of pyroute2.

    `import pyroute2` (and so any pyroute2.x.y) first runs the package's
    __init__, which imports every protocol the library speaks, asyncio,
    ssl and multiprocessing among them: 133 ms here, more than four whole
    --net none jobs.  The three message modules need none of it (36 ms), so
    the package is registered without running its __init__ unless it was
    already imported."""
    if "pyroute2" not in sys.modules:
        for d in sys.path:
            path = os.path.join(d or ".", "pyroute2")
            if os.path.isfile(os.path.join(path, "__init__.py")):
                pkg = type(sys)("pyroute2")
                pkg.__path__ = [path]
                pkg.__file__ = os.path.join(path, "__init__.py")
                sys.modules["pyroute2"] = pkg
                break
        else:
            raise SetupError("--net: pyroute2 is not installed (pip install pyroute2; or use --net none)")
    from pyroute2.netlink.rtnl import ifaddrmsg, ifinfmsg, rtmsg

    return ifinfmsg.ifinfmsg, ifaddrmsg.ifaddrmsg, rtmsg.rtmsg


class Netlink:
    """An rtnetlink socket in the host's network namespace or, with netns_fd,
    in a job's.  pyroute2 encodes and decodes the messages; this class sends
    a batch in one datagram and reads the kernel's acks."""

    # <linux/netlink.h>, <linux/rtnetlink.h>
    F_REQUEST, F_ACK, F_EXCL, F_CREATE, F_DUMP = 1, 4, 0x200, 0x400, 0x300
    ERROR, DONE = 2, 3
    NEWLINK, DELLINK, GETLINK, NEWADDR, NEWROUTE, GETROUTE = 16, 17, 18, 20, 24, 26

    def __init__(self, netns_fd=None):
        import socket

        self.link, self.addr, self.route = _pyroute2()
        host_ns = None
        if netns_fd is not None:
            # A netlink socket stays in the namespace it was created in: enter
            # the job's just long enough to create it (the parent is single
            # threaded, so nothing else runs in the job's namespace meanwhile).
            host_ns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            setns(netns_fd, CLONE_NEWNET)
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        finally:
            if host_ns is not None:
                setns(host_ns, CLONE_NEWNET)
                os.close(host_ns)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self):
        self.sock.close()

    def message(self, cls, mtype, nlflags=0, attrs=(), **fields):
        """A pyroute2 message of class cls (fields: the struct's, e.g.
        index=, flags=), encoded, with the next sequence number."""
        msg = cls()
        for k, v in fields.items():
            msg[k] = v
        msg["attrs"] = list(attrs)
        self.seq += 1
        msg["header"]["type"] = mtype
        msg["header"]["flags"] = self.F_REQUEST | nlflags
        msg["header"]["sequence_number"] = self.seq
        msg.encode()
        return msg

    def do(self, *requests):
        """Send requests [(what, message)] in one datagram (the kernel
        handles them in order); raise OSError naming the first that failed."""
        import struct

        self.sock.send(b"".join(bytes(m.data) for _, m in requests))
        whats = {m["header"]["sequence_number"]: w for w, m in requests}
        errors = {}
        while whats.keys() - errors.keys():
            data = self.sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _, seq, _ = struct.unpack_from("IHHII", data, off)
                if mtype == self.ERROR and seq in whats:
                    errors[seq] = -struct.unpack_from("i", data, off + 16)[0]
                off += (length + 3) & ~3
        for seq in sorted(errors):
            if errors[seq]:
                raise OSError(errors[seq], "%s: %s" % (whats[seq], os.strerror(errors[seq])))

    def dump(self, cls, mtype, **fields):
        """A dump request; the decoded messages of the reply."""
        import struct

        req = self.message(cls, mtype, self.F_DUMP, **fields)
        self.sock.send(bytes(req.data))
        out = []
        while True:
            data = self.sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, rtype, _, seq, _ = struct.unpack_from("IHHII", data, off)
                if rtype == self.DONE:
                    return out
                if rtype == self.ERROR:
                    err = -struct.unpack_from("i", data, off + 16)[0]
                    raise OSError(err, "netlink dump: %s" % os.strerror(err))
                msg = cls(data[off:off + length])
                msg.decode()
                out.append(msg)
                off += (length + 3) & ~3

    def up(self, index, **more):
        return self.message(self.link, self.NEWLINK, self.F_ACK, index=index, flags=1, change=1, **more)


class _NetLock:
    """The flock of /run/jrun/.net: held while leases, bridges or the nft
    table change.  The directory is removed, under the lock, when no network
    is left; whoever locked it meanwhile notices and retries."""

    def __enter__(self):
        while True:
            os.makedirs(NET_DIR, mode=0o700, exist_ok=True)
            fd = os.open(NET_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(NET_DIR).st_ino == os.fstat(fd).st_ino:
                    self.fd = fd
                    return self
            except FileNotFoundError:
                pass
            os.close(fd)

    def __exit__(self, *exc):
        try:
            os.rmdir(NET_DIR)
        except OSError:
            pass
        os.close(self.fd)


class NetFile:
    """/run/jrun/.net/<bridge>: one network's subnet and leases, as lines
    ('name N', 'subnet S', 'next IP', 'lease IP JOB'); read and written only
    under _NetLock."""

    def __init__(self, bridge, name=None, subnet=None):
        self.bridge, self.name, self.subnet = bridge, name, subnet
        self.path = os.path.join(NET_DIR, bridge)
        self.leases = {}
        self.next = None

    @classmethod
    def load(cls, bridge):
        self = cls(bridge)
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return None
        for line in lines:
            w = line.split()
            if w[:1] == ["name"] and len(w) == 2:
                self.name = w[1]
            elif w[:1] == ["subnet"] and len(w) == 2:
                self.subnet = parse_subnet(self.path, w[1])
            elif w[:1] == ["next"] and len(w) == 2:
                self.next = parse_ip(w[1])
            elif w[:1] == ["lease"] and len(w) == 3:
                self.leases[parse_ip(w[1])] = w[2]
        return self if self.subnet else None

    @staticmethod
    def all():
        try:
            names = sorted(os.listdir(NET_DIR))
        except FileNotFoundError:
            return []
        return [f for f in (NetFile.load(n) for n in names if n.startswith("jrun") and "." not in n) if f]

    def save(self):
        lines = ["name %s" % self.name, "subnet %s" % self.cidr]
        if self.next is not None:
            lines.append("next %s" % format_ip(self.next))
        lines += ["lease %s %s" % (format_ip(ip), job) for ip, job in sorted(self.leases.items())]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.rename(tmp, self.path)

    def remove(self):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    @property
    def cidr(self):
        return "%s/%d" % (format_ip(self.subnet[0]), self.subnet[1])

    @property
    def gateway(self):
        return self.subnet[0] + 1

    def prune(self, keep=None):
        """Forget the leases of jobs that are no longer running."""
        for ip, job in list(self.leases.items()):
            if job != keep and not JobState(job).is_live():
                del self.leases[ip]

    def allocate(self, job_id):
        """The next free address after the last one given (so a just-freed
        address, still in conntrack and neighbour caches, is reused last);
        network, gateway and broadcast are never given."""
        first, last = self.subnet[0] + 2, self.subnet[0] + (1 << (32 - self.subnet[1])) - 2
        size = last - first + 1
        start = self.next if self.next is not None and first <= self.next <= last else first
        for i in range(size):
            ip = first + (start - first + i) % size
            if ip not in self.leases:
                self.leases[ip] = job_id
                self.next = first + (ip - first + 1) % size
                return ip
        raise SetupError("--net %s: no free address left in %s (%d jobs running on it)"
                         % (self.name, self.cidr, len(self.leases)))


def _run_nft(ruleset):
    """nftables through the nft CLI: pyroute2's nftables module encodes only
    raw expressions, and a masquerade plus ct-state rules written as raw
    netlink expressions would be far harder to review than the ruleset text.
    nft is the host's PID namespace's child: jrun calls it only before the
    fork or after setns back."""
    import subprocess

    p = subprocess.run([_nft_path(), "-f", "-"], input=ruleset, capture_output=True, text=True, close_fds=True)
    if p.returncode != 0:
        raise SetupError("nft: %s" % (p.stderr.strip() or "exit %d" % p.returncode))


def _nft_path():
    return next((p for p in NFT_PATHS if os.access(p, os.X_OK)), None)


def _sync_nft(without=None):
    """Make the `inet jrun` table match the networks that exist (lock held)."""
    nets = [(f.bridge, f.cidr, f.bridge == DEFAULT_BRIDGE) for f in NetFile.all() if f.bridge != without]
    _run_nft(nft_ruleset(nets))
    audit("nft: table %s %s" % (NFT_TABLE, "holds %d network(s)" % len(nets) if nets else "deleted"))


def _host_routes_overlapping(nl, subnet, own_bridge=None):
    """The host's IPv4 routes (all tables, default routes aside) that overlap
    subnet, as 'dst/len' strings; routes through own_bridge are jrun's own.
    (Told by the device's name after the dump: a concurrent jrun may create
    the bridge while this one looks.)"""
    import socket

    out = []
    for r in nl.dump(nl.route, Netlink.GETROUTE, family=2):
        plen = r["dst_len"]
        dst = r.get_attr("RTA_DST")
        if plen == 0 or dst is None or ":" in dst:
            continue
        if not subnets_overlap((parse_ip(dst) & _mask(plen), plen), subnet):
            continue
        oif = r.get_attr("RTA_OIF")
        if oif is not None and own_bridge is not None:
            try:
                if socket.if_indextoname(oif) == own_bridge:
                    continue
            except OSError:
                continue  # its device is gone, and the route with it
        out.append("%s/%d" % (dst, plen))
    return out


def _ifindex(name):
    import socket

    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


_host_nl = []


def _net_error(net, e):
    """An OSError of a network step as jrun's one-line message."""
    what = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], str) else str(e)
    return SetupError("--net %s: %s%s" % (net, what, ": %s" % e.filename if e.filename else ""))


def _host_netlink():
    """The parent's one rtnetlink socket in the host's namespace."""
    if not _host_nl:
        _host_nl.append(Netlink())
    return _host_nl[0]


def _delete_link(nl, name):
    """Delete a network device; False if it was gone already (a veth goes
    with the job's namespace, when that dies first)."""
    index = _ifindex(name)
    if index is None:
        return False
    try:
        nl.do(("delete %s" % name, nl.message(nl.link, nl.DELLINK, nl.F_ACK, index=index)))
    except OSError as e:
        if e.errno != errno.ENODEV:
            raise
        return False
    return True


def _remove_network(nl, f):
    """No job is left on f's network: its bridge, rules and file go (lock
    held).  The file goes last, so a crash in between leaves it for gc."""
    if _delete_link(nl, f.bridge):
        audit("network %s: bridge %s deleted (no job left on it)" % (f.name, f.bridge))
    _sync_nft(without=f.bridge)
    f.remove()


def _enable_forwarding():
    """NAT needs the host to forward IPv4, as for docker, podman and libvirt.
    It is left on when the last network goes: another tool that started
    meanwhile may rely on it."""
    path = "/proc/sys/net/ipv4/ip_forward"
    with open(path) as f:
        if f.read().strip() == "1":
            return
    with open(path, "w") as f:
        f.write("1\n")
    log("info", "net.ipv4.ip_forward set to 1 (needed for the jobs' NAT)")


class Network(Resource):
    """The job's network: its own namespace (made by the child) with an eth0
    whose other end is a port of the network's host bridge, an address from
    the network's leases, a default route through the bridge, NAT out.

    check()     parent, before any side effect: the subnet is free on the host
    setup()     parent, before the fork: lease, bridge and nft rules on demand
    attach()    parent, child waiting: the veth pair, eth0 in the child's
                namespace addressed and up, default route
    etc_files() child: /etc/hosts and /etc/resolv.conf for its root
    teardown()  parent or gc: veth, lease, and the bridge and nft rules
                when no job is left on the network"""

    name = "network"

    def __init__(self, spec, job_id=None):
        super().__init__(spec)
        self.job = spec.id if spec else job_id
        self.net = spec.net if spec else None
        self.bridge = bridge_name(self.net) if spec else None
        self.veth = veth_name(self.job)
        self.address = None
        self.net_file = None
        self.resolv = ""
        self.nl = None

    # -- parent, before any side effect -------------------------------------

    @classmethod
    def check(cls, spec):
        if spec.net == "none":
            return
        cfg = network_config()
        subnet = parse_subnet("network subnet", cfg["subnet"])
        pool = parse_subnet("network pool", cfg["pool"])
        if pool[1] > NAMED_PREFIXLEN:
            raise UsageError("network pool: %r is smaller than one /%d" % (cfg["pool"], NAMED_PREFIXLEN))
        if not _nft_path():
            raise SetupError("--net %s: nft not found (apt-get install nftables, or use --net none)" % spec.net)
        if spec.net != "bridge":
            return  # a named network's subnet is chosen free when it is made
        try:
            clash = _host_routes_overlapping(_host_netlink(), subnet, DEFAULT_BRIDGE)
        except OSError as e:
            raise _net_error(spec.net, e) from None
        if clash:
            raise UsageError("--net bridge: the jrun subnet %s overlaps the host's route to %s "
                             "(use --net NAME, which picks a free subnet, or --net none)" % (cfg["subnet"], clash[0]))

    # -- parent, before the fork --------------------------------------------

    def setup(self, state):
        try:
            self.nl = _host_netlink()
            with _NetLock():
                self._lease(state)
        except BaseException as e:
            self.teardown()
            if isinstance(e, OSError):
                raise _net_error(self.net, e) from None
            raise
        self.resolv = host_resolvers()

    def _lease(self, state):
        f = NetFile.load(self.bridge)
        new = f is None
        if new:
            f = self._new_network()
        elif f.name != self.net:
            raise SetupError("--net %s: its bridge name %s is taken by network %s (rename one of them)"
                             % (self.net, self.bridge, f.name))
        f.prune(keep=self.job)
        self.address = f.allocate(self.job)
        self.net_file = f
        # Recorded before anything is made, so that gc finds all of it.
        state.save(net_bridge=self.bridge, net_veth=self.veth, net_address=format_ip(self.address))
        f.save()
        missing = _ifindex(self.bridge) is None
        if new or missing:
            # Rules first: a bridge never exists without them, whenever a
            # jrun may have been killed.
            _sync_nft()
            _enable_forwarding()
        if missing:
            self._create_bridge(f)
        audit("network %s: address %s/%d leased on %s" % (self.net, format_ip(self.address), f.subnet[1],
                                                          self.bridge))

    def _new_network(self):
        cfg = network_config()
        if self.net == "bridge":
            subnet = parse_subnet("network subnet", cfg["subnet"])
        else:
            used = [f.subnet for f in NetFile.all()] + [parse_subnet("network subnet", cfg["subnet"])]
            used += [(parse_ip(r.split("/")[0]), int(r.split("/")[1]))
                     for r in _host_routes_overlapping(self.nl, parse_subnet("network pool", cfg["pool"]))]
            subnet = named_subnet(self.net, parse_subnet("network pool", cfg["pool"]), used)
            if subnet is None:
                raise SetupError("--net %s: no free /%d left in the network pool %s"
                                 % (self.net, NAMED_PREFIXLEN, cfg["pool"]))
        return NetFile(self.bridge, self.net, subnet)

    def _create_bridge(self, f):
        nl = self.nl
        mac = "06:6a:72:" + ":".join("%02x" % b for b in os.urandom(3))  # jobs' are 02:6a:...
        nl.do(("create bridge %s" % self.bridge,
               nl.message(nl.link, nl.NEWLINK, nl.F_ACK | nl.F_CREATE | nl.F_EXCL, flags=1, change=1, attrs=[
                   ("IFLA_IFNAME", self.bridge),
                   # A fixed MAC: a bridge otherwise takes its lowest port's,
                   # and every job joining or leaving would change the
                   # gateway's MAC under the others' ARP caches.
                   ("IFLA_ADDRESS", mac),
                   ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "bridge")]})])))
        index = _ifindex(self.bridge)
        bcast = f.subnet[0] | (~_mask(f.subnet[1]) & 0xFFFFFFFF)
        nl.do(("address %s on %s" % (format_ip(f.gateway), self.bridge),
               nl.message(nl.addr, nl.NEWADDR, nl.F_ACK | nl.F_CREATE | nl.F_EXCL, family=2,
                          prefixlen=f.subnet[1], index=index, attrs=[
                              ("IFA_LOCAL", format_ip(f.gateway)), ("IFA_ADDRESS", format_ip(f.gateway)),
                              ("IFA_BROADCAST", format_ip(bcast))])))
        audit("network %s: bridge %s created, gateway %s/%d" % (self.net, self.bridge, format_ip(f.gateway),
                                                                 f.subnet[1]))

    # -- parent, child waiting in its namespaces ------------------------------

    def attach(self, pid):
        """The veth pair is made here, with its job end created straight
        inside the child's namespace as eth0: moving a device between
        namespaces costs a 20 ms RCU grace period here, creating it there
        costs nothing extra.  (Teardown, registered at setup, undoes it.)"""
        try:
            self._attach(pid)
        except OSError as e:
            raise _net_error(self.net, e) from None

    def _attach(self, pid):
        nl, f, ip = self.nl, self.net_file, self.address
        ns = os.open("/proc/%d/ns/net" % pid, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # The job's MAC follows from its address (docker's old rule), so
            # an address given to a new job never meets a stale neighbour
            # entry of the job that had it before.
            mac = "02:6a:%02x:%02x:%02x:%02x" % (ip >> 24, ip >> 16 & 255, ip >> 8 & 255, ip & 255)
            reqs = [("create veth %s" % self.veth,
                     nl.message(nl.link, nl.NEWLINK, nl.F_ACK | nl.F_CREATE | nl.F_EXCL, flags=1, change=1,
                                attrs=[("IFLA_IFNAME", self.veth), ("IFLA_MASTER", _ifindex(self.bridge)),
                                       ("IFLA_LINKINFO", {"attrs": [
                                           ("IFLA_INFO_KIND", "veth"),
                                           ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", {"attrs": [
                                               ("IFLA_IFNAME", "eth0"), ("IFLA_ADDRESS", mac),
                                               ("IFLA_NET_NS_FD", ns)]})]})]})]))]
            if self.bridge == DEFAULT_BRIDGE:
                # Isolated ports forward only to non-isolated ones (the
                # bridge itself): jobs on the default bridge never see each
                # other.
                reqs.append(("isolate port %s" % self.veth,
                             nl.message(nl.link, nl.NEWLINK, nl.F_ACK, attrs=[
                                 ("IFLA_IFNAME", self.veth),
                                 ("IFLA_LINKINFO", {"attrs": [
                                     ("IFLA_INFO_SLAVE_KIND", "bridge"),
                                     ("IFLA_INFO_SLAVE_DATA", {"attrs": [("IFLA_BRPORT_ISOLATED", 1)]})]})])))
            nl.do(*reqs)
            audit("network %s: veth %s on %s%s, its other end eth0 in the job's network namespace"
                  % (self.net, self.veth, self.bridge, " (isolated port)" if len(reqs) > 1 else ""))
            job = Netlink(netns_fd=ns)
        finally:
            os.close(ns)
        try:
            eth0 = [m["index"] for m in job.dump(job.link, job.GETLINK) if m.get_attr("IFLA_IFNAME") == "eth0"][0]
            bcast = f.subnet[0] | (~_mask(f.subnet[1]) & 0xFFFFFFFF)
            job.do(("address %s on eth0" % format_ip(ip),
                    job.message(job.addr, job.NEWADDR, job.F_ACK | job.F_CREATE | job.F_EXCL, family=2,
                                prefixlen=f.subnet[1], index=eth0, attrs=[
                                    ("IFA_LOCAL", format_ip(ip)), ("IFA_ADDRESS", format_ip(ip)),
                                    ("IFA_BROADCAST", format_ip(bcast))])),
                   ("eth0 up", job.up(eth0)),
                   ("default route via %s" % format_ip(f.gateway),
                    job.message(job.route, job.NEWROUTE, job.F_ACK | job.F_CREATE | job.F_EXCL, family=2,
                                dst_len=0, table=254, proto=3, scope=0, type=1, attrs=[
                                    ("RTA_GATEWAY", format_ip(f.gateway)), ("RTA_OIF", eth0)])))
        finally:
            job.close()
        audit("network: eth0 %s/%d up, default route via %s" % (format_ip(ip), f.subnet[1], format_ip(f.gateway)))
        audit("network: ready")

    # -- child ----------------------------------------------------------------

    def etc_files(self):
        return {
            "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                         "%s\t%s\n" % (format_ip(self.address), self.spec.hostname),
            "etc/resolv.conf": self.resolv,
        }

    # -- parent after the job, or gc ------------------------------------------

    def teardown(self):
        try:
            self._teardown()
        except (JrunError, OSError) as e:
            log("warning", "network teardown of job %s: %s (run: jrun gc)" % (self.job, e))

    def _teardown(self):
        nl = self.nl or _host_netlink()
        with _NetLock():
            if _delete_link(nl, self.veth):
                audit("network: veth %s deleted" % self.veth)
            else:
                audit("network: veth %s went with the job's network namespace" % self.veth)
            f = NetFile.load(self.bridge) if self.bridge else None
            if f is None:
                return
            for ip, job in list(f.leases.items()):
                if job == self.job:
                    del f.leases[ip]
                    audit("network: address %s released" % format_ip(ip))
            f.prune()
            if f.leases:
                f.save()
            else:
                _remove_network(nl, f)

    @classmethod
    def from_state(cls, record):
        if not record.get("net_veth") or not record.get("id"):
            return None
        self = cls(None, job_id=record["id"])
        self.bridge = record.get("net_bridge")
        return self


def _is_job_veth(name):
    return len(name) == 12 and name[:2] == "jr" and all(c in "0123456789abcdef" for c in name[2:])


def _net_devices():
    try:
        return os.listdir("/sys/class/net")
    except OSError:
        return []


def gc_networks():
    """What crashed jobs left of the networks: leases of dead jobs, bridges
    and files of networks no job uses, veths of no running job, and the nft
    table when no network is left."""
    # Devices first, jobs second: a job's state exists before its veth, so
    # every veth listed belongs to a job listed after it, if that still runs.
    veths = [n for n in _net_devices() if _is_job_veth(n)]
    try:
        jobs = [n for n in os.listdir(STATE_DIR) if not n.startswith(".")]
    except FileNotFoundError:
        jobs = []
    live = {veth_name(j) for j in jobs if JobState(j).is_live()}
    orphans = [n for n in veths if n not in live]
    if not os.path.isdir(NET_DIR) and not orphans:
        return []
    nl = _host_netlink()
    done = []
    with _NetLock():
        done += ["veth %s" % name for name in orphans if _delete_link(nl, name)]
        for f in NetFile.all():
            before = len(f.leases)
            f.prune()
            if not f.leases:
                _remove_network(nl, f)
                done.append("network %s (bridge %s)" % (f.name, f.bridge))
            elif len(f.leases) != before:
                f.save()
                done.append("%d lease(s) on %s" % (before - len(f.leases), f.bridge))
        for name in os.listdir(NET_DIR):
            if name.endswith(".tmp"):
                os.unlink(os.path.join(NET_DIR, name))
        if NetFile.all() or done:
            _sync_nft()  # also puts the rules back after a firewall reload flushed them
    return done


RESOURCE_CLASSES = (Network,)


# ---------------------------------------------------------------------------
# The child.  Runs as root, forked from jrun, PID 1 of the job's new PID
# namespace.  A flat list of steps; it never returns into parent code: it
# execs COMMAND or reports an error through the close-on-exec status pipe and
# exits.
# ---------------------------------------------------------------------------


def _safe_mkdirs(root, rel, mode=0o755):
    """Make root/rel a real directory, component by component, never
    following a symlink: a hostile rootfs whose 'proc' or 'tmp' is a symlink
    pointing outside gets it replaced (in the job's own writable layer)."""
    path = root
    for comp in rel.strip("/").split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            raise SetupError("%r: '..' is not allowed in a path inside the job" % rel)
        path = os.path.join(path, comp)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, mode)
            continue
        import stat

        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path)
            os.mkdir(path, mode)
    return path


def _safe_file(root, rel, mode=0o644, content=None):
    """Make root/rel a regular file (for a bind mount target or a generated
    /etc file), with the same no-symlink rule as _safe_mkdirs."""
    parent = _safe_mkdirs(root, os.path.dirname(rel.strip("/")))
    path = os.path.join(parent, os.path.basename(rel))
    try:
        st = os.lstat(path)
        import stat

        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(path)
            else:
                os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise SetupError("cannot prepare %s in the job's root: %s" % (rel, e.strerror)) from None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        if content:
            os.write(fd, content.encode())
    finally:
        os.close(fd)
    return path


class ChildPlan(_Frozen):
    """What the child needs beyond the JobSpec, computed by the parent."""

    __slots__ = ("spec", "state_dir", "status_w", "sync_r", "parent_pid", "sigmask", "resources")


def _report(fd, code, msg):
    try:
        os.write(fd, ("E%d %s\n" % (code, msg)).encode("utf-8", "replace"))
    except OSError:
        pass


def child_main(plan):
    """Entry of the forked child.  Never returns."""
    try:
        try:
            child_steps(plan)
        except JrunError as e:
            _report(plan.status_w, e.exit_code, str(e))
            os._exit(e.exit_code)
        except OSError as e:
            _report(plan.status_w, EXIT_JRUN, "job setup: %s" % (e.strerror if not e.args[1:] else e.args[1]))
            os._exit(EXIT_JRUN)
        except BaseException as e:  # noqa: BLE001 - the child must never return
            _report(plan.status_w, EXIT_JRUN, "job setup: %s: %s" % (type(e).__name__, e))
            os._exit(EXIT_JRUN)
    finally:
        os._exit(EXIT_JRUN)


def child_steps(plan):
    spec = plan.spec
    import prctl

    # If jrun dies, even by SIGKILL, the job dies with it; and the PID
    # namespace collapses with its PID 1.
    # (getppid() is 0 here: the parent lives outside our PID namespace; a
    # parent that died before this point closes the sync pipe instead.)
    prctl.set_pdeathsig(signal.SIGKILL)
    unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET)
    audit("namespaces created: pid (PID %d inside), mount, uts, ipc, net" % os.getpid())
    loopback_up()
    audit("network: lo up")
    os.write(plan.status_w, b"R\n")
    # Wait until the parent has put us in our cgroup and network.  EOF
    # without "G" means the parent gave up: exit quietly.
    if os.read(plan.sync_r, 1) != b"G":
        os._exit(EXIT_JRUN)
    os.close(plan.sync_r)
    for res in plan.resources:
        res.enter()

    mount(None, "/", None, MS_REC | MS_PRIVATE)
    audit("mounts made private (recursively) before anything was mounted")
    root = build_root(spec, plan.state_dir, plan.resources)
    pivot_into(root)
    mount_proc_and_sys()
    sethostname(spec.hostname)
    audit("hostname set to %s" % spec.hostname)

    env = job_environment(spec)
    argv = resolve_command(spec, env)
    try:
        os.chdir(spec.workdir)
    except OSError as e:
        raise SetupError("-w/--workdir %s: %s" % (spec.workdir, e.strerror)) from None
    close_inherited_fds(plan.status_w)
    os.setsid()
    audit("new session: the job has no controlling terminal (TIOCSTI, CVE-2017-5226)")
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # ignored by Python, not by COMMAND
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, plan.sigmask)
    drop_privileges(spec)
    audit("exec %s" % " ".join(argv))
    try:
        os.execve(argv[0], argv, env)
    except OSError as e:
        code = EXIT_NOTFOUND if e.errno == errno.ENOENT else EXIT_NOEXEC
        hint = " (a script whose interpreter is missing from the job's root?)" if code == EXIT_NOTFOUND else ""
        raise (NotFound if code == EXIT_NOTFOUND else NotExecutable)(
            "%s: cannot execute: %s%s" % (spec.command[0], e.strerror, hint)) from None


def build_root(spec, state_dir, resources=()):
    """The job's root: an overlay whose lower layer is the shared prebuilt
    rootfs (never modified) and whose upper layer lives on a tmpfs inside the
    job's own mount namespace, so it vanishes with the job even if jrun is
    SIGKILLed, and concurrent jobs never see each other's writes."""
    base = os.path.join(state_dir, "root")
    mount("jrun-" + spec.id, base, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for d in ("lower", "upper", "work", "root"):
        os.mkdir(os.path.join(base, d), 0o755)
    root = os.path.join(base, "root")
    lower = rootfs_path(spec)
    mount(lower, os.path.join(base, "lower"), None, MS_BIND | MS_REC)
    # Relative layer paths, so that the job's /proc/self/mountinfo names no
    # host path (overlayfs shows its options as they were given).
    os.chdir(base)
    mount("overlay", root, "overlay", MS_NOSUID, "lowerdir=lower,upperdir=upper,workdir=work")
    audit("root: overlay of %s with a private writable layer" % lower)

    tmp = _safe_mkdirs(root, "tmp", 0o1777)
    mount("tmpfs", tmp, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    work = _safe_mkdirs(root, spec.workdir)
    if spec.workdir == DEFAULT_WORKDIR:
        mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    audit("writable /tmp and %s mounted" % spec.workdir)

    build_dev(root, spec)
    _safe_mkdirs(root, "proc", 0o555)
    _safe_mkdirs(root, "sys", 0o555)
    etc = {"etc/hostname": spec.hostname + "\n",
           "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n127.0.1.1\t%s\n" % spec.hostname}
    for res in resources:
        etc.update(res.etc_files())
    for rel, content in etc.items():
        _safe_file(root, rel, content=content)
    return root


def build_dev(root, spec):
    """A minimal /dev: a few harmless host device nodes bind-mounted (as bwrap
    does), a private devpts instance, /dev/shm; nothing else of the host."""
    dev = _safe_mkdirs(root, "dev")
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        target = os.path.join(dev, name)
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666))
        mount("/dev/" + name, target, None, MS_BIND)
    os.mkdir(os.path.join(dev, "pts"), 0o755)
    mount("devpts", os.path.join(dev, "pts"), "devpts", MS_NOSUID | MS_NOEXEC,
          "newinstance,ptmxmode=0666,mode=0620")
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    mount("tmpfs", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, name))
    if spec.init:
        # docker --init's way: a static reaper, bind-mounted read-only; no
        # host interpreter ever runs inside the job.
        init = os.path.join(dev, "init")
        os.close(os.open(init, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o755))
        mount(TINI, init, None, MS_BIND)
        mount(None, init, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)
    audit("minimal /dev: null zero full random urandom tty pts shm%s" % (" init" if spec.init else ""))


def pivot_into(root):
    """pivot_root, not chroot: afterwards the old root is not reachable by
    any path, open fd or chdir(".."), because it is detached."""
    os.chdir(root)
    # The runc trick: pivot onto the same directory, then unmount the old
    # root that now sits on top of it.  No put_old directory is needed.
    pivot_root(".", ".")
    umount2(".", MNT_DETACH)
    os.chdir("/")
    audit("root pivoted; old root detached (umount2 MNT_DETACH)")


def mount_proc_and_sys():
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    audit("/proc remounted for the job's PID namespace")
    mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    audit("/sys mounted read-only")


def job_environment(spec):
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "HOSTNAME": spec.hostname,
           "JRUN_JOB_ID": spec.id, "container": "jrun"}
    term = os.environ.get("TERM")
    if term:
        env["TERM"] = term
    env.update(spec.env)
    return env


def resolve_command(spec, env):
    """Find COMMAND in the job's root, as execvp would, so that 'not found'
    (127) and 'not executable' (126) are told apart before exec."""
    cmd = spec.command[0]
    if "/" in cmd:
        candidates = [cmd]
    else:
        candidates = [os.path.join(d or ".", cmd) for d in env.get("PATH", DEFAULT_PATH).split(":")]
    found = None
    for path in candidates:
        if os.path.isfile(path):
            if os.access(path, os.X_OK):
                found = path
                break
            found = found or path
    if found is None:
        raise NotFound("%s: command not found in the job's root" % cmd)
    if not os.access(found, os.X_OK):
        raise NotExecutable("%s: permission denied (not executable)" % found)
    argv = [found] + list(spec.command[1:])
    if spec.init:
        argv = ["/dev/init", "--"] + argv
    return argv


def drop_privileges(spec):
    """The last step before exec: capabilities, no_new_privs, user, seccomp
    (see the security issue).  Nothing yet beyond what the core does."""


def close_inherited_fds(keep):
    """The job inherits fds 0, 1 and 2 only, whatever the caller leaked."""
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 20)
    audit("file descriptors above 2 closed")


# ---------------------------------------------------------------------------
# The parent: set up, release the child, supervise, tear down.
# ---------------------------------------------------------------------------


class Outcome:
    def __init__(self):
        self.exit_code = None
        self.signal = None
        self.timed_out = False
        self.killed = False
        self.error = None


def run_job(spec):
    validate(spec)
    for cls in RESOURCE_CLASSES:
        cls.check(spec)
    teardown = Teardown()
    state = JobState(spec.id)
    state.create()
    teardown.push("state %s removed" % state.dir, state.remove)
    try:
        os.mkdir(os.path.join(state.dir, "root"), 0o700)
        state.save(id=spec.id, command=list(spec.command), hostname=spec.hostname,
                   started=time.time(), net=spec.net, jrun_pid=os.getpid())
        return supervise(spec, state, teardown)
    finally:
        teardown.run()


def supervise(spec, state, teardown):
    out = Outcome()
    all_sigs = set(FORWARDED_SIGNALS) | {signal.SIGCHLD}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, all_sigs)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
    resources = host_resources(spec)
    for res in resources:
        res.setup(state)
        teardown.push(res.name, res.teardown)
    plan = ChildPlan(spec=spec, state_dir=state.dir, status_w=status_w, sync_r=sync_r,
                     parent_pid=os.getpid(), sigmask=old_mask, resources=resources)
    pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    unshare(CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:
        os.close(status_r)
        os.close(sync_w)
        child_main(plan)
    # Our own later children (helpers such as nft) stay in the host's PID
    # namespace: only the job is born into the new one.
    setns(pidns, CLONE_NEWPID)
    os.close(pidns)
    os.close(status_w)
    os.close(sync_r)
    started = time.monotonic()
    state.save(pid=pid)
    reaped = None
    try:
        status = _read_status(status_r)
        if status == "R":
            for res in resources:
                res.attach(pid)
            os.write(sync_w, b"G")
            os.close(sync_w)
            sync_w = None
            audit("child released from the sync pipe")
            status = _read_status(status_r)
        if status and status.startswith("E"):
            code, _, msg = status[1:].partition(" ")
            out.error = msg
            out.exit_code = int(code)
            _, ws = os.waitpid(pid, 0)
            reaped = ws
            raise (NotFound if out.exit_code == EXIT_NOTFOUND else
                   NotExecutable if out.exit_code == EXIT_NOEXEC else SetupError)(msg)
        reaped = wait_for_job(spec, pid, out, started)
        for res in resources:
            res.collect(out)
    finally:
        if sync_w is not None:
            os.close(sync_w)
        os.close(status_r)
        if reaped is None:
            _kill_and_reap(pid)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return out.exit_code


def _read_status(fd):
    """One line from the child's status pipe; '' at EOF (exec succeeded)."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        buf += chunk
    return buf.decode("utf-8", "replace").rstrip("\n")


def _kill_and_reap(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def wait_for_job(spec, pid, out, started):
    """Wait for PID 1 of the job, relaying signals and enforcing --timeout.
    Returns the wait status."""
    deadline = started + spec.timeout if spec.timeout else None
    kill_at = None
    wanted = list(FORWARDED_SIGNALS) + [signal.SIGCHLD]
    while True:
        wpid, ws = os.waitpid(pid, os.WNOHANG)
        if wpid == pid:
            break
        now = time.monotonic()
        waits = [t - now for t in (deadline, kill_at) if t is not None]
        info = signal.sigtimedwait(wanted, max(0.0, min(waits)) if waits else 3600.0)
        now = time.monotonic()
        if info is not None and info.si_signo != signal.SIGCHLD:
            name = signal.Signals(info.si_signo).name
            log("info", "%s received; forwarding it to the job" % name)
            _signal(pid, info.si_signo)
            if kill_at is None:
                kill_at = now + spec.stop_timeout
        if deadline is not None and now >= deadline and not out.timed_out:
            out.timed_out = True
            log("warning", "job %s timed out after %s; sending SIGTERM" % (spec.id, _fmt_dur(spec.timeout)))
            _signal(pid, signal.SIGTERM)
            kill_at = now + spec.stop_timeout
            deadline = None
        if kill_at is not None and now >= kill_at and not out.killed:
            out.killed = True
            log("warning", "job %s still running %s after SIGTERM; sending SIGKILL"
                % (spec.id, _fmt_dur(spec.stop_timeout)))
            _signal(pid, signal.SIGKILL)
            kill_at = None
    if os.WIFSIGNALED(ws):
        out.signal = os.WTERMSIG(ws)
        out.exit_code = 128 + out.signal
    else:
        out.exit_code = os.WEXITSTATUS(ws)
    if out.timed_out:
        out.exit_code = EXIT_TIMEOUT
    return ws


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _fmt_dur(seconds):
    return ("%gs" % seconds) if seconds < 120 else ("%gm" % (seconds / 60))


# ---------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------


def job_ids():
    try:
        return sorted(n for n in os.listdir(STATE_DIR) if not n.startswith("."))
    except FileNotFoundError:
        return []


def gc_job(job_id):
    """Remove what a dead job left behind.  Never touches a live job."""
    state = JobState(job_id)
    if state.is_live():
        return False
    record = state.load()
    for cls in reversed(RESOURCE_CLASSES):
        res = cls.from_state(record)
        if res is not None:
            res.teardown()
    root = os.path.join(state.dir, "root")
    # The job's mounts lived in its own mount namespace and died with it;
    # a mount here would only come from a crash mid-setup of an old jrun.
    try:
        umount2(root, MNT_DETACH)
    except OSError:
        pass
    try:
        state.remove()
    except FileNotFoundError:
        pass
    return True


def cmd_gc(argv):
    if argv:
        raise UsageError("gc takes no arguments")
    removed = [j for j in job_ids() if gc_job(j)]
    for j in removed:
        log("info", "gc: removed leftovers of job %s" % j)
    for what in gc_networks():
        log("info", "gc: removed %s" % what)
    return 0


def cmd_rootfs(argv):
    if argv[:1] == ["path"] and len(argv) == 1:
        sys.stdout.write(ROOTFS_DIR + "\n")
        return 0
    if argv[:1] == ["build"] and set(argv[1:]) <= {"--force"}:
        return build_rootfs(force="--force" in argv)
    raise UsageError("usage: jrun rootfs build [--force] | jrun rootfs path")


def _skel_dir():
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.path.join(here, "rootfs", "skel"), os.path.join(sys.prefix, "share", "jrun", "rootfs", "skel")):
        if os.path.isdir(d):
            return d
    raise SetupError("rootfs skeleton not found next to %s or in %s/share/jrun" % (__file__, sys.prefix))


def _is_static_elf(path):
    """True if the ELF file has no PT_INTERP program header."""
    import struct

    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        end = "<" if head[5] == 1 else ">"
        phoff, = struct.unpack(end + "Q", head[32:40])
        phentsize, phnum = struct.unpack(end + "HH", head[54:58])
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack(end + "I", table[i * phentsize: i * phentsize + 4])[0] != 3 for i in range(phnum))


def build_rootfs(force=False):
    """The recipe of the default minimal rootfs (see rootfs/README.md)."""
    import shutil
    import subprocess

    if os.geteuid() != 0:
        raise UsageError("rootfs build must run as root")
    if os.path.isfile(os.path.join(ROOTFS_DIR, "bin/busybox")) and not force:
        log("info", "rootfs already built at %s (use --force to rebuild)" % ROOTFS_DIR)
        return 0
    if not os.path.isfile(BUSYBOX) or not _is_static_elf(BUSYBOX):
        raise SetupError("%s is missing or not statically linked (apt-get install busybox-static)" % BUSYBOX)
    skel = _skel_dir()
    parent = os.path.dirname(ROOTFS_DIR)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    tmp = "%s.new-%d" % (ROOTFS_DIR, os.getpid())
    os.mkdir(tmp, 0o755)
    try:
        for d, mode in (("bin", 0o755), ("sbin", 0o755), ("usr/bin", 0o755), ("usr/sbin", 0o755),
                        ("etc", 0o755), ("proc", 0o555), ("sys", 0o555), ("dev", 0o755),
                        ("tmp", 0o1777), ("work", 0o755), ("root", 0o700), ("home", 0o755),
                        ("run", 0o755), ("var/tmp", 0o1777), ("mnt", 0o755)):
            os.makedirs(os.path.join(tmp, d), exist_ok=True)
            os.chmod(os.path.join(tmp, d), mode)
        shutil.copy2(BUSYBOX, os.path.join(tmp, "bin/busybox"))
        os.chmod(os.path.join(tmp, "bin/busybox"), 0o755)
        applets = subprocess.run([BUSYBOX, "--list-full"], check=True, capture_output=True,
                                 text=True).stdout.split()
        for rel in applets:
            link = os.path.join(tmp, rel)
            if rel == "bin/busybox" or os.path.lexists(link):
                continue
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink("/bin/busybox", link)
        shutil.copytree(skel, tmp, symlinks=True, dirs_exist_ok=True)
        with open(os.path.join(tmp, ".jrun-rootfs"), "w") as f:
            f.write("built by jrun %s from %s (%d applets) at %s\n"
                    % (__version__, BUSYBOX, len(applets), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
        if os.path.exists(ROOTFS_DIR):
            old = "%s.old-%d" % (ROOTFS_DIR, os.getpid())
            os.rename(ROOTFS_DIR, old)
            os.rename(tmp, ROOTFS_DIR)
            shutil.rmtree(old)
        else:
            os.rename(tmp, ROOTFS_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log("info", "rootfs built at %s (busybox, %d applets)" % (ROOTFS_DIR, len(applets)))
    return 0


# ---------------------------------------------------------------------------
# main: the only place that prints errors and turns them into a status.
# ---------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] and argv[0] in SUBCOMMANDS:
            sub, rest = argv[0], argv[1:]
            if sub == "run":
                return cmd_run(rest)
            if sub in ("-h", "--help"):
                raise HelpRequested(run_help())
            return {"gc": cmd_gc, "rootfs": cmd_rootfs}.get(sub, _not_yet(sub))(rest)
        return cmd_run(argv)
    except HelpRequested as h:
        sys.stdout.write(str(h))
        return 0
    except JrunError as e:
        log("error", str(e))
        return e.exit_code
    except KeyboardInterrupt:
        return 130


def _not_yet(sub):
    def fail(argv):
        raise UsageError("'jrun %s' is not supported by this version of jrun yet" % sub)

    return fail


def cmd_run(argv):
    spec = parse_run(argv)
    _log["level"] = LEVELS[spec.log_level]
    _log["format"] = spec.log_format
    _log["job"] = spec.id
    return run_job(spec)


if __name__ == "__main__":
    sys.exit(main())
