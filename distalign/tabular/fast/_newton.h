/* The compiled Newton solver's interface: included by _newton.c and _abs_step.c, and
 * mirrored by compiled.py (SIGNATURES, Rules), which tests/test_tabular_cnewton.py checks
 * against this file. Change anything here, and bump DISTALIGN_NEWTON_ABI with compiled.py's
 * ABI_VERSION: an extension built from an older header is then refused on load, and the toy
 * runs numpy's solver instead of calling it with the wrong arguments.
 */
#ifndef DISTALIGN_NEWTON_H
#define DISTALIGN_NEWTON_H

#include <stdint.h>

#define DISTALIGN_NEWTON_ABI 2

/* distalign/tabular/rules.py, passed in on every call (see there for each one's meaning) */
typedef struct {
    int max_iter, backtracks, ql_sweeps;
    double tol, quadratic, near, max_step, stall_decrement, stall_ratio, armijo, shrink_min,
        shrink_max, eig_floor, tiny;
} newton_rules;

/* return codes */
enum { NEWTON_OK = 0, NEWTON_NO_MEMORY = 1, NEWTON_NO_EIGEN = 2 };
/* how a problem's solve ended (rules.py: CONVERGED, STALLED, UNCONVERGED, FAILED) */
enum { NEWTON_CONVERGED = 0, NEWTON_STALLED = 1, NEWTON_UNCONVERGED = 2, NEWTON_FAILED = 3 };

/* exported, called through ctypes */
int distalign_newton_abi(void);
int newton_rules_bytes(void);
int solve_range(int64_t start, int64_t stop, int K, int M, const double *theta0,
                double *theta, int8_t *status, const int64_t *cols, const double *W,
                const double *Q, const double *LIN, const double *CONST, const double *LREF,
                const double *kl, double a, double ridge, const int64_t *pi,
                const int64_t *pj, const newton_rules *rules);
int values(int64_t P, int K, int M, const double *theta, const int64_t *cols,
           const double *W, const double *LIN, const double *CONST, const double *LREF,
           const double *kl, double a, double ridge, const int64_t *pi, const int64_t *pj,
           double *out);
int abs_newton_step(int K, const double *A, const double *g, double *step,
                    const newton_rules *rules);

/* _abs_step.c, for _newton.c */
int newton_abs_step(int K, double *A, const double *g, double *step, double *d, double *e,
                    double *y, int *rot_i, double *rot_cs, int max_rot,
                    const newton_rules *rules);
/* room for the rotations of newton_abs_step: at most K - 1 per sweep, ql_sweeps sweeps for
 * each of K eigenvalues */
#define NEWTON_MAX_ROT(K, sweeps) ((sweeps) * (K) * (K) + 1)

#endif
