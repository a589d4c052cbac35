r"""An optional compiled CPU kernel for the GmP map ``(r, φ) → r·u(φ)`` and its gradient.

Plain C (no torch headers, so it builds in about a second), compiled on first use with the
system's C compiler, cached, and called through :mod:`ctypes` on the tensors' memory. Where no
compiler is found, the build fails, the platform is not supported, or ``GEOREPARAM_NO_FAST_PATHS=1``
is set, :func:`load` returns ``None`` and :mod:`georeparam._fused` uses its pure-torch map (the
two are tested to agree, ``tests/test_kernel.py``).

# Note [The kernel]
Everything in float64 whatever the storage dtype, rounded once:

* sines and cosines by own branch-free polynomials in a loop the compiler vectorizes: float64
  angles by fdlibm's kernel after a three-part Cody–Waite reduction (|error| ≤ ~2e-16), float32
  angles in float with the cosine carried as 1 − cos (Note [float32 angles]); a chunk of angles
  all within ±π/4 skips the reduction (Note [Small angles]); a row with an angle beyond the
  polynomial's range (1e6, float32: 4096) or not finite takes libm's ``sin``/``cos`` instead;
* forward, one row at a time in chunks of 256 angles (their sines and cosines stay in L1):
  ``E_k = ∏_{j<k} cos φ_j`` by a running product on blocks of eight (Note [Blocks of eight]),
  ``w_k = r·sin φ_k·E_k`` (then the last pair ``r·E_m·(cos θ, sin θ)``), written straight out;
* backward recomputes the sines/cosines and ``E`` (nothing is saved but the inputs: extra memory
  like weight norm's) and runs one reverse recurrence ``R_{k-1} = g_k sin φ_k + cos φ_k R_k``
  (``R_{m-1} = g_m cos θ + g_{m+1} sin θ``), so that
  ``∂/∂φ_k = r·E_k·(g_k cos φ_k − sin φ_k R_k)``, ``∂/∂θ = r·E_m·(g_{m+1} cos θ − g_m sin θ)``
  and ``∂/∂r = R_{-1} = Σ g_i u_i``. There is no division: the pole's ``1/cos φ`` of the
  ``tan φ`` form never appears, so the gradient is exact next to the poles too.

Measured (``benchmarks/speed.py``, 1 thread): the first version ran the two scans as scalar
chains, four rows side by side, over float64 scratch rows; the scan was then about a third of
the forward. Blocks of eight and chunks took the kernel from ~2.7 + 4.1 ns to ~1.4 + 2.1 ns per
weight (forward + backward, 512×4608, uniform angles), the float32 reduction ~0.3 ns of that;
on random-init rows (1024×784) it runs at ~1.0 + 1.6 ns with Note [Small angles].

Instruction sets: x86-64 builds carry three versions of each loop (``target_clones``: AVX-512,
AVX2+FMA and baseline x86-64) and the loader picks one by the CPU it runs on; other platforms get
one portable build. Nothing assumes an instruction set (the baseline, x86-64-v2 and -v3 builds
were checked to give the AVX-512 build's values).

Threads: where the process already has GNU OpenMP (torch's CPU builds on Linux), the library is
built with ``-fopenmp`` and splits rows on torch's own pool; otherwise, or if that build fails,
without, and :mod:`georeparam._fused` splits rows over Python threads (ctypes releases the GIL).
Note [Kernel threads] in ``_fused.py``.
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
#ifdef _OPENMP
#include <omp.h>
#endif

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
#define LIMIT32 4096.0f

/* sin and cos of |r| ≤ π/4 with no reduction: fdlibm's kernel polynomials, to ~2e-16 */
GMP_INLINE void sincos_small_f64(double r, double *s, double *c) {
    double z = r * r;
    *s = r + r * z * (S1 + z * (S2 + z * (S3 + z * (S4 + z * (S5 + z * S6)))));
    *c = (1.0 - 0.5 * z) + z * z * (C1 + z * (C2 + z * (C3 + z * (C4 + z * (C5 + z * C6)))));
}

/* Note [float32 angles]: for float32 storage the sine and cosine run in float (twice the lanes):
   Cody–Waite reduction by π/2 in three float parts (Cephes' sinf constants; exact for
   |x| ≤ 4096, larger angles take libm), Cephes' sinf/cosf polynomials (~1 ulp of float). The
   cosine is carried as d = 1 − cos r (= z/2 − z²/24 + …, no cancellation) and widened to double
   as 1 − d, so that the float64 running product of cos φ keeps d's relative precision: the
   product's error is ~eps32·|log ∏ cos φ|, not ~n·eps32. */
GMP_INLINE void sincos_small_f32(float r, double *s, double *c) {
    float z = r * r;
    float s32 = r + r * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f));
    float d32 = z * (0.5f - z * (4.166664568298827e-2f - z * (1.388731625493765e-3f - z * 2.443315711809948e-5f)));
    *s = (double)s32; *c = 1.0 - (double)d32;
}

/* any float64 angle up to LIMIT: reduced by π/2 to |r| ≤ π/4, then the quadrant's signs */
GMP_INLINE void sincos_poly(double x, double *s, double *c) {
    double q = (x * 0.63661977236758134308 + MAGIC) - MAGIC;  /* nearest multiple of π/2 */
    double f = ((q * 0.25 - 0.375) + MAGIC) - MAGIC;          /* floor(q / 4) */
    double qi = q - 4.0 * f;                                  /* quadrant 0..3 */
    int odd = (qi == 1.0) | (qi == 3.0);
    double sr, cr;
    sincos_small_f64(((x - q * PIO2_1) - q * PIO2_2) - q * PIO2_3, &sr, &cr);
    double ss = odd ? cr : sr, cc = odd ? sr : cr;
    *s = (qi >= 2.0) ? -ss : ss;
    *c = ((qi == 1.0) | (qi == 2.0)) ? -cc : cc;
}

/* any float32 angle up to LIMIT32 (Note [float32 angles]) */
GMP_INLINE void sincos_poly32(float x, double *s, double *c) {
    float q = (x * 0.636619772367581343f + 12582912.0f) - 12582912.0f; /* 1.5·2^23 */
    int qi = (int)q;
    double sd, cd;
    sincos_small_f32(((x - q * 1.5703125f) - q * 4.837512969970703125e-4f) - q * 7.54978995489188216e-8f, &sd, &cd);
    double ss = (qi & 1) ? cd : sd, cc = (qi & 1) ? sd : cd;
    *s = (qi & 2) ? -ss : ss;
    *c = ((qi + 1) & 2) ? -cc : cc;
}
/* one angle; returns nonzero where the polynomial does not apply (then libm's sin/cos) */
GMP_INLINE int sincos_el_f32(float x, double *s, double *c) { sincos_poly32(x, s, c); return !(fabsf(x) <= LIMIT32); }
GMP_INLINE int sincos_el_f64(double x, double *s, double *c) { sincos_poly(x, s, c); return !(fabs(x) <= LIMIT); }

/* Note [Small angles]: the latitudes of a direction are mostly small (φ_k = atan2(w_k, ‖w_{k+1:}‖):
   |φ_k| > π/4 only where one entry outweighs all after it, i.e. near a row's end). A chunk whose
   angles all lie in [-π/4, π/4] skips the reduction and the quadrant: sincos_small_* on x
   itself. Checked 64 angles at a time in the storage dtype, so a chunk of large angles pays for
   one check. Measured (1 thread, fwd + bwd per weight, 1024×784): random-init rows 3.05 → 2.45 ns;
   angles uniform in ±1.5 (every chunk takes the general path) 3.1 → 3.2 ns. */
#define PIO4 0.785398163397448279

/* Note [Blocks of eight]: the running products run on blocks of eight consecutive weights held in
   one vector: inside a block, a prefix product (forward) or a suffix scan of the affine steps
   R_{k-1} = g_k s_k + c_k R_k (backward) by three shift-and-combine steps; from block to block,
   one scalar carries it. GCC's and clang's vector extensions: AVX-512 gets one register per
   block, other targets two or four. */
typedef double v8d __attribute__((vector_size(64)));
typedef long long v8l __attribute__((vector_size(64)));
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define SHUF8(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)
#else
#define SHUF8(x, y, ...) __builtin_shuffle(x, y, (v8l){__VA_ARGS__})
#endif
#define UP1(x, f) SHUF8(x, f, 8, 0, 1, 2, 3, 4, 5, 6)     /* lane l ← x[l-1]; lane 0 ← f[0] */
#define UP2(x, f) SHUF8(x, f, 8, 9, 0, 1, 2, 3, 4, 5)
#define UP4(x, f) SHUF8(x, f, 8, 9, 10, 11, 0, 1, 2, 3)
#define DN1(x, f) SHUF8(x, f, 1, 2, 3, 4, 5, 6, 7, 8)     /* lane l ← x[l+1]; lane 7 ← f[0] */
#define DN2(x, f) SHUF8(x, f, 2, 3, 4, 5, 6, 7, 8, 9)
#define DN4(x, f) SHUF8(x, f, 4, 5, 6, 7, 8, 9, 10, 11)
#define CH 256 /* angles per chunk of the forward: its s and c stay in L1 */

/* Rows split over OpenMP threads where the build has it: torch's own pool (the library is
   loaded into a process where torch's libgomp.so.1 already is, and shares it). */
#ifdef _OPENMP
#define GMP_PRAGMA(x) _Pragma(#x)
#define GMP_PARALLEL(threads, oom) GMP_PRAGMA(omp parallel num_threads(threads) if (threads > 1) reduction(|:oom))
#define GMP_FOR GMP_PRAGMA(omp for schedule(static))
int gmp_openmp(void) { return 1; }
#else
#define GMP_PARALLEL(threads, oom)
#define GMP_FOR
int gmp_openmp(void) { return 0; }
#endif

#define DEF_KERNEL(T, SUF)                                                           \
/* s, c of a[0..len); returns nonzero where the polynomial does not apply */         \
GMP_CLONES static int sincos_fast_##SUF(const T *a, double *s, double *c, long len) { \
    int big = 0; /* Note [Small angles] */                                           \
    for (long k0 = 0; k0 < len && !big; k0 += 64) { /* NaN counts as big */         \
        long k1 = len - k0 < 64 ? len : k0 + 64;                                     \
        for (long k = k0; k < k1; k++) big |= !((a[k] < 0 ? -a[k] : a[k]) <= (T)PIO4); \
    }                                                                                \
    if (!big) {                                                                      \
        for (long k = 0; k < len; k++) sincos_small_##SUF(a[k], &s[k], &c[k]);       \
        return 0;                                                                    \
    }                                                                                \
    int bad = 0;                                                                     \
    for (long k = 0; k < len; k++) bad |= sincos_el_##SUF(a[k], &s[k], &c[k]);       \
    return bad;                                                                      \
}                                                                                    \
static int sincos_##SUF(const T *a, double *s, double *c, long len, int slow) {      \
    if (!slow) return sincos_fast_##SUF(a, s, c, len);                               \
    for (long k = 0; k < len; k++) { s[k] = sin((double)a[k]); c[k] = cos((double)a[k]); } \
    return 0;                                                                        \
}                                                                                    \
/* E_k = P·∏_{i<k} c_i over a chunk (len a multiple of 8); w_k = r·s_k·E_k if w, else   \
   E_k into EE. Returns the carried product. */                                     \
GMP_CLONES static double prefix_##SUF(const double *S, const double *C, double r, double P, \
                                      T *w, double *EE, long len) {                 \
    const v8d ONE = {1, 1, 1, 1, 1, 1, 1, 1};                                        \
    for (long k = 0; k < len; k += 8) {                                              \
        v8d s, c; __builtin_memcpy(&c, C + k, 64);                                   \
        v8d in = c * UP1(c, ONE); in = in * UP2(in, ONE); in = in * UP4(in, ONE);    \
        v8d E = UP1(in, ONE) * P;                                                    \
        if (w) {                                                                     \
            __builtin_memcpy(&s, S + k, 64);                                         \
            v8d o = (s * r) * E; double t[8]; __builtin_memcpy(t, &o, 64);          \
            for (int l = 0; l < 8; l++) w[k + l] = (T)t[l];                          \
        } else __builtin_memcpy(EE + k, &E, 64);                                     \
        P *= in[7];                                                                  \
    }                                                                                \
    return P;                                                                        \
}                                                                                    \
/* the reverse recurrence over [0, len) (a multiple of 8) from R, the sum after len-1:  \
   ga_k = r·E_k·(g_k c_k − s_k R_k); returns R_{-1} = Σ g_i u_i over the row */       \
GMP_CLONES static double suffix_##SUF(const double *S, const double *C, const double *EE, \
                                      const T *g, double r, T *ga, long len, double R) { \
    const v8d ONE = {1, 1, 1, 1, 1, 1, 1, 1}, ZERO = {0, 0, 0, 0, 0, 0, 0, 0};       \
    for (long k = len - 8; k >= 0; k -= 8) {                                         \
        v8d s, c, E, gv; double t[8];                                                \
        __builtin_memcpy(&s, S + k, 64); __builtin_memcpy(&c, C + k, 64); __builtin_memcpy(&E, EE + k, 64); \
        for (int l = 0; l < 8; l++) t[l] = (double)g[k + l];                         \
        __builtin_memcpy(&gv, t, 64);                                                \
        v8d A = gv * s, B = c, dA, dB; /* lane l: R_{k+l-1} = A + B·R_{k+l} */        \
        dA = DN1(A, ZERO); dB = DN1(B, ONE); A = A + B * dA; B = B * dB;             \
        dA = DN2(A, ZERO); dB = DN2(B, ONE); A = A + B * dA; B = B * dB;             \
        dA = DN4(A, ZERO); dB = DN4(B, ONE); A = A + B * dA; B = B * dB;             \
        v8d Rv = DN1(A, ZERO) + DN1(B, ONE) * R; /* lane l: R_{k+l} */               \
        v8d o = (E * r) * (gv * c - s * Rv); __builtin_memcpy(t, &o, 64);            \
        for (int l = 0; l < 8; l++) ga[k + l] = (T)t[l];                             \
        R = A[0] + B[0] * R;                                                         \
    }                                                                                \
    return R;                                                                        \
}                                                                                    \
/* one row, chunk by chunk: a (n-1 angles) → w (n weights); buf holds 2·CH doubles */ \
static int row_forward_##SUF(const T *a, double r, T *w, long n, double *buf, int slow) { \
    long m = n - 2, mb = m - m % 8, t = n - 1 - mb; double P = 1.0, *S = buf, *C = buf + CH; \
    int bad = 0;                                                                     \
    for (long k = 0; k < mb; k += CH) {                                              \
        long len = mb - k < CH ? mb - k : CH;                                        \
        bad |= sincos_##SUF(a + k, S, C, len, slow);                                 \
        P = prefix_##SUF(S, C, r, P, w + k, NULL, len);                              \
    }                                                                                \
    bad |= sincos_##SUF(a + mb, S, C, t, slow); /* the tail: ≤ 7 latitudes and θ */   \
    for (long k = 0; k < t - 1; k++) { w[mb + k] = (T)((S[k] * r) * P); P *= C[k]; } \
    double e = r * P;                                                                \
    w[m] = (T)(e * C[t - 1]); w[m + 1] = (T)(e * S[t - 1]);                          \
    return bad;                                                                      \
}                                                                                    \
/* one row's backward: s, c and E of the whole row into S, C, EE, then the recurrence */ \
static double row_backward_##SUF(const T *a, const T *g, double r, T *ga, long n,    \
                                 double *S, double *C, double *EE) {                \
    long m = n - 2, mb = m - m % 8; double P = 1.0;                                  \
    int bad = 0; /* chunk by chunk, for Note [Small angles] */                      \
    for (long k = 0; k < n - 1; k += CH) bad |= sincos_##SUF(a + k, S + k, C + k, n - 1 - k < CH ? n - 1 - k : CH, 0); \
    if (bad) sincos_##SUF(a, S, C, n - 1, 1);                                        \
    for (long k = 0; k < mb; k += CH) {                                              \
        long len = mb - k < CH ? mb - k : CH;                                        \
        P = prefix_##SUF(S + k, C + k, 1.0, P, NULL, EE + k, len);                   \
    }                                                                                \
    for (long k = mb; k <= m; k++) { EE[k] = P; P *= C[k]; }                         \
    double gm = (double)g[m], gn = (double)g[m + 1];                                 \
    ga[m] = (T)(r * (EE[m] * (gn * C[m] - gm * S[m])));                              \
    double R = gm * C[m] + gn * S[m];                                                \
    for (long k = m - 1; k >= mb; k--) {                                             \
        double gk = (double)g[k];                                                    \
        ga[k] = (T)(r * (EE[k] * (gk * C[k] - S[k] * R)));                           \
        R = gk * S[k] + C[k] * R;                                                    \
    }                                                                                \
    return mb ? suffix_##SUF(S, C, EE, g, r, ga, mb, R) : R;                         \
}                                                                                    \
/* rows [r0, r1) of a (rows, n-1) angle matrix → w (rows, n) on `threads` threads (Note
   [Kernel threads] in _fused.py); returns 0, or 1 if out of memory */                \
int gmp_forward_##SUF(const T *a, const T *radius, T *w, long r0, long r1, long n, int threads) { \
    int oom = 0;                                                                     \
    GMP_PARALLEL(threads, oom)                                                       \
    {                                                                                \
        double *buf = (double *)malloc(sizeof(double) * 2 * CH);                     \
        oom |= !buf;                                                                 \
        GMP_FOR                                                                      \
        for (long i = r0; i < r1; i++) {                                             \
            if (!buf) continue;                                                      \
            if (row_forward_##SUF(a + i * (n - 1), (double)radius[i], w + i * n, n, buf, 0)) \
                row_forward_##SUF(a + i * (n - 1), (double)radius[i], w + i * n, n, buf, 1); \
        }                                                                            \
        free(buf);                                                                   \
    }                                                                                \
    return oom;                                                                      \
}                                                                                    \
/* gradients of <g, w> for rows [r0, r1): ga (rows, n-1) and gr (rows) */            \
int gmp_backward_##SUF(const T *a, const T *radius, const T *g, T *ga, T *gr,        \
                       long r0, long r1, long n, int threads) {                      \
    long ld = ((n + 7) & ~7L) + 8; /* padded: the three scratch rows do not alias in cache */ \
    int oom = 0;                                                                     \
    GMP_PARALLEL(threads, oom)                                                       \
    {                                                                                \
        double *buf = (double *)malloc(sizeof(double) * 3 * (size_t)ld);            \
        oom |= !buf;                                                                 \
        GMP_FOR                                                                      \
        for (long i = r0; i < r1; i++) {                                             \
            if (!buf) continue;                                                      \
            gr[i] = (T)row_backward_##SUF(a + i * (n - 1), g + i * n, (double)radius[i], ga + i * (n - 1), n, \
                                          buf, buf + ld, buf + 2 * ld);              \
        }                                                                            \
        free(buf);                                                                   \
    }                                                                                \
    return oom;                                                                      \
}                                                                                    \
/* the sines and cosines on their own, for tests */                                  \
int gmp_sincos_##SUF(const T *a, double *s, double *c, long len) {                   \
    if (sincos_##SUF(a, s, c, len, 0)) sincos_##SUF(a, s, c, len, 1);                \
    return 0;                                                                        \
}

DEF_KERNEL(float, f32)
DEF_KERNEL(double, f64)
"""

