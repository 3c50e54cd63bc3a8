"""Where a checkpoint's files are: a Hugging Face repo (downloaded), a local directory, or synthetic.

Resolving reads `config.json`, finds the files it names (`moshi_name`, default
`model.safetensors`; `tokenizer_name`; `mimi_name`) and checks each one is there and readable,
so that a broken checkpoint is reported in one sentence before anything is loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import UserError

# Keys of config.json the loader and the engine need.
REQUIRED_KEYS = (
    "dim", "num_heads", "num_layers", "context", "max_period", "n_q", "card", "text_card",
    "delays", "causal", "layer_scale", "positional_embedding", "depformer_dim",
    "depformer_num_heads", "depformer_num_layers", "depformer_dim_feedforward",
    "depformer_pos_emb", "dep_q", "tokenizer_name", "mimi_name",
)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# (bits, group_size) of Kyutai's pre-quantized MLX files, as their own scripts quantize them.
QUANT_PARAMS = {"q4": (4, 32), "q8": (8, 64)}
# How long the hub may take to answer one request before it counts as unreachable. Without this
# check huggingface_hub retries a dead network five times (~23 s per file) before failing; with
# it, an offline first start says so in one line within a few seconds.
HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True, slots=True)
class CheckpointFiles:
    """The resolved files of one checkpoint."""

    source: str  # what the user asked for: repo id, directory or "synthetic"
    config_path: Path  # config.json
    config: dict[str, Any]  # its parsed content
    weights_path: Path  # LM weights (MLX or PyTorch names; maybe pre-quantized)
    weights_quantized: str  # "none", "q4" or "q8": how the weights file is quantized
    tokenizer_path: Path  # SentencePiece model
    mimi_path: Path  # Mimi codec checkpoint (PyTorch names, loaded by rustymimi)

    @property
    def asr_delay_seconds(self) -> float:
        """The model's text delay behind the audio (`stt_config.audio_delay_seconds`)."""
        stt = self.config.get("stt_config") or {}
        return float(stt.get("audio_delay_seconds", 0.5))

    @property
    def synthetic(self) -> bool:
        return bool(self.config.get("synthetic", False))


def default_cache_root() -> Path:
    """Where generated data (the synthetic checkpoint) lives: $PINGUIN_CACHE_DIR or XDG cache."""
    explicit = os.environ.get("PINGUIN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pinguin-daemon"


def read_config(path: Path) -> dict[str, Any]:
    """Parse and check a checkpoint's config.json."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: a checkpoint directory needs a config.json "
                        "(download it with `pinguin-daemon download`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); re-download the checkpoint") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object; re-download the checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise UserError(f"{path} lacks the key(s) {', '.join(missing)} needed to build the model; "
                        "is this a Kyutai STT checkpoint?")
    return data


def check_safetensors(path: Path, what: str) -> list[str]:
    """Check that `path` is a complete safetensors file and return its tensor names.

    Args:
        path: the file.
        what: what it is for the message ("LM weights", "Mimi codec").
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise UserError(f"{what} file {path} is missing; re-download the checkpoint "
                        "with `pinguin-daemon download` or fix the name in config.json")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            names = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{what} file {path} is not a valid safetensors file ({exc}); "
                        "delete it and download it again") from None
    return names


def _weights_name(config: dict[str, Any], quantization: str, available: set[str] | None) -> str:
    """The LM weights file to use: `moshi_name`, or its .q4/.q8 variant when asked and present."""
    name = str(config.get("moshi_name", "model.safetensors"))
    if quantization in QUANT_PARAMS and name.endswith(".safetensors") and ".q" not in name:
        variant = name.removesuffix(".safetensors") + f".{quantization}.safetensors"
        if available is None or variant in available:
            return variant
    return name


def _quantized_from_name(name: str) -> str:
    for q in QUANT_PARAMS:
        if name.endswith(f".{q}.safetensors"):
            return q
    return "none"


