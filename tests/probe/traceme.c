/* A static probe for tests/test_integrity_stdio.py: a job's PID 1 that makes
 * jrun, its parent, its tracer with PTRACE_TRACEME, then does one thing.
 * jrun must report the job's own exit status and end it on time anyway.
 *
 *   traceme exit N        TRACEME, exit N
 *   traceme signals       TRACEME, raise SIGSTOP, SIGTSTP, SIGTERM (all
 *                         dropped for an untraced namespace init) and SIGUSR1
 *                         twice (handled): exit 10 + times handled
 *   traceme exec PROG...  TRACEME, exec PROG (the exec's SIGTRAP)
 *   traceme sleep         TRACEME, sleep 100 s
 *   traceme thread N      a second thread does TRACEME and gets a SIGUSR1
 *                         (handled); then the main thread exits N
 *   tracer                no TRACEME of its own: trace a child of the job's
 *                         own (stop, continue, exit 3); prints "ok" */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile int handled;

static void on_usr1(int sig)
{
    (void)sig;
    handled++;
}

static int traceme(void)
{
    if (ptrace(PTRACE_TRACEME, 0, NULL, NULL) < 0) {
        perror("PTRACE_TRACEME");
        return -1;
    }
    return 0;
}

static volatile int thread_ready;

static void *thread_main(void *arg)
{
    (void)arg;
    traceme();
    syscall(SYS_tgkill, getpid(), gettid(), SIGUSR1); /* a signal-delivery-stop of this thread */
    thread_ready = 1;
    for (;;)
        pause();
    return NULL;
}

int main(int argc, char **argv)
{
    const char *what = argc > 1 ? argv[1] : "";
    signal(SIGUSR1, on_usr1);
    if (!strcmp(what, "exit") && argc > 2) {
        traceme();
        exit(atoi(argv[2]));
    }
    if (!strcmp(what, "signals")) {
        traceme();
        raise(SIGSTOP);
        raise(SIGTSTP);
        kill(getpid(), SIGTERM);
        raise(SIGUSR1);
        raise(SIGUSR1);
        exit(10 + handled);
    }
    if (!strcmp(what, "exec") && argc > 2) {
        traceme();
        execv(argv[2], argv + 2);
        perror("execv");
        return 127;
    }
    if (!strcmp(what, "sleep")) {
        traceme();
        sleep(100);
        return 0;
    }
    if (!strcmp(what, "thread") && argc > 2) {
        pthread_t t;
        pthread_create(&t, NULL, thread_main, NULL);
        while (!thread_ready || !handled)
            usleep(1000);
        exit(atoi(argv[2]));
    }
    if (!strcmp(what, "tracer")) {
        int status;
        pid_t pid = fork();
        if (pid == 0) {
            traceme();
            raise(SIGSTOP);
            _exit(3);
        }
        if (waitpid(pid, &status, 0) != pid || !WIFSTOPPED(status) || WSTOPSIG(status) != SIGSTOP) {
            printf("no stop: %#x\n", status);
            return 1;
        }
        ptrace(PTRACE_CONT, pid, NULL, NULL);
        if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 3) {
            printf("no exit 3: %#x\n", status);
            return 1;
        }
        printf("ok\n");
        return 0;
    }
    fprintf(stderr, "usage: traceme exit N|signals|exec PROG...|sleep|thread N|tracer\n");
    return 2;
}
