/* A static test probe for tests/test_security.py: each subcommand tries one
 * thing a hostile job might try and prints what happened, one line:
 * "ok" if it worked, or the errno name.  Fed to a job on stdin (the job has
 * no compiler), so it must be static. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <grp.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <time.h>
#include <sys/socket.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

static int report(long ret)
{
    if (ret < 0) {
        printf("%s\n", strerrorname_np(errno));
        return 1;
    }
    printf("ok\n");
    return 0;
}

static void list_root(void)
{
    DIR *d = opendir("/");
    struct dirent *e;
    if (!d) { printf("opendir: %s\n", strerrorname_np(errno)); return; }
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            printf("%s ", e->d_name);
    printf("\n");
    closedir(d);
}

int main(int argc, char **argv)
{
    const char *what = argc > 1 ? argv[1] : "";
    setvbuf(stdout, NULL, _IONBF, 0);
    if (!strcmp(what, "keyctl"))  /* KEYCTL_GET_KEYRING_ID of the session keyring, create it */
        return report(syscall(SYS_keyctl, 0, -3, 1));
    if (!strcmp(what, "add_key"))
        return report(syscall(SYS_add_key, "user", "jrun-probe", "x", 1, -3));
    if (!strcmp(what, "init_module"))  /* an empty image: ENOEXEC if the call got through */
        return report(syscall(SYS_init_module, "", 0, ""));
    if (!strcmp(what, "bpf"))
        return report(syscall(SYS_bpf, 0, NULL, 0));
    if (!strcmp(what, "userfaultfd"))
        return report(syscall(SYS_userfaultfd, 0));
    if (!strcmp(what, "perf_event_open"))
        return report(syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0));
    if (!strcmp(what, "open_by_handle_at"))
        return report(syscall(SYS_open_by_handle_at, AT_FDCWD, NULL, 0));
    if (!strcmp(what, "io_uring_setup"))
        return report(syscall(SYS_io_uring_setup, 1, NULL));
    if (!strcmp(what, "clone3"))
        return report(syscall(SYS_clone3, NULL, 0));
    if (!strcmp(what, "clone-newuser") || !strcmp(what, "clone-plain")) {
        long flags = SIGCHLD | (what[6] == 'n' ? CLONE_NEWUSER : 0);
        long pid = syscall(SYS_clone, flags, 0, 0, 0, 0);
        if (pid == 0)
            _exit(0);
        if (pid > 0)
            waitpid(pid, NULL, 0);
        return report(pid);
    }
    if (!strcmp(what, "unshare-user"))
        return report(unshare(CLONE_NEWUSER));
    if (!strcmp(what, "mount-proc")) {
        mkdir("/tmp/probe-proc", 0755);
        return report(mount("proc", "/tmp/probe-proc", "proc", 0, NULL));
    }
    if (!strcmp(what, "icmp-socket"))  /* what ping uses without NET_RAW */
        return report(socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP));
    if (!strcmp(what, "raw-socket"))
        return report(socket(AF_INET, SOCK_RAW, IPPROTO_ICMP));
    if (!strcmp(what, "tiocsti")) {  /* push a keystroke into the terminal on fd 2 */
        char c = '\n';
        return report(ioctl(2, TIOCSTI, &c));
    }
    if (!strcmp(what, "vsock"))  /* the hypervisor's sockets, whatever the network namespace */
        return report(socket(40 /* AF_VSOCK */, SOCK_STREAM, 0));
    if (!strcmp(what, "vsock-pair")) {
        int sv[2];
        return report(socketpair(40, SOCK_STREAM, 0, sv));
    }
    if (!strcmp(what, "tiocsti-own") || !strcmp(what, "tioclinux")) {
        /* On a pty of the job's own, made this process's controlling
         * terminal: the kernel itself allows TIOCSTI there. */
        int master = posix_openpt(O_RDWR | O_NOCTTY), slave;
        char c = 'x', sub = 6;  /* TIOCL_GETFGCONSOLE */
        if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0)
            return report(-1);
        if (fork() == 0) {
            setsid();
            slave = open(ptsname(master), O_RDWR);  /* becomes the controlling terminal */
            if (slave < 0)
                _exit(report(-1));
            if (what[4] == 'l')
                _exit(report(ioctl(slave, TIOCLINUX, &sub)));
            _exit(report(ioctl(slave, TIOCSTI, &c)));
        }
        wait(NULL);
        return 0;
    }
    if (!strcmp(what, "rlimit-core")) {  /* lower RLIMIT_CORE to 0 (which pipes a dump again) */
        struct rlimit rl = {0, 0};  /* the old syscall: glibc's setrlimit() calls prlimit64 */
        return report(syscall(SYS_setrlimit, RLIMIT_CORE, &rl));
    }
    if (!strcmp(what, "prlimit-core")) {
        struct rlimit rl = {0, 0};
        return report(prlimit(0, RLIMIT_CORE, &rl, NULL));
    }
    if (!strcmp(what, "ioctl-loop") && argc > 2) {  /* ns per ioctl(TCGETS) and per getppid */
        long n = atol(argv[2]);
        struct termios t;
        struct timespec a, b, c;
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (long i = 0; i < n; i++)
            ioctl(0, TCGETS, &t);
        clock_gettime(CLOCK_MONOTONIC, &b);
        for (long i = 0; i < n; i++)
            syscall(SYS_getppid);
        clock_gettime(CLOCK_MONOTONIC, &c);
        printf("%.1f %.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n,
               ((c.tv_sec - b.tv_sec) * 1e9 + (c.tv_nsec - b.tv_nsec)) / n);
        return 0;
    }
    if (!strcmp(what, "ids")) {
        uid_t r, e, s;
        getresuid(&r, &e, &s);
        printf("%u %u %u\n", r, e, s);
        return 0;
    }
    if (!strcmp(what, "as") && argc > 3) {  /* as UID PROG ARGS: drop to UID, exec */
        uid_t id = atoi(argv[2]);
        if (setgroups(0, NULL) < 0 || setresgid(id, id, id) < 0 || setresuid(id, id, id) < 0)
            return report(-1);
        execv(argv[3], argv + 3);
        return report(-1);
    }
    if (!strcmp(what, "chroot-escape")) {
        /* The classic: chroot into a subdirectory while keeping the cwd (or
         * an fd) outside it, climb with "..", then chroot to where we are. */
        int fd = open("/", O_RDONLY | O_DIRECTORY);
        mkdir("/tmp/probe-jail", 0755);
        if (chroot("/tmp/probe-jail") < 0)
            return report(-1);
        if (argc > 2 && !strcmp(argv[2], "fd"))
            fchdir(fd);
        for (int i = 0; i < 256; i++)
            chdir("..");
        chroot(".");
        list_root();
        return 0;
    }
    fprintf(stderr, "usage: probe keyctl|add_key|init_module|bpf|userfaultfd|perf_event_open|"
            "open_by_handle_at|io_uring_setup|clone3|clone-newuser|clone-plain|unshare-user|"
            "mount-proc|icmp-socket|raw-socket|tiocsti|vsock|vsock-pair|tiocsti-own|tioclinux|rlimit-core|"
            "prlimit-core|ioctl-loop N|ids|as UID PROG ARGS|chroot-escape [fd]\n");
    return 2;
}
