r"""ImageNet32 with VGG-6 as ``imagenet32/imagenet32.py`` runs it (GPU scale).

Model (the official ``build_model``): random horizontal flip; conv3×3 128-128, max-pool,
256-256, max-pool, 512-512, max-pool (``padding='SAME'``, ReLU), global average pooling, a linear
layer to 1,000 classes. BN puts ``BatchNormalization`` between each conv and its ReLU; WN is on
every conv and the last layer; GmP on every conv (the last layer stays standard).

``--recipe official`` (default) is the official code's recipe:

* GmP convs start from the official draw, ``init_geometric_(..., "official", sign_loss=True)``:
  fans ``cin·k² + cout`` (radii 1.3–2.8× PyTorch's Glorot per layer) and ``u_n ≥ 0`` (the
  official inverse's sign loss); WN convs from the same bound (``GlorotUniformHyperWN``); SP
  and BN convs, every Linear and every bias as Keras' ``Conv2D``/``Dense`` (Glorot, zeros);
* GmP+IMN is the official ``gmp_mn``: a mean-only normalization after each GmP conv's output
  (``georeparam.imn.output_mean_norm`` on its ReLU, before the max-pool, running-mean momentum
  0.01 = Keras' 0.99) — ``imn.py``'s Note [The official placement].

``--recipe library`` is this library's defaults instead: GmP from PyTorch's Glorot draw
(``"glorot_uniform"``, fans ``cin·k²``/``cout·k²``, signs kept), WN from the same draw, IMN
centring each GmP layer's *input* (``register(imn=True)``, momentum 0.1). Where the default still
differs from the official script: float32 weights in PyTorch's NCHW layout; PyTorch's SGD
momentum form (equal to Keras' until the first plateau decay); training images held out for
monitoring (``--monitor val``; the official script monitors ImageNet32's validation split, its
test split too).

``--smoke`` (sized for ≤ 10 minutes on one H200-class GPU): every method for **one epoch on the
first 256,000 training images** (20 % of ImageNet32; synthetic images of that count without
``--data-dir``), full width, batch 256, 10,000 test images. It measures that each recipe runs
end to end on the device, and its throughput (training images per second, in the table), from
which the notes estimate the full grid's cost; its accuracies after a fifth of an epoch mean
nothing.

Training (the official): inputs ``x/255 − mean`` (no std division), SGD momentum 0.9,
lr 0.1 (GmP, GmP+IMN) / 0.01 (others), cross-entropy, ≤ 500 epochs,
``ReduceLROnPlateau(×0.1, patience 5)`` and ``EarlyStopping(patience 10)`` on top-5 accuracy;
``--batch-size`` 256/512/1024 as in the paper. The official script monitors the validation split
of ImageNet32, which is also its test split; here 10,000 training images are held out for
monitoring by default and the validation split is only the test (``--monitor test``: the
official choice).

Data: ``--data-dir`` holding ``train_data_batch_1..10`` and ``val_data`` (the ImageNet32
downloads, pickled or ``.npz``), or ``--synthetic`` (class-dependent images; what the tests run
at toy size on CPU). ``--amp bf16`` runs the forward pass under bfloat16 autocast on CUDA.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import georeparam
from georeparam.imn import OFFICIAL_MOMENTUM, output_mean_norm

from . import common as C

NAME = "imagenet32"
TITLE = "ImageNet32, VGG-6 (top-1 / top-5)"
DEFAULT_SEEDS = "1"
METHODS = ("SP", "WN", "BN", "GmP", "GmP+IMN")
MEAN = (0.481098, 0.45747134, 0.40785483)


def add_arguments(p) -> None:
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default 500; quick 1)")
    p.add_argument("--batch-size", type=int, default=None, help="default 256; quick 32")
    p.add_argument("--width", type=float, default=None, help="channel multiplier (default 1; quick 1/16)")
    p.add_argument(
        "--monitor",
        choices=["val", "test"],
        default="val",
        help="val: held-out training images (default); test: the official choice",
    )
    p.add_argument(
        "--val-size", type=int, default=None, help="training images held out for monitoring (default 10000; quick 64)"
    )
    p.add_argument("--max-train", type=int, default=None, help="use at most this many training images")
    p.add_argument("--max-test", type=int, default=None, help="use at most this many test images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--amp", choices=["bf16", "off"], default="off", help="bfloat16 autocast for the forward pass (CUDA)"
    )
    p.add_argument("--synthetic", action="store_true", help="generated images instead of ImageNet32 files")
    p.add_argument("--num-classes", type=int, default=None, help="default 1000 (synthetic quick: 10)")
    p.add_argument(
        "--recipe",
        choices=["official", "library"],
        default="official",
        help="official (default): the official init and IMN placement",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="one epoch on 256,000 training images per method (≤ 10 min on one H200): throughput",
    )


def vgg6(
    method: str, seed: int, *, width: float = 1.0, num_classes: int = 1000, recipe: str = "official"
) -> nn.Sequential:
    """VGG-6 for 32×32 inputs, Keras' initial values, then ``method`` under ``recipe`` (see the
    module docstring: ``official`` or ``library``).

    >>> vgg6("SP", 0, width=1 / 16, num_classes=10)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    g = torch.Generator().manual_seed(seed)
    chans = [max(1, int(round(c * width))) for c in (128, 128, 256, 256, 512, 512)]
    layers, hidden, c_in = [], [], 3
    for i, c in enumerate(chans):
        hidden.append(str(len(layers)))
        layers.append(C.glorot_(nn.Conv2d(c_in, c, 3, padding=1), g))
        if method == "BN":
            layers.append(C.bn(c, torch.float32, dims=2))
        layers.append(nn.ReLU())
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), C.glorot_(nn.Linear(c_in, num_classes), g)]
    if recipe not in ("official", "library"):
        raise ValueError(f"vgg6: recipe must be 'official' or 'library'. Got: {recipe!r}")
    model = nn.Sequential(*layers)
    if recipe == "library":
        return C.apply_method(model, method, hidden, str(len(layers) - 1), seed)
    return official_method(model, method, hidden, str(len(layers) - 1), seed)


