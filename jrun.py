#!/usr/bin/env python3
# PYTHON_ARGCOMPLETE_OK
"""jrun: run one command isolated, in the foreground, and leave nothing behind.

    sudo jrun [RUN OPTIONS] [--] COMMAND [ARG...]

One privileged invocation, no daemon, no setuid helper.  The order of a run:

  0. read /etc/jrun/jrun.toml once, if it exists (load_config): defaults of
     run options, and the host settings as a frozen record (HOST);
  1. parse argv once into a frozen JobSpec (parse_run), then validate all
     of it against this host before the first side effect (validate, each
     Resource.check; bad input: exit 125, nothing made);
  2. parent (run_job, supervise): create the job's state directory
     /run/jrun/<id> (JobState.create, held by a lock), then its cgroup, user
     namespace and network plumbing (Resource.setup of Cgroup,
     JobUserNamespace, Network), each registered for teardown (Teardown);
  3. fork a child (child_main) into a new PID namespace (it is PID 1 there),
     which runs CHILD_STEPS in order: die_with_jrun; unshare_namespaces
     (mount, UTS, IPC, network); wait_for_release reports "ready";
  4. parent: Resource.attach: create the job's eth0 in the child's network
     namespace and address it (Network.attach: the network is ready before
     COMMAND), put the child in its cgroup (Cgroup.attach; on cgroup v1 the
     child joins itself: see CgroupV1.join), and release it through the
     sync pipe;
  5. child: enter_resources (verify its cgroup and limits, cgroup
     namespace); build_job_root (private mounts, then build_root: a per-job
     root on a tmpfs, an overlay or the host's system dirs read-only, /work,
     a minimal /dev (build_dev), uploads copied and volumes bound
     (stage_files), all still before pivot_root, never following a symlink
     of the job's root out of it); pivot_into_root (old root detached);
     enter_proc_and_sys (/proc hardened, read-only /sys and cgroup fs);
     set_hostname; enter_workdir (user, environment, workdir, command);
     take_stdio_and_session (its own stdio on fds 0-2, new session);
     reset_signals; drop_job_privileges (capabilities, user, no_new_privs,
     seccomp last); exec_command (a failure before exec is reported through
     a close-on-exec status pipe);
  6. parent: wait_for_job relays the job's stdio (Relay, where it is a host
     file or terminal) and signals, enforces --timeout and reaps;
     Resource.collect, then Teardown.run tears everything down in reverse.

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
# _signal: the signal module's numbers and calls without its enum wrappers,
# whose import costs 4-9 ms at every start (names: signal_name()).
import _signal as signal
import sys
import time

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

# Host settings: their defaults.  /etc/jrun/jrun.toml may change them: the
# values in use are HOST's (HostSettings, read once by load_config).
CONFIG_FILE = "/etc/jrun/jrun.toml"
DEFAULT_STATE_DIR = "/run/jrun"
DEFAULT_ROOTFS_DIR = "/var/lib/jrun/rootfs"
DEFAULT_IMAGE_DIR = "/var/lib/jrun/images"  # imported images (see the Images section)
# --rootfs host: the host's system directories the job sees, read-only.  On
# merged-/usr systems bin, sbin and lib* are symlinks into usr.
HOST_SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
DEFAULT_AUDIT_LOG = "/var/log/jrun/audit.log"
TINI = "/usr/bin/tini-static"
BUSYBOX = "/bin/busybox"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_WORKDIR = "/work"
# The job's writable space (/, /tmp, /work, /dev/shm share one tmpfs of
# this size, see build_root): a quarter of RAM, half of what tmpfs gives
# each mount by default.
DEFAULT_WORKDIR_SIZE = "25%"
DEFAULT_STOP_TIMEOUT = 10.0

# Networks (see the Network section).  The default subnet: podman takes
# 10.88/16, docker 172.17-172.30/16 first and 192.168/16 in /20s, libvirt
# 192.168.122/24, Kubernetes 10.96/12 and 10.244/16, Tailscale 100.64/10;
# 172.31.128/17 is reached by docker only at its 15th network, and AWS
# default VPCs (172.31/16) put their subnets and DNS resolver in the low
# half.  A clash with a route of the host is refused, never silently used.
# Network state is host-wide, like the bridges and the nft table it
# describes: it stays in /run/jrun/.net whatever the config's state-dir.
NET_DIR = "/run/jrun/.net"  # never a job id: names cannot start with '.'
DEFAULT_BRIDGE = "jrun0"
DEFAULT_SUBNET = "172.31.254.0/24"
DEFAULT_NET_POOL = "172.31.128.0/17"  # named networks take a /24 each
NAMED_PREFIXLEN = 24
LONGEST_PREFIX = 28  # the smallest subnet jrun takes: a gateway and 13 jobs
NFT_TABLE = "inet jrun"
DEFAULT_ALLOW_LINK_LOCAL = False  # jobs reach 169.254/16 (cloud metadata: credentials) only if the host says so
# A network's bridge and rules stay while it is idle (no job on it), as
# docker0 does: making and removing them costs ~120 ms per lone job.  `jrun
# gc` removes a network idle for longer than this (0: its last job does).
DEFAULT_NETWORK_IDLE = 300.0
NFT_PATHS = ("/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft")  # no PATH lookup for root
RESOLVED_UPSTREAM = "/run/systemd/resolve/resolv.conf"
RESERVED_NETS = ("bridge", "none")

EXIT_TIMEOUT = 124
EXIT_OOM = 137
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
UMOUNT_NOFOLLOW = 8

# <linux/openat2.h>, <linux/mount.h>, <linux/fcntl.h>: path resolution that
# cannot leave a directory, and per-mount attributes set recursively.
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x00100000
OPEN_TREE_CLONE = 1
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000

# Signals jrun relays to the job; each asks it to end, so each starts the
# grace period after which jrun sends SIGKILL.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# What jrun keeps blocked from the start of a run and reads in its wait loop:
# those, its child's state changes, and its terminal's resizes.
WAITED_SIGNALS = FORWARDED_SIGNALS + (signal.SIGCHLD, signal.SIGWINCH)


def _signal_names():
    """The signal module's enum of signals (SIGTERM...): for messages and
    `jrun kill -s` only, imported when one is needed."""
    import signal as with_names

    return with_names.Signals


def signal_name(sig):
    return _signal_names()(sig).name

# <asm/unistd_64.h> (x86_64) and <asm-generic/unistd.h> (aarch64): the
# syscalls jrun calls by number, and those the default seccomp filter refuses
# or checks the arguments of.
# (tests/test_security.py checks them against the installed headers.)
_SYSCALL_NAMES = (
    "pivot_root", "clone", "clone3", "unshare", "setns", "mount", "umount2", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "open_tree", "open_tree_attr", "mount_setattr", "quotactl",
    "quotactl_fd", "swapon", "swapoff", "lookup_dcookie", "nfsservctl", "fanotify_init", "keyctl",
    "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register", "init_module",
    "finit_module", "delete_module", "reboot", "kexec_load", "kexec_file_load", "settimeofday",
    "clock_settime", "clock_adjtime", "acct", "iopl", "ioperm", "open_by_handle_at",
    "name_to_handle_at", "bpf", "perf_event_open", "userfaultfd", "syslog", "vhangup", "openat2",
    "ioctl", "socket", "socketpair", "setrlimit", "prlimit64",
)
_SYSCALLS = {
    "x86_64": dict(zip(_SYSCALL_NAMES, (
        155, 56, 435, 272, 308, 165, 166, 429, 430,
        431, 432, 433, 428, 467, 442, 179,
        443, 167, 168, 212, 180, 300, 250,
        248, 249, 425, 426, 427, 175,
        313, 176, 169, 246, 320, 164,
        227, 305, 163, 172, 173, 304,
        303, 321, 298, 323, 103, 153, 437,
        16, 41, 53, 160, 302))),
    "aarch64": dict(zip(_SYSCALL_NAMES, (
        41, 220, 435, 97, 268, 40, 39, 429, 430,
        431, 432, 433, 428, 467, 442, 60,
        443, 224, 225, 18, 42, 262, 219,
        217, 218, 425, 426, 427, 105,
        273, 106, 142, 104, 294, 170,
        112, 266, 89, None, None, 265,
        264, 280, 241, 282, 116, 58, 437,
        29, 198, 199, 164, 261))),
}

# <linux/audit.h>: the architecture tag of a syscall as seccomp sees it.
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000  # <asm/unistd.h>: x32 ABI syscalls on x86_64

# <linux/capability.h>, by number.
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)
# What a job that is root inside keeps: what ordinary software needs as root
# (own its files, switch users, bind port 80, chroot), podman's default set.
# Left out on purpose, beyond the obvious (SYS_ADMIN, SYS_MODULE, ...):
# MKNOD (device nodes: /dev is jrun's), NET_RAW (packet sockets: ARP/IP
# spoofing on a shared bridge and a steady source of kernel CVEs such as
# CVE-2020-14386; ping works through ICMP datagram sockets instead, see
# harden_proc_and_sys) and AUDIT_WRITE (the audit log is the host's, not
# namespaced).
DEFAULT_CAPS = frozenset((
    "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "SETFCAP", "NET_BIND_SERVICE", "SYS_CHROOT",
))

RLIMIT_CORE = 4  # <asm-generic/resource.h>
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# The job's device nodes (name, major, minor): <linux/major.h>, and
# Documentation/admin-guide/devices.txt.  jrun makes them for each job
# (build_dev); the device allow-list of the job's cgroup lets it use these,
# its own ptys, and nothing else (Cgroup.restrict_devices).
DEV_NODES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9),
             ("tty", 5, 0))
# (type, major, minor or None for any, access): read, write, mknod.  mknod
# only of the job's own nodes, which the child makes after joining its
# cgroup; /dev/ptmx (5:2) and the ptys (136:*) belong to the job's devpts.
DEVICE_RULES = tuple(("c", major, minor, "rwm") for _, major, minor in DEV_NODES) + (
    ("c", 5, 2, "rw"), ("c", 136, None, "rw"))

# --userns: each job's root is mapped to its own range of USERNS_SIZE host
# uids (and gids) in [USERNS_BASE, 2^32): above every range useradd hands
# out in /etc/subuid (100000 + 65536 per user), so no host user or rootless
# container owns them, and below (uid_t)-1.  2^31 / 65536 - 1 = 32767 slots
# (the last one would reach (uid_t)-1).
USERNS_BASE = 1 << 31
USERNS_SIZE = 65536
USERNS_SLOTS = (1 << 31) // USERNS_SIZE - 1

# <linux/prctl.h>, <linux/seccomp.h>, <linux/filter.h>
PR_CAPBSET_DROP = 24
PR_SET_SECCOMP = 22
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_JSET_K = 0x45
BPF_RET_K = 0x06
# What the filter checks the arguments of: <asm-generic/ioctls.h> (the same
# numbers on x86_64 and aarch64), <linux/socket.h>.
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
AF_VSOCK = 40

# <linux/bpf.h>: the eBPF device allow-list of a cgroup v2 job.
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2
BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR = 1, 2
BPF_DEVCG_ACC_MKNOD, BPF_DEVCG_ACC_READ, BPF_DEVCG_ACC_WRITE = 1, 2, 4

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
    """COMMAND was found in the job's root but cannot be executed."""


class NotFound(JrunError):
    """COMMAND (or its script's interpreter) is not in the job's root."""


# Exit status <-> error, one table for both directions: an error's
# exit_code (what main() exits with, and what the child reports through the
# status pipe) and, in the parent, the error a status the child reported
# stands for (error_of_status).  Any other error is EXIT_JRUN.
STATUS_ERRORS = ((EXIT_NOEXEC, NotExecutable), (EXIT_NOTFOUND, NotFound))
for _status, _error in STATUS_ERRORS:
    _error.exit_code = _status
del _status, _error


def error_of_status(status):
    """The error the child's exit STATUS stands for (SetupError for
    EXIT_JRUN: the child's host-side setup failed)."""
    return dict(STATUS_ERRORS).get(status, SetupError)


# ---------------------------------------------------------------------------
# Messages.  Everything jrun says goes to stderr and starts with "jrun: ".
# ---------------------------------------------------------------------------

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
# crlf: the caller's terminal is in raw mode (the job's pty relayed), where
# a bare newline would not return the cursor.
_log = {"level": 20, "format": "text", "job": None, "crlf": False}


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
    if _log["crlf"]:
        line = line.replace("\n", "\r\n")
    try:
        os.write(2, _exact_bytes(line))
    except OSError:
        pass


def _exact_bytes(text):
    """TEXT as the bytes it came from: Python decodes argv, environment and
    file names that are not UTF-8 with surrogateescape (a byte 0xe9 becomes
    U+DCE9), and encoding the same way gives back exactly those bytes."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no file name can hold
        return text.encode("utf-8", "replace")


def trace(msg):
    """One line of the debug trail (--log-level debug): each isolation step
    as it is taken.  (Not the audit log: see append_audit_log.)"""
    log("debug", msg)


_JSON_ESC = {i: "\\u%04x" % i for i in range(32)}
_JSON_ESC.update({ord('"'): '\\"', ord("\\"): "\\\\", 10: "\\n", 9: "\\t", 13: "\\r"})


def dumps_json(obj):
    """A small JSON encoder for flat records: the json module imports re,
    which costs 7 ms of every job's start here.

    JSON text is UTF-8, but Linux allows any bytes in arguments, environment
    values and file names.  A string that is not valid UTF-8 is written as
    an array of its bytes, each a number 0-255, as journalctl -o json does:
    lossless, unambiguous (a string field is either a JSON string or such an
    array), and every JSON parser reads it.  (json_text() turns it back.)"""
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, (int, float)):
        return repr(obj)
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return dumps_json(list(_exact_bytes(obj)))
        return '"' + obj.translate(_JSON_ESC) + '"'
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(dumps_json(x) for x in obj) + "]"
    if isinstance(obj, dict):
        return "{" + ", ".join(dumps_json(str(k)) + ": " + dumps_json(v) for k, v in obj.items()) + "}"
    return dumps_json(str(obj))


def json_text(value):
    """A string field read back from jrun's JSON: an array of bytes (see
    dumps_json) is the string it stands for, with its bytes exact."""
    if isinstance(value, list) and value and all(isinstance(b, int) and 0 <= b < 256 for b in value):
        return bytes(value).decode("utf-8", "surrogateescape")
    return value


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


def sys_prctl(option, *args):
    """prctl(2) for the options python-prctl does not know (ambient
    capabilities, seccomp, capabilities above its compile-time last one);
    every argument is passed as an unsigned long, as the kernel reads it."""
    import ctypes

    args = [ctypes.c_ulong(a) if isinstance(a, int) else a for a in args]
    args += [ctypes.c_ulong(0)] * (4 - len(args))
    return _check(_c().prctl(ctypes.c_int(option), *args), "prctl %d" % option)


def seccomp_set_filter(prog):
    """Install a classic BPF program, a list of (code, jt, jf, k), as this
    thread's seccomp filter (inherited by every later child and exec)."""
    import ctypes

    class SockFilter(ctypes.Structure):  # <linux/filter.h>
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                    ("k", ctypes.c_uint)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    insns = (SockFilter * len(prog))(*[SockFilter(*i) for i in prog])
    fprog = SockFprog(len(prog), insns)
    sys_prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog))


def setrlimit(resource, soft, hard):
    """(This Python is built without the resource module.)"""
    import ctypes

    lim = (ctypes.c_ulong * 2)(soft, hard)
    _check(_c().setrlimit(resource, lim), "setrlimit %d" % resource)


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


def openat2(dirfd, path, flags, resolve, mode=0):
    """openat2(2): the kernel resolves PATH under its RESOLVE_* rules, with no
    window between a check and the use (what a userspace walk cannot give)."""
    import ctypes

    how = (ctypes.c_uint64 * 3)(flags | os.O_CLOEXEC, mode, resolve)
    nr = _SYSCALLS[os.uname().machine]["openat2"]
    L = ctypes.c_long
    return _check(_c().syscall(L(nr), L(dirfd), _b(path), ctypes.byref(how), L(ctypes.sizeof(how))),
                  "openat2 %s" % path)


def mount_setattr(fd, attr_set, recursive=True, userns_fd=0, propagation=0):
    """mount_setattr(2) on the mount FD is open on: unlike MS_REMOUNT it sets
    only the given flags, and with AT_RECURSIVE on every submount too.
    USERNS_FD goes with MOUNT_ATTR_IDMAP."""
    import ctypes

    attr = (ctypes.c_uint64 * 4)(attr_set, 0, propagation, userns_fd)  # set, clr, propagation, userns_fd
    nr = _SYSCALLS[os.uname().machine]["mount_setattr"]
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    L = ctypes.c_long
    _check(_c().syscall(L(nr), L(fd), b"", L(flags), ctypes.byref(attr), L(ctypes.sizeof(attr))),
           "mount_setattr")


def open_tree(path, flags):
    import ctypes

    L = ctypes.c_long
    nr = _SYSCALLS[os.uname().machine]["open_tree"]
    return _check(_c().syscall(L(nr), L(-100), _b(path), L(flags)), "open_tree %s" % path)


def move_mount(from_fd, to_fd):
    import ctypes

    L = ctypes.c_long
    flags = 0x04 | 0x40  # MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
    nr = _SYSCALLS[os.uname().machine]["move_mount"]
    _check(_c().syscall(L(nr), L(from_fd), b"", L(to_fd), b"", L(flags)), "move_mount")


def clone_tree(path):
    """A detached copy of the mount tree at host PATH (submounts included),
    as an fd: what bind_into later attaches.  PATH is resolved now, once."""
    return open_tree(path, OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC)

# ---------------------------------------------------------------------------
# Host files jrun writes as root (--json-status, the state directory, the
# network's leases, the audit log).  The job may be hostile and root inside
# (what it leaves in a -v volume is host root's), and so may local users
# (anyone can plant a symlink in /tmp; fs.protected_symlinks may be off).
# So a directory is opened once, as an fd, walking its path one component
# at a time; files are made in it relative to that fd with O_EXCL|O_NOFOLLOW
# and renamed onto their name (rename replaces a symlink, never follows it);
# and jrun's own directories must be root's and closed to everyone else.
# ---------------------------------------------------------------------------


def invoker_uid():
    """The uid of the user behind sudo (SUDO_UID), else of the caller."""
    uid = os.environ.get("SUDO_UID", "")
    return int(uid) if uid.isdigit() else os.getuid()


def _others_may_write(st, trusted):
    return st.st_uid not in trusted or bool(st.st_mode & 0o022)


def open_host_dir(path, what):
    """An O_PATH fd of the host directory PATH (absolute).  A symlink on the
    way is followed only if root or the invoker owns it, or if no one else
    may write the directory that holds it: else a local user (or a job, under
    --userns) could have planted it, /tmp/d -> /etc, to make jrun write as
    root where they choose.  This is the kernel's fs.protected_symlinks rule,
    which many hosts leave off, applied by jrun itself (and stricter: a link
    in a directory of another user is refused even if that user made both).
    A missing or non-directory component is an OSError naming it."""
    trusted = {0, invoker_uid()}
    todo = [c for c in path.split("/") if c][::-1]
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    here, links = "/", 0
    try:
        while todo:
            comp = todo.pop()
            if comp == ".":
                continue
            try:
                nfd = os.open(comp, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except NotADirectoryError:
                # The link itself, opened: its owner and its target are read
                # from the very inode that would be followed.
                lfd = os.open(comp, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                try:
                    st = os.fstat(lfd)
                    import stat

                    if not stat.S_ISLNK(st.st_mode):
                        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", os.path.join(here, comp))
                    links += 1
                    if links > 40:
                        raise OSError(errno.ELOOP, "Too many levels of symbolic links", os.path.join(here, comp))
                    if st.st_uid not in trusted and _others_may_write(os.fstat(fd), trusted):
                        raise UsageError("%s: %s is a symlink of uid %d in %s, which others may write: refusing "
                                         "to follow it as root (name the real directory)"
                                         % (what, os.path.join(here, comp), st.st_uid, here))
                    target = os.readlink("", dir_fd=lfd)
                finally:
                    os.close(lfd)
                todo += [c for c in target.split("/") if c][::-1]
                if target.startswith("/"):
                    os.close(fd)
                    fd, here = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), "/"
                continue
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", os.path.join(here, comp)) \
                    from None
            os.close(fd)
            fd, here = nfd, os.path.normpath(os.path.join(here, comp))
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_private_dir(fd, path, what, why="jrun writes there as root"):
    """jrun's own directories (state, networks, audit log, config) must be
    root's and writable by no group or other: whoever may write there can
    swap what jrun reads, or plant what it writes over."""
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise SetupError("%s %s is %s: %s, so only root may write it (chown root: %s; chmod go-w %s)"
                         % (what, path, "owned by uid %d" % st.st_uid if st.st_uid
                            else "writable by group or others", why, path, path))


def open_private_dir(path, what, mode=0o700, create=True):
    """An fd (O_RDONLY: it can be flocked) of jrun's own directory PATH,
    made with MODE if missing (and CREATE), checked by check_private_dir.
    None if it is missing and not CREATE."""
    parent, name = os.path.split(os.path.normpath(path))
    try:
        pfd = open_host_dir(parent, what)
    except FileNotFoundError:
        if not create:
            return None
        os.makedirs(parent, 0o755, exist_ok=True)
        pfd = open_host_dir(parent, what)
    try:
        if create:
            try:
                os.mkdir(name, mode, dir_fd=pfd)
            except FileExistsError:
                pass
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        except FileNotFoundError:
            if create:
                raise
            return None
        except NotADirectoryError:
            raise SetupError("%s %s is not a directory (or is a symlink): name the real directory" % (what, path)) \
                from None
    finally:
        os.close(pfd)
    try:
        check_private_dir(fd, path, what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def open_new_file(dfd, name, mode):
    """A new file NAME in directory DFD, never through a link planted there."""
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)


def write_new(dfd, name, data, mode=0o600):
    fd = open_new_file(dfd, name, mode)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def replace_file(dfd, name, data, mode=0o644):
    """Write DATA as NAME in directory DFD: a new file, made O_EXCL|O_NOFOLLOW
    under a temporary name, then renamed onto NAME, so a reader sees the old
    file or the whole new one, and a symlink or hard link planted at NAME is
    replaced, never written through."""
    tmp = ".%s.%s.tmp" % (name, os.urandom(4).hex())
    fd = open_new_file(dfd, tmp, mode)
    try:
        try:
            os.fchmod(fd, mode)  # past the umask
            write_all(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise


# <linux/signalfd.h>
SFD_NONBLOCK = 0o4000
SFD_CLOEXEC = 0o2000000


def signalfd(sigs):
    """A non-blocking signalfd(2) for SIGS (which must stay blocked): a
    signal becomes an fd that poll() can wait on beside others, with no
    handler and no thread."""
    import ctypes

    mask = (ctypes.c_uint64 * 16)()  # sigset_t: 1024 bits
    for sig in sigs:
        mask[(sig - 1) // 64] |= 1 << ((sig - 1) % 64)
    return _check(_c().signalfd(-1, ctypes.byref(mask), SFD_NONBLOCK | SFD_CLOEXEC), "signalfd")


def read_signalfd(fd):
    """The signal numbers waiting on a signalfd (ssi_signo leads each
    128-byte signalfd_siginfo)."""
    try:
        data = os.read(fd, 128 * 16)
    except BlockingIOError:
        return []
    return [int.from_bytes(data[i:i + 4], sys.byteorder) for i in range(0, len(data), 128)]


# <linux/ptrace.h>, <linux/wait.h>
PTRACE_DETACH = 17
PTRACE_GETSIGINFO = 0x4202
WALL = 0x40000000  # __WALL: wait for threads (clone children) too


def ptrace_detach(tid, sig):
    import ctypes

    _c().ptrace(ctypes.c_int(PTRACE_DETACH), ctypes.c_int(tid), None, ctypes.c_void_p(sig))


def ptrace_sender(tid):
    """si_pid of the signal TID is stopped on, as its own PID namespace saw
    the sender (0: from outside it); None if TID is not in a
    signal-delivery-stop (a group-stop, or gone)."""
    import ctypes

    info = ctypes.create_string_buffer(128)  # siginfo_t
    if _c().ptrace(ctypes.c_int(PTRACE_GETSIGINFO), ctypes.c_int(tid), None, info) != 0:
        return None
    return int.from_bytes(info.raw[16:20], sys.byteorder, signed=True)  # _sifields._kill.si_pid
def bpf(cmd, attr):
    """bpf(2): ATTR is a ctypes structure laid out as the command's member
    of union bpf_attr (the kernel takes a shorter one: the rest is zero)."""
    import ctypes

    nr = _SYSCALLS[os.uname().machine]["bpf"]
    L = ctypes.c_long
    return _check(_c().syscall(L(nr), L(cmd), ctypes.byref(attr), L(ctypes.sizeof(attr))), "bpf")


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
    # files and bytes are counted by survey_uploads() before any side effect;
    # fd is SRC opened by validate() (O_PATH), the only way SRC is used after.
    __slots__ = ("src", "dest", "files", "bytes", "fd")


class Volume(_Frozen):
    # fd: SRC cloned by validate() (open_tree), the tree that is bound.
    __slots__ = ("src", "dest", "read_only", "fd")


class Limits(_Frozen):
    __slots__ = ("cpu", "cores", "memory", "io_bps", "pids")


class JobSpec(_Frozen):
    __slots__ = (
        "id", "named", "command", "hostname", "timeout", "stop_timeout", "init",
        "limits", "uploads", "volumes", "workdir", "workdir_size", "env", "rootfs", "image", "read_only",
        "net", "user", "cap_add", "cap_drop", "seccomp", "userns", "stats",
        "json_status", "cgroup_parent", "log_level", "log_format",
        "slurm",  # the Slurm task jrun runs as (slurm_task), or None
        # Opened by validate(): fds of the host paths above, used instead of them.
        "rootfs_fd", "json_status_dir",
    )


class Opt:
    __slots__ = ("long", "short", "metavar", "help", "dest", "repeat", "choices")

    def __init__(self, long, short=None, metavar=None, help="", dest=None, repeat=False, choices=None):
        self.long, self.short, self.metavar, self.help = long, short, metavar, help
        self.dest = dest or long[2:].replace("-", "_")
        self.repeat, self.choices = repeat, choices


RUN_OPTIONS = (
    Opt("--name", None, "NAME", "job id (default: 12 random hex chars, under Slurm slurm-JOB[_TASK].STEP.RANK); "
        "also the hostname"),
    Opt("--hostname", None, "NAME", "hostname inside the job (default: the job id)"),
    Opt("--timeout", None, "DURATION", "kill the job after DURATION (30, 30s, 5m, 1h); exit 124"),
    Opt("--stop-timeout", None, "DURATION",
        "grace period from SIGTERM to SIGKILL if PID 1 handles SIGTERM (default 10s)"),
    Opt("--init", None, None, "run a small reaper (tini) as PID 1 that forwards signals and reaps zombies"),
    Opt("--cpu", None, "PCT", "CPU bandwidth in percent of one CPU (25 = a quarter core)"),
    Opt("--cores", None, "LIST", "pin to CPUs, cpuset syntax 0-1,3"),
    Opt("--memory", None, "SIZE", "hard memory limit: 64M, 1G, 512K; a plain number is MiB; OOM: exit 137"),
    Opt("--io-bps", None, "RATE", "read and write bandwidth limit in bytes/s (K/M/G suffix)"),
    Opt("--pids", None, "N", "maximum number of processes and threads in the job"),
    Opt("--upload", None, "SRC[:DEST]", "copy a host file or directory into the job (repeatable); "
        "a relative DEST is under /work, whatever -w says", repeat=True),
    Opt("--volume", "-v", "SRC:DEST[:ro]", "bind a host path into the job (repeatable)", repeat=True),
    Opt("--workdir", "-w", "DIR", "working directory inside the job (default /work)"),
    Opt("--workdir-size", None, "SIZE", "the job's writable space, shared by /work, /tmp, /dev/shm and "
        "the root: 512M, 2G or a percentage of RAM (default %s)" % DEFAULT_WORKDIR_SIZE),
    Opt("--env", "-e", "KEY[=VALUE]", "set a variable, or pass the caller's value (repeatable)", repeat=True),
    Opt("--env-file", None, "FILE", "read KEY=VALUE lines from FILE (repeatable)", repeat=True),
    Opt("--rootfs", None, "minimal|host|PATH|IMAGE",
        "the job's root: minimal (default), host, a directory (with a '/') or an imported IMAGE"),
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
    Opt("--cgroup-parent", None, "PATH|slurm", "create the job's cgroup under PATH (an existing, delegated "
        "subtree), or inside the Slurm step jrun runs in (the default there)"),
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


def fmt_size(n):
    """67108864 -> '64 MiB': a size in the units parse_size reads."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return ("%d %s" if v == int(v) else "%.1f %s") % (v, unit)
    return "%d B" % n


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


def parse_ip(text):
    """'172.31.254.1' -> int; ValueError unless four decimal octets."""
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 and int(p) < 256 for p in parts):
        raise ValueError(text)
    return int(parts[0]) << 24 | int(parts[1]) << 16 | int(parts[2]) << 8 | int(parts[3])


def format_ip(n):
    return "%d.%d.%d.%d" % (n >> 24, n >> 16 & 255, n >> 8 & 255, n & 255)


def parse_subnet(what, text, longest=LONGEST_PREFIX):
    """'172.31.254.0/24' -> (network int, prefix length), /8 to /LONGEST.
    The one parser of every subnet: jrun.toml's subnet and net-pool, and
    the networks' state files."""
    addr, slash, plen = text.partition("/")
    try:
        net, plen = parse_ip(addr), int(plen)
    except ValueError:
        raise UsageError("%s: %r is not an IPv4 subnet (use e.g. 172.31.254.0/24)" % (what, text)) from None
    if not slash or not 8 <= plen <= longest:
        raise UsageError("%s: %r: the prefix length must be from /8 to /%d" % (what, text, longest))
    if net & ~_mask(plen) & 0xFFFFFFFF:
        raise UsageError("%s: %r has host bits set (did you mean %s/%d?)"
                         % (what, text, format_ip(net & _mask(plen)), plen))
    return net, plen


def _mask(plen):
    return (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF


def format_subnet(subnet):
    return "%s/%d" % (format_ip(subnet[0]), subnet[1])


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


def check_name(opt, text, maxlen=63, is_not="a valid name"):
    """The one check of every name jrun makes a host object after: a job
    (--name), a network (--net), an image."""
    if not text or len(text) > maxlen or not set(text) <= _NAME_CHARS or text[0] in ".-_":
        raise UsageError("%s: %r is not %s (letters, digits, '_', '.', '-'; at most %d, "
                         "starting with a letter or digit)" % (opt, text, is_not, maxlen))
    return text


def check_net(opt, text):
    if text == "host":
        raise UsageError("%s: 'host' (the host's own network) is not offered: every job has its own network "
                         "namespace (use bridge, none or a network NAME)" % opt)
    return text if text in RESERVED_NETS else check_name(opt, text, is_not="bridge, none or a network name")


def check_image_name(what, text):
    check_name(what, text)
    if text in ("minimal", "host"):
        raise UsageError("%s: %r is a --rootfs of its own, never an image's name" % (what, text))
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
    if config:
        o = dict(config, **o)  # the command line always wins
    rootfs, image = parse_rootfs(o.get("rootfs", "minimal"))
    if not command and not image:  # an image may bring its own (with_image)
        raise UsageError("no COMMAND given (usage: jrun [OPTIONS] [--] COMMAND [ARG...])")
    named = "name" in o
    slurm = slurm_task()
    job_id = check_name("--name", o["name"]) if named else slurm_job_name(slurm) if slurm else os.urandom(6).hex()
    hostname = check_hostname("--hostname", o["hostname"]) if "hostname" in o else default_hostname(job_id)
    level = "error" if o.get("quiet") else o.get("log_level", "info")
    limits = Limits(
        cpu=parse_int("--cpu", o["cpu"], 1) if "cpu" in o else None,
        cores=o.get("cores"),
        memory=parse_size("--memory", o["memory"]) if "memory" in o else None,
        io_bps=parse_size("--io-bps", o["io_bps"], default_unit=1) if "io_bps" in o else None,
        pids=parse_int("--pids", o["pids"], 1) if "pids" in o else None,
    )
    if o.get("user") and o.get("cap_add") and o["user"].partition(":")[0] not in ("0", "root"):
        raise UsageError("--cap-add: a -u/--user job runs with no capabilities at all; "
                         "run it as root inside (without --user) to give it %s" % ", ".join(o["cap_add"]))
    workdir = o.get("workdir", None if image else DEFAULT_WORKDIR)  # None: the image's WorkingDir
    if workdir is not None and (not workdir.startswith("/") or "\0" in workdir):
        raise UsageError("-w/--workdir: %r must be an absolute path inside the job" % workdir)
    workdir = workdir and os.path.normpath(workdir).replace("//", "/")
    return JobSpec(
        id=job_id, named=named, command=tuple(command), hostname=hostname,
        timeout=parse_duration("--timeout", o["timeout"]) if "timeout" in o else None,
        stop_timeout=(parse_duration("--stop-timeout", o["stop_timeout"]) if "stop_timeout" in o
                      else DEFAULT_STOP_TIMEOUT),
        init=bool(o.get("init")), limits=limits,
        uploads=tuple(parse_upload(u) for u in o.get("upload", ())),
        volumes=tuple(parse_volume(v) for v in o.get("volume", ())),
        workdir=workdir, workdir_size=parse_workdir_size(o.get("workdir_size", DEFAULT_WORKDIR_SIZE)),
        env=tuple(parse_env(o)), rootfs=rootfs, image=image,
        read_only=bool(o.get("read_only")),
        net=check_net("--net", o.get("net", "bridge")), user=parse_user(o["user"]) if "user" in o else None,
        cap_add=parse_caps("--cap-add", o.get("cap_add", ())),
        cap_drop=parse_caps("--cap-drop", o.get("cap_drop", ())),
        seccomp=o.get("seccomp", "default"), userns=bool(o.get("userns")),
        stats=bool(o.get("stats")), json_status=o.get("json_status"),
        cgroup_parent=o.get("cgroup_parent"), log_level=level,
        log_format=o.get("log_format", "text"), slurm=slurm,
    )


_USER_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def parse_user(text):
    """'UID[:GID]' -> (user, group or None), each a number or a name; names
    are resolved later, in the job's own /etc/passwd and /etc/group."""
    user, _, group = text.partition(":")
    out = []
    for part in (user, group) if ":" in text else (user,):
        if part.isdigit():
            if int(part) > 0xFFFFFFFE:  # (uid_t)-1 means "unchanged" to setuid(2)
                raise UsageError("-u/--user: %r: %s is out of range (0 to 4294967294)" % (text, part))
        elif not part or not set(part) <= _USER_CHARS or part[0] in "-.":
            raise UsageError("-u/--user: %r is not UID[:GID] (numbers, or names from the job's "
                             "/etc/passwd and /etc/group)" % text)
        out.append(part)
    return (out[0], out[1] if len(out) > 1 else None)


def parse_caps(opt, names):
    """Capability names as the user wrote them -> ('NET_ADMIN', 'ALL', ...):
    CAP_ prefix optional, any case."""
    out = []
    for name in names:
        key = name.upper()
        key = key[4:] if key.startswith("CAP_") else key
        if key != "ALL" and key not in CAPABILITIES:
            raise UsageError("%s: %r is not a capability (e.g. NET_ADMIN, SYS_PTRACE, or ALL; "
                             "see capabilities(7))" % (opt, name))
        out.append(key)
    return tuple(out)


# Where the kernel's own filesystems are mounted: nothing is uploaded or bound
# there (a DEST in them would be hidden, or would meet the kernel's files).
KERNEL_DIRS = ("/proc", "/sys", "/dev")


def job_path(opt, value, base="/"):
    """VALUE as a normalized absolute path inside the job (relative paths are
    under BASE).  '..' is refused outright rather than resolved: its meaning
    would depend on symlinks in the job's root, which jrun never follows."""
    if not value or "\0" in value or ".." in value.split("/"):
        raise UsageError("%s: %r: a path inside the job may not be empty or contain '..'" % (opt, value))
    path = "/" + os.path.normpath(os.path.join(base, value)).lstrip("/")
    if path == "/":
        raise UsageError("%s: %r: the job's root itself cannot be a destination" % (opt, value))
    for d in KERNEL_DIRS:
        if path == d or path.startswith(d + "/"):
            raise UsageError("%s: %r: %s belongs to the kernel inside the job; choose another DEST"
                             % (opt, value, d))
    return path


def parse_upload(text):
    """SRC[:DEST] -> Upload.  DEST defaults to SRC's name; a relative DEST is
    under /work, the upload area, whatever -w says (`--upload .:src -w
    /work/src` puts the tree where the command starts, not in /work/src/src);
    a DEST ending in '/' is a directory that receives SRC under its own name
    (like cp); an absolute DEST is itself."""
    src, sep, dest = text.partition(":")
    if not src or (sep and not dest):
        raise UsageError("--upload: %r is not SRC[:DEST]" % text)
    src = os.path.abspath(src)
    name = os.path.basename(src)
    if not name:
        raise UsageError("--upload: %r: refusing to upload the host's root directory" % text)
    if not sep:
        dest = name
    elif dest.endswith("/"):
        dest += name
    return Upload(src=src, dest=job_path("--upload", dest, DEFAULT_WORKDIR))


def parse_volume(text):
    """SRC:DEST[:ro|rw] -> Volume (absolute paths on both sides, like docker)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1] or parts[2:] not in ([], ["ro"], ["rw"]):
        raise UsageError("-v/--volume: %r is not SRC:DEST[:ro]" % text)
    src, dest = parts[0], parts[1]
    if not src.startswith("/") or "\0" in src:
        raise UsageError("-v/--volume: %r: SRC must be an absolute host path" % text)
    if not dest.startswith("/"):
        raise UsageError("-v/--volume: %r: DEST must be an absolute path inside the job" % text)
    return Volume(src=os.path.normpath(src), dest=job_path("-v/--volume", dest),
                  read_only=parts[2:] == ["ro"])


def parse_workdir_size(text):
    """A tmpfs size= value: bytes, or a percentage of RAM ('25%')."""
    if text.endswith("%"):
        pct = parse_int("--workdir-size", text[:-1], 1, 100)
        return "%d%%" % pct
    return str(parse_size("--workdir-size", text))


def parse_rootfs(text):
    """--rootfs -> (rootfs, image): minimal or host; a directory, if TEXT has
    a '/' or starts with '.'; else the NAME of an imported image, whose
    directory with_image() fills in (rootfs None until then)."""
    if text in ("minimal", "host"):
        return text, None
    if not text or "\0" in text:
        raise UsageError("--rootfs: %r is not minimal, host, a directory or an image" % text)
    if "/" in text or text.startswith("."):
        return os.path.abspath(text), None
    if len(text) > 63 or not set(text) <= _NAME_CHARS or text[0] in "-_":
        raise UsageError("--rootfs: %r is not minimal, host, an image name or a directory (a directory needs "
                         "a '/': ./%s)" % (text, text))
    return None, text


def parse_env(o):
    """-e and --env-file, in order of the command line; later wins."""
    out = {}
    for path in o.get("env_file", ()):
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise UsageError("--env-file: cannot read %r: %s" % (path, e.strerror)) from None
        except UnicodeDecodeError:
            raise UsageError("--env-file: %r is not UTF-8 text" % path) from None
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("export "):
                line = line[7:].lstrip()
            key, eq, value = line.partition("=")
            if not eq or not _env_key_ok(key) or "\0" in value:
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


_ENV_KEY_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _env_key_ok(key):
    return bool(key) and not key[0].isdigit() and set(key) <= _ENV_KEY_CHARS


def run_help():
    lines = [
        "usage: jrun [--config FILE] [OPTIONS] [--] COMMAND [ARG...]",
        "       jrun [--config FILE] run [OPTIONS] [--] COMMAND [ARG...]",
        "       jrun [--config FILE] ps [--json] [--all] | kill [-s SIGNAL] JOB | verify [--json] [OPTIONS]",
        "       jrun [--config FILE] gc [JOB...] [--slurm-job N]",
        "       jrun rootfs build [--force] | rootfs path | rootfs ls [--json] | rootfs rm NAME...",
        "       jrun rootfs import NAME FILE|DIR [--platform OS/ARCH] [--force]",
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
        "  %-30s %s" % ("    --config FILE", "host defaults from FILE instead of %s (first option only)"
                        % CONFIG_FILE),
        "  %-30s %s" % ("-h, --help", "show this help and exit"),
        "  %-30s %s" % ("    --version", "print the version and exit"),
        "",
        "exit status: COMMAND's own; 128+N killed by signal N; 137 out of memory;",
        "124 --timeout; 125 jrun failed; 126 not executable; 127 not found.",
        "See jrun(1).",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# The configuration file: host-wide defaults of run options and host settings.
# Read only if it exists: tomllib imports re (7 ms), a cost only hosts that
# use a config file pay.  Its values go through the same parsing as argv.
# ---------------------------------------------------------------------------

# Keys of jrun.toml, spelled like the long option: run options whose value
# becomes the default (the command line wins), then host settings.
CONFIG_RUN_KEYS = {
    "timeout": (str, int, float), "stop-timeout": (str, int, float), "init": bool,
    "cpu": (int, str), "cores": str, "memory": (str, int), "io-bps": (str, int), "pids": (int, str),
    "workdir": str, "workdir-size": (str, int), "rootfs": str, "read-only": bool, "net": str, "seccomp": str,
    "userns": bool, "stats": bool, "cgroup-parent": str, "log-level": str, "log-format": str,
}
CONFIG_HOST_KEYS = ("state-dir", "rootfs-dir", "image-dir", "audit-log", "subnet", "net-pool", "allow-link-local",
                    "network-idle")  # each sets the HostSettings field of its name, '-' read as '_'
CONFIG_HOST_BOOLS = ("allow-link-local",)  # the other host keys are strings (network-idle: or a number)


class HostSettings(_Frozen):
    """The host-wide settings, parsed once: CONFIG (the file they come
    from; NAMED: given with --config, which verify passes on to its jobs),
    the directories and audit log jrun uses, the default bridge's SUBNET and
    the NET_POOL named networks take a /24 each from (parsed: (int, prefix
    length)), whether jobs may reach IPv4 link-local addresses (cloud
    metadata) and how long an idle network stays (seconds).  main()
    installs the record load_config returns as HOST, before anything else
    runs; nothing changes it afterwards."""

    __slots__ = ("config", "named", "state_dir", "rootfs_dir", "image_dir", "audit_log", "subnet", "net_pool",
                 "allow_link_local", "network_idle")


DEFAULT_HOST = HostSettings(
    config=CONFIG_FILE, named=False, state_dir=DEFAULT_STATE_DIR, rootfs_dir=DEFAULT_ROOTFS_DIR,
    image_dir=DEFAULT_IMAGE_DIR, audit_log=DEFAULT_AUDIT_LOG, subnet=parse_subnet("subnet", DEFAULT_SUBNET),
    net_pool=parse_subnet("net-pool", DEFAULT_NET_POOL, NAMED_PREFIXLEN), allow_link_local=DEFAULT_ALLOW_LINK_LOCAL,
    network_idle=DEFAULT_NETWORK_IDLE)
HOST = DEFAULT_HOST  # the settings in use: main() sets it once, from load_config


def load_config(path, explicit=False):
    """Read jrun.toml at PATH: returns (the run option defaults ({dest:
    value} as split_argv makes them), the HostSettings).  A missing file is
    fine unless it was named with --config."""
    host = {"config": path, "named": explicit}
    if not os.path.exists(path):
        if explicit:
            raise UsageError("--config: %s: no such file" % path)
        return {}, DEFAULT_HOST.replace(**host)
    import tomllib

    try:
        # A config file can redirect the audit log and the state directory
        # of a root process: only root may have written it, and only root
        # may write its directory (or the file could be swapped for another).
        d = os.path.dirname(os.path.abspath(path))
        dfd = open_host_dir(d, path)
        try:
            check_private_dir(dfd, d, "%s: its directory" % path, "a user who may write it could swap the file")
            fd = os.open(os.path.basename(path), os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
        finally:
            os.close(dfd)
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != 0 or st.st_mode & 0o022:
                raise UsageError("%s: refusing a config file that is not owned by root or is writable by "
                                 "group or others (chown root; chmod go-w)" % path)
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UsageError("%s: %s" % (path, e)) from None  # "... (at line 3, column 10)"
    except OSError as e:
        raise UsageError("%s: cannot read: %s" % (path, e.strerror)) from None
    defaults = {}
    for key, value in data.items():
        types = CONFIG_RUN_KEYS.get(key) or (
            (bool if key in CONFIG_HOST_BOOLS else (str, int) if key == "network-idle" else str)
            if key in CONFIG_HOST_KEYS else None)
        if types is None:
            raise UsageError("%s: %s: unknown key (known: %s)"
                             % (path, key, ", ".join(list(CONFIG_RUN_KEYS) + list(CONFIG_HOST_KEYS))))
        if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
            want = "true or false" if types is bool else "a string" if types is str else "a number or a string"
            raise UsageError("%s: %s: %r should be %s" % (path, key, value, want))
        if key in CONFIG_HOST_KEYS:
            host[key.replace("-", "_")] = _host_setting("%s: %s" % (path, key), key, value)
            continue
        opt = _BY_NAME["--" + key]
        if types is bool:
            if value:
                defaults[opt.dest] = True
            continue
        value = str(value)
        # The same checks as on the command line, one key at a time, so
        # that the message can name the key at fault.
        try:
            parse_run([opt.long, value, "true"])
        except UsageError as e:
            msg = str(e)
            for flag in (opt.long, "%s/%s" % (opt.short, opt.long)):
                if msg.startswith(flag + ": "):
                    msg = msg[len(flag) + 2:]
            raise UsageError("%s: %s: %s" % (path, key, msg)) from None
        defaults[opt.dest] = value
    return defaults, DEFAULT_HOST.replace(**host)


def _host_setting(what, key, value):
    """The value of host KEY (type checked by load_config), parsed."""
    if key in ("subnet", "net-pool"):
        return parse_subnet(what, value, LONGEST_PREFIX if key == "subnet" else NAMED_PREFIXLEN)
    if key == "network-idle":
        text = str(value).strip()
        return 0.0 if text in ("0", "0s") else parse_duration(what, text)
    if key in CONFIG_HOST_BOOLS or (key == "audit-log" and value == ""):  # "": no audit log
        return value
    if not value.startswith("/") or "\0" in value:
        raise UsageError("%s: %r must be an absolute path" % (what, value))
    return value


# ---------------------------------------------------------------------------
# Validation: every check against this host, before the first side effect.
# ---------------------------------------------------------------------------


def rootfs_path(spec):
    return HOST.rootfs_dir if spec.rootfs == "minimal" else spec.rootfs


# Slurm.  Under Slurm jrun is one task of a step: slurmstepd starts it with
# SLURM_* in its environment and in the step's cgroups (proctrack/cgroup,
# task/cgroup).  jrun names the job after that task (slurm_task) and makes
# the job's cgroup inside the step's, so that Slurm's own limits (--mem, the
# cores it gave the task) bound the job too and its cancel reaches every
# process.  Outside Slurm this costs one environment lookup; the step is
# found in the /proc/self/cgroup that CgroupHost reads anyway.

# Slurm's numbers for its special steps (SLURM_BATCH_SCRIPT, SLURM_EXTERN_CONT
# in slurm.h), spelled as sacct spells them.
SLURM_STEP_NAMES = {"4294967294": "batch", "4294967295": "extern", "4294967291": "interactive"}
# The job.json/ps/--json-status/audit fields, from slurmstepd's variables.
SLURM_FIELDS = (("job_id", "SLURM_JOB_ID"), ("array_job_id", "SLURM_ARRAY_JOB_ID"),
                ("array_task_id", "SLURM_ARRAY_TASK_ID"), ("step", "SLURM_STEP_ID"), ("rank", "SLURM_PROCID"),
                ("local_rank", "SLURM_LOCALID"), ("node", "SLURMD_NODENAME"), ("cluster", "SLURM_CLUSTER_NAME"))


def slurm_task(environ=os.environ):
    """The Slurm task jrun runs as: {field: value as Slurm spells it} from
    SLURM_FIELDS (a batch script has no SLURM_STEP_ID: its step is "batch"),
    or None outside Slurm (no SLURM_JOB_ID).  The numbers become the job's
    name, so each must be one: the caller sets these variables (sudo's
    env_keep), and a name must never become a path."""
    if not environ.get("SLURM_JOB_ID"):
        return None
    defaults = {"step": "4294967294", "rank": "0", "local_rank": "0"}
    task = {k: environ.get(v) or defaults[k] for k, v in SLURM_FIELDS if environ.get(v) or k in defaults}
    task["step"] = SLURM_STEP_NAMES.get(task["step"], task["step"])
    for key, var in SLURM_FIELDS[:6]:
        if key in task and not task[key].isdigit() and not (key == "step" and task[key] in SLURM_STEP_NAMES.values()):
            raise UsageError("%s: %r is not a Slurm number (jrun names the job after it: give --name, or fix the "
                             "variable)" % (var, task[key]))
    return task


def slurm_job_name(task):
    """slurm-JOB[_TASK].STEP.RANK: the step as sacct spells it (12.0,
    11_1.batch) and the task's rank in the step."""
    job = task["job_id"]
    if "array_job_id" in task and "array_task_id" in task:
        job = "%s_%s" % (task["array_job_id"], task["array_task_id"])
    return "slurm-%s.%s.%s" % (job, task["step"], task["rank"])


def default_hostname(job_id):
    """A job id as a hostname: itself if it is one, '_' and '.' turned
    into '-' for a Slurm name (slurm-12_3.batch.0 -> slurm-12-3-batch-0)."""
    if job_id.startswith("slurm-"):
        return job_id.replace("_", "-").replace(".", "-")
    return job_id if all(c.isalnum() or c == "-" for c in job_id) else "jrun"


def open_status_dir(path):
    """--json-status FILE: its directory, opened now, before the job runs
    (the record is written into this fd at the end, see report_outcome), so
    that nothing the job or anyone else does meanwhile can redirect it."""
    import stat

    d, name = os.path.split(os.path.abspath(path))
    try:
        dfd = open_host_dir(d, "--json-status")
    except OSError as e:
        raise UsageError("--json-status: %s: %s (a writable file path is needed)"
                         % (e.filename or d, e.strerror)) from None
    try:
        if not os.access(".", os.W_OK, dir_fd=dfd):
            raise UsageError("--json-status: %s is not writable (a writable file path is needed)" % d)
        try:
            old = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return dfd
        if stat.S_ISDIR(old.st_mode):
            raise UsageError("--json-status: %r is a directory (a file path is needed)" % path)
        # In a directory others may write (/tmp), another user's file at
        # NAME was put there for jrun to find: root passes the sticky bit, so
        # the rename would replace it, but it is not the caller's to replace.
        trusted = {0, invoker_uid()}
        if old.st_uid not in trusted and _others_may_write(os.fstat(dfd), trusted):
            raise UsageError("--json-status: %s belongs to uid %d, in %s, which others may write: refusing to "
                             "replace another user's file or link (remove it, or write into a directory of "
                             "your own)"
                             % (path, old.st_uid, d))
    except BaseException:
        os.close(dfd)
        raise
    return dfd


def check_state_dir():
    """The state directory must be root's and closed to others (see
    check_private_dir): checked before the first side effect, if it exists."""
    fd = open_private_dir(HOST.state_dir, "state-dir", create=False)
    if fd is not None:
        os.close(fd)


def validate(spec):
    """Every check against this host; returns the spec with the host paths
    it names opened (see open_staging_sources, open_status_dir)."""
    if os.geteuid() != 0:
        raise UsageError("must run as root (try: sudo jrun ...)")
    for cls in RESOURCE_CLASSES:  # each host resource's own refusals
        cls.check(spec)
    if spec.init and not os.path.isfile(TINI):
        raise SetupError("--init needs %s (apt-get install tini)" % TINI)
    if os.uname().machine not in _SYSCALLS:
        raise SetupError("unsupported architecture %s (x86_64 and aarch64 are)" % os.uname().machine)
    check_staging_paths(spec)
    check_state_dir()
    spec = open_staging_sources(spec)
    if spec.json_status:
        spec = spec.replace(json_status_dir=open_status_dir(spec.json_status))
    return spec


def _under(path, top):
    return path == top or path.startswith(top.rstrip("/") + "/")


def check_staging_paths(spec):
    """Cross-checks of uploads and volumes (pure logic).  A volume is the
    host's own directory: jrun never creates a mount point or copies a file
    inside one, so nested volumes and uploads into a volume are refused."""
    for i, v in enumerate(spec.volumes):
        for w in spec.volumes[:i]:
            if _under(v.dest, w.dest) or _under(w.dest, v.dest):
                raise UsageError("-v/--volume: %s and %s: one DEST is inside the other (bind each "
                                 "host directory to its own place)" % (w.dest, v.dest))
    for up in spec.uploads:
        for v in spec.volumes:
            if _under(up.dest, v.dest):
                raise UsageError("--upload: %s: DEST %s is inside the volume %s, which is the host's %s "
                                 "(upload elsewhere, or put the file in %s on the host)"
                                 % (up.src, up.dest, v.dest, v.src, v.src))


def open_staging_sources(spec):
    """The host side of uploads, volumes and the rootfs's lower layer, each
    resolved once, now, following the symlinks the invoker named as they are
    at this moment, and kept as an fd: no later step uses the path again, so
    a symlink swapped in meanwhile (by a job through a shared volume, or by
    anyone) cannot redirect a copy or a bind.  Volumes and the rootfs are
    cloned here as detached mount trees, for the child to move into place:
    open_tree(2) clones only a mount of the caller's own mount namespace,
    and the child's is a new one (the fd of a host path is EINVAL there).
    Returns the spec with the fds in it."""
    import stat

    uploads = []
    for up in spec.uploads:
        try:
            fd = os.open(up.src, os.O_PATH | os.O_CLOEXEC)
        except OSError as e:
            raise UsageError("--upload: %s: %s" % (up.src, e.strerror)) from None
        uploads.append(up.replace(fd=fd))
        if not stat.S_ISREG(os.fstat(fd).st_mode) and not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise UsageError("--upload: %s is not a regular file or a directory" % up.src)
    volumes = []
    for v in spec.volumes:
        try:
            fd = clone_tree(v.src)
        except OSError as e:
            raise UsageError("-v/--volume: %s: %s (SRC must exist on the host)" % (v.src, os.strerror(e.errno))) \
                from None
        volumes.append(v.replace(fd=fd))
        mode = os.fstat(fd).st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            raise UsageError("-v/--volume: %s is a device node; volumes are mounted nodev" % v.src)
    return spec.replace(uploads=tuple(uploads), volumes=tuple(volumes), rootfs_fd=open_rootfs(spec))


def open_rootfs(spec):
    """The lower layer of the job's root (--rootfs minimal or PATH), cloned
    as a detached tree; None for --rootfs host."""
    if spec.rootfs == "host":
        return None
    import stat

    root = rootfs_path(spec)
    try:
        fd = clone_tree(root)
    except OSError as e:
        if spec.rootfs == "minimal":
            raise SetupError("the minimal rootfs is not built at %s (run: sudo jrun rootfs build)" % root) from None
        raise UsageError("--rootfs: %r is not a directory (%s; use minimal, host or a directory)"
                         % (spec.rootfs, os.strerror(e.errno))) from None
    st = os.fstat(fd)
    if spec.rootfs == "minimal":
        try:
            os.stat("bin/busybox", dir_fd=fd)
        except OSError:
            raise SetupError("the minimal rootfs is not built at %s (run: sudo jrun rootfs build)" % root) from None
    elif not stat.S_ISDIR(st.st_mode):
        raise UsageError("--rootfs: %r is not a directory (use minimal, host or a directory)" % spec.rootfs)
    elif os.path.samestat(st, os.stat("/")):
        raise UsageError("--rootfs: '/' is the host itself (use --rootfs host for its system "
                         "directories, read-only)")
    return fd


def close_staging_sources(spec):
    """The parent's copies, once the child (which has its own) is forked."""
    for fd in [u.fd for u in spec.uploads] + [v.fd for v in spec.volumes] + [spec.rootfs_fd]:
        if fd is not None:
            os.close(fd)


def workdir_bytes(spec):
    """The job's writable space in bytes (a percentage is of RAM, as tmpfs has it)."""
    if spec.workdir_size.endswith("%"):
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return ram * int(spec.workdir_size[:-1]) // 100
    return int(spec.workdir_size)


def workdir_inodes(spec):
    """How many files the job's writable space may hold: one per 4 KiB of
    it.  A tmpfs's own default (half of RAM's pages) would let a job fill
    gigabytes of kernel memory with empty files that its size= never counts."""
    return max(workdir_bytes(spec) // 4096, 1024)


def survey_uploads(spec):
    """Count the files and bytes of every upload (the parent, before any side
    effect): for the progress line, and to refuse uploads that cannot fit in
    the job's writable space, where every upload lands (volumes and the
    kernel's directories are refused as destinations).  Returns the spec
    with the counts in its Upload records."""
    import stat

    counted = []
    in_memory = inodes = 0
    for up in spec.uploads:
        files = size = pages = 0
        inodes += 1
        try:
            # Walked from SRC's own fd (open_staging_sources), never through
            # a symlink below it: what is counted is what is copied.
            st = os.fstat(up.fd)
            todo = [] if stat.S_ISREG(st.st_mode) else ["."]
            if not todo:
                files, size, pages = 1, st.st_size, -(-st.st_size // 4096)
            while todo:
                rel = todo.pop()
                dfd = openat2(up.fd, rel, os.O_RDONLY | os.O_DIRECTORY, RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)
                try:
                    for e in os.scandir(dfd):
                        inodes += 1
                        if e.is_dir(follow_symlinks=False):
                            todo.append(rel + "/" + e.name)
                            continue
                        files += 1
                        if e.is_file(follow_symlinks=False):
                            n = e.stat(follow_symlinks=False).st_size
                            size += n
                            pages += -(-n // 4096)
                finally:
                    os.close(dfd)
        except OSError as e:
            raise UsageError("--upload: %s: %s" % (up.src, os.strerror(e.errno))) from None
        counted.append(up.replace(files=files, bytes=size))
        in_memory += pages * 4096
    if in_memory > workdir_bytes(spec):
        raise UsageError("--upload: the uploads need %s, more than --workdir-size %s allows (the job's "
                         "writable space, which they share with everything the job writes; raise "
                         "--workdir-size)" % (fmt_size(in_memory), fmt_size(workdir_bytes(spec))))
    if inodes > workdir_inodes(spec):
        raise UsageError("--upload: the uploads hold %s files and directories, more than --workdir-size %s "
                         "allows (%s: one per 4 KiB; raise --workdir-size)" % (
                             format(inodes, ","), fmt_size(workdir_bytes(spec)),
                             format(workdir_inodes(spec), ",")))
    # Every upload lands on a tmpfs whose pages are charged to the job's
    # memory cgroup: more than --memory would be an OOM kill while staging.
    if spec.limits.memory and in_memory > spec.limits.memory:
        raise UsageError("--upload: the uploads need %s of memory (the job's files are in memory), more "
                         "than --memory %s allows (raise --memory, or bind the data with -v SRC:DEST:ro)"
                         % (fmt_size(in_memory), fmt_size(spec.limits.memory)))
    return spec.replace(uploads=tuple(counted))


# ---------------------------------------------------------------------------
# The parent: set up, release the child, supervise, tear down.
# ---------------------------------------------------------------------------


# The audit log: one JSON line per job start and end, appended by the jrun
# of that job (root, host namespaces).  Many jruns append to one file at
# once: each line is one write() to an O_APPEND file under an exclusive
# flock, so lines never interleave, even where O_APPEND alone would not
# promise it (long lines, NFS).


def invoking_user():
    """(uid, name) of the user behind sudo, else of the caller."""
    uid = os.environ.get("SUDO_UID")
    name = os.environ.get("SUDO_USER")
    if uid is None or not uid.isdigit():
        uid, name = os.getuid(), None
    if name is None:
        import pwd

        try:
            name = pwd.getpwuid(int(uid)).pw_name
        except KeyError:
            name = str(uid)
    return int(uid), name


def limits_record(spec):
    rec = {k: getattr(spec.limits, k) for k in spec.limits.__slots__ if getattr(spec.limits, k) is not None}
    if spec.timeout:
        rec["timeout_s"] = spec.timeout
    return rec


def _iso(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (t % 1 * 1000)


def slurm_field(spec):
    """{"slurm": the Slurm task} for the job's records, under Slurm only."""
    return {"slurm": spec.slurm} if spec.slurm else {}


def start_record(spec):
    uid, user = invoking_user()
    return {"time": _iso(time.time()), "event": "start", "job": spec.id, "uid": uid, "user": user,
            "command": list(spec.command), "limits": limits_record(spec), "net": spec.net,
            "rootfs": spec.rootfs, "jrun_pid": os.getpid(), **slurm_field(spec)}


def end_record(spec, out, duration):
    uid, user = invoking_user()
    rec = {"time": _iso(time.time()), "event": "end", "job": spec.id, "uid": uid, "user": user,
           "command": list(spec.command), "limits": limits_record(spec), "net": spec.net,
           "exit_code": out.exit_code, "signal": out.signal, "timed_out": out.timed_out,
           "oom_killed": bool(getattr(out, "oom_killed", False)), "duration_s": round(duration, 3),
           **slurm_field(spec)}
    for extra in ("cpu_s", "memory_peak_bytes", "io_read_bytes", "io_write_bytes"):
        if getattr(out, extra, None) is not None:
            rec[extra] = getattr(out, extra)
    if out.error:
        rec["error"] = out.error
    return rec


def append_audit_log(record, path=None):
    """Append one line; a log that cannot be written is a warning, not a
    reason to fail the job (the job's own status must stay its own)."""
    path = HOST.audit_log if path is None else path
    if not path:
        return
    line = (dumps_json(record) + "\n").encode("utf-8", "replace")
    # Only in a directory of root's that no one else may write, by name in
    # its fd, never through a symlink (or into a FIFO or device: O_NONBLOCK,
    # and a regular file is required).
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        dfd = open_private_dir(os.path.dirname(path), "audit log directory", 0o750)
        try:
            fd = os.open(os.path.basename(path), flags, 0o640, dir_fd=dfd)
        finally:
            os.close(dfd)
        try:
            import stat

            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            fcntl.flock(fd, fcntl.LOCK_EX)
            while line:
                line = line[os.write(fd, line):]
        finally:
            os.close(fd)
    except OSError as e:
        log("warning", "audit log %s: %s" % (path, e.strerror))
    except JrunError as e:
        log("warning", "audit log %s: %s" % (path, e))


class Outcome:
    def __init__(self):
        self.exit_code = None
        self.signal = None
        self.timed_out = False
        self.killed = False
        self.error = None
        # Accounting, from the job's cgroup (None: not measured here).
        self.duration_s = None
        self.cpu_s = None
        self.memory_peak_bytes = None
        self.io_read_bytes = None
        self.io_write_bytes = None
        self.oom_kills = 0

    @property
    def oom_killed(self):
        return self.oom_kills > 0

    def status_record(self, spec):
        """The --json-status fields (see the contract)."""
        r3 = (lambda v: None if v is None else round(v, 3))
        return {"id": spec.id, "exit_code": self.exit_code, "signal": self.signal,
                "oom_killed": self.oom_killed, "timed_out": self.timed_out,
                "duration_s": r3(self.duration_s), "cpu_s": r3(self.cpu_s),
                "memory_peak_bytes": self.memory_peak_bytes, "io_read_bytes": self.io_read_bytes,
                "io_write_bytes": self.io_write_bytes, **slurm_field(spec)}

    def stats_line(self, spec):
        def size(v):
            return "n/a" if v is None else fmt_size(v)

        return ("job %s: exit %s, wall %.2fs, cpu %s, memory peak %s, io read %s, written %s, oom kills %d"
                % (spec.id, self.exit_code, self.duration_s or 0.0,
                   "n/a" if self.cpu_s is None else "%.2fs" % self.cpu_s, size(self.memory_peak_bytes),
                   size(self.io_read_bytes), size(self.io_write_bytes), self.oom_kills))


def run_job(spec, kinds):
    """Run the job of SPEC; KINDS: what the caller's fds 0-2 are (see
    stdio_kinds)."""
    # From here on the signals jrun acts on wait for its wait loop (one that
    # came during setup must not kill jrun before it can clean up; they are
    # never unblocked again: jrun exits after the job), and the end of
    # jrun's caller is one of them.
    signal.pthread_sigmask(signal.SIG_BLOCK, WAITED_SIGNALS)
    # An ignored SIGCHLD (inherited through exec) would make the kernel
    # reap the job itself, and its status would be lost.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    die_with_caller()
    spec = validate(with_image(spec))
    spec = survey_uploads(spec)
    teardown = Teardown()
    state = JobState(spec.id)
    state.create(numbered=spec.slurm is not None and not spec.named)
    if state.id != spec.id:  # a Slurm name taken on this node: NAME-2, ...
        hostname = default_hostname(state.id) if spec.hostname == default_hostname(spec.id) else spec.hostname
        spec = spec.replace(id=state.id, hostname=hostname)
        _log["job"] = spec.id
    teardown.push("state %s removed" % state.dir, state.remove)
    out = Outcome()
    started = None
    try:
        os.mkdir("root", 0o700, dir_fd=state.fd)
        state.save(id=spec.id, command=list(spec.command), hostname=spec.hostname,
                   started=time.time(), net=spec.net, limits=limits_record(spec),
                   user=invoking_user()[1], jrun_pid=os.getpid(), **slurm_field(spec))
        append_audit_log(start_record(spec))
        started = time.monotonic()
        return supervise(spec, state, teardown, out, kinds)
    except JrunError as e:
        if out.exit_code is None:
            out.exit_code = e.exit_code
        out.error = out.error or str(e)
        raise
    finally:
        teardown.run()
        # After teardown: when the status file appears, nothing of the job
        # is left on the host.
        if out.exit_code is not None and started is not None:
            report_outcome(spec, out)
        if started is not None:
            append_audit_log(end_record(spec, out, time.monotonic() - started))


def report_outcome(spec, out):
    if spec.stats:
        line = out.stats_line(spec)
        if _log["format"] == "json":
            rec = dict(time=round(time.time(), 6), level="info", msg=line, job=spec.id)
            rec.update(out.status_record(spec))
            line = dumps_json(rec)
        else:
            line = "jrun: " + line
        os.write(2, (line + "\n").encode())
    if spec.json_status_dir is not None:
        # Into the directory opened at validation, by create-and-rename: a
        # symlink the job left at FILE (in a volume) is replaced, not followed.
        try:
            replace_file(spec.json_status_dir, os.path.basename(os.path.abspath(spec.json_status)),
                         (dumps_json(out.status_record(spec)) + "\n").encode())
        except OSError as e:
            log("error", "--json-status: cannot write %s: %s" % (spec.json_status, e.strerror))


def die_with_caller():
    """The death of jrun's caller (a batch shell killed, leaving jrun
    orphaned) is a SIGTERM to jrun, so that its job stops as if the caller
    had sent it.  The kernel sends it when the parent *thread* ends (under
    sudo: sudo's only one)."""
    caller = os.getppid()
    sys_prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != caller:  # gone before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def supervise(spec, state, teardown, out, kinds):
    # Data format of the status pipe, child to parent, closed on exec:
    #   b"R\n"                    the child has its namespaces and waits on
    #                             the sync pipe for the parent to attach them;
    #   b"E<status> <message>\n"  the child's setup failed; it exits with
    #                             <status> (STATUS_ERRORS: the error it is);
    #   EOF (empty read)          exec succeeded (or the child died).
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    # Data format of the sync pipe, parent to child: one byte b"G" releases
    # the child once its cgroup and network are attached; EOF instead (the
    # parent gave up or died) makes it exit.  sync_w stays open for the
    # job's life: the child checks it for EOF after its last credential
    # change (drop_privileges).
    sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
    resources = host_resources(spec)
    for res in resources:
        res.setup(state)
        teardown.push(res.name, res.teardown)
    stdio = JobStdio(kinds)
    plan = ChildPlan(spec=spec, state_dir=state.dir, status_w=status_w, sync_r=sync_r,
                     parent_pid=os.getpid(), resources=resources, stdio=stdio)
    import prctl  # noqa: F401 - for the child: cheaper here than after fork (copy-on-write faults)

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
    close_staging_sources(spec)
    os.close(status_w)
    os.close(sync_r)
    stdio.close_job_ends()
    state.save(pid=pid)
    reaped = relay = None
    try:
        relay = Relay(stdio) if stdio.relayed else None
        status = _read_status(status_r)
        if status == "R":
            for res in resources:
                res.attach(pid)
            os.write(sync_w, b"G")
            trace("child released from the sync pipe")
            status = _read_status(status_r, relay_to=pid if spec.uploads else None)
        if status and status.startswith("E"):
            code, _, msg = status[1:].partition(" ")
            out.error = msg
            out.exit_code = int(code)
            _, ws = os.waitpid(pid, 0)
            reaped = ws
            if relay:
                relay.finish(spec.stop_timeout)  # what the child wrote (--log-level debug)
            raise error_of_status(out.exit_code)(msg)
        # COMMAND runs from here: --timeout does not count the uploads' copy.
        started = time.monotonic()
        if relay:
            relay.start()
        reaped = wait_for_job(spec, pid, out, started, relay)
        out.duration_s = time.monotonic() - started
        for res in resources:
            res.collect(out)
        if out.oom_killed and not out.timed_out:
            out.exit_code = EXIT_OOM
            log("error", "job killed: out of memory (limit %s)" % memory_bound(spec))
    finally:
        os.close(sync_w)
        os.close(status_r)
        if reaped is None:
            _kill_and_reap(pid)
        if relay:
            relay.close()  # the caller's terminal restored, on every path
        stdio.close()
    return out.exit_code


def _read_status(fd, relay_to=None):
    """One line from the child's status pipe; '' at EOF (exec succeeded).
    With RELAY_TO, a signal to forward that arrives meanwhile (the child may
    be copying uploads for a while) is passed on: the child keeps it blocked,
    and either stops its copy or COMMAND gets it at exec."""
    buf = b""
    while not buf.endswith(b"\n"):
        if relay_to is not None:
            import select

            while not select.select([fd], [], [], 0.2)[0]:
                info = signal.sigtimedwait(FORWARDED_SIGNALS, 0)
                if info is not None:
                    _signal(relay_to, info.si_signo)
        chunk = os.read(fd, 1)
        if not chunk:
            break
        buf += chunk
    return buf.decode("utf-8", "surrogateescape").rstrip("\n")


def _kill_and_reap(pid):
    _signal(pid, signal.SIGKILL)
    while True:
        try:
            if os.waitpid(-1, WALL)[0] == pid:  # threads jrun traces too: see _reap
                return
        except ChildProcessError:
            return


def wait_for_job(spec, pid, out, started, relay=None):
    """Wait for PID 1 of the job, relaying signals (and the job's stdio) and
    enforcing --timeout.  Returns the wait status."""
    deadline = started + spec.timeout if spec.timeout else None
    kill_at = None

    def say(level, msg):  # after the job's own output so far
        if relay:
            relay.flush()
        log(level, msg)

    def stop(sig, why, forwarding):
        """Relay SIG to PID 1, or SIGKILL at once if PID 1 cannot act on it
        (under --init, tini handles them all); returns when to send SIGKILL."""
        name = signal_name(sig)
        if spec.init or _handles(pid, sig):
            say("warning" if forwarding is None else "info", "%s; %s" % (why, forwarding or "sending " + name))
            _signal(pid, sig)
            return time.monotonic() + spec.stop_timeout
        out.killed = True
        say("warning", "%s; PID 1 has no handler for %s (the kernel ignores it for a namespace's init): "
            "sending SIGKILL" % (why, name))
        _signal(pid, signal.SIGKILL)
        return None

    while True:
        ws = _reap(pid)
        if ws is not None:
            break
        now = time.monotonic()
        waits = [t - now for t in (deadline, kill_at) if t is not None]
        timeout = max(0.0, min(waits)) if waits else None
        for sig in relay.wait(timeout) if relay else _sigwait(timeout):
            if sig == signal.SIGWINCH and relay:
                relay.resize()
            elif sig in FORWARDED_SIGNALS and not out.killed:
                when = stop(sig, "job %s: %s received" % (spec.id, signal_name(sig)),
                            "forwarding it to the job")
                kill_at = when if kill_at is None else kill_at
        while relay and relay.typed and not out.killed:
            # The job's pty sent the signal itself; only PID 1's deafness to it is jrun's business.
            sig, pgrp = relay.typed.pop(0)
            if pgrp == pid and not spec.init and not _handles(pid, sig):
                stop(sig, "job %s: %s typed" % (spec.id, "^C" if sig == signal.SIGINT else "^\\"), None)
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            out.timed_out = True
            deadline = None
            if not out.killed:
                kill_at = stop(signal.SIGTERM, "job %s timed out after %s" % (spec.id, _fmt_dur(spec.timeout)),
                               None)
        if kill_at is not None and now >= kill_at and not out.killed:
            out.killed = True
            say("warning", "job %s still running %s after SIGTERM; sending SIGKILL"
                % (spec.id, _fmt_dur(spec.stop_timeout)))
            _signal(pid, signal.SIGKILL)
            kill_at = None
    if relay:
        relay.finish(spec.stop_timeout)
    if os.WIFSIGNALED(ws):
        out.signal = os.WTERMSIG(ws)
        out.exit_code = 128 + out.signal
    else:
        out.exit_code = os.WEXITSTATUS(ws)
    if out.timed_out:
        out.exit_code = EXIT_TIMEOUT
    return ws


def _sigwait(timeout):
    info = signal.sigtimedwait(WAITED_SIGNALS, 3600.0 if timeout is None else timeout)
    return () if info is None else (info.si_signo,)


def _handles(pid, sig):
    """Whether PID has a handler for SIG (SigCgt in /proc/PID/status).  A
    PID namespace's init without one never gets SIG: the kernel drops it
    (all but SIGKILL, and SIGSTOP from outside the namespace)."""
    try:
        with open("/proc/%d/status" % pid, "rb") as f:
            for line in f:
                if line.startswith(b"SigCgt:"):
                    return bool(int(line[7:], 16) >> (sig - 1) & 1)
    except (OSError, ValueError):
        pass
    return True  # not known (gone already): relay it, as before


def _reap(pid):
    """PID 1's wait status once it has ended, else None.  A job can make
    jrun the tracer of PID 1 or of one of its threads (PTRACE_TRACEME
    names the parent): every ptrace-stop is ended by detaching, and a
    traced thread that has exited is reaped (__WALL), for until then the
    kernel cannot release PID 1 itself.  (While it waits, jrun has no
    other children.)"""
    while True:
        try:
            wpid, ws = os.waitpid(-1, os.WNOHANG | WALL)
        except ChildProcessError:
            raise SetupError("job %d: lost (already reaped)" % pid) from None
        if wpid == 0:
            return None
        if os.WIFSTOPPED(ws):
            _release_tracee(wpid, os.WSTOPSIG(ws))
        elif wpid == pid:
            return ws


def _release_tracee(tid, sig):
    """Detach a thread of the job that made jrun its tracer and has stopped,
    passing on the signal it stopped with, so that the job goes on as if it
    had never been traced: the kernel drops a SIGSTOP raised inside the
    namespace for an untraced init, so that one is dropped here too; a
    group-stop (no siginfo) stays stopped."""
    sender = ptrace_sender(tid)
    if sender is None or (sig == signal.SIGSTOP and sender != 0):
        sig = 0
    trace("thread %d of the job stopped with jrun as its tracer (PTRACE_TRACEME): detached, signal %d"
          % (tid, sig))
    ptrace_detach(tid, sig)


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _fmt_dur(seconds):
    return ("%gs" % seconds) if seconds < 120 else ("%gm" % (seconds / 60))


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
                trace("teardown: %s" % what)
            except Exception as e:  # noqa: BLE001 - teardown must go on
                log("warning", "teardown: %s: %s" % (what, e))


class JobState:
    """The state directory of one job, in the parent (host namespaces)."""

    def __init__(self, job_id):
        self.id = job_id
        self.dir = os.path.join(HOST.state_dir, job_id)
        self.fd = None  # the directory, once created: every write is relative to it
        self.lock_fd = None
        self.record = {}

    def create(self, numbered=False):
        """NUMBERED: the id is a default name (Slurm's, one per task), which
        another live job of the same task may hold (two jruns in one batch
        script): then the first of ID-2, ID-3, ... that is free."""
        top = open_private_dir(HOST.state_dir, "state-dir")
        base, n, tries = self.id, 1, 0
        try:
            while True:
                try:
                    os.mkdir(self.id, 0o700, dir_fd=top)
                    break
                except FileExistsError:
                    other = JobState(self.id)
                    if other.is_live():
                        if not numbered or n >= 999:
                            raise UsageError("--name %s: a job with this name is already running" % self.id) from None
                        n += 1
                        self.id = "%s-%d" % (base, n)
                        self.dir = os.path.join(HOST.state_dir, self.id)
                        continue
                    # A dead job's leftovers: clean, then take the name (if a
                    # concurrent `jrun gc` is at it, give it a moment).
                    tries += 1
                    if tries > 3:
                        raise SetupError("cannot create %s" % self.dir) from None
                    if not gc_job(self.id):
                        time.sleep(0.2)
            self.fd = os.open(self.id, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=top)
        finally:
            os.close(top)
        # The lock file appears already locked (made under another name,
        # locked, renamed): a `jrun gc` that finds "lock" and can take it
        # knows the job is gone, never that it has not locked it yet.
        self.lock_fd = os.open("lock.new", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                               dir_fd=self.fd)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename("lock.new", "lock", src_dir_fd=self.fd, dst_dir_fd=self.fd)
        trace("state: %s created and locked" % self.dir)

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
        replace_file(self.fd, "job.json", (dumps_json(self.record) + "\n").encode())

    def load(self):
        import json

        try:
            with open(os.path.join(self.dir, "job.json"), encoding="utf-8") as f:
                self.record = json.load(f)
        except (OSError, ValueError):
            self.record = {}
        return self.record

    def remove(self):
        """Everything in the directory (job.json, the lock, a temporary file
        a crash left, the empty mount point root), then the directory."""
        fd = self.fd
        if fd is None:
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for name in os.listdir(fd):
                try:
                    os.rmdir(name, dir_fd=fd) if name == "root" else os.unlink(name, dir_fd=fd)
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)
            self.fd = None
        os.rmdir(self.dir)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


# ---------------------------------------------------------------------------
# Host resources.  One small class per resource, all with the same verbs,
# declared once on Resource below (each verb's docstring says which process
# runs it, and when); run_job checks them, supervise sets them up in order
# and tears them down in reverse, the child enters them, gc rebuilds them.
# ---------------------------------------------------------------------------


class RootOwner(_Frozen):
    """Who owns the job's root as the host sees it, found once by the child
    (Resource.root_owner): host uid and gid BASE are the job's 0; a job uid
    must be below LIMIT (None: any); USERNS_FD, when not None, is the user
    namespace the rootfs is idmapped through and the child joins last."""

    __slots__ = ("base", "limit", "userns_fd")

    @property
    def mapped(self):
        return self.userns_fd is not None


HOST_ROOT = RootOwner(base=0, limit=None, userns_fd=None)


class Resource:
    """One kind of host object a job needs.  The verbs, in lifecycle order;
    every one has a default here (nothing to do), so a subclass implements
    only what its resource needs, and callers never probe for a hook."""

    name = "resource"

    def __init__(self, spec):
        self.spec = spec

    @classmethod
    def check(cls, spec):
        """Runs in: parent, before the first side effect (validate, for
        every class in RESOURCE_CLASSES, used by the job or not).  Refuse
        (UsageError, SetupError) what this host cannot give the job."""

    def setup(self, state):
        """Runs in: parent, before the fork (supervise).  Make the host
        object and record in STATE (job.json) what gc needs to remove it;
        its teardown is registered as soon as this returns."""

    def attach(self, pid):
        """Runs in: parent, once the child (PID) has its namespaces and
        waits on the sync pipe, before its release."""

    def enter(self):
        """Runs in: child, after its release, before the root is built."""

    def root_owner(self):
        """Runs in: child, before the root is built: the RootOwner of the
        job's root if this resource decides it, else None (HOST_ROOT)."""
        return None

    def etc_files(self):
        """Runs in: child, while the root is built (before pivot_root):
        {path in the root: content}, such as /etc/hosts."""
        return {}

    def enter_root(self):
        """Runs in: child, after pivot_root, /proc and /sys: what the job
        sees of this resource (e.g. its cgroup mounted)."""

    def collect(self, out):
        """Runs in: parent, after the job ended, before teardown: its
        accounting into OUT (an Outcome)."""

    def teardown(self):
        """Runs in: parent (in reverse setup order) or gc.  Idempotent, skips
        what was never made, logs instead of raising where it can."""

    def remains(self):
        """Runs in: gc, after teardown: what of it is still on the host (the
        dead job's state directory stays for the next gc while anything
        does, since job.json is jrun's only proof that it made it)."""
        return []

    @classmethod
    def from_state(cls, record):
        """Runs in: gc, for a dead job.  Rebuild from its job.json RECORD so
        that teardown() can remove what it made; None if the job made
        nothing of this kind."""
        return None

    @classmethod
    def orphans(cls, known_ids):
        """Runs in: gc (collect_orphans).  Yield instances, ready for
        teardown(), of host objects of this kind that jrun made (a cgroup
        under jrun's subtree, a veth named jr*, ...) and whose job has no
        state directory (jrun crashed between making them and recording
        them, or someone deleted /run/jrun).  Enumerate the host objects
        FIRST, then call known_ids() (the job ids that have a state
        directory now): a job creates its state directory before any
        resource and removes it after all of them, so an object seen before
        the call belongs to a job in known_ids() unless that job is gone.
        teardown() of an orphan must be as idempotent as any other."""
        return ()


# ---------------------------------------------------------------------------
# cgroups: the second stage of resource control.  Every job gets its own
# cgroup, with or without limits: it accounts for the job and lets teardown
# find and kill every process of it.  CgroupV1 and CgroupV2 share one
# interface; the version is detected once (cgroup_host()).  What the verbs
# (see Resource) do here: setup mkdirs and writes the limits; attach puts
# the child in; enter verifies membership and limits, then makes the job's
# own cgroup namespace; enter_root shows its cgroup read-only; collect reads
# the cgroup's own counters; teardown kills what is left, rmdir.
# ---------------------------------------------------------------------------


# What this host's cgroups look like, learnt once per run from
# /proc/self/mounts: cgroup v2 if /sys/fs/cgroup itself is a cgroup2 mount,
# else the v1 hierarchies (a hybrid host's /sys/fs/cgroup/unified holds no
# controller jrun uses).  Cgroup.check checks limits against it; Cgroup
# builds on it.

CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_SUBTREE = "jrun"
CPU_PERIOD_US = 100000
# Below this a job cannot even start (the child's own pages, busybox's page
# cache); a limit under it would fail in confusing ways, so it is refused.
MEMORY_FLOOR = 4 << 20
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices")
# The controllers each limit needs, by cgroup version.
_LIMIT_CONTROLLERS = {
    "cpu": ("--cpu", "cpu", "cpu"), "cores": ("--cores", "cpuset", "cpuset"),
    "memory": ("--memory", "memory", "memory"), "pids": ("--pids", "pids", "pids"),
    "io_bps": ("--io-bps", "blkio", "io"),
}


class CgroupHost:
    """version 1 or 2; v1: mounts = {controller: (mountpoint, options)};
    slurm_steps = {hierarchy: path}: the Slurm step jrun runs in, in each
    hierarchy where Slurm made one (v1: named as in /proc/self/cgroup;
    v2: ""), as a path relative to the hierarchy's root (see slurm_step_of)."""

    def __init__(self):
        self.version = 1
        self.mounts = {}
        self.slurm_steps = {}
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                _src, point, fstype, opts = line.split()[:4]
                if point == CGROUP_ROOT and fstype == "cgroup2":
                    self.version, self.mounts = 2, {}
                    break
                if fstype == "cgroup":
                    ctrls = [o for o in opts.split(",") if o in V1_CONTROLLERS]
                    for c in ctrls:
                        self.mounts.setdefault(c, (point, ",".join(ctrls)))
        # v1: a hierarchy is named by all its controllers, as /proc/self/cgroup
        # spells them ("cpu,cpuacct", "net_cls,net_prio"), whatever jrun uses.
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                for c in ctrls.split(","):
                    if c in self.mounts:
                        self.mounts[c] = (self.mounts[c][0], ctrls)
                step = slurm_step_of(path, self.version)
                if step and (ctrls or self.version == 2):
                    self.slurm_steps[ctrls] = step

    def controllers(self, parent):
        """The controllers a job under PARENT (relative to the root) can use."""
        if self.version == 1:
            return set(self.mounts)
        try:
            with open(os.path.join(CGROUP_ROOT, parent, "cgroup.controllers"), encoding="utf-8") as f:
                return set(f.read().split())
        except FileNotFoundError:
            return set()


_cgroup_host = []


def cgroup_host():
    if not _cgroup_host:
        _cgroup_host.append(CgroupHost())
    return _cgroup_host[0]


def cgroup_parent(spec):
    """--cgroup-parent as a path relative to each hierarchy's root."""
    return (spec.cgroup_parent or CGROUP_SUBTREE).strip("/")


def jrun_subtrees():
    """jrun's own shared parent, <hierarchy>/jrun, in each hierarchy."""
    host = cgroup_host()
    points = [CGROUP_ROOT] if host.version == 2 else sorted({p for p, _ in host.mounts.values()})
    return [os.path.join(p, CGROUP_SUBTREE) for p in points]


def remove_unused_subtrees(subtrees):
    """The last job to leave jrun's shared parent removes it, so that nothing
    of jrun stays on the host.  rmdir refuses (EBUSY) while any job's cgroup
    is below it; a job starting meanwhile makes it again (Cgroup.setup)."""
    for sub in subtrees:
        try:
            os.rmdir(sub)
            trace("cgroup: %s removed (no job left in it)" % sub)
        except OSError:
            pass


def slurm_step_of(path, version):
    """The Slurm step cgroup that PATH (a line of /proc/self/cgroup) is in,
    relative to its hierarchy's root, or None.  cgroup/v1 makes the step
    /slurm[_NODE]/uid_U/job_J/step_S in each hierarchy it uses (then
    task_T below it); cgroup/v2 puts the tasks in .../job_J/step_S/user/
    task_T (slurmstepd itself in step_S/slurm), and a job's cgroup goes
    beside them, in step_S/user (no process may be in a v2 cgroup that has
    children with controllers: user has none of its own)."""
    parts = path.split("/")
    for i in range(1, len(parts) - 1):
        if not (parts[i].startswith("job_") and parts[i][4:].isdigit() and parts[i + 1].startswith("step_")):
            continue
        if version == 1 and i == 3 and parts[1].startswith("slurm") and parts[2].startswith("uid_") \
                and parts[2][4:].isdigit():
            return "/".join(parts[1:5])
        if version == 2 and i + 2 < len(parts) and parts[i + 2] == "user":
            return "/".join(parts[1:i + 3])
    return None


def job_cgroup_parents(spec):
    """(parents, step): where the job's cgroup goes, {hierarchy: parent
    relative to its root} (v1: every hierarchy jrun may use; v2: ""), and
    whether that is inside a Slurm step.  In a step (found in
    /proc/self/cgroup, or insisted on with --cgroup-parent slurm, or its own
    path given as --cgroup-parent): the step's cgroup wherever Slurm made
    one, jrun's own subtree elsewhere (Slurm's v1 step has no pids, cpu or
    blkio cgroup).  Otherwise --cgroup-parent, or jrun's own subtree, in
    every hierarchy."""
    host = cgroup_host()
    names = [""] if host.version == 2 else sorted({ctrls for _, ctrls in host.mounts.values()})
    want = spec.cgroup_parent
    steps = host.slurm_steps
    if want == "slurm":
        if not any(n in steps for n in names):
            raise UsageError("--cgroup-parent: slurm: jrun is not in a Slurm step's cgroup (/proc/self/cgroup "
                             "shows none: run it as a task of sbatch or srun, with proctrack/cgroup or task/cgroup)")
    elif want:
        rel = want.strip("/")
        if slurm_step_of("/" + rel, host.version) != rel:
            return {n: rel for n in names}, False
        steps = {n: rel for n in names if os.path.isdir(os.path.join(_hierarchy_root(n), rel))}
    parents = {n: steps.get(n, CGROUP_SUBTREE) for n in names}
    return parents, any(p != CGROUP_SUBTREE for p in parents.values())


def memory_bound(spec):
    """The memory limit that bounds the job, for the OOM message."""
    if spec.limits.memory:
        return fmt_size(spec.limits.memory)
    parents, in_step = job_cgroup_parents(spec)
    mem = next((p for n, p in parents.items() if n == "" or "memory" in n.split(",")), CGROUP_SUBTREE)
    return "none of its own: the Slurm step's" if in_step and mem != CGROUP_SUBTREE else "none: the host's"


def _hierarchy_root(ctrls):
    """The mount point of a hierarchy named as in /proc/self/cgroup."""
    mounts = cgroup_host().mounts
    return next((mounts[c][0] for c in ctrls.split(",") if c in mounts), CGROUP_ROOT)


def parse_cpuset(opt, text):
    """'0-1,3' -> (0, 1, 3)."""
    cpus = set()
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not (lo.isdigit() and (not dash or hi.isdigit())) or (dash and int(hi) < int(lo)):
            raise UsageError("%s: %r is not a CPU list (use e.g. 0, 0-1, 0-1,3)" % (opt, text))
        cpus.update(range(int(lo), int(hi if dash else lo) + 1))
    return tuple(sorted(cpus))


def format_cpuset(cpus):
    """(0, 1, 3) -> '0-1,3', the kernel's own spelling."""
    out, cpus = [], sorted(cpus)
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else "%d-%d" % (cpus[i], cpus[j]))
        i = j + 1
    return ",".join(out)


def _read_cpuset_file(path):
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    return parse_cpuset(path, text) if text else ()


def _mount_of(path):
    """(fstype, source, super options) of the mount holding PATH."""
    path = os.path.realpath(path)
    best = ("", "", "", "")
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            point = pre.split()[4].replace("\\040", " ")
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
                fstype, source, opts = (post.split() + ["", "", ""])[:3]
                best = (point, fstype, source, opts)
    return best[1:]


def block_devices(paths, _depth=0):
    """The whole disks ("major:minor") that back PATHS, found at run time:
    st_dev for a filesystem on a block device (a partition is walked up to
    its disk, because the throttle works per disk); an overlay is followed to
    its layers; tmpfs and other memory filesystems have no disk and add none."""
    devs = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        dev = "%d:%d" % (os.major(st.st_dev), os.minor(st.st_dev))
        if os.major(st.st_dev) == 0:  # btrfs, overlay, tmpfs: an anonymous device
            fstype, source, opts = _mount_of(p)
            dev = None
            if fstype == "overlay" and _depth < 4:
                layers = [o.split("=", 1)[1] for o in opts.split(",") if o.startswith(("lowerdir=", "upperdir="))]
                devs += [d for d in block_devices([x for lay in layers for x in lay.split(":")], _depth + 1)
                         if d not in devs]
            elif source.startswith("/dev/"):
                try:
                    rdev = os.stat(source).st_rdev
                    dev = "%d:%d" % (os.major(rdev), os.minor(rdev))
                except OSError:
                    pass
        sysdir = "/sys/dev/block/%s" % dev
        if dev is None or not os.path.isdir(sysdir):
            continue
        if os.path.exists(os.path.join(sysdir, "partition")):
            with open(os.path.join(sysdir, "..", "dev"), encoding="utf-8") as f:
                dev = f.read().strip()
        if dev not in devs:
            devs.append(dev)
    return devs


def io_paths(spec):
    """Where the job's files live on the host: its root's lower layer, or
    under --rootfs host the host's system directories and /etc that the job
    reads through read-only binds; and its volumes.  (The writable layer,
    /tmp and the default workdir are tmpfs: no disk IO.)"""
    if spec.rootfs == "host":
        paths = ["/" + n for n in HOST_SYSTEM_DIRS if os.path.isdir("/" + n)] + ["/etc"]
    else:
        paths = [rootfs_path(spec)]
    return paths + [v.src for v in spec.volumes]


ACCOUNTING_CONTROLLERS = {1: ("memory", "pids", "cpuacct", "blkio"), 2: ("memory", "pids", "io")}
# v1's device allow-list is a controller (v2's is an eBPF program, which
# needs none): see Cgroup.restrict_devices.
GUARD_CONTROLLERS = {1: ("devices",), 2: ()}


def cgroup_controllers(spec):
    """The controllers the job's cgroup uses: those its limits need (each
    must exist here, or the run is refused), those that account for it
    (--stats, --json-status, and killing every process at the end) and v1's
    device allow-list, where the host has them."""
    host = cgroup_host()
    parents, in_step = job_cgroup_parents(spec)
    if host.version == 2:
        parent = parents[""]
        where = os.path.join(CGROUP_ROOT, parent) if parent != CGROUP_SUBTREE else CGROUP_ROOT
        if not os.path.isdir(where):
            raise UsageError("--cgroup-parent: %s does not exist (create or delegate it first)" % where)
        have = host.controllers(parent if parent != CGROUP_SUBTREE else "")
    else:
        have = {c for c, (point, ctrls) in host.mounts.items()
                if parents[ctrls] == CGROUP_SUBTREE or os.path.isdir(os.path.join(point, parents[ctrls]))}
    need = []
    for field, (opt, v1, v2) in _LIMIT_CONTROLLERS.items():
        ctrl = v1 if host.version == 1 else v2
        if getattr(spec.limits, field) is None:
            continue
        if ctrl not in have:
            if in_step and host.version == 2:
                raise UsageError("%s: Slurm did not enable the cgroup v2 '%s' controller for this step (/%s has "
                                 "%s): the job's cgroup is inside the step's; ask Slurm for it in cgroup.conf"
                                 % (opt, ctrl, parents[""], " ".join(sorted(have)) or "none"))
            if spec.cgroup_parent and (host.version == 2 or ctrl in host.mounts):
                raise UsageError("%s: the cgroup v%d '%s' controller is not available under --cgroup-parent %s"
                                 " (delegate it, or create the parent in that hierarchy)"
                                 % (opt, host.version, ctrl, spec.cgroup_parent))
            raise UsageError("%s: this host has no cgroup v%d '%s' controller" % (opt, host.version, ctrl))
        need.append(ctrl)
    if not have and spec.cgroup_parent:
        raise UsageError("--cgroup-parent: %s does not exist (create or delegate it first)" % os.path.join(
            host.mounts.get("memory", (CGROUP_ROOT + "/memory",))[0], cgroup_parent(spec)))
    if not have:
        raise SetupError("no cgroup v1 hierarchy of %s is mounted under %s" % (", ".join(V1_CONTROLLERS), CGROUP_ROOT))
    used = ACCOUNTING_CONTROLLERS[host.version] + GUARD_CONTROLLERS[host.version]
    return sorted(set(need) | (set(used) & have))


def _write(path, value):
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path, default=None):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return default


def _keyed(text, key):
    """The number after KEY in 'key value' lines (memory.events, cpu.stat)."""
    for line in (text or "").splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return int(v)
    return None


class Cgroup(Resource):
    name = "cgroup"
    version = 0

    def __init__(self, spec, dirs=()):
        super().__init__(spec)
        self.dirs = list(dirs)  # the job's cgroup directories, one per hierarchy
        self.checks = []  # (file, expected content): what the child verifies
        self.where = {}  # v1: {controllers "cpu,cpuacct": directory}

    @classmethod
    def check(cls, spec):
        """Runs in: parent, before the first side effect.  Stage 1 of resource
        control: every limit against this host (its controllers, CPUs,
        block devices)."""
        lim = spec.limits
        parent = cgroup_parent(spec)
        if ".." in parent.split("/") or "\0" in parent:
            raise UsageError("--cgroup-parent: %r must not contain '..'" % spec.cgroup_parent)
        ncpu = os.cpu_count() or 1
        if lim.cpu is not None and lim.cpu > 100 * ncpu:
            raise UsageError("--cpu: '%d' is out of range (1 to %d: percent of one CPU, this host has %d CPUs)"
                             % (lim.cpu, 100 * ncpu, ncpu))
        if lim.memory is not None and lim.memory < MEMORY_FLOOR:
            raise UsageError("--memory: %r is below the %d MiB a job needs to start" % (
                "%dK" % (lim.memory >> 10), MEMORY_FLOOR >> 20))
        if lim.cores is not None:
            cpus = parse_cpuset("--cores", lim.cores)
            online = _read_cpuset_file("/sys/devices/system/cpu/online")
            allowed = sorted(set(online) & os.sched_getaffinity(0))
            bad = [c for c in cpus if c not in allowed]
            if bad:
                raise UsageError("--cores: %r names CPU %s, which %s (CPUs usable here: %s)" % (
                    lim.cores, format_cpuset(bad), "does not exist" if bad[0] not in online else "jrun may not use",
                    format_cpuset(allowed)))
        cgroup_controllers(spec)
        if lim.io_bps is not None and not block_devices(io_paths(spec)):
            raise UsageError("--io-bps: the job's files (%s) are on no block device: nothing to throttle"
                             % ", ".join(io_paths(spec)))

    @staticmethod
    def for_job(spec):
        return (CgroupV2 if cgroup_host().version == 2 else CgroupV1)(spec)

    @classmethod
    def from_state(cls, record):
        """Only the directories the job recorded as made by it (setup)."""
        cg = record.get("cgroup")
        if cg and cg.get("dirs"):
            return (CgroupV2 if cg.get("version") == 2 else CgroupV1)(None, [json_text(d) for d in cg["dirs"]])
        return None

    # A job cgroup under jrun's own subtree whose job has no state directory
    # is an orphan for gc (see Resource.orphans), unless a
    # process is in it or it is younger than this: a job of a jrun with
    # another state-dir (--config) shares the subtree, and one being set up
    # right now has an empty cgroup for a moment.  --cgroup-parent trees
    # are their owner's to clean.
    ORPHAN_MIN_AGE = 60.0

    @classmethod
    def orphans(cls, known_ids):
        host = cgroup_host()
        found = {}
        for sub in jrun_subtrees():
            try:
                names = os.listdir(sub)
            except OSError:
                continue
            for n in names:
                if os.path.isdir(os.path.join(sub, n)):
                    found.setdefault(n, []).append(os.path.join(sub, n))
        known = known_ids()  # after the listing: see gc
        now = time.time()
        for job_id, dirs in sorted(found.items()):
            if job_id in known or any(cls._in_use(d, now) for d in dirs):
                continue
            res = (CgroupV2 if host.version == 2 else CgroupV1)(None, dirs)
            res.name = "cgroup %s" % job_id
            yield res
        remove_unused_subtrees(jrun_subtrees())  # e.g. left by a jrun killed with SIGKILL

    @classmethod
    def _in_use(cls, d, now):
        try:
            if now - os.stat(d).st_mtime < cls.ORPHAN_MIN_AGE:
                return True
        except OSError:
            return True  # gone meanwhile: nothing to do
        events = _read(os.path.join(d, "cgroup.events"))
        if events is not None:  # v2: processes here or below
            return "populated 0" not in events
        return bool(_read(os.path.join(d, "cgroup.procs"), "x").strip())

    def setup(self, state):
        """Make the job's cgroup in each hierarchy.  jrun only ever kills or
        removes a cgroup it made itself: self.dirs holds exactly those, and
        an existing one (another service's, another job's, a crashed jrun's
        orphan) is a refusal that touches nothing of it.  The record in
        job.json follows the mkdirs (gc removes only what it lists): a crash
        in between leaves an empty cgroup that gc's orphans() removes from
        jrun's own subtree, and that stays, empty, under a --cgroup-parent,
        its owner's tree, where jrun cannot prove it made it."""
        self.plan()
        planned, self.dirs = self.dirs, []
        try:
            for attempt in range(10):
                try:
                    self.create(planned)
                    break
                except FileNotFoundError:
                    # The shared jrun/ parent vanished between our mkdir of
                    # it and of the job's cgroup: its last job removed it.
                    if attempt == 9 or self.spec.cgroup_parent:
                        raise
                    self.teardown()  # what this attempt made, then again
                    self.dirs = []
            state.save(cgroup={"version": self.version, "dirs": self.dirs})
            self.write_limits(self.spec.limits)
            self.restrict_devices()
        except FileExistsError as e:
            self.teardown()
            raise SetupError("cgroup %s already exists, and jrun did not make it: it is left alone (another "
                             "service's or job's?  Choose another --name%s)"
                             % (e.filename, "" if self.spec.cgroup_parent else
                                "; a dead jrun's leftover goes with `jrun gc`")) from None
        except OSError as e:
            self.teardown()
            raise SetupError("cgroup %s: %s" % (getattr(e, "filename", None) or planned[0], e.strerror)) from None
        except SetupError:
            self.teardown()
            raise
        trace("cgroup v%d: %s created with %s" % (self.version, ", ".join(self.dirs),
                                                  "; ".join("%s=%s" % (os.path.basename(f), " ".join(v.split()))
                                                            for f, v in self.checks) or "no limits"))

    def restrict_devices(self):
        """Parent, in setup: the device allow-list (DEVICE_RULES), where this
        cgroup version has one.  It is the wall that holds if the job can
        make device nodes (--cap-add MKNOD): such a node in a read-write
        volume is a node on the host's filesystem.  So MKNOD is refused
        where no allow-list can be set (no v1 devices hierarchy, a kernel
        without cgroup BPF); without it the job's own nodes and nodev on
        every writable mount (build_dev) are what hold."""

    def _no_device_list(self, why):
        if "MKNOD" in job_capabilities(self.spec):
            raise SetupError("--cap-add MKNOD: the job's cgroup can have no device allow-list here (%s), "
                             "and it is what stops a device node the job makes from being opened" % why)
        trace("cgroup: no device allow-list (%s); the job's own nodes and nodev hold" % why)

    def verify_devices(self):
        """Child, in enter(): the device allow-list the parent set is in
        force (v1: its devices.list is one of the checks)."""

    def limit(self, path, value):
        """Write a limit, and note what the child must read back."""
        _write(path, value)
        self.checks.append((path, value))

    def attach(self, pid):
        for d in self.dirs:
            _write(os.path.join(d, "cgroup.procs"), str(pid))
        trace("cgroup: job PID %d placed in %s" % (pid, ", ".join(self.dirs)))

    def join(self):
        """Child: nothing to do when the parent has placed it (attach)."""

    def enter(self):
        """Child: prove from /proc/self/cgroup that this process is in
        exactly its own job cgroup on every hierarchy ("not in the root
        cgroup" is no proof), and that the limits in force are exactly the
        requested ones, before anything of the job runs."""
        self.join()
        mine = {}
        for line in _read("/proc/self/cgroup", "").splitlines():
            _, ctrls, path = line.split(":", 2)
            mine[ctrls] = path
        for ctrls, d in self.where.items():
            want = "/" + os.path.relpath(d, self.mountpoint(ctrls))
            if mine.get(ctrls) != want:
                raise SetupError("cgroup verification failed: in %s:%s, not in the job's %s"
                                 % (ctrls or "unified", mine.get(ctrls), want))
        for path, want in self.checks:
            got = _read(path)
            # Line by line, in any order (devices.list, io.max have several).
            if got is None or sorted(map(str.split, got.splitlines())) != sorted(map(str.split, want.splitlines())):
                raise SetupError("cgroup verification failed: %s is %r, not %r" % (path, got, want))
        self.verify_devices()
        trace("cgroup verified: this process is in %s only, limits read back: %s" % (
            ", ".join("%s:%s" % (c or "0:", mine[c]) for c in self.where),
            "; ".join("%s=%s" % (os.path.basename(f), v.strip().replace("\n", " ")) for f, v in self.checks)
            or "none"))
        unshare(CLONE_NEWCGROUP)
        trace("cgroup namespace: the job's cgroup is its root '/'")

    def kill_all(self):
        """SIGKILL every process still in the job's cgroups.  A pidfd is
        taken before the membership check, so a pid reused by a host process
        in between is never signalled."""
        if not self.dirs:
            return
        deadline = time.monotonic() + 2.0
        job = "/" + "/".join(self.dirs[0].split("/")[-2:])  # <parent>/<id>
        while True:
            pids = set()
            for d in self.dirs:
                pids.update(int(p) for p in (_read(os.path.join(d, "cgroup.procs")) or "").split())
            if not pids:
                return
            for pid in pids:
                try:
                    fd = os.pidfd_open(pid)
                except OSError:
                    continue
                try:
                    if any(line.split(":", 2)[2].endswith(job)
                           for line in (_read("/proc/%d/cgroup" % pid) or "").splitlines()):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                except OSError:
                    pass
                finally:
                    os.close(fd)
            if time.monotonic() > deadline:
                raise SetupError("processes %s survive SIGKILL" % sorted(pids))
            time.sleep(0.005)

    def teardown(self):
        try:
            self.kill_all()
        except (OSError, SetupError) as e:
            log("warning", "cgroup teardown: %s" % e)
        for d in reversed(self.dirs):
            # Right after the last process exits the kernel may still hold
            # the cgroup busy for a moment (EBUSY): retry briefly.
            for _ in range(200):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        log("warning", "cgroup teardown: cannot remove %s: %s" % (d, e.strerror))
                        break
                    time.sleep(0.005)
            else:
                log("warning", "cgroup teardown: %s is still busy; `jrun gc` will retry" % d)
        shared = set(jrun_subtrees())
        remove_unused_subtrees(sorted({os.path.dirname(d) for d in self.dirs} & shared))

    def remains(self):
        return [d for d in self.dirs if os.path.isdir(d)]


class CgroupV1(Cgroup):
    """One directory per mounted v1 hierarchy: <mount>/<parent>/<id>."""

    version = 1

    def attach(self, pid):
        """The child moves itself (join): see there."""

    def join(self):
        """Child, single-threaded, right after release.  Moving a process
        (a PID into cgroup.procs) takes the kernel's global threadgroup lock
        for writing, which waits for an RCU grace period: 5-20 ms per job on
        this host.  A thread moving itself (0 into tasks) is exempt, and a
        single-threaded process that moves its only thread has moved whole."""
        alone = len(os.listdir("/proc/self/task")) == 1
        for d in self.dirs:
            _write(os.path.join(d, "tasks" if alone else "cgroup.procs"), "0" if alone else str(os.getpid()))
        trace("cgroup: the job's PID 1 moved itself into %s" % ", ".join(self.dirs))

    def plan(self):
        host = cgroup_host()
        parents = job_cgroup_parents(self.spec)[0]
        self.where = {}
        for ctrl in cgroup_controllers(self.spec):
            point, ctrls = host.mounts[ctrl]
            self.where[ctrls] = os.path.join(point, parents[ctrls], self.spec.id)
        self.dirs = list(self.where.values())

    def mountpoint(self, ctrls):
        mounts = cgroup_host().mounts
        return next(mounts[c][0] for c in ctrls.split(",") if c in mounts)

    def create(self, planned):
        for d in planned:
            ctrls = next(c for c, w in self.where.items() if w == d)
            p = os.path.dirname(d)
            own = p in jrun_subtrees()  # else --cgroup-parent or the Slurm step: never made by jrun
            if own:
                try:
                    os.mkdir(p, 0o755)
                except FileExistsError:
                    pass
            if "cpuset" in ctrls.split(",") and own:
                # A new v1 cpuset has no CPUs and no memory nodes, and no
                # task may join it until both are set: the shared subtree
                # gets its own parent's.  (A delegated parent is its
                # manager's to set up.)
                for f in ("cpuset.cpus", "cpuset.mems"):
                    if not _read(os.path.join(p, f), "").strip():
                        _write(os.path.join(p, f), _read(os.path.join(os.path.dirname(p), f)).strip())
            os.mkdir(d, 0o755)
            self.dirs.append(d)

    def _dir(self, ctrl):
        for ctrls, d in self.where.items():
            if ctrl in ctrls.split(","):
                return d
        return None

    def write_limits(self, lim):
        if lim.cores is not None:
            cs = self._dir("cpuset")
            self.limit(os.path.join(cs, "cpuset.cpus"), format_cpuset(parse_cpuset("--cores", lim.cores)) + "\n")
            mems = _read(os.path.join(os.path.dirname(cs), "cpuset.mems"), "").strip()
            self.limit(os.path.join(cs, "cpuset.mems"), mems + "\n")
        if lim.cpu is not None:
            d = self._dir("cpu")
            self.limit(os.path.join(d, "cpu.cfs_period_us"), "%d\n" % CPU_PERIOD_US)
            self.limit(os.path.join(d, "cpu.cfs_quota_us"), "%d\n" % (lim.cpu * CPU_PERIOD_US // 100))
        if lim.memory is not None:
            d = self._dir("memory")
            page = os.sysconf("SC_PAGE_SIZE")
            mem = lim.memory // page * page
            self.limit(os.path.join(d, "memory.limit_in_bytes"), "%d\n" % mem)
            memsw = os.path.join(d, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):
                # memory+swap: the same ceiling, so swap adds nothing.
                self.limit(memsw, "%d\n" % mem)
            else:
                self.limit(os.path.join(d, "memory.swappiness"), "0\n")
                if _read("/proc/swaps", "").count("\n") > 1:
                    log("warning", "--memory: this kernel has no swap accounting (boot with swapaccount=1); "
                        "the job's swappiness is 0, but swap is not strictly excluded")
        if lim.pids is not None:
            self.limit(os.path.join(self._dir("pids"), "pids.max"), "%d\n" % lim.pids)
        if lim.io_bps is not None:
            d = self._dir("blkio")
            devs = block_devices(io_paths(self.spec))
            for f in ("blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device"):
                for dev in devs:
                    _write(os.path.join(d, f), "%s %d" % (dev, lim.io_bps))
                self.checks.append((os.path.join(d, f), "".join("%s %d\n" % (dev, lim.io_bps) for dev in devs)))

    def restrict_devices(self):
        """'a' denied, then each rule allowed: the job's list, its parent's
        left untouched (a v1 child can narrow its parent's list, never
        widen it)."""
        d = self._dir("devices")
        if d is None:
            return self._no_device_list(
                "--cgroup-parent %s is not in the v1 devices hierarchy" % self.spec.cgroup_parent
                if "devices" in cgroup_host().mounts else "no v1 devices hierarchy is mounted")
        rules = ["%s %d:%s %s" % (kind, major, "*" if minor is None else minor, access)
                 for kind, major, minor, access in DEVICE_RULES]
        _write(os.path.join(d, "devices.deny"), "a")
        for rule in rules:
            _write(os.path.join(d, "devices.allow"), rule)
        self.checks.append((os.path.join(d, "devices.list"), "".join(r + "\n" for r in rules)))

    def enter_root(self):
        """A read-only tmpfs at /sys/fs/cgroup, and on it each of the job's
        hierarchies read-only; in the job's cgroup namespace each shows the
        job's own cgroup as its root."""
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        mount("cgroup", CGROUP_ROOT, "tmpfs", flags, "mode=0755,size=16k")
        for ctrls, d in self.where.items():
            target = os.path.join(CGROUP_ROOT, os.path.basename(self.mountpoint(ctrls)))
            os.mkdir(target, 0o555)
            mount("cgroup", target, "cgroup", flags | MS_RDONLY, ctrls)
        mount(None, CGROUP_ROOT, None, MS_REMOUNT | MS_RDONLY | flags, "mode=0755,size=16k")
        trace("%s: read-only tmpfs with the job's hierarchies %s, read-only"
              % (CGROUP_ROOT, ", ".join(self.where)))

    def collect(self, out):
        mem = self._dir("memory")
        if mem:
            out.oom_kills = _keyed(_read(os.path.join(mem, "memory.oom_control")), "oom_kill") or 0
        cpu = self._dir("cpuacct")
        usage = _read(os.path.join(cpu, "cpuacct.usage")) if cpu else None
        out.cpu_s = int(usage) / 1e9 if usage else None
        if mem:
            peak = _read(os.path.join(mem, "memory.max_usage_in_bytes"))
            out.memory_peak_bytes = int(peak) if peak else None
        blk = self._dir("blkio")
        if blk:
            # Direct IO and reads; buffered writes are charged to the flusher
            # thread on v1, not to the job.
            text = _read(os.path.join(blk, "blkio.throttle.io_service_bytes_recursive"), "")
            out.io_read_bytes = out.io_write_bytes = 0
            for line in text.splitlines():
                f = line.split()
                if len(f) == 3 and f[1] in ("Read", "Write"):
                    if f[1] == "Read":
                        out.io_read_bytes += int(f[2])
                    else:
                        out.io_write_bytes += int(f[2])


# Cgroup v2's device allow-list is an eBPF program (BPF_PROG_TYPE_CGROUP_DEVICE)
# attached to the job's cgroup, as crun, runc and systemd do it: the kernel
# runs it on every open and mknod of a device node by a process of the
# cgroup (devcgroup_check_permission), with struct bpf_cgroup_dev_ctx
# {u32 access_type (access << 16 | type), major, minor} in r1; it returns 1
# to allow, 0 to refuse (EPERM).  Hand-assembled, like the seccomp filter:
# ~40 instructions, and no compiler or libbpf on the run path.
BPF_LDX_MEM_W, BPF_MOV64_X, BPF_MOV64_K, BPF_AND32_K, BPF_RSH32_K, BPF_JNE_K, BPF_EXIT = (
    0x61, 0xBF, 0xB7, 0x54, 0x74, 0x55, 0x95)


def _bpf_insn(code, dst=0, src=0, off=0, imm=0):
    """One struct bpf_insn (little-endian: x86_64 and aarch64)."""
    return bytes((code, dst | src << 4)) + (off & 0xFFFF).to_bytes(2, "little") + \
        (imm & 0xFFFFFFFF).to_bytes(4, "little")


def device_filter_program(rules):
    """RULES (DEVICE_RULES) as eBPF: r2 = type, r3 = access, r4 = major,
    r5 = minor; each rule a block that jumps past itself on any mismatch
    and returns 1 at its end; 0 after the last."""
    prog = [_bpf_insn(BPF_LDX_MEM_W, 2, 1, 0), _bpf_insn(BPF_MOV64_X, 3, 2),
            _bpf_insn(BPF_AND32_K, 2, imm=0xFFFF), _bpf_insn(BPF_RSH32_K, 3, imm=16),
            _bpf_insn(BPF_LDX_MEM_W, 4, 1, 4), _bpf_insn(BPF_LDX_MEM_W, 5, 1, 8)]
    for kind, major, minor, access in rules:
        allowed = sum(bit for ch, bit in (("m", BPF_DEVCG_ACC_MKNOD), ("r", BPF_DEVCG_ACC_READ),
                                          ("w", BPF_DEVCG_ACC_WRITE)) if ch in access)
        # (register, value): r1 = access & ~allowed must be 0.
        tests = [(2, BPF_DEVCG_DEV_CHAR if kind == "c" else BPF_DEVCG_DEV_BLOCK), (1, 0), (4, major)]
        if minor is not None:
            tests.append((5, minor))
        block = []
        for reg, value in tests:
            if reg == 1:
                block += [(BPF_MOV64_X, 1, 3, None, 0), (BPF_AND32_K, 1, 0, None, ~allowed)]
            block.append((BPF_JNE_K, reg, 0, "next", value))
        block += [(BPF_MOV64_K, 0, 0, None, 1), (BPF_EXIT, 0, 0, None, 0)]
        prog += [_bpf_insn(code, dst, src, len(block) - i - 1 if off == "next" else 0, imm)
                 for i, (code, dst, src, off, imm) in enumerate(block)]
    prog += [_bpf_insn(BPF_MOV64_K, 0, imm=0), _bpf_insn(BPF_EXIT)]
    return b"".join(prog)


def attach_device_filter(cgroup_dir, rules):
    """Load RULES' program and attach it to CGROUP_DIR (BPF_F_ALLOW_MULTI:
    it runs after any program a delegating parent attached, and all must
    allow).  Returns the program's id.  The cgroup holds the program: it
    goes when the cgroup is removed, with nothing for teardown or gc."""
    import ctypes

    u32, u64 = ctypes.c_uint32, ctypes.c_uint64

    class ProgLoad(ctypes.Structure):
        _fields_ = [("prog_type", u32), ("insn_cnt", u32), ("insns", u64), ("license", u64), ("log_level", u32),
                    ("log_size", u32), ("log_buf", u64), ("kern_version", u32), ("prog_flags", u32),
                    ("prog_name", ctypes.c_char * 16)]

    class Attach(ctypes.Structure):
        _fields_ = [("target_fd", u32), ("attach_bpf_fd", u32), ("attach_type", u32), ("attach_flags", u32)]

    class InfoByFd(ctypes.Structure):
        _fields_ = [("bpf_fd", u32), ("info_len", u32), ("info", u64)]

    code = device_filter_program(rules)
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"Apache-2.0")
    prog = bpf(BPF_PROG_LOAD, ProgLoad(prog_type=BPF_PROG_TYPE_CGROUP_DEVICE, insn_cnt=len(code) // 8,
                                       insns=ctypes.addressof(insns), license=ctypes.addressof(lic),
                                       prog_name=b"jrun_devices"))
    try:
        cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            bpf(BPF_PROG_ATTACH, Attach(target_fd=cg, attach_bpf_fd=prog, attach_type=BPF_CGROUP_DEVICE,
                                        attach_flags=BPF_F_ALLOW_MULTI))
        finally:
            os.close(cg)
        info = (u32 * 2)()  # struct bpf_prog_info: type, id
        bpf(BPF_OBJ_GET_INFO_BY_FD, InfoByFd(bpf_fd=prog, info_len=8, info=ctypes.addressof(info)))
        return info[1]
    finally:
        os.close(prog)


def attached_device_filters(cgroup_dir):
    """The ids of the device programs attached to CGROUP_DIR itself."""
    import ctypes

    u32, u64 = ctypes.c_uint32, ctypes.c_uint64

    class Query(ctypes.Structure):
        _fields_ = [("target_fd", u32), ("attach_type", u32), ("query_flags", u32), ("attach_flags", u32),
                    ("prog_ids", u64), ("prog_cnt", u32)]

    ids = (u32 * 64)()
    cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        query = Query(target_fd=cg, attach_type=BPF_CGROUP_DEVICE, prog_ids=ctypes.addressof(ids), prog_cnt=64)
        bpf(BPF_PROG_QUERY, query)
    finally:
        os.close(cg)
    return list(ids[:query.prog_cnt])


class CgroupV2(Cgroup):
    """One directory in the unified hierarchy: /sys/fs/cgroup/<parent>/<id>.
    Controllers are enabled in cgroup.subtree_control along the path; jrun
    never puts a process in the parents (the no-internal-process rule)."""

    version = 2
    device_filter = None  # the id of the job's device program, once attached

    def plan(self):
        self.controllers = cgroup_controllers(self.spec)
        d = os.path.join(CGROUP_ROOT, job_cgroup_parents(self.spec)[0][""], self.spec.id)
        self.where = {"": d}
        self.dirs = [d]

    def mountpoint(self, ctrls):
        return CGROUP_ROOT

    def create(self, planned):
        d = planned[0]
        parent = os.path.dirname(d)
        if parent in jrun_subtrees():
            self._enable(CGROUP_ROOT)
            try:
                os.mkdir(parent, 0o755)
            except FileExistsError:
                pass
        self._enable(parent)
        os.mkdir(d, 0o755)
        self.dirs.append(d)

    def _enable(self, cg):
        on = set((_read(os.path.join(cg, "cgroup.subtree_control")) or "").split())
        want = [c for c in self.controllers if c not in on]
        if not want:
            return
        try:
            _write(os.path.join(cg, "cgroup.subtree_control"), " ".join("+" + c for c in want))
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise SetupError("cannot enable %s in %s: it has processes of its own (cgroup v2 "
                                 "no-internal-process rule); use --cgroup-parent with a delegated subtree"
                                 % (" ".join(want), cg)) from None
            raise

    def write_limits(self, lim):
        d = self.dirs[0]
        if lim.cores is not None:
            self.limit(os.path.join(d, "cpuset.cpus"), format_cpuset(parse_cpuset("--cores", lim.cores)) + "\n")
        if lim.cpu is not None:
            self.limit(os.path.join(d, "cpu.max"), "%d %d\n" % (lim.cpu * CPU_PERIOD_US // 100, CPU_PERIOD_US))
        if lim.memory is not None:
            page = os.sysconf("SC_PAGE_SIZE")
            self.limit(os.path.join(d, "memory.max"), "%d\n" % (lim.memory // page * page))
            if os.path.exists(os.path.join(d, "memory.swap.max")):
                self.limit(os.path.join(d, "memory.swap.max"), "0\n")
            elif _read("/proc/swaps", "").count("\n") > 1:
                log("warning", "--memory: this kernel has no swap accounting; swap is not strictly excluded")
            # Out of memory, the whole job is killed, not one process of it:
            # jrun then reports exit 137 for the job as a whole.
            self.limit(os.path.join(d, "memory.oom.group"), "1\n")
        if lim.pids is not None:
            self.limit(os.path.join(d, "pids.max"), "%d\n" % lim.pids)
        if lim.io_bps is not None:
            devs = block_devices(io_paths(self.spec))
            for dev in devs:
                _write(os.path.join(d, "io.max"), "%s rbps=%d wbps=%d" % (dev, lim.io_bps, lim.io_bps))
            self.checks.append((os.path.join(d, "io.max"), "".join(
                "%s rbps=%d wbps=%d riops=max wiops=max\n" % (dev, lim.io_bps, lim.io_bps) for dev in devs)))

    def restrict_devices(self):
        self.device_filter = None
        try:
            self.device_filter = attach_device_filter(self.dirs[0], DEVICE_RULES)
        except OSError as e:
            # A kernel without CONFIG_CGROUP_BPF (EINVAL), a seccomp profile
            # around jrun (EPERM), a delegating parent whose program allows
            # no other (EPERM).
            return self._no_device_list("cgroup BPF: %s" % os.strerror(e.errno))
        trace("cgroup: device allow-list attached (eBPF program %d): %s" % (self.device_filter, " ".join(
            "%s %d:%s %s" % (k, ma, "*" if mi is None else mi, a) for k, ma, mi, a in DEVICE_RULES)))

    def verify_devices(self):
        if self.device_filter is None:
            return
        found = attached_device_filters(self.dirs[0])
        if found != [self.device_filter]:
            raise SetupError("cgroup verification failed: device programs %s attached to %s, not [%d]"
                             % (found, self.dirs[0], self.device_filter))
        trace("device allow-list verified: eBPF program %d is attached to the job's cgroup" % self.device_filter)

    def enter_root(self):
        mount("cgroup2", CGROUP_ROOT, "cgroup2", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        trace("%s: the job's own cgroup2, read-only" % CGROUP_ROOT)

    def collect(self, out):
        d = self.dirs[0]
        out.oom_kills = _keyed(_read(os.path.join(d, "memory.events")), "oom_kill") or 0
        usage = _keyed(_read(os.path.join(d, "cpu.stat")), "usage_usec")
        out.cpu_s = usage / 1e6 if usage is not None else None
        # memory.peak is kernel 5.19+; before that there is no peak to read.
        peak = _read(os.path.join(d, "memory.peak"))
        out.memory_peak_bytes = int(peak) if peak else None
        io = _read(os.path.join(d, "io.stat"))
        if io is not None:
            out.io_read_bytes = out.io_write_bytes = 0
            for line in io.splitlines():
                for kv in line.split()[1:]:
                    k, _, v = kv.partition("=")
                    if k == "rbytes":
                        out.io_read_bytes += int(v)
                    elif k == "wbytes":
                        out.io_write_bytes += int(v)

    def kill_all(self):
        if not self.dirs:
            return
        d = self.dirs[0]
        if os.path.exists(os.path.join(d, "cgroup.kill")):  # kernel 5.14+
            _write(os.path.join(d, "cgroup.kill"), "1")
            deadline = time.monotonic() + 2.0
            while "populated 1" in (_read(os.path.join(d, "cgroup.events")) or ""):
                if time.monotonic() > deadline:
                    raise SetupError("%s: processes survive cgroup.kill" % d)
                time.sleep(0.002)
        else:
            super().kill_all()
# The job's user namespace (--userns).  Created by the parent, as real root,
# through a short-lived helper process, so that the maps are written by a
# privileged process (no setgroups "deny" needed) before the child exists;
# the child uses it twice: as the idmap of the rootfs (so that the job's root
# owns the rootfs files it sees) and, last of all, joins it (setns) before
# dropping privileges.  Every other namespace of the job was created by
# real root and stays owned by the host's user namespace: the job's root
# holds its capabilities over nothing but its own files and processes.
# ---------------------------------------------------------------------------


def _fnv1a(text):
    h = 0x811C9DC5
    for byte in text.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def chown_to_job(path, base, uid=0, gid=0):
    """lchown PATH and everything below it to the job's UID:GID as the host
    sees them: BASE+UID under --userns (BASE is the job's USERNS_BASE slot,
    0 without --userns).  For the paths jrun itself made real in the job's
    root (the writable layer, /etc/hostname): a path through a symlink of
    the rootfs would lead to the host.  (Uploads get their owner from the
    copy, see Uploader.)"""
    targets = [path]
    if os.path.isdir(path) and not os.path.islink(path):
        for d, dirs, files in os.walk(path):
            targets += [os.path.join(d, n) for n in dirs + files]
    for p in targets:
        os.lchown(p, base + uid, base + gid)


class JobUserNamespace(Resource):
    name = "user namespace"

    def __init__(self, spec):
        super().__init__(spec)
        self.base = None
        self.fd = None

    @classmethod
    def check(cls, spec):
        if spec.userns and spec.user and any(p and p.isdigit() and int(p) >= USERNS_SIZE for p in spec.user):
            raise UsageError("-u/--user: %s is not mapped under --userns (0 to %d are)"
                             % (":".join(p for p in spec.user if p), USERNS_SIZE - 1))

    def setup(self, state):
        self.base = self._allocate(state)
        self.fd = self.create_new()
        trace("user namespace: uid and gid 0-%d inside are %d-%d on the host"
              % (USERNS_SIZE - 1, self.base, self.base + USERNS_SIZE - 1))

    def _allocate(self, state):
        """A slot derived from the job id (a --name job gets the same host
        uids every run, so its volumes keep their owner), moved on while a
        live job holds it; the state directory's flock makes the choice and
        its record atomic.  (job.json is dumps_json's flat record: one
        integer field is read without the json module, which costs 15 ms
        here, more than all the rest of --userns.)"""
        lock = os.open(HOST.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            taken = set()
            for other in os.listdir(HOST.state_dir):
                if other == self.spec.id:
                    continue
                try:
                    with open(os.path.join(HOST.state_dir, other, "job.json"), encoding="utf-8") as f:
                        _, found, rest = f.read().partition('"userns_base": ')
                except OSError:
                    continue
                digits = rest[:12].split(",")[0].split("}")[0].strip()
                if found and digits.isdigit() and JobState(other).is_live():
                    taken.add(int(digits))
            slot = _fnv1a(self.spec.id) % USERNS_SLOTS
            for i in range(USERNS_SLOTS):
                base = USERNS_BASE + ((slot + i) % USERNS_SLOTS) * USERNS_SIZE
                if base not in taken:
                    state.save(userns_base=base)
                    return base
            raise SetupError("--userns: all %d uid ranges are in use by running jobs" % USERNS_SLOTS)
        finally:
            os.close(lock)

    def create_new(self):
        """A helper process unshares a user namespace; jrun writes its maps
        and keeps a reference (an fd of /proc/PID/ns/user); the helper
        exits when jrun closes the pipe."""
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                os.close(ready_r)
                os.close(hold_w)
                unshare(CLONE_NEWUSER)
                os.write(ready_w, b"u")
                os.read(hold_r, 1)
            finally:
                os._exit(0)
        os.close(ready_w)
        os.close(hold_r)
        try:
            if os.read(ready_r, 1) != b"u":
                raise SetupError("--userns: cannot create a user namespace (user.max_user_namespaces?)")
            for name in ("uid_map", "gid_map"):
                with open("/proc/%d/%s" % (pid, name), "w") as f:
                    f.write("0 %d %d\n" % (self.base, USERNS_SIZE))
            return os.open("/proc/%d/ns/user" % pid, os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(ready_r)
            os.close(hold_w)
            os.waitpid(pid, 0)

    def root_owner(self):
        """The job's root is host uid self.base, through an idmapped rootfs;
        drop_privileges joins this namespace last."""
        return RootOwner(base=self.base, limit=USERNS_SIZE, userns_fd=self.fd)

    def teardown(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------
# Network.  Runs in the parent, as root, in the host's namespaces (attach()
# borrows the job's network namespace for one socket).  Every netlink message
# is encoded and decoded by pyroute2; jrun only sends a batch and reads the
# acks.  Shared state (leases, which bridges exist, the nftables table) lives
# in /run/jrun/.net, changed only under the flock of that directory, so that
# concurrent jruns never collide and no daemon is needed.
# ---------------------------------------------------------------------------


def subnets_overlap(a, b):
    plen = min(a[1], b[1])
    return a[0] & _mask(plen) == b[0] & _mask(plen)


def _hashed_name(prefix, text):
    """PREFIX + 10 hex of TEXT's hash: a device name within IFNAMSIZ (15)
    and free of odd characters, whatever TEXT is."""
    import hashlib

    return prefix + hashlib.blake2s(text.encode(), digest_size=5).hexdigest()


def _is_hashed_name(prefix, name):
    """Whether NAME is one that _hashed_name(PREFIX, ...) makes."""
    return (len(name) == len(prefix) + 10 and name.startswith(prefix)
            and all(c in "0123456789abcdef" for c in name[len(prefix):]))


def bridge_name(net):
    """The host bridge of a network.  Every jrun bridge starts with 'jrun' and
    no job veth does ('jr' + hex), so each is told apart by name alone."""
    return DEFAULT_BRIDGE if net == "bridge" else _hashed_name("jrun-", net)


def veth_name(job_dir):
    """The host end of a job's veth pair: 'jr' + 10 hex of the job's state
    directory, unique per live job (whatever state-dir each jrun uses)."""
    return _hashed_name("jr", job_dir)


def _lease_live(job_dir):
    """A lease is the job's state directory; it is live while that job's
    state lock is held."""
    state = JobState(os.path.basename(job_dir))
    state.dir = job_dir
    return state.is_live()


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


def nft_chains(networks, allow_link_local=False):
    """jrun's firewall for the networks that exist now, the whole content of
    the `inet jrun` table: [(chain, its hook, [rule, ...])].

    networks: [(bridge, 'a.b.c.d/n', isolated)].  inet, not ip: a job also
    has an IPv6 link-local address, and the host's services listen on [::]
    too."""
    bridges = "{ %s }" % ", ".join('"%s"' % b for b, _, _ in networks)
    # The first wall, before DNAT (dstnat is -100; conntrack, at -200, has
    # run): a job's packet to a host address that the host DNATs (docker -p,
    # Kubernetes NodePorts, a metadata proxy) would be forwarded, and never
    # meet the input chain.  Cloud metadata (169.254.169.254: credentials)
    # and every other IPv4 link-local address is refused unless the host
    # allows it (allow-link-local in jrun.toml); replies to connections the
    # host opened into a job pass; then nothing addressed to the host
    # itself, on any of its interfaces, IPv4 or IPv6.
    pre = [] if allow_link_local else ["iifname %s ip daddr 169.254.0.0/16 drop" % bridges]
    pre += ["iifname %s ct state established,related accept" % bridges,
            "iifname %s fib daddr type local drop" % bridges]
    # The second wall: nothing from a jrun bridge reaches the host's own
    # input (broadcasts included), except replies.
    inp = ["iifname %s ct state established,related accept" % bridges, "iifname %s drop" % bridges]
    # No IPv6 is routed for jobs, and no job sends from an address that is
    # not its network's (it is root in its netns and could try).
    fwd = ["iifname %s meta nfproto ipv6 drop" % bridges]
    fwd += ['iifname "%s" ip saddr != %s drop' % (b, s) for b, s, _ in networks]
    fwd.append("oifname %s ct state established,related accept" % bridges)
    # br_netfilter (loaded by docker and others) passes bridged frames through
    # this hook as bridge -> same bridge: jobs of a named network talk; on the
    # isolated default bridge the same path is a job routing to another job
    # through the host, which must not pass.
    fwd += ['iifname "%s" oifname "%s" accept' % (b, b) for b, _, iso in networks if not iso]
    # Nothing else starts a connection into a jrun network: not another
    # network's job, not the LAN.
    fwd.append("oifname %s drop" % bridges)
    post = ['ip saddr %s oifname != "%s" masquerade' % (s, b) for b, s, _ in networks]
    return [("prerouting", "type filter hook prerouting priority dstnat - 10; policy accept;", pre),
            ("input", "type filter hook input priority filter; policy accept;", inp),
            ("forward", "type filter hook forward priority filter; policy accept;", fwd),
            ("postrouting", "type nat hook postrouting priority srcnat; policy accept;", post)]


def nft_tag(chains):
    """The comment every rule of the table carries: a hash of the whole
    table, so that the per-job check (_nft_damage) tells jrun's current
    rules from an older or partly deleted table by the rules alone.  (Not
    the table's own comment: the kernel keeps a table's first comment when
    the table is defined again.)"""
    import hashlib

    text = "\n".join("%s %s %s" % (c, hook, " ; ".join(rules)) for c, hook, rules in chains)
    return "jrun " + hashlib.blake2s(text.encode(), digest_size=8).hexdigest()


def nft_ruleset(networks, allow_link_local=False):
    """The whole `inet jrun` table for the networks that exist now, as nft
    input; [] of networks deletes it.  The table is replaced in one
    transaction: 'add; flush; define' is idempotent, and 3 ms when the table
    is new where 'add; delete; define' takes 16 ms (the chains keep their
    hooks, so the kernel waits for no RCU grace period)."""
    if not networks:
        return "add table %s\ndelete table %s\n" % (NFT_TABLE, NFT_TABLE)
    chains = nft_chains(networks, allow_link_local)
    tag = nft_tag(chains)
    out = ["add table %s" % NFT_TABLE, "flush table %s" % NFT_TABLE, "table %s {" % NFT_TABLE]
    for name, hook, rules in chains:
        out += ["  chain %s {" % name, "    " + hook]
        out += ['    %s comment "%s"' % (r, tag) for r in rules]
        out.append("  }")
    return "\n".join(out + ["}"]) + "\n"


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

    held = None  # the fd of NET_DIR while this process holds the lock: NetFile writes into it

    def __enter__(self):
        while True:
            fd = open_private_dir(NET_DIR, "network state")
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(NET_DIR).st_ino == os.fstat(fd).st_ino:
                    self.fd = _NetLock.held = fd
                    return self
            except FileNotFoundError:
                pass
            os.close(fd)

    def __exit__(self, *exc):
        _NetLock.held = None
        try:
            os.rmdir(NET_DIR)
        except OSError:
            pass
        os.close(self.fd)


class NetFile:
    """/run/jrun/.net/<bridge>: one network's subnet and leases, as lines
    ('name N', 'subnet S', 'next IP', 'lease IP JOB-STATE-DIR', and 'idle T':
    the time its last job left); written only under _NetLock (and
    atomically, so gc may read it without)."""

    def __init__(self, bridge, name=None, subnet=None):
        self.bridge, self.name, self.subnet = bridge, name, subnet
        self.path = os.path.join(NET_DIR, bridge)
        self.leases = {}
        self.next = None
        self.idle = None

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
            elif w[:1] == ["idle"] and len(w) == 2:
                self.idle = float(w[1])
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
        if self.idle is not None and not self.leases:
            lines.append("idle %.3f" % self.idle)
        if _NetLock.held is None:
            raise SetupError("internal: %s written without the network lock" % self.path)
        replace_file(_NetLock.held, self.bridge, ("\n".join(lines) + "\n").encode())

    def remove(self):
        try:
            os.unlink(self.bridge, dir_fd=_NetLock.held)
        except FileNotFoundError:
            pass

    @property
    def cidr(self):
        return format_subnet(self.subnet)

    @property
    def gateway(self):
        return self.subnet[0] + 1

    def expired(self, now):
        """No job on it for network-idle or longer."""
        return not self.leases and self.idle is not None and now - self.idle >= HOST.network_idle

    def prune(self, keep=None):
        """Forget the leases of jobs that are no longer running."""
        for ip, owner in list(self.leases.items()):
            if owner != keep and not _lease_live(owner):
                del self.leases[ip]

    def allocate(self, owner):
        """The next free address after the last one given (so a just-freed
        address, still in conntrack and neighbour caches, is reused last);
        network, gateway and broadcast are never given."""
        first, last = self.subnet[0] + 2, self.subnet[0] + (1 << (32 - self.subnet[1])) - 2
        size = last - first + 1
        start = self.next if self.next is not None and first <= self.next <= last else first
        for i in range(size):
            ip = first + (start - first + i) % size
            if ip not in self.leases:
                self.leases[ip] = owner
                self.next = first + (ip - first + 1) % size
                self.idle = None
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


# <linux/netlink.h>, <linux/netfilter/nfnetlink.h>, <linux/netfilter.h>,
# <linux/netfilter/nf_tables.h>: dumps of one table's rules and chains.
NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETCHAIN, NFT_MSG_GETRULE = 4, 7
NFPROTO_INET = 1
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK = 1, 3, 4
NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY = 1, 2
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_USERDATA = 1, 2, 7


def _nla(data, off=0, end=None):
    """The netlink attributes in data[off:end]: {type: value bytes}."""
    import struct

    out, end = {}, len(data) if end is None else end
    while off + 4 <= end:
        alen, atype = struct.unpack_from("HH", data, off)
        if alen < 4:
            break
        out[atype & 0x3FFF] = data[off + 4:off + alen]  # without NLA_F_NESTED, NLA_F_NET_BYTEORDER
        off += (alen + 3) & ~3
    return out


def _nft_dump(mtype, table_attr=None):
    """An nf_tables dump of the inet family on a netfilter netlink socket,
    built by hand: 0.1 ms, where `nft list` is a 10 ms process and
    pyroute2's nftables module another import.  With table_attr, the kernel
    dumps jrun's table only.  Each object as {attribute: bytes}."""
    import socket
    import struct

    body = struct.pack("BBH", NFPROTO_INET, 0, 0)  # struct nfgenmsg
    if table_attr is not None:
        name = NFT_TABLE.split()[1].encode() + b"\0"
        body += struct.pack("HH", 4 + len(name), table_attr) + name + b"\0" * (-len(name) % 4)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER) as sock:
        sock.send(struct.pack("IHHII", 16 + len(body), NFNL_SUBSYS_NFTABLES << 8 | mtype,
                              Netlink.F_REQUEST | Netlink.F_DUMP, 1, 0) + body)
        out = []
        while True:
            data = sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, rtype = struct.unpack_from("IH", data, off)
                if rtype == Netlink.DONE:
                    return out
                if rtype == Netlink.ERROR:
                    err = -struct.unpack_from("i", data, off + 16)[0]
                    raise OSError(err, "nft: reading table %s: %s" % (NFT_TABLE, os.strerror(err)))
                out.append(_nla(data, off + 20, off + length))  # after struct nlmsghdr, struct nfgenmsg
                off += (length + 3) & ~3


def _nft_rules():
    """The rules of jrun's table as the kernel has them now, [(chain,
    userdata)]; [] if the table is gone."""
    return [(r.get(NFTA_RULE_CHAIN, b"").rstrip(b"\0").decode(), r.get(NFTA_RULE_USERDATA))
            for r in _nft_dump(NFT_MSG_GETRULE, NFTA_RULE_TABLE)]


def _nft_hooks():
    """The base chains of jrun's table: {chain: (hook number, priority)}."""
    import struct

    out = {}
    for c in _nft_dump(NFT_MSG_GETCHAIN):  # the kernel filters chain dumps by family only
        hook = _nla(c.get(NFTA_CHAIN_HOOK, b""))
        if c.get(NFTA_CHAIN_TABLE) == NFT_TABLE.split()[1].encode() + b"\0" and NFTA_HOOK_HOOKNUM in hook:
            out[c[NFTA_CHAIN_NAME].rstrip(b"\0").decode()] = (
                struct.unpack(">I", hook[NFTA_HOOK_HOOKNUM])[0], struct.unpack(">i", hook[NFTA_HOOK_PRIORITY])[0])
    return out


def _nft_damage(networks, allow_link_local):
    """What is wrong with jrun's table in the kernel, for the networks there
    are: None when every chain holds exactly its rules, each carrying the
    current tag (or when there is no network), else a few words."""
    if not networks:
        return None
    chains = nft_chains(networks, allow_link_local)
    found = _nft_rules()
    if not found:
        return "missing"
    have = {}
    for chain, _ in found:
        have[chain] = have.get(chain, 0) + 1
    short = ["chain %s has %d of %d rules" % (c, have.get(c, 0), len(rules))
             for c, _, rules in chains if have.get(c, 0) != len(rules)]
    if short or len(have) != len(chains):
        return "incomplete (%s)" % (", ".join(short) or "foreign chains")
    tag = nft_tag(chains).encode()
    comment = bytes([0, len(tag) + 1]) + tag + b"\0"  # libnftnl's udata: NFTNL_UDATA_RULE_COMMENT, length, text
    if not all(comment in (userdata or b"") for _, userdata in found):
        return "out of date"
    return None


def _nft_networks(without=None):
    return [(f.bridge, f.cidr, f.bridge == DEFAULT_BRIDGE) for f in NetFile.all() if f.bridge != without]


def _sync_nft(without=None):
    """Make the `inet jrun` table match the networks that exist (lock held)."""
    nets = _nft_networks(without)
    _run_nft(nft_ruleset(nets, HOST.allow_link_local))
    trace("nft: table %s %s" % (NFT_TABLE, "holds %d network(s)" % len(nets) if nets else "deleted"))


def _restore_nft(quiet=False):
    """Every networked job's check, and teardown's and gc's (lock held):
    the table holds exactly the rules of the networks there are.  A firewall
    reload (nft flush ruleset, firewalld, ufw, systemctl restart nftables)
    or a hand may have removed all or part of it while the bridges stay,
    and a job on a bridge without its rules reaches the host.  The table is
    put back, as an operator would expect, and said so; if that fails the
    job does not start.  Returns what was wrong, or None."""
    nets, allow = _nft_networks(), HOST.allow_link_local
    damage = _nft_damage(nets, allow)
    if damage is None:
        if nets:
            trace("nft: table %s in place" % NFT_TABLE)
        return None
    if _nft_damage(nets, not allow) is None:
        # Written by a jrun with the other allow-link-local: the host's
        # setting changed (or another --config), not a repair.
        trace("nft: table %s rewritten for allow-link-local = %s" % (NFT_TABLE, str(allow).lower()))
        _sync_nft()
        return None
    try:
        _sync_nft()
    except SetupError as e:
        raise SetupError("jrun's firewall, nft table %s, is %s and could not be restored (%s); no networked "
                         "job starts without it" % (NFT_TABLE, damage, e)) from None
    if not quiet:
        log("info", "nft table %s was %s (a firewall reload?): restored" % (NFT_TABLE, damage))
    return damage


def _host_routes_overlapping(nl, subnet, own_bridge=None):
    """The host's IPv4 routes (all tables, default routes aside) that overlap
    subnet, as (network, prefix length); routes through own_bridge are jrun's own.
    (Told by the device's name after the dump: a concurrent jrun may create
    the bridge while this one looks.)"""
    import socket

    out = []
    for r in nl.dump(nl.route, Netlink.GETROUTE, family=2):
        plen = r["dst_len"]
        dst = r.get_attr("RTA_DST")
        if plen == 0 or dst is None or ":" in dst:
            continue
        route = (parse_ip(dst) & _mask(plen), plen)
        if not subnets_overlap(route, subnet):
            continue
        oif = r.get_attr("RTA_OIF")
        if oif is not None and own_bridge is not None:
            try:
                if socket.if_indextoname(oif) == own_bridge:
                    continue
            except OSError:
                continue  # its device is gone, and the route with it
        out.append(route)
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
        trace("network %s: bridge %s deleted (no job left on it)" % (f.name, f.bridge))
    _sync_nft(without=f.bridge)
    f.remove()


def _nft_refused(net, e):
    """nft's refusal of jrun's table as one line (nft prints the error, then
    the offending rule and a caret line, for each error)."""
    lines = str(e).splitlines()
    first = next((ln.split("Error: ", 1)[1] for ln in lines if "Error: " in ln), lines[0] if lines else "")
    hint = ("; this kernel's nftables lacks what jrun's firewall needs (the inet family and NAT: "
            "CONFIG_NF_TABLES_INET, CONFIG_NFT_NAT): use --net none") if "not supported" in first else ""
    return SetupError("--net %s: nft refused jrun's firewall: %s%s" % (net, first, hint))


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
    teardown()  parent or gc: the lease; the veth goes with the job's
                namespace; the bridge and nft rules stay, idle, for the
                next job (gc removes them after network-idle)"""

    name = "network"

    def __init__(self, spec):
        super().__init__(spec)
        self.net = spec.net if spec else None
        self.bridge = bridge_name(self.net) if spec else None
        self.owner = self.veth = None  # the job's state directory, its veth
        self.address = None
        self.net_file = None
        self.resolv = ""
        self.nl = None

    # -- parent, before any side effect -------------------------------------

    @classmethod
    def check(cls, spec):
        if spec.net == "none":
            return
        if not _nft_path():
            raise SetupError("--net %s: nft not found (apt-get install nftables, or use --net none)" % spec.net)
        if spec.net != "bridge":
            return  # a named network's subnet is chosen free when it is made
        try:
            clash = _host_routes_overlapping(_host_netlink(), HOST.subnet, DEFAULT_BRIDGE)
        except OSError as e:
            raise _net_error(spec.net, e) from None
        if clash:
            raise UsageError("--net bridge: the jrun subnet %s overlaps the host's route to %s (use --net NAME, "
                             "which picks a free subnet, or --net none)"
                             % (format_subnet(HOST.subnet), format_subnet(clash[0])))

    # -- parent, before the fork --------------------------------------------

    def setup(self, state):
        self.owner, self.veth = state.dir, veth_name(state.dir)
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
        # First the rules of the networks there are: a network in use
        # whose table a firewall reload removed gets it back here (or this
        # job is refused), before another job joins its bridge.
        _restore_nft()
        f = NetFile.load(self.bridge)
        new = f is None
        if new:
            f = self._new_network()
        elif f.name != self.net:
            raise SetupError("--net %s: its bridge name %s is taken by network %s (rename one of them)"
                             % (self.net, self.bridge, f.name))
        f.prune(keep=self.owner)
        if _ifindex(self.veth) is not None:
            # A job of the same name just ended: the kernel has not reaped
            # its veth yet (see teardown).  Ours needs the name.
            _delete_link(self.nl, self.veth)
        self.address = f.allocate(self.owner)
        self.net_file = f
        # Recorded before anything is made (for ps; gc derives the bridge,
        # the veth and the lease's owner from the job's id and network).
        state.save(net_address=format_ip(self.address))
        f.save()
        missing = _ifindex(self.bridge) is None
        if new:
            # Rules first: a bridge never exists without them, whenever a
            # jrun may have been killed.
            try:
                _sync_nft()
            except SetupError as e:
                # nft applies a ruleset whole or not at all: the table is as
                # it was, so a new network leaves nothing (its file goes).
                if new:
                    f.remove()
                raise _nft_refused(self.net, e) from None
        if new or missing:
            _enable_forwarding()
        if missing:
            self._create_bridge(f)
        trace("network %s: address %s/%d leased on %s" % (self.net, format_ip(self.address), f.subnet[1],
                                                          self.bridge))

    def _new_network(self):
        if self.net == "bridge":
            subnet = HOST.subnet
        else:
            used = [f.subnet for f in NetFile.all()] + [HOST.subnet]
            used += _host_routes_overlapping(self.nl, HOST.net_pool)
            subnet = named_subnet(self.net, HOST.net_pool, used)
            if subnet is None:
                raise SetupError("--net %s: no free /%d left in the network pool %s"
                                 % (self.net, NAMED_PREFIXLEN, format_subnet(HOST.net_pool)))
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
        trace("network %s: bridge %s created, gateway %s/%d" % (self.net, self.bridge, format_ip(f.gateway),
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
            trace("network %s: veth %s on %s%s, its other end eth0 in the job's network namespace"
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
        trace("network: eth0 %s/%d up, default route via %s" % (format_ip(ip), f.subnet[1], format_ip(f.gateway)))
        trace("network: ready")

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
            log("warning", "network teardown of %s: %s (run: jrun gc)" % (self.owner, e))

    def _teardown(self):
        if self.owner is None:
            return  # setup never started
        # The veth is not deleted here: the kernel deletes the pair when the
        # job's network namespace dies with its last process (before this
        # teardown, unless jrun failed before the fork), in its cleanup
        # work, where DELLINK would make jrun wait ~16 ms for an RCU grace
        # period.  Its lease goes now; gc deletes a veth that outlives its
        # lease (a namespace pinned by a process outside the job).
        with _NetLock():
            f = NetFile.load(self.bridge) if self.bridge else None
            if f is None:
                return
            mine = [ip for ip, owner in f.leases.items() if owner == self.owner]
            for ip in mine:
                del f.leases[ip]
                trace("network: address %s released" % format_ip(ip))
            f.prune()
            if f.leases:
                f.save()
                if mine:  # (a job refused before it had a lease has said why already)
                    _restore_nft()  # the jobs still running need their rules too
            elif HOST.network_idle:
                if f.idle is None:
                    f.idle = time.time()
                f.save()
                trace("network %s: idle; bridge %s and its rules kept for the next job (network-idle: %g s)"
                      % (f.name, self.bridge, HOST.network_idle))
            else:
                _remove_network(self.nl or _host_netlink(), f)

    @classmethod
    def from_state(cls, record):
        """Everything follows from the job's id and network, as in setup();
        teardown skips what was never made."""
        if record.get("net") in (None, "none") or not record.get("id"):
            return None
        self = cls(None)
        self.net, self.bridge = record["net"], bridge_name(record["net"])
        self.owner = os.path.join(HOST.state_dir, record["id"])
        self.veth = veth_name(self.owner)
        return self

    @classmethod
    def orphans(cls, known_ids):
        """gc: job veths and leases whose job is gone (its state directory
        with it), and networks idle for longer than network-idle.  (A veth
        whose namespace died is deleted by the kernel, shortly: gc may find
        it still there.)  Devices are listed before the
        leases are read: a lease is written before its veth is made and
        released after it is deleted.  (known_ids is not needed: a lease
        names its job's state directory, wherever that is.)"""
        devices = _net_devices()
        veths = [n for n in devices if _is_job_veth(n)]
        bridges = [n for n in devices if _is_jrun_bridge(n)]
        nets = NetFile.all()
        live = {veth_name(o) for f in nets for o in f.leases.values() if _lease_live(o)}
        for name in veths:
            if name not in live:
                yield NetworkLeftover("veth %s" % name, _gc_veth, name)
        now = time.time()
        for f in nets:
            if not all(_lease_live(o) for o in f.leases.values()) or not (f.leases or f.idle):
                yield NetworkLeftover("network %s: dead leases" % f.name, _gc_network, f.bridge)
            elif f.expired(now):
                yield NetworkLeftover("network %s: idle for %d s" % (f.name, now - (f.idle or now)), _gc_network,
                                      f.bridge)
        # A bridge is made after its network's file and removed before it
        # (under the lock): one without a file lost it to a crash or a hand.
        known = {f.bridge for f in nets}
        for name in bridges:
            if name not in known:
                yield NetworkLeftover("bridge %s: no network file" % name, _gc_bridge, name)
        # Looked at after the networks above went (a generator: each was
        # torn down before this line runs); _gc_nft looks again under the lock.
        in_table = _nft_networks()
        damage = _nft_damage(in_table, HOST.allow_link_local)
        if damage:  # a firewall reload removed all or part of it
            yield NetworkLeftover("nft table %s, %s: restored" % (NFT_TABLE, damage), _gc_nft, None)
        elif not in_table and _nft_hooks():
            yield NetworkLeftover("nft table %s: no network left" % NFT_TABLE, _gc_nft, None)


def _is_job_veth(name):
    return _is_hashed_name("jr", name)


def _is_jrun_bridge(name):
    return name == DEFAULT_BRIDGE or _is_hashed_name("jrun-", name)


def _net_devices():
    """The network devices of jrun's network namespace.  (Not /sys/class/net:
    a sysfs shows the namespace of whoever mounted it, and jrun may run in
    another, as in the tests' stand-in hosts.)"""
    import socket

    try:
        return [name for _, name in socket.if_nameindex()]
    except OSError:
        return []


class NetworkLeftover(Resource):
    """Something of the networks that gc found with no running job behind it
    (Network.orphans): its teardown is UNDO(ARG)."""

    def __init__(self, name, undo, arg):
        super().__init__(None)
        self.name, self._undo, self._arg = name, undo, arg
        self.failed = False

    def teardown(self):
        try:
            self._undo(self._arg)
        except (JrunError, OSError) as e:
            self.failed = True
            log("warning", "gc: %s: %s" % (self.name, e))

    def remains(self):
        return [self.name] if self.failed else []


def _gc_veth(name):
    with _NetLock():  # checked again under the lock: its job may have started since
        if not any(veth_name(o) == name and _lease_live(o) for f in NetFile.all() for o in f.leases.values()):
            _delete_link(_host_netlink(), name)


def _gc_bridge(name):
    with _NetLock():  # checked again under the lock: its network may have been made since
        if NetFile.load(name) is None:
            _delete_link(_host_netlink(), name)


def _gc_nft(_):
    with _NetLock():
        if _nft_networks():
            _restore_nft(quiet=True)
        else:
            _sync_nft()  # no network: no table


def _gc_network(bridge):
    """Forget the dead leases of a network; remove it if that leaves it
    expired (idle for network-idle), else keep it idle from now."""
    with _NetLock():
        f = NetFile.load(bridge)
        if f is None:
            return
        f.prune()
        if not f.leases and f.idle is None:
            f.idle = time.time()  # its last job died without its teardown: idle from now
        if f.expired(time.time()):
            _remove_network(_host_netlink(), f)
        else:
            f.save()


def host_resources(spec):
    """The resources a job needs, in setup order (torn down in reverse)."""
    return [Cgroup.for_job(spec)] + ([JobUserNamespace(spec)] if spec.userns else []) + (
        [Network(spec)] if spec.net != "none" else [])


RESOURCE_CLASSES = (Cgroup, JobUserNamespace, Network)


# ---------------------------------------------------------------------------
# The job's stdio.  A job runs as root: with the caller's file as its fd 1,
# `chmod 4755 /proc/self/fd/1` would leave a setuid-root file on the host,
# and a `< input` file, the invoker's terminal or the host's /dev/null could
# be rewritten or chmodded through /proc/self/fd/N.  So, as docker and
# systemd-nspawn do, the job inherits only what has no host inode
# (anonymous pipes and sockets) and jrun stands in for everything else:
#   - the host's /dev/null, or a closed fd: the job's own /dev/null;
#   - a file, directory, named fifo or device: a pipe whose other end jrun
#     relays to the caller's fd (splice between a pipe and a regular file);
#   - a terminal: a pty of the job's own devpts instance, whose master jrun
#     relays; the caller's terminal is in raw mode meanwhile if jrun is in
#     its foreground, so that the job's pty does all the line discipline.
# Parent, first thing in a run: stdio_kinds().  Parent, before fork:
# JobStdio(kinds) makes the pipes.  Child, in the job's root, still root:
# JobStdio.enter() puts the job's ends on fds 0-2.  Parent, while the job
# runs: a Relay moves the bytes, inside the wait loop (one thread: poll).
# ---------------------------------------------------------------------------

STDIO_PASS = "pass"  # an anonymous pipe or a socket: the job gets the caller's own fd
STDIO_NULL = "null"  # the host's /dev/null, or closed: the job's own /dev/null
STDIO_PIPE = "pipe"  # any other file, fifo or device: a pipe that jrun relays
STDIO_TTY = "tty"  # a terminal: the job's own pty, relayed
STDIO_SAY = {STDIO_PASS: "the caller's pipe or socket", STDIO_NULL: "the job's /dev/null",
             STDIO_PIPE: "a pipe relayed by jrun", STDIO_TTY: "the job's own pty"}

# <asm-generic/ioctls.h>: the same numbers on x86_64 and aarch64.
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441
# Bytes moved per call, and the size of the relay pipes: with 1 MiB, a 1 GB
# stdout to a file takes 0.9 s here, 1.4 s with the default 64 KiB (see
# tests/bench_stdio.py).
RELAY_CHUNK = 1 << 20


def stdio_kinds():
    """Parent, first thing in a run, before jrun opens any fd of its own:
    what each of the caller's fds 0-2 is.  A closed one is filled with the
    host's /dev/null for jrun's own sake (a pipe or lock file of jrun's
    must never land on 0-2, where the job would get it); the job gets its
    own /dev/null there, as glibc gives setuid programs."""
    import stat

    kinds = []
    for fd in (0, 1, 2):
        try:
            st = os.fstat(fd)
        except OSError:
            os.set_inheritable(os.open(os.devnull, os.O_RDWR), True)  # the lowest free fd: FD
            kinds.append(STDIO_NULL)
            continue
        if stat.S_ISSOCK(st.st_mode):
            kind = STDIO_PASS
        elif stat.S_ISFIFO(st.st_mode):
            # An anonymous pipe lives on pipefs ("pipe:[ino]"); a named
            # fifo is a host inode like any file.
            kind = STDIO_PASS if os.readlink("/proc/self/fd/%d" % fd).startswith("pipe:") else STDIO_PIPE
        elif stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3):
            kind = STDIO_NULL
        elif stat.S_ISCHR(st.st_mode) and os.isatty(fd):
            kind = STDIO_TTY
        else:
            kind = STDIO_PIPE
        kinds.append(kind)
    return tuple(kinds)


def _same_open_file(a, b):
    """Whether fds A and B are one open file description (`> log 2>&1`):
    the same inode, offset and flags."""
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) and _fdinfo(a) == _fdinfo(b)


def _fdinfo(fd):
    with open("/proc/self/fdinfo/%d" % fd, "rb") as f:
        info = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
    return info.get(b"pos"), int(info.get(b"flags", b"0"), 8) & ~os.O_CLOEXEC  # per fd, not per file


def _in_foreground(fd):
    """Whether jrun is in the foreground process group of its terminal FD."""
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:  # not jrun's controlling terminal
        return False


class JobStdio:
    """The job's fds 0-2: made by the parent before fork from the kinds of
    the caller's (pipes; a socket pair that carries the pty's master from
    the child), entered by the child, relayed by the parent."""

    def __init__(self, kinds):
        self.job_ends = {}  # 0-2 -> the fd the child puts there
        self.relay_ends = {}  # 0-2 -> jrun's end of that pipe
        self.tty = None  # (termios, window size) of the caller's terminal: the pty starts with them
        self.raw = False  # the caller's terminal goes to raw mode (see Relay.start)
        self.pty_socket = None  # (jrun's end, the child's end)
        if STDIO_TTY in kinds:
            kinds = self._plan_pty(kinds)
        self.kinds = kinds
        for fd in (0, 1, 2):
            if kinds[fd] != STDIO_PIPE:
                continue
            if fd == 2 and kinds[1] == STDIO_PIPE and _same_open_file(1, 2):
                # One pipe for both: the job's stdout and stderr keep their order.
                self.job_ends[2] = self.job_ends[1]
                continue
            r, w = os.pipe2(os.O_CLOEXEC)
            self.job_ends[fd], self.relay_ends[fd] = (r, w) if fd == 0 else (w, r)
            os.set_blocking(self.relay_ends[fd], False)
            try:
                fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, RELAY_CHUNK)
            except OSError:
                pass  # above fs.pipe-max-size for a non-root jrun: the default size works too

    def _plan_pty(self, kinds):
        """The job's pty starts with the caller's termios and window size.
        If jrun will not own the caller's terminal (not raw: stdin is not
        it, or jrun is in the background), the job's pty does no output
        processing, so that it happens once, on the caller's side.  A
        terminal that cannot be read (hung up) is relayed as a plain pipe."""
        import _socket  # not socket: that one costs 7 ms to import (enum)
        import termios

        tty = kinds.index(STDIO_TTY)
        try:
            attrs = termios.tcgetattr(tty)
            winsize = fcntl.ioctl(tty, termios.TIOCGWINSZ, bytes(8))
        except (termios.error, OSError):
            return tuple(STDIO_PIPE if k == STDIO_TTY else k for k in kinds)
        self.raw = kinds[0] == STDIO_TTY and _in_foreground(0)
        if not self.raw:
            attrs[1] &= ~termios.OPOST
        self.tty = (attrs, winsize)
        self.pty_socket = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        return kinds

    @property
    def relayed(self):
        return bool(self.relay_ends or self.tty)

    def enter(self, uid, gid):
        """Child, in the job's root, as root, just before the fds above 2
        are closed: the job's own ends on fds 0-2, never the caller's.  The
        job's user (host uid UID) owns its pipes and its pty, so that it may
        reopen /dev/stdout or /dev/tty as a user, as it could the caller's."""
        ends = dict(self.job_ends)
        for fd in ends:
            os.fchown(ends[fd], uid, gid)
        if STDIO_NULL in self.kinds:
            null = _open_job_null()
            ends.update((fd, null) for fd in (0, 1, 2) if self.kinds[fd] == STDIO_NULL)
        if self.tty:
            slave = self._open_pty(uid, gid)
            ends.update((fd, slave) for fd in (0, 1, 2) if self.kinds[fd] == STDIO_TTY)
        for fd, end in ends.items():
            os.dup2(end, fd)  # inheritable: dup2 clears close-on-exec on FD
        trace("stdio: %s" % ", ".join("%d %s" % (fd, STDIO_SAY[k]) for fd, k in enumerate(self.kinds)))

    def _open_pty(self, uid, gid):
        """A pty of the job's own devpts instance (build_dev): the slave for
        the job, the master sent to jrun through the socket pair."""
        import _socket
        import termios

        master = os.open("/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(master, TIOCSPTLCK, bytes(4))  # unlockpt()
            slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            attrs, winsize = self.tty
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
            fcntl.ioctl(slave, termios.TIOCSWINSZ, winsize)
            os.fchown(slave, uid, gid)
            self.pty_socket[1].sendmsg([b"m"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                                 master.to_bytes(4, sys.byteorder))])
        finally:
            os.close(master)
        return slave

    def take_terminal(self):
        """Child, after setsid(): if the caller's stdin was a terminal, the
        job's pty becomes the job's controlling terminal, so that ^C in the
        line discipline reaches the job's foreground process group (as with
        docker -it).  The job never has another: TIOCSTI can only push
        characters into its own pty (CVE-2017-5226)."""
        if self.kinds[0] == STDIO_TTY:
            import termios

            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            return True
        return False

    def close_job_ends(self):
        """Parent, after fork: the job's ends are the child's now (a pipe
        reads EOF only once every write end is closed).  The read end of a
        stdin pipe stays: Relay.close() counts what the job left unread."""
        for fd in set(self.job_ends.values()):
            if fd != self.job_ends.get(0):
                os.close(fd)
        if self.pty_socket:
            self.pty_socket[1].close()

    def close_end(self, fd):
        """Parent: close jrun's end FD of a relay pipe."""
        os.close(fd)
        self.relay_ends = {k: v for k, v in self.relay_ends.items() if v != fd}

    def close(self):
        """Parent, every exit path: jrun's ends that are still open."""
        for fd in set(self.relay_ends.values()):
            self.close_end(fd)
        if 0 in self.job_ends:
            os.close(self.job_ends.pop(0))
        if self.pty_socket:
            self.pty_socket[0].close()
            self.pty_socket = None


def _open_job_null():
    """The job's /dev/null, by path in its own root: build_dev made it."""
    import stat

    fd = os.open("/dev/null", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(1, 3):
        raise SetupError("the job's /dev/null is not the null device")
    return fd


def _private_open(fd, flags):
    """A non-blocking open file description of the caller's FD (a terminal,
    fifo or device to write to) that is jrun's alone, through /proc/self/fd:
    O_NONBLOCK set on the caller's own would be seen by everyone who shares
    it (a shell's terminal).  FD itself if that fails (a fifo whose reader
    has gone: writes fail then anyway).  Reads need none of this: one
    read() after poll() says POLLIN never blocks, and a reopened fifo would
    not report its writers' hangup (fifo_open suppresses it)."""
    try:
        return os.open("/proc/self/fd/%d" % fd, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return fd


class _Pump:
    """One direction of a relay: from SRC to DST, one chunk per call of
    step() (so that the wait loop keeps its deadlines), with splice(2)
    between a pipe and a regular file (no copy through jrun), read/write
    otherwise (and where splice says EINVAL: an O_APPEND file)."""

    def __init__(self, src, dst, to_job, splice=False, close=None):
        self.src, self.dst = src, dst
        self.to_job = to_job  # toward the job (its stdin), else from it
        self.splice = splice  # one side is a regular file, which never blocks: the pipe side does
        self.close = close  # jrun's pipe end, closed when done: the job then reads EOF or gets EPIPE
        self.on_read = None
        self.buf = b""
        self.total = 0  # bytes taken from SRC
        self.done = False
        self.draining = False  # the job is gone: a source with nothing left now is done

    def wants(self):
        import select

        if self.buf or (self.splice and self.to_job):
            return self.dst, select.POLLOUT
        return self.src, select.POLLIN

    def step(self):
        """Move one chunk if that can be done without blocking; return the
        number of bytes moved."""
        try:
            if self.splice:
                try:
                    n = os.splice(self.src, self.dst, RELAY_CHUNK, flags=os.SPLICE_F_NONBLOCK)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self.splice = False
                    return 0
                self.done = n == 0
                self.total += n
                return n
            if not self.buf:
                self.buf = os.read(self.src, RELAY_CHUNK)
                self.done = not self.buf
                self.total += len(self.buf)
                if self.on_read and self.buf:
                    self.on_read(self.buf)
            n = os.write(self.dst, self.buf) if self.buf else 0
            self.buf = self.buf[n:]
            return n
        except BlockingIOError:
            self.done = self.draining and not self.buf
        except OSError:  # EIO: the pty's slave side is closed; EPIPE: the caller's reader is gone
            self.done = True
        return 0


class Relay:
    """Parent, while the job runs: moves the bytes between the caller's fds
    and jrun's ends of the job's pipes and pty, never blocking on a slow
    reader or on a job that does not read, and waits for signals (read
    from a signalfd) at the same time."""

    def __init__(self, stdio):
        import stat

        self.stdio = stdio
        self.pumps = []
        self.opened = []  # jrun's own descriptions of the caller's files
        self.master = None
        self.terminal = None  # the caller's termios while it is in raw mode
        self.typed = []  # (signal, the pty's foreground group) for each INTR/QUIT typed
        self.moved = time.monotonic()  # when bytes last moved
        self.sigfd = signalfd(WAITED_SIGNALS)
        for fd, mine in sorted(stdio.relay_ends.items()):
            mode = os.fstat(fd).st_mode
            regular = stat.S_ISREG(mode)
            if fd == 0:  # read as it is: one read() per POLLIN never blocks
                self.pumps.append(_Pump(0, mine, True, regular, close=mine))
                continue
            # A regular file or block device is written as it is: its offset
            # is shared with the caller (`{ jrun ...; echo more; } > f`).
            caller = fd if regular or stat.S_ISBLK(mode) else self._open(fd, os.O_WRONLY)
            self.pumps.append(_Pump(mine, caller, False, regular, close=mine))

    def _open(self, fd, flags):
        mine = _private_open(fd, flags)
        if mine != fd:
            self.opened.append(mine)
        return mine

    def start(self):
        """After exec: the pty's master, and the caller's terminal in raw
        mode for the job's life if jrun is in its foreground (in the
        background, jrun neither changes it nor reads it: SIGTTOU/SIGTTIN)."""
        if not self.stdio.tty:
            return
        import _socket
        import termios
        import tty

        sock = self.stdio.pty_socket[0]
        sock.setblocking(False)
        _, anc, _, _ = sock.recvmsg(1, _socket.CMSG_SPACE(4), 0x40000000)  # MSG_CMSG_CLOEXEC
        self.master = int.from_bytes(anc[0][2][:4], sys.byteorder)
        os.set_blocking(self.master, False)
        kinds = self.stdio.kinds
        # The job's terminal output goes to the caller's on stdout, else
        # stderr, else stdin's (the echo of what is typed).
        out = next(fd for fd in (1, 2, 0) if kinds[fd] == STDIO_TTY)
        self.pumps.append(_Pump(self.master, self._open(out, os.O_WRONLY), False))
        if self.stdio.raw:
            self.terminal = termios.tcgetattr(0)
            tty.setraw(0, termios.TCSANOW)  # TCSANOW: what was typed before stays
            _log["crlf"] = os.isatty(2)
            keys = _Pump(0, self.master, True)
            keys.on_read = self._typed
            self.pumps.append(keys)
            self.resize()

    def resize(self):
        """SIGWINCH: the caller's window size to the job's pty (whose
        kernel side signals the job's foreground process group)."""
        if self.master is not None:
            import termios

            tty = self.stdio.kinds.index(STDIO_TTY)
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, fcntl.ioctl(tty, termios.TIOCGWINSZ, bytes(8)))

    def wait(self, timeout):
        """One round: wait up to TIMEOUT seconds (None: no limit) until a
        signal arrives or a relayed fd is ready, move what is ready, and
        return the signals that arrived."""
        import select

        live = [p for p in self.pumps if not p.done]
        events = {self.sigfd: select.POLLIN}
        for p in live:
            fd, ev = p.wants()
            events[fd] = events.get(fd, 0) | ev
        poll = select.poll()
        for fd, ev in events.items():
            poll.register(fd, ev)
        ready = dict(poll.poll(None if timeout is None else int(timeout * 1000) + 1))
        for p in live:
            fd, ev = p.wants()
            if ready.get(fd, 0) & (ev | select.POLLHUP | select.POLLERR):
                self._step(p)
        return read_signalfd(self.sigfd) if self.sigfd in ready else []

    def _step(self, pump):
        moved = pump.step()
        if moved:
            self.moved = time.monotonic()
        if pump.done:
            self._close(pump)
        return moved

    def _close(self, pump):
        if pump.close is not None:
            self.stdio.close_end(pump.close)
            pump.close = None

    def _typed(self, keys):
        """The job's line discipline turns INTR and QUIT into signals for its
        foreground process group; the wait loop checks whether that is PID
        1's, for which the kernel drops a signal PID 1 has no handler for."""
        import termios

        attrs = termios.tcgetattr(self.master)  # the job's side's, as the job set them
        if attrs[3] & termios.ISIG:
            for key, sig in ((termios.VINTR, signal.SIGINT), (termios.VQUIT, signal.SIGQUIT)):
                if attrs[6][key] != b"\0" and attrs[6][key] in keys:
                    self.typed.append((sig, os.tcgetpgrp(self.master)))

    def flush(self, rounds=64):
        """Move what the job has written so far, before a message of jrun's
        own (which must come after the output that preceded it)."""
        for _ in range(rounds):
            if not sum(self._step(p) for p in self.pumps if not p.to_job and not p.done):
                break

    def finish(self, stall):
        """After PID 1 is gone: deliver everything the job wrote (each
        output pipe and the pty read to its end) before jrun says anything
        more.  A reader of the caller's that takes nothing for STALL
        seconds, or a signal to stop, ends the wait."""
        self.moved = time.monotonic()
        for p in self.pumps:
            p.draining = True
            if p.to_job and not p.done:
                p.done = True
                self._close(p)
        while any(not p.done for p in self.pumps):
            left = self.moved + stall - time.monotonic()
            if left <= 0 or set(self.wait(left)) & set(FORWARDED_SIGNALS):
                log("warning", "the job's output was not all delivered: its reader stopped reading")
                break

    def close(self):
        """Every exit path: the caller's terminal as it was, the unread rest
        of a stdin file given back (the caller's offset is where the job
        stopped reading, as if it had read the file itself), jrun's fds
        closed."""
        if self.terminal is not None:
            import termios

            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})  # jrun may be in the background now
            try:
                termios.tcsetattr(0, termios.TCSANOW, self.terminal)
            except termios.error:
                pass
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
            self.terminal = None
            _log["crlf"] = False
        self._give_back_stdin()
        for fd in self.opened + [self.sigfd] + ([self.master] if self.master is not None else []):
            os.close(fd)
        self.opened = []
        self.master = None

    def _give_back_stdin(self):
        if 0 not in self.stdio.job_ends or self.stdio.kinds[0] != STDIO_PIPE:
            return
        import termios

        pump = next(p for p in self.pumps if p.src == 0)
        unread = int.from_bytes(fcntl.ioctl(self.stdio.job_ends[0], termios.FIONREAD, bytes(4)), sys.byteorder)
        unread = min(unread + len(pump.buf), pump.total)  # what the job wrote into its stdin is not the file's
        if unread:
            try:
                os.lseek(0, -unread, os.SEEK_CUR)
            except OSError:
                pass  # not seekable (a fifo, a device): what was read is gone, as with docker


# ---------------------------------------------------------------------------
# The child.  Runs as root, forked from jrun, PID 1 of the job's new PID
# namespace.  A flat list of steps; it never returns into parent code: it
# execs COMMAND or reports an error through the close-on-exec status pipe and
# exits.
# ---------------------------------------------------------------------------


class ChildPlan(_Frozen):
    """What the child needs beyond the JobSpec, computed by the parent."""

    __slots__ = ("spec", "state_dir", "status_w", "sync_r", "parent_pid", "resources", "stdio")


def _report(fd, code, msg):
    """An error on the status pipe (its data format: see supervise)."""
    try:
        os.write(fd, _exact_bytes("E%d %s\n" % (code, msg)))
    except OSError:
        pass


class ChildRun:
    """What the child's steps share: its plan, then what the steps before
    found (the owner of the job's root, the root, the user, the environment
    and argv of COMMAND)."""

    __slots__ = ("plan", "spec", "owner", "root", "uid", "gid", "home", "env", "argv")

    def __init__(self, plan):
        self.plan, self.spec = plan, plan.spec
        self.owner, self.root = HOST_ROOT, None


def child_main(plan):
    """Entry of the forked child: CHILD_STEPS in order, the last one execs
    COMMAND.  Never returns; a step's failure goes to the status pipe, named
    after the step when the error does not say more than errno."""
    job = ChildRun(plan)
    step = "start"
    try:
        try:
            for step, run in CHILD_STEPS:
                trace("child step: %s" % step)
                run(job)
        except JrunError as e:
            _report(plan.status_w, e.exit_code, str(e))
            os._exit(e.exit_code)
        except OSError as e:
            _report(plan.status_w, EXIT_JRUN, "job setup: %s: %s"
                    % (step, e.strerror if not e.args[1:] else e.args[1]))
            os._exit(EXIT_JRUN)
        except BaseException as e:  # noqa: BLE001 - the child must never return
            _report(plan.status_w, EXIT_JRUN, "job setup: %s: %s: %s" % (step, type(e).__name__, e))
            os._exit(EXIT_JRUN)
    finally:
        os._exit(EXIT_JRUN)


def die_with_jrun(job):
    import prctl

    # If jrun dies, even by SIGKILL, the job dies with it; and the PID
    # namespace collapses with its PID 1.
    # (getppid() is 0 here: the parent lives outside our PID namespace; a
    # parent that died before this point closes the sync pipe instead.)
    prctl.set_pdeathsig(signal.SIGKILL)
    # Not dumpable until exec (which resets it for COMMAND): no process of
    # the job can ptrace this interpreter or open its /proc/1/mem, environ
    # or fds while it still holds privileges and host file descriptors.
    prctl.set_dumpable(0)


def unshare_namespaces(job):
    unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET)
    trace("namespaces created: pid (PID %d inside), mount, uts, ipc, net" % os.getpid())
    loopback_up()
    trace("network: lo up")


def wait_for_release(job):
    """Tell the parent we are ready (R on the status pipe), then wait until
    it has put us in our cgroup and network (G on the sync pipe; the pipes'
    data format: see supervise).  EOF instead means the parent gave up:
    exit quietly."""
    os.write(job.plan.status_w, b"R\n")
    if os.read(job.plan.sync_r, 1) != b"G":
        os._exit(EXIT_JRUN)


def enter_resources(job):
    for res in job.plan.resources:
        res.enter()
    job.owner = next((o for o in (res.root_owner() for res in job.plan.resources) if o), HOST_ROOT)


def build_job_root(job):
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    trace("mounts made private (recursively) before anything was mounted")
    job.root = build_root(job.spec, job.plan.state_dir, job.owner, job.plan.resources)


def pivot_into_root(job):
    pivot_into(job.root)


def enter_proc_and_sys(job):
    mount_proc_and_sys()
    for res in job.plan.resources:
        res.enter_root()
    harden_proc_and_sys(job.spec)


def set_hostname(job):
    sethostname(job.spec.hostname)
    trace("hostname set to %s" % job.spec.hostname)


def enter_workdir(job):
    """The job's user, its /work, environment, workdir and command path."""
    spec, owner = job.spec, job.owner
    uid, gid, home = resolve_user(spec)
    job.uid, job.gid, job.home = uid, gid, home
    if owner.limit is not None and max(uid, gid) >= owner.limit:
        raise UsageError("-u/--user: %d:%d is not mapped under --userns (0 to %d are)"
                         % (uid, gid, owner.limit - 1))
    if uid:  # /work, the job's own tmpfs, is its user's (what was uploaded into it keeps its owner)
        os.chown(DEFAULT_WORKDIR, owner.base + uid, owner.base + gid)
    job.env = job_environment(spec, home)
    try:
        os.chdir(spec.workdir)
    except OSError as e:
        raise SetupError("-w/--workdir %s: %s" % (spec.workdir, e.strerror)) from None
    job.argv = resolve_command(spec, job.env)  # in the workdir: './run.sh' is the workdir's, as for execvp


def take_stdio_and_session(job):
    plan, owner = job.plan, job.owner
    plan.stdio.enter(owner.base + job.uid, owner.base + job.gid)
    close_inherited_fds((plan.status_w, plan.sync_r) + ((owner.userns_fd,) if owner.mapped else ()))
    os.setsid()
    if plan.stdio.take_terminal():
        trace("new session; its controlling terminal is the job's own pty (TIOCSTI, CVE-2017-5226)")
    else:
        trace("new session: the job has no controlling terminal (TIOCSTI, CVE-2017-5226)")


def reset_signals(job):
    # COMMAND starts with every signal at its default and none blocked, as
    # in a fresh container: exec keeps an ignored signal ignored (Python
    # ignores SIGPIPE and SIGXFSZ; a shell ignores SIGINT and SIGQUIT in
    # what it starts with `&`, and `trap '' TERM` in a batch script ignores
    # SIGTERM), and a shell cannot trap a signal ignored on entry: its
    # PID 1 would be deaf to what jrun relays.
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def drop_job_privileges(job):
    drop_privileges(job.spec, job.uid, job.gid, job.plan.sync_r, job.owner)


def exec_command(job):
    trace("exec %s" % " ".join(job.argv))
    try:
        os.execve(job.argv[0], job.argv, job.env)
    except OSError as e:
        error = NotFound if e.errno == errno.ENOENT else NotExecutable
        hint = " (a script whose interpreter is missing from the job's root?)" if error is NotFound else ""
        raise error("%s: cannot execute: %s%s" % (job.spec.command[0], e.strerror, hint)) from None


# The child's whole life, in order, as nsjail's containProc: (name, step).
# The name is the step's line in the debug trail and the start of its error
# when it fails with no more than an errno ("job setup: pivot_root: ...").
CHILD_STEPS = (
    ("die with jrun", die_with_jrun),
    ("namespaces", unshare_namespaces),
    ("wait for release", wait_for_release),
    ("enter resources", enter_resources),
    ("build root", build_job_root),
    ("pivot_root", pivot_into_root),
    ("/proc and /sys", enter_proc_and_sys),
    ("hostname", set_hostname),
    ("user and workdir", enter_workdir),
    ("stdio and session", take_stdio_and_session),
    ("signals reset", reset_signals),
    ("drop privileges", drop_job_privileges),
    ("execve", exec_command),
)


# ---------------------------------------------------------------------------
# The job's root, built by the child (build_job_root) in the order it
# happens: a tmpfs, the rootfs (an overlay, or the host's system dirs
# read-only), the writable dirs, /etc, uploads and volumes (stage_files),
# /dev (build_dev); then pivot_root and /proc and /sys.  Everything here runs
# in the child, as root, in the job's own mount namespace and, up to
# pivot_into, while the host's paths are still visible.  So nothing here
# follows a symlink of the job's root (or of an uploaded tree) with a plain
# path: jrun's own mount points are made real directories (_safe_mkdirs), and
# a user's DEST is resolved by the kernel with openat2(RESOLVE_IN_ROOT), where
# an absolute or '..' symlink stays inside the job's root.  Files are created
# with O_EXCL|O_NOFOLLOW relative to directory fds.
# ---------------------------------------------------------------------------


def build_root(spec, state_dir, owner=HOST_ROOT, resources=()):
    """The job's root, in the job's own mount namespace, so that everything
    the job writes vanishes with it even if jrun is SIGKILLed, and
    concurrent jobs never see each other's writes: for --rootfs minimal or
    PATH an overlay whose lower layer is that directory (never modified);
    for --rootfs host a directory with the host's system directories bound
    read-only.

    Everything the job can write lives on ONE tmpfs of --workdir-size (the
    overlay's upper layer or the host root's directory, and /tmp, /work and
    /dev/shm, bound from its directories): one size= bounds the job's whole
    writable space, and a job that fills it gets ENOSPC in every place at
    once, never the host's memory.  (Separate tmpfs would each default to
    half of RAM; and tmpfs pages outlive the process that wrote them, so the
    host's OOM killer would pick host daemons instead.)

    Under --userns the job's root is host uid B (owner.base): the rootfs is
    bound through an idmapped mount (its root-owned files appear owned by B,
    so copy-ups stay B's too) and the writable directories belong to B."""
    base = os.path.join(state_dir, "root")
    mount("jrun-" + spec.id, base, "tmpfs", MS_NOSUID | MS_NODEV,
          "mode=0755,size=%d,nr_inodes=%d" % (workdir_bytes(spec), workdir_inodes(spec)))
    space = {}
    for name, mode in WRITABLE_DIRS + (HOST_ROOT_DIRS if spec.rootfs == "host" else OVERLAY_DIRS):
        space[name] = os.path.join(base, name)
        os.mkdir(space[name])
        os.chmod(space[name], mode)  # past the umask
        if owner.mapped:
            os.chown(space[name], owner.base, owner.base)
    root = os.path.join(base, "root")
    os.mkdir(root, 0o755)
    if spec.rootfs == "host":
        mount(space["host"], root, None, MS_BIND)  # a mount point, for pivot_root
        build_host_root(root)
    else:
        os.mkdir(os.path.join(base, "lower"), 0o755)
        lower = rootfs_path(spec)
        # The tree validate() cloned (open_staging_sources), not the path.
        fd = os.open(os.path.join(base, "lower"), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            bind_into(spec.rootfs_fd, fd, MOUNT_ATTR_IDMAP if owner.mapped else 0,
                      owner.userns_fd if owner.mapped else 0)
        except OSError as e:
            if not owner.mapped or e.errno != errno.EINVAL:
                raise
            # ext4, xfs, btrfs and vfat allow idmapped mounts since 5.12-5.15,
            # tmpfs since 6.3; ext2, NFS and FUSE (among others) do not.
            raise SetupError("--userns: the rootfs %s is on %s, which cannot be idmapped on Linux %s (use a "
                             "rootfs on ext4, xfs or btrfs, or --rootfs host)"
                             % (lower, _mount_of(lower)[0] or "a filesystem", os.uname().release)) from None
        finally:
            os.close(fd)
        # Relative layer paths, so that the job's /proc/self/mountinfo names no
        # host path (overlayfs shows its options as they were given).
        os.chdir(base)
        # nodev: a device node in a custom rootfs (an image from anywhere)
        # must not open the host's disks; /dev is a mount of its own.
        mount("overlay", root, "overlay", MS_NOSUID | MS_NODEV, "lowerdir=lower,upperdir=upper,workdir=ovlwork")
        trace("root: overlay of %s with a private writable layer" % lower)

    # Binds keep the tmpfs mount's nosuid and nodev (clone_mnt copies them).
    mount(space["tmp"], _safe_mkdirs(root, "tmp", 0o1777), None, MS_BIND)
    # /work is always there, whatever -w says: uploads land in it by default.
    mount(space["work"], _safe_mkdirs(root, DEFAULT_WORKDIR), None, MS_BIND)
    trace("writable space: one tmpfs (size=%s, nr_inodes=%d) for %s, /tmp, %s and /dev/shm"
          % (fmt_size(workdir_bytes(spec)), workdir_inodes(spec),
             "/" if spec.rootfs == "host" else "the root's writable layer", DEFAULT_WORKDIR))

    build_dev(root, spec, base, space["shm"])
    _safe_mkdirs(root, "proc", 0o555)
    _safe_mkdirs(root, "sys", 0o555)
    etc = {"etc/hostname": spec.hostname + "\n",
           "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n127.0.1.1\t%s\n" % spec.hostname}
    for res in resources:
        etc.update(res.etc_files())  # the network's /etc/hosts and /etc/resolv.conf
    for rel, content in etc.items():
        path = _safe_file(root, rel, content=content)
        if owner.mapped:
            chown_to_job(path, owner.base)
    stage_files(spec, root, owner)
    if spec.read_only:
        make_root_read_only(root)
    return root


# The directories of the job's writable tmpfs (name, mode): what is bound at
# /tmp, /work and /dev/shm; then the overlay's upper and work directories,
# or the root of --rootfs host.
WRITABLE_DIRS = (("tmp", 0o1777), ("work", 0o755), ("shm", 0o1777))
OVERLAY_DIRS = (("upper", 0o755), ("ovlwork", 0o700))
HOST_ROOT_DIRS = (("host", 0o755),)


def stage_files(spec, root, owner=HOST_ROOT):
    """The workdir, the volumes' mount points, the uploads, then the volumes:
    every path is made before any host directory is bound into the root, so
    none is ever made inside one.  Under --userns the uploads belong to the
    job's root as the host sees it (owner.base)."""
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    targets = []
    # What jrun makes for the job belongs to the job's root.  Owners are set
    # on the fds of what was made: a chown by path afterwards would follow
    # the rootfs's symlinks to the host.
    ids = (owner.base, owner.base) if owner.mapped else None
    try:
        os.close(open_dir_in_root(rootfd, spec.workdir, ids))
        for v in spec.volumes:
            targets.append(prepare_volume(rootfd, v))
        if spec.uploads:
            Uploader(spec.uploads, ids).run(rootfd, spec.uploads)
        for v, fd in zip(spec.volumes, targets):
            mount_volume(v, fd)
    finally:
        for fd in targets:
            os.close(fd)
        os.close(rootfd)


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


def bind_into(src, target_fd, attrs, userns_fd=0):
    """Bind host path SRC, with its submounts, onto the mount point open as
    TARGET_FD.  The copy of the tree is made read-only/nosuid/nodev while it
    is still detached (open_tree, mount_setattr AT_RECURSIVE, move_mount), so
    there is no moment at which the job's path is a writable view, and a
    submount of SRC is as read-only as SRC itself (a MS_REMOUNT of the top
    mount would leave submounts writable).  With MOUNT_ATTR_IDMAP, the
    owners of the files are shifted through the user namespace USERNS_FD.
    SRC is a host path, or a tree that clone_tree made earlier (see
    open_staging_sources); either way the copy is private: no mount event
    propagates between it and the host's tree it was cloned from."""
    tree = clone_tree(src) if isinstance(src, str) else src
    try:
        mount_setattr(tree, attrs, recursive=True, userns_fd=userns_fd, propagation=MS_PRIVATE)
        move_mount(tree, target_fd)
    finally:
        if tree is not src:
            os.close(tree)


def open_dir_in_root(rootfd, path, owner=None):
    """An O_PATH fd of directory PATH of the job's root, made (mode 0755,
    owned by OWNER if given) if missing.  Symlinks on the way are resolved
    by the kernel inside the root: a rootfs whose 'opt' points to /etc of
    the host reaches the job's own /etc, never the host's."""
    fd = os.dup(rootfd)
    done = ""
    try:
        for comp in path.strip("/").split("/"):
            if comp in ("", "."):
                continue
            done += "/" + comp
            try:
                nfd = openat2(rootfd, done, os.O_PATH | os.O_DIRECTORY, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
            except FileNotFoundError:
                try:
                    os.mkdir(comp, 0o755, dir_fd=fd)
                except FileExistsError:
                    raise SetupError("%s: a dangling symlink in the job's root" % done) from None
                if owner:
                    os.chown(comp, *owner, dir_fd=fd, follow_symlinks=False)
                nfd = openat2(rootfd, done, os.O_PATH | os.O_DIRECTORY, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
            except NotADirectoryError:
                raise SetupError("%s: not a directory in the job's root" % done) from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _clear_entry(dfd, name, keep_dir):
    """Make room for NAME in directory DFD, never following it: an existing
    symlink or file goes (in the job's own layer); an existing directory is
    kept (merged into) when KEEP_DIR.  Returns True if a directory is there."""
    import stat

    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        if keep_dir:
            return True
        raise SetupError("%s is a directory in the job's root" % name)
    os.unlink(name, dir_fd=dfd)
    return False


class Uploader:
    """Copies host files into the job's root like `cp -a` run by root:
    contents, modes, owners, times, hard links and directory structure; a
    symlink is copied as a symlink and never followed; setuid and setgid bits
    are dropped; device nodes and sockets are skipped (the mounts are nodev).
    Sources are opened with O_NOFOLLOW relative to their directory's fd, and
    destinations created with O_EXCL|O_NOFOLLOW relative to theirs, so a
    symlink planted in the source tree, the rootfs or an earlier upload
    cannot redirect a read or a write."""

    STEP = 1 << 26  # bytes per copy call: progress and Ctrl-C are checked between calls

    def __init__(self, uploads, owner=None):
        self.owner = owner  # (uid, gid) for every copy instead of the source's
        self.total_files = sum(u.files or 0 for u in uploads)
        self.total_bytes = sum(u.bytes or 0 for u in uploads)
        self.bytes = self.skipped = 0
        self.fast = True  # copy_file_range until the kernel says EXDEV
        self.tty = _log["format"] == "text" and LEVELS["info"] >= _log["level"] and os.isatty(2)
        self.started = self.shown = time.monotonic()
        self.links = {}

    def run(self, rootfd, uploads):
        self._say("", False)
        for up in uploads:
            try:
                self.upload(rootfd, up)
            except OSError as e:
                raise SetupError("--upload %s: copying to %s: %s" % (up.src, up.dest, e.strerror)) from None
            except SetupError as e:
                raise SetupError("--upload %s: %s" % (up.src, e)) from None
            except RecursionError:
                raise SetupError("--upload %s: the tree is nested too deeply to copy" % up.src) from None
        took = time.monotonic() - self.started
        if self.tty:
            self._say(" done in %.1fs" % took, True)
        else:
            log("info", "uploaded %s (%s) in %.1fs" % (self._files(), fmt_size(self.total_bytes), took))
        if self.skipped:
            log("warning", "--upload: skipped %d device nodes and sockets" % self.skipped)

    def _say(self, tail, end):
        if self.tty:
            line = "\rjrun: Uploading %s (%s)...%s" % (self._files(), fmt_size(self.total_bytes), tail)
            os.write(2, (line + ("\n" if end else "\033[K")).encode())

    def _files(self):
        return "%s file%s" % (format(self.total_files, ","), "" if self.total_files == 1 else "s")

    def _progress(self):
        now = time.monotonic()
        if now - self.shown > 0.25:
            self.shown = now
            # The signals jrun forwards are blocked until exec; one pending
            # means the caller wants to stop (Ctrl-C): do not finish a long copy.
            pending = signal.sigpending() & set(FORWARDED_SIGNALS)
            if pending:
                raise SetupError("interrupted by %s" % signal_name(min(pending)))
            self._say(" %d%%" % (100 * self.bytes // max(self.total_bytes, 1)), False)

    def upload(self, rootfd, up):
        parent, name = os.path.split(up.dest)
        pfd = open_dir_in_root(rootfd, parent, self.owner)
        self.links = {}  # hard links are kept within one upload
        try:
            # SRC as validate() found it (a symlink the caller named was
            # followed then): its O_PATH fd reopened for reading.
            sfd = os.open("/proc/self/fd/%d" % up.fd, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                self._copy_open(sfd, os.fstat(sfd), pfd, name, (pfd, name))
            finally:
                os.close(sfd)
        finally:
            os.close(pfd)

    def _copy_entry(self, sdir, entry, dfd, rel):
        import stat

        self._progress()
        name = entry.name
        # d_type says what to open; fstat of the opened fd is what counts
        # (O_NOFOLLOW: a file swapped for a symlink meanwhile fails).
        if entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False):
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            sfd = os.open(name, flags, dir_fd=sdir)
            try:
                self._copy_open(sfd, os.fstat(sfd), dfd, name, rel)
            finally:
                os.close(sfd)
            return
        st = os.stat(name, dir_fd=sdir, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(name, dir_fd=sdir)
            _clear_entry(dfd, name, False)
            os.symlink(target, name, dir_fd=dfd)
            self._meta(None, st, dfd, name)
        elif stat.S_ISFIFO(st.st_mode):
            _clear_entry(dfd, name, False)
            os.mkfifo(name, 0o600, dir_fd=dfd)
            self._meta(None, st, dfd, name)
        else:
            self.skipped += 1

    def _copy_open(self, sfd, st, dfd, name, rel):
        import stat

        if stat.S_ISDIR(st.st_mode):
            # An existing directory (the rootfs's /etc, /tmp) keeps its own
            # owner and mode: an upload merges into it, it does not chmod it.
            existed = _clear_entry(dfd, name, True)
            if not existed:
                os.mkdir(name, 0o700, dir_fd=dfd)
            out = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                for entry in os.scandir(sfd):
                    self._copy_entry(sfd, entry, out, (rel, entry.name))
                if not existed:
                    self._meta(out, st)
            finally:
                os.close(out)
        elif stat.S_ISREG(st.st_mode):
            self._copy_file(sfd, st, dfd, name, rel)
        else:
            self.skipped += 1

    def _copy_file(self, sfd, st, dfd, name, rel):
        _clear_entry(dfd, name, False)
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1:
            if key in self.links:
                try:
                    first_dir, first_name = self.links[key]
                    os.link(first_name, name, src_dir_fd=first_dir, dst_dir_fd=dfd, follow_symlinks=False)
                    return
                except OSError:
                    pass  # across mounts: copy instead
        out = open_new_file(dfd, name, 0o600)
        try:
            self._copy_data(sfd, out)
            self._meta(out, st)
        finally:
            os.close(out)
        if st.st_nlink > 1:
            self.links[key] = self._link_ref(rel)

    def _link_ref(self, rel):
        """REL is (parent rel, name) nested down from (upload's parent fd,
        name); turn it into (fd, 'a/b/name') for linkat.  Every directory on
        that path was made or checked by the copy, with no symlink in it."""
        names = []
        while isinstance(rel[0], tuple):
            rel, name = rel
            names.append(name)
        fd, top = rel
        return fd, "/".join([top] + names[::-1])

    def _copy_data(self, sfd, out):
        while True:
            if self.fast:
                try:
                    n = os.copy_file_range(sfd, out, self.STEP)
                except OSError as e:
                    # Across filesystems of different types (ext4 -> tmpfs)
                    # the kernel refuses; sendfile still copies in-kernel.
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    self.fast = False
                    continue
            else:
                n = os.sendfile(out, sfd, None, self.STEP)
            if not n:
                return
            self.bytes += n
            self._progress()

    def _meta(self, fd, st, dfd=None, name=None):
        """Owner, then mode (chown clears setuid), then times."""
        times = (st.st_atime_ns, st.st_mtime_ns)
        uid, gid = self.owner or (st.st_uid, st.st_gid)
        if fd is None:
            os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
            import stat

            if not stat.S_ISLNK(st.st_mode):  # a fifo we just made: no symlink to follow
                os.chmod(name, st.st_mode & 0o1777, dir_fd=dfd)
            os.utime(name, ns=times, dir_fd=dfd, follow_symlinks=False)
            return
        os.fchown(fd, uid, gid)
        os.fchmod(fd, st.st_mode & 0o1777)  # setuid (0o4000) and setgid (0o2000) dropped
        os.utime(fd, ns=times)


def prepare_volume(rootfd, v):
    """The mount point of volume V in the job's root (a directory for a
    directory, an empty file otherwise), as an O_PATH fd.  Made before any
    volume is mounted, so that no path is ever created inside a host volume."""
    try:
        return _volume_target(rootfd, v)
    except OSError as e:
        raise SetupError("-v/--volume %s:%s: %s" % (v.src, v.dest, e.strerror)) from None
    except SetupError as e:
        raise SetupError("-v/--volume %s:%s: %s" % (v.src, v.dest, e)) from None


def _volume_target(rootfd, v):
    pfd = open_dir_in_root(rootfd, os.path.dirname(v.dest))
    name = os.path.basename(v.dest)
    try:
        import stat

        if stat.S_ISDIR(os.fstat(v.fd).st_mode):
            if not _clear_entry(pfd, name, True):
                os.mkdir(name, 0o755, dir_fd=pfd)
            return os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            _clear_entry(pfd, name, False)
        except SetupError:
            raise SetupError("DEST is a directory in the job's root, SRC is not") from None
        os.close(open_new_file(pfd, name, 0o644))
        return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    finally:
        os.close(pfd)


def mount_volume(v, target_fd):
    attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (MOUNT_ATTR_RDONLY if v.read_only else 0)
    try:
        bind_into(v.fd, target_fd, attrs)
    except OSError as e:
        raise SetupError("-v/--volume %s:%s: %s" % (v.src, v.dest, e.strerror)) from None
    trace("volume %s bound at %s (%s, nosuid, nodev, submounts included)"
          % (v.src, v.dest, "read-only" if v.read_only else "read-write"))


# --rootfs host: the host's system directories (HOST_SYSTEM_DIRS), read-only,
# on the job's own tmpfs.
# What of the host's /etc a program needs to run (users, libraries, TLS roots,
# time zone, interpreters' configuration); never shadow, gshadow, sudoers,
# ssh host keys, ssl/private, nor files that often hold credentials (pip.conf,
# gitconfig, environment with proxy passwords).  '*' ends a prefix.
HOST_ETC = ("passwd", "group", "nsswitch.conf", "host.conf", "gai.conf", "protocols", "services",
            "networks", "ethertypes", "rpc", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives",
            "ssl/certs", "ssl/openssl.cnf", "ca-certificates", "ca-certificates.conf", "localtime",
            "timezone", "os-release", "debian_version", "lsb-release", "mime.types", "magic", "magic.mime",
            "locale.alias", "locale.conf", "default/locale", "profile", "bash.bashrc", "inputrc",
            "mtab", "python3*", "perl", "fonts")
# Copied rather than bound: the job (or jrun's network setup) may rewrite it.
HOST_ETC_COPIED = ("resolv.conf",)
# The rest of a --rootfs host root: the job's own empty directories.
HOST_ROOT_OWN_DIRS = (("etc", 0o755), ("root", 0o700), ("home", 0o755), ("run", 0o755), ("var", 0o755),
                      ("var/tmp", 0o1777), ("mnt", 0o755))
RO = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV


def build_host_root(root):
    """The root of --rootfs host: a tmpfs (the job's writable layer) with the
    host's system directories and a safe part of /etc bound read-only."""
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in HOST_SYSTEM_DIRS:
            host = "/" + name
            if os.path.islink(host):
                os.symlink(os.readlink(host), name, dir_fd=rootfd)
            elif os.path.isdir(host):
                os.mkdir(name, 0o755, dir_fd=rootfd)
                fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=rootfd)
                try:
                    bind_into(host, fd, RO)
                finally:
                    os.close(fd)
        for d, mode in HOST_ROOT_OWN_DIRS:
            os.mkdir(d, mode, dir_fd=rootfd)
            os.chmod(d, mode, dir_fd=rootfd)  # past the umask
        names = []
        for pattern in HOST_ETC:
            if pattern.endswith("*"):
                names += sorted(n for n in os.listdir("/etc") if n.startswith(pattern[:-1]))
            else:
                names.append(pattern)
        for rel in names:
            _host_etc_entry(rootfd, rel)
        for rel in HOST_ETC_COPIED:
            try:
                with open("/etc/" + rel, "rb") as f:
                    data = f.read(1 << 20)
            except OSError:
                continue
            _safe_file(root, "etc/" + rel, content=data.decode("utf-8", "replace"))
    finally:
        os.close(rootfd)
    trace("root: a tmpfs with the host's %s and part of /etc, read-only, nosuid, nodev"
          % ", ".join(n for n in HOST_SYSTEM_DIRS if os.path.lexists("/" + n)))


def _host_etc_entry(rootfd, rel):
    import stat

    host = "/etc/" + rel
    try:
        st = os.lstat(host)
    except OSError:
        return
    pfd = open_dir_in_root(rootfd, os.path.dirname("etc/" + rel))
    name = os.path.basename(rel)
    try:
        if stat.S_ISLNK(st.st_mode):
            # localtime, os-release, mtab: the target is a system path that
            # the job has too, so the link is kept as a link.
            os.symlink(os.readlink(host), name, dir_fd=pfd)
            return
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o755, dir_fd=pfd)
            fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        elif stat.S_ISREG(st.st_mode):
            os.close(open_new_file(pfd, name, 0o644))
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        else:
            return
        try:
            bind_into(host, fd, RO)
        finally:
            os.close(fd)
    finally:
        os.close(pfd)


def make_root_read_only(root):
    """--read-only: the root mount alone (not recursively), so /work, /tmp,
    /dev and read-write volumes, mounted on top, stay writable."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        mount_setattr(fd, MOUNT_ATTR_RDONLY, recursive=False)
    finally:
        os.close(fd)
    trace("root remounted read-only (workdir, /tmp, /dev and read-write volumes stay writable)")


def build_dev(root, spec, base, shm):
    """A minimal /dev whose device nodes are the job's own: made (mknod) on a
    small tmpfs of the job's, which is then made read-only and bound node by
    node into /dev.  A chmod, chown or rm of /dev/null in the job (or of the
    /proc files masked by it) therefore never reaches the host's nodes, and
    fails on the read-only mount anyway.  /dev itself is nodev like every
    writable mount of the job: a node the job manages to make anywhere
    (--cap-add MKNOD) cannot be opened; the only mounts without nodev are
    the read-only nodes and the job's private devpts.  Not /dev/console:
    jrun gives the job no console."""
    import stat

    nodes = os.path.join(base, "dev")
    os.mkdir(nodes, 0o755)
    mount("jrun-dev", nodes, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=4k,nr_inodes=16")
    for name, major, minor in DEV_NODES:
        os.mknod(os.path.join(nodes, name), stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(os.path.join(nodes, name), 0o666)  # past the umask
    mount(None, nodes, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    dev = _safe_mkdirs(root, "dev")
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k")
    for name, _, _ in DEV_NODES:
        target = os.path.join(dev, name)
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666))
        mount(os.path.join(nodes, name), target, None, MS_BIND)
    os.mkdir(os.path.join(dev, "pts"), 0o755)
    mount("devpts", os.path.join(dev, "pts"), "devpts", MS_NOSUID | MS_NOEXEC,
          "newinstance,ptmxmode=0666,mode=0620")
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    mount(shm, os.path.join(dev, "shm"), None, MS_BIND)  # of the job's writable space, nosuid, nodev
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, name))
    if spec.init:
        # docker --init's way: a static reaper, bind-mounted read-only; no
        # host interpreter ever runs inside the job.
        init = os.path.join(dev, "init")
        os.close(os.open(init, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o755))
        mount(TINI, init, None, MS_BIND)
        mount(None, init, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    trace("minimal /dev (nodev): the job's own read-only %s; pts shm%s"
          % (" ".join(n for n, _, _ in DEV_NODES), " init" if spec.init else ""))


def pivot_into(root):
    """pivot_root, not chroot: afterwards the old root is not reachable by
    any path, open fd or chdir(".."), because it is detached."""
    os.chdir(root)
    # The runc trick: pivot onto the same directory, then unmount the old
    # root that now sits on top of it.  No put_old directory is needed.
    pivot_root(".", ".")
    umount2(".", MNT_DETACH)
    os.chdir("/")
    trace("root pivoted; old root detached (umount2 MNT_DETACH)")


def mount_proc_and_sys():
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    trace("/proc remounted for the job's PID namespace")
    mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    trace("/sys mounted read-only")


# /proc and /sys entries that tell about the host or act on it, handled as
# runc handles them: files masked by /dev/null, directories by an empty
# read-only tmpfs, and the kernel's knobs read-only.  /sys is read-only as a
# whole, /sys/fs/cgroup included.  (/proc/kallsyms is left alone: without
# CAP_SYSLOG it shows zeros for every address.)
MASKED_FILES = ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
                "/proc/latency_stats")
MASKED_DIRS = ("/proc/acpi", "/proc/asound", "/proc/scsi", "/sys/firmware",
               "/sys/devices/virtual/powercap")  # powercap: the PLATYPUS side channel, CVE-2020-8694
READ_ONLY_PROC = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


def harden_proc_and_sys(spec):
    # Written before /proc/sys goes read-only; each is a sysctl of the job's
    # own namespace.  ping without NET_RAW, through ICMP datagram sockets,
    # for every group, as docker does (network namespace).  SysV shared
    # memory (IPC namespace) at most the job's writable space: a segment
    # outlives the processes that made it, out of the OOM killer's sight,
    # until the job's IPC namespace goes.
    budget = workdir_bytes(spec)
    for path, value in (("net/ipv4/ping_group_range", "0 2147483647"), ("kernel/shmmax", str(budget)),
                        ("kernel/shmall", str(budget // os.sysconf("SC_PAGE_SIZE")))):
        try:
            with open("/proc/sys/" + path, "w") as f:
                f.write(value)
        except OSError:
            pass
    # The masks are binds of the job's own /dev/null (build_dev), read-only.
    for path in MASKED_FILES:
        if os.path.exists(path):
            mount("/dev/null", path, None, MS_BIND)
    for path in MASKED_DIRS:
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
    for path in READ_ONLY_PROC:
        if os.path.exists(path):
            mount(path, path, None, MS_BIND | MS_REC)
            mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    trace("/proc and /sys hardened: %s masked; %s read-only"
          % (" ".join(p.split("/", 2)[2] for p in MASKED_FILES + MASKED_DIRS),
             " ".join(p.split("/", 2)[2] for p in READ_ONLY_PROC)))


# ---------------------------------------------------------------------------
# The child, in the job's root: the command's environment and path.
# ---------------------------------------------------------------------------


def job_environment(spec, home):
    env = {"PATH": DEFAULT_PATH, "HOME": home, "HOSTNAME": spec.hostname,
           "JRUN_JOB_ID": spec.id, "container": "jrun"}
    term = os.environ.get("TERM")
    if term:
        env["TERM"] = term
    env.update(spec.env)
    return env


def resolve_command(spec, env):
    """Find COMMAND in the job's root as the shell and docker do, so that
    'not found' (127) and 'found but not executable' (126) are told apart
    before exec.  A COMMAND with a '/' is that path: missing is 127; a
    directory, or a file without an x bit, is 126.  A PATH lookup takes the
    first executable regular file and skips directories (as sh and Go's
    LookPath do); a non-executable file it met is 126, nothing at all 127."""
    import stat

    cmd = spec.command[0]
    if "/" in cmd:
        try:
            st = os.stat(cmd)
        except OSError:
            raise NotFound("%s: command not found in the job's root" % cmd) from None
        if stat.S_ISDIR(st.st_mode):
            raise NotExecutable("%s: is a directory, not a program" % cmd)
        if not stat.S_ISREG(st.st_mode) or not os.access(cmd, os.X_OK):
            raise NotExecutable("%s: permission denied (not executable)" % cmd)
        found = cmd
    else:
        found = plain = None
        for d in env.get("PATH", DEFAULT_PATH).split(":"):
            path = os.path.join(d or ".", cmd)
            if os.path.isfile(path):
                if os.access(path, os.X_OK):
                    found = path
                    break
                plain = plain or path
        if found is None and plain is None:
            raise NotFound("%s: command not found in the job's root" % cmd)
        if found is None:
            raise NotExecutable("%s: permission denied (not executable)" % plain)
    argv = [found] + list(spec.command[1:])
    if spec.init:
        argv = ["/dev/init", "--"] + argv
    return argv


def close_inherited_fds(keep):
    """The job inherits fds 0, 1 and 2 only, whatever the caller leaked
    (jrun's own pipes in KEEP are close-on-exec).  Up to the largest fd
    there can be: RLIMIT_NOFILE may be raised to fs.nr_open (up to 2^31 -
    64), far above the 2^20 it defaults to."""
    low = 3
    for fd in sorted(keep):
        if low < fd:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 0x7FFFFFFF)  # close_range(low, INT_MAX - 1): one syscall
    trace("file descriptors above 2 closed")


# ---------------------------------------------------------------------------
# Least privilege, the policy: the job's capability set and its seccomp
# filter, computed from the JobSpec.  Pure logic; the child applies them as
# its last steps before exec (drop_privileges).
# ---------------------------------------------------------------------------


def job_capabilities(spec):
    """The capability names COMMAND runs with.  Docker's rules: --cap-add ALL
    starts from every capability, --cap-drop ALL from none, otherwise from
    DEFAULT_CAPS; then the named adds, then the named drops.  A -u/--user
    job that is not root inside gets none (and --cap-add is refused)."""
    if spec.user and spec.user[0] not in ("0", "root"):
        return frozenset()
    caps = set(DEFAULT_CAPS)
    if "ALL" in spec.cap_drop:
        caps = set()
    if "ALL" in spec.cap_add:
        caps = set(CAPABILITIES)
    caps |= set(spec.cap_add) - {"ALL"}
    caps -= set(spec.cap_drop)
    return frozenset(caps)


# What the default filter refuses with EPERM, and the capability whose
# --cap-add lifts each group (as docker's profile does: a user who adds
# SYS_TIME wants to set the clock).  The capabilities already refuse most of
# these; the filter is the second wall, and the only one for the syscalls
# that need no capability yet widen the kernel's attack surface: the kernel
# keyring (not namespaced), io_uring (a long CVE list; it also bypasses
# seccomp for the operations it performs), user namespaces (unprivileged
# CLONE_NEWUSER hands out a full capability set in a new namespace),
# userfaultfd, bpf, perf_event_open.
SECCOMP_DENY = (
    (None, ("keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register")),
    ("SYS_ADMIN", ("mount", "umount2", "pivot_root", "move_mount", "fsopen", "fsconfig", "fsmount",
                   "fspick", "open_tree", "open_tree_attr", "mount_setattr", "unshare", "setns",
                   "quotactl", "quotactl_fd", "swapon", "swapoff", "lookup_dcookie", "nfsservctl",
                   "fanotify_init")),
    ("SYS_MODULE", ("init_module", "finit_module", "delete_module")),
    ("SYS_BOOT", ("reboot", "kexec_load", "kexec_file_load")),
    ("SYS_TIME", ("settimeofday", "clock_settime", "clock_adjtime")),
    ("SYS_PACCT", ("acct",)),
    ("SYS_RAWIO", ("iopl", "ioperm")),
    ("DAC_READ_SEARCH", ("open_by_handle_at", "name_to_handle_at")),  # "shocker", 2014
    ("BPF", ("bpf",)),
    ("PERFMON", ("perf_event_open",)),
    ("SYS_PTRACE", ("userfaultfd",)),
    ("SYSLOG", ("syslog",)),
    ("SYS_TTY_CONFIG", ("vhangup",)),
)
# clone(2) flags that create namespaces (refused without SYS_ADMIN, like
# unshare and setns).  CLONE_NEWTIME is left out: in clone()'s flags 0x80
# is part of the exit signal; it can only be asked for through clone3 or
# unshare, both refused.
CLONE_NS_FLAGS = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
                  | CLONE_NEWPID | CLONE_NEWNET)


def seccomp_program(machine, caps):
    """The default filter as a classic BPF program: a list of (code, jt, jf,
    k) sock_filter tuples.

    Why hand-made BPF rather than libseccomp: the filter is a deny list of
    ~50 numbers and a few argument tests, ~140 straight-line instructions
    that a reviewer can read (and tests/test_security.py decodes and runs).
    libseccomp's own Python binding is not published on PyPI (Debian's
    python3-seccomp is built for the system python, not /opt/jrun's), the
    PyPI stand-ins are unmaintained (pyseccomp: 2021) or third-party
    rebuilds, and either would be a bigger thing to trust than this
    function.  Each refused syscall is a pair `jeq NR / ret ERRNO` so that
    no jump needs an offset over 255.  The kernel's seccomp action cache
    (5.11+) turns every syscall whose verdict does not depend on its
    arguments into a bitmap lookup, so the length of the list costs nothing
    at run time; the few that are checked by argument (ioctl, socket,
    socketpair, clone, setrlimit, prlimit64) run the program on every call,
    so they come first, ioctl (the most frequent) at the top, each block
    ending in a verdict: a few instructions per call (tests/bench_security.py).

    A syscall of another architecture (i386 through int 0x80, or x32 on
    x86_64; arm32 on aarch64) kills the process (SIGSYS) rather than
    returning EPERM: the numbers differ there, so a deny list written for
    the native table would be bypassed, and a 32-bit program that gets EPERM
    even from exit() would spin instead of failing clearly."""
    nrs = _SYSCALLS[machine]
    eperm, allow = SECCOMP_RET_ERRNO | errno.EPERM, SECCOMP_RET_ALLOW
    # seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (the low 32 bits
    # first on these little-endian machines).  int and unsigned int arguments
    # are the low 32 bits only: the kernel never reads the high ones.
    prog = [
        (BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (BPF_JEQ_K, 1, 0, AUDIT_ARCH[machine]),
        (BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        (BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
    ]
    if machine == "x86_64":
        prog += [(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT), (BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS)]
    prog += [
        # Pushing input into a terminal: TIOCSTI types into the terminal a
        # program reads from (CVE-2017-5226 and the sandbox escapes like
        # it), TIOCLINUX's selection paste does the same on a virtual
        # console.  No job needs either.
        (BPF_JEQ_K, 0, 5, nrs["ioctl"]),
        (BPF_LD_W_ABS, 0, 0, 24),  # the request, args[1]
        (BPF_JEQ_K, 2, 0, TIOCSTI),
        (BPF_JEQ_K, 1, 0, TIOCLINUX),
        (BPF_RET_K, 0, 0, allow),
        (BPF_RET_K, 0, 0, eperm),
        # AF_VSOCK reaches the hypervisor (and the host of a VM) whatever
        # the job's network namespace: as if the kernel had no such family.
        (BPF_JEQ_K, 1, 0, nrs["socket"]),
        (BPF_JEQ_K, 0, 4, nrs["socketpair"]),
        (BPF_LD_W_ABS, 0, 0, 16),  # the family, args[0]
        (BPF_JEQ_K, 0, 1, AF_VSOCK),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EAFNOSUPPORT),
        (BPF_RET_K, 0, 0, allow),
        # RLIMIT_CORE stays at 1 (see drop_privileges): setrlimit of it,
        # and prlimit64 of it with a new limit (a NULL one only reads), are
        # refused.
        (BPF_JEQ_K, 0, 4, nrs["setrlimit"]),
        (BPF_LD_W_ABS, 0, 0, 16),  # the resource, args[0]
        (BPF_JEQ_K, 0, 1, RLIMIT_CORE),
        (BPF_RET_K, 0, 0, eperm),
        (BPF_RET_K, 0, 0, allow),
        (BPF_JEQ_K, 0, 8, nrs["prlimit64"]),
        (BPF_LD_W_ABS, 0, 0, 24),  # the resource, args[1]
        (BPF_JEQ_K, 0, 5, RLIMIT_CORE),
        (BPF_LD_W_ABS, 0, 0, 32),  # the new limit's pointer, args[2]: low half
        (BPF_JEQ_K, 0, 2, 0),
        (BPF_LD_W_ABS, 0, 0, 36),  # high half
        (BPF_JEQ_K, 1, 0, 0),
        (BPF_RET_K, 0, 0, eperm),
        (BPF_RET_K, 0, 0, allow),
    ]
    if "SYS_ADMIN" not in caps:
        prog += [
            # clone3 passes its flags in memory, which seccomp cannot read:
            # ENOSYS makes glibc and musl fall back to clone(), checked next.
            (BPF_JEQ_K, 0, 1, nrs["clone3"]), (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),
            (BPF_JEQ_K, 0, 4, nrs["clone"]),
            (BPF_LD_W_ABS, 0, 0, 16),  # low 32 bits of args[0], clone's flags
            (BPF_JSET_K, 0, 1, CLONE_NS_FLAGS),
            (BPF_RET_K, 0, 0, eperm),
            (BPF_RET_K, 0, 0, allow),
        ]
    for cap, names in SECCOMP_DENY:
        if cap in caps:
            continue
        for name in names:
            if nrs[name] is not None:
                prog += [(BPF_JEQ_K, 0, 1, nrs[name]), (BPF_RET_K, 0, 0, eperm)]
    prog.append((BPF_RET_K, 0, 0, allow))
    return prog


# ---------------------------------------------------------------------------
# The child's last steps: who COMMAND runs as, and with which privileges.
# Still root with every capability, in the job's new root; from here on
# only files of the job's own root are read.
# ---------------------------------------------------------------------------


def _db(path, nfields):
    """The well-formed lines of a passwd(5) or group(5) file, split."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.split(":") for line in f.read().splitlines() if line.count(":") == nfields - 1]
    except OSError:
        return []


def resolve_user(spec):
    """-u/--user -> (uid, gid, HOME), from the job's own /etc/passwd and
    /etc/group (never the host's).  A numeric UID needs no entry; then the
    GID defaults to the UID (not to 0, as docker's does: a job should not
    get group root by accident) and HOME is /."""
    if spec.user is None:
        return 0, 0, "/root"
    user, group = spec.user
    if user.isdigit():
        pw = next((e for e in _db("/etc/passwd", 7) if e[2].isdigit() and int(e[2]) == int(user)), None)
        uid = int(user)
    else:
        pw = next((e for e in _db("/etc/passwd", 7) if e[0] == user), None)
        if pw is None or not pw[2].isdigit():
            raise UsageError("-u/--user: no user %r in the job's /etc/passwd" % user)
        uid = int(pw[2])
    if group is None:
        gid = int(pw[3]) if pw and pw[3].isdigit() else uid
    elif group.isdigit():
        gid = int(group)
    else:
        gr = next((e for e in _db("/etc/group", 4) if e[0] == group and e[2].isdigit()), None)
        if gr is None:
            raise UsageError("-u/--user: no group %r in the job's /etc/group" % group)
        gid = int(gr[2])
    return uid, gid, (pw[5] if pw and pw[5] else "/")


def drop_privileges(spec, uid, gid, sync_r, owner=HOST_ROOT):
    """The last steps before exec, in the only order that works: what needs
    a capability (bounding set, setuid) before the capabilities go, and the
    seccomp filter last, so that it need not allow what jrun itself calls.
    execve stays allowed."""
    import prctl

    # No core dumps: the host's core_pattern may pipe a dump to a program
    # that runs as host root (apport, systemd-coredump) and reads the
    # crashed process.  A pipe ignores the limit, except 1: the kernel's own
    # mark of a crashing dump helper, for which it aborts the dump
    # (fs/coredump.c, coredump_pipe); a file dump needs a page at least.
    # Hard limit 1 too, and the filter refuses setting RLIMIT_CORE at all,
    # since lowering the soft limit to 0 would start the helper again.
    setrlimit(RLIMIT_CORE, 1, 1)
    if owner.mapped:
        # The child's uids do not change by this (setresuid does it next); it
        # gains every capability inside this namespace and keeps none outside.
        setns(owner.userns_fd, CLONE_NEWUSER)
        trace("joined the job's user namespace: uid %d is %d on the host" % (uid, owner.base + uid))
    caps = job_capabilities(spec) if uid == 0 else frozenset()
    keep = {CAPABILITIES.index(c) for c in caps}
    # The bounding set decides what a root COMMAND gets at exec.  Counted
    # up to the running kernel's last capability (EINVAL past it), which
    # may be newer than the names python-prctl was built with.
    for n in range(64):
        if n not in keep:
            try:
                sys_prctl(PR_CAPBSET_DROP, n)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    break
                raise
    # Supplementary groups are cleared for root too: the invoker's (disk,
    # docker, adm, ...) must not follow it into the job.
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # A change of euid clears the parent-death signal (commit_creds): arm it
    # again, then check that jrun did not die in between (its end of the
    # sync pipe, held open for the job's life, would read as EOF).
    prctl.set_pdeathsig(signal.SIGKILL)
    os.set_blocking(sync_r, False)
    try:
        os.read(sync_r, 1)
        os._exit(EXIT_JRUN)
    except BlockingIOError:
        pass
    # A non-root uid already lost the effective and permitted sets at
    # setresuid; root keeps exactly KEEP.  The inheritable and ambient sets
    # are emptied for both (CVE-2022-24769: a non-empty inheritable set
    # leaks capabilities to programs with file capabilities).
    known = prctl.ALL_CAPS
    prctl.set_caps(([n for n in known if n not in keep], (prctl.CAP_EFFECTIVE, prctl.CAP_PERMITTED), False),
                   (known, prctl.CAP_INHERITABLE, False))
    sys_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    trace("user %d:%d, no supplementary groups; capabilities: %s"
          % (uid, gid, ", ".join(sorted(caps)) or "none (all sets empty, bounding and ambient too)"))
    # setuid, setgid and file-capability binaries gain nothing from now on.
    prctl.set_no_new_privs(1)
    trace("no_new_privs set; core dumps off")
    if spec.seccomp == "default":
        prog = seccomp_program(os.uname().machine, caps)
        seccomp_set_filter(prog)
        trace("seccomp filter installed (%d instructions)" % len(prog))
    else:
        trace("no seccomp filter (--seccomp unconfined)")


# ---------------------------------------------------------------------------
# Images: named root filesystems, imported once (jrun rootfs import) from a
# docker-archive, an OCI image layout or oci-archive, or a plain rootfs
# tarball, and run on with --rootfs NAME exactly as on --rootfs PATH: the
# stored tree is the lower layer of the job's overlay and is never modified.
#
# The store, HOST.image_dir (root's; the config key image-dir):
#   NAME/rootfs/     the tree; mode 0700, so that no host user reaches its
#                    files (setuid binaries, secrets baked into the image)
#   NAME/image.json  its record: origin, digest, platform, size, config
#   NAME/defaults    what a job on NAME gets by default (see read_defaults)
#   .lock-NAME       flock: serialises the imports and removals of NAME
#                    (removed by its holder when done, see ImageStore.lock)
#   .new-NAME.XXXX   an import under way; renamed to NAME once complete
#   .old-NAME.XXXX   a replaced or removed image, kept while a job runs on it
# A job holds a shared flock on NAME/ for its whole life.  Replacing or
# removing NAME renames the old tree to .old-*, which goes as soon as no job
# holds it: then, or at a later import, rm or gc.  Names starting with '.'
# are no image's (check_name refuses them).
# ---------------------------------------------------------------------------


def image_names():
    """The images in the store (listable by anyone: shell completion)."""
    try:
        names = os.listdir(HOST.image_dir)
    except OSError:
        return []
    return sorted(n for n in names if not n.startswith("."))


def open_image(name):
    """An fd of image NAME's directory, with a shared flock held until jrun
    exits (the fd is never closed): its tree cannot be removed under the job.
    The lock is taken on what the path named; if the name was moved to a new
    tree meanwhile (an import --force), the new one is taken instead."""
    path = os.path.join(HOST.image_dir, name)
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            hint = " (a directory needs a '/': ./%s)" % name if os.path.isdir(name) else ""
            raise UsageError("--rootfs: no image %r (see jrun rootfs ls)%s" % (name, hint)) from None
        fcntl.flock(fd, fcntl.LOCK_SH)
        st = os.fstat(fd)
        try:
            now = os.stat(path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise SetupError("--rootfs: image %r is being replaced over and over; try again" % name)


# The defaults file: the image config's Env, WorkingDir, User, Entrypoint
# and Cmd.  The run path reads this rather than image.json: the json module
# costs 18 ms to import here.
# Data format: NUL-terminated KEY=VALUE fields, KEY one of DEFAULTS_KEYS;
# env, entrypoint and cmd repeat, one variable or argument each, in order.
DEFAULTS_KEYS = ("env", "workdir", "user", "entrypoint", "cmd")


def encode_defaults(config):
    """An image config (as image_config() keeps it) -> the defaults file."""
    fields = ["env=" + e for e in config.get("Env") or ()]
    fields += ["workdir=" + config["WorkingDir"]] if config.get("WorkingDir") else []
    fields += ["user=" + config["User"]] if config.get("User") else []
    fields += ["entrypoint=" + a for a in config.get("Entrypoint") or ()]
    fields += ["cmd=" + a for a in config.get("Cmd") or ()]
    return "".join(f + "\0" for f in fields).encode("utf-8", "replace")


def read_defaults(dfd):
    """The defaults file of the image open as DFD -> {key: [values]}."""
    fd = os.open("defaults", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    with open(fd, "rb") as f:
        data = f.read(1 << 20)
    out = {k: [] for k in DEFAULTS_KEYS}
    for field in data.split(b"\0")[:-1]:
        key, _, value = field.decode("utf-8", "replace").partition("=")
        if key in out:
            out[key].append(value)
    return out


def with_image(spec):
    """--rootfs NAME -> the same JobSpec as --rootfs PATH of the stored tree,
    with the image's config as defaults (the parent, before validate())."""
    if spec.image is None:
        return spec
    fd = open_image(spec.image)
    try:
        defaults = read_defaults(fd)
    except OSError as e:
        raise SetupError("--rootfs: image %r is damaged (%s); import it again" % (spec.image, e.strerror)) from None
    return image_job_spec(spec, os.path.join(HOST.image_dir, spec.image, "rootfs"), defaults)


def image_job_spec(spec, rootfs, defaults):
    """What the image gives, under what the command line says, as docker
    does: its Env below -e and --env-file, its WorkingDir unless -w (or the
    config file's workdir), its User unless -u; COMMAND replaces Cmd and the
    Entrypoint stays; no COMMAND runs Entrypoint + Cmd."""
    env = dict(e.partition("=")[::2] for e in defaults["env"] if "=" in e)
    env.update(spec.env)
    user = spec.user
    if user is None and defaults["user"]:
        try:
            user = parse_user(defaults["user"][-1])
        except UsageError:
            raise UsageError("--rootfs %s: the image's User %r is not UID[:GID]; give -u/--user"
                             % (spec.image, defaults["user"][-1])) from None
        if spec.cap_add and user[0] not in ("0", "root"):
            raise UsageError("--cap-add: image %s runs as its User %r, with no capabilities at all; add -u 0 "
                             "to run it as root inside" % (spec.image, defaults["user"][-1]))
    workdir = spec.workdir
    if workdir is None:
        wd = defaults["workdir"][-1] if defaults["workdir"] else DEFAULT_WORKDIR
        workdir = os.path.normpath("/" + wd.lstrip("/")) if wd and "\0" not in wd else DEFAULT_WORKDIR
    command = tuple(defaults["entrypoint"]) + (spec.command or tuple(defaults["cmd"]))
    if not command:
        raise UsageError("no COMMAND given, and image %s has no Entrypoint or Cmd (usage: jrun --rootfs %s "
                         "[OPTIONS] [--] COMMAND [ARG...])" % (spec.image, spec.image))
    return spec.replace(rootfs=rootfs, env=tuple(env.items()), user=user, workdir=workdir, command=command)


# Importing.  Every archive is hostile input, read as root:
# - no entry is ever created through a host path: each is made relative to
#   the fd of its parent directory, which the kernel resolves inside the
#   image's tree (openat2 RESOLVE_IN_ROOT): an absolute name, or a parent that
#   an earlier entry made a symlink (a -> /etc, then a/passwd), lands inside
#   the tree, as docker has it; a '..' component is refused outright;
# - the entry itself is created with O_EXCL|O_NOFOLLOW after what was there
#   is removed (never followed); a hard link is made only to an entry of the
#   tree, resolved the same way, never through its final symlink;
# - device nodes are skipped (the job's /dev is its own and its root is
#   nodev); fifos are kept; setuid and setgid bits are kept as docker keeps
#   them: the tree is root's alone (0700) on the host, and a job gains
#   nothing from them (nosuid mount, no_new_privs); extended attributes are
#   dropped, file capabilities among them (no_new_privs ignores them too),
#   and with them any trusted.overlay.* attribute that could steer the
#   job's overlay; owners are the header's numbers, never looked up by name;
# - sizes and entry counts are bounded (--max-size, --max-files), and so are
#   tar headers that tarfile would read whole into memory;
# - every blob is checked against its descriptor's digest and size, every
#   layer against its diff_id; a failure anywhere removes the whole import.

IMAGE_MAX_SIZE = "32G"  # bytes of files, over all layers (a CUDA image is ~20 GB)
IMAGE_MAX_FILES = 1000000  # entries, over all layers (big images have ~300,000)
_JSON_MAX = 4 << 20  # an index, manifest or config: a few KiB in practice
_TAR_HEADER_MAX = 1 << 20  # a long name or pax header
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")
_CONFIG_TYPES = ("application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json")
_REF_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64"}
RENAME_EXCHANGE = 2  # <linux/fs.h>


class ImageSpec(_Frozen):
    """What an archive holds for one platform: where its layers are and
    what they must hash to, and the config a job gets."""

    __slots__ = ("format", "ref", "digest", "platform", "created", "config", "layers")


class Layer(_Frozen):
    # name: the blob's path in the source; digest and size: its descriptor's
    # (None in a docker-archive); diff_id: the digest of the uncompressed tar.
    __slots__ = ("name", "digest", "size", "diff_id")


def parse_platform(text):
    """'linux/amd64', 'linux/arm64/v8' -> (os, arch, variant or None); None
    -> this host's, as docker picks it."""
    if text is None:
        m = os.uname().machine
        return ("linux", _ARCH_ALIASES.get(m, m), None)
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError("--platform: %r is not OS/ARCH[/VARIANT] (e.g. linux/amd64, linux/arm64/v8)" % text)
    return (parts[0], _ARCH_ALIASES.get(parts[1], parts[1]), parts[2] if len(parts) == 3 else None)


def platform_text(p):
    return "/".join(x for x in p if x)


def config_platform(obj):
    """An OCI platform object or image config -> (os, arch, variant)."""
    arch = obj.get("architecture")
    arch = _ARCH_ALIASES.get(arch, arch) if isinstance(arch, str) else "?"
    variant = obj.get("variant") if isinstance(obj.get("variant"), str) else None
    if arch == "arm64" and variant == "v8":
        variant = None  # the only arm64 there is
    return (obj.get("os") if isinstance(obj.get("os"), str) else "?", arch, variant)


def platform_matches(have, want):
    return have[:2] == want[:2] and (want[2] is None or want[2] == (have[2] or ("v8" if have[1] == "arm64" else None)))


def entry_path(name):
    """A tar member's name -> its path relative to the image's root ('' for
    the root itself), as docker reads it: leading '/' and '.' components go;
    '..' is refused (its meaning would hang on symlinks of the tree)."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UsageError("%r leaves the image (a '..' component)" % name)
    return "/".join(parts)


def whiteout_target(base):
    """The name a whiteout entry hides: '.wh.NAME' -> NAME; the opaque marker
    '.wh..wh..opq' -> ''; None for an ordinary entry or other '.wh..wh.'
    metadata of aufs (hard link directories), which is no part of the tree."""
    if not base.startswith(".wh."):
        return None
    if base == ".wh..wh..opq":
        return ""
    if base.startswith(".wh..wh."):
        return None
    name = base[4:]
    if name in ("", ".", ".."):
        raise UsageError("whiteout %r names no entry" % base)
    return name


def _prefixes(rel):
    """'a/b/c' -> 'a', 'a/b', 'a/b/c'."""
    parts = rel.split("/")
    return ("/".join(parts[:i]) for i in range(1, len(parts) + 1))


def _blob_name(desc, what):
    """An OCI descriptor -> its blob's path in the layout, checking the
    digest's form first (it becomes a path: 'sha256:../../x' must not)."""
    if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str) or not isinstance(
            desc.get("size"), int) or desc["size"] < 0:
        raise UsageError("%s: not a descriptor with a digest and a size" % what)
    algo, _, hexdigest = desc["digest"].partition(":")
    if {"sha256": 64, "sha512": 128}.get(algo) != len(hexdigest) or not set(hexdigest) <= set("0123456789abcdef"):
        raise UsageError("%s: %r is not a sha256 or sha512 digest" % (what, desc["digest"]))
    return "blobs/%s/%s" % (algo, hexdigest)


class Digested:
    """A stream read once, front to back, through sha256 (or sha512) and a
    byte count; TICK(n) sees every read (progress, bounds)."""

    def __init__(self, f, algo="sha256", tick=None):
        import hashlib

        self.f, self.algo, self.h, self.n, self.tick = f, algo, hashlib.new(algo), 0, tick

    def read(self, size=-1):
        data = self.f.read(size)
        self.n += len(data)
        self.h.update(data)
        if self.tick:
            self.tick(len(data))
        return data

    def drain(self):
        while self.read(1 << 20):
            pass

    def check(self, digest, size, what):
        got = "%s:%s" % (self.algo, self.h.hexdigest())
        if digest is not None and got != digest:
            raise UsageError("%s: digest %s, not %s as the image says" % (what, got, digest))
        if size is not None and self.n != size:
            raise UsageError("%s: %d bytes, not %d as the image says" % (what, self.n, size))


_MAGIC = ((b"\x1f\x8b\x08", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bzip2"))


def compression(head):
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


def decompressed(f, kind):
    """F read through the decompressor KIND names (None: as it is)."""
    if kind == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=f, mode="rb")
    if kind == "xz":
        import lzma

        return lzma.LZMAFile(f)
    if kind == "bzip2":
        import bz2

        return bz2.BZ2File(f)
    if kind == "zstd":
        # The standard library has zstd from Python 3.14 on; before, the
        # zstandard package (optional: only zstd archives need it).
        try:
            from compression import zstd

            return zstd.ZstdFile(f)
        except ImportError:
            pass
        try:
            import zstandard
        except ImportError:
            raise SetupError("zstd-compressed data needs the Python package zstandard in jrun's environment "
                             "(e.g. /opt/jrun/bin/pip install zstandard), or Python 3.14") from None
        return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
    return f


def _file_size(f):
    size = f.seek(0, 2)
    f.seek(0)
    return size


def tar_open(f, stream):
    """tarfile on F: STREAM reads it front to back once (a layer), else with
    seeks (an archive's members, found by name).  tarfile imports re (7 ms)
    and is imported here only."""
    import tarfile

    class BoundedTarInfo(tarfile.TarInfo):
        # tarfile reads a long name or a pax header whole into memory: a
        # hostile one of 8 GB would exhaust it before any bound is checked.
        def _proc_member(self, tf):
            if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                             tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE) and self.size > _TAR_HEADER_MAX:
                raise UsageError("a tar header (long name or pax) of %d bytes" % self.size)
            return super()._proc_member(tf)

    return tarfile.open(fileobj=f, mode="r|" if stream else "r:", tarinfo=BoundedTarInfo)


def stream_members(tar):
    """The members of a stream-mode TarFile, one at a time.  (tarfile keeps
    every member it read: a layer of a million entries would keep them all.)"""
    while True:
        ti = tar.next()
        if ti is None:
            return
        yield ti
        del tar.members[:]


class ArchiveFiles:
    """The files of an image archive (docker-archive, oci-archive): members
    of one uncompressed tar, read in place; a member that is a link is
    followed inside the archive only (tarfile's extractfile)."""

    def __init__(self, tar, max_files):
        self.tar, self.members = tar, {}
        for m in tar:  # tarfile keeps them all: counted as they come
            if len(tar.members) > max_files:
                raise UsageError("more than %s entries (raise --max-files)" % format(max_files, ","))
            self.members[entry_path(m.name)] = m

    def has(self, name):
        return name in self.members

    def open(self, name):
        m = self.members.get(name)
        try:
            f = self.tar.extractfile(m) if m is not None else None
        except (KeyError, RecursionError):
            f = None
        if f is None:
            raise UsageError("%s: not a file in the archive" % name)
        return f


class LayoutFiles:
    """The files of an OCI image layout directory (or an unpacked
    docker-archive), opened by the kernel under the directory's fd: a
    symlink in it never leads out of it."""

    def __init__(self, fd):
        self.fd = fd

    def has(self, name):
        try:
            self.open(name).close()
            return True
        except UsageError:
            return False

    def open(self, name):
        import stat

        try:
            fd = openat2(self.fd, name, os.O_RDONLY, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        except OSError:
            raise UsageError("%s: not a file in the directory" % name) from None
        f = open(fd, "rb")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            f.close()
            raise UsageError("%s: not a file in the directory" % name)
        return f


def read_json(files, name, desc=None):
    """A JSON document of the image (index, manifest, config) -> (object,
    its sha256 digest), checked against DESC's digest and size if given."""
    with files.open(name) as f:
        size = _file_size(f)
        if size > _JSON_MAX:
            raise UsageError("%s: %d bytes, more than a JSON document of an image has" % (name, size))
        r = Digested(f, desc["digest"].partition(":")[0] if desc else "sha256")
        data = r.read(size)
    if desc:
        r.check(desc["digest"], desc["size"], name)
    import json

    try:
        return json.loads(data), "%s:%s" % (r.algo, r.h.hexdigest())
    except (ValueError, UnicodeDecodeError):
        raise UsageError("%s: not JSON" % name) from None


def image_config(config, what):
    """The part of an image config a job uses, each field's type checked."""
    cfg = config.get("config") or {}
    if not isinstance(cfg, dict):
        raise UsageError("%s: 'config' is not an object" % what)
    out = {}
    for key, kind in (("Env", list), ("WorkingDir", str), ("User", str), ("Entrypoint", list), ("Cmd", list)):
        v = cfg.get(key)
        if v is None or v == "":
            continue
        if not isinstance(v, kind) or (kind is list and not all(isinstance(x, str) for x in v)):
            raise UsageError("%s: config %s is not %s" % (what, key, "a string" if kind is str else
                                                           "a list of strings"))
        if "\0" in (v if kind is str else "".join(v)):
            raise UsageError("%s: config %s holds a NUL character" % (what, key))
        out[key] = v
    return out


def _diff_ids(config, nlayers, what):
    ids = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config.get("rootfs"), dict) else None
    if not isinstance(ids, list) or len(ids) != nlayers or not all(isinstance(d, str) for d in ids):
        raise UsageError("%s: rootfs.diff_ids does not list the %d layers" % (what, nlayers))
    return ids


def oci_images(files, index, want, seen, ref=None, depth=0):
    """The ImageSpecs for WANT that an OCI index (index.json, or an image
    index it names) leads to; the platforms of the others go to SEEN."""
    if depth > 3 or not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise UsageError("index.json: not an image index")
    out = []
    for n, desc in enumerate(index["manifests"]):
        what = "index.json manifest %d" % n
        name = _blob_name(desc, what)
        annotations = desc.get("annotations") if isinstance(desc.get("annotations"), dict) else {}
        this_ref = next((annotations[k] for k in _REF_ANNOTATIONS if isinstance(annotations.get(k), str)), ref)
        if isinstance(desc.get("platform"), dict):
            have = config_platform(desc["platform"])
            if not platform_matches(have, want):
                seen.add(platform_text(have))
                continue
        doc, _ = read_json(files, name, desc)
        if not isinstance(doc, dict):
            raise UsageError("%s: not an object" % name)
        if desc.get("mediaType") in _INDEX_TYPES or "manifests" in doc:
            out += oci_images(files, doc, want, seen, this_ref, depth + 1)
        elif isinstance(doc.get("layers"), list):
            image = _oci_manifest(files, doc, desc, this_ref, name)
            if image is not None and platform_matches(image.platform, want):
                out.append(image)
            elif image is not None:
                seen.add(platform_text(image.platform))
    return out


def _oci_manifest(files, manifest, desc, ref, what):
    """An image manifest -> ImageSpec; None for an artifact that is no image
    (an attestation, a signature): its config or layers are of other types."""
    cdesc = manifest.get("config")
    if isinstance(cdesc, dict) and cdesc.get("mediaType") not in _CONFIG_TYPES:
        return None
    names = [_blob_name(d, "%s layer %d" % (what, i)) for i, d in enumerate(manifest["layers"])]
    for d in manifest["layers"]:
        mt = d.get("mediaType", "")
        if not (("layer" in mt or "rootfs" in mt) and mt.endswith(("tar", "tar+gzip", "tar+zstd", "tar.gzip"))):
            return None  # in-toto statements, encrypted layers, ...
    config, _ = read_json(files, _blob_name(cdesc, what + " config"), cdesc)
    if not isinstance(config, dict):
        raise UsageError("%s: the config is not an object" % what)
    ids = _diff_ids(config, len(names), what)
    layers = tuple(Layer(name=n, digest=d["digest"], size=d["size"], diff_id=i)
                   for n, d, i in zip(names, manifest["layers"], ids))
    return ImageSpec(format=None, ref=ref, digest=desc["digest"], platform=config_platform(config),
                     created=config.get("created"), config=image_config(config, what), layers=layers)


def docker_images(files, want, seen):
    """The ImageSpecs for WANT in a docker-archive's manifest.json (docker
    and podman save; docker 25's also holds an OCI layout, read instead)."""
    manifest, _ = read_json(files, "manifest.json")
    if not isinstance(manifest, list):
        raise UsageError("manifest.json: not a list of images")
    out = []
    for n, entry in enumerate(manifest):
        what = "manifest.json image %d" % n
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) or not isinstance(
                entry.get("Layers"), list) or not all(isinstance(x, str) for x in entry["Layers"]):
            raise UsageError("%s: no Config and Layers" % what)
        cname = entry_path(entry["Config"])
        config, digest = read_json(files, cname)
        # The config is named by its sha256 (<hex>.json, blobs/sha256/<hex>).
        hexname = cname.rsplit("/", 1)[-1].partition(".json")[0]
        if len(hexname) == 64 and "sha256:" + hexname != digest:
            raise UsageError("%s: digest %s, not sha256:%s as its name says" % (cname, digest, hexname))
        if not isinstance(config, dict):
            raise UsageError("%s: not an object" % cname)
        if not platform_matches(config_platform(config), want):
            seen.add(platform_text(config_platform(config)))
            continue
        ids = _diff_ids(config, len(entry["Layers"]), what)
        layers = []
        for lname, diff_id in zip(entry["Layers"], ids):
            lname = entry_path(lname)
            h = lname[len("blobs/sha256/"):] if lname.startswith("blobs/sha256/") else ""
            layers.append(Layer(name=lname, digest="sha256:" + h if len(h) == 64 else None, size=None,
                                diff_id=diff_id))
        tags = entry.get("RepoTags") if isinstance(entry.get("RepoTags"), list) else []
        out.append(ImageSpec(format="docker-archive", ref=tags[0] if tags and isinstance(tags[0], str) else None,
                             digest=digest, platform=config_platform(config), created=config.get("created"),
                             config=image_config(config, what), layers=tuple(layers)))
    return out


def select_image(images, want, seen):
    unique = list({i.digest: i for i in images}.values())
    if not unique:
        have = sorted(p for p in seen if "unknown" not in p.split("/"))  # attestations are unknown/unknown
        raise UsageError("no image for %s in it (it has: %s); choose one with --platform"
                         % (platform_text(want), ", ".join(have) or "none"))
    if len(unique) > 1:
        raise UsageError("it holds %d images for %s (%s): import an archive of one image"
                         % (len(unique), platform_text(want), ", ".join(i.ref or i.digest for i in unique)))
    return unique[0]


class Bounds:
    """--max-size and --max-files, over all layers; and what a decompressor
    may produce (files plus the tar's headers), so that a bomb stops early."""

    def __init__(self, max_size, max_files):
        self.max_size, self.max_files = max_size, max_files
        self.size = self.files = 0

    def entry(self, ti):
        self.files += 1
        if self.files > self.max_files:
            raise UsageError("more than %s entries (raise --max-files)" % format(self.max_files, ","))
        if ti.isreg():
            self.size += ti.size
            if self.size > self.max_size:
                raise UsageError("more than %s of files (raise --max-size)" % fmt_size(self.max_size))

    def stream_cap(self):
        """TICK for a decompressed stream: at most the files' bound plus a
        kilobyte of tar header and padding per entry."""
        total = [0]
        cap = self.max_size + 1024 * self.max_files

        def tick(n):
            total[0] += n
            if total[0] > cap:
                raise UsageError("decompressed, more than --max-size %s (and --max-files %s) allow"
                                 % (fmt_size(self.max_size), format(self.max_files, ",")))
        return tick


class ImportProgress:
    """A progress line while stderr is a terminal (text log format, level
    info or below), as for uploads; one summary line in any case."""

    def __init__(self, name):
        self.tty = _log["format"] == "text" and LEVELS["info"] >= _log["level"] and os.isatty(2)
        self.name, self.stage, self.done, self.total = name, "", 0, 0
        self.started = self.shown = time.monotonic()

    def begin(self, stage, total):
        self.stage, self.done, self.total = stage, 0, total
        self.shown = 0.0
        self.read(0)

    def read(self, n):
        self.done += n
        now = time.monotonic()
        if self.tty and now - self.shown > 0.25:
            self.shown = now
            pct = " %d%%" % (100 * self.done // self.total) if self.total else ""
            os.write(2, ("\rjrun: Importing %s: %s%s\033[K" % (self.name, self.stage, pct)).encode())

    def end(self, summary):
        if self.tty:
            os.write(2, b"\r\033[K")
        log("info", "%s in %.1fs" % (summary, time.monotonic() - self.started))


class ImageTree:
    """Applies layers, in order, to the tree under ROOTFD (the parent, as
    root, in a directory only root can reach): every entry made relative to
    its parent's fd, which the kernel resolves inside the tree."""

    def __init__(self, rootfd, bounds, progress):
        self.rootfd, self.bounds, self.progress = rootfd, bounds, progress
        self.skipped = self.xattrs = 0
        self.on_data = None  # progress by bytes of files (a tarball's; a layer's is by blob bytes)
        self.dir_times = {}
        self.fresh = set()  # what the current layer made: its whiteouts hide lower layers only
        self.label = ""

    def apply(self, tar, members, label):
        """Every entry of one layer.  A broken archive (truncated, not tar,
        bad compression) is refused with what the reader said."""
        self.label, self.fresh = label, set()
        try:
            for ti in stream_members(tar) if members is None else members:
                try:
                    self.entry(tar, ti)
                except OSError as e:
                    raise SetupError("%r: %s" % (ti.name, e.strerror or e)) from None
        except JrunError as e:
            raise type(e)("%s: %s" % (label, e)) from None
        except Exception as e:  # noqa: BLE001 - tarfile.ReadError, EOFError, zlib.error, lzma.LZMAError, ...
            raise UsageError("%s: cannot read it: %s" % (label, e)) from None

    def entry(self, tar, ti):
        rel = entry_path(ti.name)
        self.bounds.entry(ti)
        if not rel:
            return  # the root itself: the job's root is its upper layer's
        parent, _, base = rel.rpartition("/")
        if base.startswith(".wh."):
            hidden = whiteout_target(base)
            if hidden is not None:
                self.opaque(parent) if hidden == "" else self.whiteout(parent, hidden)
            return
        self.fresh.update(_prefixes(rel))
        if not (ti.isreg() or ti.isdir() or ti.issym() or ti.islnk() or ti.isfifo()):
            self.skipped += 1  # device nodes (and types tar has no use for)
            return
        if not (0 <= ti.uid <= 0xFFFFFFFE and 0 <= ti.gid <= 0xFFFFFFFE):
            raise UsageError("%r: owner %d:%d is out of range" % (ti.name, ti.uid, ti.gid))
        if any(k.startswith(("SCHILY.xattr.", "LIBARCHIVE.xattr.")) for k in ti.pax_headers):
            self.xattrs += 1
        pfd = self.directory(parent)
        try:
            self.create(tar, ti, pfd, base, rel)
        finally:
            os.close(pfd)

    def directory(self, rel):
        """An O_PATH fd of directory REL of the tree, made (root's, 0755) if
        missing, as tar does."""
        try:
            return openat2(self.rootfd, rel or ".", os.O_PATH | os.O_DIRECTORY,
                           RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        except FileNotFoundError:
            pass
        try:
            return open_dir_in_root(self.rootfd, rel)
        except SetupError as e:
            raise UsageError(str(e).replace("the job's root", "the image")) from None

    def existing(self, rel):
        """A readable fd of directory REL of the tree, or None."""
        try:
            return openat2(self.rootfd, rel or ".", os.O_RDONLY | os.O_DIRECTORY,
                           RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def create(self, tar, ti, pfd, base, rel):
        kept = replace_entry(pfd, base, ti.isdir())
        times = (int(ti.mtime * 1e9),) * 2
        if ti.isdir():
            if not kept:
                os.mkdir(base, 0o700, dir_fd=pfd)
            fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                self.owner_and_mode(fd, ti)
            finally:
                os.close(fd)
            self.dir_times[rel] = times  # set last: every entry made in it changes it
        elif ti.isreg():
            fd = open_new_file(pfd, base, 0o600)
            try:
                if ti.size:
                    self.copy(tar.extractfile(ti), fd)
                self.owner_and_mode(fd, ti)
                _utime(fd, times)
            finally:
                os.close(fd)
        elif ti.issym():
            os.symlink(ti.linkname, base, dir_fd=pfd)
            os.chown(base, ti.uid, ti.gid, dir_fd=pfd, follow_symlinks=False)
            _utime(base, times, pfd)
        elif ti.islnk():
            self.hard_link(ti, pfd, base)
        else:
            os.mkfifo(base, 0o600, dir_fd=pfd)
            os.chown(base, ti.uid, ti.gid, dir_fd=pfd, follow_symlinks=False)
            os.chmod(base, ti.mode & 0o7777, dir_fd=pfd)  # just made, where only root writes: no symlink
            _utime(base, times, pfd)

    def owner_and_mode(self, fd, ti):
        os.fchown(fd, ti.uid, ti.gid)
        os.fchmod(fd, ti.mode & 0o7777)  # after chown, which clears setuid and setgid

    def copy(self, src, fd):
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                return
            write_all(fd, chunk)
            if self.on_data:
                self.on_data(len(chunk))

    def hard_link(self, ti, pfd, base):
        """A hard link to an entry of the tree only: its parent resolved
        inside the tree, its final component never followed."""
        target = entry_path(ti.linkname)
        tparent, _, tbase = target.rpartition("/")
        tfd = self.existing(tparent) if tbase else None
        try:
            if tfd is None:
                raise FileNotFoundError
            os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            raise UsageError("%r: a hard link to %r, which is not in the image" % (ti.name, ti.linkname)) from None
        finally:
            if tfd is not None:
                os.close(tfd)

    def whiteout(self, parent, name):
        """'.wh.NAME': NAME of the lower layers goes (with all it holds)."""
        rel = parent + "/" + name if parent else name
        if rel in self.fresh:
            return
        dfd = self.existing(parent)
        if dfd is not None:
            try:
                replace_entry(dfd, name, False)
            finally:
                os.close(dfd)

    def opaque(self, parent):
        """'.wh..wh..opq': the directory shows nothing of the lower layers."""
        dfd = self.existing(parent)
        if dfd is not None:
            try:
                self._prune(dfd, parent)
            finally:
                os.close(dfd)

    def _prune(self, dfd, rel):
        import stat

        for name in os.listdir(dfd):
            path = rel + "/" + name if rel else name
            if path not in self.fresh:
                replace_entry(dfd, name, False)
            elif stat.S_ISDIR(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                try:
                    self._prune(sub, path)
                finally:
                    os.close(sub)

    def finish(self):
        """Directory times, now that nothing is made in them any more."""
        for rel, times in self.dir_times.items():
            try:
                fd = openat2(self.rootfd, rel, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                             RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
            except OSError:
                continue  # removed by a later layer
            try:
                _utime(fd, times)
            finally:
                os.close(fd)


def replace_entry(dfd, name, keep_dir):
    """Clear NAME in directory DFD, never following it: a file or symlink
    goes, a directory goes with all it holds, unless KEEP_DIR (a directory
    entry over a directory merges into it).  Returns True if one is kept."""
    import shutil
    import stat

    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dfd)
    elif keep_dir:
        return True
    else:
        shutil.rmtree(name, dir_fd=dfd)
    return False


def _utime(target, times, dfd=None):
    try:
        if dfd is None:
            os.utime(target, ns=times)
        else:
            os.utime(target, ns=times, dir_fd=dfd, follow_symlinks=False)
    except (OverflowError, ValueError):
        pass  # a time the kernel cannot store: the file keeps now


def apply_layer(files, layer, tree, bounds_tick):
    """One layer blob: its raw bytes hashed against its descriptor, its tar
    (after decompression) against its diff_id, its entries applied."""
    with files.open(layer.name) as f:
        size = _file_size(f)
        if layer.size is not None and size != layer.size:
            raise UsageError("%s: %s: %d bytes, not %d as the image says" % (tree.label, layer.name, size,
                                                                               layer.size))
        kind = compression(f.read(8))
        f.seek(0)
        raw = Digested(f, (layer.digest or "sha256:").partition(":")[0], tree.progress.read)
        tar_stream = Digested(decompressed(raw, kind), "sha256", bounds_tick)
        try:
            tree.apply(tar_open(tar_stream, stream=True), None, tree.label)
            tar_stream.drain()  # the hashes cover the whole blob, past the tar's end
            raw.drain()
        except JrunError:
            raise
        except Exception as e:  # noqa: BLE001 - as in ImageTree.apply
            raise UsageError("%s: cannot read it: %s" % (tree.label, e)) from None
    raw.check(layer.digest, layer.size, "%s (%s)" % (tree.label, layer.name))
    tar_stream.check(layer.diff_id, None, "%s (%s) uncompressed" % (tree.label, layer.name))


def read_source(source, bfd, want, bounds, progress):
    """SOURCE (a path) -> (files, ImageSpec, tar or None): what it holds,
    for the platform WANT.  A compressed file is decompressed once into the
    build directory BFD (bounded), so that its members can be found by name."""
    import stat

    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(e.strerror) from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        files = LayoutFiles(fd)
        if files.has("index.json") and files.has("oci-layout"):
            fmt = "oci-layout"
        elif files.has("manifest.json"):
            fmt = "docker-archive"
        else:
            raise UsageError("a directory must be an OCI image layout (index.json, oci-layout) or an unpacked "
                             "docker-archive (manifest.json)")
        return files, _image_of(files, fmt, want), None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError("not a file or a directory")
    f = open(fd, "rb")
    kind = compression(os.pread(fd, 8, 0))
    digest = None
    if kind:
        f, digest = _decompress_to(f, kind, bfd, bounds, progress, st.st_size)
    try:
        tar = tar_open(f, stream=False)
        files = ArchiveFiles(tar, bounds.max_files)
    except JrunError:
        raise
    except Exception as e:  # noqa: BLE001 - tarfile.ReadError and the like
        raise UsageError("not a tar archive (%s), nor an OCI image layout directory" % e) from None
    if files.has("index.json") and files.has("oci-layout"):
        fmt = "docker-archive" if files.has("manifest.json") else "oci-archive"
    elif files.has("manifest.json"):
        fmt = "docker-archive"
    else:
        if digest is None:
            import hashlib

            f.seek(0)
            digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        image = ImageSpec(format="tarball", ref=None, digest=digest, platform=None, created=None, config={},
                          layers=())
        return files, image, tar
    return files, _image_of(files, fmt, want), None


def _image_of(files, fmt, want):
    seen = set()
    if fmt == "docker-archive" and not files.has("index.json"):
        images = docker_images(files, want, seen)
    else:
        index, _ = read_json(files, "index.json")
        images = oci_images(files, index, want, seen)
    return select_image(images, want, seen).replace(format=fmt)


def _decompress_to(f, kind, bfd, bounds, progress, size):
    """Decompress F into BFD/source.tar (bounded); -> (that file, the
    compressed file's digest).  Decompressing once beats tarfile seeking
    backwards in a compressed stream, which starts over from its beginning."""
    progress.begin("decompressing", size)
    raw = Digested(f, "sha256", progress.read)
    src = Digested(decompressed(raw, kind), "sha256", bounds.stream_cap())
    fd = os.open("source.tar", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=bfd)
    out = open(fd, "w+b")
    while True:
        try:
            chunk = src.read(1 << 20)
            if not chunk:
                raw.drain()
                break
        except JrunError:
            raise
        except Exception as e:  # noqa: BLE001 - EOFError, zlib.error, lzma.LZMAError, ...
            raise UsageError("cannot decompress it (%s): %s" % (kind, e)) from None
        out.write(chunk)
    out.seek(0)
    return out, "sha256:" + raw.h.hexdigest()


def build_image(name, source, bfd, rootfd, want, bounds):
    """Everything of an import that happens inside the build directory BFD
    (the tree under ROOTFD); -> the image's record."""
    progress = ImportProgress(name)
    files, image, tar = read_source(source, bfd, want, bounds, progress)
    tree = ImageTree(rootfd, bounds, progress)
    if tar is not None:  # a plain rootfs tarball: one layer, the archive itself
        progress.begin("unpacking", sum(m.size for m in tar.getmembers() if m.isreg()))
        tree.on_data = progress.read
        tree.apply(tar, tar.getmembers(), "the tarball")
        nlayers = 1
    else:
        total = 0
        for layer in image.layers:
            with files.open(layer.name) as f:
                total += _file_size(f)
        progress.begin("layers", total)
        tick = bounds.stream_cap()
        for n, layer in enumerate(image.layers, 1):
            progress.stage = "layer %d/%d" % (n, len(image.layers))
            tree.label = "layer %d/%d" % (n, len(image.layers))
            apply_layer(files, layer, tree, tick)
        nlayers = len(image.layers)
    tree.finish()
    try:
        os.unlink("source.tar", dir_fd=bfd)  # the decompressed copy, if one was made
    except FileNotFoundError:
        pass
    if tree.skipped:
        log("warning", "rootfs import: skipped %d device nodes (a job's /dev is its own)" % tree.skipped)
    if tree.xattrs:
        log("info", "rootfs import: dropped the extended attributes of %d entries (file capabilities give a "
                    "job nothing under no_new_privs)" % tree.xattrs)
    record = {"name": name, "format": image.format, "source": source, "ref": image.ref, "digest": image.digest,
              "platform": platform_text(image.platform) if image.platform else None, "created": image.created,
              "imported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "layers": nlayers,
              "files": bounds.files, "size": bounds.size, "config": image.config, "jrun": __version__}
    progress.end("imported %s from %s (%s%s, %d layer%s): %s files, %s" % (
        name, source, image.format, ", " + record["platform"] if record["platform"] else "", nlayers,
        "" if nlayers == 1 else "s", format(bounds.files, ","), fmt_size(bounds.size)))
    return record


class ImageStore:
    """HOST.image_dir, opened once; every name below it is relative to its fd."""

    def __init__(self, fd):
        self.fd = fd

    @classmethod
    def open(cls, create=False):
        """The store, or None if there is none (and CREATE is false)."""
        if create:
            os.makedirs(os.path.dirname(HOST.image_dir), mode=0o755, exist_ok=True)
            try:
                os.mkdir(HOST.image_dir, 0o755)
            except FileExistsError:
                pass
        try:
            fd = os.open(HOST.image_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        st = os.fstat(fd)
        # Root writes image trees here, setuid binaries included: nobody
        # else may plant or swap a name in it.
        if st.st_uid != 0 or st.st_mode & 0o022:
            os.close(fd)
            raise SetupError("%s must be owned by root and writable by root only (chown root; chmod 755)"
                             % HOST.image_dir)
        return cls(fd)

    def has(self, name):
        import stat

        try:
            return stat.S_ISDIR(os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    def lock(self, name):
        """The flock that serialises imports and removals of NAME, on
        .lock-NAME; an fd for unlock().  Its holder removes the file when
        done, so a waiter that gets the lock of a removed file tries again."""
        lock = ".lock-" + name
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log("info", "waiting for another import or removal of image %s" % name)
                fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            try:
                now = os.stat(lock, dir_fd=self.fd, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def unlock(self, name, fd):
        os.unlink(".lock-" + name, dir_fd=self.fd)
        os.close(fd)

    def new_build(self, name):
        """A fresh .new-NAME.XXXX with an empty rootfs/ (0700) in it."""
        build = ".new-%s.%s" % (name, os.urandom(4).hex())
        os.mkdir(build, 0o755, dir_fd=self.fd)
        os.mkdir(build + "/rootfs", 0o700, dir_fd=self.fd)
        return build

    def commit(self, build, name):
        """BUILD becomes NAME at once (an existing NAME is swapped out and
        retired), after the tree is on disk: a crash leaves either the old
        image or the new one, complete."""
        _check(_c().syncfs(self.fd), "syncfs %s" % HOST.image_dir)
        if not self.has(name):
            os.rename(build, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            return
        _check(_c().renameat2(self.fd, _b(build), self.fd, _b(name), RENAME_EXCHANGE), "renameat2 %s" % name)
        self.retire(name, build)

    def retire(self, name, entry=None):
        """Rename ENTRY (default: NAME) to .old-NAME.XXXX and remove it if
        no job runs on it; True if it is gone."""
        old = ".old-%s.%s" % (name, os.urandom(4).hex())
        os.rename(entry or name, old, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        if old in self.sweep():
            return True
        log("info", "image %s: the old tree stays until the job running on it ends (then the next "
                    "jrun gc, rootfs import or rootfs rm removes it)" % name)
        return False

    def discard(self, build):
        import shutil

        shutil.rmtree(build, dir_fd=self.fd, ignore_errors=True)

    def sweep(self, held=None):
        """Remove what dead imports left (.new-X.* and .lock-X, once X's lock
        is free, or held by this process: HELD) and retired trees no job runs
        on any more (.old-*).  Returns the entries removed."""
        removed = []
        for entry in sorted(os.listdir(self.fd)):  # .lock-X before .new-X.*
            kind, _, rest = entry.partition("-")
            name = rest.rsplit(".", 1)[0] if kind in (".new", ".old") else rest
            if kind not in (".lock", ".new", ".old") or (kind == ".lock" and name == held):
                continue
            fd = -1 if kind == ".new" and name == held else self._take(".lock-" + name if kind == ".new" else entry)
            if fd is None:
                continue  # an import under way, or a job on a retired tree
            try:
                if kind == ".lock":
                    os.unlink(entry, dir_fd=self.fd)  # while held: see lock()
                else:
                    self.discard(entry)
                removed.append(entry)
            finally:
                if fd >= 0:
                    os.close(fd)
        return removed

    def _take(self, entry):
        """An fd holding ENTRY's flock; -1 if ENTRY is gone; None if someone
        else holds it."""
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            return -1
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            os.close(fd)
            return None


def import_image(name, source, want, force, bounds):
    """jrun rootfs import: build NAME from SOURCE next to the store and
    rename it into place; on any failure (or a signal) nothing is left."""
    store = ImageStore.open(create=True)
    lock = store.lock(name)
    try:
        store.sweep(held=name)
        if store.has(name) and not force:
            raise UsageError("image %r exists (--force replaces it; jrun rootfs rm %s removes it)" % (name, name))
        build = store.new_build(name)
        try:
            bfd = os.open(build, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=store.fd)
            rootfd = os.open("rootfs", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=bfd)
            record = build_image(name, source, bfd, rootfd, want, bounds)
            write_new(bfd, "defaults", encode_defaults(record["config"]))
            write_new(bfd, "image.json", (dumps_json(record) + "\n").encode())
            store.commit(build, name)
        except BaseException:
            store.discard(build)
            raise
    finally:
        store.unlock(name, lock)
    return record


def remove_image(name):
    """jrun rootfs rm NAME: the name goes at once; the tree as soon as no
    job runs on it."""
    store = ImageStore.open()
    if store is None or not store.has(name):
        raise UsageError("rootfs rm: no image %r (see jrun rootfs ls)" % name)
    lock = store.lock(name)
    try:
        if not store.has(name):
            raise UsageError("rootfs rm: no image %r (see jrun rootfs ls)" % name)
        store.retire(name)
    finally:
        store.unlock(name, lock)
    log("info", "image %s removed" % name)


# ---------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------


def _subparser(prog, description):
    """Subcommands are off the run path: argparse is fine here."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError("%s: %s (see %s --help)" % (prog, message, prog))

    return Parser(prog=prog, description=description)


def job_ids():
    """Names of the state directories: running, starting or dead jobs."""
    try:
        names = os.listdir(HOST.state_dir)
    except FileNotFoundError:
        return []
    except PermissionError:
        raise UsageError("cannot read %s: permission denied (run as root: sudo jrun ...)" % HOST.state_dir) from None
    # ps, kill and gc act, as root, on what they find there (kill signals
    # the PID a job.json names): only from a directory only root can write.
    check_state_dir()
    # No job name starts with a dot: /run/jrun/.net belongs to the networks.
    return sorted(n for n in names if not n.startswith(".") and os.path.isdir(os.path.join(HOST.state_dir, n)))


def _pid_alive(pid):
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def running_jobs():
    """job.json records of the jobs running now: the job's lock is held by
    its jrun and both jrun and the job's PID 1 exist.  A starting job (no
    PID yet) and a dead job's stale state are not running."""
    jobs = []
    for job_id in job_ids():
        state = JobState(job_id)
        if not os.path.exists(os.path.join(state.dir, "lock")) or not state.is_live():
            continue
        rec = state.load()
        if rec.get("id") == job_id and _pid_alive(rec.get("jrun_pid")) and _pid_alive(rec.get("pid")):
            if "cgroup" not in rec:  # the default place is not recorded: jrun/<id>
                cg = Cgroup.from_state(rec)
                if cg is not None:
                    rec["cgroup"] = {"version": 2 if isinstance(cg, CgroupV2) else 1, "dirs": cg.dirs}
            jobs.append(rec)
    return jobs


def _fmt_cgroup(cg):
    """job.json's cgroup record -> the job's cgroup path, as in
    /proc/PID/cgroup ('/jrun/ID')."""
    dirs = cg.get("dirs") if isinstance(cg, dict) else None
    if not dirs:
        return str(cg or "-")
    rel = os.path.relpath(json_text(dirs[0]), CGROUP_ROOT).split("/")
    return "/" + "/".join(rel[1:] if cg.get("version") == 1 else rel)


def _fmt_limits(limits):
    parts = []
    for k, v in sorted((limits or {}).items()):
        if k in ("memory", "io_bps") and isinstance(v, int):
            v = fmt_size(v).replace(" ", "")
        elif k == "timeout_s":
            k, v = "timeout", _fmt_dur(v)
        elif k == "cpu":
            v = "%s%%" % v
        parts.append("%s=%s" % (k.replace("_", "-"), v))
    return ",".join(parts) or "-"


def shown(text):
    """TEXT for a terminal: a byte that is not UTF-8 (see _exact_bytes) and
    a control character are shown as \\xNN, so that a job's command can
    neither garble nor drive the terminal of whoever lists it."""
    out = []
    for ch in text:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:
            out.append("\\x%02x" % (o - 0xDC00))
        elif o < 32 or 127 <= o < 160:
            out.append("\\x%02x" % o)
        else:
            out.append(ch)
    return "".join(out)


def _fmt_age(seconds):
    seconds = int(max(0, seconds))
    if seconds < 120:
        return "%ds" % seconds
    if seconds < 7200:
        return "%dm" % (seconds // 60)
    return "%dh%02dm" % (seconds // 3600, seconds % 3600 // 60)


def _print_table(rows):
    """Columns as wide as their widest cell; the last one as it is."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] + "\n")


def dead_jobs(running):
    """job.json records of jobs whose jrun is gone but whose state directory
    is still there (with what it records: cgroups, veth, lease), marked
    "state": "dead": what `jrun gc` would remove.  RUNNING: the running
    jobs' ids; a job starting up (no lock yet, or no PID) is neither."""
    dead = []
    for job_id in job_ids():
        state = JobState(job_id)
        if job_id in running or state.is_live():
            continue
        rec = dict(state.load(), id=job_id, state="dead")
        dead.append(rec)
    return dead


def cmd_ps(argv):
    p = _subparser("jrun ps", "List the jobs running now on this host.")
    p.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    p.add_argument("--all", action="store_true", help="also dead jobs that left something behind for jrun gc "
                   "(state \"dead\")")
    args = p.parse_args(argv)
    jobs = running_jobs()
    if args.all:
        jobs = [dict(j, state="running") for j in jobs]
        jobs += dead_jobs({j["id"] for j in jobs})
    if args.json:
        sys.stdout.write(dumps_json(jobs) + "\n")
        return 0
    # Fields that the network and cgroup code add to job.json.
    rows = [("ID", "PID", "STARTED", "UP", "LIMITS", "NETWORK", "CGROUP", "COMMAND")]
    now = time.time()
    for j in jobs:
        started = j.get("started") or now
        net = j.get("net") or "-"
        address = j.get("net_address") or j.get("address")
        if address:
            net = "%s %s" % (net, address)
        up = "dead" if j.get("state") == "dead" else _fmt_age(now - started)
        rows.append((j["id"], str(j.get("pid") or "-"), time.strftime("%H:%M:%S", time.localtime(started)),
                     up, _fmt_limits(j.get("limits")), net, _fmt_cgroup(j.get("cgroup")),
                     " ".join(shown(json_text(a)) for a in j.get("command") or ())))
    _print_table(rows)
    return 0


def parse_signal(text):
    """'TERM', 'SIGTERM', 'term' or '15' -> signal number."""
    t = text.strip().upper()
    if t.isdigit():
        num = int(t)
        if 0 < num < signal.NSIG:
            return num
    else:
        name = t if t.startswith("SIG") else "SIG" + t
        sig = getattr(_signal_names(), name, None) if name.isidentifier() else None
        if isinstance(sig, _signal_names()):
            return int(sig)
    raise UsageError("kill: -s: %r is not a signal (use e.g. TERM, KILL, HUP, 15)" % text)


def _ppid(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def cmd_kill(argv):
    p = _subparser("jrun kill", "Send a signal to a running job (default SIGTERM).")
    p.add_argument("-s", "--signal", default="TERM", help="signal name or number (default TERM)")
    p.add_argument("job", help="the job id (see jrun ps)")
    args = p.parse_args(argv)
    sig = parse_signal(args.signal)
    job = next((j for j in running_jobs() if j["id"] == args.job), None)
    if job is None:
        raise UsageError("kill: no running job %r (see jrun ps)" % args.job)
    # A signal that jrun relays goes to the job's jrun, which forwards it and
    # escalates to SIGKILL after --stop-timeout exactly as in the
    # foreground.  Any other signal (KILL, USR1, ...) goes to the job's PID 1
    # itself: jrun would not relay it, and might die of it.
    relayed = sig in FORWARDED_SIGNALS
    pid = job["jrun_pid"] if relayed else job["pid"]
    # A pidfd pins the process; checking its identity afterwards closes the
    # race with the PID being reused by the time we signal it.
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise UsageError("kill: job %r has just ended" % args.job) from None
    try:
        ok = JobState(args.job).is_live() and (relayed or _ppid(pid) == job["jrun_pid"])
        if not ok:
            raise UsageError("kill: job %r has just ended" % args.job)
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        raise UsageError("kill: job %r has just ended" % args.job) from None
    finally:
        os.close(pidfd)
    log("debug", "kill: %s sent to %s %d of job %s" % (signal_name(sig), "jrun" if relayed else "PID 1",
                                                      pid, args.job))
    return 0


# gc.  It may run at any time, from cron, concurrently with jobs:
# - a live job holds the flock on its state directory's lock file; gc never
#   touches it.  A state directory without a lock file younger than 5 s is a
#   job starting up (is_live), and is left alone too.
# - gc holds the lock of a dead job while it tears it down, so a new job
#   taking the same name waits for the name instead of racing with gc.
# - Resources whose state directory is gone entirely are found by each
#   resource's orphans() (see its contract on Resource.orphans).


def gc_job(job_id):
    """Remove what a dead job left behind.  Never touches a live job."""
    state = JobState(job_id)
    try:
        lock_fd = os.open(os.path.join(state.dir, "lock"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        lock_fd = None
        if not os.path.isdir(state.dir) or state.is_live():  # gone, or starting up: no lock yet
            return False
    except NotADirectoryError:
        return False
    try:
        if lock_fd is not None:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # live, or another gc is at it
        record = state.load()
        stuck = []
        for cls in reversed(RESOURCE_CLASSES):
            res = cls.from_state(record)
            if res is not None:
                res.teardown()
                stuck += res.remains()
        if stuck:
            # job.json is jrun's only proof that it made these (see
            # Cgroup.setup): it stays until a later gc removes them.
            log("warning", "gc: job %s: %s still there; its state stays for the next gc" % (job_id, ", ".join(stuck)))
            return False
        root = os.path.join(state.dir, "root")
        # The job's mounts lived in its own mount namespace and died with
        # it; a mount here would only come from a crash mid-setup of an old
        # jrun.
        try:
            umount2(root, MNT_DETACH | UMOUNT_NOFOLLOW)
        except OSError:
            pass
        try:
            state.remove()
        except FileNotFoundError:
            pass
        except OSError as e:
            log("warning", "gc: cannot remove %s: %s" % (state.dir, e.strerror))
            return False
        return True
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def collect_orphans():
    """Resources of jobs that have no state directory at all: the names of
    those torn down (one that remains was warned about by its teardown)."""
    removed = []
    for cls in RESOURCE_CLASSES:
        for res in cls.orphans(lambda: set(job_ids())):
            res.teardown()
            if not res.remains():
                removed.append(res.name)
    return removed


def slurm_job_of(record, slurm_job):
    """Whether a job.json record is of Slurm job SLURM_JOB: its own job id
    or its array's (an array task's Epilog sees the task's own id), or a
    cgroup inside one of the job's steps (a jrun run without Slurm's
    variables: sudo drops them unless told to keep them)."""
    task = record.get("slurm") if isinstance(record.get("slurm"), dict) else {}
    if slurm_job in (task.get("job_id"), task.get("array_job_id")):
        return True
    cg = Cgroup.from_state(record)
    return any("/job_%s/step_" % slurm_job in d for d in (cg.dirs if cg else ()))


def gc_jobs(ids):
    """gc of exactly these jobs: True if nothing of them is left.  A job
    that is still running is left alone, and counts as left."""
    clean = True
    for job_id in ids:
        state = JobState(job_id)
        if not os.path.isdir(state.dir):
            continue  # cleaned up by its own jrun, or never there
        if state.is_live():
            log("warning", "gc: job %s is running: left alone" % job_id)
            clean = False
            continue
        if not gc_dead_job(job_id) and os.path.isdir(state.dir):
            log("warning", "gc: job %s: not everything could be removed" % job_id)
            clean = False
    return clean


def gc_dead_job(job_id):
    """gc_job, said on stderr, then Slurm's cgroups the job's kept."""
    dirs = (Cgroup.from_state(JobState(job_id).load()) or Cgroup(None)).dirs
    if not gc_job(job_id):
        return False
    log("info", "gc: removed leftovers of job %s" % job_id)
    release_slurm_cgroups(dirs)
    return True


def release_slurm_cgroups(dirs):
    """After gc removed a dead job's cgroups that were inside a Slurm step:
    Slurm's step, job and (v1) user cgroups above them.  slurmstepd removes
    those once, at the step's end, and fails while a child is in them (the
    dead jrun's); nothing of Slurm retries.  Only empty ones go (rmdir
    refuses a cgroup with processes or children), and under the flock on
    Slurm's own root cgroup that slurmstepd holds while it makes or removes
    a step's (cgroup/v1 xcgroup_lock), so no starting step loses its
    parent."""
    version = cgroup_host().version
    for d in dirs:
        parts = d.split("/")
        step = next((i + 1 for i in range(len(parts) - 2) if parts[i].startswith("job_")
                     and parts[i][4:].isdigit() and parts[i + 1].startswith("step_")), None)
        if step is None or os.path.dirname(d) != "/".join(parts[:step + 1 if version == 1 else step + 2]):
            continue  # not directly in a step
        top = step - 2 if version == 1 else step - 1  # uid_U (v1), job_J (v2)
        lock = None
        if version == 1:  # Slurm's root: <hierarchy>/slurm[_NODE]
            try:
                lock = os.open("/".join(parts[:step - 2]), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:
                pass
        try:
            for i in range(len(parts) - 1, top, -1):
                try:
                    os.rmdir("/".join(parts[:i]))
                except FileNotFoundError:
                    continue
                except OSError:
                    break
                trace("gc: Slurm's empty cgroup %s removed" % "/".join(parts[:i]))
        finally:
            if lock is not None:
                os.close(lock)


def cmd_gc(argv):
    p = _subparser("jrun gc", "Remove what jobs that died without cleanup left behind, and networks idle for "
                              "longer than network-idle; never touches a live job.  Safe to run at any time, "
                              "e.g. from cron.")
    p.add_argument("jobs", nargs="*", metavar="JOB", help="only these jobs' leftovers")
    p.add_argument("--slurm-job", metavar="N", help="only the leftovers of the jobs run under Slurm job N "
                   "(or array job N), and Slurm's cgroups they kept: for slurm.conf's Epilog=")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise UsageError("gc must run as root (try: sudo jrun gc)")
    if args.jobs or args.slurm_job is not None:
        ids = [check_name("gc: JOB", j) for j in args.jobs]
        if args.slurm_job is not None:
            if not args.slurm_job.isdigit():
                raise UsageError("gc: --slurm-job: %r is not a Slurm job id" % args.slurm_job)
            ids += [j for j in job_ids() if slurm_job_of(JobState(j).load(), args.slurm_job)]
        return 0 if gc_jobs(sorted(set(ids))) else 1
    for job_id in job_ids():
        gc_dead_job(job_id)
    for name in collect_orphans():
        log("info", "gc: removed orphan %s" % name)
    store = ImageStore.open()  # images stay; what dead imports and retired images left goes
    for entry in store.sweep() if store else ():
        log("info", "gc: removed %s/%s (%s)" % (HOST.image_dir, entry, "a replaced or removed image no job runs on "
                                                 "any more" if entry.startswith(".old-") else "an unfinished import"))
    return 0


# verify: the "Security & Isolation Verification" methodology as a command.
# Every check runs real jobs through this same jrun (a subprocess: truly
# black-box) and observes from inside and outside.  A check passes only if it
# saw the defence bite.  A job that jrun refuses (exit 125, e.g. an option
# this build does not implement) is a failure with jrun's own message: verify
# never passes by not looking.  A check the host cannot support at all (its
# cgroup controller is missing) is skipped with a warning: jrun refuses the
# corresponding option on such a host, so nothing is silently unenforced;
# skipped checks do not fail verify (exit 0 means: everything this host can
# enforce, jrun enforces).

VERIFY_CHECKS = []


def _verify_check(name):
    def register(fn):
        VERIFY_CHECKS.append((name, fn))
        return fn

    return register


class _Refused(Exception):
    """jrun refused a verification job (exit 125)."""


class _Skip(Exception):
    """This host cannot support what the check needs."""


class _Verifier:
    """Runs the verification jobs: this same jrun, as a subprocess."""

    def __init__(self, extra, config=None):
        self.base = [sys.executable, os.path.abspath(__file__)]
        if HOST.named:
            self.base += ["--config", HOST.config]
        self.extra = list(extra)  # the caller's run options win: they come last
        self.tag = os.urandom(3).hex()
        # What the caller's options (and the config file's defaults, which
        # every job gets too) promise: each check judges what it saw by it.
        self.spec = parse_run(self.extra + ["true"], config)

    def argv(self, opts, script, net_none=True, net=None):
        """NET, if given, is this job's network whatever the caller's."""
        command = list(script) if isinstance(script, (list, tuple)) else ["/bin/sh", "-c", script]
        extra = self.extra
        if net is not None:
            extra = [a for i, a in enumerate(extra) if not a.startswith("--net=") and a != "--net"
                     and (i == 0 or extra[i - 1] != "--net")]
            opts, net_none = ["--net", net] + list(opts), False
        return self.base + (["--net", "none"] if net_none else []) + list(opts) + extra + ["--"] + command

    def run(self, opts, script, net_none=True, timeout=60):
        import subprocess

        p = subprocess.run(self.argv(opts, script, net_none), stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, errors="replace", timeout=timeout)
        if p.returncode == EXIT_JRUN:
            raise _Refused(_last_message(p.stderr))
        return p

    def start(self, opts, script, net_none=True, net=None):
        """Start a job whose script prints 'ready' once running and then
        waits for stdin to close; returns (Popen, first lines before ready)."""
        import subprocess

        proc = subprocess.Popen(self.argv(opts, script, net_none, net), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
        lines = []
        for line in proc.stdout:
            if line.strip() == "ready":
                return proc, lines
            lines.append(line.strip())
        err = proc.stderr.read()
        proc.wait()
        if proc.returncode == EXIT_JRUN:
            raise _Refused(_last_message(err))
        raise AssertionError("the job ended before it was ready (exit %d): %s"
                             % (proc.returncode, _last_message(err) or " ".join(lines)))

    def stop(self, proc):
        try:
            proc.stdin.close()
            proc.wait(timeout=15)
        except Exception:  # noqa: BLE001 - a verification job must not outlive verify
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    def name(self, what):
        return "verify-%s-%s" % (what, self.tag)


def _last_message(stderr):
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    msg = lines[-1] if lines else ""
    return msg[6:] if msg.startswith("jrun: ") else msg


def _excerpt(text, n=90):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _proc_status(text):
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def verify_cgroup_host():
    """The controllers a job can use here, and a one-line description of
    the host's cgroup setup (from the cgroup section's CgroupHost)."""
    host = cgroup_host()
    have = host.controllers("")
    if host.version == 2:
        return have, "v2 (%s)" % " ".join(sorted(have))
    hybrid = os.path.exists(os.path.join(CGROUP_ROOT, "unified", "cgroup.controllers"))
    return have, "v1%s (%s)" % (" hybrid" if hybrid else "", " ".join(sorted(have)))


def _need_controller(*fields):
    """Skip the check if the host lacks the controller of a limit field."""
    have, mode = verify_cgroup_host()
    version = cgroup_host().version
    for field in fields:
        opt, v1, v2 = _LIMIT_CONTROLLERS[field]
        ctrl = v1 if version == 1 else v2
        if ctrl not in have:
            raise _Skip("this host has no %s cgroup controller (cgroup %s); jrun refuses %s here"
                        % (ctrl, mode, opt))


def _job_cgroup_dir(pid, field):
    """The host directory of PID's cgroup for a limit field's controller,
    read from /proc/PID/cgroup: where the kernel says the job is."""
    host = cgroup_host()
    with open("/proc/%d/cgroup" % pid) as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    if host.version == 2:
        path = next(p for h, _, p in lines if h == "0")
        return os.path.join(CGROUP_ROOT, path.lstrip("/"))
    ctrl = _LIMIT_CONTROLLERS[field][1]
    for _, ctrls, path in lines:
        if ctrl in ctrls.split(","):
            return os.path.join(host.mounts[ctrl][0], path.lstrip("/"))
    raise AssertionError("PID %d is in no %s cgroup" % (pid, ctrl))


# Each check below that depends on the run options is split in two: the
# check runs its job (observe), and a judge_* function, pure, decides from
# what the job printed and from v.spec, the JobSpec the caller's options
# make, what that mode promises.  The tests feed the judges recorded leaky
# observations, so a judge is known to fail on a real leak.

# The probe is the job's only process: a loop of shell builtins (no fork)
# that prints /proc/PID/stat of every process the job can see.
_PROC_PROBE = "cd /proc && for p in [0-9]*; do read -r s < $p/stat && echo \"$s\"; done"


@_verify_check("Process isolation")
def verify_processes(v):
    p = v.run([], ["/bin/sh", "-c", _PROC_PROBE])
    return judge_processes(v.spec, p.stdout)


def judge_processes(spec, out):
    """Without --init the probe is PID 1 and alone; with --init PID 1 is
    the init (tini, at /dev/init) and the probe its only child."""
    procs = []
    for line in out.splitlines():
        head, _, tail = line.rpartition(")")
        pid, _, comm = head.partition(" (")
        if pid.strip().isdigit() and len(tail.split()) > 1:
            procs.append((int(pid), comm, int(tail.split()[1])))
    procs.sort()
    ev = "processes in the job: %s" % ", ".join("PID %d %s (parent %d)" % p for p in procs)
    if spec.init:
        ok = len(procs) == 2 and procs[0] == (1, "init", 0) and procs[1][1:] == ("sh", 1)
        ev += " (--init: the init is PID 1, the probe its child)" if ok else ""
    else:
        ok = procs == [(1, "sh", 0)]
    return ok, ev, "the job sees processes that are not its own", \
        "the kernel must support PID namespaces (CONFIG_PID_NS)"


# The device nodes of the job's /dev (build_dev); init is there with --init.
_DEV_NODES = {"fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty",
              "urandom", "zero"}


# find without -xdev: a marker is looked for through every mount.
_FS_PROBE = ("ls -a /; echo ---; ls -a /dev; echo ---; find / \\( -path /proc -o -path /sys \\) -prune -o "
             "-name '%s' -print 2>/dev/null; echo ---; cat /etc/shadow 2>/dev/null; echo ---; "
             "for d in / /tmp " + DEFAULT_WORKDIR + "; do touch $d/.jrun-verify 2>/dev/null && echo $d; done; true")


@_verify_check("Filesystem isolation")
def verify_filesystem(v):
    marker = "jrun-verify-marker-" + os.urandom(6).hex()
    made = []
    try:
        for d in ("/tmp", "/root", "/home", "/var/tmp", HOST.state_dir):
            path = os.path.join(d, marker)
            try:
                with open(path, "x") as f:
                    f.write("host-secret\n")
                made.append(path)
            except OSError:
                pass
        p = v.run([], _FS_PROBE % marker)
    finally:
        for path in made:
            os.unlink(path)
    return judge_filesystem(v.spec, p.stdout, made, _read_text("/etc/shadow"))


def _root_entries(spec):
    """(what / must hold, what it may hold besides) for SPEC's root."""
    if spec.rootfs == "host":
        must = {n for n in HOST_SYSTEM_DIRS if os.path.lexists("/" + n)}
        own = must | {d for d, _ in HOST_ROOT_OWN_DIRS if "/" not in d}
    else:
        try:
            must = own = set(os.listdir(rootfs_path(spec)))
        except OSError:
            must = own = set()
    made = {"dev", "proc", "sys", "tmp", "etc"} | {p.strip("/").split("/")[0] for p in
                                                   [DEFAULT_WORKDIR, spec.workdir] + [x.dest for x in
                                                                                     spec.volumes + spec.uploads]}
    return must, own | made


def judge_filesystem(spec, out, markers, host_shadow):
    """/ holds the rootfs's files (minimal, PATH) or the host's system
    directories (host), jrun's mount points and the volumes; no host file
    is reachable but through a volume; the host's /etc/shadow never; /dev
    is jrun's few nodes; / is writable unless --read-only, /tmp and /work
    always (for root in the job: a --user may not write /)."""
    root, dev, found, shadow, writable = (out.split("---\n") + [""] * 5)[:5]
    top = set(root.split()) - {".", ".."}
    must, may = _root_entries(spec)
    problems = []
    if top - may:
        problems.append("/ holds %s, which is neither the rootfs's nor jrun's" % " ".join(sorted(top - may)))
    if must - top:
        problems.append("/ lacks %s of the rootfs" % " ".join(sorted(must - top)))
    names = {os.path.basename(m) for m in markers}
    leaks = [line for line in found.split() if os.path.basename(line) in names and not any(
        _under(line, x.dest) and os.path.normpath(os.path.join(x.src, os.path.relpath(line, x.dest))) in markers
        for x in spec.volumes)]
    if leaks:
        problems.append("host files READ BY THE JOB: %s" % " ".join(sorted(set(leaks))))
    if host_shadow.strip() and shadow.strip() == host_shadow.strip():
        problems.append("the host's /etc/shadow is READ BY THE JOB")
    extra_dev = set(dev.split()) - {".", ".."} - _DEV_NODES - ({"init"} if spec.init else set())
    if extra_dev:
        problems.append("/dev holds %s" % " ".join(sorted(extra_dev)))
    w = set(writable.split())
    want_w = {"/tmp", DEFAULT_WORKDIR}
    if not spec.read_only and not (spec.user and spec.user[0] not in ("0", "root")):
        want_w.add("/")
    if spec.read_only and "/" in w:
        problems.append("/ is writable despite --read-only")
    if want_w - w:
        problems.append("%s not writable" % " ".join(sorted(want_w - w)))
    ev = "ls -a /: %s; host markers in %s: %s; /etc/shadow: %s; writable: %s%s" % (
        " ".join(sorted(top)), " ".join(os.path.dirname(m) for m in markers),
        "READ" if leaks else "unreachable", "the host's" if "shadow" in " ".join(problems) else
        "absent" if not shadow.strip() else "the rootfs's own", " ".join(sorted(w)) or "nothing",
        ", / read-only (--read-only)" if spec.read_only and "/" not in w else "")
    return not problems, ev if not problems else "; ".join(problems), \
        "the job can see host files, or its root is not what --rootfs and --read-only promise", \
        "check --rootfs and -v/--volume options; the default rootfs must be built by 'jrun rootfs build'"


_MOUNT_PROBE = "cat /proc/self/mountinfo; echo ---; ls /proc"


@_verify_check("Mount isolation")
def verify_mounts(v):
    p = v.run([], _MOUNT_PROBE)
    return judge_mounts(v.spec, p.stdout, _read_text("/proc/self/mountinfo"))


def _mountinfo(text):
    """/proc/PID/mountinfo -> [(point, 'maj:min', per-mount options,
    optional fields, fstype, the line)]; octal escapes (\\040) undone."""
    out = []
    for line in text.strip().splitlines():
        pre, _, post = line.partition(" - ")
        f = pre.split()
        if len(f) < 6 or not post:
            continue
        point = f[4]
        for esc, ch in (("\\040", " "), ("\\011", "\\t"), ("\\012", "\\n"), ("\\134", "\\\\")):
            point = point.replace(esc, ch)
        out.append((point, f[2], set(f[5].split(",")), f[6:], post.split()[0], line))
    return out


def judge_mounts(spec, out, host_mountinfo):
    """No mount propagates to or from the host.  A filesystem of the host
    (its superblock, told by the device number) is mounted only where the
    options promise it, with the flags promised: the harmless device nodes
    and /proc masks (/dev/null), the job's cgroup read-only, /dev/init
    read-only (--init), each volume (read-only with :ro), and the host's
    system directories and part of /etc read-only (--rootfs host); all
    nosuid and nodev but the device nodes.  /proc is the job's own, /sys
    read-only, and no mount names jrun's state or rootfs directory."""
    mountinfo, _, procs = out.partition("---\n")
    mounts = _mountinfo(mountinfo)
    host_devs = {m[1] for m in _mountinfo(host_mountinfo)}
    nodes = {"/dev/" + n for n in ("null", "zero", "full", "random", "urandom", "tty")} | set(MASKED_FILES)
    # (where, the flags it must have, what promised it)
    promised = [("/sys/fs/cgroup", {"ro"}, None)] + ([("/dev/init", {"ro"}, "/dev/init read-only (--init)")]
                                                      if spec.init else [])
    promised += [(x.dest, {"nosuid", "nodev"} | ({"ro"} if x.read_only else set()),
                  "%s%s (-v)" % (x.dest, " read-only" if x.read_only else "")) for x in spec.volumes]
    system = ["/" + n for n in HOST_SYSTEM_DIRS if os.path.isdir("/" + n) and not os.path.islink("/" + n)]
    if spec.rootfs == "host":
        promised += [(d, {"ro", "nosuid", "nodev"}, "%s and part of /etc read-only (--rootfs host)" % " ".join(system))
                     for d in system + ["/etc"]]
    problems, seen, labels = [], [], []
    for point, dev, opts, optional, fstype, line in mounts:
        if any(o.startswith(("shared:", "master:")) for o in optional):
            problems.append("%s propagates to/from the host" % point)
        if (HOST.state_dir in line or HOST.rootfs_dir in line) and not any(_under(point, x.dest) for x in spec.volumes):
            problems.append("the mount at %s names jrun's %s or %s" % (point, HOST.state_dir, HOST.rootfs_dir))
        if dev not in host_devs or point in nodes:
            continue
        want = next(((w, label) for top, w, label in promised if _under(point, top)), None)
        if want is None:
            problems.append("host filesystem %s mounted at %s" % (dev, point))
        elif want[0] - opts:
            problems.append("%s is not %s" % (point, ",".join(sorted(want[0] - opts))))
        else:
            seen.append(point)
            if want[1] and want[1] not in labels:
                labels.append(want[1])
    points = {m[0]: m for m in mounts}
    missing = [d for d in (["/dev/init"] if spec.init else []) + [x.dest for x in spec.volumes]
               + (system if spec.rootfs == "host" else []) if d not in seen]
    if missing:
        problems.append("%s not mounted as promised" % " ".join(missing))
    if points.get("/proc", ("",) * 5)[4] != "proc":
        problems.append("/proc is not a fresh proc mount")
    pids = [int(x) for x in procs.split() if x.isdigit()]
    if not pids or max(pids) > 50:
        problems.append("/proc shows host PIDs")
    if "ro" not in points.get("/sys", ("", "", set()))[2]:
        problems.append("/sys is writable")
    ev = "%d mounts, none shared; of the host's: device nodes, the job's cgroup read-only%s; /proc: fresh " \
         "(PIDs %s); /sys: read-only" % (len(mounts), "".join(", " + x for x in labels),
                                         ",".join(map(str, sorted(pids)[:4])))
    return not problems, ev if not problems else "; ".join(problems), "the job's mounts are not private", \
        "run jrun as real root on a kernel with mount namespaces; do not bind host paths with -v"


def _node_state(path):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_mode, st.st_uid, st.st_gid, st.st_rdev


def _restore_node(path, state):
    """Put a host device node back as it was (mode, owner; made again if gone)."""
    mode, uid, gid, rdev = state
    if _node_state(path) is None:
        os.mknod(path, mode, rdev)
    os.chown(path, uid, gid, follow_symlinks=False)
    os.chmod(path, mode & 0o7777)


@_verify_check("Device nodes")
def verify_device_nodes(v):
    nodes = ["/dev/" + name for name, _, _ in DEV_NODES]
    before = {path: _node_state(path) for path in nodes}
    try:
        # Everything a job may try on its nodes and on the /proc files they
        # mask; the host's nodes must not change.
        p = v.run([], "for n in %s /proc/kcore /proc/keys /proc/timer_list; do chmod 600 $n; chown 1:1 $n; "
                  "rm -f $n; echo x > $n; done 2>/dev/null; ls -ln /dev/null" % " ".join(nodes))
    finally:
        changed = [path for path in nodes if _node_state(path) != before[path]]
        for path in changed:
            _restore_node(path, before[path])
    ev = "host /dev/{null..tty} %s by chmod, chown, rm in the job (saw %s)" % (
        "CHANGED (restored): " + " ".join(changed) if changed else "unchanged", (p.stdout.split() or ["?"])[0])
    if changed:
        return False, ev, "a job can change the host's device nodes", "use a jrun that makes the job's own nodes"
    o, _ = split_argv(v.extra)
    if o.get("user") not in (None, "0", "root"):
        return True, ev + "; mknod not tried (--user: no capabilities)", "", ""
    try:
        # /dev/mem (c 1:1) is on no allow-list: with MKNOD the job may not
        # even make it (and could not open it: every writable mount is nodev).
        p = v.run(["--cap-add", "MKNOD"], "mknod /tmp/mem c 1 1 2>&1 && echo MADE; "
                  "head -c 1 /tmp/mem >/dev/null 2>&1 && echo READ; true")
    except _Refused as e:
        if "MKNOD" not in str(e):
            raise
        return True, ev + "; no device allow-list here, so jrun refuses --cap-add MKNOD", "", ""
    made = "MADE" in p.stdout
    ev += "; MKNOD c 1:1: %s%s" % (
        "made" if made else _excerpt(p.stdout.split(":")[-1], 30) or "refused",
        ", READ" if "READ" in p.stdout else (", open refused" if made else ""))
    return not made and "READ" not in p.stdout, ev, "the job's cgroup has no device allow-list", \
        "mount the v1 devices controller, or use a kernel with CONFIG_CGROUP_BPF (cgroup v2)"
_NETNS_PROBE = "readlink /proc/self/ns/net; cat /proc/net/dev"


@_verify_check("Network namespace")
def verify_netns(v):
    p = v.run([], _NETNS_PROBE)
    # This job ran with --net none unless the caller's options said otherwise.
    net = split_argv(v.extra)[0].get("net", "none")
    return judge_netns(v.spec.replace(net=net), p.stdout, os.readlink("/proc/self/ns/net"))


def judge_netns(spec, out, host_ns):
    """Its own network namespace: lo only (--net none), else lo and eth0."""
    lines = out.strip().splitlines()
    ifaces = sorted(line.split(":")[0].strip() for line in lines[3:] if ":" in line)
    ns = lines[0] if lines else ""
    want = ["lo"] if spec.net == "none" else ["eth0", "lo"]
    ok = ns.startswith("net:") and ns != host_ns and ifaces == want
    return ok, "job %s vs host %s; interfaces with --net %s: %s" % (ns, host_ns, spec.net, " ".join(ifaces)), \
        "the job shares the host's network namespace" if ns == host_ns else \
        "the job's network is not what --net promises", "the kernel must support network namespaces"


_NET_PROBE = ("ip -4 addr show dev eth0 2>&1 | grep -o 'inet [0-9./]*'; "
              "cat /sys/class/net/eth0/operstate 2>&1; ip -4 route 2>&1 | grep -o 'default via [0-9.]*'")


def _need_network(v):
    o, _ = split_argv(v.extra)
    if o.get("net") == "none":
        raise _Skip("the jobs run with --net none: no network to check")


@_verify_check("Network readiness")
def verify_net_ready(v):
    _need_network(v)
    # The probe is the job's first instruction: no polling, no sleep.
    p = v.run([], _NET_PROBE, net_none=False)
    out = " ".join(p.stdout.split())
    ok = "inet " in out and " up" in " " + out and "default via" in out
    return ok, "first instruction sees: %s" % (out or p.stderr.strip()), \
        "the job's network was not ready when COMMAND started", \
        "see the network section of jrun(8): the bridge and NAT need iproute2 and nftables"


@_verify_check("Network isolation")
def verify_net_isolation(v):
    import socket

    _need_network(v)
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    serve = ("ip -4 addr show dev eth0 | grep -o 'inet [0-9.]*'; echo ready; %snc -l -p 7777 </dev/null & read x"
             % _NC)
    jobs = []
    try:
        # A job of the same network, and under --net NAME one of another
        # (the default bridge): the first is reachable only on a named network.
        for what, net in [("neta", None)] + ([("netc", "bridge")] if v.spec.net != "bridge" else []):
            jobs.append(v.start(["--name", v.name(what)], serve, net_none=False, net=net))
        addrs = [" ".join(lines).replace("inet ", "").strip() for _, lines in jobs]
        probes = [("HOST", "$gw", port), ("HOST-LOOPBACK", "127.0.0.1", port), ("JOB", addrs[0], 7777)]
        probes += [("OTHER-NET-JOB", addrs[1], 7777)] if len(addrs) > 1 else []
        # The probes run at once (a dropped SYN costs nc its whole -w 2);
        # the job's own loopback shows that nc works at all.
        script = ("%sgw=$(ip -4 route | grep -o 'default via [0-9.]*' | cut -d' ' -f3); echo gw=$gw; "
                  "%s wait; nc -l -p 7778 </dev/null & for i in 1 2 3 4 5 6 7 8 9 10; do "
                  "nc -w 1 127.0.0.1 7778 </dev/null && echo SELF-REACHED && break; sleep 0.1; done; wait"
                  % (_NC, " ".join("(nc -w 2 %s %d </dev/null && echo %s-REACHED) &" % (a, p, w)
                                   for w, a, p in probes)))
        p = v.run([], script, net_none=False)
    finally:
        for proc, _ in jobs:
            v.stop(proc)
        listener.close()
    return judge_net_isolation(v.spec, p.stdout, port, addrs)


# nc as the job's root has it, else busybox's (a --rootfs host without netcat).
_NC = "command -v nc >/dev/null || nc() { busybox nc \"$@\"; }; "


def judge_net_isolation(spec, out, port, addrs):
    """Nothing of the host is reachable; another job is only on a named
    network, and there only one of the same network."""
    reached = {w[:-len("-REACHED")] for w in out.split() if w.endswith("-REACHED")}
    gw = out.split("gw=", 1)[1].split()[0] if "gw=" in out and out.split("gw=", 1)[1].split() else ""
    named = spec.net != "bridge"
    leaks = sorted(reached & {"HOST", "HOST-LOOPBACK", "OTHER-NET-JOB"} | (reached & {"JOB"} if not named else set()))
    problems = ["REACHED " + w.lower().replace("-", " ") for w in leaks]
    if named and "JOB" not in reached:
        problems.append("a job of network %s cannot reach another of it" % spec.net)
    if "SELF" not in reached or not gw or not all(addrs):
        problems.append("the check could not run (no nc in the job's root, no address or no route)")
    ev = "host port %d via %s: %s; a job of %s at %s:7777: %s%s" % (
        port, gw or "?", "REACHED" if "HOST" in reached else "refused",
        "the same network" if named else "the default bridge", addrs[0] or "?",
        "reached (--net %s: its jobs talk)" % spec.net if named and "JOB" in reached else
        "REACHED" if "JOB" in reached else "refused",
        "; a job of the default bridge at %s: %s" % (addrs[1], "REACHED" if "OTHER-NET-JOB" in reached
                                                   else "refused") if named else "")
    return not problems, ev if not problems else "; ".join(problems) + " (%s)" % ev, \
        "a job can reach the host's services or a job of another network" if leaks else \
        "the job's network is not what --net promises", \
        "the jrun bridge's nftables rules must be in place (jrun gc; rerun)"


@_verify_check("Firewall")
def verify_firewall(v):
    _need_network(v)
    allow = HOST.allow_link_local
    # While a networked job runs: jrun's own per-job check of the table,
    # where its chains hook in (read from the kernel), and the check and
    # restore seen at work on a copy of the table in a scratch namespace.
    proc, _ = v.start([], "echo ready; read x", net_none=False)
    try:
        nets = _nft_networks()
        damage = _nft_damage(nets, allow) if nets else "missing (no network recorded in %s)" % NET_DIR
        hooks = _nft_hooks()
        found, after = _verify_restoration(nets, allow) if nets else (None, None)
    finally:
        v.stop(proc)
    want = {"prerouting": 0, "input": 1, "forward": 2, "postrouting": 4}  # NF_INET_PRE_ROUTING, ...
    hooked = [c for c, n in want.items() if hooks.get(c, (None,))[0] == n]
    prio = hooks.get("prerouting", (None, None))[1]
    before_dnat = prio is not None and prio < -100  # NF_IP_PRI_NAT_DST
    ev = "%s %s while a job ran: %s; prerouting at %s, %s DNAT" % (
        NFT_TABLE, damage or "current", " ".join(hooked) or "no chains", prio, "before" if before_dnat else "NOT before")
    if damage or len(hooked) != len(want) or not before_dnat:
        return False, ev, "jrun's firewall is not in place while a job runs", \
            "see jrun(8), NETWORK: nftables with the fib expression (nft_fib_inet); then rerun"
    ev += "; a copy missing a chain: %s" % ("NOT noticed" if not found else after or "restored")
    return bool(found) and after is None, ev, "jrun does not notice or restore a damaged table", \
        "run tests/test_integrity_net.py to see where"


def _verify_restoration(nets, allow):
    """jrun's table for nets in a network namespace of its own, entered for
    a moment (the host's ruleset is never touched), its prerouting chain
    deleted, then the per-job check and restore.  Returns (what the check
    found, what is still wrong afterwards)."""
    host = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        unshare(CLONE_NEWNET)
        _run_nft(nft_ruleset(nets, allow))
        _run_nft("delete chain %s prerouting\n" % NFT_TABLE)
        found = _restore_nft(quiet=True)
        return found, _nft_damage(_nft_networks(), allow)
    finally:
        setns(host, CLONE_NEWNET)
        os.close(host)


@_verify_check("Memory limit")
def verify_memory(v):
    _need_controller("memory")
    # dd is PID 1: its OOM kill is the job's end, and jrun's status.
    p = v.run(["--memory", "32M"], ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"])
    ok = p.returncode == 137
    msg = _last_message(p.stderr)
    return ok, "dd with a 64 MiB buffer under --memory 32M: exit %d%s" % (
        p.returncode, " (%s)" % msg if msg else ""), \
        "the job used more memory than its limit", \
        "enable the memory controller (cgroup_enable=memory on the kernel command line)"


@_verify_check("PIDs limit")
def verify_pids(v):
    _need_controller("pids")
    # The forks happen in a subshell, because ash exits when a fork fails;
    # the count uses only builtins, because no fork is left.
    p = v.run(["--pids", "8"], "(for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do "
                              "sleep 5 & done) 2>/dev/null; set -- /proc/[0-9]*; echo procs=$#")
    n = int(p.stdout.split("procs=")[1].split()[0]) if "procs=" in p.stdout else -1
    ok = 0 < n <= 8
    return ok, "20 background forks under --pids 8: %d processes in the job" % n, \
        "the job created more processes than its limit", "enable the pids cgroup controller"


@_verify_check("CPU limit")
def verify_cpu(v):
    _need_controller("cpu")
    p = v.run(["--cpu", "20", "--timeout", "30"],
              "while :; do :; done & b=$!; sleep 2; read -r l < /proc/$b/stat; kill $b; echo \"$l\"")
    try:
        fields = p.stdout.rsplit(")", 1)[1].split()
        used = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError):
        return False, "could not read the busy loop's CPU time: %s" % _excerpt(p.stdout + p.stderr), \
            "the check could not run", "see the output of jrun --cpu 20 -- sh"
    pct = used / 2 * 100
    ok = 0 < pct <= 20 * 1.5
    return ok, "busy loop for 2 s under --cpu 20: %.0f%% of one CPU" % pct, \
        "the job used more CPU than its limit", "enable the cpu cgroup controller (CFS bandwidth control)"


@_verify_check("cgroup membership")
def verify_cgroup_membership(v):
    _need_controller("memory", "pids", "cpu")
    try:  # the cpuset is checked where the host has one (a UML guest has not)
        _need_controller("cores")
        cores = ["--cores", "0"]
    except _Skip:
        cores = []
    name = v.name("cg")
    proc, _ = v.start(["--name", name, "--memory", "48M", "--pids", "32", "--cpu", "50"] + cores,
                      "echo ready; read x")
    try:
        job = next((j for j in running_jobs() if j["id"] == name), None)
        if job is None:
            return False, "job %s not listed by jrun ps" % name, "jrun's state is inconsistent", "run jrun gc"
        pid = job["pid"]
        seen, problems = [], []
        for ctrl, files, want in (
                ("memory", ("memory.limit_in_bytes", "memory.max"), lambda t: t == str(48 << 20)),
                ("pids", ("pids.max",), lambda t: t == "32"),
                ("cpu", ("cpu.cfs_quota_us", "cpu.max"),
                 lambda t: t.split()[0] in ("50000",) or t == "50000 100000")):
            d = _job_cgroup_dir(pid, ctrl)
            if name not in d:
                problems.append("%s cgroup %s is not the job's" % (ctrl, d))
            if str(pid) not in _read(os.path.join(d, "cgroup.procs"), "").split():
                problems.append("PID %d is not in %s" % (pid, d))
            f = next((os.path.join(d, x) for x in files if os.path.exists(os.path.join(d, x))), None)
            value = _read(f, "?").strip() if f else "?"
            if not want(value):
                problems.append("%s = %s" % (f or ctrl, value))
            seen.append("%s=%s" % (os.path.basename(f or ctrl), value))
        with open("/proc/%d/status" % pid) as f:
            cpus = _proc_status(f.read()).get("Cpus_allowed_list", "?").strip()
        if cores and cpus != "0":
            problems.append("Cpus_allowed_list = %s (wanted 0)" % cpus)
        ev = "PID %d in %s: %s, cpus=%s" % (pid, _job_cgroup_dir(pid, "pids"),
                                             " ".join(seen), cpus)
    finally:
        v.stop(proc)
    return not problems, ev if not problems else "; ".join(problems), \
        "the job is not in its own cgroup with its limits", "check --cgroup-parent and the cgroup mounts"


@_verify_check("I/O limit")
def verify_io(v):
    _need_controller("io_bps")
    if not block_devices(io_paths(v.spec)):
        raise _Skip("the job's files (%s) are on no block device; jrun refuses --io-bps here"
                    % " ".join(io_paths(v.spec)))
    name = v.name("io")
    proc, _ = v.start(["--name", name, "--io-bps", "1M"], "echo ready; read x")
    try:
        job = next((j for j in running_jobs() if j["id"] == name), None)
        d = _job_cgroup_dir(job["pid"], "io_bps")
        files = [f for f in ("blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device", "io.max")
                 if os.path.exists(os.path.join(d, f))]
        text = " ".join(_read(os.path.join(d, f), "").strip() for f in files)
    finally:
        v.stop(proc)
    # Every disk that holds the job's files (the rootfs's or, under --rootfs
    # host, the host's system directories'; the volumes') is throttled.
    ok = name in d and all("%s %d" % (dev, 1 << 20) in text or "%s rbps=%d" % (dev, 1 << 20) in text
                           for dev in block_devices(io_paths(v.spec)))
    return ok, "%s: %s" % (" ".join(files) or "no io files", _excerpt(text or "empty")), \
        "the job's block I/O is not throttled", "enable the blkio (v1) or io (v2) controller"


@_verify_check("Upload isolation")
def verify_upload(v):
    import tempfile

    with tempfile.TemporaryDirectory(prefix="jrun-verify-") as d:
        token = os.urandom(8).hex()
        with open(os.path.join(d, "in.txt"), "w") as f:
            f.write(token + "\n")
        with open(os.path.join(d, "sibling.txt"), "w") as f:
            f.write("sibling-secret\n")
        # An absolute DEST on the job's own /tmp: whatever -w and -v say.
        p = v.run(["--upload", os.path.join(d, "in.txt") + ":/tmp/jrun-verify/in.txt"],
                  "cat /tmp/jrun-verify/in.txt; echo changed > /tmp/jrun-verify/in.txt; cat %s/sibling.txt "
                  "2>/dev/null; find / -xdev -name sibling.txt 2>/dev/null; true" % d)
        with open(os.path.join(d, "in.txt")) as f:
            after = f.read().strip()
    ok = token in p.stdout and after == token and "sibling" not in p.stdout
    ev = "uploaded file %s in the job; host copy %s after the job wrote to it; sibling %s" % (
        "seen" if token in p.stdout else "MISSING", "unchanged" if after == token else "CHANGED",
        "READ" if "sibling" in p.stdout else "unreachable")
    return ok, ev, "an upload exposed or changed host files", "uploads must be copies, not binds"


@_verify_check("Stdio")
def verify_stdio(v):
    """A job whose stdout is a host file holds a pipe that jrun relays, not
    the file: a chmod through /proc/self/fd/1 (as root inside) cannot
    reach it."""
    import stat
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="jrun-verify-") as d:
        path = os.path.join(d, "stdout")
        with open(path, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            # $$: the shell's own fds (busybox runs readlink and chmod inside
            # the shell, with their redirections).
            p = subprocess.run(v.argv([], "echo written; held=$(readlink /proc/$$/fd/1); echo $held >&2; "
                                          "chmod 4755 /proc/$$/fd/1 && echo chmod-ran >&2; true"),
                               stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.PIPE, text=True, timeout=60)
        if p.returncode == EXIT_JRUN:
            raise _Refused(_last_message(p.stderr))
        mode = stat.S_IMODE(os.stat(path).st_mode)
        with open(path) as f:
            text = f.read()
    held = next((x for x in p.stderr.splitlines() if x.startswith(("pipe:", "/"))), "?")
    ok = mode == 0o644 and text == "written\n" and held.startswith("pipe:")
    ev = "stdout a host file: the job holds %s; chmod 4755 through /proc %s; host file mode %o, content %s" % (
        held, "ran" if "chmod-ran" in p.stderr else "refused", mode, "as written" if text == "written\n" else "WRONG")
    return ok, ev, "the job holds the caller's file itself: as root it can make it setuid or rewrite it", \
        "use a jrun that relays stdio through pipes (this one should: report a bug)"


_DANGEROUS_CAPS = {21: "SYS_ADMIN", 16: "SYS_MODULE", 17: "SYS_RAWIO", 19: "SYS_PTRACE", 22: "SYS_BOOT",
                   25: "SYS_TIME", 12: "NET_ADMIN", 33: "MAC_ADMIN", 32: "MAC_OVERRIDE", 38: "PERFMON",
                   39: "BPF", 34: "SYSLOG", 24: "SYS_RESOURCE", 2: "DAC_READ_SEARCH"}


def _job_status(v, probe=""):
    """The job's /proc/self/status, and the stderr of PROBE run after it."""
    p = v.run([], "cat /proc/self/status; echo ---; %s" % (probe or "true"))
    status, _, rest = p.stdout.partition("---\n")
    return _proc_status(status), (rest + p.stderr).strip()


# sethostname in the job's own UTS namespace needs CAP_SYS_ADMIN and nothing
# else (the syscall filter allows it): it must fail.
_CAPS_PROBE = "cat /proc/self/uid_map; hostname verify-caps 2>&1 && echo SETHOSTNAME-ALLOWED"


@_verify_check("Capabilities")
def verify_caps(v):
    st, probe = _job_status(v, _CAPS_PROBE)
    return judge_caps(v.spec, st, probe)


def judge_caps(spec, st, probe):
    """Root in the job holds exactly job_capabilities(spec) (effective,
    permitted, bounding), a -u/--user that is not root none at all, nobody
    an inheritable or ambient one; none of the dangerous ones in any case
    (a --cap-add of one is the defence turned off), so sethostname fails.
    Under --userns root in the job is an unprivileged host uid (uid_map)."""
    sets = {k: int(st.get(k, "0").strip() or "0", 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    uid = int((st.get("Uid", "-1").split() or ["-1"])[0])
    want = job_capabilities(spec) if uid == 0 else frozenset()
    mask = sum(1 << CAPABILITIES.index(c) for c in want)
    held = [n for bit, n in sorted(_DANGEROUS_CAPS.items()) if (sets["CapEff"] | sets["CapBnd"]) >> bit & 1]
    umap = (probe.split("\n", 1)[0].split() + ["", "", ""])[:3]
    host_uid = int(umap[1]) if umap[0] == "0" and umap[1].isdigit() else None
    allowed = "SETHOSTNAME-ALLOWED" in probe
    problems = ["%s=%x, not the promised %x" % (k, sets[k], mask) for k in ("CapPrm", "CapEff", "CapBnd")
                if sets[k] != mask] + ["%s=%x" % (k, sets[k]) for k in ("CapInh", "CapAmb") if sets[k]]
    if spec.userns and not (host_uid is not None and host_uid >= USERNS_BASE and umap[2] == str(USERNS_SIZE)):
        problems.append("--userns: uid_map is %r, not the job's own unprivileged range" % " ".join(umap))
    ev = "uid %d%s; CapEff=%s CapBnd=%s (%s)%s; sethostname: %s" % (
        uid, " (host uid %s: --userns)" % (host_uid + uid if host_uid is not None else "?") if spec.userns else "",
        st.get("CapEff", "?").strip(), st.get("CapBnd", "?").strip(),
        "none: -u/--user" if uid and not want else "the default set" if want == DEFAULT_CAPS else
        "the set --cap-add/--cap-drop ask for",
        "; holds " + ",".join(held) if held else "; none of " + ",".join(sorted(_DANGEROUS_CAPS.values())[:4])
        + ",...", "ALLOWED" if allowed else _excerpt(probe.splitlines()[-1].split(":")[-1], 30) or "refused")
    if problems:
        ev += "; " + "; ".join(problems)
    return not held and not allowed and not problems, ev, \
        "the job keeps capabilities that give root over the host" if held or allowed else \
        "the job's capabilities or user are not what its options promise", \
        "do not pass --cap-add for these; use a jrun that drops capabilities"


@_verify_check("no_new_privs")
def verify_nnp(v):
    st, _ = _job_status(v)
    value = st.get("NoNewPrivs", "?").strip()
    return value == "1", "NoNewPrivs: %s" % value, "setuid programs in the job could gain privileges", \
        "use a jrun that sets PR_SET_NO_NEW_PRIVS"


@_verify_check("Seccomp")
def verify_seccomp(v):
    # unshare(CLONE_NEWUSER) needs no capability: only the filter stops it.
    st, probe = _job_status(v, "unshare -U true 2>&1 && echo UNSHARE-ALLOWED")
    mode = st.get("Seccomp", "?").strip()
    filters = st.get("Seccomp_filters", "").strip()
    bit = "UNSHARE-ALLOWED" not in probe
    ev = "Seccomp: %s%s; unshare(CLONE_NEWUSER): %s" % (
        mode, " (%s filter(s))" % filters if filters else "",
        _excerpt(probe.split(":")[-1], 30) if bit else "ALLOWED")
    if mode != "2":
        return False, ev, "the job runs without a syscall filter", \
            "do not pass --seccomp unconfined; the kernel needs CONFIG_SECCOMP_FILTER"
    return bit, ev, "the syscall filter lets the job create namespaces (relaxed for CAP_SYS_ADMIN, as docker's is)", \
        "do not pass --cap-add SYS_ADMIN"


def run_verification(extra, config=None):
    v = _Verifier(extra, config)
    results = []
    for name, fn in VERIFY_CHECKS:
        r = {"name": name}
        try:
            ok, evidence, why, fix = fn(v)
            r.update(status="pass" if ok else "fail", evidence=_excerpt(evidence, 160))
            if not ok:
                r.update(why=why, fix=fix)
        except _Skip as e:
            r.update(status="skip", evidence="", why=str(e))
        except _Refused as e:
            r.update(status="fail", evidence=_excerpt(str(e), 160), why="jrun refused the check's job",
                     fix="see the message")
        except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
            r.update(status="fail", evidence=_excerpt("%s: %s" % (type(e).__name__, e), 160),
                     why="the check could not run", fix="run the check's job by hand with --log-level debug")
        results.append(r)
    return results


def cmd_verify(argv, config=None):
    if argv[:1] in (["-h"], ["--help"]):
        sys.stdout.write("usage: jrun verify [--json] [RUN OPTIONS]\n\nRun the isolation self-test on this "
                         "host as real jobs and print the verification report.\nRUN OPTIONS are added to "
                         "every check's job (e.g. --seccomp unconfined, to see a check fail).\n")
        return 0
    as_json = "--json" in argv
    extra = [a for a in argv if a != "--json"]
    _, command = split_argv(extra)
    if command:
        raise UsageError("verify: unexpected argument %r (usage: jrun verify [--json] [RUN OPTIONS])" % command[0])
    parse_run(extra + ["true"])  # a bad value is one message, not fifteen failed checks
    if os.geteuid() != 0:
        raise UsageError("verify must run as root (try: sudo jrun verify)")
    u = os.uname()
    _, mode = verify_cgroup_host()
    host = {"kernel": u.release, "machine": u.machine, "cgroup": mode, "jrun": __version__,
            "extra_options": extra}
    results = run_verification(extra, config)
    counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "skip")}
    if as_json:
        import json

        json.dump({"host": host, "checks": results, "counts": counts, "ok": counts["fail"] == 0},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        out = ["Security & Isolation Verification: jrun %s on Linux %s %s, cgroup %s" % (
            __version__, u.release, u.machine, mode)]
        if extra:
            out.append("(every job ran with: %s)" % " ".join(extra))
        icon = {"pass": "\u2705", "fail": "\u274c", "skip": "\u26a0\ufe0f"}
        for r in results:
            out.append("%s %-20s %s" % (icon[r["status"]], r["name"], r["evidence"] or "skipped"))
            if r["status"] != "pass":
                out.append("   %-20s why: %s" % ("", r["why"]))
            if r.get("fix"):
                out.append("   %-20s fix: %s" % ("", r["fix"]))
        out.append("%d checks: %d passed, %d failed, %d skipped"
                   % (len(results), counts["pass"], counts["fail"], counts["skip"]))
        sys.stdout.write("\n".join(out) + "\n")
    return 0 if counts["fail"] == 0 else 1


# Shell completion (argcomplete).  main() comes here only when the shell's
# completion hook set _ARGCOMPLETE, so normal runs never import argparse.


def network_names():
    """bridge, none and the named networks that exist now."""
    names = {"bridge", "none"}
    # /run/jrun/.net/jrun*: one file per network, with a line 'name NAME'.
    try:
        files = [f for f in os.listdir(NET_DIR) if f.startswith("jrun") and "." not in f]
    except OSError:
        files = []
    for f in files:
        try:
            with open(os.path.join(NET_DIR, f), encoding="utf-8") as fh:
                names.update(w[1] for w in (line.split() for line in fh) if w[:1] == ["name"] and len(w) == 2)
        except OSError:
            pass
    return sorted(names)


def _capability_names():
    try:
        import prctl

        return ["ALL"] + [n.upper() for n in prctl.ALL_CAP_NAMES]
    except ImportError:
        return ["ALL"]


def _add_run_options(parser):
    from argcomplete.completers import DirectoriesCompleter, FilesCompleter

    completers = {
        "--net": lambda **kw: network_names(),
        "--rootfs": lambda prefix, **kw: ["minimal", "host"] + image_names() + list(DirectoriesCompleter()(prefix)),
        "--cap-add": lambda **kw: _capability_names()[1:], "--cap-drop": lambda **kw: _capability_names(),
        "--upload": FilesCompleter(), "--env-file": FilesCompleter(), "--json-status": FilesCompleter(),
        "--workdir": lambda **kw: [], "--cgroup-parent": lambda **kw: [],
    }
    for o in RUN_OPTIONS:
        flags = [o.long] + ([o.short] if o.short else [])
        helptext = o.help.replace("%", "%%")  # argparse formats help with %
        if o.long in FLAG_OPTIONS:
            action = parser.add_argument(*flags, action="store_true", help=helptext)
        else:
            action = parser.add_argument(*flags, metavar=o.metavar, help=helptext, choices=o.choices,
                                         action="append" if o.repeat else "store")
        if o.long in completers:
            action.completer = completers[o.long]


def completion_parser():
    """An argparse mirror of jrun's command line, for argcomplete only."""
    import argparse

    from argcomplete.completers import FilesCompleter

    p = argparse.ArgumentParser(prog="jrun")
    p.add_argument("--config", metavar="FILE", help="read host defaults from FILE instead of %s" % CONFIG_FILE)
    p.add_argument("--version", action="store_true", help="print the version and exit")
    _add_run_options(p)
    sub = p.add_subparsers(dest="subcommand")
    _add_run_options(sub.add_parser("run", help="run COMMAND isolated (the default)"))
    ps = sub.add_parser("ps", help="the jobs running now")
    ps.add_argument("--json", action="store_true")
    ps.add_argument("--all", action="store_true")
    kill = sub.add_parser("kill", help="signal a running job")
    kill.add_argument("-s", "--signal", choices=[s.name[3:] for s in _signal_names() if s.name.startswith("SIG")
                                                 and not s.name.startswith(("SIGRT", "SIG_"))])
    kill.add_argument("job").completer = lambda **kw: [j["id"] for j in running_jobs()]
    gc = sub.add_parser("gc", help="remove what dead jobs left behind")
    gc.add_argument("jobs", metavar="JOB", nargs="*").completer = lambda **kw: [j["id"] for j in dead_jobs(())]
    gc.add_argument("--slurm-job", metavar="N")
    verify = sub.add_parser("verify", help="run the isolation self-test")
    verify.add_argument("--json", action="store_true")
    _add_run_options(verify)
    rootfs = sub.add_parser("rootfs", help="the minimal rootfs; imported images").add_subparsers(dest="action")
    rootfs.add_parser("build", help="build the minimal rootfs").add_argument("--force", action="store_true")
    rootfs.add_parser("path", help="print the minimal rootfs's path")
    imp = rootfs.add_parser("import", help="import an image as NAME")
    imp.add_argument("name", metavar="NAME").completer = lambda **kw: image_names()
    imp.add_argument("source", metavar="FILE|DIR").completer = FilesCompleter()
    imp.add_argument("--platform", metavar="OS/ARCH[/VARIANT]")
    imp.add_argument("--force", action="store_true")
    imp.add_argument("--max-size", metavar="SIZE")
    imp.add_argument("--max-files", metavar="N")
    rootfs.add_parser("ls", help="list the imported images").add_argument("--json", action="store_true")
    rm = rootfs.add_parser("rm", help="remove imported images")
    rm.add_argument("names", metavar="NAME", nargs="+").completer = lambda **kw: image_names()
    return p


def complete():
    import argcomplete

    argcomplete.autocomplete(completion_parser())
    return 0  # not reached: autocomplete() exits


ROOTFS_USAGE = ("usage: jrun rootfs build [--force] | rootfs path | rootfs import NAME FILE|DIR [--platform "
                "OS/ARCH[/VARIANT]] [--force] [--max-size SIZE] [--max-files N] | rootfs ls [--json] | rootfs rm "
                "NAME...")


def cmd_rootfs(argv):
    action = argv[0] if argv else ""
    if action in ("import", "ls", "rm"):
        return {"import": cmd_rootfs_import, "ls": cmd_rootfs_ls, "rm": cmd_rootfs_rm}[action](argv[1:])
    if argv == ["path"]:
        sys.stdout.write(HOST.rootfs_dir + "\n")
        return 0
    if action == "build" and set(argv[1:]) <= {"--force"}:
        return build_rootfs(force="--force" in argv)
    raise UsageError(ROOTFS_USAGE)


def _import_interrupted(signum, frame):
    raise SetupError("interrupted by %s; nothing was imported" % signal_name(signum))


def cmd_rootfs_import(argv):
    p = _subparser("jrun rootfs import", "Import an image as NAME, for jrun --rootfs NAME: a docker-archive "
                   "(docker save, podman save), an OCI image layout directory or oci-archive (skopeo, buildah), "
                   "or a plain rootfs tarball (.tar, .tar.gz, .tar.xz, .tar.zst).")
    p.add_argument("name", metavar="NAME", help="the image's name: letters, digits, '_', '.', '-'")
    p.add_argument("source", metavar="FILE|DIR", help="the archive, tarball or OCI layout directory")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="the image to take from a multi-platform "
                   "archive (default: this host's, %s)" % platform_text(parse_platform(None)))
    p.add_argument("--force", action="store_true", help="replace an existing image NAME")
    p.add_argument("--max-size", metavar="SIZE", default=IMAGE_MAX_SIZE,
                   help="refuse an image with more bytes of files (default %s)" % IMAGE_MAX_SIZE)
    p.add_argument("--max-files", metavar="N", default=str(IMAGE_MAX_FILES),
                   help="refuse an image with more entries (default %d)" % IMAGE_MAX_FILES)
    a = p.parse_args(argv)
    try:
        name = check_image_name("NAME", a.name)
        want = parse_platform(a.platform)
        bounds = Bounds(parse_size("--max-size", a.max_size), parse_int("--max-files", a.max_files, 1))
    except UsageError as e:
        raise UsageError("rootfs import: %s" % e) from None
    if os.geteuid() != 0:
        raise UsageError("rootfs import must run as root (try: sudo jrun rootfs import ...)")
    # A signal must not leave half an import behind: it ends the import
    # through its cleanup.
    handlers = {s: signal.signal(s, _import_interrupted) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        import_image(name, os.path.abspath(a.source), want, a.force, bounds)
    except JrunError as e:
        raise type(e)("rootfs import: %s: %s" % (a.source, e)) from None
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return 0


def image_records():
    """image.json of every image (root's: an image's Env may hold secrets)."""
    import json

    out = []
    for name in image_names():
        try:
            with open(os.path.join(HOST.image_dir, name, "image.json"), encoding="utf-8") as f:
                out.append(json.load(f))
        except PermissionError:
            raise UsageError("rootfs ls: cannot read %s: permission denied (run as root)" % HOST.image_dir) from None
        except (OSError, ValueError):
            log("warning", "rootfs ls: image %s has no readable image.json (import it again)" % name)
    return out


def cmd_rootfs_ls(argv):
    p = _subparser("jrun rootfs ls", "List the imported images (jrun --rootfs NAME runs on them).")
    p.add_argument("--json", action="store_true", help="print a JSON array of the images' records")
    args = p.parse_args(argv)
    records = image_records()
    if args.json:
        sys.stdout.write(dumps_json(records) + "\n")
        return 0
    rows = [("NAME", "PLATFORM", "SIZE", "FILES", "IMPORTED", "FROM", "COMMAND")]
    for r in records:
        cfg = r.get("config") or {}
        origin = r.get("ref") or os.path.basename(r.get("source") or "-")
        rows.append((r.get("name", "?"), r.get("platform") or "-", fmt_size(r.get("size") or 0).replace(" ", ""),
                     format(r.get("files") or 0, ","), (r.get("imported") or "-")[:16].replace("T", " "),
                     "%s (%s)" % (origin, r.get("format")),
                     " ".join((cfg.get("Entrypoint") or []) + (cfg.get("Cmd") or [])) or "-"))
    _print_table(rows)
    return 0


def cmd_rootfs_rm(argv):
    p = _subparser("jrun rootfs rm", "Remove imported images.  A job running on one keeps its files until "
                                     "it ends.")
    p.add_argument("names", metavar="NAME", nargs="+")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise UsageError("rootfs rm must run as root (try: sudo jrun rootfs rm ...)")
    for name in args.names:
        remove_image(check_image_name("rootfs rm", name))
    return 0


def _skel_dir():
    """The rootfs skeleton: beside jrun.py in a checkout, else in share/jrun
    of the prefix jrun is installed in (pip's data files).  That prefix is
    found from jrun.py's own place, PREFIX/lib/pythonX.Y/site-packages: the
    -IS launcher skips the site module, which is what makes sys.prefix a
    virtualenv's."""
    here = os.path.dirname(os.path.abspath(__file__))
    prefixes = (os.path.dirname(os.path.dirname(os.path.dirname(here))), sys.prefix)
    for d in [os.path.join(here, "rootfs", "skel")] + [os.path.join(p, "share", "jrun", "rootfs", "skel")
                                                       for p in prefixes]:
        if os.path.isdir(d):
            return d
    raise SetupError("rootfs skeleton not found next to %s or in %s" % (
        __file__, " or ".join(os.path.join(p, "share", "jrun") for p in prefixes)))


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


def rootfs_stamp():
    """Where build_rootfs notes what it built: beside the rootfs."""
    return HOST.rootfs_dir.rstrip("/") + ".stamp"


def build_rootfs(force=False):
    """The recipe of the default minimal rootfs (see rootfs/README.md)."""
    import shutil
    import subprocess

    if os.geteuid() != 0:
        raise UsageError("rootfs build must run as root")
    if os.path.isfile(os.path.join(HOST.rootfs_dir, "bin/busybox")) and not force:
        log("info", "rootfs already built at %s (use --force to rebuild)" % HOST.rootfs_dir)
        return 0
    if not os.path.isfile(BUSYBOX) or not _is_static_elf(BUSYBOX):
        raise SetupError("%s is missing or not statically linked (apt-get install busybox-static)" % BUSYBOX)
    skel = _skel_dir()
    parent = os.path.dirname(HOST.rootfs_dir)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    tmp = "%s.new-%d" % (HOST.rootfs_dir, os.getpid())
    stamp = rootfs_stamp()
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
            # Applets live in bin, sbin, usr/bin and usr/sbin; "linuxrc" (an
            # initrd's init) would sit in the job's / for no use.
            if "/" not in rel or rel == "bin/busybox" or os.path.lexists(link):
                continue
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink("/bin/busybox", link)
        shutil.copytree(skel, tmp, symlinks=True, dirs_exist_ok=True)
        # The stamp is beside the tree, not in it: the job's / holds the
        # rootfs's files and jrun's mount points, nothing of jrun's own.
        with open(stamp + ".new", "w") as f:
            f.write("built by jrun %s from %s (%d applets) at %s\n"
                    % (__version__, BUSYBOX, len(applets), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
        if os.path.exists(HOST.rootfs_dir):
            old = "%s.old-%d" % (HOST.rootfs_dir, os.getpid())
            os.rename(HOST.rootfs_dir, old)
            os.rename(tmp, HOST.rootfs_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, HOST.rootfs_dir)
        os.rename(stamp + ".new", stamp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(stamp + ".new"):
            os.unlink(stamp + ".new")
        raise
    log("info", "rootfs built at %s (busybox, %d applets)" % (HOST.rootfs_dir, len(applets)))
    return 0


# ---------------------------------------------------------------------------
# main: the only place that prints errors and turns them into a status.
# ---------------------------------------------------------------------------


def main(argv=None):
    if "_ARGCOMPLETE" in os.environ:  # shell completion; never on a normal run
        return complete()
    if argv is None:
        # Called as the program: skip the interpreter's teardown (2-3 ms of
        # every job here); nothing of jrun's needs atexit handlers.
        code = _main(sys.argv[1:])
        try:
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:  # None: that fd was closed when jrun started
                    stream.flush()
        except (OSError, ValueError):
            code = code or 1
        os._exit(code)
    return _main(list(argv))


def _main(argv):
    try:
        _early_log_settings(argv)
        config_path, explicit = CONFIG_FILE, False
        if argv[:1] == ["--config"] or argv[:1] and argv[0].startswith("--config="):
            if argv[0] == "--config":
                if len(argv) < 2:
                    raise UsageError("--config needs a value (FILE)")
                config_path, argv = argv[1], argv[2:]
            else:
                config_path, argv = argv[0].split("=", 1)[1], argv[1:]
            explicit = True
        global HOST
        config, HOST = load_config(config_path, explicit)  # the one place HOST is set
        _early_log_settings(argv, config)
        if argv[:1] and argv[0] in SUBCOMMANDS:
            sub, rest = argv[0], argv[1:]
            if sub in ("run", "verify"):
                return (cmd_run if sub == "run" else cmd_verify)(rest, config)
            return {"ps": cmd_ps, "kill": cmd_kill, "gc": cmd_gc, "verify": cmd_verify,
                    "rootfs": cmd_rootfs}[sub](rest)
        return cmd_run(argv, config)
    except HelpRequested as h:
        sys.stdout.write(str(h))
        return 0
    except JrunError as e:
        log("error", str(e))
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # jrun ps | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        return 128 + signal.SIGPIPE
    except Exception as e:  # noqa: BLE001 - a bug of jrun: one line, in the caller's log format
        log("error", "internal error: %s: %s (a bug; --log-level debug shows where)" % (type(e).__name__, e))
        if _log["level"] <= LEVELS["debug"]:
            import traceback

            log("debug", "".join(traceback.format_exception(e)).rstrip())
        return EXIT_JRUN


def _early_log_settings(argv, config=None):
    """--log-level/--log-format/-q as soon as possible, so that even a
    message about a bad option is in the format the caller asked for."""
    o = dict(config or {})
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--" or not a.startswith("-"):
            break
        name, eq, value = a.partition("=")
        opt = _BY_NAME.get(name if name.startswith("--") else a[:2])
        if opt is not None and opt.long not in FLAG_OPTIONS and not eq and len(a) == len(name):
            if name.startswith("--") or len(a) == 2:
                i += 1
                value = argv[i] if i < len(argv) else ""
        if opt is not None and opt.long in ("--log-format", "--log-level"):
            o[opt.dest] = value
        elif opt is not None and opt.long == "--quiet":
            o["quiet"] = True
        i += 1
    if o.get("log_format") in ("text", "json"):
        _log["format"] = o["log_format"]
    if o.get("quiet"):
        _log["level"] = LEVELS["error"]
    elif o.get("log_level") in LEVELS:
        _log["level"] = LEVELS[o["log_level"]]


def cmd_run(argv, config=None):
    kinds = stdio_kinds()  # before jrun opens an fd of its own that could land on 0-2
    spec = parse_run(argv, config)
    _log["level"] = LEVELS[spec.log_level]
    _log["format"] = spec.log_format
    _log["job"] = spec.id
    return run_job(spec, kinds)


if __name__ == "__main__":
    sys.exit(main())
