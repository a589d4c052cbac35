/* The per-dtype half of the kernel, included by gmp.c once per storage dtype with T (float or
   double) and SUF (f32 or f64) defined; FN(name) names the variant, e.g. gmp_forward_f32. No
   include guard: it is meant to be included twice. */

/* s, c of a[0..len); returns nonzero where the polynomial does not apply */
GMP_CLONES static int FN(sincos_fast)(const T *a, double *s, double *c, long len) {
    int big = 0; /* Note [Small angles] */
    for (long k0 = 0; k0 < len && !big; k0 += 64) { /* NaN counts as big */
        long k1 = len - k0 < 64 ? len : k0 + 64;
        for (long k = k0; k < k1; k++) big |= !((a[k] < 0 ? -a[k] : a[k]) <= (T)PIO4);
    }
    if (!big) {
        for (long k = 0; k < len; k++) FN(sincos_small)(a[k], &s[k], &c[k]);
        return 0;
    }
    int bad = 0;
    for (long k = 0; k < len; k++) bad |= FN(sincos_el)(a[k], &s[k], &c[k]);
    return bad;
}
static int FN(sincos)(const T *a, double *s, double *c, long len, int slow) {
    if (!slow) return FN(sincos_fast)(a, s, c, len);
    for (long k = 0; k < len; k++) { s[k] = sin((double)a[k]); c[k] = cos((double)a[k]); }
    return 0;
}
/* E_k = P·∏_{i<k} c_i over a chunk (len a multiple of 8); w_k = r·s_k·E_k if w, else
   E_k into EE. Returns the carried product. */
GMP_CLONES static double FN(prefix)(const double *S, const double *C, double r, double P,
                                    T *w, double *EE, long len) {
    const v8d ONE = {1, 1, 1, 1, 1, 1, 1, 1};
    for (long k = 0; k < len; k += 8) {
        v8d s, c; __builtin_memcpy(&c, C + k, 64);
        v8d in = c * UP1(c, ONE); in = in * UP2(in, ONE); in = in * UP4(in, ONE);
        v8d E = UP1(in, ONE) * P;
        if (w) {
            __builtin_memcpy(&s, S + k, 64);
            v8d o = (s * r) * E; double t[8]; __builtin_memcpy(t, &o, 64);
            for (int l = 0; l < 8; l++) w[k + l] = (T)t[l];
        } else __builtin_memcpy(EE + k, &E, 64);
        P *= in[7];
    }
    return P;
}
/* the reverse recurrence over [0, len) (a multiple of 8) from R, the sum after len-1:
   ga_k = r·E_k·(g_k c_k − s_k R_k); returns R_{-1} = Σ g_i u_i over the row */
