"""Install the daemon as a background service: launchd on macOS, a systemd user unit on Linux.

The templates in launchd/ hold __PLACEHOLDERS__ that become absolute paths of this checkout.
"""

from __future__ import annotations

import getpass
import math
import os
import plistlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .errors import UserError

LABEL = "com.pinguin.daemon"
UNIT = "pinguin-daemon.service"
# launchd waits ExitTimeOut after SIGTERM before SIGKILL; sessions need shutdown_timeout to flush.
EXIT_TIMEOUT_MARGIN_S = 20


@dataclass(frozen=True, slots=True)
class ServicePaths:
    """Everything a template needs, as absolute paths."""

    repo: Path  # this checkout (working directory)
    venv: Path  # its virtual environment
    config: Path  # the TOML config the service runs with
    hf_home: Path  # Hugging Face cache root (the model lives under hub/)
    log_dir: Path  # where stdout/stderr go
    user: str  # the account a LaunchDaemon runs as
    exit_timeout: int  # seconds, longer than the daemon's shutdown deadline

    @classmethod
    def for_checkout(cls, repo: Path, config_path: Path, cfg: Config,
                     user: str | None = None) -> ServicePaths:
        home = Path.home()
        return cls(
            repo=repo.resolve(), venv=(repo / ".venv").resolve(), config=config_path.resolve(),
            hf_home=Path(os.environ.get("HF_HOME", home / ".cache" / "huggingface")).resolve(),
            log_dir=home / "Library" / "Logs" / "pinguin-daemon",
            user=user or getpass.getuser(),
            exit_timeout=math.ceil(cfg.shutdown_timeout) + EXIT_TIMEOUT_MARGIN_S,
        )

    def substitutions(self) -> dict[str, str]:
        return {"__REPO__": str(self.repo), "__VENV__": str(self.venv), "__CONFIG__": str(self.config),
                "__HF_HOME__": str(self.hf_home), "__LOG_DIR__": str(self.log_dir),
                "__USER__": self.user, "__EXIT_TIMEOUT__": str(self.exit_timeout)}


def _fill(template: Path, paths: ServicePaths) -> str:
    text = template.read_text(encoding="utf-8")
    for key, value in paths.substitutions().items():
        text = text.replace(key, value)
    leftover = re.search(r"__[A-Z_]+__", text)
    if leftover:
        raise UserError(f"template {template} has an unknown placeholder {leftover.group(0)}")
    return text


def render_plist(template: Path, paths: ServicePaths) -> bytes:
    """A filled-in launchd plist, checked by parsing it."""
    text = _fill(template, paths)
    try:
        plistlib.loads(text.encode())
    except Exception as exc:  # plistlib raises ExpatError / ValueError
        raise UserError(f"{template} does not render to a valid plist: {exc}") from None
    return text.encode()


def render_systemd(template: Path, paths: ServicePaths) -> str:
    return _fill(template, paths)


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    print("+ " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.stdout.strip():
        print(proc.stdout.strip())
    if check and proc.returncode != 0:
        raise UserError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def predownload(cfg: Config) -> None:
    """Fetch the model now, so the first launch at boot never waits on a download."""
    from .model.store import resolve

    files = resolve(cfg.model, cfg.quantization)
    print(f"model ready: {files.source} ({files.weights_path})")


def install(repo: Path, config_path: Path, cfg: Config, system: bool, systemd: bool) -> int:
    """Render, validate, pre-download the model, and load the service."""
    paths = ServicePaths.for_checkout(repo, config_path, cfg)
    if sys.platform != "darwin":
        print("launchd is macOS only: this machine gets the systemd user unit "
              f"(launchd/{UNIT}) instead.")
        if not systemd:
            print("Run `make install-service SYSTEMD=1` to install it for this user.")
            return 0
        unit_dir = Path.home() / ".config" / "systemd" / "user"
        unit_dir.mkdir(parents=True, exist_ok=True)
        target = unit_dir / UNIT
        target.write_text(render_systemd(repo / "launchd" / UNIT, paths), encoding="utf-8")
        print(f"wrote {target}")
        if shutil.which("systemd-analyze"):
            _run("systemd-analyze", "verify", "--user", str(target))
        predownload(cfg)
        if shutil.which("systemctl"):
            _run("systemctl", "--user", "daemon-reload")
            _run("systemctl", "--user", "enable", "--now", UNIT)
        return 0
    template = repo / "launchd" / (f"{LABEL}.system.plist" if system else f"{LABEL}.plist")
    data = render_plist(template, paths)
    paths.log_dir.mkdir(parents=True, exist_ok=True)
    target = (Path("/Library/LaunchDaemons") if system else Path.home() / "Library" / "LaunchAgents")
    target = target / f"{LABEL}.plist"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    print(f"wrote {target}")
    _run("plutil", "-lint", str(target))
    predownload(cfg)
    domain = "system" if system else f"gui/{os.getuid()}"
    _run("launchctl", "bootout", f"{domain}/{LABEL}", check=False)  # replace an older one
    _run("launchctl", "bootstrap", domain, str(target))
    print(f"loaded {LABEL} in {domain}; logs: {paths.log_dir}/daemon.log (make logs)")
    return 0


def uninstall(system: bool) -> int:
    if sys.platform != "darwin":
        target = Path.home() / ".config" / "systemd" / "user" / UNIT
        if shutil.which("systemctl"):
            _run("systemctl", "--user", "disable", "--now", UNIT, check=False)
        target.unlink(missing_ok=True)
        print(f"removed {target}")
        return 0
    domain = "system" if system else f"gui/{os.getuid()}"
    _run("launchctl", "bootout", f"{domain}/{LABEL}", check=False)
    target = (Path("/Library/LaunchDaemons") if system else Path.home() / "Library" / "LaunchAgents")
    (target / f"{LABEL}.plist").unlink(missing_ok=True)
    print(f"removed {target / f'{LABEL}.plist'}")
    return 0


def status(cfg: Config, system: bool) -> int:
    import urllib.error
    import urllib.request

    if sys.platform == "darwin":
        domain = "system" if system else f"gui/{os.getuid()}"
        _run("launchctl", "print", f"{domain}/{LABEL}", check=False)
    elif shutil.which("systemctl"):
        _run("systemctl", "--user", "--no-pager", "status", UNIT, check=False)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    scheme = "https" if cfg.tls_cert else "http"
    try:
        with urllib.request.urlopen(f"{scheme}://{host}:{cfg.port}/healthz", timeout=3) as resp:
            print(f"/healthz: {resp.status}")
    except (urllib.error.URLError, OSError) as exc:
        print(f"/healthz: not answering ({exc})")
        return 1
    return 0
