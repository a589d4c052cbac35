r"""ImageNet32 with VGG-6 (GPU scale; not part of ``all``).

Model (the paper's): conv 128-128 / max-pool / 256-256 / max-pool / 512-512 / max-pool, all 3×3
with ReLU, global average pooling, linear to 1,000 classes; BN puts BatchNorm2d after each conv,
WN/GmP/GmP+IMN act on the convs, the linear output layer stays standard. Training: SGD with
momentum 0.9, lr 0.1 (GmP variants) / 0.01 (others) unless ``--lr``, batch 256, random horizontal
flips, lr ×0.1 after ``--plateau`` epochs without a better validation top-5 and early stopping
after ``--patience`` (best weights restored). The validation split (``--val-size`` images) is
carved from the training batches; the official ``val_data`` file is the test set and is read once,
at the end. Mixed precision (``--amp bf16`` by default on CUDA).

Data: the standard ImageNet32 downsampled files (Chrabaszcz et al. 2017) in ``--data-dir``:
``train_data_batch_1`` … ``train_data_batch_10`` and ``val_data`` (``.npz`` or the pickled
originals), each with ``data`` (N × 3072 uint8, channel-major 3×32×32) and ``labels`` (1-based).
The whole training set is held as one uint8 tensor (3.9 GB), on the GPU when ``--data-on-device``.

``--synthetic`` trains on generated class-dependent images instead (a smoke test of the pipeline,
used by the tests at toy size with ``--quick``).
"""

from __future__ import annotations

import math
import pickle
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import common as C
from ..api import is_geometric
from ..optim import param_groups

NAME = "imagenet32"
TITLE = "ImageNet32, VGG-6 (top-1 / top-5)"
DEFAULT_SEEDS = "1"
MEAN = (0.481, 0.457, 0.408)
STD = (0.260, 0.253, 0.268)


def add_arguments(p) -> None:
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default 40; quick 2)")
    p.add_argument("--batch-size", type=int, default=None, help="default 256; quick 32")
    p.add_argument("--lr", type=float, default=None, help="override the paper's per-method learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay on the non-angle parameters (default 0)")
    p.add_argument("--width", type=float, default=None, help="channel multiplier (default 1; quick 1/16)")
    p.add_argument("--val-size", type=int, default=None, help="training images held out for validation (default 10000; quick 64)")
    p.add_argument("--max-train", type=int, default=None, help="use at most this many training images")
    p.add_argument("--max-test", type=int, default=None, help="use at most this many test images")
    p.add_argument("--plateau", type=int, default=2, help="epochs without a better validation top-5 before lr ×0.1")
    p.add_argument("--patience", type=int, default=6, help="early-stopping patience in epochs")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default=None, help="autocast dtype (default bf16 on CUDA, off on CPU)")
    p.add_argument("--data-on-device", action="store_true", help="hold the uint8 training set on the device")
    p.add_argument("--synthetic", action="store_true", help="generated data instead of ImageNet32 files")
    p.add_argument("--num-classes", type=int, default=None, help="default 1000 (synthetic quick: 10)")


# -------------------------------------------------------------------------------------------------
# model
# -------------------------------------------------------------------------------------------------


def vgg6(*, bn: bool = False, width: float = 1.0, num_classes: int = 1000):
    """VGG-6 for 32×32 inputs. Returns ``(model, hidden_conv_names, output_name)``.

    >>> model, hidden, out = vgg6(width=1 / 16, num_classes=10)
    >>> hidden, out, model(torch.zeros(2, 3, 32, 32)).shape
    (['0', '2', '5', '7', '10', '12'], '17', torch.Size([2, 10]))
    """
    chans = [max(1, int(round(c * width))) for c in (128, 128, 256, 256, 512, 512)]
    layers, hidden = [], []
    c_in = 3
    for i, c in enumerate(chans):
        hidden.append(str(len(layers)))
        layers.append(nn.Conv2d(c_in, c, 3, padding=1))
        if bn:
            layers.append(nn.BatchNorm2d(c))
        layers.append(nn.ReLU(inplace=True))
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    out = str(len(layers))
    layers.append(nn.Linear(c_in, num_classes))
    return nn.Sequential(*layers), hidden, out


# -------------------------------------------------------------------------------------------------
# data
# -------------------------------------------------------------------------------------------------


def _find(folder: Path, stem: str) -> Path:
    for cand in (folder / f"{stem}.npz", folder / stem):
        if cand.is_file():
            return cand
    raise C.DataMissing(f"imagenet32: {folder / stem}[.npz] not found. Pass --data-dir (the folder with train_data_batch_1..10 and val_data) or use --synthetic.")


