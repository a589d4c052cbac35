"""The map's small shared helpers: the thread pools forgotten in a forked child
(Note [Pools and fork] in georeparam/_map/pool.py) and the functorch wrapper check that every
fast path asks (georeparam/_map/_compat.py)."""

from __future__ import annotations

import os

import pytest
import torch

from georeparam._map import cpu, functorch_wrapped, is_plain, torch_impl
from georeparam._map.pool import LazyPool


def test_pool_is_made_on_first_use_and_grows_on_demand():
    pool = LazyPool("georeparam-test")
    one = pool.get(1)
    assert pool.get(1) is one  # kept
    two = pool.get(2)
    assert two is not one and pool.get(1) is two  # made again larger, then kept
    assert two.submit(lambda: 7).result() == 7
    two.shutdown()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_pool_is_forgotten_in_a_forked_child():
    """A child has the parent's pool objects but not their threads: each is dropped there."""
    pools = [LazyPool("georeparam-test"), cpu._POOL, torch_impl._SINE_THREAD]
    for p in pools:
        p.get(1)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        os._exit(0 if all(p._executor is None for p in pools) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert all(p._executor is not None for p in pools)  # the parent keeps its pools
    pools[0].get(1).shutdown()


def test_functorch_wrapped_sees_vmap_levels():
    x = torch.randn(3, 4)
    seen = []

    def f(row):
        seen.append((functorch_wrapped(row), is_plain(row)))
        return row * 2

    torch.func.vmap(f)(x)
    assert seen == [(True, False)]
    assert not functorch_wrapped(x) and is_plain(x, torch.nn.Parameter(x), None)
    assert not is_plain(x.as_subclass(type("Sub", (torch.Tensor,), {})))
