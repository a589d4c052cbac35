"""Worker for tests/test_resume.py: train, checkpoint mid-run, resume in a fresh process.

    python tests/_resume_worker.py full   --ckpt C --out F  # N steps, writes C after K of them
    python tests/_resume_worker.py resume --ckpt C --out F  # a new process: load C, run K..N

Two runs share each process: plain Adam + StepLR, and ``GeometricOptimizer`` (param_groups, Adam)
+ StepLR. The model has dropout, so the global RNG is part of what must be restored; the batches
come from a seeded generator whose state is saved too. One thread: bit-for-bit equality across
processes needs the same reduction order.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import georeparam
from georeparam.optim import GeometricOptimizer, param_groups

STEPS, SAVE_AT, BATCH = 40, 17, 16
KINDS = ("adam", "gmp")


def make_model(init_seed: int) -> nn.Module:
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Linear(6, 24), nn.GELU(), nn.Dropout(0.2), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 3))
    georeparam.register(model, exclude=["5"])
    return model


def make_optimizer(model: nn.Module, kind: str):
    if kind == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=0.3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    else:  # lr 0.3 sends angles out of range within a few steps: the wrapper works all along
        opt = GeometricOptimizer(torch.optim.Adam(param_groups(model, lr=0.3)), model)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    return opt, sched


def data():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(256, 6, generator=g)
    y = (x[:, :3] * x[:, 3:]).argmax(dim=1)
    return x, y


def step(model, opt, sched, x, y, gen) -> None:
    idx = torch.randint(0, len(x), (BATCH,), generator=gen)
    loss = F.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["full", "resume"])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    x, y = data()
    runs = {}
    if args.mode == "full":
        start = 0
        for kind in KINDS:
            model = make_model(init_seed=0)
            opt, sched = make_optimizer(model, kind)
            runs[kind] = (model, opt, sched, torch.Generator().manual_seed(7))
        torch.manual_seed(1000)  # dropout's stream
    else:
        ckpt = torch.load(args.ckpt)  # weights_only: a state_dict checkpoint needs no pickled code
        start = ckpt["step"]
        for kind in KINDS:
            model = make_model(init_seed=99)  # different initial values: everything must come from ckpt
            opt, sched = make_optimizer(model, kind)
            c = ckpt[kind]
            model.load_state_dict(c["model"])
            opt.load_state_dict(c["optimizer"])
            sched.load_state_dict(c["scheduler"])
            gen = torch.Generator()
            gen.set_state(c["data_rng"])
            runs[kind] = (model, opt, sched, gen)
        torch.set_rng_state(ckpt["torch_rng"])
    for t in range(start, STEPS):
        if args.mode == "full" and t == SAVE_AT:
            torch.save(
                {
                    "step": t,
                    "torch_rng": torch.get_rng_state(),
                    **{
                        kind: {
                            "model": m.state_dict(),
                            "optimizer": o.state_dict(),
                            "scheduler": s.state_dict(),
                            "data_rng": g.get_state(),
                        }
                        for kind, (m, o, s, g) in runs.items()
                    },
                },
                args.ckpt,
            )
        for kind in KINDS:  # interleaved, so both runs draw dropout masks from one stream
            step(*runs[kind][:3], x, y, runs[kind][3])
    torch.save(
        {kind: {"model": m.state_dict(), "optimizer": o.state_dict()} for kind, (m, o, _, _) in runs.items()}, args.out
    )


if __name__ == "__main__":
    main()
