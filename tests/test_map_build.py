"""The kernel cache as a trusted store (georeparam._map.build, Note [A cache that cannot crash or be planted]).

Each test runs the first forward in a fresh subprocess (the build and load happen once per
process) against a cache directory of its own, and checks what that process said
(``kernel_status()``, its log lines) and computed (against the pure-torch map of the same
inputs). A kernel built once per session is copied into the caches that need one.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from georeparam._map import build, fast_paths, scaled_unit, use_backend

pytestmark = [
    pytest.mark.skipif(not fast_paths(), reason="GEOREPARAM_NO_FAST_PATHS is set: no kernel, no cache"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the cache's checks are POSIX; tested on Linux"),
]

R = [2.0, -1.0, 0.5]
A = [[0.3, -0.2, 1.0, 0.1], [1.2, 0.1, -2.0, 0.0], [1.5707963, 0.4, 0.2, 3.0]]
PROBE = (
    "import json, logging, time, torch; logging.basicConfig(level=logging.INFO);"
    "import georeparam._map as m, georeparam._map.build as b;"
    "{setup};"
    "t = time.monotonic(); s = m.kernel_status(); t = time.monotonic() - t;"
    f"w = m.scaled_unit(torch.tensor({R}), torch.tensor({A}));"
    "print(json.dumps({{'status': s, 'w': w.tolist(), 'seconds': t}}))"
)


def run(cache: Path, setup: str = "pass", **env: str) -> dict:
    full = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GEOREPARAM_CACHE_DIR": str(cache), **env}
    full.pop("GEOREPARAM_NO_FAST_PATHS", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(setup=setup)], capture_output=True, text=True, env=full, timeout=120
    )
    assert done.returncode == 0, f"the process died ({done.returncode}): {done.stderr[-2000:]}"
    out = json.loads(done.stdout.splitlines()[-1])
    out["log"] = [line for line in done.stderr.splitlines() if "georeparam" in line]
    return out


def reference() -> torch.Tensor:
    with use_backend("torch"):
        return scaled_unit(torch.tensor(R, dtype=torch.float64), torch.tensor(A, dtype=torch.float64))


def assert_right(out: dict) -> None:
    assert torch.allclose(torch.tensor(out["w"], dtype=torch.float64), reference(), rtol=3e-7, atol=1e-7)


# the psABI's levels, written out here (the reference for build.isa_level)
X86_V3_FLAGS = {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}
X86_V3_FLAGS |= {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
X86_V4_FLAGS = X86_V3_FLAGS | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A cache directory holding one good build (skips where no kernel can be built here)."""
    cache = tmp_path_factory.mktemp("built") / "cache"
    out = run(cache)
    if not out["status"].startswith("loaded"):
        pytest.skip(f"no kernel here: {out['status']}")
    return cache


def copy_cache(built: Path, to: Path) -> Path:
    to.mkdir(mode=0o700)
    for f in built.iterdir():
        if f.suffix in (".so", ".json"):
            shutil.copy2(f, to / f.name)
    return next(to.glob("*.so"))


def test_new_cache_dir_is_private_and_holds_a_checked_build(built):
    assert stat.S_IMODE(built.stat().st_mode) == 0o700
    (so,) = built.glob("gmp_kernel_*.so")
    record = json.loads(so.with_suffix(".json").read_text())
    assert record["size"] == so.stat().st_size and record["level"] == build.isa_level()
    assert not list(built.glob("*.tmp")) and len(list(built.iterdir())) == 2  # no temporary left


def test_cache_dir_writable_by_others_is_refused(built, tmp_path):
    cache = tmp_path / "open"
    copy_cache(built, cache)
    cache.chmod(0o777)  # anyone could have planted the .so
    out = run(cache)
    assert "writable by others" in out["status"] and not out["status"].startswith("loaded")
    assert len(out["log"]) == 1 and out["log"][0].startswith("WARNING:") and "pure-torch map" in out["log"][0]
    assert_right(out)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown to another user needs root")
def test_cache_dir_owned_by_someone_else_is_refused(built, tmp_path):
    cache = tmp_path / "theirs"
    copy_cache(built, cache)
    os.chown(cache, 12345, 12345)
    out = run(cache)
    assert "owned by another user" in out["status"] and len(out["log"]) == 1
    assert_right(out)


def test_empty_home_does_not_put_the_cache_at_the_root(monkeypatch):
    for name in ("GEOREPARAM_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", "")
    where = build.cache_dir()
    assert os.path.isabs(where) and not where.startswith("/.cache")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec: ignored
    assert build.cache_dir() == where
    import pwd

    class Rootless:
        pw_dir = "/"

    monkeypatch.setattr(pwd, "getpwuid", lambda uid: Rootless)
    with pytest.raises(build.KernelUnavailable, match="GEOREPARAM_CACHE_DIR"):
        build.cache_dir()


