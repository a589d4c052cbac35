r"""Compiling, caching and loading the CPU kernel (``kernel/gmp.c``); :func:`kernel_status` says how it went.

Plain C (no torch headers, so it builds in about a second), compiled on first use with the
system's C compiler, cached, checked and loaded with :mod:`ctypes`. Where no compiler is found,
the build fails, the cache cannot be trusted, the platform is not supported, or
``GEOREPARAM_NO_FAST_PATHS=1`` is set, :func:`load` returns ``None`` and the pure-torch map runs
(the two are tested to agree, ``tests/test_map_cpu.py``). Every outcome is one line of
:func:`kernel_status`; what a user should know (a refused cache, a failed build) is also one
``logging`` warning on the ``georeparam`` logger, the build itself one info line.

# Note [A cache that cannot crash or be planted]
A shared library is code: whatever file is loaded runs in the process. So the cache is a store
that is trusted only as far as it is checked:

* **Private.** The directory is created 0700; one owned by another user, or group- or
  world-writable, is refused (the pure-torch map runs, one warning), as Python's and compilers'
  caches do. ``HOME`` empty or relative does not put it at ``/.cache``: the password database's
  home is used, else the cache is refused (``GEOREPARAM_CACHE_DIR`` sets it).
* **Keyed by everything the bits depend on**: the hash of the C sources and flags, the compiler's
  path, the machine, OpenMP, and the instruction-set level the build targets. GCC on x86-64
  Linux builds versions of the loops up to the level this CPU was checked to have
  (``/proc/cpuinfo``: x86-64-v3 or v4), so a home directory shared by two CPU generations holds
  one file per level and never hands an AVX-512 build to a CPU without it.
* **Never torn.** A build is written to a temporary file and moved into place with
  ``os.replace``; a sidecar written after it records its size and SHA-256, and a file that does
  not match its sidecar is never opened (mapping a truncated library can kill the process with
  SIGBUS: it is removed and rebuilt instead).
* **Checked before use.** A loaded kernel runs a small self-test against the pure-torch map in
  float64; a cached file that fails to load or to pass is removed and rebuilt once.
* **Bounded.** The compiler probe and the build have timeouts (:data:`PROBE_TIMEOUT_S`,
  :data:`BUILD_TIMEOUT_S`; the compiler's whole process group is killed), and a failed build
  leaves a marker under its key, so later processes do not wait again (for
  :data:`FAILED_RETRY_S`, or until the marker is deleted).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, Optional, Set, Tuple

import torch

from ._compat import FAST_PATHS
from .torch_impl import unit_backward, unit_forward_traced

__all__ = [
    "load",
    "status",
    "kernel_status",
    "cache_dir",
    "cache_key",
    "isa_level",
    "compile_command",
    "KernelUnavailable",
    "SOURCES",
    "FLAGS",
    "KERNEL_DIR",
    "is_loaded",
]

log = logging.getLogger(__name__)

KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel")
SOURCES: Tuple[str, ...] = ("gmp.c", "gmp_rows.h")  # package data (pyproject.toml)
FLAGS: List[str] = ["-O3", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-std=gnu99"]
FLAGS += ["-ffp-contract=fast", "-Wno-psabi"]
PROBE_TIMEOUT_S = 10.0  # ``cc --version``
BUILD_TIMEOUT_S = 60.0  # the whole build (about a second on an idle machine)
FAILED_RETRY_S = 24 * 3600.0  # a failed build is retried after this long (or once its marker is deleted)
_CACHE_FORMAT = "2"  # part of the key: bump when the cache's layout changes

_LOCK = threading.Lock()
_LIB: Optional[ctypes.CDLL] = None
_TRIED = False
_STATUS = "not loaded yet"


class KernelUnavailable(Exception):
    """A reason not to use the kernel; the message is the cause in :func:`kernel_status`'s line."""


# ---------------------------------------------------------------------------------------------
# where: a private cache directory
# ---------------------------------------------------------------------------------------------


def _home() -> Optional[str]:
    home = os.environ.get("HOME", "")
    if os.path.isabs(home) and home != "/":
        return home
    try:
        import pwd

        home = pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError, OSError):
        return None
    return home if os.path.isabs(home) and home != "/" else None