GMP_CLONES static double FN(suffix)(const double *S, const double *C, const double *EE,
                                    const T *g, double r, T *ga, long len, double R) {
    const v8d ONE = {1, 1, 1, 1, 1, 1, 1, 1}, ZERO = {0, 0, 0, 0, 0, 0, 0, 0};
    for (long k = len - 8; k >= 0; k -= 8) {
        v8d s, c, E, gv; double t[8];
        __builtin_memcpy(&s, S + k, 64); __builtin_memcpy(&c, C + k, 64); __builtin_memcpy(&E, EE + k, 64);
        for (int l = 0; l < 8; l++) t[l] = (double)g[k + l];
        __builtin_memcpy(&gv, t, 64);
        v8d A = gv * s, B = c, dA, dB; /* lane l: R_{k+l-1} = A + B·R_{k+l} */
        dA = DN1(A, ZERO); dB = DN1(B, ONE); A = A + B * dA; B = B * dB;
        dA = DN2(A, ZERO); dB = DN2(B, ONE); A = A + B * dA; B = B * dB;
        dA = DN4(A, ZERO); dB = DN4(B, ONE); A = A + B * dA; B = B * dB;
        v8d Rv = DN1(A, ZERO) + DN1(B, ONE) * R; /* lane l: R_{k+l} */
        v8d o = (E * r) * (gv * c - s * Rv); __builtin_memcpy(t, &o, 64);
        for (int l = 0; l < 8; l++) ga[k + l] = (T)t[l];
        R = A[0] + B[0] * R;
    }
    return R;
}
/* one row, chunk by chunk: a (n-1 angles) → w (n weights); buf holds 2·CH doubles */
static int FN(row_forward)(const T *a, double r, T *w, long n, double *buf, int slow) {
    long m = n - 2, mb = m - m % 8, t = n - 1 - mb; double P = 1.0, *S = buf, *C = buf + CH;
    int bad = 0;
    for (long k = 0; k < mb; k += CH) {
        long len = mb - k < CH ? mb - k : CH;
        bad |= FN(sincos)(a + k, S, C, len, slow);
        P = FN(prefix)(S, C, r, P, w + k, NULL, len);
    }
    bad |= FN(sincos)(a + mb, S, C, t, slow); /* the tail: ≤ 7 latitudes and θ */
    for (long k = 0; k < t - 1; k++) { w[mb + k] = (T)((S[k] * r) * P); P *= C[k]; }
    double e = r * P;
    w[m] = (T)(e * C[t - 1]); w[m + 1] = (T)(e * S[t - 1]);
    return bad;
}
/* one row's backward: s, c and E of the whole row into S, C, EE, then the recurrence */
static double FN(row_backward)(const T *a, const T *g, double r, T *ga, long n,
                               double *S, double *C, double *EE) {
    long m = n - 2, mb = m - m % 8; double P = 1.0;
    int bad = 0; /* chunk by chunk, for Note [Small angles] */
    for (long k = 0; k < n - 1; k += CH) bad |= FN(sincos)(a + k, S + k, C + k, n - 1 - k < CH ? n - 1 - k : CH, 0);
    if (bad) FN(sincos)(a, S, C, n - 1, 1);
    for (long k = 0; k < mb; k += CH) {
        long len = mb - k < CH ? mb - k : CH;
        P = FN(prefix)(S + k, C + k, 1.0, P, NULL, EE + k, len);
    }
    for (long k = mb; k <= m; k++) { EE[k] = P; P *= C[k]; }
    double gm = (double)g[m], gn = (double)g[m + 1];
    ga[m] = (T)(r * (EE[m] * (gn * C[m] - gm * S[m])));
    double R = gm * C[m] + gn * S[m];
    for (long k = m - 1; k >= mb; k--) {
        double gk = (double)g[k];
        ga[k] = (T)(r * (EE[k] * (gk * C[k] - S[k] * R)));
        R = gk * S[k] + C[k] * R;
    }
    return mb ? FN(suffix)(S, C, EE, g, r, ga, mb, R) : R;
}
/* rows [r0, r1) of a (rows, n-1) angle matrix → w (rows, n) on `threads` threads (Note
   [Kernel threads] in cpu.py); returns 0, or 1 if out of memory */
int FN(gmp_forward)(const T *a, const T *radius, T *w, long r0, long r1, long n, int threads) {
    int oom = 0;
    GMP_PARALLEL(threads, oom)
    {
        double *buf = (double *)malloc(sizeof(double) * 2 * CH);
        oom |= !buf;
        GMP_FOR
        for (long i = r0; i < r1; i++) {
            if (!buf) continue;
            if (FN(row_forward)(a + i * (n - 1), (double)radius[i], w + i * n, n, buf, 0))
                FN(row_forward)(a + i * (n - 1), (double)radius[i], w + i * n, n, buf, 1);
        }
        free(buf);
    }
    return oom;
}
/* gradients of <g, w> for rows [r0, r1): ga (rows, n-1) and gr (rows) */
int FN(gmp_backward)(const T *a, const T *radius, const T *g, T *ga, T *gr,
                     long r0, long r1, long n, int threads) {
    long ld = ((n + 7) & ~7L) + 8; /* padded: the three scratch rows do not alias in cache */
    int oom = 0;
    GMP_PARALLEL(threads, oom)
    {
        double *buf = (double *)malloc(sizeof(double) * 3 * (size_t)ld);
        oom |= !buf;
        GMP_FOR
        for (long i = r0; i < r1; i++) {
            if (!buf) continue;
            gr[i] = (T)FN(row_backward)(a + i * (n - 1), g + i * n, (double)radius[i], ga + i * (n - 1), n,
                                        buf, buf + ld, buf + 2 * ld);
        }
        free(buf);
    }
    return oom;
}
/* the sines and cosines on their own, for tests */
int FN(gmp_sincos)(const T *a, double *s, double *c, long len) {
    if (FN(sincos)(a, s, c, len, 0)) FN(sincos)(a, s, c, len, 1);
    return 0;
}
