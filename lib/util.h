/* util.h: small helpers shared by libneedle, needled and needlectl (cleanup attributes, sizes). */
#pragma once

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Scope-bound cleanup, in the style of systemd: the variable is freed when it leaves scope,
 * so error paths cannot leak. TAKE_PTR hands ownership out of the scope. */
#define _cleanup_(f) __attribute__((cleanup(f)))
#define _unused_ __attribute__((unused))
#define _printf_(a, b) __attribute__((format(printf, a, b)))
#define _warn_unused_result_ __attribute__((warn_unused_result))
#define _fallthrough_ __attribute__((fallthrough))

static inline void freep(void *p) { free(*(void **) p); }
static inline void fclosep(FILE **f) { if (*f) fclose(*f); }
static inline void closep(int *fd) { if (*fd >= 0) { int saved = errno; close(*fd); errno = saved; } }
#define _cleanup_free_ _cleanup_(freep)
#define _cleanup_fclose_ _cleanup_(fclosep)
#define _cleanup_close_ _cleanup_(closep)

/* Defines `static inline void funcp(type *p)` calling func(*p) when *p is set. */
#define DEFINE_TRIVIAL_CLEANUP_FUNC(type, func)        \
        static inline void func##p(type *p) {          \
                if (*p)                                \
                        func(*p);                      \
        }

#define TAKE_PTR(p) __extension__ ({ __typeof__(p) _taken_ = (p); (p) = NULL; _taken_; })
#define TAKE_FD(fd) __extension__ ({ int _fd_ = (fd); (fd) = -1; _fd_; })
#define ELEMENTSOF(x) (sizeof(x) / sizeof((x)[0]))
#define STREQ(a, b) (strcmp((a), (b)) == 0)
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

#define USEC_PER_SEC  UINT64_C(1000000)
#define USEC_PER_MSEC UINT64_C(1000)
#define NSEC_PER_USEC UINT64_C(1000)

/* One enum <-> name pattern. Given a table indexed by the enum,
 *     static const char *const NAME_table[_MAX] = { [VALUE] = "kebab-name", ... };
 * these define `const char *NAME_to_string(TYPE v)` (NULL out of range) and
 * `int NAME_from_string(const char *s)` (the value, or -EINVAL for NULL or an unknown name).
 * tests/unit/test-string-table.c checks every table: one unique kebab name per value. */
#define DEFINE_STRING_TABLE_TO_STRING(name, type)                                 \
        const char *name##_to_string(type v) {                                    \
                if ((size_t) v >= ELEMENTSOF(name##_table))                       \
                        return NULL;                                              \
                return name##_table[v];                                           \
        }
#define DEFINE_STRING_TABLE_FROM_STRING(name)                                     \
        int name##_from_string(const char *s) {                                   \
                if (!s)                                                           \
                        return -EINVAL;                                           \
                for (size_t i_ = 0; i_ < ELEMENTSOF(name##_table); i_++)          \
                        if (name##_table[i_] && STREQ(s, name##_table[i_]))       \
                                return (int) i_;                                  \
                return -EINVAL;                                                   \
        }
#define DEFINE_STRING_TABLE_LOOKUP(name, type)                                    \
        DEFINE_STRING_TABLE_TO_STRING(name, type)                                 \
        DEFINE_STRING_TABLE_FROM_STRING(name)

/* Returns "" for NULL, so strings can be printed without a branch at every call. */
static inline const char *strempty(const char *s) { return s ? s : ""; }
