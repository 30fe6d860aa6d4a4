/* The toy's damped Newton, one K x K problem at a time, in C (see tabular/fast/compiled.py).
 *
 * The same objective, steps, stopping rules and line search as fastnewton._solve_queue, so
 * the same optima; numpy pays a pass over memory per elementwise operation, which for K = 10
 * costs more than the arithmetic. Called through ctypes, which releases the GIL, so threads
 * share the problems. Layout: one row per problem (theta, status) or per data column
 * (W, Q, LIN, CONST, LREF); the pairs (pi[m], pj[m]), i < j, are those of numpy's
 * triu_indices(K, 1).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { CONVERGED = 0, STALLED = 1, UNCONVERGED = 2 };

/* _abs_step.c: the Newton step with |eigenvalues| for an indefinite Hessian */
int newton_abs_step(int K, double *A, const double *g, double *step, double *d, double *e,
             double *y, int *rot_i, double *rot_cs, int max_rot);

typedef struct {
    int K, M;
    const int64_t *pi, *pj;
    double a, ridge;
} Shape;

/* p = softmax(theta) into p, h = ln p - ln pi0 into h; returns KL(p || pi0) = p.h */
static double kl_parts(const Shape *s, const double *th, double mx, const double *lref,
                       double *p, double *h) {
    double sum = 0.0, kl = 0.0;
    for (int k = 0; k < s->K; k++) {
        p[k] = exp(th[k] - mx);
        sum += p[k];
    }
    double lse = log(sum);
    for (int k = 0; k < s->K; k++) {
        p[k] /= sum;
        h[k] = th[k] - mx - lse - lref[k];
        kl += p[k] * h[k];
    }
    return kl;
}

static double max_of(const double *x, int K) {
    double m = x[0];
    for (int k = 1; k < K; k++) m = x[k] > m ? x[k] : m;
    return m;
}

/* F(theta) of fastnewton.Objective for one problem; E, p, h are scratch */
static double value(const Shape *s, const double *th, const double *w, const double *lin,
                    double cst, const double *lref, double c, double *E, double *p,
                    double *h) {
    const int K = s->K;
    const double a = s->a, mx = max_of(th, K);
    for (int k = 0; k < K; k++) E[k] = exp(a * (th[k] - mx));
    double out = cst;
    for (int m = 0; m < s->M; m++) {
        const int64_t i = s->pi[m], j = s->pj[m];
        const double T = E[i] + E[j];
        double sp; /* softplus(-z) = -ln sigma(z) = ln(E_i + E_j) - ln E_i, z = a(th_i - th_j) */
        if (T > 0.0) {
            sp = log(T) - a * (th[i] - mx);
        } else { /* both underflowed (gaps > 1400/a) */
            const double z = a * (th[i] - th[j]);
            sp = log1p(exp(-fabs(z))) + (z < 0.0 ? -z : 0.0);
        }
        out += sp * w[m];
    }
    for (int k = 0; k < K; k++) out += lin[k] * th[k];
    if (c != 0.0) out += c * kl_parts(s, th, mx, lref, p, h);
    if (s->ridge != 0.0) {
        double mean = 0.0, ss = 0.0;
        for (int k = 0; k < K; k++) mean += th[k];
        mean /= K;
        for (int k = 0; k < K; k++) ss += (th[k] - mean) * (th[k] - mean);
        out += 0.5 * s->ridge * ss;
    }
    return out;
}