def test_the_key_and_the_build_follow_the_checked_isa_level(tmp_path):
    v4 = build.isa_level(X86_V4_FLAGS)
    if v4 != "x86-64-v4":
        pytest.skip("not an x86-64 machine")
    v3 = build.isa_level(X86_V3_FLAGS)
    assert v3 == "x86-64-v3" and build.isa_level(set()) == "x86-64"
    assert build.cache_key("cc", v4, True) != build.cache_key("cc", v3, True)
    gcc = shutil.which("gcc")
    if gcc is None or "clang" in subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout.lower():
        pytest.skip("the clones are GCC's")
    images = {}
    for level in (v3, v4):
        out = tmp_path / f"{level}.so"
        subprocess.run(build.compile_command(gcc, str(out), level), check=True, capture_output=True, timeout=120)
        images[level] = out.read_bytes()
    assert b"arch_x86_64_v4" not in images[v3] and b"arch_x86_64_v3" in images[v3]
    assert b"arch_x86_64_v4" in images[v4]


def test_truncated_library_is_never_opened_but_rebuilt(built, tmp_path):
    """Mapping a truncated .so can kill the process (SIGBUS): the sidecar's size and hash
    catch it before dlopen; the file is removed and rebuilt."""
    cache = tmp_path / "torn"
    so = copy_cache(built, cache)
    so.write_bytes(so.read_bytes()[: so.stat().st_size // 3])
    out = run(cache)
    assert out["status"].startswith("loaded"), out["status"]
    assert any("removed" in line and "rebuilt" in line for line in out["log"])
    record = json.loads(so.with_suffix(".json").read_text())
    assert so.stat().st_size == record["size"]
    assert_right(out)
    again = run(cache)
    assert again["status"].startswith("loaded") and not again["log"]


def test_library_failing_its_self_test_is_removed_and_rebuilt(built, tmp_path):
    """A library that loads but computes wrong numbers (here: zeros), recorded as if built here."""
    cache = tmp_path / "wrong"
    so = copy_cache(built, cache)
    src = tmp_path / "zeros.c"
    src.write_text(
        "int gmp_openmp(void) { return 0; }\n"
        + "".join(
            f"int gmp_forward_{s}({t} *a, {t} *r, {t} *w, long r0, long r1, long n, int th)"
            " { for (long i = r0 * n; i < r1 * n; i++) w[i] = 0; return 0; }\n"
            f"int gmp_backward_{s}({t} *a, {t} *r, {t} *g, {t} *ga, {t} *gr, long r0, long r1, long n, int th)"
            " { for (long i = r0; i < r1; i++) gr[i] = 0; for (long i = r0 * (n - 1); i < r1 * (n - 1); i++) ga[i] = 0;"
            " return 0; }\n"
            f"int gmp_sincos_{s}({t} *a, double *s, double *c, long n) {{ return 0; }}\n"
            for s, t in (("f32", "float"), ("f64", "double"))
        )
    )
    cc = shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(so)], check=True, capture_output=True, timeout=60)
    data = so.read_bytes()
    import hashlib

    so.with_suffix(".json").write_text(json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    out = run(cache)
    assert out["status"].startswith("loaded"), out["status"]
    assert any("self-test" in line and "rebuilt" in line for line in out["log"])
    assert so.read_bytes() != data
    assert_right(out)


HANGING_CC = """#!/bin/sh
case "$1" in --version) {version} ;; esac
sleep 600 &
echo $! >> "{pids}"
wait
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("hangs", ["probe", "build"])
def test_a_compiler_that_never_returns_costs_seconds_once(tmp_path, hangs):
    """The probe and the build are killed at their timeouts (with the compiler's children), the
    failure is remembered by key, and the next process does not wait at all."""
    pids = tmp_path / "pids"
    cc = tmp_path / "fakecc"
    version = 'echo "gcc (fake) 12"; exit 0' if hangs == "build" else ":"
    cc.write_text(HANGING_CC.format(version=version, pids=pids))
    cc.chmod(0o755)
    setup = "b.PROBE_TIMEOUT_S = 1.0; b.BUILD_TIMEOUT_S = 2.0"
    cache = tmp_path / "cache"
    start = time.monotonic()
    first = run(cache, setup, CC=str(cc))
    took = time.monotonic() - start
    assert first["status"].startswith("build failed") and "did not finish within" in first["status"]
    assert 1.0 <= first["seconds"] < 30 and took < 60
    assert len([line for line in first["log"] if line.startswith("WARNING:")]) == 1
    assert_right(first)
    time.sleep(0.2)
    assert pids.exists() and not any(_alive(int(p)) for p in pids.read_text().split())
    second = run(cache, setup, CC=str(cc))
    assert second["status"].startswith("an earlier build failed") and second["seconds"] < 0.5
    assert not [line for line in second["log"] if line.startswith("WARNING:")]
    assert_right(second)


def test_the_switch_is_read_once_at_import(built):
    """Note [One switch]: setting GEOREPARAM_NO_FAST_PATHS after import changes nothing."""
    out = run(built, 'import os; os.environ["GEOREPARAM_NO_FAST_PATHS"] = "1"')
    assert out["status"].startswith("loaded")
    assert_right(out)
