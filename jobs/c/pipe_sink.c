/* Pipeline sink: sums the int64 items on `in` and prints "items N sum S". */
#include <stdio.h>
#include "mvm.h"

int main(void) {
    int64_t v, sum = 0, n = 0;
    for (;;) {
        int r = mvm_recv_exact("in", &v, sizeof v);
        if (r == MVM_END) break;
        if (r != 0) return 1;
        sum += v;
        n++;
    }
    printf("items %lld sum %lld\n", (long long)n, (long long)sum);
    return 0;
}