def load_batch(path: Path):
    """``(data uint8 (N, 3, 32, 32), labels int64 0-based)`` from one ImageNet32 file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            data, labels = f["data"], f["labels"]
    except (ValueError, OSError):
        with open(path, "rb") as fh:
            d = pickle.load(fh)
        data, labels = d["data"], d["labels"]
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"{path}: expected 'data' uint8 (N, 3072) and N 'labels'. Got: data {data.dtype} {data.shape}, labels {labels.shape}")
    if labels.min() < 1:
        raise ValueError(f"{path}: ImageNet32 labels are 1-based. Got: min label {labels.min()}")
    return data.reshape(-1, 3, 32, 32), labels - 1


def load_imagenet32(folder, max_train=None, max_test=None):
    folder = Path(folder)
    xs, ys = [], []
    first = _find(folder, "train_data_batch_1")
    paths = [first] + [p for p in (folder / f"train_data_batch_{i}{first.suffix}" for i in range(2, 11)) if p.is_file()]
    total = 0
    for p in paths:
        x, y = load_batch(p)
        xs.append(x)
        ys.append(y)
        total += len(x)
        if max_train is not None and total >= max_train:
            break
    x_train, y_train = np.concatenate(xs), np.concatenate(ys)
    x_test, y_test = load_batch(_find(folder, "val_data"))
    if max_train is not None:
        x_train, y_train = x_train[:max_train], y_train[:max_train]
    if max_test is not None:
        x_test, y_test = x_test[:max_test], y_test[:max_test]
    return x_train, y_train, x_test, y_test


def make_synthetic(n: int, num_classes: int, seed: int):
    """Learnable toy images: a class-dependent colour gradient plus noise, uint8 (N, 3, 32, 32)."""
    g = np.random.default_rng(seed)
    y = g.integers(0, num_classes, size=n)
    protos = g.uniform(0, 255, size=(num_classes, 3, 1, 1)) * np.linspace(0.3, 1.0, 32)[None, None, None, :]
    x = protos[y] + g.normal(0, 40, size=(n, 3, 32, 32))
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def write_batches(folder, x, y, x_test, y_test, n_batches: int = 2) -> None:
    """Write arrays in the ImageNet32 npz layout (for tests and for people making subsets)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(np.array_split(np.arange(len(x)), n_batches), start=1):
        np.savez(folder / f"train_data_batch_{i}.npz", data=x[idx].reshape(len(idx), -1), labels=y[idx] + 1)
    np.savez(folder / "val_data.npz", data=x_test.reshape(len(x_test), -1), labels=y_test + 1)


# -------------------------------------------------------------------------------------------------
# training
# -------------------------------------------------------------------------------------------------


def _prep(xb: torch.Tensor, mean, std, flip: bool, gen=None) -> torch.Tensor:
    x = xb.float().div_(255.0).sub_(mean).div_(std)
    if flip:
        mask = torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def evaluate(model, x_u8, y, mean, std, device, batch=1024, amp=None):
    """(top-1, top-5) accuracy; inputs are uint8 tensors on any device."""
    model.eval()
    c1 = c5 = 0
    with torch.no_grad():
        for i in range(0, len(x_u8), batch):
            xb = _prep(x_u8[i : i + batch].to(device, non_blocking=True), mean, std, False)
            yb = y[i : i + batch].to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(xb)
            top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
            c1 += int((top[:, 0] == yb).sum())
            c5 += int((top == yb[:, None]).any(1).sum())
    model.train()
    return c1 / len(x_u8), c5 / len(x_u8)


def _param_groups(model, lr: float, weight_decay: float):
    if weight_decay == 0 or not any(is_geometric(m) for m in model.modules()):
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    # the library's groups: decay on everything but the angles (decay pulls every direction
    # toward one axis), the offsets included as in the Cartesian bias
    return param_groups(model, lr, weight_decay=weight_decay, offset_weight_decay=weight_decay)


