r"""Figures of characteristic boundaries: the only module of georeparam that imports matplotlib.

matplotlib is imported when a figure is drawn, not when this module is imported; without it every
function raises ``ImportError`` naming ``pip install matplotlib`` (the ``plot`` extra:
``pip install 'georeparam[plot]'``). Figures are drawn on Agg-backed ``matplotlib.figure.Figure``
objects, so pyplot's global state is left alone and no display is needed.

* :func:`plot_boundaries_2d`: 2-D data, a model's decision regions, a layer's characteristic
  points (and their paths during training, from a :class:`~georeparam.analysis.PointsRecorder`);
* :func:`plot_points_1d`: a 1-D layer's characteristic points over training.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .analysis import PointsRecorder, characteristic_points

__all__ = ["plot_boundaries_2d", "plot_points_1d", "new_axes", "require_matplotlib"]


def require_matplotlib() -> None:
    """Raise a clear ``ImportError`` (naming the install command) when matplotlib is missing.

    ``python -m georeparam demo`` calls this before drawing and skips the figure if it raises.
    """
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "georeparam's plots need matplotlib: pip install matplotlib "
            "(or pip install 'georeparam[plot]'). Got: " + str(e)
        ) from e


def new_axes(figsize: Tuple[float, float] = (5.0, 5.0)):
    """A fresh Axes on an Agg-backed ``Figure`` (pyplot's global state is left alone); save it
    with ``ax.figure.savefig(path)``.

    >>> ax = new_axes((3.0, 2.0))
    >>> ax.figure.get_size_inches().tolist()
    [3.0, 2.0]
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=figsize).add_subplot(1, 1, 1)


def _figure(ax, figsize=(5.0, 5.0)):
    return new_axes(figsize) if ax is None else ax


def _default_input_layer(model: nn.Module, fan_in: int) -> nn.Module:
    for _, m in model.named_modules():  # the first layer characteristic_points can read
        try:
            points, _ = characteristic_points(m)
        except TypeError:
            continue
        if points.shape[1] == fan_in:
            return m
        break
    raise ValueError(
        f"no first Linear/Conv layer with fan-in {fan_in} in {type(model).__name__}; pass layer= explicitly"
    )


def _as_points_history(trajectories) -> Tensor:
    if isinstance(trajectories, PointsRecorder):
        return trajectories.points
    if isinstance(trajectories, Tensor):
        return trajectories.detach().to("cpu", torch.float32)
    raise TypeError(f"expected a PointsRecorder or a (steps, units, fan_in) tensor. Got: {type(trajectories).__name__}")


