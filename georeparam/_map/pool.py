r"""The map's helper threads: thread pools created on first use and forgotten in a forked child.

# Note [Pools and fork]
Both backends hand work to Python threads where that pays (``ctypes`` and numpy's ufuncs release
the GIL): the kernel's rows without OpenMP (Note [Kernel threads] in ``cpu.py``) and the sines of
a large block (Note [A second thread for the sines] in ``torch_impl.py``). A forked child has the
parent's pool objects but not their threads, so a pool used there would wait forever: every
:class:`LazyPool` is forgotten in the child (one ``os.register_at_fork`` for all of them) and
made again on its first use there.
"""

from __future__ import annotations

import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

__all__ = ["LazyPool"]


class LazyPool:
    """A ``ThreadPoolExecutor`` made on first use, made again larger when more workers are asked
    for, and forgotten in a forked child (Note [Pools and fork])."""

    _live: "weakref.WeakSet[LazyPool]" = weakref.WeakSet()

    def __init__(self, thread_name_prefix: str) -> None:
        self.thread_name_prefix = thread_name_prefix
        self._executor: Optional[ThreadPoolExecutor] = None
        self._workers = 0
        LazyPool._live.add(self)

    def get(self, workers: int) -> ThreadPoolExecutor:
        """The pool, with at least ``workers`` threads."""
        if self._executor is None or self._workers < workers:
            self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=self.thread_name_prefix)
            self._workers = workers
        return self._executor

    def forget(self) -> None:
        """Drop the pool (its threads are not there any more: a forked child)."""
        self._executor, self._workers = None, 0


def _forget_all() -> None:
    for pool in list(LazyPool._live):
        pool.forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_all)
