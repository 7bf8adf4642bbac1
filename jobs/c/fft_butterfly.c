/* A radix-2 butterfly: receives a on `a` and b on `b`, sends x = a + W*b on `x` and
 * y = a - W*b on `y`, with W = exp(-2*pi*i*k/n) from the vertex attributes k and n; once, or
 * for each of `frames` frames (a job parameter, default 1).
 * The same module serves every stage of every FFT size: the topology says where it sits. */
#include <math.h>
#include "mvm.h"

int main(void) {
    long k = mvm_param_long("k", -1), n = mvm_param_long("n", -1);
    if (k < 0 || n <= 0) { mvm_logs(0, "fft_butterfly: needs parameters 'k' and 'n'"); return 2; }
    long frames = mvm_param_long("frames", 1);
    double t = -2.0 * M_PI * (double)k / (double)n;
    double wr = cos(t), wi = sin(t);
    for (long f = 0; f < frames; f++) {
        double a[2], b[2];
        if (mvm_recv_exact("a", a, sizeof a) != 0 || mvm_recv_exact("b", b, sizeof b) != 0) return 1;
        double wb[2] = {wr * b[0] - wi * b[1], wr * b[1] + wi * b[0]};
        double x[2] = {a[0] + wb[0], a[1] + wb[1]};
        double y[2] = {a[0] - wb[0], a[1] - wb[1]};
        if (mvm_send_to("x", x, sizeof x) != 0 || mvm_send_to("y", y, sizeof y) != 0) return 1;
    }
    return 0;
}
