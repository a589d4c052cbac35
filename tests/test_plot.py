"""georeparam.plot: the figures, and matplotlib staying out of everything else."""

import sys

import pytest
import torch
from torch import nn

from georeparam import register
from georeparam.analysis import PointsRecorder, characteristic_points
from georeparam.plot import new_axes, plot_boundaries_2d, plot_points_1d

PNG = b"\x89PNG\r\n\x1a\n"


def test_points_recorder_and_plots_write_files(tmp_path):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    register(model, exclude=["2"])
    x = torch.randn(100, 2)
    y = (x[:, 0] > x[:, 1]).float()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    with PointsRecorder(model[0], every=2).attach(opt) as rec:
        for _ in range(6):
            opt.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y).backward()
            opt.step()
    assert rec.steps == [0, 2, 4, 6] and rec.points.shape == (4, 8, 2)
    torch.testing.assert_close(rec.points[-1], characteristic_points(model[0])[0])
    assert model.training
    ax = plot_boundaries_2d(model, x, y, trajectories=rec, title="GmP")
    assert model.training  # mode restored
    ax.figure.savefig(tmp_path / "b2d.png")
    # multi-class output and a plain model
    mc = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3))
    plot_boundaries_2d(mc, x, resolution=20).figure.savefig(tmp_path / "mc.png")
    lvl = nn.Linear(1, 5)
    r1 = PointsRecorder(lvl)
    r1.record()
    plot_points_1d(r1, x_range=(-1, 1)).figure.savefig(tmp_path / "p1d.png")
    for f in ("b2d.png", "mc.png", "p1d.png"):
        data = (tmp_path / f).read_bytes()
        assert data[:8] == PNG and len(data) > 2000


def test_plot_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plot_boundaries_2d(nn.Linear(2, 1), torch.randn(4, 3))
    with pytest.raises(ValueError, match="fan-in 2"):
        plot_boundaries_2d(nn.Sequential(nn.Linear(2, 3)), torch.randn(4, 2), layer=nn.Linear(3, 1))
    with pytest.raises(ValueError, match="fan-in 1"):
        plot_points_1d(torch.zeros(3, 4, 2))
    with pytest.raises(TypeError, match="Got: ReLU"):
        plot_boundaries_2d(nn.Linear(2, 1), torch.randn(4, 2), layer=nn.ReLU())
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    for draw in (lambda: plot_points_1d(torch.zeros(3, 4)), lambda: new_axes()):
        with pytest.raises(ImportError, match=r"pip install matplotlib \(or pip install 'georeparam\[plot\]'\)"):
            draw()
