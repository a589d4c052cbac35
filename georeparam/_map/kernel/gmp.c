/* The GmP map (r, φ) → r·u(φ) and its gradient for CPU float32/float64 rows: the compiled kernel.

   Plain C (no torch headers), built on first use by georeparam/_map/build.py and called through
   ctypes by georeparam/_map/cpu.py. Note [The kernel] in cpu.py describes the arithmetic; the
   per-dtype functions are in gmp_rows.h, included once for float and once for double. */

#include <math.h>
#include <stdlib.h> /* OpenMP is used through pragmas only: no omp.h, no omp_* call */

/* Instruction sets: GCC on x86-64 Linux builds each loop for every level up to the one the CPU
   was checked to have (build.py passes it as GMP_X86_LEVEL, and keys the cache on it); the
   loader picks a version by the CPU it runs on. Everything else gets one portable build. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(GMP_X86_LEVEL) && GMP_X86_LEVEL >= 4
#define GMP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(GMP_X86_LEVEL) && GMP_X86_LEVEL >= 3
#define GMP_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
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
#else
#define GMP_PARALLEL(threads, oom) (void)(threads); /* one thread: the caller splits the rows */
#define GMP_FOR
#endif

/* 1 where the rows are split on OpenMP threads inside a call, 0 where the caller splits them */
int gmp_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* the per-dtype functions: FN(name) is name_f32 or name_f64 */
#define GMP_CAT2(a, b) a##_##b
#define GMP_CAT(a, b) GMP_CAT2(a, b)
#define FN(name) GMP_CAT(name, SUF)

#define T float
#define SUF f32
#include "gmp_rows.h"
#undef T
#undef SUF

#define T double
#define SUF f64
#include "gmp_rows.h"
#undef T
#undef SUF
