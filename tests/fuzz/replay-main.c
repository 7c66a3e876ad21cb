/* replay-main.c: runs a fuzz target's LLVMFuzzerTestOneInput over every file of the corpus
 * directories given, so builds without libFuzzer still exercise the seeds as regressions. */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int replay_file(const char *path) {
        FILE *f = fopen(path, "rb");
        if (!f) {
                fprintf(stderr, "%s: %s\n", path, strerror(errno));
                return -1;
        }
        uint8_t *buf = NULL;
        size_t len = 0, cap = 0;
        for (;;) {
                if (len == cap) {
                        cap = cap ? cap * 2 : 4096;
                        uint8_t *n = realloc(buf, cap);
                        if (!n) {
                                free(buf);
                                fclose(f);
                                return -1;
                        }
                        buf = n;
                }
                size_t got = fread(buf + len, 1, cap - len, f);
                len += got;
                if (got == 0)
                        break;
        }
        int failed = ferror(f);
        fclose(f);
        if (!failed)
                LLVMFuzzerTestOneInput(buf, len);
        free(buf);
        return failed ? -1 : 0;
}

int main(int argc, char *argv[]) {
        unsigned replayed = 0;
        for (int i = 1; i < argc; i++) {
                DIR *d = opendir(argv[i]);
                if (!d) {
                        fprintf(stderr, "%s: %s\n", argv[i], strerror(errno));
                        return 1;
                }
                struct dirent *de;
                while ((de = readdir(d))) {
                        if (de->d_name[0] == '.')
                                continue;
                        char path[4096];
                        snprintf(path, sizeof path, "%s/%s", argv[i], de->d_name);
                        struct stat st;
                        if (stat(path, &st) < 0 || !S_ISREG(st.st_mode))
                                continue;
                        if (replay_file(path) < 0) {
                                closedir(d);
                                return 1;
                        }
                        replayed++;
                }
                closedir(d);
        }
        printf("replayed %u inputs\n", replayed);
        return replayed > 0 ? 0 : 1;
}
