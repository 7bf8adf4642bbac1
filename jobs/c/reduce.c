/* Tree reduction: sums every int64 arriving on `in` (from any number of children, until they
 * have all ended), adds the vertex's own `value` (1), and sends the sum on `out` to its
 * parent. The root has no `out` port: it prints "total S". */
#include <stdio.h>
#include "mvm.h"

int main(void) {
    int64_t v, sum = mvm_param_long("value", 1);
    for (;;) {
        int r = mvm_recv_exact("in", &v, sizeof v);
        if (r == MVM_END || r == MVM_NO_PORT) break; /* a leaf has no `in` port */
        if (r != 0) return 1;
        sum += v;
    }
    int s = mvm_send_to("out", &sum, sizeof sum);
    if (s == MVM_NO_PORT) printf("total %lld\n", (long long)sum);
    else if (s != 0) return 1;
    return 0;
}
