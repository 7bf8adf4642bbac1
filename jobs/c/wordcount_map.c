/* Word count, the map side: counts the words of its share of the files under `input/` in its
 * sandbox (the files in name order, every `parts`-th from its `index`), writes
 * `out/counts.txt` ("PATH WORDS" a line) and sends its total (int64) on `out`. */
#include <dirent.h>
#include <stdio.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <string.h>
#include "mvm.h"

static int by_name(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static long long count_words(FILE *f) {
    long long words = 0;
    int c, in_word = 0;
    while ((c = fgetc(f)) != EOF) {
        int space = c == ' ' || c == '\n' || c == '\t' || c == '\r';
        if (!space && !in_word) words++;
        in_word = !space;
    }
    return words;
}

int main(void) {
    long index = mvm_param_long("index", 0), parts = mvm_param_long("parts", 1);
    DIR *d = opendir("input");
    if (!d) { perror("input"); return 2; }
    char *names[1024];
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 1024)
        if (e->d_name[0] != '.') names[n++] = strdup(e->d_name);
    closedir(d);
    qsort(names, (size_t)n, sizeof *names, by_name);
    mkdir("out", 0755);
    FILE *out = fopen("out/counts.txt", "w");
    if (!out) { perror("out/counts.txt"); return 3; }
    int64_t total = 0;
    for (int i = 0; i < n; i++) {
        if (i % parts != index) continue;
        char path[512];
        snprintf(path, sizeof path, "input/%s", names[i]);
        FILE *f = fopen(path, "r");
        if (!f) continue; /* a directory */
        long long w = count_words(f);
        fclose(f);
        fprintf(out, "%s %lld\n", path, w);
        total += w;
    }
    fclose(out);
    return mvm_send_to("out", &total, sizeof total) == 0 ? 0 : 1;
}