def official_method(model: nn.Sequential, method: str, hidden, output: str, seed: int) -> nn.Sequential:
    """``method`` as the official ImageNet32 script builds it (module docstring, ``--recipe official``)."""
    g = torch.Generator().manual_seed(seed + 1)
    if method == "WN":
        with torch.no_grad():
            for name in hidden:  # GlorotUniformHyperWN: the bound of a unit's fan-in cin·k² and cout outputs
                conv = model.get_submodule(name)
                a = (6.0 / (conv.weight[0].numel() + conv.weight.shape[0])) ** 0.5
                conv.weight.uniform_(-a, a, generator=g)
        return C.apply_method(model, "WN", hidden, output, seed)
    if not method.startswith("GmP"):
        return C.apply_method(model, method, hidden, output, seed)
    if method == "GmP-w":
        raise ValueError(
            "imagenet32: the official recipe has no weight-form GmP. Got: method 'GmP-w' (use --recipe library)"
        )
    georeparam.register(model, include=list(hidden), form="paper")
    georeparam.init_geometric_(model, "official", generator=g, sign_loss=True)
    if method == "GmP+IMN":
        for (
            name
        ) in hidden:  # the official gmp_mn: centre each GmP conv's output r·ReLU(...), on its ReLU, after the sign hook
            relu = model[int(name) + 1]
            output_mean_norm(
                relu,
                model.get_submodule(name).weight.shape[0],
                dim=-3,
                momentum=OFFICIAL_MOMENTUM,
                dtype=model[int(name)].weight.dtype,
            )
    return model


