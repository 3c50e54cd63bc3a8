"""Service files: launchd plists (checked with plistlib) and the systemd user unit."""

from __future__ import annotations

import dataclasses
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pinguin_daemon.config import Config
from pinguin_daemon.errors import UserError
from pinguin_daemon.service import ServicePaths, render_plist, render_systemd

REPO = Path(__file__).resolve().parent.parent
LAUNCHD = REPO / "launchd"


def paths(shutdown_timeout: float = 10.0) -> ServicePaths:
    cfg = dataclasses.replace(Config(), shutdown_timeout=shutdown_timeout)
    return ServicePaths.for_checkout(REPO, REPO / "config" / "default.toml", cfg, user="pinguin")


def all_strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in all_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in all_strings(v)]
    return []


@pytest.mark.parametrize("name", ["com.pinguin.daemon.plist", "com.pinguin.daemon.system.plist"])
@pytest.mark.parametrize("shutdown_timeout", [10.0, 45.5])
def test_plists_render_with_what_launchd_needs(name: str, shutdown_timeout: float) -> None:
    p = paths(shutdown_timeout)
    plist = plistlib.loads(render_plist(LAUNCHD / name, p))
    assert plist["Label"] == "com.pinguin.daemon"
    assert plist["ProgramArguments"][:4] == [f"{p.venv}/bin/pinguin-daemon", "serve", "--config",
                                             str(p.config)]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # restart on crash, not after a clean stop
    assert plist["ThrottleInterval"] >= 5
    assert plist["ProcessType"] == "Interactive"
    # launchd must give sessions time to flush before it sends SIGKILL.
    assert plist["ExitTimeOut"] > shutdown_timeout
    log_dir = Path.home() / "Library" / "Logs" / "pinguin-daemon"
    assert Path(plist["StandardOutPath"]).parent == log_dir
    assert Path(plist["StandardErrorPath"]).parent == log_dir
    assert plist["WorkingDirectory"] == str(REPO)
    assert plist["EnvironmentVariables"]["HF_HOME"] == str(p.hf_home)
    assert plist["EnvironmentVariables"]["PINGUIN_CONFIG"] == str(p.config)
    for value in all_strings(plist):
        assert "__" not in value
        if "/" in value:
            assert value.startswith("/"), value  # every path is absolute
    assert ("UserName" in plist) == name.endswith(".system.plist")
    if "UserName" in plist:
        assert plist["UserName"] == "pinguin"


def test_unknown_placeholder_is_refused(tmp_path: Path) -> None:
    template = tmp_path / "x.plist"
    template.write_text((LAUNCHD / "com.pinguin.daemon.plist").read_text().replace("__REPO__", "__REPOO__"))
    with pytest.raises(UserError, match="unknown placeholder __REPOO__"):
        render_plist(template, paths())


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    text = render_systemd(LAUNCHD / "pinguin-daemon.service", paths())
    assert "Restart=on-failure" in text and "TimeoutStopSec=30" in text
    assert f"ExecStart={REPO}/.venv/bin/pinguin-daemon serve --config" in text
    unit = tmp_path / "pinguin-daemon.service"
    unit.write_text(text)
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (.ci/run installs it)")
    ok = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    # The check has teeth: a unit whose program does not exist fails it.
    broken = tmp_path / "broken.service"
    broken.write_text(text.replace(f"{REPO}/.venv/bin/pinguin-daemon", "/nonexistent/pinguin-daemon"))
    bad = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True)
    assert bad.returncode != 0


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS it installs the LaunchAgent for real")
def test_install_service_on_linux_offers_systemd() -> None:
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "pinguin-daemon"), "service", "install"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0
    assert "launchd is macOS only" in proc.stdout and "SYSTEMD=1" in proc.stdout
