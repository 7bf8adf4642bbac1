/* Word count, the reduce side: sums the totals arriving on `in` until every mapper has
 * ended, writes `out/total.txt` and prints "words N". With the parameter `fail` set to 1 it
 * writes `out/partial.txt` first and exits with status 2 (a failed job keeps its outputs). */
#include <stdio.h>
#include <sys/stat.h>
#include "mvm.h"

int main(void) {
    int64_t v, sum = 0;
    for (;;) {
        int r = mvm_recv_exact("in", &v, sizeof v);
        if (r == MVM_END) break;
        if (r != 0) return 1;
        sum += v;
    }
    mkdir("out", 0755);
    if (mvm_param_long("fail", 0)) {
        FILE *p = fopen("out/partial.txt", "w");
        if (p) { fprintf(p, "partial %lld\n", (long long)sum); fclose(p); }
        return 2;
    }
    FILE *f = fopen("out/total.txt", "w");
    if (!f) { perror("out/total.txt"); return 3; }
    fprintf(f, "%lld\n", (long long)sum);
    fclose(f);
    printf("words %lld\n", (long long)sum);
    return 0;
}
