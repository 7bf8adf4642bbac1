/* FFT sink: receives X[index] on `in` and prints "index re im". */
#include <stdio.h>
#include "mvm.h"

int main(void) {
    long i = mvm_param_long("index", -1);
    double z[2];
    if (mvm_recv_exact("in", z, sizeof z) != 0) return 1;
    printf("%ld %.17g %.17g\n", i, z[0], z[1]);
    return 0;
}
