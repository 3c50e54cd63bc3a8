"""Install the daemon as a background service: launchd on macOS, a systemd user unit on Linux.

The templates in launchd/ hold __PLACEHOLDERS__ that become absolute paths of this checkout.
The service runs as the person who asked for it, never as root: under sudo that is SUDO_USER,
or the account named with --user. It reads a private copy of the config (mode 0600: it may hold
`auth_tokens`), and its logs rotate (see `logs.py` and the newsyslog template).
"""

from __future__ import annotations

import getpass
import math
import os
import plistlib
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .errors import UserError

LABEL = "com.pinguin.daemon"
UNIT = "pinguin-daemon.service"
# launchd waits ExitTimeOut after SIGTERM before SIGKILL; sessions need shutdown_timeout to flush.
EXIT_TIMEOUT_MARGIN_S = 20
LAUNCH_DAEMONS = Path("/Library/LaunchDaemons")
NEWSYSLOG_DIR = Path("/etc/newsyslog.d")
# The daemon's own log, rotated by the daemon (launchd never reopens the files it was given).
DAEMON_LOG = "daemon.log"
# launchd's StandardOutPath/StandardErrorPath: only what is printed before the daemon's log is
# open (a config error) or after it fails (a crash), so it stays small; newsyslog rotates the
# LaunchDaemon's.
LAUNCHD_LOG = "launchd.log"
# Permission bits that let other accounts read a file.
READABLE_BY_OTHERS = stat.S_IRGRP | stat.S_IROTH


def service_user(explicit: str | None = None, env: Mapping[str, str] | None = None,
                 euid: int | None = None) -> str:
    """The account the service runs as: the person who asked, even through sudo.

    Args:
        explicit: --user NAME, when given.
        env: the environment (default os.environ); under sudo, SUDO_USER names who ran it.
        euid: the effective uid of this process (default os.geteuid()).
    """
    if explicit:
        return explicit
    env = os.environ if env is None else env
    euid = os.geteuid() if euid is None else euid
    if euid == 0 and env.get("SUDO_USER") not in (None, "", "root"):
        return env["SUDO_USER"]
    try:
        return pwd.getpwuid(euid).pw_name
    except KeyError:  # a uid without an account (a container): the login name is all there is
        return getpass.getuser()


