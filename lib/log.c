/* log.c: journal-aware logging (see log.h). */
#define SD_JOURNAL_SUPPRESS_LOCATION 1
#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <systemd/sd-journal.h>

#include "log.h"

#define LOG_FIELDS_MAX 16
#define LOG_MESSAGE_MAX 2048

static int max_level = LOG_INFO;
static const char *ident = "needled";
static int to_journal = -1; /* unknown until the first line */

void nd_log_set_max_level(int level) { max_level = level; }
int nd_log_get_max_level(void) { return max_level; }
void nd_log_set_ident(const char *name) { ident = name ? name : "needled"; }

/* systemd sets JOURNAL_STREAM=dev:inode when stderr is connected to the journal. */
static bool stderr_is_journal(void) {
        const char *e = getenv("JOURNAL_STREAM");
        unsigned long long dev, ino;
        struct stat st;
        if (!e || sscanf(e, "%llu:%llu", &dev, &ino) != 2 || fstat(STDERR_FILENO, &st) < 0)
                return false;
        return (unsigned long long) st.st_dev == dev && (unsigned long long) st.st_ino == ino;
}

static const char *level_name(int level) {
        switch (level) {
        case LOG_EMERG: case LOG_ALERT: case LOG_CRIT: case LOG_ERR: return "error";
        case LOG_WARNING: return "warning";
        case LOG_NOTICE: return "notice";
        case LOG_INFO: return "info";
        default: return "debug";
        }
}

void nd_log_fullv(int level, const char *const *fields, const char *fmt, va_list ap) {
        if (level > max_level)
                return;
        int saved_errno = errno;
        /* When needled logged it: journald stamps an entry when it reads it, which on a starved
         * machine can be long after (and after a kernel message that came later). */
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        char message[LOG_MESSAGE_MAX];
        vsnprintf(message, sizeof message, fmt, ap);

        if (to_journal < 0)
                to_journal = stderr_is_journal();
        if (to_journal) {
                struct iovec iov[LOG_FIELDS_MAX + 3];
                char priority[32], monotonic[64];
                _cleanup_free_ char *msg_field = NULL;
                size_t n = 0;
                if (asprintf(&msg_field, "MESSAGE=%s", message) >= 0) {
                        snprintf(priority, sizeof priority, "PRIORITY=%d", level);
                        iov[n++] = (struct iovec) { .iov_base = msg_field, .iov_len = strlen(msg_field) };
                        iov[n++] = (struct iovec) { .iov_base = priority, .iov_len = strlen(priority) };
                        snprintf(monotonic, sizeof monotonic, "NEEDLED_MONOTONIC_USEC=%llu",
                                 (unsigned long long) now.tv_sec * 1000000ULL + (unsigned long long) now.tv_nsec / 1000ULL);
                        iov[n++] = (struct iovec) { .iov_base = monotonic, .iov_len = strlen(monotonic) };
                        for (size_t i = 0; fields && fields[i] && i < LOG_FIELDS_MAX; i++)
                                iov[n++] = (struct iovec) { .iov_base = (void *) fields[i], .iov_len = strlen(fields[i]) };
                        if (sd_journal_sendv(iov, (int) n) >= 0) {
                                errno = saved_errno;
                                return;
                        }
                }
        }
        fprintf(stderr, "%s: %s: %s\n", ident, level_name(level), message);
        errno = saved_errno;
}

int nd_log_full_errno(int level, const char *const *fields, int error, const char *fmt, ...) {
        int positive = error < 0 ? -error : error;
        assert(positive > 0);   /* a call on success is a bug: it would return 0 as an error */
        if (level > max_level)
                return -positive;
        char message[LOG_MESSAGE_MAX];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(message, sizeof message, fmt, ap);
        va_end(ap);
        nd_log_full(level, fields, "%s: %s", message, strerror(positive));
        return -positive;
}

void nd_log_full(int level, const char *const *fields, const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        nd_log_fullv(level, fields, fmt, ap);
        va_end(ap);
}
