"""Model store and loader on the synthetic checkpoint: every weight variant, every error."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from moshi_mlx import models, utils

from pinguin_daemon.errors import UserError
from pinguin_daemon.model import loader, store

from .helpers import fake_hub

CODES = np.random.default_rng(7).integers(0, 2048, (24, 32))


def greedy_tokens(model: loader.LoadedModel) -> list[int]:
    """Kyutai's reference path (LmGen, greedy) on fixed audio codes."""
    gen = models.LmGen(model.lm, max_steps=len(CODES), text_sampler=utils.Sampler(temp=0),
                       audio_sampler=utils.Sampler(temp=0))
    return [int(gen.step(mx.array(c[None]).astype(mx.int32))[0].item()) for c in CODES]


def test_mlx_and_candle_layouts_give_identical_tokens(synthetic_dir: Path,
                                                      synthetic_candle_dir: Path) -> None:
    mlx_model = loader.load_model(store.files_in_directory(synthetic_dir, "none"), "f32")
    candle_model = loader.load_model(store.files_in_directory(synthetic_candle_dir, "none"), "f32")
    assert not mlx_model.pytorch_names and candle_model.pytorch_names
    assert candle_model.vad_heads == 4 and mlx_model.asr_delay_steps == 6
    assert greedy_tokens(mlx_model) == greedy_tokens(candle_model)


@pytest.mark.parametrize("quant", ["q8", "q4"])
def test_prequantized_files_load_and_step(synthetic_dir: Path, quant: str) -> None:
    files = store.files_in_directory(synthetic_dir, quant)
    assert files.weights_path.name == f"model.{quant}.safetensors"
    model = loader.load_model(files, "bf16", quant)
    assert model.quantization == quant
    reference = greedy_tokens(loader.load_model(store.files_in_directory(synthetic_dir, "none"), "f32"))
    tokens = greedy_tokens(model)
    # Quantized weights change a few argmaxes, not the behaviour.
    assert sum(a == b for a, b in zip(tokens, reference, strict=True)) >= len(reference) * 0.6


def test_quantizes_in_memory_when_no_file(synthetic_dir: Path, tmp_path: Path) -> None:
    for name in os.listdir(synthetic_dir):
        if ".q" not in name:
            os.symlink(synthetic_dir / name, tmp_path / name)
    files = store.files_in_directory(tmp_path, "q8")
    assert files.weights_quantized == "none" and files.weights_path.name == "model.safetensors"
    model = loader.load_model(files, "bf16", "q8")
    assert model.quantization == "q8"
    assert "QuantizedLinear" in type(model.lm.text_linear).__name__
    assert len(greedy_tokens(model)) == len(CODES)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.q4.*", "*.q8.*"))
    return dst


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "pinguin_daemon", *args], capture_output=True,
                          text=True, env=full_env, timeout=300)


def assert_one_sentence_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def test_check_model_reports_the_checkpoint(synthetic_dir: Path, synthetic_candle_dir: Path) -> None:
    proc = run_cli("check-model", str(synthetic_dir))
    assert proc.returncode == 0, proc.stderr
    assert "SYNTHETIC" in proc.stdout and "no VAD heads" in proc.stdout  # like the published -mlx
    assert "text delay 6 steps" in proc.stdout and "OK" in proc.stdout
    assert "dtype f32" in proc.stdout and "BLAS " in proc.stdout  # auto: f32 on a CPU
    candle = run_cli("check-model", str(synthetic_candle_dir))
    assert candle.returncode == 0 and "4 VAD heads" in candle.stdout, candle.stderr


