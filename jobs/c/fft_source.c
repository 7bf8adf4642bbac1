/* FFT source: sends sample x[index] as a complex number (two little-endian f64) on `out`.
 * Parameters: index (vertex attribute), input (comma-separated real parts), optional input_im,
 * optional frames (default 1): a stream of that many frames, frame f sending
 * x[index] + f * (0.001 * (index + 1), -0.002 * index). */
#include <stdio.h>
#include "mvm.h"

static double nth(const char *list, long i, int *ok) {
    const char *p = list;
    for (long k = 0; k < i; k++) {
        p = strchr(p, ',');
        if (!p) { *ok = 0; return 0; }
        p++;
    }
    *ok = 1;
    return strtod(p, 0);
}

int main(void) {
    static char list[65536];
    long i = mvm_param_long("index", -1);
    if (i < 0 || mvm_param_str("input", list, sizeof list) < 0) {
        mvm_logs(0, "fft_source: needs parameters 'index' and 'input'");
        return 2;
    }
    int ok;
    double z[2] = {nth(list, i, &ok), 0.0};
    if (!ok) { mvm_logs(0, "fft_source: 'input' has fewer values than points"); return 2; }
    if (mvm_param_str("input_im", list, sizeof list) >= 0) z[1] = nth(list, i, &ok);
    long frames = mvm_param_long("frames", 1);
    for (long f = 0; f < frames; f++) {
        double s[2] = {z[0] + (double)f * 0.001 * (double)(i + 1), z[1] - (double)f * 0.002 * (double)i};
        if (mvm_send_to("out", s, sizeof s) != 0) return 1;
    }
    return 0;
}