def files_in_directory(directory: Path, quantization: str, source: str | None = None) -> CheckpointFiles:
    """Resolve the files of a local checkpoint directory.

    Args:
        directory: holds config.json and the files it names.
        quantization: "none", "q4" or "q8"; picks model.qN.safetensors when present.
        source: what the user asked for, for messages (defaults to the directory).
    """
    if not directory.is_dir():
        raise UserError(f"model directory {directory} does not exist")
    config_path = directory / "config.json"
    config = read_config(config_path)
    present = {p.name for p in directory.iterdir()}
    weights_name = _weights_name(config, quantization, present)
    files = CheckpointFiles(
        source=source or str(directory),
        config_path=config_path,
        config=config,
        weights_path=directory / weights_name,
        weights_quantized=_quantized_from_name(weights_name),
        tokenizer_path=directory / str(config["tokenizer_name"]),
        mimi_path=directory / str(config["mimi_name"]),
    )
    check_safetensors(files.weights_path, "LM weights")
    check_safetensors(files.mimi_path, "Mimi codec")
    if not files.tokenizer_path.is_file():
        raise UserError(f"tokenizer file {files.tokenizer_path} (tokenizer_name in {config_path}) "
                        "is missing; re-download the checkpoint with `pinguin-daemon download`")
    return files


def _hub_error(repo: str, filename: str, exc: Exception, unreachable: str = "") -> UserError:
    """One sentence for a failed download: what is wrong and what to do.

    Args:
        repo: the repo id.
        filename: the file that failed.
        exc: huggingface_hub's (or the OS's) exception.
        unreachable: why the hub did not answer, when a probe found out (see
            `hub_unreachable_reason`).
    """
    from huggingface_hub import constants, errors

    # LocalEntryNotFoundError subclasses EntryNotFoundError: test it first.
    if isinstance(exc, errors.RepositoryNotFoundError):
        return UserError(f"Hugging Face repo '{repo}' (setting 'model') does not exist or is "
                         "private; check the name, or log in with `huggingface-cli login`")
    if isinstance(exc, errors.LocalEntryNotFoundError):
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else "the Hugging Face hub cannot be reached" + (f" ({unreachable})" if unreachable else ""))
        return UserError(
            f"cannot download '{filename}' of '{repo}': {why} and it is not in the cache "
            f"({_hf_cache_dir()}); connect this machine to the internet once and run "
            f"`pinguin-daemon download {repo}`, or set 'model' to a local directory"
        )
    if isinstance(exc, errors.EntryNotFoundError | errors.RevisionNotFoundError):
        return UserError(f"Hugging Face repo '{repo}' has no file '{filename}'; is it a Kyutai "
                         "STT checkpoint?")
    return UserError(f"downloading '{filename}' of '{repo}' failed: {exc}")


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _os_reason(exc: BaseException) -> str:
    """The OS's words for a failed connection ("Connection refused"), not requests' nested repr."""
    found = re.search(r"\[Errno -?\d+\] ([^'\"()\]]+)", str(exc))
    return found.group(1).strip() if found else type(exc).__name__


