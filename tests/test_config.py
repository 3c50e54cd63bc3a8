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
        ('dtype = "fp16"\n', r"'dtype' .* one of bf16, f32"),
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
