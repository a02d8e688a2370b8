#include <stdio.h>
#include <string.h>

#include "greet.h"

static int failures;

static void check(int ok, const char *what)
{
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    failures += !ok;
}

int main(void)
{
    char buf[16];

    check(greet(buf, sizeof buf, "jrun") == 11 && strcmp(buf, "hello, jrun") == 0, "greets by name");
    check(greet(buf, 8, "world") == 12 && strcmp(buf, "hello, ") == 0, "truncates to the buffer");
    return failures ? 1 : 0;
}
