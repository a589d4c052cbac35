"""The Triton kernels of :mod:`georeparam._map.triton_impl` (Note [The Triton kernels] there).

Imported only when a CUDA tensor (or a test under ``TRITON_INTERPRET=1``) first needs them, so
that CPU users never pay for importing triton.
"""

import triton
import triton.language as tl

__all__ = ["gmp_fwd", "gmp_bwd"]


@triton.jit
def _load(a_row, k, valid):
    """The angles at ``k`` in float64, 0 where not ``valid``."""
    return tl.load(a_row + k, mask=valid, other=0.0).to(tl.float64)


@triton.jit
def gmp_fwd(A, R, W, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_row = A + row * (n - 1)
    w_row = W + row * n
    r = tl.load(R + row).to(tl.float64)
    theta = tl.load(a_row + n - 2).to(tl.float64)  # the last angle: s'_m = cos θ, c'_m = sin θ
    cos_t, sin_t = tl.cos(theta), tl.sin(theta)
    lanes = tl.arange(0, BLOCK)
    carry = r  # folds the radius into the running product
    for k0 in range(0, n, BLOCK):
        k = k0 + lanes
        s = tl.where(k == n - 2, cos_t, tl.sin(_load(a_row, k, k < n - 2)))
        s = tl.where(k < n - 1, s, 1.0)
        prev_ok = (k >= 1) & (k <= n - 2)
        cp = tl.where(prev_ok, tl.cos(_load(a_row, k - 1, prev_ok)), 1.0)
        cp = tl.where(k == n - 1, sin_t, cp)
        E = carry * tl.cumprod(cp, axis=0)
        tl.store(w_row + k, (s * E).to(W.dtype.element_ty), mask=k < n)
        carry = tl.sum(tl.where(lanes == BLOCK - 1, E, 0.0), axis=0)


@triton.jit
def gmp_bwd(A, R, G, GA, GR, CARRY, n, n_blocks, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_row = A + row * (n - 1)
    g_row = G + row * n
    ga_row = GA + row * (n - 1)
    c_row = CARRY + row * n_blocks
    r = tl.load(R + row).to(tl.float64)
    theta = tl.load(a_row + n - 2).to(tl.float64)
    cos_t, sin_t = tl.cos(theta), tl.sin(theta)
    g_last = tl.load(g_row + n - 1).to(tl.float64)
    lanes = tl.arange(0, BLOCK)
    # pass 1: each block's incoming E' (Note [The Triton kernels])
    carry = tl.full((), 1.0, tl.float64)
    for b in range(0, n_blocks):
        tl.store(c_row + b, carry)
        k = b * BLOCK + lanes
        prev_ok = (k >= 1) & (k <= n - 2)
        cp = tl.where(prev_ok, tl.cos(_load(a_row, k - 1, prev_ok)), 1.0)
        cp = tl.where(k == n - 1, sin_t, cp)
        carry = carry * tl.sum(tl.where(lanes == BLOCK - 1, tl.cumprod(cp, axis=0), 0.0), axis=0)
    # pass 2: blocks in reverse, the reverse scan S_k = Σ_{i>k} g_i u_i. Each lane takes the term
    # of the *next* position, g_{k+1} u_{k+1}, so that the in-block scan is exclusive without a
    # subtraction (``inclusive − own`` cancels next to a pole, where S_k ≪ g_k u_k).
    suffix = tl.full((), 0.0, tl.float64)
    for i in range(0, n_blocks):
        b = n_blocks - 1 - i
        k = b * BLOCK + lanes
        lat = k < n - 2
        phi = _load(a_row, k, lat)
        s = tl.where(lat, tl.sin(phi), tl.where(k == n - 2, cos_t, 1.0))
        c = tl.where(lat, tl.cos(phi), tl.where(k == n - 2, sin_t, 1.0))
        prev_ok = (k >= 1) & (k <= n - 2)
        cp = tl.where(prev_ok, tl.cos(_load(a_row, k - 1, prev_ok)), 1.0)
        cp = tl.where(k == n - 1, sin_t, cp)
        E = tl.load(c_row + b) * tl.cumprod(cp, axis=0)  # E'_k
        g = tl.load(g_row + k, mask=k < n, other=0.0).to(tl.float64)
        kn = k + 1
        lat_n = kn < n - 2
        t_n = tl.where(
            lat_n, tl.sin(_load(a_row, kn, lat_n)), tl.where(kn == n - 2, cos_t, tl.where(kn == n - 1, 1.0, 0.0))
        )
        g_n = tl.load(g_row + kn, mask=kn < n, other=0.0).to(tl.float64)
        gu_n = g_n * t_n * (E * c)  # g_{k+1} u_{k+1}, u_{k+1} = t_{k+1} E'_k c'_k
        S = tl.cumsum(gu_n, axis=0, reverse=True) + suffix
        grad = r * (g * E * c - (s / tl.where(lat, c, 1.0)) * S)
        # the last angle without the quotient (sin θ is 0 at θ = 0): −r·E'_m·(g_m sin θ − g_{m+1} cos θ)
        grad = tl.where(k == n - 2, -r * E * (g * sin_t - g_last * cos_t), grad)
        tl.store(ga_row + k, grad.to(GA.dtype.element_ty), mask=k < n - 1)
        suffix = suffix + tl.sum(gu_n, axis=0)
    # ∂/∂r = Σ_{i≥1} g_i u_i + g_0 u_0, u_0 = sin φ_0 (cos θ when θ is the only angle)
    a0 = tl.load(a_row).to(tl.float64)
    t0 = tl.where(n == 2, cos_t, tl.sin(a0))
    tl.store(GR + row, (suffix + tl.load(g_row).to(tl.float64) * t0).to(GR.dtype.element_ty))