def _account(user: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        return None


def _is_root(user: str) -> bool:
    account = _account(user)
    return user == "root" or (account is not None and account.pw_uid == 0)


def _home_of(user: str, platform: str, current: bool) -> Path:
    """Where `user`'s files go: $HOME for whoever runs this, else the account's home directory."""
    if current:
        return Path.home()
    account = _account(user)
    if account is not None:
        return Path(account.pw_dir)
    # Not an account of this machine (rendering for another one): the platform's usual place.
    return Path("/Users" if platform == "darwin" else "/home") / user


def _group_of(user: str, platform: str) -> str:
    import grp

    account = _account(user)
    if account is not None:
        try:
            return grp.getgrgid(account.pw_gid).gr_name
        except KeyError:
            pass
    return "staff" if platform == "darwin" else user  # each platform's default primary group


@dataclass(frozen=True, slots=True)
class ServicePaths:
    """Everything a template needs, as absolute paths."""

    repo: Path  # this checkout (working directory)
    venv: Path  # its virtual environment
    config: Path  # the private copy of the config that the service runs with
    config_source: Path  # the config it is copied from (--config, default config/default.toml)
    hf_home: Path  # Hugging Face cache root (the model lives under hub/)
    log_dir: Path  # the daemon's rotating log and launchd's stdout/stderr file
    user: str  # the account the service runs as
    group: str  # its primary group (owner of the rotated launchd.log)
    exit_timeout: int  # seconds, longer than the daemon's shutdown deadline

    @classmethod
    def for_checkout(cls, repo: Path, config_path: Path, cfg: Config, user: str | None = None,
                     platform: str | None = None, current_user: bool | None = None) -> ServicePaths:
        """Paths for a service of this checkout, run by `user`.

        Args:
            repo: the checkout.
            config_path: the config to copy for the service.
            cfg: that config, parsed (for shutdown_timeout).
            user: the account that runs it (default: `service_user()`).
            platform: sys.platform of the machine it is for (default: this one).
            current_user: whether `user` runs this installer (then $HOME is its home); default:
                whether the name is this process's account.
        """
        platform = platform or sys.platform
        user = user or service_user()
        if current_user is None:
            current_user = user == service_user(env={}, euid=os.geteuid())
        home = _home_of(user, platform, current_user)
        config_dir = (home / "Library" / "Application Support" / "pinguin-daemon" if platform == "darwin"
                      else home / ".config" / "pinguin-daemon")
        return cls(
            repo=repo.resolve(), venv=(repo / ".venv").resolve(),
            config=config_dir / "config.toml", config_source=config_path.resolve(),
            # HF_HOME of this shell is the service's only when it runs as whoever runs this (under
            # sudo it would be root's); otherwise the account's default cache.
            hf_home=Path((os.environ.get("HF_HOME") if current_user else None)
                         or home / ".cache" / "huggingface").resolve(),
            log_dir=home / "Library" / "Logs" / "pinguin-daemon",
            user=user, group=_group_of(user, platform),
            exit_timeout=math.ceil(cfg.shutdown_timeout) + EXIT_TIMEOUT_MARGIN_S,
        )

    def substitutions(self) -> dict[str, str]:
        return {"__REPO__": str(self.repo), "__VENV__": str(self.venv), "__CONFIG__": str(self.config),
                "__HF_HOME__": str(self.hf_home), "__LOG_DIR__": str(self.log_dir),
                "__USER__": self.user, "__GROUP__": self.group,
                "__EXIT_TIMEOUT__": str(self.exit_timeout)}


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


def render_newsyslog(template: Path, paths: ServicePaths) -> str:
    """newsyslog.d(5) lines rotating launchd's log file; its fields are split on whitespace."""
    if re.search(r"\s", str(paths.log_dir)):
        raise UserError(f"newsyslog cannot rotate logs in {paths.log_dir}: the path has a space")
    return _fill(template, paths)


@dataclass(frozen=True, slots=True)
class ServiceFile:
    """One file the installer writes."""

    path: Path  # where it goes
    data: bytes  # its content
    mode: int  # its permission bits
    for_user: bool  # owned by the service's account (else by whoever installs: root for /Library)


@dataclass(frozen=True, slots=True)
class InstallPlan:
    """What `install` writes, rendered and checked, before anything is touched."""

    kind: str  # "agent" (LaunchAgent), "daemon" (LaunchDaemon) or "systemd" (user unit)
    paths: ServicePaths
    files: tuple[ServiceFile, ...]
    service_file: Path  # the plist or unit among `files`


def plan_install(repo: Path, config_path: Path, cfg: Config, *, system: bool, user: str | None = None,
                 platform: str | None = None, env: Mapping[str, str] | None = None,
                 euid: int | None = None) -> InstallPlan:
    """Decide who runs the service and render its files; refuse a service that runs as root.

    Args:
        repo: the checkout.
        config_path: the config the service gets a private copy of.
        cfg: that config, parsed.
        system: macOS: a LaunchDaemon (at boot, installed with sudo); else the LaunchAgent.
            On Linux the systemd user unit either way.
        user: --user NAME (LaunchDaemon only).
        platform: sys.platform of the target (default: this machine's).
        env: the environment (default os.environ), for SUDO_USER.
        euid: this process's effective uid (default os.geteuid()).
    """
    platform = platform or sys.platform
    euid = os.geteuid() if euid is None else euid
    kind = ("daemon" if system else "agent") if platform == "darwin" else "systemd"
    if kind == "daemon":
        if euid != 0:
            raise UserError("a LaunchDaemon is installed by root: run `sudo make install-service SYSTEM=1` "
                            "(it runs as you, the account that ran sudo, or --user NAME)")
        user = service_user(user, env, euid)
        if _is_root(user):
            raise UserError(f"refusing to install a LaunchDaemon that runs as {user}: it would run code "
                            f"from {repo}, which a user can change, with root's rights; run sudo from your "
                            "own account (SUDO_USER), or pass --user NAME (make install-service "
                            "SYSTEM=1 SERVICE_USER=NAME)")
        paths = ServicePaths.for_checkout(repo, config_path, cfg, user=user, platform=platform,
                                          current_user=False)
    else:
        what = "the LaunchAgent" if kind == "agent" else "the systemd user unit"
        if euid == 0:
            raise UserError(f"refusing to install {what} as root: it runs as whoever installs it; run "
                            "`make install-service` without sudo from the account that should run it"
                            + (" (SYSTEM=1 with sudo for a LaunchDaemon)" if kind == "agent" else ""))
        if user and user != service_user(env={}, euid=euid):
            raise UserError(f"--user is for a LaunchDaemon (SYSTEM=1) only: {what} runs as whoever "
                            "installs it; run the install from that account")
        paths = ServicePaths.for_checkout(repo, config_path, cfg, user=service_user(None, env, euid),
                                          platform=platform, current_user=True)
    templates = repo / "launchd"
    config = ServiceFile(paths.config, paths.config_source.read_bytes(), 0o600, for_user=True)
    if kind == "systemd":
        target = Path.home() / ".config" / "systemd" / "user" / UNIT
        unit = render_systemd(templates / UNIT, paths).encode()
        return InstallPlan(kind, paths, (config, ServiceFile(target, unit, 0o644, True)), target)
    if kind == "agent":
        target = Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        plist = render_plist(templates / f"{LABEL}.plist", paths)
        return InstallPlan(kind, paths, (config, ServiceFile(target, plist, 0o644, True)), target)
    target = LAUNCH_DAEMONS / f"{LABEL}.plist"
    plist = render_plist(templates / f"{LABEL}.system.plist", paths)
    rotation = render_newsyslog(templates / f"{LABEL}.newsyslog.conf", paths).encode()
    return InstallPlan(kind, paths, (config, ServiceFile(target, plist, 0o644, False),
                                     ServiceFile(NEWSYSLOG_DIR / f"{LABEL}.conf", rotation, 0o644, False)),
                       target)


def config_permission_warning(path: Path) -> str | None:
    """A warning when `path` holds auth_tokens that other accounts of this machine can read.

    Args:
        path: the TOML config the daemon was started with.

    Returns:
        one sentence naming the file and the fix, or None when the file is private, holds no
        token, or cannot be read (the config loader reports that).
    """
    try:
        mode = path.stat().st_mode
        tokens = tomllib.loads(path.read_text(encoding="utf-8")).get("auth_tokens")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    if not tokens or not mode & READABLE_BY_OTHERS:
        return None
    return (f"{path} holds auth_tokens and other accounts of this machine can read it "
            f"(mode {stat.S_IMODE(mode):04o}); run `chmod 600 {path}`")


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    print("+ " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.stdout.strip():
        print(proc.stdout.strip())
    if check and proc.returncode != 0:
        raise UserError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def _make_dirs(directory: Path, owner: pwd.struct_passwd | None) -> None:
    """mkdir -p, giving the directories it creates to `owner` (root installs into a user's home)."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    if owner is not None:
        for created in missing:
            os.chown(created, owner.pw_uid, owner.pw_gid)


def write_service_file(file: ServiceFile, owner: pwd.struct_passwd | None = None) -> None:
    """Write atomically with exactly `file.mode`, never readable by others on the way.

    Args:
        file: what to write where.
        owner: give the file (and the directories created for it) to this account: root
            installing into a user's home.
    """
    _make_dirs(file.path.parent, owner)
    tmp = file.path.with_name(f".{file.path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, file.data)
        os.fchmod(fd, file.mode)  # the umask does not apply to fchmod
        if owner is not None:
            os.fchown(fd, owner.pw_uid, owner.pw_gid)
    finally:
        os.close(fd)
    os.replace(tmp, file.path)
    print(f"wrote {file.path} ({file.mode:04o})")


def predownload(cfg: Config, paths: ServicePaths, as_account: pwd.struct_passwd | None = None) -> None:
    """Fetch the model now, so the first launch at boot never waits on a download.

    Args:
        cfg: the service's config.
        paths: the service's paths (its Hugging Face cache).
        as_account: download as this account (root installing a LaunchDaemon): the cache is the
            service's, and root-owned files in it would stop the daemon from updating them.
    """
    from .model.store import REPO_ID, resolve

    hub_repo = (cfg.model != "synthetic" and not Path(cfg.model).expanduser().is_dir()
                and REPO_ID.match(cfg.model) is not None)
    if as_account is not None and cfg.model == "synthetic":
        print("model: synthetic (generated in the service's cache at its first start)")
        return
    if as_account is None or not hub_repo:
        files = resolve(cfg.model, cfg.quantization)
        print(f"model ready: {files.source} ({files.weights_path})")
        return
    env = {"HOME": as_account.pw_dir, "USER": as_account.pw_name, "HF_HOME": str(paths.hf_home),
           "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    cmd = [str(paths.venv / "bin" / "pinguin-daemon"), "download", cfg.model,
           "--quantization", cfg.quantization]
    print(f"+ (as {as_account.pw_name}) " + " ".join(cmd))
    proc = subprocess.run(cmd, env=env, cwd=paths.repo, user=as_account.pw_uid, group=as_account.pw_gid,
                          extra_groups=os.getgrouplist(as_account.pw_name, as_account.pw_gid))
    if proc.returncode != 0:
        raise UserError(f"downloading {cfg.model} as {as_account.pw_name} failed (above); the service "
                        "was not loaded")


def install(repo: Path, config_path: Path, cfg: Config, system: bool, systemd: bool,
            user: str | None = None) -> int:
    """Render, validate, pre-download the model, and load the service.

    Args:
        repo: the checkout.
        config_path: the config the service gets a private copy of.
        cfg: that config, parsed.
        system: macOS: a LaunchDaemon started at boot (run with sudo).
        systemd: Linux: install the systemd user unit (otherwise only say how).
        user: --user NAME: the account a LaunchDaemon runs as (default: who ran sudo).
    """
    if sys.platform != "darwin" and not systemd:
        print("launchd is macOS only: this machine gets the systemd user unit "
              f"(launchd/{UNIT}) instead.")
        print("Run `make install-service SYSTEMD=1` to install it for this user.")
        return 0
    plan = plan_install(repo, config_path, cfg, system=system, user=user)
    paths = plan.paths
    account = _account(paths.user)
    if account is None:
        raise UserError(f"there is no account named '{paths.user}' on this machine (--user)")
    # Only root hands files to another account; a user's own install already owns what it writes.
    owner = account if os.geteuid() == 0 else None
    for file in plan.files:
        write_service_file(file, owner if file.for_user else None)
    print(f"the service reads {paths.config} (a private copy of {paths.config_source}: edit "
          "that one, or install again)")
    if plan.kind == "systemd":
        if shutil.which("systemd-analyze"):
            _run("systemd-analyze", "verify", "--user", str(plan.service_file))
        predownload(cfg, paths)
        if shutil.which("systemctl"):
            _run("systemctl", "--user", "daemon-reload")
            _run("systemctl", "--user", "enable", "--now", UNIT)
        return 0
    _make_dirs(paths.log_dir, owner)
    _run("plutil", "-lint", str(plan.service_file))
    predownload(cfg, paths, owner)
    domain = "system" if plan.kind == "daemon" else f"gui/{os.getuid()}"
    _run("launchctl", "bootout", f"{domain}/{LABEL}", check=False)  # replace an older one
    _run("launchctl", "bootstrap", domain, str(plan.service_file))
    print(f"loaded {LABEL} in {domain} as {paths.user}; logs: {paths.log_dir}/{DAEMON_LOG} "
          f"(rotated at 10 MB, 5 kept) and {LAUNCHD_LOG} (start-up errors) (make logs)")
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
    target = LAUNCH_DAEMONS if system else Path.home() / "Library" / "LaunchAgents"
    removed = [target / f"{LABEL}.plist"] + ([NEWSYSLOG_DIR / f"{LABEL}.conf"] if system else [])
    for path in removed:
        path.unlink(missing_ok=True)
        print(f"removed {path}")
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