def test_missing_tokenizer_is_named(synthetic_dir: Path, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(synthetic_dir, tmp_path / "ckpt")
    (ckpt / "tokenizer_en_fr_audio_8000.model").unlink()
    proc = run_cli("check-model", str(ckpt))
    assert_one_sentence_error(proc, "tokenizer_en_fr_audio_8000.model", "is missing",
                              "pinguin-daemon download")


def test_corrupt_safetensors_is_named(synthetic_dir: Path, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(synthetic_dir, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download
    proc = run_cli("check-model", str(ckpt))
    assert_one_sentence_error(proc, str(weights), "not a valid safetensors file", "download it again")


def test_config_without_needed_keys_is_named(synthetic_dir: Path, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(synthetic_dir, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    del config["mimi_name"], config["num_layers"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config\.json lacks the key\(s\) num_layers, mimi_name"):
        store.files_in_directory(ckpt, "none")


def test_weights_not_matching_config_is_named(synthetic_dir: Path, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(synthetic_dir, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["num_layers"] = 3
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"model\.safetensors does not match .*config\.json"):
        loader.load_model(store.files_in_directory(ckpt, "none"), "f32")


def test_download_from_hub_then_offline_from_cache(synthetic_dir: Path, tmp_path: Path) -> None:
    hub_root = tmp_path / "hub"
    copy_checkpoint(synthetic_dir, hub_root / "kyutai" / "stt-test")
    env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    with fake_hub(hub_root) as endpoint:
        proc = run_cli("download", "kyutai/stt-test", env={**env, "HF_ENDPOINT": endpoint})
        assert proc.returncode == 0, proc.stderr
        missing = run_cli("download", "kyutai/nope", env={**env, "HF_ENDPOINT": endpoint})
        assert_one_sentence_error(missing, "'kyutai/nope'", "does not exist")
    assert "ready in the Hugging Face cache" in proc.stdout
    cached = list((tmp_path / "hf-home" / "hub").glob("models--kyutai--stt-test/snapshots/*/*"))
    assert {p.name for p in cached} == {"config.json", "model.safetensors",
                                         "tokenizer_en_fr_audio_8000.model",
                                         "mimi-pytorch-e351c8d8@125.safetensors"}
    # The hub is gone: the daemon's first launch must find everything in the cache.
    proc = run_cli("check-model", "kyutai/stt-test", "--dtype", "f32",
                   env={**env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr


def test_no_network_gives_the_fix(tmp_path: Path) -> None:
    env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = run_cli("download", "kyutai/stt-1b-en_fr-mlx", env=env)
    assert_one_sentence_error(proc, "cannot download 'config.json'", "cannot be reached",
                              "pinguin-daemon download kyutai/stt-1b-en_fr-mlx")
    proc = run_cli("check-model", "kyutai/stt-1b-en_fr-mlx", env={**env, "HF_HUB_OFFLINE": "1"})
    assert_one_sentence_error(proc, "HF_HUB_OFFLINE is set")


def test_model_setting_that_is_nothing_known() -> None:
    with pytest.raises(UserError, match="not an existing directory, not a Hugging Face repo id"):
        store.resolve("./no/such/dir", "none")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_hub_probe_tells_a_dead_network_at_once(synthetic_dir: Path, tmp_path: Path) -> None:
    port = closed_port()
    assert store.hub_unreachable_reason(f"http://127.0.0.1:{port}/kyutai/x/resolve/main/config.json") == \
        f"http://127.0.0.1:{port}: Connection refused"
    # A hub that accepts the connection and never answers (a captive or dead link) is bounded by
    # the probe's timeout, not by huggingface_hub's retries.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        assert store.hub_unreachable_reason(endpoint, timeout=0.3) == \
            f"no answer from {endpoint} within 0.3 s"
    copy_checkpoint(synthetic_dir, tmp_path / "hub" / "kyutai" / "stt-test")
    with fake_hub(tmp_path / "hub") as endpoint:  # any HTTP answer: the hub is there
        assert store.hub_unreachable_reason(f"{endpoint}/kyutai/stt-test/resolve/main/config.json") is None
        assert store.hub_unreachable_reason(f"{endpoint}/kyutai/nope/resolve/main/config.json") is None


def test_a_cached_model_serves_without_the_hub(synthetic_dir: Path, tmp_path: Path) -> None:
    """Downloaded once; then the hub is gone (not HF_HUB_OFFLINE: the network is just down).
    The cache still serves, also for q8 with no pre-quantized file cached (the full weights are
    quantized in memory), and `download` says the files are ready instead of failing."""
    hub_root = tmp_path / "hub"
    copy_checkpoint(synthetic_dir, hub_root / "kyutai" / "stt-test")
    env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    with fake_hub(hub_root) as endpoint:
        assert run_cli("download", "kyutai/stt-test", env={**env, "HF_ENDPOINT": endpoint}).returncode == 0
    down = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    proc = run_cli("check-model", "kyutai/stt-test", "--quantization", "q8", "--dtype", "f32", env=down)
    assert proc.returncode == 0, proc.stderr
    assert "model.safetensors" in proc.stdout and "Retry" not in proc.stderr
    proc = run_cli("download", "kyutai/stt-test", env=down)
    assert proc.returncode == 0, proc.stderr
    assert "ready in the Hugging Face cache" in proc.stdout
