/* log.h: logging for needled and libneedle. Under systemd (stderr connected to the journal) each
 * line goes to the journal with its priority and structured fields (PEN_SERIAL=, SESSION_ID=, ...);
 * otherwise one plain line on stderr: "needled: <level>: message". */
#pragma once

#include <stdarg.h>
#include <syslog.h>

#include "util.h"

/* Lines above this priority (syslog numbering: LOG_ERR .. LOG_DEBUG) are dropped. */
void nd_log_set_max_level(int level);
int nd_log_get_max_level(void);

/* Sets the identifier printed before each plain line (default "needled"); not copied. */
void nd_log_set_ident(const char *ident);

/* Logs one line. fields: NULL, or a NULL-terminated array of "KEY=value" journal fields. */
void nd_log_full(int level, const char *const *fields, const char *fmt, ...) _printf_(3, 4);
void nd_log_fullv(int level, const char *const *fields, const char *fmt, va_list ap) _printf_(3, 0);

#define nd_log_error(...)   nd_log_full(LOG_ERR, NULL, __VA_ARGS__)
#define nd_log_warning(...) nd_log_full(LOG_WARNING, NULL, __VA_ARGS__)
#define nd_log_notice(...)  nd_log_full(LOG_NOTICE, NULL, __VA_ARGS__)
#define nd_log_info(...)    nd_log_full(LOG_INFO, NULL, __VA_ARGS__)
#define nd_log_debug(...)   nd_log_full(LOG_DEBUG, NULL, __VA_ARGS__)

/* Logs "<message>: <strerror(|error|)>" and returns -|error|, so that an error is logged and
 * passed on in one statement: return nd_log_error_errno(r, "cannot open %s", path); */
int nd_log_full_errno(int level, const char *const *fields, int error, const char *fmt, ...) _printf_(4, 5);

#define nd_log_error_errno(error, ...)   nd_log_full_errno(LOG_ERR, NULL, (error), __VA_ARGS__)
#define nd_log_warning_errno(error, ...) nd_log_full_errno(LOG_WARNING, NULL, (error), __VA_ARGS__)
#define nd_log_info_errno(error, ...)    nd_log_full_errno(LOG_INFO, NULL, (error), __VA_ARGS__)
#define nd_log_debug_errno(error, ...)   nd_log_full_errno(LOG_DEBUG, NULL, (error), __VA_ARGS__)
