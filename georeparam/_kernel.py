r"""An optional compiled CPU kernel for the GmP map ``(r, φ) → r·u(φ)`` and its gradient.

Plain C (no torch headers, so it builds in about a second), compiled on first use with the
system's C compiler, cached, and called through :mod:`ctypes` on the tensors' memory. Where no
compiler is found, the build fails, the platform is not supported, or ``GEOREPARAM_NO_FAST_PATHS=1``
is set, :func:`load` returns ``None`` and :mod:`georeparam._fused` uses its pure-torch map (the
two are tested to agree, ``tests/test_kernel.py``).

# Note [The kernel]
One pass per row forward and one backward, everything in float64 whatever the storage dtype:

* sines and cosines by an own branch-free polynomial (fdlibm's kernel coefficients after a
  three-part Cody–Waite reduction by π/2, |error| ≤ ~2e-16), in a loop the compiler vectorizes;
  a row with an angle beyond 1e6 (or not finite) takes libm's ``sin``/``cos`` instead;
* forward: ``E_k = ∏_{j<k} cos φ_j`` by a running product, ``w_k = r·sin φ_k·E_k`` (then the
  last pair ``r·E_m·(cos θ, sin θ)``), rounded once to the storage dtype;
* backward recomputes the sines/cosines and ``E`` (nothing is saved but the inputs) and runs one
  reverse recurrence ``R_{k-1} = g_k sin φ_k + cos φ_k R_k`` (``R_{m-1} = g_m cos θ + g_{m+1} sin θ``),
  so that ``∂/∂φ_k = r·E_k·(g_k cos φ_k − sin φ_k R_k)``, ``∂/∂θ = r·E_m·(g_{m+1} cos θ − g_m sin θ)``
  and ``∂/∂r = R_{-1} = Σ g_i u_i``. There is no division: the pole's ``1/cos φ`` of the
  ``tan φ`` form never appears, so the gradient is exact next to the poles too.
* Four rows go through the two scans side by side (four independent dependency chains); the
  float64 scratch (three rows of doubles per row in flight) stays in cache.

Instruction sets: x86-64 builds carry three versions of each loop (``target_clones``: AVX-512,
AVX2+FMA and baseline x86-64) and the loader picks one by the CPU it runs on; other platforms get
one portable build. Nothing assumes an instruction set.

Threads: ctypes releases the GIL, so a large weight is split into row ranges that
``torch.get_num_threads()`` Python threads run at once (:func:`georeparam._fused`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

SOURCE = r"""
#include <math.h>
#include <stdlib.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(GMP_CLONES_OK)
#define GMP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GMP_CLONES
#endif
#define GMP_INLINE static inline __attribute__((always_inline))

/* fdlibm's π/2 in three 33-bit parts and its sin/cos kernel coefficients on [-π/4, π/4] */
#define PIO2_1 1.57079632673412561417e+00
#define PIO2_2 6.07710050630396597660e-11
#define PIO2_3 2.02226624871116645580e-21
#define S1 -1.66666666666666324348e-01
#define S2 8.33333333332248946124e-03
#define S3 -1.98412698298579493134e-04
#define S4 2.75573137070700676789e-06
#define S5 -2.50507602534068634195e-08
#define S6 1.58969099521155010221e-10
#define C1 4.16666666666666019037e-02
#define C2 -1.38888888888741095749e-03
#define C3 2.48015872894767294178e-05
#define C4 -2.75573143513906633035e-07
#define C5 2.08757232129817482790e-09
#define C6 -1.13596475577881948265e-11
#define MAGIC 6755399441055744.0 /* 1.5·2^52: (x + MAGIC) − MAGIC rounds x to an integer */
#define LIMIT 1e6

