"""MLX's CPU matmuls on Linux go to an optimized BLAS, loaded by `import pinguin_daemon`; the
reference BLAS stays when asked, when mlx came first, or when nothing better is installed, and the
daemon says which one is in use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pinguin_daemon import blas

SITE = blas._mlx_site()
MLX_CPU = (sys.platform.startswith("linux") and SITE is not None and not blas._is_cuda_build(SITE)
           and blas._bundled_reference_blas(SITE) is not None)
OPENBLAS = [p for p in blas._candidates() if "openblas" in p]

needs_mlx_cpu = pytest.mark.skipif(not MLX_CPU, reason="MLX is not the mlx-cpu wheel on Linux")
needs_openblas = pytest.mark.skipif(not (MLX_CPU and OPENBLAS),
                                    reason="needs mlx-cpu and OpenBLAS (libopenblas0-pthread)")

# Run in a fresh interpreter: which library libmlx binds to is decided once per process.
PROBE = r"""
import ctypes, json, os
import pinguin_daemon
import mlx.core as mx
import numpy as np
from pinguin_daemon import blas

def mapped_file(address):
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high and len(fields) > 5:
                return fields[5]
    return None

try:
    sgemm = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
except AttributeError:
    sgemm = None
with open("/proc/self/maps") as maps:
    mapped = sorted({line.split()[5] for line in maps if len(line.split()) > 5})
rng = np.random.default_rng(0)
a = rng.standard_normal((67, 300)).astype(np.float32)
b = rng.standard_normal((300, 45)).astype(np.float32)
got = np.array(mx.array(a) @ mx.array(b))
print(json.dumps({
    "sgemm_in": mapped_file(sgemm) if sgemm else None,
    "mapped": mapped,
    "max_error": float(np.abs(got - a @ b).max()),
    "description": blas.blas_description(),
    "warning": blas.blas_warning(),
}))
"""


def probe(tmp_path: Path, env: dict[str, str] | None = None, code: str = PROBE) -> tuple[dict, str]:
    """Run PROBE in a new interpreter with the dynamic linker logging its symbol bindings;
    returns the probe's report and libmlx's binding of cblas_sgemm (the linker's own line)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PINGUIN_BLAS", "LD_PRELOAD")}
    environ |= {"LD_DEBUG": "bindings", "LD_DEBUG_OUTPUT": str(tmp_path / "ld")} | (env or {})
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for log in tmp_path.glob("ld.*") for line in log.read_text().splitlines()
             if "libmlx.so" in line.split(" to ")[0] and "`cblas_sgemm'" in line]
    assert len(lines) == 1, lines
    return json.loads(proc.stdout.splitlines()[-1]), lines[0].split(" to ")[1]


@needs_openblas
def test_mlx_matmul_binds_to_openblas(tmp_path: Path) -> None:
    report, bound = probe(tmp_path)
    # The dynamic linker bound libmlx's cblas_sgemm to OpenBLAS, not to mlx-cpu's libblas.
    assert "libopenblas" in bound and "mlx_cpu.libs" not in bound, bound
    assert any("libopenblas" in path for path in report["mapped"])
    assert report["sgemm_in"] is not None and "libopenblas" in report["sgemm_in"]
    assert report["max_error"] < 1e-3  # and the product is still right
    assert report["description"].startswith("openblas 0."), report["description"]
    assert report["warning"] is None


@needs_mlx_cpu
def test_reference_blas_on_request(tmp_path: Path) -> None:
    report, bound = probe(tmp_path, {"PINGUIN_BLAS": "reference"})
    assert "mlx_cpu.libs/libblas-" in bound, bound
    assert not any("libopenblas" in path for path in report["mapped"])
    assert report["max_error"] < 1e-3
    assert report["description"] == "reference (mlx-cpu bundled libblas, PINGUIN_BLAS=reference)"
    assert report["warning"] is None  # asked for: nothing to warn about


@needs_mlx_cpu
def test_mlx_imported_first_keeps_the_reference_and_says_why(tmp_path: Path) -> None:
    code = "import mlx.core\n" + PROBE
    report, bound = probe(tmp_path, code=code)
    assert "mlx_cpu.libs/libblas-" in bound, bound
    # Nothing loaded after the fact: it would not change what libmlx uses.
    assert not any("libopenblas" in path for path in report["mapped"])
    assert "mlx was imported before pinguin_daemon" in report["description"]
    assert "too late" in report["warning"]


@needs_openblas
def test_a_library_without_cblas_or_missing_is_skipped() -> None:
    found = blas._load_first(["/nonexistent/libopenblas.so.0", "libm.so.6", OPENBLAS[0]])
    assert found is not None and found[0] == OPENBLAS[0]
    assert blas._load_first(["/nonexistent/libopenblas.so.0", "libm.so.6"]) is None


def test_nothing_found_reports_the_reference_with_the_install_command(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blas, "_state", blas._State(done=True, platform="mlx-cpu",
                                                    reason="no optimized BLAS found"))
    assert blas.blas_description() == (
        "reference (mlx-cpu bundled libblas: slow; apt-get install libopenblas0-pthread)")
    warning = blas.blas_warning()
    assert warning is not None and "reference BLAS" in warning and "\n" not in warning


def test_macos_uses_accelerate_and_loads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blas, "_state", blas._State())
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(blas, "_load_first", lambda candidates: pytest.fail("loaded a BLAS on macOS"))
    blas.preload()
    blas.preload()  # idempotent
    assert blas.blas_description() == "accelerate"
    assert blas.blas_warning() is None


def test_cuda_build_loads_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "mlx_cuda_13-0.32.4.dist-info").mkdir()
    (tmp_path / "mlx_cpu.libs").mkdir()
    (tmp_path / "mlx_cpu.libs" / "libblas-0.so.3").touch()
    monkeypatch.setattr(blas, "_state", blas._State())
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(blas, "_mlx_site", lambda: tmp_path)
    monkeypatch.setattr(blas, "_load_first", lambda candidates: pytest.fail("loaded a BLAS for CUDA"))
    assert "CUDA" in blas.blas_description()
    assert blas.blas_warning() is None


def test_a_failure_leaves_the_reference_and_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> list[str]:
        raise RuntimeError("boom")

    monkeypatch.setattr(blas, "_state", blas._State())
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(blas, "_mlx_site", lambda: Path("/nonexistent"))
    monkeypatch.setattr(blas, "_bundled_reference_blas", lambda site: site / "libblas-0.so.3")
    monkeypatch.setattr(blas, "_candidates", broken)
    monkeypatch.delitem(sys.modules, "mlx.core", raising=False)
    monkeypatch.setattr(blas, "global_sgemm_library", lambda: None)
    blas.preload()
    assert blas.blas_description().startswith("reference (")
    assert blas.blas_warning() is not None
