"""Config: file < environment < flags, and errors that name the key and where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from pinguin_daemon.cli import main
from pinguin_daemon.config import Config, load_config
from pinguin_daemon.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def test_default_toml_matches_dataclass_defaults() -> None:
    # The documented file and the code must not drift apart.
    assert load_config(REPO / "config" / "default.toml", env={}) == Config()


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('port = 9001\nmodel = "synthetic"\nmax_sessions = 3\n')
    cfg = load_config(cfg_file, env={"PINGUIN_PORT": "9002", "PINGUIN_DTYPE": "f32"},
                      overrides={"port": "9003", "host": None})
    assert cfg.port == 9003  # flag beats env beats file
    assert cfg.dtype == "f32"  # env beats default
    assert cfg.model == "synthetic" and cfg.max_sessions == 3  # file beats default
    assert cfg.host == "0.0.0.0"  # a flag left unset does not override


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "bad.toml"
    cfg_file.write_text("prot = 8000\n")
    with pytest.raises(UserError, match=r"unknown setting 'prot' in .*bad\.toml"):
        load_config(cfg_file, env={})


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('port = "eighty"\n', r"'port' in .*c\.toml must be int"),
        ("max_sessions = 0\n", r"'max_sessions' .* between 1 and 256"),
        ('dtype = "fp16"\n', r"'dtype' .* one of auto, bf16, f32"),
        ("temperature = true\n", r"'temperature' .* must be float"),
        ("port = [\n", r"not valid TOML"),
    ],
)
def test_wrong_values_in_file(tmp_path: Path, text: str, pattern: str) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(text)
    with pytest.raises(UserError, match=pattern):
        load_config(cfg_file, env={})


def test_env_errors_name_the_variable() -> None:
    with pytest.raises(UserError, match="environment variable PINGUIN_PORT must be int"):
        load_config(None, env={"PINGUIN_PORT": "x"})
    with pytest.raises(UserError, match="unknown environment variable PINGUIN_PROT"):
        load_config(None, env={"PINGUIN_PROT": "1"})


def test_cli_reports_config_error_in_one_line(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("colour = 1\n")
    assert main(["serve", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown setting 'colour'" in err and "Traceback" not in err


def test_old_configs_with_removed_encoder_settings_keep_starting(tmp_path: Path) -> None:
    cfg_file = tmp_path / "old.toml"
    cfg_file.write_text('encoder = "rustymimi"\nencoder_threads = 4\nport = 9001\n')
    cfg = load_config(cfg_file, env={"PINGUIN_ENCODER": "whatever"}, overrides={"encoder_threads": "x"})
    assert cfg.port == 9001
    assert cfg.deprecated == (f"encoder ({cfg_file})", f"encoder_threads ({cfg_file})",
                              "encoder (environment variable PINGUIN_ENCODER)",
                              "encoder_threads (command-line flag --encoder-threads)")


def test_new_settings_are_checked(tmp_path: Path) -> None:
    cfg = load_config(None, env={"PINGUIN_WYOMING_ALLOW": "192.168.1.20, 10.0.0.0/24",
                                 "PINGUIN_ALLOWED_ORIGINS": "https://example.com,*",
                                 "PINGUIN_IDLE_TIMEOUT": "2", "PINGUIN_MAX_UPLOAD_SECONDS": "60"})
    assert cfg.wyoming_allow == ("192.168.1.20", "10.0.0.0/24")
    assert cfg.allowed_origins == ("https://example.com", "*")
    assert (cfg.idle_timeout, cfg.max_upload_seconds) == (2.0, 60.0)
    with pytest.raises(UserError, match="'wyoming_allow'.*'home-assistant.local' is not an IP"):
        load_config(None, env={"PINGUIN_WYOMING_ALLOW": "home-assistant.local"})
    with pytest.raises(UserError, match="'allowed_origins'.*not a web origin"):
        load_config(None, env={"PINGUIN_ALLOWED_ORIGINS": "example.com/page"})
    with pytest.raises(UserError, match="'max_connections'.*at least 16"):
        load_config(None, env={"PINGUIN_MAX_CONNECTIONS": "3"})


def test_dtype_auto_is_f32_on_a_cpu_and_bf16_on_a_gpu() -> None:
    from pinguin_daemon.config import resolve_dtype

    assert Config().dtype == "auto"
    assert [resolve_dtype("auto", d) for d in ("cpu", "metal", "cuda")] == ["f32", "bf16", "bf16"]
    assert resolve_dtype("bf16", "cpu") == "bf16" and resolve_dtype("f32", "metal") == "f32"
