/* digest.c: SHA-256 via nettle. */
#include <nettle/sha2.h>
#include <stdint.h>

#include "digest.h"

_Static_assert(ND_SHA256_HEX_SIZE == SHA256_DIGEST_SIZE * 2 + 1, "hex buffer size");

void nd_sha256_hex(const void *data, size_t len, char out[static ND_SHA256_HEX_SIZE]) {
        static const char hex[] = "0123456789abcdef";
        struct sha256_ctx ctx;
        uint8_t digest[SHA256_DIGEST_SIZE];

        sha256_init(&ctx);
        if (len > 0)
                sha256_update(&ctx, len, data);
        sha256_digest(&ctx, sizeof digest, digest);
        for (size_t i = 0; i < sizeof digest; i++) {
                out[2 * i] = hex[digest[i] >> 4];
                out[2 * i + 1] = hex[digest[i] & 0xf];
        }
        out[2 * SHA256_DIGEST_SIZE] = '\0';
}
