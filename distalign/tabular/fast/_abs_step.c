/* The Newton step with |eigenvalues| for the toy's indefinite Hessians (see _newton.c).
 *
 * step = -V |Lambda|^-1 V^T g for a symmetric K x K matrix, without forming V; for K = 10 a
 * few thousand flops, where a library eigendecomposition call costs more in overhead.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "_newton.h"

/* step = -V |Lambda|^-1 V^T g for the symmetric A = V Lambda V^T (overwritten), |lambda|
 * floored at eig_floor max|lambda| (fast/newton.py: newton_step). V is never formed:
 * Householder reflections take A to tridiagonal T = Q^T A Q and are applied to g; implicit QL
 * sweeps (LAPACK dsteqr's method) diagonalise T = Z Lambda Z^T, rotating Q^T g on the fly and
 * recording the rotations to apply Z afterwards. d, e, y: K scratch; rot_i, rot_cs: room for
 * max_rot rotations. Returns NEWTON_NO_EIGEN, step unset, when an eigenvalue needed more than
 * ql_sweeps sweeps (NaN input, say) or the rotations overflowed the record. */
int newton_abs_step(int K, double *A, const double *g, double *step, double *d, double *e,
                    double *y, int *rot_i, double *rot_cs, int max_rot,
                    const newton_rules *rules) {
    for (int k = 0; k < K; k++) y[k] = g[k];
    /* 1. Householder: unit v_k in A[k+1:, k] zeroes column k below the sub-diagonal */
    for (int k = 0; k < K - 2; k++) {
        const int n = K - k - 1;
        double norm = 0.0;
        for (int i = k + 1; i < K; i++) norm += A[i * K + k] * A[i * K + k];
        norm = sqrt(norm);
        const double alpha = A[(k + 1) * K + k] > 0.0 ? -norm : norm;
        A[(k + 1) * K + k] -= alpha;
        double vn = 0.0;
        for (int i = k + 1; i < K; i++) vn += A[i * K + k] * A[i * K + k];
        e[k] = alpha;
        if (vn == 0.0) { /* already reduced: an identity reflector */
            e[k] = A[(k + 1) * K + k] + alpha;
            for (int i = k + 1; i < K; i++) A[i * K + k] = 0.0;
            continue;
        }
        vn = sqrt(vn);
        for (int i = k + 1; i < K; i++) A[i * K + k] /= vn;
        double kappa = 0.0;
        for (int i = 0; i < n; i++) { /* d <- A22 v, then d <- d - (v.d) v */
            double s = 0.0;
            for (int j = 0; j < n; j++) s += A[(k + 1 + i) * K + k + 1 + j] * A[(k + 1 + j) * K + k];
            d[i] = s;
            kappa += A[(k + 1 + i) * K + k] * s;
        }
        for (int i = 0; i < n; i++) d[i] -= kappa * A[(k + 1 + i) * K + k];
        for (int i = 0; i < n; i++) {
            const double vi = A[(k + 1 + i) * K + k];
            for (int j = 0; j < n; j++)
                A[(k + 1 + i) * K + k + 1 + j] -= 2.0 * (vi * d[j] + d[i] * A[(k + 1 + j) * K + k]);
        }
        double s = 0.0;
        for (int i = 0; i < n; i++) s += A[(k + 1 + i) * K + k] * y[k + 1 + i];
        for (int i = 0; i < n; i++) y[k + 1 + i] -= 2.0 * s * A[(k + 1 + i) * K + k];
    }
    for (int k = 0; k < K; k++) d[k] = A[k * K + k];
    if (K >= 2) e[K - 2] = A[(K - 1) * K + K - 2];
    e[K - 1] = 0.0;
    /* 2. implicit QL on (d, e); each rotation of coordinates (i, i+1) applied to y */
    int nrot = 0;
    for (int l = 0; l < K; l++) {
        for (int sweep = 0;; sweep++) {
            int m = l;
            while (m < K - 1 && !(fabs(e[m]) <= 1e-16 * (fabs(d[m]) + fabs(d[m + 1])))) m++;
            if (m == l) break;
            if (sweep == rules->ql_sweeps) return NEWTON_NO_EIGEN;
            double gg = (d[l + 1] - d[l]) / (2.0 * e[l]);
            double r = sqrt(gg * gg + 1.0);
            gg = d[m] - d[l] + e[l] / (gg + (gg >= 0.0 ? r : -r));
            double sn = 1.0, cs = 1.0, p = 0.0;
            int split = 0;
            for (int i = m - 1; i >= l; i--) {
                const double f = sn * e[i], b = cs * e[i];
                r = sqrt(f * f + gg * gg);
                e[i + 1] = r;
                if (r == 0.0) { /* the chain splits here */
                    d[i + 1] -= p;
                    e[m] = 0.0;
                    split = 1;
                    break;
                }
                const double inv = 1.0 / r;
                sn = f * inv;
                cs = gg * inv;
                gg = d[i + 1] - p;
                r = (d[i] - gg) * sn + 2.0 * cs * b;
                p = sn * r;
                d[i + 1] = gg + p;
                gg = cs * r - b;
                const double yi = y[i], yj = y[i + 1];
                y[i] = cs * yi - sn * yj;
                y[i + 1] = sn * yi + cs * yj;
                if (nrot == max_rot) return NEWTON_NO_EIGEN;
                rot_i[nrot] = i;
                rot_cs[2 * nrot] = cs;
                rot_cs[2 * nrot + 1] = sn;
                nrot++;
            }
            if (!split) {
                d[l] -= p;
                e[l] = gg;
                e[m] = 0.0;
            }
        }
    }
    /* 3. divide by |lambda| (floored), then apply Z (the rotations in reverse) and Q */
    double big = 0.0;
    for (int k = 0; k < K; k++) big = fabs(d[k]) > big ? fabs(d[k]) : big;
    const double lam_min = rules->eig_floor * big;
    for (int k = 0; k < K; k++) y[k] /= fabs(d[k]) > lam_min ? fabs(d[k]) : lam_min;
    for (int r = nrot - 1; r >= 0; r--) {
        const int i = rot_i[r];
        const double cs = rot_cs[2 * r], sn = rot_cs[2 * r + 1];
        const double yi = y[i], yj = y[i + 1];
        y[i] = cs * yi + sn * yj;
        y[i + 1] = -sn * yi + cs * yj;
    }
    for (int k = K - 3; k >= 0; k--) {
        double s = 0.0;
        for (int i = k + 1; i < K; i++) s += A[i * K + k] * y[i];
        for (int i = k + 1; i < K; i++) y[i] -= 2.0 * s * A[i * K + k];
    }
    for (int k = 0; k < K; k++) step[k] = -y[k];
    return NEWTON_OK;
}

/* the |eigenvalue| step alone, for tests: step = -V|Lambda|^-1 V^T g of the K x K A */
int abs_newton_step(int K, const double *A, const double *g, double *step,
                    const newton_rules *rules) {
    const int max_rot = NEWTON_MAX_ROT(K, rules->ql_sweeps);
    double *mem = malloc(sizeof(double) * (K * K + 3 * K + 2 * max_rot));
    int *rot_i = malloc(sizeof(int) * max_rot);
    int code = NEWTON_NO_MEMORY;
    if (mem && rot_i) {
        memcpy(mem, A, sizeof(double) * K * K);
        code = newton_abs_step(K, mem, g, step, mem + K * K, mem + K * K + K,
                               mem + K * K + 2 * K, rot_i, mem + K * K + 3 * K, max_rot, rules);
    }
    free(mem);
    free(rot_i);
    return code;
}

