"""Shared helpers for the test suite.

Plain functions (``rel_err``, ``tol``, ``seeded``) are importable as ``from conftest import
...``; the fixtures wrap them for tests that prefer injection.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

REPO_ROOT = Path(__file__).resolve().parents[1]

# Hypothesis: no deadlines (the 2-core CI machine is shared and timings jitter), and the examples
# database stays out of the repository (.hypothesis/ is ignored, but CI clones are throwaway).
settings.register_profile(
    "georeparam",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
# CI (``.ci/run``) replays a fixed set of examples, so a landing never hinges on which random
# examples one run drew; local runs and the fuzz campaign keep exploring new ones.
settings.register_profile("ci", parent=settings.get_profile("georeparam"), derandomize=True)
settings.load_profile(os.environ.get("GEOREPARAM_HYPOTHESIS_PROFILE", "georeparam"))


# -------------------------------------------------------------------------------------------------
# numbers
# -------------------------------------------------------------------------------------------------


def rel_err(actual: torch.Tensor, expected: torch.Tensor, dim=None) -> torch.Tensor:
    """Relative Frobenius error ``‖actual − expected‖ / ‖expected‖``, computed in float64.

    With ``dim`` the norms are taken over that dimension (e.g. ``-1`` for row-wise errors).
    Where ``expected`` is exactly zero the absolute error is returned instead, so a zero reference
    still has to be matched (no division by zero, no free pass).
    """
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    # scale by the reference's largest entry first: squares of 1e200 overflow float64
    if dim is None:
        s = e.abs().amax() if e.numel() else e.new_ones(())
    else:
        s = e.abs().amax(dim=dim, keepdim=True)
    s = torch.where(s > 0, s, torch.ones_like(s))
    a, e = a / s, e / s
    if dim is None:
        num, den = torch.linalg.vector_norm(a - e), torch.linalg.vector_norm(e)
    else:
        num, den = torch.linalg.vector_norm(a - e, dim=dim), torch.linalg.vector_norm(e, dim=dim)
    # relative where the reference is non-zero; otherwise the (scaled) absolute error
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), num)


def tol(dtype: torch.dtype) -> float:
    """The issue's exactness bound: 1e-6 relative in float32, 1e-12 in float64."""
    return {torch.float32: 1e-6, torch.float64: 1e-12}[dtype]


def transformers_or_skip():
    """``transformers``, or skip the test where it is not installed."""
    return pytest.importorskip("transformers")


def tiny_gpt2():
    """A one-layer GPT-2 of width 16 (needs ``transformers``), in eval mode."""
    transformers = transformers_or_skip()
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=12, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# -------------------------------------------------------------------------------------------------
# fixtures
# -------------------------------------------------------------------------------------------------


@pytest.fixture
def rng():
    """Seeds torch's global RNG for the test and restores the previous state afterwards."""
    with seeded(0):
        yield


# -------------------------------------------------------------------------------------------------
# threads
# -------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread() -> Iterator[None]:
    """One intra-op thread per test process.

    The suite runs under pytest-xdist with one worker per core, and its tensors are tiny: extra
    intra-op threads only add synchronization (measured 100× slower on a loaded 2-core machine).
    Tests that measure threading set their own count and restore it.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
