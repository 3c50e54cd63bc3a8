"""`make setup` on a machine whose python3 is older than the daemon needs (a stock Mac: 3.9), or
missing: uv comes from whatever Python there is (or its own installer), then finds or installs a
Python >= 3.11 for .venv. Runs in a copy of the checkout, so the suite's own .venv is untouched."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What a copy of the checkout leaves out: environments, caches and results of this one.
NOT_COPIED = (".git", ".venv", ".tools", ".cache", "bench-results", "*.egg-info", "__pycache__",
              ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def older_python() -> Path | None:
    """A Python 3.8-3.10 of this machine (pyenv's 3.9 on the CI image), if there is one."""
    candidates = [Path.home() / ".pyenv" / "versions" / v / "bin" / "python3"
                  for v in ("3.9.18", "3.10.13", "3.8.18")]
    for name in ("python3.9", "python3.10", "python3.8"):
        found = shutil.which(name)
        if found:
            candidates.append(Path(found))
    for path in candidates:
        if not path.exists():
            continue
        probe = subprocess.run([str(path), "-c", "import sys, venv; print(sys.version_info[:2] < (3, 11))"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return path
    return None


def copy_checkout(dst: Path) -> Path:
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(*NOT_COPIED), symlinks=True)
    return dst


def clean_env(path_prefix: Path) -> dict[str, str]:
    """This environment without the suite's own venv, with `path_prefix` first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "UV_PYTHON", "UV_PROJECT_ENVIRONMENT", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join([str(path_prefix), *(p for p in env.get("PATH", "").split(os.pathsep)
                                                       if not p.startswith(str(REPO)))])
    return env


def test_setup_with_an_old_python3_ends_with_a_working_venv(tmp_path: Path) -> None:
    old = older_python()
    if old is None:
        pytest.skip("no Python older than 3.11 on this machine to play macOS's stock python3")
    checkout = copy_checkout(tmp_path / "checkout")
    # As on a stock Mac, `python3` itself is the old one.
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "python3").symlink_to(old)
    proc = subprocess.run(["make", "setup", f"PYTHON={old}", "GPU=cpu"], cwd=checkout,
                          env=clean_env(shims), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"installing uv into \.tools with \S+ 3\.(8|9|10)\.", proc.stdout), proc.stdout
    venv_python = checkout / ".venv" / "bin" / "python"
    check = subprocess.run([str(venv_python), "-c",
                            "import sys, pinguin_daemon.cli, mlx.core; print(*sys.version_info[:2])"],
                           cwd=checkout, capture_output=True, text=True, env=clean_env(shims))
    assert check.returncode == 0, check.stderr
    major, minor = map(int, check.stdout.split())
    assert (major, minor) >= (3, 11)
    cli = subprocess.run([str(checkout / ".venv" / "bin" / "pinguin-daemon"), "--help"], capture_output=True,
                         text=True, env=clean_env(shims))
    assert cli.returncode == 0 and "serve" in cli.stdout
    # Set up once: `make run` and `make test` do not set up again.
    again = subprocess.run(["make", "-n", "setup", f"PYTHON={old}", "GPU=cpu"], cwd=checkout,
                           env=clean_env(shims), capture_output=True, text=True)
    assert again.returncode == 0 and "uv" not in again.stdout, again.stdout + again.stderr


def test_setup_without_a_usable_python_uses_uvs_installer(tmp_path: Path) -> None:
    """No python3 at all: uv's standalone installer (here a stand-in `curl` that records its
    request and serves an installer that writes a stub uv where it is told)."""
    checkout = copy_checkout(tmp_path / "checkout")
    shims = tmp_path / "bin"
    shims.mkdir()
    requests = tmp_path / "curl-requests"
    fake_installer = (
        'mkdir -p "$UV_UNMANAGED_INSTALL"'
        ' && printf "#!/bin/sh\\necho uv stub\\n" > "$UV_UNMANAGED_INSTALL/uv"'
        ' && chmod +x "$UV_UNMANAGED_INSTALL/uv"'
    )
    (shims / "curl").write_text(f"#!/bin/sh\necho \"$@\" >> {requests}\ncat <<'EOF'\n{fake_installer}\nEOF\n")
    (shims / "curl").chmod(0o755)
    proc = subprocess.run(["make", ".tools/bin/uv", "PYTHON=/nonexistent/python3"], cwd=checkout,
                          env=clean_env(shims), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no Python 3.8+ with venv as '/nonexistent/python3'" in proc.stdout
    version = re.search(r"^UV_VERSION := (\S+)$", (checkout / "Makefile").read_text(), re.M)
    assert version is not None
    assert f"https://astral.sh/uv/{version.group(1)}/install.sh" in requests.read_text()
    uv = subprocess.run([str(checkout / ".tools" / "bin" / "uv")], capture_output=True, text=True)
    assert uv.stdout.strip() == "uv stub"
