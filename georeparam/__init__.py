"""georeparam: Geometric Parameterization (GmP) for existing PyTorch models.

GmP (Chen & Ge, NeurIPS 2024) writes every neuron's weight and bias in hyperspherical
coordinates, ``w = r·u(θ)`` and ``b = r·λ``. Three lines put it on a model you already have:

>>> import torch, georeparam
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
>>> georeparam.register(model, exclude=["2"])   # the output layer stays standard
GmP: 1 layer registered (1 in the paper's form, 0 in the weight form), 1 skipped
  layer  type    form   where / why
  0      Linear  paper  sign(r) after 1 (ReLU)
  2      Linear  -      skipped: excluded
>>> optimizer = torch.optim.Adam(model.parameters(), lr=0.1)  # build it after registering
"""

from .layer import Geometry, geometric, geometry, is_geometric
from .model import register
from .removal import remove
from .coords import canonicalize, to_cartesian, to_hyperspherical
from .imn import input_mean_norm
from .init import init_geometric_
from .optim import GeometricOptimizer, param_groups
from .averaging import WeightAverage
from ._map import kernel_status
from .plain import plain_state_dict
from .report import LayerReport, Report

__version__ = "0.1.0"

__all__ = [
    "geometric",
    "register",
    "remove",
    "is_geometric",
    "geometry",
    "Geometry",
    "to_cartesian",
    "to_hyperspherical",
    "canonicalize",
    "init_geometric_",
    "param_groups",
    "GeometricOptimizer",
    "input_mean_norm",
    "plain_state_dict",
    "WeightAverage",
    "Report",
    "LayerReport",
    "kernel_status",
]