def cache_dir() -> str:
    """The kernel cache's directory (not created): ``GEOREPARAM_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/georeparam``, else ``~/.cache/georeparam``. Raises ``KernelUnavailable`` where
    there is no sane home (Note [A cache that cannot crash or be planted])."""
    root = os.environ.get("GEOREPARAM_CACHE_DIR")
    if root:
        return os.path.abspath(root)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec: a relative path is to be ignored
        return os.path.join(xdg, "georeparam")
    home = _home()
    if home is None:
        raise KernelUnavailable("no home directory to keep the kernel cache in (set GEOREPARAM_CACHE_DIR)")
    return os.path.join(home, ".cache", "georeparam")


def _private(path: str) -> None:
    """Create ``path`` 0700 if missing; raise ``KernelUnavailable`` unless it is a directory this user
    owns that nobody else may write to."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as e:
        raise KernelUnavailable(f"the kernel cache {path} cannot be created ({e.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise KernelUnavailable(f"the kernel cache {path} is not a directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise KernelUnavailable(f"the kernel cache {path} is owned by another user (uid {st.st_uid})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KernelUnavailable(f"the kernel cache {path} is writable by others (mode {stat.S_IMODE(st.st_mode):o})")


# ---------------------------------------------------------------------------------------------
# what: compiler, instruction-set level, key
# ---------------------------------------------------------------------------------------------


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return shutil.which(cc)
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


_X86_V2 = {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}
_X86_V3 = _X86_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_X86_V4 = _X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def _cpu_flags() -> Optional[Set[str]]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def isa_level(flags: Optional[Set[str]] = None) -> str:
    """The instruction-set level a build here may target: ``x86-64-v4`` … ``x86-64`` from the
    CPU's flags (``flags``, else ``/proc/cpuinfo``'s; the baseline where they cannot be read), else
    the machine's name (a portable build)."""
    machine = platform.machine()
    if machine not in ("x86_64", "AMD64"):
        return machine or "unknown"
    if flags is None:
        flags = _cpu_flags() or set()
    for level, need in ((4, _X86_V4), (3, _X86_V3), (2, _X86_V2)):
        if need <= flags:
            return f"x86-64-v{level}"
    return "x86-64"


def _process_has_libgomp() -> bool:
    """Whether GNU OpenMP is already loaded here (torch's CPU builds on Linux bring it)."""
    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:
        return False


