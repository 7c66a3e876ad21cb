/* digest.h: content digests recorded with every treatment (limits file, profile). */
#pragma once

#include <stddef.h>

/* 64 lower-case hex digits plus the terminating NUL. */
#define ND_SHA256_HEX_SIZE 65

/* Writes the SHA-256 of len bytes at data into out as lower-case hex, NUL-terminated. */
void nd_sha256_hex(const void *data, size_t len, char out[static ND_SHA256_HEX_SIZE]);
