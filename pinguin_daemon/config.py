"""Settings: one frozen dataclass, built once from TOML, then `PINGUIN_*` env, then CLI flags."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import UserError

# The -candle checkpoint: the same model as -mlx, plus the end-of-turn heads.
DEFAULT_MODEL = "kyutai/stt-1b-en_fr-candle"
ENV_PREFIX = "PINGUIN_"
# PINGUIN_* variables that are not settings: the config file path, where generated data goes,
# the test suite's cache, and the BLAS choice (read when the package is imported: blas.py).
ENV_NOT_SETTINGS = frozenset({"PINGUIN_CONFIG", "PINGUIN_CACHE_DIR", "PINGUIN_TEST_CACHE", "PINGUIN_BLAS"})

# Settings that no longer do anything: old configs keep starting (any value is accepted and
# ignored, with one line in the log saying so).
DEPRECATED: dict[str, str] = {
    "encoder": "the batched MLX Mimi encoder now serves on every backend",
    "encoder_threads": "the batched MLX Mimi encoder runs in the engine's step: no worker threads",
}

# Allowed values for the settings that are enumerations.
CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": ("auto", "bf16", "f32"),
    "quantization": ("none", "q4", "q8"),
    "log_format": ("auto", "console", "json"),
    "log_level": ("debug", "info", "warning", "error"),
    "engine": ("batched", "sequential"),
    "advertise": ("on", "off"),
}


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of the daemon. See config/default.toml for what each one means."""

    host: str = "0.0.0.0"
    port: int = 8000
    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    quantization: str = "none"
    max_sessions: int = 8
    temperature: float = 0.0
    seed: int = 299792458
    log_format: str = "auto"
    log_level: str = "info"
    # The service's log file, rotated by the daemon at 10 MB with 5 kept; "" logs to stderr.
    log_file: str = ""
    max_message_bytes: int = 1 << 20
    shutdown_timeout: float = 10.0
    auth_tokens: tuple[str, ...] = ()
    eot_head: int = 1
    eot_threshold: float = 0.5
    vad_interval: int = 0
    tls_cert: str = ""
    tls_key: str = ""
    engine: str = "batched"
    http_port: int = 8001
    wyoming_port: int = 10300
    advertise: str = "on"
    max_upload_bytes: int = 25 * 1024 * 1024
    max_upload_seconds: float = 3600.0
    idle_timeout: float = 60.0
    wyoming_allow: tuple[str, ...] = ()
    max_connections: int = 512
    allowed_origins: tuple[str, ...] = ()
    resume_grace: float = 20.0
    # Deprecated settings found (name and where), for one line in the log; not a setting itself.
    deprecated: tuple[str, ...] = ()