_FLAGS = ["-O3", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-std=gnu99", "-ffp-contract=fast", "-Wno-psabi"]
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


def _process_has_libgomp() -> bool:
    """Whether GNU OpenMP is already loaded here (torch's CPU builds on Linux bring it)."""
    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:
        return False


def _build(cc: str, path: str, openmp: bool) -> None:
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
        cmd = [cc, *_FLAGS, *defines, src, "-o", tmp, "-lm"]
        built = False
        if openmp:
            # Note [Kernel threads] (_fused.py): with -fopenmp the library needs libgomp.so.1, which
            # the loader resolves to the copy torch already loaded: one thread pool for both.
            try:
                subprocess.run([*cmd, "-fopenmp"], check=True, capture_output=True, timeout=300)
                built = True
            except subprocess.CalledProcessError:
                pass  # no OpenMP with this compiler: the Python threads split the rows
        if not built:
            subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        os.replace(tmp, path)  # atomic: a concurrent build by another process is harmless
    finally:
        for p in (src, tmp):
            if os.path.exists(p):
                os.remove(p)


def _bind(lib: ctypes.CDLL) -> None:
    p, L = ctypes.c_void_p, ctypes.c_long
    lib.gmp_openmp.argtypes, lib.gmp_openmp.restype = [], ctypes.c_int
    for suf in ("f32", "f64"):
        f = getattr(lib, f"gmp_forward_{suf}")
        f.argtypes, f.restype = [p, p, p, L, L, L, ctypes.c_int], ctypes.c_int
        b = getattr(lib, f"gmp_backward_{suf}")
        b.argtypes, b.restype = [p, p, p, p, p, L, L, L, ctypes.c_int], ctypes.c_int
        s = getattr(lib, f"gmp_sincos_{suf}")
        s.argtypes, s.restype = [p, p, p, L], ctypes.c_int


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
    openmp = _process_has_libgomp()
    key = hashlib.sha256((SOURCE + " ".join(_FLAGS) + cc + platform.machine() + f"omp={openmp}").encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"gmp_kernel_{key}.so")
    try:
        if not os.path.exists(path):
            _build(cc, path, openmp)
        lib = ctypes.CDLL(path)
        _bind(lib)
    except Exception as e:  # noqa: BLE001 — any failure means: use the pure-torch map
        msg = getattr(e, "stderr", b"") or b""
        msg = msg.decode(errors="replace") if isinstance(msg, bytes) else str(msg)
        _STATUS = f"build/load failed ({type(e).__name__}: {str(e)[:200]} {msg[:300]}): the pure-torch map is used"
        return None
    _LIB = lib
    _STATUS = f"loaded {path} ({'OpenMP threads, shared with torch' if lib.gmp_openmp() else 'Python threads'})"
    return lib


def status() -> str:
    """One line: whether the compiled kernel is in use, and if not, why."""
    return _STATUS
