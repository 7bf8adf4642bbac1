/* FFT sink: receives X[index] on `in` and prints "index re im"; over `frames` frames (a job
 * parameter, default 1), the sums of re and im over the frames, in frame order. */
#include <stdio.h>
#include "mvm.h"

int main(void) {
    long i = mvm_param_long("index", -1);
    long frames = mvm_param_long("frames", 1);
    double sum[2] = {0.0, 0.0};
    for (long f = 0; f < frames; f++) {
        double z[2];
        if (mvm_recv_exact("in", z, sizeof z) != 0) return 1;
        /* The first frame is taken as it is: 0.0 + -0.0 would print as 0. */
        sum[0] = f == 0 ? z[0] : sum[0] + z[0];
        sum[1] = f == 0 ? z[1] : sum[1] + z[1];
    }
    printf("%ld %.17g %.17g\n", i, sum[0], sum[1]);
    return 0;
}
