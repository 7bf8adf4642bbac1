/* Pipeline source: sends the integers 1..count (int64) on `out`. Parameter: count (10). */
#include "mvm.h"

int main(void) {
    long count = mvm_param_long("count", 10);
    for (int64_t v = 1; v <= count; v++)
        if (mvm_send_to("out", &v, sizeof v) != 0) return 1;
    return 0;
}