/* gradient into g, Hessian (row-major K x K) into H (fastnewton._Batch.grad_hess) */
static void grad_hess(const Shape *s, const double *th, const double *w, const double *q,
                      const double *lref, double c, double *g, double *H, double *E,
                      double *p, double *h) {
    const int K = s->K;
    const double a = s->a, mx = max_of(th, K);
    for (int k = 0; k < K; k++) {
        E[k] = exp(a * (th[k] - mx));
        g[k] = 0.0;
    }
    memset(H, 0, sizeof(double) * K * K);
    for (int m = 0; m < s->M; m++) {
        const int64_t i = s->pi[m], j = s->pj[m];
        const double T = E[i] + E[j];
        double sij, sji;
        if (T > 0.0) { /* sigma(z_ij) = E_i / (E_i + E_j) */
            sij = E[i] / T;
            sji = E[j] / T;
        } else { /* both underflowed: sigma from the difference */
            const double e = exp(-fabs(a * (th[i] - th[j])));
            const double big = 1.0 / (1.0 + e), small = e / (1.0 + e);
            sij = th[i] >= th[j] ? big : small;
            sji = th[i] >= th[j] ? small : big;
        }
        const double aw = a * w[m];
        g[i] += aw * (sij + q[m] - 1.0);
        g[j] += aw * (sji - q[m]);
        const double A = sij * sji * aw * a; /* a^2 w sigma(z) sigma(-z) = w psi'' */
        H[i * K + j] -= A;
        H[j * K + i] -= A;
        H[i * K + i] += A;
        H[j * K + j] += A;
    }
    if (c != 0.0) { /* c KL(softmax theta || pi0): gradient p (h - p.h) */
        const double kl = kl_parts(s, th, mx, lref, p, h);
        for (int k = 0; k < K; k++) h[k] = p[k] * (h[k] - kl); /* h <- the KL gradient */
        for (int k = 0; k < K; k++) {
            const double uk = h[k] + 0.5 * p[k];
            g[k] += c * h[k];
            for (int l = 0; l < K; l++) {
                const double ul = h[l] + 0.5 * p[l];
                H[k * K + l] -= c * p[k] * ul + c * p[l] * uk;
            }
            H[k * K + k] += c * (h[k] + p[k]);
        }
    }
    if (s->ridge != 0.0) {
        double mean = 0.0;
        for (int k = 0; k < K; k++) mean += th[k];
        mean /= K;
        for (int k = 0; k < K; k++) {
            g[k] += s->ridge * (th[k] - mean);
            for (int l = 0; l < K; l++) H[k * K + l] -= s->ridge / K;
            H[k * K + k] += s->ridge;
        }
    }
}

typedef struct {
    double *g, *H, *step, *L, *inv, *tmp, *d, *e, *y, *th, *trial, *E, *p, *h, *rot_cs;
    int *rot_i;
    int max_rot;
} Scratch;

/* Solve (H + c 11^T/K) s = -g in the centred subspace, |eigenvalues| where the Cholesky
 * factorisation fails (fastnewton.newton_step). Centres g in place; returns -g.s. */
static double newton_step(int K, Scratch *w) {
    double *g = w->g, *H = w->H, *L = w->L, *step = w->step;
    double mean = 0.0, scale = 0.0;
    for (int k = 0; k < K; k++) mean += g[k];
    mean /= K;
    for (int k = 0; k < K; k++) {
        g[k] -= mean;
        scale += fabs(H[k * K + k]);
    }
    scale = scale / K > 1e-300 ? scale / K : 1e-300;
    for (int i = 0; i < K * K; i++) L[i] = H[i] + scale / K;
    int ok = 1;
    for (int j = 0; j < K && ok; j++) { /* Cholesky in the lower triangle; 1/L_jj in inv */
        double s = L[j * K + j];
        for (int k = 0; k < j; k++) s -= L[j * K + k] * L[j * K + k];
        if (!(s > 0.0)) {
            ok = 0;
            break;
        }
        const double dj = sqrt(s), inv = 1.0 / dj;
        L[j * K + j] = dj;
        w->inv[j] = inv;
        for (int i = j + 1; i < K; i++) {
            double t = L[i * K + j];
            for (int k = 0; k < j; k++) t -= L[i * K + k] * L[j * K + k];
            L[i * K + j] = t * inv;
        }
    }
    if (ok) {
        for (int j = 0; j < K; j++) {
            double s = -g[j];
            for (int k = 0; k < j; k++) s -= L[j * K + k] * w->tmp[k];
            w->tmp[j] = s * w->inv[j];
        }
        for (int j = K - 1; j >= 0; j--) {
            double s = w->tmp[j];
            for (int k = j + 1; k < K; k++) s -= L[k * K + j] * step[k];
            step[j] = s * w->inv[j];
        }
    } else { /* indefinite (the KL is not convex in logits): the |eigenvalue| step */
        for (int i = 0; i < K * K; i++) L[i] = H[i] + scale / K;
        newton_abs_step(K, L, g, step, w->d, w->e, w->y, w->rot_i, w->rot_cs, w->max_rot);
    }
    double smean = 0.0, dec = 0.0;
    for (int k = 0; k < K; k++) smean += step[k];
    smean /= K;
    for (int k = 0; k < K; k++) {
        step[k] -= smean;
        dec -= g[k] * step[k];
    }
    return dec;
}

/* Problems start:stop: the loop of fastnewton._solve_queue for one problem at a time.
 * Returns 0 on success, -1 when scratch memory could not be allocated. */