def hub_unreachable_reason(url: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Ask the hub once, with no retry: None when it answers, else why it cannot be reached.

    Any HTTP answer counts, even an error status: the point is only to tell "no network" apart
    before huggingface_hub's retries. The request goes through huggingface_hub's own session, so
    proxies and custom HTTP backends apply as for the download itself. It runs in a helper
    thread so that a name lookup that hangs (a network without DNS) is bounded too.

    Args:
        url: a URL on the hub (`HF_ENDPOINT`, default https://huggingface.co), such as the
            first file to download.
        timeout: seconds to wait for an answer.
    """
    import requests
    from huggingface_hub.utils import get_session

    parts = urlsplit(url)
    host = f"{parts.scheme}://{parts.netloc}"
    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            get_session().head(url, timeout=timeout, allow_redirects=False).close()
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - any failure to get an answer is the answer
            outcome.append(exc)

    thread = threading.Thread(target=ask, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if not outcome or isinstance(outcome[0], requests.Timeout):
        return f"no answer from {host} within {timeout:g} s"
    return None if outcome[0] is None else f"{host}: {_os_reason(outcome[0])}"


def download_repo(repo: str, quantization: str = "none", cache_first: bool = False) -> CheckpointFiles:
    """Fetch (or find in the Hugging Face cache) the files of a checkpoint repo.

    Only config.json and the files it names are fetched; `HF_HOME`, `HF_HUB_CACHE` and
    `HF_HUB_OFFLINE` are honoured as by every Hugging Face tool. Progress bars show on a terminal.

    Args:
        repo: a repo id such as "kyutai/stt-1b-en_fr-mlx".
        quantization: "none", "q4" or "q8"; fetches model.qN.safetensors when the repo has it.
        cache_first: use the cached files without asking the hub (the daemon's start: a Mac
            that boots without a network serves at once; huggingface_hub >= 0.31 retries an
            unreachable hub for ~23 s per file before falling back to its cache). `pinguin-daemon
            download` asks the hub, to update.
    """
    from huggingface_hub import constants, errors, hf_hub_download, hf_hub_url

    # Empty until the hub is first needed; then "" when it answered, or why it did not (asked
    # once per checkout: a dead network is not probed again for every file).
    probe: list[str] = []

    def get(filename: str) -> Path:
        if cache_first:
            try:
                return Path(hf_hub_download(repo, filename, local_files_only=True))
            except errors.LocalEntryNotFoundError:
                pass
        # With HF_HUB_OFFLINE huggingface_hub answers from its cache at once: nothing to probe.
        if not constants.HF_HUB_OFFLINE:
            if not probe:
                probe.append(hub_unreachable_reason(hf_hub_url(repo, filename)) or "")
            if probe[0]:
                if not cache_first:  # as huggingface_hub does offline: a cached copy still serves
                    with contextlib.suppress(errors.LocalEntryNotFoundError):
                        return Path(hf_hub_download(repo, filename, local_files_only=True))
                # What huggingface_hub itself raises offline, after its retries: the callers
                # below treat both alike (a missing pre-quantized file falls back to the cache).
                raise errors.LocalEntryNotFoundError(f"the hub cannot be reached: {probe[0]}")
        return Path(hf_hub_download(repo, filename))

    def fetch(filename: str) -> Path:
        try:
            return get(filename)
        except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, OSError,
                errors.HFValidationError) as exc:
            raise _hub_error(repo, filename, exc, probe[0] if probe else "") from None

    config_path = fetch("config.json")
    config = read_config(config_path)
    weights_name = _weights_name(config, "none", None)
    if quantization in QUANT_PARAMS:
        try:
            variant = _weights_name(config, quantization, None)
            weights_path = get(variant)
            weights_name = variant
        except errors.EntryNotFoundError:
            # No pre-quantized file (or, offline, none cached; LocalEntryNotFoundError is a
            # subclass): the full weights are fetched and quantized in memory.
            weights_path = fetch(weights_name)
        except (errors.HfHubHTTPError, OSError) as exc:
            raise _hub_error(repo, variant, exc, probe[0] if probe else "") from None
    else:
        weights_path = fetch(weights_name)
    files = CheckpointFiles(
        source=repo,
        config_path=config_path,
        config=config,
        weights_path=weights_path,
        weights_quantized=_quantized_from_name(weights_name),
        tokenizer_path=fetch(str(config["tokenizer_name"])),
        mimi_path=fetch(str(config["mimi_name"])),
    )
    check_safetensors(files.weights_path, "LM weights")
    check_safetensors(files.mimi_path, "Mimi codec")
    return files


def resolve(model: str, quantization: str = "none", cache_root: Path | None = None) -> CheckpointFiles:
    """Resolve the `model` setting to checkpoint files, downloading them if needed.

    Args:
        model: "synthetic", a local directory, or a Hugging Face repo id.
        quantization: "none", "q4" or "q8".
        cache_root: where the synthetic checkpoint is generated (default: default_cache_root()).
    """
    if model == "synthetic":
        from .synthetic import cached_synthetic_checkpoint

        directory = cached_synthetic_checkpoint(cache_root or default_cache_root())
        return files_in_directory(directory, quantization, source="synthetic")
    path = Path(model).expanduser()
    if path.is_dir():
        return files_in_directory(path, quantization)
    if model.startswith((".", "/", "~")) or not REPO_ID.match(model):
        raise UserError(f"setting 'model' is '{model}': not an existing directory, not a Hugging "
                        "Face repo id (owner/name), and not 'synthetic'")
    return download_repo(model, quantization, cache_first=True)
