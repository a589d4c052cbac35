r"""The paper's Figure 1: perturb a small 2-D ReLU unit and measure how far its boundary moves.

Standard (SP), weight-normalized (WN), batch-normalized (BN) and geometric (GmP) parameterizations
of the *same* unit get the same perturbation of every parameter; the table gives the median angle
(rad) the boundary direction turns and the median distance its characteristic point moves, per
perturbation size ε. GmP's direction turns by exactly ``|δθ|``; the Cartesian ones lose their
direction (~π/2) once ε is comparable to ‖w‖ (here 1e-3, as in the paper).

    python benchmarks/figure1.py                       # 1000 trials: table + figure1.png, a second
    python benchmarks/figure1.py --trials 50 --out /tmp/f1 --perturbation random

Writes ``OUT/figure1.md`` (the table) and, when matplotlib is installed, ``OUT/figure1.png``
(median direction change against ε per method, log–log). Moved here from
``georeparam.analysis`` (issue 9 item 7): a reproduction, not part of the library.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from georeparam.analysis import angle_between  # noqa: E402

STABILITY_METHODS = ("SP", "WN", "BN", "GmP")


class StabilityResult(NamedTuple):
    """What :func:`stability_experiment` measured, per method, ε and trial (float64).

    Attributes:
        methods: method names, in row order.
        eps: the perturbation sizes.
        direction: ``(methods, eps, trials)`` angle (rad) between the boundary direction before
            and after the perturbation.
        point: ``(methods, eps, trials)`` distance the characteristic point moved.
        angle_step: ``(eps, trials)`` ``‖δθ‖``, the size of GmP's angular perturbation.
        perturbation: ``"ones"`` or ``"random"``.
    """

    methods: Tuple[str, ...]
    eps: Tuple[float, ...]
    direction: Tensor
    point: Tensor
    angle_step: Tensor
    perturbation: str

    def table(self) -> str:
        """Markdown: median direction change (rad) / median point shift per method and ε."""
        head = "| method | " + " | ".join(f"ε = {e:g}" for e in self.eps) + " |"
        lines = [head, "|---" * (len(self.eps) + 1) + "|"]
        for i, m in enumerate(self.methods):
            cells = [
                f"{self.direction[i, j].nanmedian().item():.3g} / {self.point[i, j].nanmedian().item():.3g}"
                for j in range(len(self.eps))
            ]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _direction_2d(w: Tensor) -> Tensor:
    return w / torch.linalg.vector_norm(w, dim=-1, keepdim=True)


def stability_experiment(
    eps: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
    *,
    trials: int = 1000,
    seed: int = 0,
    scale: float = 1e-3,
    perturbation: str = "ones",
    methods: Sequence[str] = STABILITY_METHODS,
) -> StabilityResult:
    r"""The paper's Figure 1: perturb a small 2-D ReLU unit and measure how its boundary moves.

    Each trial draws ``w ∈ R², b ~ N(0, scale²)`` (``scale = 1e-3`` as in the paper), writes the
    unit in each parameterization, adds ``δ`` to *every* parameter and compares the boundary
    before and after (float64):

    * **SP** ``ReLU(wᵀx + b)``: ``(w, b) + δ``.
    * **WN** ``ReLU(g·vᵀx/‖v‖ + b)`` with ``v = w``, ``g = ‖w‖``: ``(v, g, b) + δ`` (the official
      code's formula).
    * **BN** ``ReLU(γ·(z − E z)/std z + β)`` with ``z = wᵀx + b``, population statistics of
      standardized inputs (``E x = 0``, ``Cov x = I``, so ``E z = b``, ``std z = ‖w‖``; BN's
      variance ε left out) and ``γ = ‖w‖``, ``β = b``, so that it computes exactly the SP unit
      before the step: ``(w, b, γ, β) + δ``. ``b`` cancels; the direction change equals SP's
      (normalizing rescales ``w``, it does not turn it), only ``φ = −(β/γ)·w/‖w‖`` differs.
    * **GmP** ``r·ReLU(uᵀx + λ)`` (the paper's form) with ``r = ‖w‖``, ``θ = atan2(w₂, w₁)``,
      ``λ = b/‖w‖``: ``(r, θ, λ) + δ``; ``r`` does not enter the boundary, and the direction turns
      by exactly ``|δθ|`` (mod 2π).

    Args:
        eps: perturbation sizes ε.
        trials: independent units per ε.
        seed: seeds the units and random perturbations.
        scale: standard deviation of ``w`` and ``b``.
        perturbation: ``"ones"`` — ``δ = ε·1`` (the official code); ``"random"`` —
            ``δ = ε·ξ``, ``ξ ~ N(0, I)`` per parameter.
        methods: a subset of ``("SP", "WN", "BN", "GmP")``.

    Returns:
        a :class:`StabilityResult` (``.table()`` gives the Markdown summary).

    Example:
        >>> res = stability_experiment((1e-4, 1e-1), trials=200)
        >>> bool((res.direction[res.methods.index("GmP")] <= res.angle_step + 1e-12).all())
        True
        >>> sp = res.direction[res.methods.index("SP")]
        >>> round(sp[0].median().item(), 2), round(sp[1].median().item(), 2)  # ε ≫ ‖w‖: direction lost
        (0.08, 1.6)
    """
    if perturbation not in ("ones", "random"):
        raise ValueError(f"perturbation must be 'ones' or 'random'. Got: {perturbation!r}")
    methods = tuple(methods)
    bad = [m for m in methods if m not in STABILITY_METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be a non-empty subset of {STABILITY_METHODS}. Got: {methods}")
    eps = tuple(float(e) for e in eps)
    if not eps or any(not math.isfinite(e) or e < 0 for e in eps):
        raise ValueError(f"eps must be non-empty, finite and ≥ 0. Got: {eps}")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int. Got: {trials!r}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be positive and finite. Got: {scale!r}")

    f64 = torch.float64
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(trials, 2, generator=gen, dtype=f64) * scale
    b = torch.randn(trials, generator=gen, dtype=f64) * scale
    norm_w = torch.linalg.vector_norm(w, dim=1)
    d0 = _direction_2d(w)
    p0 = -(b / norm_w).unsqueeze(1) * d0  # the same unit in every parameterization

    direction = torch.empty(len(methods), len(eps), trials, dtype=f64)
    point = torch.empty_like(direction)
    angle_step = torch.empty(len(eps), trials, dtype=f64)

    for j, e in enumerate(eps):
        # one draw of ξ per trial and parameter slot, shared by all methods (at most 5 parameters)
        if perturbation == "ones":
            xi = torch.ones(trials, 5, dtype=f64)
        else:
            xi = torch.randn(trials, 5, generator=gen, dtype=f64)
        dl = e * xi
        for i, m in enumerate(methods):
            if m == "SP":
                w1, b1 = w + dl[:, :2], b + dl[:, 2]
                d1 = _direction_2d(w1)
                p1 = -(b1 / torch.linalg.vector_norm(w1, dim=1)).unsqueeze(1) * d1
            elif m == "WN":
                v1 = w + dl[:, :2]
                g1 = norm_w + dl[:, 2]
                b1 = b + dl[:, 3]
                w1 = g1.unsqueeze(1) * _direction_2d(v1)
                d1 = _direction_2d(w1)  # oriented: g < 0 flips the active side
                p1 = -(b1 / torch.linalg.vector_norm(w1, dim=1)).unsqueeze(1) * d1
            elif m == "BN":
                w1 = w + dl[:, :2]  # b + δ cancels in z − E z
                gamma1 = norm_w + dl[:, 3]
                beta1 = b + dl[:, 4]
                what = _direction_2d(w1)
                d1 = torch.where((gamma1 < 0).unsqueeze(1), -what, what)
                p1 = -(beta1 / gamma1).unsqueeze(1) * what
            else:  # GmP
                theta1 = torch.atan2(w[:, 1], w[:, 0]) + dl[:, 1]
                lam1 = b / norm_w + dl[:, 2]
                d1 = torch.stack([torch.cos(theta1), torch.sin(theta1)], dim=1)
                p1 = -lam1.unsqueeze(1) * d1
                angle_step[j] = dl[:, 1].abs()
            direction[i, j] = angle_between(d0, d1)
            point[i, j] = torch.linalg.vector_norm(p1 - p0, dim=1)
        if "GmP" not in methods:
            angle_step[j] = dl[:, 1].abs()
    return StabilityResult(methods, eps, direction, point, angle_step, perturbation)


def save_figure(res: StabilityResult, path: Path) -> Path:
    """Median direction change (rad) against ε, one line per method (log–log)."""
    from georeparam.plot import new_axes

    ax = new_axes((5.0, 4.0))
    eps = torch.tensor(res.eps, dtype=torch.float64).clamp_min(1e-300)
    for i, m in enumerate(res.methods):
        med = res.direction[i].nanmedian(dim=1).values.clamp_min(1e-16)
        # SP, WN and BN turn alike (normalizing rescales w, it does not turn it): styles keep them visible
        ax.plot(eps.numpy(), med.numpy(), marker="osd^"[i % 4], ls=["-", "--", ":", "-"][i % 4], label=m)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(math.pi / 2, color="0.5", lw=0.8, ls="--")
    ax.set_xlabel("perturbation ε")
    ax.set_ylabel("median direction change (rad)")
    ax.set_title(f"Figure 1: one 2-D ReLU unit, δ = {'ε·1' if res.perturbation == 'ones' else 'ε·ξ'}")
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=90)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/figure1.py",
        description="The paper's Figure 1: boundary stability under a parameter perturbation.",
    )
    parser.add_argument(
        "--eps", default="1e-4,1e-3,1e-2,1e-1", help="perturbation sizes, comma-separated (default %(default)s)"
    )
    parser.add_argument("--trials", type=int, default=1000, help="units per ε (default %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the units and random perturbations (default %(default)s)"
    )
    parser.add_argument(
        "--perturbation",
        choices=["ones", "random"],
        default="ones",
        help="δ = ε·1 (the official code) or ε·ξ, ξ ~ N(0, I)",
    )
    parser.add_argument("--out", default="figure1-results", help="output directory (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        eps = tuple(float(e) for e in args.eps.split(","))
        res = stability_experiment(eps, trials=args.trials, seed=args.seed, perturbation=args.perturbation)
    except ValueError as e:
        parser.error(str(e))
    table = res.table()
    print(
        f"Figure 1: {args.trials} units per ε, w, b ~ N(0, 1e-6), δ = {'ε·1' if args.perturbation == 'ones' else 'ε·ξ'}; "
        "median direction change (rad) / median point shift"
    )
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "figure1.md").write_text(table + "\n")
    print(f"Saved the table to {(out / 'figure1.md').resolve()}")
    try:
        path = save_figure(res, out / "figure1.png")
    except ImportError:
        print("figure skipped: pip install matplotlib")
    else:
        print(f"Saved the figure to {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
