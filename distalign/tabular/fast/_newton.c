/* The toy's damped Newton, one K x K problem at a time, in C (see compiled.py).
 *
 * The same objective, steps, stopping rules and line search as newton.py's _solve_queue (the
 * rules of tabular/rules.py, passed in), so the same optima; numpy pays a pass over memory per elementwise operation, which for K = 10
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

#include "_newton.h"

int distalign_newton_abi(void) { return DISTALIGN_NEWTON_ABI; }

int newton_rules_bytes(void) { return (int)sizeof(newton_rules); }

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

/* F(theta) of newton.py's Objective for one problem; E, p, h are scratch */
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

/* gradient into g, Hessian (row-major K x K) into H (newton.py: _Batch.grad_hess) */
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
 * factorisation fails (newton.py: newton_step). Centres g in place; -g.s into *dec. Returns
 * newton_abs_step's code (NEWTON_NO_EIGEN: step and *dec unset). */
static int newton_step(int K, Scratch *w, const newton_rules *rules, double *dec) {
    double *g = w->g, *H = w->H, *L = w->L, *step = w->step;
    double mean = 0.0, scale = 0.0;
    for (int k = 0; k < K; k++) mean += g[k];
    mean /= K;
    for (int k = 0; k < K; k++) {
        g[k] -= mean;
        scale += fabs(H[k * K + k]);
    }
    scale = scale / K > rules->tiny ? scale / K : rules->tiny;
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
        const int code = newton_abs_step(K, L, g, step, w->d, w->e, w->y, w->rot_i, w->rot_cs,
                                         w->max_rot, rules);
        if (code != NEWTON_OK) return code;
    }
    double smean = 0.0;
    for (int k = 0; k < K; k++) smean += step[k];
    smean /= K;
    *dec = 0.0;
    for (int k = 0; k < K; k++) {
        step[k] -= smean;
        *dec -= g[k] * step[k];
    }
    return NEWTON_OK;
}

/* Problems start:stop: the loop of newton.py's _solve_queue for one problem at a time.
 * Returns NEWTON_OK; NEWTON_NO_MEMORY (nothing solved) when scratch memory could not be
 * allocated; NEWTON_NO_EIGEN when the eigen-solver gave up on some problems, whose status is
 * then NEWTON_FAILED (the others are solved). */
int solve_range(int64_t start, int64_t stop, int K, int M, const double *theta0,
                double *theta, int8_t *status, const int64_t *cols, const double *W,
                const double *Q, const double *LIN, const double *CONST, const double *LREF,
                const double *kl, double a, double ridge, const int64_t *pi,
                const int64_t *pj, const newton_rules *rules) {
    const Shape s = {K, M, pi, pj, a, ridge};
    const newton_rules *r = rules;
    Scratch w;
    w.max_rot = NEWTON_MAX_ROT(K, r->ql_sweeps);
    double *mem = malloc(sizeof(double) * (3 * K * K + 12 * K + 2 * w.max_rot));
    w.rot_i = malloc(sizeof(int) * w.max_rot);
    if (!mem || !w.rot_i) {
        free(mem);
        free(w.rot_i);
        return NEWTON_NO_MEMORY;
    }
    int result = NEWTON_OK;
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
            double dec;
            if (newton_step(K, &w, r, &dec) != NEWTON_OK) { /* numpy's solver takes it */
                memcpy(out, th, sizeof(double) * K);
                status[pr] = NEWTON_FAILED;
                result = NEWTON_NO_EIGEN;
                break;
            }
            const int stalled = dec < r->stall_decrement && dec > r->stall_ratio * dec_prev;
            if (dec < r->quadratic && !stalled) { /* one more full step: theta exact to ~dec */
                for (int k = 0; k < K; k++) out[k] = th[k] + step[k];
                status[pr] = NEWTON_CONVERGED;
                break;
            }
            if (stalled || !(dec >= r->tol)) {
                memcpy(out, th, sizeof(double) * K);
                status[pr] = stalled ? NEWTON_STALLED : NEWTON_CONVERGED;
                break;
            }
            double big = 0.0;
            for (int k = 0; k < K; k++) big = fabs(step[k]) > big ? fabs(step[k]) : big;
            const double cap = r->max_step / (big > r->max_step ? big : r->max_step); /* trust */
            for (int k = 0; k < K; k++) step[k] *= cap;
            if (dec > r->near) { /* Armijo backtracking, quadratic interpolation */
                if (isnan(F)) F = value(&s, th, wt, lin, cst, lref, c, w.E, w.p, w.h);
                double slope = 0.0, t = 1.0;
                for (int k = 0; k < K; k++) {
                    slope -= w.g[k] * step[k];
                    w.trial[k] = th[k] + step[k];
                }
                double Ft = value(&s, w.trial, wt, lin, cst, lref, c, w.E, w.p, w.h);
                for (int b = 0; b < r->backtracks; b++) {
                    if (Ft <= F - r->armijo * t * slope) break;
                    double curv = Ft - F + t * slope;
                    curv = curv > r->tiny ? curv : r->tiny;
                    double tn = slope * t * t / (2 * curv);
                    tn = tn > r->shrink_min * t ? tn : r->shrink_min * t;
                    t = tn < r->shrink_max * t ? tn : r->shrink_max * t;
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
            if (++its >= r->max_iter) {
                memcpy(out, th, sizeof(double) * K);
                status[pr] = NEWTON_UNCONVERGED;
                break;
            }
        }
    }
    free(mem);
    free(w.rot_i);
    return result;
}

/* F at theta (one row per problem) for problems 0..P-1; NEWTON_NO_MEMORY if no scratch */
int values(int64_t P, int K, int M, const double *theta, const int64_t *cols,
           const double *W, const double *LIN, const double *CONST, const double *LREF,
           const double *kl, double a, double ridge, const int64_t *pi, const int64_t *pj,
           double *out) {
    const Shape s = {K, M, pi, pj, a, ridge};
    double *mem = malloc(sizeof(double) * 3 * K);
    if (!mem) return NEWTON_NO_MEMORY;
    for (int64_t pr = 0; pr < P; pr++) {
        const int64_t col = cols[pr];
        out[pr] = value(&s, theta + pr * K, W + col * M, LIN + col * K, CONST[col],
                        LREF + col * K, kl[pr], mem, mem + K, mem + 2 * K);
    }
    free(mem);
    return NEWTON_OK;
}

/* an importable (empty) module, so that setuptools builds and installs it like any other
 * extension; the functions above are called through ctypes */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_newton", NULL, -1, NULL,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__newton(void) { return PyModule_Create(&module); }