def _convert(key: str, raw: Any, source: str) -> Any:
    """Check and convert one value to the type of the `Config` field `key`.

    Args:
        key: the field name.
        raw: the value as found (a TOML value, or a string from the environment / CLI).
        source: where it came from, named in the error ("config/default.toml", "PINGUIN_PORT").
    """
    # Every field has a default of its own type, which is simpler to read than annotations.
    kind = type(getattr(Config(), key))
    from_text = isinstance(raw, str) and kind is not str
    try:
        if kind is tuple:  # a TOML array of strings, or "a,b" from the environment / a flag
            items = raw.split(",") if isinstance(raw, str) else raw
            if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
                raise TypeError
            value: Any = tuple(i.strip() for i in items if i.strip())
        elif kind is int:
            if isinstance(raw, bool) or not (isinstance(raw, int) or from_text):
                raise TypeError
            value = int(raw)
        elif kind is float:
            if isinstance(raw, bool) or not (isinstance(raw, int | float) or from_text):
                raise TypeError
            value = float(raw)
        else:
            if not isinstance(raw, str):
                raise TypeError
            value = raw
    except (TypeError, ValueError):
        what = "a list of strings" if kind is tuple else kind.__name__
        raise UserError(f"setting '{key}' in {source} must be {what}, got {raw!r}") from None
    if key in CHOICES and value not in CHOICES[key]:
        raise UserError(
            f"setting '{key}' in {source} must be one of {', '.join(CHOICES[key])}, got {value!r}"
        )
    if key in ("port", "http_port", "wyoming_port") and not 0 <= value <= 65535:
        raise UserError(f"setting '{key}' in {source} must be between 0 and 65535, got {value}")
    if key == "max_upload_bytes" and value < 1024:
        raise UserError(f"setting 'max_upload_bytes' in {source} must be at least 1024, got {value}")
    if key == "max_sessions" and not 1 <= value <= 256:
        raise UserError(f"setting 'max_sessions' in {source} must be between 1 and 256, got {value}")
    if key == "max_message_bytes" and value < 4:
        raise UserError(f"setting 'max_message_bytes' in {source} must be at least 4, got {value}")
    if key == "max_upload_seconds" and not 1 <= value <= 86400:
        raise UserError(f"setting 'max_upload_seconds' in {source} must be 1 to 86400 seconds, got {value}")
    if key == "idle_timeout" and not 0 <= value <= 86400:
        raise UserError(f"setting 'idle_timeout' in {source} must be 0 (never) or up to 86400 seconds, "
                        f"got {value}")
    if key == "resume_grace" and not 0 <= value <= 600:
        raise UserError(f"setting 'resume_grace' in {source} must be 0 (off) to 600 seconds, got {value}")
    if key == "max_connections" and not 16 <= value <= 1_000_000:
        raise UserError(f"setting 'max_connections' in {source} must be at least 16, got {value}")
    if key == "wyoming_allow":
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise UserError(f"setting 'wyoming_allow' in {source}: {item!r} is not an IP address or "
                                "CIDR range (e.g. 192.168.1.20 or 10.0.0.0/24)") from None
    if key == "allowed_origins":
        for item in value:
            if item != "*" and not re.fullmatch(r"https?://[^/\s]+", item):
                raise UserError(f"setting 'allowed_origins' in {source}: {item!r} is not a web origin "
                                "(scheme://host[:port], e.g. https://example.com) or *")
    if key == "shutdown_timeout" and not 0 < value <= 300:
        raise UserError(f"setting 'shutdown_timeout' in {source} must be in (0, 300] seconds, got {value}")
    if key == "eot_head" and not 0 <= value <= 15:
        raise UserError(f"setting 'eot_head' in {source} must be a VAD head index (0-3), got {value}")
    if key == "eot_threshold" and not 0 < value < 1:
        raise UserError(f"setting 'eot_threshold' in {source} must be between 0 and 1, got {value}")
    if key == "vad_interval" and not 0 <= value <= 1000:
        raise UserError(f"setting 'vad_interval' in {source} must be 0 (off) or a step count, got {value}")
    if key == "temperature" and value < 0:
        raise UserError(f"setting 'temperature' in {source} must be >= 0, got {value}")
    return value


def _deprecated(out: dict[str, Any], key: str, source: str) -> None:
    out["deprecated"] = (*out.get("deprecated", ()), f"{key} ({source})")


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; pass an existing file with --config") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    known = {f.name for f in fields(Config)} - {"deprecated"}
    out: dict[str, Any] = {}
    for key, raw in data.items():
        if key in DEPRECATED:
            _deprecated(out, key, str(path))
            continue
        if key not in known:
            raise UserError(f"unknown setting '{key}' in {path}; known settings: {', '.join(sorted(known))}")
        out[key] = _convert(key, raw, str(path))
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    known = {f.name for f in fields(Config)} - {"deprecated"}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_SETTINGS:
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key in DEPRECATED:
            _deprecated(out, key, f"environment variable {name}")
            continue
        if key not in known:
            raise UserError(f"unknown environment variable {name}; known: "
                            + ", ".join(ENV_PREFIX + k.upper() for k in sorted(known)))
        out[key] = _convert(key, raw, f"environment variable {name}")
    return out


def load_config(
    path: Path | None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the one `Config`: defaults, then the TOML file, then `PINGUIN_*`, then flags.

    Args:
        path: a TOML file, or None for defaults only.
        env: the environment (defaults to os.environ).
        overrides: values from command-line flags; None values are ignored.
    """
    values: dict[str, Any] = {}
    deprecated: tuple[str, ...] = ()
    from_file = _from_toml(path) if path is not None else {}
    for layer in (from_file, _from_env(os.environ if env is None else env)):
        deprecated += layer.pop("deprecated", ())
        values.update(layer)
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key in DEPRECATED:
            deprecated += (f"{key} (command-line flag --{key.replace('_', '-')})",)
            continue
        values[key] = _convert(key, raw, f"command-line flag --{key.replace('_', '-')}")
    return dataclasses.replace(Config(), **values, deprecated=deprecated)


def resolve_dtype(setting: str, device: str) -> str:
    """The compute dtype for the `dtype` setting: "auto" is f32 where MLX computes on a CPU (exact,
    and with an optimized BLAS faster than bf16 there), bf16 on a GPU.

    Args:
        setting: "auto", "bf16" or "f32".
        device: what MLX computes on ("cpu", "metal", "cuda").
    """
    if setting != "auto":
        return setting
    return "f32" if device == "cpu" else "bf16"