def plot_boundaries_2d(
    model: nn.Module,
    x: Tensor,
    y: Optional[Tensor] = None,
    ax=None,
    layer: Optional[nn.Module] = None,
    trajectories=None,
    *,
    resolution: int = 200,
    padding: float = 0.1,
    boundaries: bool = True,
    title: Optional[str] = None,
):
    r"""2-D data, the model's decision regions and boundary, and a layer's characteristic points.

    Args:
        model: maps ``(N, 2)`` inputs to ``(N,)``/``(N, 1)`` logits (binary, boundary at 0) or
            ``(N, C)`` class scores (argmax). Evaluated under ``no_grad`` in eval mode (its mode
            is restored afterwards).
        x: ``(N, 2)`` inputs; ``y``: optional ``(N,)`` labels for the scatter colours.
        ax: a matplotlib Axes (default: a new Agg figure, ``ax.figure.savefig(path)`` saves it).
        layer: whose characteristic points to draw (default: the model's first Linear/Conv
            layer, which must have fan-in 2 so its boundaries live in the data plane).
        trajectories: a :class:`PointsRecorder` of ``layer`` or a ``(steps, units, 2)`` tensor of
            points over training, drawn as paths ending at the current points.
        resolution: grid points per axis for the regions.
        padding: relative margin around the data.
        boundaries: also draw each unit's boundary line (thin) through its point.

    Returns:
        the Axes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module. Got: {type(model).__name__}")
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(
            f"x must be an (N, 2) tensor. Got: {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
        )
    ax = _figure(ax)
    if layer is None:
        layer = _default_input_layer(model, 2)
    else:
        characteristic_points(layer)  # validates
    points, directions = characteristic_points(layer)
    if points.shape[1] != 2:
        raise ValueError(
            f"layer must have fan-in 2 to draw its boundaries in the data plane. Got: fan-in {points.shape[1]}"
        )

    xc = x.detach().to("cpu", torch.float64)
    lo, hi = xc.min(0).values, xc.max(0).values
    span = (hi - lo).clamp_min(1e-12)
    lo, hi = lo - padding * span, hi + padding * span
    gx = torch.linspace(float(lo[0]), float(hi[0]), resolution, dtype=torch.float64)
    gy = torch.linspace(float(lo[1]), float(hi[1]), resolution, dtype=torch.float64)
    mx, my = torch.meshgrid(gx, gy, indexing="xy")
    grid = torch.stack([mx.flatten(), my.flatten()], 1)
    p0 = next(iter(model.parameters()), None)
    gdtype = p0.dtype if p0 is not None else x.dtype
    gdevice = p0.device if p0 is not None else x.device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(grid.to(gdevice, gdtype)).detach().to("cpu", torch.float64)
    finally:
        model.train(was_training)
    if out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1):
        score = out.reshape(-1)
        sc = score.reshape(mx.shape).numpy()
        big = float(score.abs().max()) + 1.0
        ax.contourf(mx.numpy(), my.numpy(), sc, levels=[-big, 0.0, big], colors=["#2166ac", "#b2182b"], alpha=0.22)
        ax.contour(mx.numpy(), my.numpy(), sc, levels=[0.0], colors="k", linewidths=1.5)
    elif out.dim() == 2:
        regions = out.argmax(1).to(torch.float64)
        ax.contourf(
            mx.numpy(), my.numpy(), regions.reshape(mx.shape).numpy(), levels=out.shape[1], cmap="tab10", alpha=0.3
        )
    else:
        raise ValueError(f"model output must be (N,), (N, 1) or (N, C). Got: {tuple(out.shape)}")

    if y is not None:
        ax.scatter(
            xc[:, 0].numpy(),
            xc[:, 1].numpy(),
            c=y.detach().cpu().numpy(),
            cmap="RdBu_r",
            s=6,
            alpha=0.6,
            edgecolors="none",
        )
    else:
        ax.scatter(xc[:, 0].numpy(), xc[:, 1].numpy(), s=6, c="0.3", alpha=0.6, edgecolors="none")

    pts = points.detach().to("cpu", torch.float64)
    dirs = directions.detach().to("cpu", torch.float64)
    if trajectories is not None:
        hist = _as_points_history(trajectories)
        if hist.dim() != 3 or hist.shape[1:] != pts.shape:
            raise ValueError(f"trajectories must be (steps, {pts.shape[0]}, 2). Got: {tuple(hist.shape)}")
        for k in range(hist.shape[1]):
            ax.plot(hist[:, k, 0].numpy(), hist[:, k, 1].numpy(), color="tab:green", lw=0.6, alpha=0.45)
        ax.scatter(hist[0, :, 0].numpy(), hist[0, :, 1].numpy(), marker=".", s=10, color="tab:green", alpha=0.6)
    if boundaries:
        diag = float(torch.linalg.vector_norm(hi - lo))
        for k in range(pts.shape[0]):
            if not bool(torch.isfinite(pts[k]).all() and torch.isfinite(dirs[k]).all()):
                continue
            t = torch.tensor([-dirs[k, 1], dirs[k, 0]], dtype=torch.float64)  # along the line
            a, c = pts[k] - 2 * diag * t, pts[k] + 2 * diag * t
            ax.plot([float(a[0]), float(c[0])], [float(a[1]), float(c[1])], color="0.35", lw=0.4, alpha=0.3)
    ax.scatter(
        pts[:, 0].numpy(),
        pts[:, 1].numpy(),
        marker="*",
        s=40,
        color="gold",
        edgecolors="k",
        linewidths=0.5,
        zorder=5,
        label="characteristic points",
    )
    ax.set_xlim(float(lo[0]), float(hi[0]))
    ax.set_ylim(float(lo[1]), float(hi[1]))
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    if title:
        ax.set_title(title)
    return ax


def plot_points_1d(
    history,
    ax=None,
    *,
    steps: Optional[Sequence[int]] = None,
    x_range: Optional[Tuple[float, float]] = None,
    title: Optional[str] = None,
):
    r"""Evolution of a 1-D layer's characteristic points over training (one line per unit).

    Args:
        history: a :class:`PointsRecorder` of a fan-in-1 layer, or a ``(records, units)`` /
            ``(records, units, 1)`` tensor.
        ax: a matplotlib Axes (default: a new Agg figure).
        steps: the step of each record (default: the recorder's steps, or 0, 1, …).
        x_range: the data's input range, shaded for reference.

    Returns:
        the Axes.
    """
    if isinstance(history, PointsRecorder):
        steps = history.steps if steps is None else steps
        hist = history.points
    elif isinstance(history, Tensor):
        hist = history.detach().to("cpu", torch.float32)
    else:
        raise TypeError(f"history must be a PointsRecorder or a tensor. Got: {type(history).__name__}")
    if hist.dim() == 3:
        if hist.shape[2] != 1:
            raise ValueError(f"plot_points_1d needs fan-in 1 points. Got: history of shape {tuple(hist.shape)}")
        hist = hist[:, :, 0]
    if hist.dim() != 2 or hist.shape[0] == 0:
        raise ValueError(
            f"history must be (records, units) or (records, units, 1), non-empty. Got: {tuple(hist.shape)}"
        )
    t = torch.arange(hist.shape[0]) if steps is None else torch.as_tensor(list(steps))
    if t.numel() != hist.shape[0]:
        raise ValueError(f"steps must give one step per record ({hist.shape[0]}). Got: {t.numel()}")
    ax = _figure(ax, figsize=(6.0, 4.0))
    if x_range is not None:
        ax.axhspan(float(x_range[0]), float(x_range[1]), color="0.9", zorder=0, label="data range")
    for k in range(hist.shape[1]):
        ax.plot(t.numpy(), hist[:, k].numpy(), lw=0.7, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("characteristic point φ")
    if x_range is not None:
        lo, hi = float(x_range[0]), float(x_range[1])
        pad = 0.5 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)
    if title:
        ax.set_title(title)
    return ax