int solve_range(int64_t start, int64_t stop, int K, int M, const double *theta0,
                double *theta, int8_t *status, const int64_t *cols,
                const double *W, const double *Q, const double *LIN, const double *CONST,
                const double *LREF, const double *kl, double a, double ridge,
                const int64_t *pi, const int64_t *pj, int max_iter, double max_step,
                double near, double quadratic, double tol) {
    const Shape s = {K, M, pi, pj, a, ridge};
    Scratch w;
    w.max_rot = 64 * K * K;
    double *mem = malloc(sizeof(double) * (3 * K * K + 12 * K + 2 * w.max_rot));
    w.rot_i = malloc(sizeof(int) * w.max_rot);
    if (!mem || !w.rot_i) {
        free(mem);
        free(w.rot_i);
        return -1;
    }
    double *cur = mem;
    double **slots[] = {&w.g, &w.step, &w.inv, &w.tmp, &w.d, &w.e, &w.y, &w.th, &w.trial,
                        &w.E, &w.p, &w.h};
    for (int k = 0; k < 12; k++, cur += K) *slots[k] = cur;
    w.H = cur;
    w.L = cur + K * K;
    w.rot_cs = cur + 3 * K * K;
    for (int64_t pr = start; pr < stop; pr++) {
        const int64_t col = cols[pr];
        const double *wt = W + col * M, *q = Q + col * M, *lin = LIN + col * K;
        const double *lref = LREF + col * K, c = kl[pr], cst = CONST[col];
        double *out = theta + pr * K, *th = w.th, *step = w.step;
        memcpy(th, theta0 + pr * K, sizeof(double) * K);
        double F = NAN, dec_prev = INFINITY;
        int its = 0;
        for (;;) {
            grad_hess(&s, th, wt, q, lref, c, w.g, w.H, w.E, w.p, w.h);
            const double dec = newton_step(K, &w);
            const int stalled = dec < 1e-12 && dec > 0.25 * dec_prev;
            if (dec < quadratic && !stalled) { /* one more full step: theta exact to ~dec */
                for (int k = 0; k < K; k++) out[k] = th[k] + step[k];
                status[pr] = CONVERGED;
                break;
            }
            if (stalled || !(dec >= tol)) {
                memcpy(out, th, sizeof(double) * K);
                status[pr] = stalled ? STALLED : CONVERGED;
                break;
            }
            double big = 0.0;
            for (int k = 0; k < K; k++) big = fabs(step[k]) > big ? fabs(step[k]) : big;
            const double cap = max_step / (big > max_step ? big : max_step); /* trust cap */
            for (int k = 0; k < K; k++) step[k] *= cap;
            if (dec > near) { /* Armijo backtracking, quadratic interpolation */
                if (isnan(F)) F = value(&s, th, wt, lin, cst, lref, c, w.E, w.p, w.h);
                double slope = 0.0, t = 1.0;
                for (int k = 0; k < K; k++) {
                    slope -= w.g[k] * step[k];
                    w.trial[k] = th[k] + step[k];
                }
                double Ft = value(&s, w.trial, wt, lin, cst, lref, c, w.E, w.p, w.h);
                for (int r = 0; r < 30; r++) {
                    if (Ft <= F - 1e-4 * t * slope) break;
                    double curv = Ft - F + t * slope;
                    curv = curv > 1e-300 ? curv : 1e-300;
                    double tn = slope * t * t / (2 * curv);
                    tn = tn > 0.1 * t ? tn : 0.1 * t;
                    t = tn < 0.5 * t ? tn : 0.5 * t;
                    for (int k = 0; k < K; k++) w.trial[k] = th[k] + t * step[k];
                    Ft = value(&s, w.trial, wt, lin, cst, lref, c, w.E, w.p, w.h);
                }
                if (Ft <= F) {
                    memcpy(th, w.trial, sizeof(double) * K);
                    F = Ft;
                }
            } else {
                for (int k = 0; k < K; k++) th[k] += step[k];
                F = NAN;
            }
            dec_prev = dec;
            if (++its >= max_iter) {
                memcpy(out, th, sizeof(double) * K);
                status[pr] = UNCONVERGED;
                break;
            }
        }
    }
    free(mem);
    free(w.rot_i);
    return 0;
}

/* F at theta (one row per problem) for problems 0..P-1 */
int values(int64_t P, int K, int M, const double *theta, const int64_t *cols,
           const double *W, const double *LIN, const double *CONST, const double *LREF,
           const double *kl, double a, double ridge, const int64_t *pi, const int64_t *pj,
           double *out) {
    const Shape s = {K, M, pi, pj, a, ridge};
    double *mem = malloc(sizeof(double) * 3 * K);
    if (!mem) return -1;
    for (int64_t pr = 0; pr < P; pr++) {
        const int64_t col = cols[pr];
        out[pr] = value(&s, theta + pr * K, W + col * M, LIN + col * K, CONST[col],
                        LREF + col * K, kl[pr], mem, mem + K, mem + 2 * K);
    }
    free(mem);
    return 0;
}

/* an importable (empty) module, so that setuptools builds and installs it like any other
 * extension; the functions above are called through ctypes */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_newton", NULL, -1, NULL,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__newton(void) { return PyModule_Create(&module); }
