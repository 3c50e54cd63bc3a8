"""Settings: one frozen dataclass, built once from TOML, then `PINGUIN_*` env, then CLI flags."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import UserError

DEFAULT_MODEL = "kyutai/stt-1b-en_fr-mlx"
ENV_PREFIX = "PINGUIN_"
# PINGUIN_* variables that are not settings: the config file path, where generated data goes,
# and the test suite's cache.
ENV_NOT_SETTINGS = frozenset({"PINGUIN_CONFIG", "PINGUIN_CACHE_DIR", "PINGUIN_TEST_CACHE"})

# Allowed values for the settings that are enumerations.
CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": ("bf16", "f32"),
    "quantization": ("none", "q4", "q8"),
    "log_format": ("auto", "console", "json"),
    "log_level": ("debug", "info", "warning", "error"),
    "engine": ("batched", "sequential"),
    "encoder": ("auto", "mlx", "rustymimi"),
    "advertise": ("on", "off"),
}


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of the daemon. See config/default.toml for what each one means."""

    host: str = "0.0.0.0"
    port: int = 8000
    model: str = DEFAULT_MODEL
    dtype: str = "bf16"
    quantization: str = "none"
    max_sessions: int = 8
    temperature: float = 0.0
    seed: int = 299792458
    log_format: str = "auto"
    log_level: str = "info"
    max_message_bytes: int = 1 << 20
    encoder_threads: int = 0
    shutdown_timeout: float = 10.0
    auth_tokens: tuple[str, ...] = ()
    eot_head: int = 1
    eot_threshold: float = 0.5
    vad_interval: int = 0
    tls_cert: str = ""
    tls_key: str = ""
    engine: str = "batched"
    encoder: str = "auto"
    http_port: int = 8001
    wyoming_port: int = 10300
    advertise: str = "on"
    max_upload_bytes: int = 25 * 1024 * 1024


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
    if key == "encoder_threads" and not 0 <= value <= 64:
        raise UserError(f"setting 'encoder_threads' in {source} must be between 0 and 64, got {value}")
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


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; pass an existing file with --config") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    known = {f.name for f in fields(Config)}
    out: dict[str, Any] = {}
    for key, raw in data.items():
        if key not in known:
            raise UserError(f"unknown setting '{key}' in {path}; known settings: {', '.join(sorted(known))}")
        out[key] = _convert(key, raw, str(path))
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    known = {f.name for f in fields(Config)}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_SETTINGS:
            continue
        key = name[len(ENV_PREFIX):].lower()
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
    if path is not None:
        values.update(_from_toml(path))
    values.update(_from_env(os.environ if env is None else env))
    for key, raw in (overrides or {}).items():
        if raw is not None:
            values[key] = _convert(key, raw, f"command-line flag --{key.replace('_', '-')}")
    return dataclasses.replace(Config(), **values)