def train_one(data, method: str, seed: int, *, lr: float, epochs: int, batch_size: int, width: float, num_classes: int, val_size: int,
              device, amp, plateau: int, patience: int, weight_decay: float = 0.0, data_on_device: bool = False, quiet: bool = False) -> dict:
    x, y, x_test, y_test = data
    C.seed_everything(seed)
    fit_idx, val_idx = C.split_indices(len(x), [1 - val_size / len(x), val_size / len(x)], seed)
    store = device if data_on_device else torch.device("cpu")
    x_fit = torch.from_numpy(x[fit_idx]).to(store)
    y_fit = torch.from_numpy(y[fit_idx]).to(store)
    x_val, y_val = torch.from_numpy(x[val_idx]), torch.from_numpy(y[val_idx])
    if device.type == "cuda" and not data_on_device:
        x_fit, y_fit = x_fit.pin_memory(), y_fit.pin_memory()
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    model = C.build(vgg6, method, seed, width=width, num_classes=num_classes).to(device)
    opt = torch.optim.SGD(_param_groups(model, lr, weight_decay), lr=lr, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=(amp == torch.float16))
    monitor = C.Monitor("max", patience=patience, plateau_patience=plateau)
    gen = torch.Generator().manual_seed(seed)
    n = len(x_fit)
    history, diverged, steps, t0 = [], False, 0, time.time()
    from tqdm.auto import tqdm

    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n, generator=gen)
        bar = tqdm(perm.split(batch_size), desc=f"imagenet32 {method} epoch {epoch}", leave=False, disable=quiet, mininterval=2.0)
        total, count = 0.0, 0
        for idx in bar:
            xb = _prep(x_fit[idx.to(store)].to(device, non_blocking=True), mean, std, True)
            yb = y_fit[idx.to(store)].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            steps += 1
            if steps % 50 == 0 or steps == 1:
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    diverged = True
                    break
                total += lv
                count += 1
                bar.set_postfix_str(f"loss {lv:.3f}", refresh=False)
        if diverged:
            break
        top1, top5 = evaluate(model, x_val, y_val, mean, std, device, amp=amp)
        history.append(dict(epoch=epoch, steps=steps, train_loss=total / max(count, 1), val_top1=top1, val_top5=top5, lr=opt.param_groups[0]["lr"], seconds=time.time() - t0))
        if not quiet:
            print(f"imagenet32 {method} epoch {epoch}: loss {history[-1]['train_loss']:.3f} val top-1 {top1:.4f} top-5 {top5:.4f} lr {opt.param_groups[0]['lr']:.3g}", flush=True)
        if monitor.update(top5, model, opt):
            break
    monitor.restore(model)
    test1, test5 = evaluate(model, torch.from_numpy(x_test), torch.from_numpy(y_test), mean, std, device, amp=amp)
    return dict(seed=seed, test_top1=test1, test_top5=test5, val_top5=monitor.best, epochs=len(history), steps=steps, diverged=diverged,
                seconds=time.time() - t0, history=history)


def run(args) -> dict:
    device = torch.device(args.device)
    q = args.quick
    epochs = args.epochs or (2 if q else 40)
    batch_size = args.batch_size or (32 if q else 256)
    width = args.width or (1 / 16 if q else 1.0)
    val_size = args.val_size or (64 if q else 10_000)
    amp_name = args.amp or ("bf16" if device.type == "cuda" else "off")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp_name]
    if args.synthetic:
        num_classes = args.num_classes or (10 if q else 1000)
        n_train = args.max_train or (512 if q else 50_000)
        x, y = make_synthetic(n_train + val_size, num_classes, 0)
        xt, yt = make_synthetic(args.max_test or (256 if q else 10_000), num_classes, 1)
        data = (x, y, xt, yt)
    else:
        folder = Path(args.data_dir) if args.data_dir else C.data_root() / "imagenet32"
        data = load_imagenet32(folder, args.max_train or (512 + val_size if q else None), args.max_test or (256 if q else None))
        num_classes = args.num_classes or 1000
    if val_size >= len(data[0]):
        raise ValueError(f"imagenet32: --val-size must be smaller than the training set. Got: {val_size} of {len(data[0])}")
    results = {}
    for method in args.methods:
        results[method] = []
        for seed in args.seeds:
            lr = args.lr if args.lr is not None else C.paper_lr(method)
            results[method].append(train_one(data, method, seed, lr=lr, epochs=epochs, batch_size=batch_size, width=width, num_classes=num_classes,
                                             val_size=val_size, device=device, amp=amp, plateau=args.plateau, patience=args.patience,
                                             weight_decay=args.weight_decay, data_on_device=args.data_on_device, quiet=args.quiet))
    header = ["method", "lr", "test top-1", "test top-5", "epochs", "minutes"]
    rows = []
    for m in args.methods:
        r = results[m]
        rows.append([m, f"{args.lr if args.lr is not None else C.paper_lr(m):g}", C.fmt_mean_std([d["test_top1"] for d in r], 4),
                     C.fmt_mean_std([d["test_top5"] for d in r], 4), f"{np.mean([d['epochs'] for d in r]):.0f}",
                     f"{np.mean([d['seconds'] for d in r]) / 60:.1f}"])
    files = []
    if not args.no_plots:
        files.append(_plot(results, Path(args.out) / "imagenet32_val_top5.png"))
    notes = (
        f"{'Synthetic data' if args.synthetic else 'ImageNet32'}: {len(data[0]) - val_size} training images, {val_size} held out for validation, "
        f"{len(data[2])} test images; VGG-6 width ×{width:g}, batch {batch_size}, ≤{epochs} epochs, SGD momentum 0.9, amp {amp_name}, device {device}."
    )
    return dict(table=C.markdown_table(header, rows), notes=notes, files=files, results=results)


def _plot(results, path: Path) -> Path:
    plt = C.matplotlib_pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for m, runs in results.items():
        h = runs[0]["history"]
        if h:
            ax.plot([e["epoch"] for e in h], [e["val_top5"] for e in h], "o-", ms=3, label=m)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-5")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return C.savefig(fig, path, dpi=80)