class Autocast(nn.Module):
    """Runs ``model`` under bfloat16 autocast and returns float32 logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.model(x).float()


def load_batch(path: Path):
    """``(uint8 (N, 3, 32, 32), 0-based labels)`` from one ImageNet32 file (pickle or ``.npz``)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            data, labels = f["data"], f["labels"]
    except (ValueError, OSError):
        with open(path, "rb") as fh:
            d = pickle.load(fh)
        data, labels = d["data"], d["labels"]
    data, labels = np.asarray(data), np.asarray(labels, dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(
            f"{path}: expected 'data' uint8 (N, 3072) and N 'labels'. Got: data {data.dtype} {data.shape}, labels {labels.shape}"
        )
    if labels.min() < 1:
        raise ValueError(f"{path}: ImageNet32 labels are 1-based. Got: min label {labels.min()}")
    return data.reshape(-1, 3, 32, 32), labels - 1


def _find(folder: Path, stem: str) -> Path:
    for cand in (folder / f"{stem}.npz", folder / stem):
        if cand.is_file():
            return cand
    raise C.DataMissing(
        f"imagenet32: {folder / stem}[.npz] not found. Pass --data-dir (train_data_batch_1..10 and val_data) or use --synthetic."
    )


def load_imagenet32(folder, max_train=None, max_test=None):
    folder = Path(folder)
    first = _find(folder, "train_data_batch_1")
    paths = [first] + [p for p in (folder / f"train_data_batch_{i}{first.suffix}" for i in range(2, 11)) if p.is_file()]
    xs, ys, total = [], [], 0
    for p in paths:
        x, y = load_batch(p)
        xs.append(x)
        ys.append(y)
        total += len(x)
        if max_train is not None and total >= max_train:
            break
    x_test, y_test = load_batch(_find(folder, "val_data"))
    return np.concatenate(xs)[:max_train], np.concatenate(ys)[:max_train], x_test[:max_test], y_test[:max_test]


def make_synthetic(n: int, num_classes: int, seed: int):
    """Learnable toy images: a class-dependent colour gradient plus noise, uint8 (N, 3, 32, 32)."""
    g = np.random.default_rng(seed)
    y = g.integers(0, num_classes, size=n)
    protos = g.uniform(0, 255, size=(num_classes, 3, 1, 1)) * np.linspace(0.3, 1.0, 32)[None, None, None, :]
    x = protos[y] + g.normal(0, 40, size=(n, 3, 32, 32))
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def write_batches(folder, x, y, x_test, y_test, n_batches: int = 2) -> None:
    """Write arrays in the ImageNet32 ``.npz`` layout (1-based labels), e.g. for a subset."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(np.array_split(np.arange(len(x)), n_batches), start=1):
        np.savez(folder / f"train_data_batch_{i}.npz", data=x[idx].reshape(len(idx), -1), labels=y[idx] + 1)
    np.savez(folder / "val_data.npz", data=x_test.reshape(len(x_test), -1), labels=y_test + 1)


def topk(model, x_u8, y, device, batch: int = 1000):
    """(top-1, top-5) accuracy over uint8 images, evaluated in slices."""
    c1 = c5 = 0
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    for i in range(0, len(x_u8), batch):
        xb = x_u8[i : i + batch].to(device).float().div_(255.0).sub_(mean)
        yb = y[i : i + batch].to(device)
        top = model(xb).topk(min(5, model(xb[:1]).shape[1]), dim=1).indices
        c1 += int((top[:, 0] == yb).sum())
        c5 += int((top == yb[:, None]).any(1).sum())
    return c1 / len(x_u8), c5 / len(x_u8)


def train_one(
    data,
    method: str,
    seed: int,
    *,
    epochs,
    batch_size,
    width,
    num_classes,
    monitor,
    val_size,
    device,
    amp,
    progress=None,
    recipe: str = "official",
) -> dict:
    x, y, x_test, y_test = data
    if monitor == "val":
        fit_idx, mon_idx = C.carve_validation(np.arange(len(x)), val_size / len(x), seed)
        mon = (torch.from_numpy(x[mon_idx]), torch.from_numpy(y[mon_idx]))
    else:
        fit_idx, mon = np.arange(len(x)), (torch.from_numpy(x_test), torch.from_numpy(y_test))
    fit = (torch.from_numpy(x[fit_idx]), torch.from_numpy(y[fit_idx]))
    model = vgg6(method, seed, width=width, num_classes=num_classes, recipe=recipe).to(device)
    net = Autocast(model) if amp else model
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    flip_gen = torch.Generator(device=device).manual_seed(seed)

    def batch_fn(xb, yb):  # uint8 → x/255 − mean, random horizontal flip
        xb = xb.to(device, non_blocking=True).float().div_(255.0).sub_(mean)
        flip = torch.rand(xb.shape[0], device=device, generator=flip_gen) < 0.5
        return torch.where(flip[:, None, None, None], xb.flip(3), xb), yb.to(device, non_blocking=True)

    history = []

    def monitored(m, train_loss):
        t1, t5 = topk(m, *mon, device)
        history.append(dict(train_loss=train_loss, top1=t1, top5=t5, seconds=time.time() - t0))
        return t5

    cfg = C.FitConfig(
        lr=C.paper_lr(method),
        epochs=epochs,
        batch_size=batch_size,
        mode="max",
        patience=10,
        plateau_patience=5,
        optimizer="sgd",
    )
    t0 = time.time()
    res = C.fit(
        net,
        fit,
        loss_fn=nn.functional.cross_entropy,
        cfg=cfg,
        seed=seed,
        monitor=monitored,
        batch_fn=batch_fn,
        progress=progress,
    )
    with torch.no_grad():
        test1, test5 = topk(net.eval(), torch.from_numpy(x_test), torch.from_numpy(y_test), device)
    seconds = time.time() - t0
    return dict(
        seed=seed,
        test_top1=test1,
        test_top5=test5,
        monitored_top5=res.best_monitored,
        epochs=res.epochs,
        steps=res.steps,
        nonfinite=res.nonfinite,
        seconds=seconds,
        images_per_s=len(fit_idx) * res.epochs / max(seconds, 1e-9),
        history=history,
    )


def run(args) -> dict:
    device = torch.device(args.device)
    q = args.quick
    if args.smoke and not q:
        args.epochs = args.epochs or 1
        args.max_train = args.max_train or 256_000
        args.max_test = args.max_test or 10_000
    epochs = args.epochs or (1 if q else 500)
    batch_size = args.batch_size or (32 if q else 256)
    width = args.width or (1 / 16 if q else 1.0)
    val_size = args.val_size or (64 if q else 10_000)
    if args.synthetic:
        num_classes = args.num_classes or (10 if q else 1000)
        x, y = make_synthetic((args.max_train or (512 if q else 50_000)) + val_size, num_classes, 0)
        xt, yt = make_synthetic(args.max_test or (256 if q else 10_000), num_classes, 1)
        data = (x, y, xt, yt)
    else:
        folder = Path(args.data_dir) if args.data_dir else C.data_root() / "imagenet32"
        data = load_imagenet32(folder, args.max_train, args.max_test)
        num_classes = args.num_classes or 1000
    if args.monitor == "val" and val_size >= len(data[0]):
        raise ValueError(
            f"imagenet32: --val-size must be smaller than the training set. Got: {val_size} of {len(data[0])}"
        )
    results = {}
    bar = C.progress_bar(len(args.methods) * len(args.seeds), "imagenet32", args.quiet)
    for method in args.methods:
        results[method] = []
        for seed in args.seeds:
            bar.set_description(f"imagenet32 {method} seed {seed}", refresh=False)
            results[method].append(
                train_one(
                    data,
                    method,
                    seed,
                    epochs=epochs,
                    batch_size=batch_size,
                    width=width,
                    num_classes=num_classes,
                    monitor=args.monitor,
                    val_size=val_size,
                    device=device,
                    amp=args.amp == "bf16",
                    progress=bar,
                    recipe=args.recipe,
                )
            )
            bar.update(1)
    bar.close()
    rows = [
        [
            C.LABELS[m],
            f"{C.paper_lr(m):g}",
            C.fmt_mean_std([d["test_top1"] for d in r], 4),
            C.fmt_mean_std([d["test_top5"] for d in r], 4),
            f"{np.mean([d['epochs'] for d in r]):.0f}",
            f"{np.mean([d['seconds'] for d in r]) / 60:.1f}",
            f"{np.mean([d['images_per_s'] for d in r]):.0f}",
        ]
        for m, r in results.items()
    ]
    files = [] if args.no_plots else [plot(results, Path(args.out) / "imagenet32_top5.png")]
    notes = (
        f"{'Synthetic data' if args.synthetic else 'ImageNet32'}: {len(data[0])} training images ({val_size if args.monitor == 'val' else 0} held out for monitoring), "
        f"{len(data[2])} test images; monitored: {'held-out training images' if args.monitor == 'val' else 'the test split (official)'}; "
        f"VGG-6 width ×{width:g}, batch {batch_size}, ≤{epochs} epochs, SGD momentum 0.9, amp {args.amp}, device {device}, recipe {args.recipe}. "
        + grid_cost(results, width)
    )
    return dict(
        table=C.markdown_table(
            ["method", "lr", "test top-1", "test top-5", "epochs", "minutes", "train images / s"], rows
        ),
        notes=notes,
        files=files,
        results=results,
        config=dict(
            epochs=epochs, batch_size=batch_size, width=width, monitor=args.monitor, amp=args.amp, recipe=args.recipe
        ),
    )


#: ImageNet32's training set, and the epochs an official run takes before early stopping
#: (patience 10 on top-5 after plateau decays; an estimate, not measured here)
N_TRAIN, EPOCH_RANGE = 1_281_167, (30, 60)


def grid_cost(results, width: float) -> str:
    """The full grid's cost at the measured throughput: every method × 3 batch sizes × 1 seed,
    each run ``EPOCH_RANGE`` epochs of ImageNet32 (plus nothing for evaluation)."""
    if width != 1.0:
        return "(Full-grid cost: measured only at full width.)"
    per = {m: N_TRAIN / float(np.mean([d["images_per_s"] for d in r])) / 3600.0 for m, r in results.items()}
    lo, hi = EPOCH_RANGE
    total = sum(per.values()) * 3
    return (
        "Full-grid cost at this throughput: one epoch of ImageNet32 takes "
        + ", ".join(f"{m} {h * 60:.1f} min" for m, h in per.items())
        + f"; a run of {lo}–{hi} epochs {min(per.values()) * lo:.1f}–{max(per.values()) * hi:.1f} h; every method × 3 batch sizes × 1 seed "
        f"{total * lo:.0f}–{total * hi:.0f} h on this device."
    )


def plot(results, path: Path) -> Path:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for m, runs in results.items():
        h = runs[0]["history"]
        ax.plot(range(1, len(h) + 1), [e["top5"] for e in h], "o-", ms=3, label=C.LABELS[m])
    ax.set_xlabel("epoch")
    ax.set_ylabel("monitored top-5")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return C.savefig(fig, path)
