"""Build the MLX `Lm`, the SentencePiece tokenizer and the rustymimi tokenizer factory.

Call `load_model` on the thread that will run every MLX step (the engine thread).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .store import QUANT_PARAMS, CheckpointFiles, check_safetensors

if TYPE_CHECKING:
    import mlx.core as mx
    import rustymimi
    import sentencepiece
    from moshi_mlx import models

FRAME_RATE = 12.5  # Mimi frames (LM steps) per second
FRAME_SAMPLES = 1920  # samples per frame at 24 kHz (80 ms)
SAMPLE_RATE = 24000


def mx_dtype(name: str) -> mx.Dtype:
    """MLX dtype for the `dtype` setting."""
    import mlx.core as mx

    return {"bf16": mx.bfloat16, "f32": mx.float32}[name]


@dataclass(slots=True)
class LoadedModel:
    """A ready-to-step checkpoint. Owned by the engine thread."""

    files: CheckpointFiles  # where it came from
    lm: models.Lm  # the language model, weights loaded (maybe quantized)
    lm_config: models.LmConfig  # its parsed config
    text_tokenizer: sentencepiece.SentencePieceProcessor  # token id -> piece
    dtype: str  # "bf16" or "f32"
    quantization: str  # "none", "q4" or "q8" as actually applied
    pytorch_names: bool  # the weights came in PyTorch (-candle) naming

    @property
    def asr_delay_steps(self) -> int:
        """Steps the text lags the audio (6 for Kyutai STT 1B: 0.5 s at 12.5 Hz)."""
        return round(self.files.asr_delay_seconds * FRAME_RATE)

    @property
    def num_codebooks(self) -> int:
        """Audio codebooks the LM reads per frame (32)."""
        return int(self.lm_config.audio_codebooks)

    @property
    def vad_heads(self) -> int:
        """Number of end-of-turn heads (0 when the checkpoint has none)."""
        return int(self.lm_config.extra_heads_num_heads)

    @property
    def context(self) -> int:
        return int(self.lm_config.transformer.context)

    def make_audio_tokenizer(self) -> rustymimi.Tokenizer:
        """A fresh streaming Mimi encoder (each holds its own weights: ~450 MB)."""
        import rustymimi

        return rustymimi.Tokenizer(str(self.files.mimi_path), num_codebooks=self.num_codebooks)

    def parameter_count(self) -> int:
        return sum(int(v.size) for _, v in parameter_items(self.lm))


def parameter_items(module: Any) -> list[tuple[str, Any]]:
    """(dotted name, array) of every parameter of an MLX module."""
    from mlx.utils import tree_flatten

    flat = tree_flatten(module.parameters())
    assert isinstance(flat, list)  # a module's parameters flatten to a list of pairs
    return flat


def lm_config_for(config: dict[str, Any], weight_names: list[str]) -> models.LmConfig:
    """The `LmConfig` of a checkpoint; extra heads only when the weights carry them."""
    from moshi_mlx import models

    data = copy.deepcopy(config)
    if not any(n.startswith("extra_heads.") for n in weight_names):
        data["extra_heads_num_heads"] = 0
    try:
        return models.LmConfig.from_config_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"config.json is not a usable Kyutai LM config ({exc!r})") from None


def load_model(files: CheckpointFiles, dtype: str = "bf16", quantization: str = "none") -> LoadedModel:
    """Load a checkpoint into MLX.

    Args:
        files: resolved checkpoint files (see `store.resolve`).
        dtype: "bf16" or "f32".
        quantization: "none", "q4" or "q8". A pre-quantized weights file is loaded as is;
            otherwise full-precision weights are quantized in memory after loading.
    """
    import mlx.core as mx
    import mlx.nn as nn
    import sentencepiece
    from moshi_mlx import models

    names = check_safetensors(files.weights_path, "LM weights")
    pytorch_names = "out_norm.alpha" in names
    lm_config = lm_config_for(files.config, names)
    lm = models.Lm(lm_config)
    lm.set_dtype(mx_dtype(dtype))
    try:
        if files.weights_quantized != "none":
            bits, group = QUANT_PARAMS[files.weights_quantized]
            nn.quantize(lm, bits=bits, group_size=group)
            lm.load_weights(str(files.weights_path), strict=True)
        elif pytorch_names:
            lm.load_pytorch_weights(str(files.weights_path), lm_config, strict=True)
        else:
            lm.load_weights(str(files.weights_path), strict=True)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"LM weights file {files.weights_path} does not match "
                        f"{files.config_path}: {exc}") from None
    # Loading keeps the file's dtype; cast floating weights (not quantized ints) to the compute dtype.
    lm.set_dtype(mx_dtype(dtype))
    applied = files.weights_quantized
    if quantization != "none" and applied == "none":
        bits, group = QUANT_PARAMS[quantization]
        nn.quantize(lm, bits=bits, group_size=group)
        applied = quantization
    mx.eval(lm.parameters())
    try:
        tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(files.tokenizer_path))
    except (OSError, RuntimeError) as exc:
        raise UserError(f"tokenizer file {files.tokenizer_path} is not a SentencePiece model "
                        f"({exc}); re-download the checkpoint") from None
    if tokenizer.vocab_size() < lm_config.text_out_vocab_size:
        raise UserError(f"tokenizer {files.tokenizer_path} has {tokenizer.vocab_size()} pieces but "
                        f"config.json says text_card={lm_config.text_out_vocab_size}")
    return LoadedModel(files=files, lm=lm, lm_config=lm_config, text_tokenizer=tokenizer,
                       dtype=dtype, quantization=applied, pytorch_names=pytorch_names)
