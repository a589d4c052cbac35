r"""Handwritten digits (not in the paper): a real image dataset small enough for a CPU.

Data: ``sklearn.datasets.load_digits`` (8×8 grey images, 1,797 of them, 10 classes; the file
ships inside the scikit-learn wheel, nothing is downloaded). Per seed: the 80/20 split of
``train_test_split(test_size=0.2, random_state=seed)`` (as UCI's), 10 % of the training part
held out for validation; pixels scaled by one scalar mean/std of the fitted rows. Models,
initialised as Keras does (Glorot weights, zero biases; GmP from the same draw with ``λ = 0``),
float64:

* ``mlp``: 64 → 100 → 100 → 10, ReLU;
* ``cnn``: Conv2d(1→16, 3×3, padding 1) → ReLU → Conv2d(16→32, 3×3, stride 2, padding 1) →
  ReLU → flatten (32·4·4) → Linear(10); GmP on the two convolutions.

Training as MNIST-1D's: cross-entropy, batch 100, ≤ 200 epochs, Adam (ε 1e-7),
``ReduceLROnPlateau(×0.1, patience 15)`` and ``EarlyStopping(patience 30)`` on validation
accuracy. The validation split (144 images) saturates accuracy, so learning rates whose mean
validation accuracy ties are told apart by the validation cross-entropy of the final weights.
``--protocol tuned`` (default) runs the learning-rate grid (Note [Which learning rate
is compared] in ``tuned.py``); ``fixed`` the paper's rule only.
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch
from torch import nn

from . import common as C
from . import mnist1d as M
from . import tuned as TU

NAME = "digits"
TITLE = "Digits 8×8 classification (sklearn's bundled set; external check, not in the paper)"
DEFAULT_SEEDS = "10"
MODELS = ("mlp", "cnn")
METRIC = TU.Metric(M.METRIC, tiebreak="val_loss")
UNIT_TITLE = {"mlp": "Digits MLP (64-100-100-10)", "cnn": "Digits CNN (conv 16, conv 32 stride 2, linear)"}


def add_arguments(p) -> None:
    p.add_argument("--models", default=",".join(MODELS), help="mlp,cnn")
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default 200; quick 3)")
    M.add_protocol_arguments(p)


def load_digits():
    """``(images, labels)``: float64 ``(1797, 64)`` in 0…16 and int64 labels."""
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError as e:
        raise C.DataMissing(f"digits: scikit-learn is not installed (pip install scikit-learn). Got: {e}") from None
    d = sk_load()
    return np.asarray(d.data, dtype=np.float64), np.asarray(d.target, dtype=np.int64)


def make_split(data, seed: int, val_fraction: float = 0.1):
    """``(fit, val, test)`` tensor pairs: the 80/20 split of ``seed``, validation carved from the
    training part; scaled by the fitted rows' scalar mean/std (test rows never involved)."""
    x, y = data
    train_idx, test_idx = C.train_test_split_indices(len(x), 0.2, seed)
    fit_idx, val_idx = C.carve_validation(train_idx, val_fraction, seed)
    mean, std = x[fit_idx].mean(), x[fit_idx].std()
    t = lambda i: (torch.as_tensor((x[i] - mean) / std, dtype=torch.float64), torch.as_tensor(y[i]))  # noqa: E731
    return t(fit_idx), t(val_idx), t(test_idx)


def cnn(method: str, seed: int, *, dtype=torch.float64) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers: List[nn.Module] = [nn.Unflatten(1, (1, 8, 8))]
    hidden = []
    for c_in, c_out, stride in ((1, 16, 1), (16, 32, 2)):
        hidden.append(str(len(layers)))
        layers.append(C.glorot_(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, dtype=dtype), g))
        if method == "BN":
            layers.append(C.bn(c_out, dtype, dims=2))
        layers.append(nn.ReLU())
    layers.append(nn.Flatten())
    layers.append(C.glorot_(nn.Linear(32 * 4 * 4, 10, dtype=dtype), g))
    return C.apply_method(nn.Sequential(*layers), method, hidden, str(len(layers) - 1), seed)


def build(model_name: str, method: str, seed: int) -> nn.Module:
    if model_name == "mlp":
        return C.mlp(method, 64, [100, 100], 10, seed)
    return cnn(method, seed)


def train_one(data, model_name: str, method: str, seed: int, *, lr=None, epochs: int = 200) -> dict:
    fit, val, test = make_split(data, seed)
    model = build(model_name, method, seed)
    cfg = C.FitConfig(
        lr=C.paper_lr(method) if lr is None else lr,
        epochs=epochs,
        batch_size=100,
        mode="max",
        patience=30,
        plateau_patience=15,
    )
    res = C.fit(
        model, fit, loss_fn=nn.functional.cross_entropy, cfg=cfg, seed=seed, monitor=lambda m, _: M.accuracy(m, *val)
    )
    with torch.no_grad():
        ok = not res.nonfinite or res.restored
        acc = M.accuracy(model, *test) if ok else float("nan")
        val_loss = float(nn.functional.cross_entropy(model(val[0]), val[1])) if ok else float("nan")
    return dict(
        seed=seed,
        test_acc=acc,
        val_acc=res.best_monitored,
        val_loss=val_loss,
        epochs=res.epochs,
        nonfinite=res.nonfinite,
    )


def run(args) -> dict:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in MODELS for m in models):
        raise SystemExit(f"digits: --models takes a subset of {','.join(MODELS)}. Got: {args.models!r}")
    data = load_digits()
    if args.quick:
        data = (data[0][:400], data[1][:400])
    epochs = args.epochs or (3 if args.quick else 200)
    config = dict(protocol=args.protocol, epochs=epochs, models=models, n=len(data[0]), optimizer="adam")
    if args.protocol == "tuned":
        return TU.run_tuned(
            args, NAME, models, lambda u, m, s, lr: train_one(data, u, m, s, lr=lr, epochs=epochs), config, summarize
        )
    results = {u: {m: {} for m in args.methods} for u in models}  # the paper's rule: each method at its own lr only
    for u in models:
        for m in args.methods:
            results[u][m][TU.lr_key(C.paper_lr(m))] = [train_one(data, u, m, s, epochs=epochs) for s in args.seeds]
    tables, notes = summarize(results, args.seeds, config)
    return dict(table=tables[0], extra_tables=tables[1:], notes=notes, files=[], results=results, config=config)


def summarize(results, seeds, config):
    tables = [
        "\n".join(TU.summarize_unit(UNIT_TITLE[u], results[u], seeds, METRIC, C.METHODS, C.LABELS, C.paper_lr))
        for u in config["models"]
    ]
    notes = (
        f"sklearn digits ({config['n']} images; per seed the 80/20 split of that seed, 10 % of the training part for validation), batch 100, "
        f"≤{config['epochs']} epochs, float64, Adam (ε 1e-7), plateau ×0.1 after 15 and early stop after 30 epochs on validation accuracy; "
        "the learning rate is chosen on validation accuracy only, ties broken by the validation cross-entropy (Note [Which learning rate is compared])."
    )
    return tables, notes