GMP_INLINE void sincos_poly(double x, double *s, double *c, int f32) {
    double q = (x * 0.63661977236758134308 + MAGIC) - MAGIC;  /* nearest multiple of π/2 */
    double f = ((q * 0.25 - 0.375) + MAGIC) - MAGIC;          /* floor(q / 4) */
    double qi = q - 4.0 * f;                                  /* quadrant 0..3 */
    int odd = (qi == 1.0) | (qi == 3.0);
    double sr, cr;
    if (f32) {
        /* Note [float32 lanes]: for float32 storage the polynomials run in float (twice the
           lanes), on r = x − qπ/2 reduced in double. sin r is good to ~1 ulp of float, and the
           cosine is carried as 1 − cos r (= z/2 − z²/24 + …, no cancellation), so that the
           float64 running product of cos φ = 1 − d keeps d's relative precision: the product's
           error is ~eps32·|log ∏ cos φ|, not ~n·eps32. Coefficients: Cephes' sinf/cosf. */
        float r = (float)((x - q * PIO2_1) - q * PIO2_2);
        float z = r * r;
        float s32 = r + r * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f));
        float d32 = z * (0.5f - z * (4.166664568298827e-2f - z * (1.388731625493765e-3f - z * 2.443315711809948e-5f)));
        double sd = (double)s32, dd = (double)d32;
        sr = sd;
        cr = 1.0 - dd;
    } else {
        double r = ((x - q * PIO2_1) - q * PIO2_2) - q * PIO2_3;  /* |r| ≤ π/4 */
        double z = r * r;
        sr = r + r * z * (S1 + z * (S2 + z * (S3 + z * (S4 + z * (S5 + z * S6)))));
        cr = (1.0 - 0.5 * z) + z * z * (C1 + z * (C2 + z * (C3 + z * (C4 + z * (C5 + z * C6)))));
    }
    double ss = odd ? cr : sr, cc = odd ? sr : cr;
    *s = (qi >= 2.0) ? -ss : ss;
    *c = ((qi == 1.0) | (qi == 2.0)) ? -cc : cc;
}

/* sin/cos of a[0..len) into s, c; returns nonzero where the polynomial path does not apply */
#define DEF_SINCOS(T, SUF, F32)                                                    \
GMP_CLONES static int sincos_row_##SUF(const T *a, double *s, double *c, long len) { \
    int bad = 0;                                                                   \
    for (long k = 0; k < len; k++) {                                               \
        double x = (double)a[k];                                                   \
        bad |= !(fabs(x) <= LIMIT);                                                \
        sincos_poly(x, &s[k], &c[k], F32);                                         \
    }                                                                              \
    return bad;                                                                    \
}                                                                                  \
static void sincos_##SUF(const T *a, double *s, double *c, long len) {             \
    if (sincos_row_##SUF(a, s, c, len))                                            \
        for (long k = 0; k < len; k++) { s[k] = sin((double)a[k]); c[k] = cos((double)a[k]); } \
}                                                                                  \
/* w[k] = r·s[k]·E[k] */                                                           \
GMP_CLONES static void scale_row_##SUF(T *w, const double *s, const double *E, double r, long m) { \
    for (long k = 0; k < m; k++) w[k] = (T)(r * (s[k] * E[k]));                    \
}                                                                                  \
/* A[k] = g[k]·s[k] */                                                             \
GMP_CLONES static void gs_row_##SUF(double *A, const T *g, const double *s, long m) { \
    for (long k = 0; k < m; k++) A[k] = (double)g[k] * s[k];                       \
}                                                                                  \
/* ga[k] = r·E[k]·(g[k]·c[k] − s[k]·R[k]) */                                       \
GMP_CLONES static void grad_row_##SUF(T *ga, const T *g, const double *s, const double *c, \
                                      const double *E, const double *R, double r, long m) { \
    for (long k = 0; k < m; k++) ga[k] = (T)(r * (E[k] * ((double)g[k] * c[k] - s[k] * R[k]))); \
}

DEF_SINCOS(float, f32, 1)
DEF_SINCOS(double, f64, 0)

/* rows [r0, r1) of a (rows, n-1) angle matrix → w (rows, n); returns 0, or 1 if out of memory.
   Blocks of four rows: the running products of the four run side by side (four dependency
   chains), everything else is a vectorized pass over one row. */
