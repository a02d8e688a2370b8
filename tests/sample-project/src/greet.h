#ifndef GREET_H
#define GREET_H
#include <stddef.h>

/* Writes "hello, NAME" into BUF (at most SIZE bytes, NUL included); returns
   the length it needed, like snprintf. */
int greet(char *buf, size_t size, const char *name);

#endif
