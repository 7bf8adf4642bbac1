/* Pipeline stage: for each int64 on `in`, sends value * factor + offset on `out`, until the
 * end of the stream. Parameters: factor (2), offset (0). */
#include "mvm.h"

int main(void) {
    long factor = mvm_param_long("factor", 2), offset = mvm_param_long("offset", 0);
    int64_t v;
    for (;;) {
        int r = mvm_recv_exact("in", &v, sizeof v);
        if (r == MVM_END) return 0;
        if (r != 0) return 1;
        v = v * factor + offset;
        if (mvm_send_to("out", &v, sizeof v) != 0) return 1;
    }
}