#define DEF_FORWARD(T, SUF)                                                        \
int gmp_forward_##SUF(const T *a, const T *radius, T *w, long r0, long r1, long n) { \
    long m = n - 2, len = n - 1;                                                   \
    double *buf = (double *)malloc(sizeof(double) * 8 * (size_t)(len > 0 ? len : 1)); \
    if (!buf) return 1;                                                            \
    for (long i = r0; i < r1; i += 4) {                                            \
        T *wr[4]; double *s[4], *c[4], rr[4], P[4];                                \
        for (int j = 0; j < 4; j++) {                                              \
            long row = i + j < r1 ? i + j : r1 - 1; /* a short block repeats its last row */ \
            wr[j] = w + row * n; rr[j] = (double)radius[row];                      \
            s[j] = buf + (2 * j) * len; c[j] = buf + (2 * j + 1) * len; P[j] = 1.0;  \
            sincos_##SUF(a + row * len, s[j], c[j], len);                          \
        }                                                                          \
        for (long k = 0; k < m; k++)                                               \
            for (int j = 0; j < 4; j++) {                                          \
                double ck = c[j][k];                                               \
                c[j][k] = P[j]; /* c becomes E_k = ∏_{i<k} cos φ_i */             \
                P[j] *= ck;                                                        \
            }                                                                      \
        for (int j = 0; j < 4; j++) {                                              \
            scale_row_##SUF(wr[j], s[j], c[j], rr[j], m);                          \
            double e = rr[j] * P[j];                                               \
            wr[j][m] = (T)(e * c[j][m]);                                           \
            wr[j][m + 1] = (T)(e * s[j][m]);                                       \
        }                                                                          \
    }                                                                              \
    free(buf);                                                                     \
    return 0;                                                                      \
}

/* gradients of <g, w> for rows [r0, r1): ga (rows, n-1) and gr (rows) */
#define DEF_BACKWARD(T, SUF)                                                       \
int gmp_backward_##SUF(const T *a, const T *radius, const T *g, T *ga, T *gr,      \
                       long r0, long r1, long n) {                                 \
    long m = n - 2, len = n - 1;                                                   \
    double *buf = (double *)malloc(sizeof(double) * 16 * (size_t)(len > 0 ? len : 1)); \
    if (!buf) return 1;                                                            \
    for (long i = r0; i < r1; i += 4) {                                            \
        const T *gw[4]; T *gar[4]; double *s[4], *c[4], *E[4], *A[4], rr[4], P[4], R[4]; \
        long rows[4];                                                              \
        for (int j = 0; j < 4; j++) {                                              \
            long row = i + j < r1 ? i + j : r1 - 1;                                \
            rows[j] = row;                                                         \
            gw[j] = g + row * n; gar[j] = ga + row * len;                          \
            rr[j] = (double)radius[row]; P[j] = 1.0;                               \
            s[j] = buf + (4 * j) * len; c[j] = s[j] + len; E[j] = c[j] + len; A[j] = E[j] + len; \
            sincos_##SUF(a + row * len, s[j], c[j], len);                          \
            gs_row_##SUF(A[j], gw[j], s[j], m);                                    \
        }                                                                          \
        for (long k = 0; k < m; k++)                                               \
            for (int j = 0; j < 4; j++) { E[j][k] = P[j]; P[j] *= c[j][k]; }       \
        for (int j = 0; j < 4; j++) {                                              \
            double gm = (double)gw[j][m], gn = (double)gw[j][m + 1];               \
            gar[j][m] = (T)(rr[j] * (P[j] * (gn * c[j][m] - gm * s[j][m])));       \
            R[j] = gm * c[j][m] + gn * s[j][m];                                    \
        }                                                                          \
        for (long k = m - 1; k >= 0; k--)                                          \
            for (int j = 0; j < 4; j++) {                                          \
                double ak = A[j][k];                                               \
                A[j][k] = R[j]; /* A becomes R_k, the sum after k */               \
                R[j] = ak + c[j][k] * R[j];                                        \
            }                                                                      \
        for (int j = 0; j < 4; j++) {                                              \
            grad_row_##SUF(gar[j], gw[j], s[j], c[j], E[j], A[j], rr[j], m);       \
            gr[rows[j]] = (T)R[j];                                                 \
        }                                                                          \
    }                                                                              \
    free(buf);                                                                     \
    return 0;                                                                      \
}