def cache_key(cc: str, level: str, openmp: bool) -> str:
    """The cache key: a hash of the C sources, :data:`FLAGS`, the compiler, machine, ISA level and OpenMP."""
    h = hashlib.sha256()
    for name in SOURCES:
        with open(os.path.join(KERNEL_DIR, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    for part in (" ".join(FLAGS), cc, platform.machine(), level, f"omp={openmp}", _CACHE_FORMAT):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# how: a bounded build, an atomic publication, a checked load
# ---------------------------------------------------------------------------------------------


def _run(cmd: List[str], timeout: float) -> subprocess.CompletedProcess:
    """``cmd`` with a timeout that kills its whole process group (a compiler wrapper's children too)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        proc.communicate()
        raise KernelUnavailable(f"{os.path.basename(cmd[0])} did not finish within {timeout:g} s") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _is_gcc(cc: str) -> bool:
    try:
        out = _run([cc, "--version"], PROBE_TIMEOUT_S).stdout.decode(errors="replace").lower()
    except OSError:
        return False
    return "clang" not in out and ("gcc" in out or "free software foundation" in out)


def compile_command(cc: str, out: str, level: str) -> List[str]:
    """The compiler's command line for a build that targets ``level`` (``x86-64-vN``: loops
    cloned for every level up to N, GCC only; anything else: one portable build)."""
    defines = [f"-DGMP_X86_LEVEL={level[-1]}"] if level.startswith("x86-64-v") else []
    return [cc, *FLAGS, *defines, os.path.join(KERNEL_DIR, SOURCES[0]), "-o", out, "-lm"]


def _build(cc: str, out: str, openmp: bool, level: str) -> None:
    """Compile the kernel into ``out`` (a temporary file); raise ``KernelUnavailable`` if that fails."""
    start = time.monotonic()
    clones = level.startswith("x86-64-v") and sys.platform.startswith("linux") and _is_gcc(cc)
    cmd = compile_command(cc, out, level if clones else "portable")
    # Note [Kernel threads] (cpu.py): with -fopenmp the library needs libgomp.so.1, which the
    # loader resolves to the copy torch already loaded: one thread pool for both.
    for extra in (["-fopenmp"], []) if openmp else ([],):
        left = BUILD_TIMEOUT_S - (time.monotonic() - start)
        if left <= 0:
            raise KernelUnavailable(f"the build did not finish within {BUILD_TIMEOUT_S:g} s")
        done = _run([*cmd, *extra], left)
        if done.returncode == 0:
            return
    err = done.stderr.decode(errors="replace").strip().splitlines()
    raise KernelUnavailable(f"{os.path.basename(cc)} failed ({'; '.join(err[-3:])[:300]})")


def _digest(path: str) -> Tuple[int, str]:
    with open(path, "rb") as f:
        data = f.read()
    return len(data), hashlib.sha256(data).hexdigest()


def _write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(*paths: str) -> None:
    for p in paths:
        try:
            os.remove(p)
        except OSError:
            pass


def _intact(so: str, sidecar: str) -> bool:
    """Whether ``so`` is this user's file and matches its sidecar's size and hash (never opened otherwise)."""
    try:
        with open(sidecar) as f:
            want = json.load(f)
        st = os.stat(so)
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            return False
        if st.st_size != want["size"]:
            return False
        return _digest(so) == (want["size"], want["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _bind(lib: ctypes.CDLL) -> None:
    p, L = ctypes.c_void_p, ctypes.c_long
    lib.gmp_openmp.argtypes, lib.gmp_openmp.restype = [], ctypes.c_int
    for suf in ("f32", "f64"):
        f = getattr(lib, f"gmp_forward_{suf}")
        f.argtypes, f.restype = [p, p, p, L, L, L, ctypes.c_int], ctypes.c_int
        b = getattr(lib, f"gmp_backward_{suf}")
        b.argtypes, b.restype = [p, p, p, p, p, L, L, L, ctypes.c_int], ctypes.c_int
        s = getattr(lib, f"gmp_sincos_{suf}")
        s.argtypes, s.restype = [p, p, p, L], ctypes.c_int


def _self_test(lib: ctypes.CDLL) -> None:
    """Forward and backward of a few rows against the pure-torch map in float64; raise
    ``KernelUnavailable`` on a mismatch (fan-ins around the blocks of eight, a pole, a large angle)."""
    with torch.no_grad():
        for n in (2, 11, 27):
            _self_test_rows(lib, n)


def _self_test_rows(lib: ctypes.CDLL, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    a64 = (torch.rand(3, n - 1, generator=gen, dtype=torch.float64, device="cpu") - 0.5) * 4
    a64[0, 0] = torch.pi / 2
    a64[1, -1] = 40.0
    r64 = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64, device="cpu")
    g64 = torch.randn(3, n, generator=gen, dtype=torch.float64, device="cpu")
    for dtype, suf, tol in ((torch.float32, "f32", 1e-6), (torch.float64, "f64", 1e-12)):
        a, r, g = a64.to(dtype), r64.to(dtype), g64.to(dtype)
        w, ga, gr = torch.empty(3, n, dtype=dtype, device="cpu"), torch.empty_like(a), torch.empty_like(r)
        bad = getattr(lib, f"gmp_forward_{suf}")(a.data_ptr(), r.data_ptr(), w.data_ptr(), 0, 3, n, 1)
        bad |= getattr(lib, f"gmp_backward_{suf}")(
            a.data_ptr(), r.data_ptr(), g.data_ptr(), ga.data_ptr(), gr.data_ptr(), 0, 3, n, 1
        )
        # the reference: the float64 map of the same (rounded) values
        u, prefix = unit_forward_traced(a.double(), "exact")
        want_w = r.double()[:, None] * u
        want_ga, want_gr = unit_backward(g.double(), None, u, prefix, scale=r.double())
        scale = 4.0 * (1 + g64.abs().sum())
        errs = [
            (w.double() - want_w).abs().max(),
            (ga.double() - want_ga).abs().max(),
            (gr.double() - want_gr).abs().max(),
        ]
        if bad or not all(bool(e <= tol * scale) for e in errs):
            raise KernelUnavailable(f"the kernel failed its self-test ({suf}, n = {n})")


def _open(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    _bind(lib)
    _self_test(lib)
    return lib


def _loaded(lib: ctypes.CDLL, so: str, level: str) -> str:
    threads = "OpenMP threads, shared with torch" if lib.gmp_openmp() else "Python threads"
    return f"loaded {so} ({threads}; {level})"


def _load() -> Tuple[Optional[ctypes.CDLL], str]:
    if not FAST_PATHS:
        return None, "off (GEOREPARAM_NO_FAST_PATHS is set): the pure-torch map is used"
    if not sys.platform.startswith(("linux", "darwin")):
        return None, f"not built on {sys.platform}: the pure-torch map is used"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC): the pure-torch map is used"
    try:
        root = cache_dir()
        _private(root)
    except KernelUnavailable as e:
        log.warning("georeparam: %s; the pure-torch map is used", e)
        return None, f"{e}: the pure-torch map is used"
    level, openmp = isa_level(), _process_has_libgomp()
    key = cache_key(cc, level, openmp)
    so = os.path.join(root, f"gmp_kernel_{key}.so")
    sidecar, failed = so[:-3] + ".json", so[:-3] + ".failed"
    if os.path.exists(so):
        if _intact(so, sidecar):
            try:
                lib = _open(so)
                return lib, _loaded(lib, so, level)
            except (OSError, AttributeError, KernelUnavailable) as e:
                why = str(e)[:200]
        else:
            why = "incomplete or not matching its record"
        log.warning("georeparam: the cached kernel %s was removed (%s) and is rebuilt", so, why)
        _remove(so, sidecar, failed)
    try:
        if time.time() - os.stat(failed).st_mtime < FAILED_RETRY_S:
            with open(failed) as f:
                reason = f.read().strip()
            return None, f"an earlier build failed ({reason}; delete {failed} to retry): the pure-torch map is used"
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f"gmp_kernel_{key}.", suffix=".so")
    os.close(fd)
    try:
        log.info("georeparam: compiling the fused CPU kernel once (cached in %s)", root)
        _build(cc, tmp, openmp, level)
        try:
            lib = _open(tmp)  # the complete file we just wrote, under a name nobody else uses
        except (OSError, AttributeError) as e:
            raise KernelUnavailable(f"the built kernel does not load ({str(e)[:200]})") from None
        os.replace(tmp, so)
        size, digest = _digest(so)
        _write_atomic(sidecar, json.dumps({"size": size, "sha256": digest, "cc": cc, "level": level}))
    except (KernelUnavailable, OSError) as e:
        _remove(tmp)
        try:
            _write_atomic(failed, f"{e}\n")
        except OSError:
            pass
        log.warning("georeparam: the fused CPU kernel was not built (%s); the pure-torch map is used", e)
        return None, f"build failed ({e}): the pure-torch map is used"
    return lib, _loaded(lib, so, level)


def load() -> Optional[ctypes.CDLL]:
    """The compiled kernel, built on first use and cached; ``None`` where it cannot be had.

    :func:`status` says why. Never raises: any failure leaves the pure-torch map in use.
    """
    global _LIB, _TRIED, _STATUS
    if _TRIED:
        return _LIB
    with _LOCK:
        if not _TRIED:
            try:
                _LIB, _STATUS = _load()
            except Exception as e:  # noqa: BLE001 — whatever happens, the pure-torch map runs
                _LIB, _STATUS = (
                    None,
                    f"build/load failed ({type(e).__name__}: {str(e)[:200]}): the pure-torch map is used",
                )
                log.warning("georeparam: %s", _STATUS)
            _TRIED = True
    return _LIB


def is_loaded() -> bool:
    """Whether the kernel is loaded now (never builds or loads it: a plain read that
    ``torch.compile`` traces without a graph break)."""
    return _LIB is not None


def status() -> str:
    """One line: whether the compiled kernel is in use, and if not, why (without loading it)."""
    return _STATUS


def kernel_status() -> str:
    """Whether the compiled CPU kernel is used, and if not, why (one line; builds it if needed)."""
    load()
    return _STATUS
