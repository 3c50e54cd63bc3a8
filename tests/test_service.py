"""Service files: launchd plists (checked with plistlib), the systemd user unit, newsyslog's
rotation; who the service runs as (never root); the private copy of the config."""

from __future__ import annotations

import dataclasses
import os
import plistlib
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pinguin_daemon.config import Config
from pinguin_daemon.errors import UserError
from pinguin_daemon.service import (
    LAUNCH_DAEMONS,
    NEWSYSLOG_DIR,
    InstallPlan,
    ServiceFile,
    ServicePaths,
    config_permission_warning,
    plan_install,
    render_plist,
    render_systemd,
    write_service_file,
)

REPO = Path(__file__).resolve().parent.parent
LAUNCHD = REPO / "launchd"
DEFAULT_CONFIG = REPO / "config" / "default.toml"
TEN_MB_IN_KB = 10 * 1024


def paths(shutdown_timeout: float = 10.0) -> ServicePaths:
    cfg = dataclasses.replace(Config(), shutdown_timeout=shutdown_timeout)
    return ServicePaths.for_checkout(REPO, DEFAULT_CONFIG, cfg, user="pinguin", platform="darwin")


def all_strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in all_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in all_strings(v)]
    return []


def plan_for(*, system: bool, env: dict[str, str], euid: int, user: str | None = None,
             platform: str = "darwin") -> InstallPlan:
    return plan_install(REPO, DEFAULT_CONFIG, Config(), system=system, user=user, platform=platform,
                        env=env, euid=euid)


def service_file(plan: InstallPlan) -> ServiceFile:
    return next(f for f in plan.files if f.path == plan.service_file)