DEF_FORWARD(float, f32)
DEF_FORWARD(double, f64)
DEF_BACKWARD(float, f32)
DEF_BACKWARD(double, f64)

/* the polynomial sin/cos on their own, for tests */
int gmp_sincos_f64(const double *a, double *s, double *c, long len) {
    sincos_f64(a, s, c, len);
    return 0;
}
"""

_FLAGS = ["-O3", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-std=gnu99", "-ffp-contract=fast"]
_LIB: Optional[ctypes.CDLL] = None
_TRIED = False
_STATUS = "not loaded yet"


def disabled() -> bool:
    """``GEOREPARAM_NO_FAST_PATHS=1`` (or any value but ``0``/empty) turns every fast path off."""
    return os.environ.get("GEOREPARAM_NO_FAST_PATHS", "0") not in ("", "0")


def _cache_dir() -> str:
    root = os.environ.get("GEOREPARAM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "georeparam"
    )
    return root


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return shutil.which(cc)
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _is_gcc(cc: str) -> bool:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" not in out.lower() and ("gcc" in out.lower() or "free software foundation" in out.lower())


def _build(cc: str, path: str) -> None:
    defines = []
    if platform.machine() in ("x86_64", "AMD64") and sys.platform.startswith("linux") and _is_gcc(cc):
        defines = ["-DGMP_CLONES_OK"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, src = tempfile.mkstemp(suffix=".c", dir=os.path.dirname(path))
    tmp = src[:-2] + ".so"
    try:
        with os.fdopen(fd, "w") as f:
            f.write(SOURCE)
        print(f"georeparam: compiling the fused CPU kernel once (cached in {os.path.dirname(path)})", file=sys.stderr)
        subprocess.run([cc, *_FLAGS, *defines, src, "-o", tmp, "-lm"], check=True, capture_output=True, timeout=300)
        os.replace(tmp, path)  # atomic: a concurrent build by another process is harmless
    finally:
        for p in (src, tmp):
            if os.path.exists(p):
                os.remove(p)


def _bind(lib: ctypes.CDLL) -> None:
    p, L = ctypes.c_void_p, ctypes.c_long
    for suf in ("f32", "f64"):
        f = getattr(lib, f"gmp_forward_{suf}")
        f.argtypes, f.restype = [p, p, p, L, L, L], ctypes.c_int
        b = getattr(lib, f"gmp_backward_{suf}")
        b.argtypes, b.restype = [p, p, p, p, p, L, L, L], ctypes.c_int
    lib.gmp_sincos_f64.argtypes, lib.gmp_sincos_f64.restype = [p, p, p, L], ctypes.c_int


def load() -> Optional[ctypes.CDLL]:
    """The compiled kernel, built on first use and cached; ``None`` where it cannot be had.

    :func:`status` says why. Never raises: any failure leaves the pure-torch map in use.
    """
    global _LIB, _TRIED, _STATUS
    if disabled():
        _STATUS = "off (GEOREPARAM_NO_FAST_PATHS)"
        return None
    if _TRIED:
        return _LIB
    _TRIED = True
    if not sys.platform.startswith(("linux", "darwin")):
        _STATUS = f"not built on {sys.platform}: the pure-torch map is used"
        return None
    cc = _compiler()
    if cc is None:
        _STATUS = "no C compiler found (set CC): the pure-torch map is used"
        return None
    key = hashlib.sha256((SOURCE + " ".join(_FLAGS) + cc + platform.machine()).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"gmp_kernel_{key}.so")
    try:
        if not os.path.exists(path):
            _build(cc, path)
        lib = ctypes.CDLL(path)
        _bind(lib)
    except Exception as e:  # noqa: BLE001 — any failure means: use the pure-torch map
        msg = getattr(e, "stderr", b"") or b""
        msg = msg.decode(errors="replace") if isinstance(msg, bytes) else str(msg)
        _STATUS = f"build/load failed ({type(e).__name__}: {str(e)[:200]} {msg[:300]}): the pure-torch map is used"
        return None
    _LIB = lib
    _STATUS = f"loaded {path}"
    return lib


def status() -> str:
    """One line: whether the compiled kernel is in use, and if not, why."""
    return _STATUS
