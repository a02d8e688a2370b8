#include <stdio.h>

#include "greet.h"

int greet(char *buf, size_t size, const char *name)
{
    return snprintf(buf, size, "hello, %s", name);
}
