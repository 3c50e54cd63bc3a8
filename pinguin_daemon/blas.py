"""An optimized BLAS under MLX's CPU backend on Linux, loaded before MLX is.

The `mlx-cpu` wheel bundles Netlib's reference BLAS (`mlx_cpu.libs/libblas-*.so*`), and its
`libmlx.so` leaves `cblas_sgemm` undefined, bound when MLX is imported. The reference gemm is
30-120x slower than OpenBLAS on an f32 matmul of the 1B model's shape ((256x8192)@(8192x1024):
0.7-2.2 s vs 18-24 ms on 2-core x86-64 VMs), so f32 inference on a Linux CPU is not usable with
it. Loading an optimized CBLAS into the process's global symbol scope first (`dlopen` with
RTLD_GLOBAL) makes the dynamic linker bind libmlx's `cblas_sgemm` to it instead: the global scope
is searched before the bundled library's own. `pinguin_daemon/__init__.py` calls `preload()`
first thing, before anything can import mlx.

A side effect to know: OpenBLAS picks its sgemm kernel by matrix size (e.g. a "small matrix"
path on some CPUs), so a float32 product of one row may differ in the last bit from the same row
in a batch; the reference BLAS computes every row alike. Argmax tokens and argmin codes have
stayed equal in every test; probabilities may differ by ~1e-8.

What it looks for, in order: Debian/Ubuntu's OpenBLAS (`libopenblas0-pthread`, then the openmp
and serial variants, at the multiarch paths of x86_64 and aarch64), other distributions' paths
and generic names (`libopenblas.so.0`, found with `ctypes.util.find_library`), then the `mkl`
PyPI wheel's `libmkl_rt`. Nothing is loaded on macOS (MLX uses Accelerate), with MLX's CUDA
build, when mlx is not the `mlx-cpu` wheel, or when mlx was imported before this ran (the symbol
is bound already; loading then would only make the report wrong). A library already providing
`cblas_sgemm` in the global scope (e.g. `LD_PRELOAD`) is kept. Any failure leaves the reference
BLAS: this never raises.

Environment:
    PINGUIN_BLAS: "auto" (default): load an optimized BLAS when one is found; "reference": keep
        the bundled reference BLAS (to compare, or to rule the BLAS out when debugging). Read
        once, when `pinguin_daemon` is first imported; other values count as "auto".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

ENV = "PINGUIN_BLAS"
# Shown wherever the daemon says that the reference BLAS is in use.
INSTALL_HINT = "apt-get install libopenblas0-pthread"

# Debian's OpenBLAS variants, most useful first: pthread scales over cores; openmp would start a
# second thread pool beside any OpenMP user; serial runs on one core.
_DEBIAN_VARIANTS = ("openblas-pthread", "openblas-openmp", "openblas-serial")


@dataclass(slots=True)
class _State:
    """What `preload` found and did (the dynamic linker's state is per process, so is this)."""

    done: bool = False  # preload ran (it runs once)
    platform: str = ""  # "darwin", "cuda" (MLX's CUDA build), "mlx-cpu", "other" (no mlx-cpu BLAS)
    path: str | None = None  # the optimized library now providing cblas_sgemm, if any
    library: ctypes.CDLL | None = None  # kept so that the handle lives as long as the process
    reason: str = ""  # why the reference BLAS stayed, when it did
    opted_out: bool = False  # PINGUIN_BLAS=reference


_state = _State()


def _mlx_site() -> Path | None:
    """The directory holding the `mlx` package, found without importing it."""
    try:
        spec = importlib.util.find_spec("mlx")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    return Path(locations[0]).parent if locations else None


def _bundled_reference_blas(site: Path) -> Path | None:
    """mlx-cpu's bundled Netlib BLAS (auditwheel renames it libblas-<hash>.so.3.x), if present."""
    return next(iter(sorted((site / "mlx_cpu.libs").glob("libblas-*.so*"))), None)


def _is_cuda_build(site: Path) -> bool:
    return any(site.glob("mlx_cuda*"))


def _candidates() -> list[str]:
    """Optimized CBLAS libraries to try, in order of preference (paths or sonames)."""
    arch = platform.machine()
    multiarch = f"/usr/lib/{arch}-linux-gnu"
    paths = [f"{multiarch}/{variant}/libopenblas.so.0" for variant in _DEBIAN_VARIANTS]
    paths += [f"{multiarch}/libopenblas.so.0",
              # Fedora/RHEL: pthread, openmp and serial builds; Arch and others: /usr/lib.
              "/usr/lib64/libopenblasp.so.0", "/usr/lib64/libopenblaso.so.0", "/usr/lib64/libopenblas.so.0",
              "/usr/lib/libopenblas.so.0"]
    found = [p for p in paths if os.path.exists(p)]
    if not found:
        # Runs `ldconfig -p` (a few ms): only when no known path exists.
        name = ctypes.util.find_library("openblas")
        if name:
            found.append(name)
    # The `mkl` wheel installs its libraries into the environment's lib/ directory.
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found += [str(p) for p in sorted(Path(prefix, "lib").glob("libmkl_rt.so*"))]
    return found


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def library_of(address: int) -> str | None:
    """The path of the shared object that holds `address` (dladdr), or None.

    Args:
        address: a code or data address in this process.
    """
    try:
        try:
            dladdr = ctypes.CDLL(None).dladdr
        except AttributeError:  # glibc < 2.34 keeps it in libdl
            dladdr = ctypes.CDLL("libdl.so.2").dladdr
        dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        dladdr.restype = ctypes.c_int
        info = _DlInfo()
        if not dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.dli_fname:
            return None
        return os.fsdecode(info.dli_fname)
    except (OSError, AttributeError):
        return None


def global_sgemm_library() -> str | None:
    """The library whose `cblas_sgemm` the global symbol scope resolves to (what a library
    loaded afterwards, such as libmlx, binds to), or None when the global scope has none."""
    try:
        symbol = ctypes.CDLL(None).cblas_sgemm
    except (OSError, AttributeError):
        return None
    return library_of(ctypes.cast(symbol, ctypes.c_void_p).value or 0)


def _load_first(candidates: list[str]) -> tuple[str, ctypes.CDLL] | None:
    for path in candidates:
        try:
            # Checked in a local scope first, so that a library without CBLAS never enters the
            # global one; dlopen again with RTLD_GLOBAL promotes the same handle.
            if not hasattr(ctypes.CDLL(path), "cblas_sgemm"):
                continue
            return path, ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
        except OSError:
            continue
    return None


def preload() -> None:
    """Load an optimized CBLAS into the global scope when MLX would use the reference one.

    Idempotent and cheap (one dlopen, ~25 ms for OpenBLAS, only on Linux with mlx-cpu); never
    raises. Must run before `mlx.core` is imported to have any effect.
    """
    if _state.done:
        return
    _state.done = True
    try:
        _preload()
    except Exception as exc:  # noqa: BLE001 - a failure here must only leave the reference BLAS
        _state.reason = f"loading an optimized BLAS failed: {exc!r}"


def _preload() -> None:
    if sys.platform == "darwin":
        _state.platform = "darwin"
        return
    site = _mlx_site() if sys.platform.startswith("linux") else None
    if site is None:
        _state.platform = "other"
        return
    if _is_cuda_build(site):
        _state.platform = "cuda"
        return
    if _bundled_reference_blas(site) is None:
        _state.platform = "other"
        return
    _state.platform = "mlx-cpu"
    if os.environ.get(ENV, "auto").strip().lower() == "reference":
        _state.opted_out = True
        _state.reason = f"{ENV}=reference"
        return
    if "mlx.core" in sys.modules:
        existing = global_sgemm_library()
        _state.path = existing  # whatever was global when mlx was imported is what it uses
        if existing is None:
            _state.reason = "mlx was imported before pinguin_daemon"
        return
    existing = global_sgemm_library()
    if existing is not None:  # e.g. LD_PRELOAD: the operator's choice stands
        _state.path = existing
        return
    loaded = _load_first(_candidates())
    if loaded is None:
        _state.reason = "no optimized BLAS found"
        return
    _state.path, _state.library = loaded


def _openblas_version(lib: ctypes.CDLL) -> tuple[str, str]:
    """("0.3.21", "Cooperlake"): OpenBLAS's version and the kernel it picked for this CPU."""
    try:
        lib.openblas_get_config.restype = ctypes.c_char_p
        lib.openblas_get_corename.restype = ctypes.c_char_p
        config = (lib.openblas_get_config() or b"").decode(errors="replace").split()
        core = (lib.openblas_get_corename() or b"").decode(errors="replace")
    except (AttributeError, OSError):
        return "", ""
    return (config[1] if len(config) > 1 and config[0] == "OpenBLAS" else ""), core


def _mkl_version(lib: ctypes.CDLL) -> str:
    """"2024.2" from MKL's version string."""
    try:
        buf = ctypes.create_string_buffer(256)
        lib.MKL_Get_Version_String(buf, len(buf))
    except (AttributeError, OSError):
        return ""
    words = buf.value.decode(errors="replace").split()
    return next((words[i + 1].split("-")[0] for i, w in enumerate(words[:-1]) if w == "Version"), "")


def _describe(path: str) -> str:
    real = os.path.realpath(path)
    try:
        lib = ctypes.CDLL(path)  # already loaded: this only returns its handle
    except OSError:
        return real
    name = os.path.basename(real)
    if "mkl" in name:
        version = _mkl_version(lib)
        return f"mkl {version} ({name})" if version else f"mkl ({name})"
    if "openblas" in name:
        package = next((f"lib{v.replace('-', '0-', 1)}" for v in _DEBIAN_VARIANTS
                        if f"/{v}/" in real), name)
        version, core = _openblas_version(lib)
        detail = ", ".join(p for p in (package, core) if p)
        return " ".join(p for p in ("openblas", version, f"({detail})") if p)
    return real


def blas_description() -> str:
    """The BLAS that MLX's CPU matmuls use in this process, in words, e.g.
    "openblas 0.3.21 (libopenblas0-pthread, Cooperlake)", "accelerate" on macOS,
    "reference (mlx-cpu bundled libblas: slow; apt-get install libopenblas0-pthread)"."""
    preload()  # a no-op after the first call
    if _state.platform == "darwin":
        return "accelerate"
    if _state.platform == "cuda":
        return "not used (mlx CUDA build: matmuls run on the GPU)"
    if _state.platform == "other":
        return "unknown (mlx is not the mlx-cpu wheel)"
    if _state.path is not None:
        return _describe(_state.path)
    if _state.opted_out:
        return f"reference (mlx-cpu bundled libblas, {ENV}=reference)"
    if _state.reason.startswith("mlx was imported"):
        return f"reference (mlx-cpu bundled libblas: slow; {_state.reason})"
    return f"reference (mlx-cpu bundled libblas: slow; {INSTALL_HINT})"


def blas_warning() -> str | None:
    """A one-line warning when MLX runs on Linux with the slow reference BLAS, else None
    (also None when PINGUIN_BLAS=reference asked for it)."""
    preload()
    if _state.platform != "mlx-cpu" or _state.path is not None or _state.opted_out:
        return None
    if _state.reason.startswith("mlx was imported"):
        return ("MLX uses the slow reference BLAS bundled with mlx-cpu: mlx was imported before "
                "pinguin_daemon, too late to load an optimized one")
    command = INSTALL_HINT if shutil.which("apt-get") else "install OpenBLAS (libopenblas.so.0)"
    return (f"MLX uses the reference BLAS bundled with mlx-cpu: f32 matmuls run 30-100x slower "
            f"than with OpenBLAS; {command} (or pip install mkl), then restart")