def newsyslog_entries(text: str) -> list[list[str]]:
    """The entries of a newsyslog.conf(5) file: whitespace-separated fields, comments dropped."""
    return [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("name", ["com.pinguin.daemon.plist", "com.pinguin.daemon.system.plist"])
@pytest.mark.parametrize("shutdown_timeout", [10.0, 45.5])
def test_plists_render_with_what_launchd_needs(name: str, shutdown_timeout: float) -> None:
    p = paths(shutdown_timeout)
    plist = plistlib.loads(render_plist(LAUNCHD / name, p))
    assert plist["Label"] == "com.pinguin.daemon"
    args = plist["ProgramArguments"]
    assert args[:4] == [f"{p.venv}/bin/pinguin-daemon", "serve", "--config", str(p.config)]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # restart on crash, not after a clean stop
    assert plist["ThrottleInterval"] >= 5
    assert plist["ProcessType"] == "Interactive"
    # Room for max_connections (512) past launchd's default soft limit of 256 descriptors.
    assert plist["SoftResourceLimits"]["NumberOfFiles"] >= 1024
    # launchd must give sessions time to flush before it sends SIGKILL.
    assert plist["ExitTimeOut"] > shutdown_timeout
    # The daemon rotates its own log; launchd's stdout/stderr file is another one, or the daemon
    # would rename the file launchd writes to.
    assert args[args.index("--log-file") + 1] == str(p.log_dir / "daemon.log")
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == str(p.log_dir / "launchd.log")
    assert p.log_dir == Path("/Users/pinguin/Library/Logs/pinguin-daemon")
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


@pytest.mark.parametrize("name", ["com.pinguin.daemon.plist", "com.pinguin.daemon.system.plist"])
def test_the_daemon_accepts_the_plists_arguments(name: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """launchd starts `serve` with these flags: each must be one the daemon knows."""
    from pinguin_daemon.cli import build_parser, config_from_args

    p = dataclasses.replace(paths(), config=DEFAULT_CONFIG, log_dir=tmp_path)
    args = plistlib.loads(render_plist(LAUNCHD / name, p))["ProgramArguments"][1:]
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`pinguin-daemon {' '.join(args)}` is refused: {capsys.readouterr().err}")
    cfg = config_from_args(parsed)
    assert cfg.log_format == "json"
    assert cfg.log_file == str(tmp_path / "daemon.log")  # the daemon writes and rotates it


def test_unknown_placeholder_is_refused(tmp_path: Path) -> None:
    template = tmp_path / "x.plist"
    template.write_text((LAUNCHD / "com.pinguin.daemon.plist").read_text().replace("__REPO__", "__REPOO__"))
    with pytest.raises(UserError, match="unknown placeholder __REPOO__"):
        render_plist(template, paths())


def test_launch_daemon_runs_as_who_ran_sudo() -> None:
    """`sudo make install-service SYSTEM=1` run by alice: alice's daemon, files and logs."""
    plan = plan_for(system=True, env={"SUDO_USER": "alice", "USER": "root"}, euid=0)
    assert plan.kind == "daemon" and plan.paths.user == "alice"
    files = {f.path: f for f in plan.files}
    assert plan.service_file == LAUNCH_DAEMONS / "com.pinguin.daemon.plist"
    plist = plistlib.loads(files[plan.service_file].data)
    assert plist["UserName"] == "alice"
    home = Path(plan.paths.log_dir).parents[2]
    assert home != Path.home() and home.name == "alice"
    # The service reads a private copy of the config, kept in alice's home and given to her.
    copy = files[plan.paths.config]
    assert plist["ProgramArguments"][3] == str(copy.path) == plist["EnvironmentVariables"]["PINGUIN_CONFIG"]
    assert copy.path.is_relative_to(home) and copy.mode == 0o600 and copy.for_user
    assert copy.data == DEFAULT_CONFIG.read_bytes()
    assert plist["EnvironmentVariables"]["HF_HOME"] == str(home / ".cache" / "huggingface")
    # --user names another account.
    plan = plan_for(system=True, env={"SUDO_USER": "alice"}, euid=0, user="pinguin")
    assert plistlib.loads(service_file(plan).data)["UserName"] == "pinguin"


@pytest.mark.parametrize(("env", "user"), [
    ({"USER": "root"}, None),  # root's own shell: no SUDO_USER
    ({"SUDO_USER": "root", "USER": "root"}, None),  # sudo from a root shell
    ({"SUDO_USER": "alice", "USER": "root"}, "root"),  # asked for by name
])
def test_launch_daemon_as_root_is_refused(env: dict[str, str], user: str | None) -> None:
    with pytest.raises(UserError, match="refusing to install a LaunchDaemon that runs as root"):
        plan_for(system=True, env=env, euid=0, user=user)


def test_agents_and_user_units_are_not_installed_by_root() -> None:
    with pytest.raises(UserError, match="refusing to install the LaunchAgent as root"):
        plan_for(system=False, env={"SUDO_USER": "alice"}, euid=0)
    with pytest.raises(UserError, match="refusing to install the systemd user unit as root"):
        plan_for(system=False, env={"SUDO_USER": "alice"}, euid=0, platform="linux")
    with pytest.raises(UserError, match="a LaunchDaemon is installed by root"):
        plan_for(system=True, env={}, euid=4242)


def test_launch_daemon_logs_rotate_with_newsyslog() -> None:
    plan = plan_for(system=True, env={"SUDO_USER": "alice"}, euid=0)
    rotation = next(f for f in plan.files if f.path.parent == NEWSYSLOG_DIR)
    assert rotation.path.name.endswith(".conf") and not rotation.for_user  # newsyslog.d: root's
    entries = newsyslog_entries(rotation.data.decode())
    assert len(entries) == 1
    logfile, owner, mode, count, size, when, flags = entries[0]
    plist = plistlib.loads(service_file(plan).data)
    assert logfile == plist["StandardErrorPath"] == plist["StandardOutPath"]
    assert owner.split(":")[0] == "alice" and len(owner.split(":")) == 2
    assert int(mode, 8) & 0o007 == 0  # others cannot read the daemon's output
    assert int(count) == 5 and int(size) == TEN_MB_IN_KB and when == "*"
    assert "N" in flags  # no process to signal: launchd opens the file at each start


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    p = dataclasses.replace(paths(), config=tmp_path / "config.toml")
    text = render_systemd(LAUNCHD / "pinguin-daemon.service", p)
    assert "Restart=on-failure" in text and "TimeoutStopSec=30" in text and "LimitNOFILE=4096" in text
    assert f"ExecStart={p.venv}/bin/pinguin-daemon serve --config {p.config}" in text
    unit = tmp_path / "pinguin-daemon.service"
    unit.write_text(text)
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (.ci/run installs it)")
    ok = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    # The check has teeth: a unit whose program does not exist fails it.
    broken = tmp_path / "broken.service"
    broken.write_text(text.replace(f"{p.venv}/bin/pinguin-daemon", "/nonexistent/pinguin-daemon"))
    bad = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True)
    assert bad.returncode != 0


def test_the_config_copy_is_private(tmp_path: Path) -> None:
    """Written 0600 whatever the umask, also over an older copy that others could read."""
    target = tmp_path / "new" / "config.toml"
    target.parent.mkdir()
    target.write_text("old")
    target.chmod(0o644)
    old_umask = os.umask(0)
    try:
        write_service_file(ServiceFile(target, b'auth_tokens = ["t"]\n', 0o600, for_user=True))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_bytes() == b'auth_tokens = ["t"]\n'
    assert config_permission_warning(target) is None


def test_a_readable_config_with_tokens_gets_a_warning(tmp_path: Path) -> None:
    config = tmp_path / "my.toml"
    config.write_text('auth_tokens = ["s3cret"]\n')
    config.chmod(0o644)
    warning = config_permission_warning(config)
    assert warning is not None
    assert str(config) in warning and "0644" in warning and f"chmod 600 {config}" in warning
    assert "s3cret" not in warning
    config.chmod(0o600)
    assert config_permission_warning(config) is None
    config.chmod(0o640)  # the group is other accounts too
    assert config_permission_warning(config) is not None
    config.write_text('auth_tokens = []\nport = 9000\n')  # nothing secret in it
    config.chmod(0o644)
    assert config_permission_warning(config) is None


def test_serve_logs_the_warning_at_start(tmp_path: Path) -> None:
    """The daemon says so in its log when it starts (here it then stops: no model, no hub)."""
    config = tmp_path / "tokens.toml"
    config.write_text('auth_tokens = ["s3cret"]\nadvertise = "off"\n')
    config.chmod(0o644)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pinguin_daemon", "serve", "--config", str(config), "--log-format", "json",
         "--model", "kyutai/stt-1b-en_fr-mlx", "--port", "0", "--http-port", "0", "--wyoming-port", "0"],
        capture_output=True, text=True, env=env, timeout=120)
    warnings = [line for line in proc.stderr.splitlines() if "config_readable_by_others" in line]
    assert len(warnings) == 1, proc.stderr
    assert '"level": "warning"' in warnings[0] and f"chmod 600 {config}" in warnings[0]
    assert "s3cret" not in proc.stderr


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS it installs the LaunchAgent for real")
def test_install_service_on_linux_offers_systemd() -> None:
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "pinguin-daemon"), "service", "install"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0
    assert "launchd is macOS only" in proc.stdout and "SYSTEMD=1" in proc.stdout


@pytest.mark.skipif(sys.platform == "darwin" or os.geteuid() != 0,
                    reason="as a user it would install the unit for real")
def test_installing_the_user_unit_as_root_is_refused() -> None:
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "pinguin-daemon"), "service", "install", "--systemd"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "refusing to install the systemd user unit as root" in proc.stderr
    assert not proc.stdout  # nothing was written
