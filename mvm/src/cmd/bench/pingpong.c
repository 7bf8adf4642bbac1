/* MPI ping-pong between ranks 0 and 1: for each size, prints "size oneway_us" (median of
 * 5 repetitions of `iters` round trips, after a warm-up). Used by `mvm bench pingpong`. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    size_t sizes[] = {8, 1024, 65536, 1048576};
    int iters[] = {20000, 10000, 2000, 200};
    char *buf = malloc(1048576);
    memset(buf, 1, 1048576);
    for (int s = 0; s < 4; s++) {
        double rep[5];
        for (int r = -1; r < 5; r++) {
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = MPI_Wtime();
            for (int i = 0; i < iters[s]; i++) {
                if (rank == 0) {
                    MPI_Send(buf, (int)sizes[s], MPI_BYTE, 1, 0, MPI_COMM_WORLD);
                    MPI_Recv(buf, (int)sizes[s], MPI_BYTE, 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                } else {
                    MPI_Recv(buf, (int)sizes[s], MPI_BYTE, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                    MPI_Send(buf, (int)sizes[s], MPI_BYTE, 0, 0, MPI_COMM_WORLD);
                }
            }
            if (r >= 0) rep[r] = (MPI_Wtime() - t0) / iters[s] / 2.0;
        }
        qsort(rep, 5, sizeof rep[0], cmp);
        if (rank == 0) printf("%zu %.4f\n", sizes[s], rep[2] * 1e6);
    }
    free(buf);
    MPI_Finalize();
    return 0;
}
