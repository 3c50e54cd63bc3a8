"""A synthetic checkpoint: tiny config, seeded random weights, in the published file formats.

The directory it writes looks exactly like `kyutai/stt-1b-en_fr-mlx` (or, with
`layout="candle"`, like `kyutai/stt-1b-en_fr-candle`): a `config.json` in Kyutai's format, LM
weights (MLX names, or PyTorch names), a SentencePiece tokenizer with Kyutai's special ids and a
Mimi checkpoint with the PyTorch names rustymimi 0.4.1 loads. Every line of the loading and
serving code runs on it.

It is *informative*: a naively random Mimi maps every frame to the same codes, and a naively
random LM ignores its input and never emits the word-boundary (0) or padding (3) tokens. Here the
conv/linear weights are drawn with std 1/sqrt(fan_in), the codebooks are filled, and the LM gets a bias
towards tokens 0 and 3, so codes follow the audio, greedy tokens follow
the codes, and words with timestamps form. Tests measure all three.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

# Bump when the generator changes, so cached checkpoints are regenerated.
GENERATOR_VERSION = 5

MIMI_NAME = "mimi-pytorch-e351c8d8@125.safetensors"
TOKENIZER_NAME = "tokenizer_en_fr_audio_8000.model"
TEXT_CARD = 8000

# text_linear has no bias, so the synthetic model gets one: channel 0 of every audio embedding is
# a constant, which survives out_norm as a large steady component of the hidden state; the rows
# of the padding (3) and word-boundary (0) tokens weigh that channel. Tuned so that greedy decoding
# of varied audio gives about half padding and words of a few tokens.
PAD_BIAS = 0.75
WORD_BOUNDARY_BIAS = 0.62


def tiny_lm_config(context: int = 750, dim: int = 256, num_layers: int = 2,
                   num_heads: int = 4) -> dict[str, object]:
    """The tiny STT config (22 M parameters, most of them embeddings) in Kyutai's format.

    Args:
        context: attention window in steps; tests make it small so streams wrap cheaply.
        dim, num_layers, num_heads: the transformer's shape (the benchmark also uses a larger one).
    """
    return {
        "dim": dim, "num_heads": num_heads, "num_layers": num_layers, "hidden_scale": 4.125,
        "context": context, "max_period": 100000.0, "n_q": 32, "card": 2048,
        "text_card": TEXT_CARD, "existing_text_padding_id": 3, "causal": True,
        "layer_scale": None, "gating": "silu", "norm": "rms_norm_f32",
        "positional_embedding": "rope", "depformer_dim": 256, "depformer_num_heads": 4,
        "depformer_num_layers": 1, "depformer_dim_feedforward": 1024,
        "depformer_multi_linear": True, "depformer_pos_emb": "none",
        "depformer_weights_per_step": True, "dep_q": 0, "delays": [0] * 33,
        "extra_heads_num_heads": 4, "extra_heads_dim": 6,
        # File names and STT settings, as in Kyutai's published config.json.
        "model_type": "stt",
        "moshi_name": "model.safetensors",
        "mimi_name": MIMI_NAME,
        "tokenizer_name": TOKENIZER_NAME,
        "stt_config": {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0},
        "synthetic": True,
    }


def _lm_weights(config: dict[str, object], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random MLX-named LM weights, as float32 numpy arrays."""
    from moshi_mlx import models

    from .loader import parameter_items

    lm = models.Lm(models.LmConfig.from_config_dict(config))
    out: dict[str, np.ndarray] = {}
    for name, value in sorted(parameter_items(lm), key=lambda kv: kv[0]):
        shape = tuple(value.shape)
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "out_norm.weight":
            arr = np.ones(shape, np.float32)
        elif "emb" in name:
            arr = rng.standard_normal(shape, dtype=np.float32)
        else:
            arr = rng.standard_normal(shape, dtype=np.float32) / math.sqrt(shape[-1])
        out[name] = arr
    for name, arr in out.items():
        if name.startswith("audio_embs."):
            arr[:, 0] = 1.0
    out["text_linear.weight"][3, 0] = PAD_BIAS
    out["text_linear.weight"][0, 0] = WORD_BOUNDARY_BIAS
    return out


def lm_weights_to_pytorch(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename MLX LM weights to the PyTorch names of Kyutai's `-candle` checkpoints.

    The inverse of `moshi_mlx.models.Lm.load_pytorch_weights` for a model without depformer.
    """
    out: dict[str, np.ndarray] = {}
    for name, arr in weights.items():
        if name == "out_norm.weight":
            out["out_norm.alpha"] = arr[None, None]
        elif name.startswith("audio_embs."):
            out["emb." + name.split(".", 1)[1]] = arr
        elif name.startswith("transformer."):
            if name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                out[name.replace(".weight", ".alpha")] = arr[None, None]
            else:
                out[name.replace(".in_proj.weight", ".in_proj_weight")] = arr
        else:  # text_emb, text_linear, extra_heads keep their names
            out[name] = arr
    return out


_ENCODER_RESIDUALS = (1, 4, 7, 10)
_DECODER_UPSAMPLES = (2, 5, 8, 11)


def _mimi_torch_name(name: str) -> str:
    """MLX Mimi parameter name -> the PyTorch name in Kyutai's Mimi checkpoint."""
    name = name.replace(".block.1.", ".block.3.").replace(".block.0.", ".block.1.")
    for i, idx in enumerate(_ENCODER_RESIDUALS):
        name = name.replace(f"encoder.layers.{i}.residuals.0.", f"encoder.model.{idx}.")
        name = name.replace(f"encoder.layers.{i}.downsample.", f"encoder.model.{idx + 2}.")
    for i, idx in enumerate(_DECODER_UPSAMPLES):
        name = name.replace(f"decoder.layers.{i}.upsample.", f"decoder.model.{idx}.")
        name = name.replace(f"decoder.layers.{i}.residuals.0.", f"decoder.model.{idx + 1}.")
    for part in ("encoder", "decoder"):
        name = name.replace(f"{part}.init_conv1d.", f"{part}.model.0.")
        name = name.replace(f"{part}.final_conv1d.", f"{part}.model.14.")
    name = name.replace(".gating.linear1.", ".linear1.").replace(".gating.linear2.", ".linear2.")
    name = name.replace(".self_attn.in_proj.weight", ".self_attn.in_proj_weight")
    name = name.replace(".codebook.", "._codebook.")
    return name.replace("._codebook.initialized", "._codebook._initialized")


def _mimi_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random Mimi weights in PyTorch naming and layout (318 tensors, 96 M parameters)."""
    from moshi_mlx.models import mimi

    from .loader import parameter_items

    model = mimi.Mimi(mimi.mimi_202407(32))
    out: dict[str, np.ndarray] = {}
    for name, value in sorted(parameter_items(model), key=lambda kv: kv[0]):
        shape = tuple(value.shape)
        if name.endswith(".convtr.weight"):
            # MLX (out, k, in) <- PyTorch transposed conv (in, out, k)
            torch_shape: tuple[int, ...] = (shape[2], shape[0], shape[1])
        elif len(shape) == 3:
            # MLX conv (out, k, in) <- PyTorch conv (out, in, k)
            torch_shape = (shape[0], shape[2], shape[1])
        else:
            torch_shape = shape
        leaf = name.rsplit(".", 1)[1]
        if leaf == "initialized":
            arr = np.ones(torch_shape, np.float32)
        elif leaf == "cluster_usage":
            arr = np.ones(torch_shape, np.float32)
        elif leaf == "embedding_sum":
            # Rows of equal norm: the nearest code is then picked by direction alone, so every
            # codebook (not just the later residual ones) follows the audio.
            arr = rng.standard_normal(torch_shape, dtype=np.float32)
            arr /= np.linalg.norm(arr, axis=1, keepdims=True)
        elif leaf == "bias" and ("norm" in name):
            arr = np.zeros(torch_shape, np.float32)
        elif leaf == "weight" and "norm" in name:
            arr = np.ones(torch_shape, np.float32)
        elif leaf == "scale":  # transformer layer scale
            arr = np.full(torch_shape, 0.1, np.float32)
        elif leaf == "bias":
            arr = np.zeros(torch_shape, np.float32)
        else:
            fan_in = math.prod(shape[1:])
            arr = rng.standard_normal(torch_shape, dtype=np.float32) / math.sqrt(fan_in)
        out[_mimi_torch_name(name)] = arr
    return out


def _tokenizer_proto(rng: np.random.Generator) -> bytes:
    """A SentencePiece model of exactly TEXT_CARD pieces with Kyutai's special ids.

    0 = <unk> (the model's word boundary), 1 = <s>, 2 = </s>, 3 = <pad> (the model's padding).
    Trained on a corpus of pseudo-words, so pieces are sub-words as in the real tokenizer.
    """
    import sentencepiece as spm

    base = [c + v for c in "bcdfghjklmnprstvz" for v in "aeiou"]
    syllables = np.array(base + [s + "n" for s in base])
    words: set[str] = set()
    while len(words) < 20000:
        words.add("".join(rng.choice(syllables, int(rng.integers(1, 4)))))
    vocab = np.array(sorted(words))  # an array: rng.choice on a list converts it every call
    lines = [" ".join(row) for row in rng.choice(vocab, (20000, 12))]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=TEXT_CARD, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, character_coverage=1.0, num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def write_synthetic_checkpoint(
    out_dir: Path, *, context: int = 750, seed: int = 0, layout: str = "mlx",
    dim: int = 256, num_layers: int = 2, num_heads: int = 4,
) -> Path:
    """Write a synthetic checkpoint directory and return it.

    Args:
        out_dir: target directory (created; existing files are overwritten).
        context: attention window of the LM in steps.
        seed: the random seed; the same seed gives the same files.
        layout: "mlx" (MLX-named `model.safetensors` plus `model.q8`/`model.q4` variants, as in
            `kyutai/stt-1b-en_fr-mlx`) or "candle" (PyTorch-named `model.safetensors`, as in
            `kyutai/stt-1b-en_fr-candle`). Both hold the same weights for the same seed, but
            for the end-of-turn heads, which only the candle layout has (as published).
        dim, num_layers, num_heads: transformer shape (default: the tiny config).
    """
    import mlx.core as mx
    import mlx.nn as nn
    from moshi_mlx import models
    from safetensors.numpy import save_file

    from .loader import lm_config_for, parameter_items

    if layout not in ("mlx", "candle"):
        raise ValueError(f"layout must be 'mlx' or 'candle', got {layout!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_lm_config(context, dim, num_layers, num_heads)
    rng = np.random.default_rng(seed)
    weights = _lm_weights(config, np.random.default_rng([seed, 1]))
    if layout == "candle":
        save_file(lm_weights_to_pytorch(weights), str(out_dir / "model.safetensors"))
    else:
        # Like the published -mlx checkpoint: no end-of-turn heads (only -candle carries them).
        mlx_weights = {k: mx.array(v).astype(mx.bfloat16) for k, v in weights.items()
                       if not k.startswith("extra_heads.")}
        mx.save_safetensors(str(out_dir / "model.safetensors"), mlx_weights)
        for bits, group in ((8, 64), (4, 32)):
            lm = models.Lm(lm_config_for(config, list(mlx_weights)))
            lm.set_dtype(mx.bfloat16)
            lm.load_weights(list(mlx_weights.items()), strict=True)
            nn.quantize(lm, bits=bits, group_size=group)
            mx.save_safetensors(str(out_dir / f"model.q{bits}.safetensors"),
                                dict(parameter_items(lm)))
    save_file(_mimi_weights(np.random.default_rng([seed, 2])), str(out_dir / MIMI_NAME))
    (out_dir / TOKENIZER_NAME).write_bytes(_tokenizer_proto(rng))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def cached_synthetic_checkpoint(
    cache_root: Path, *, context: int = 750, seed: int = 0, layout: str = "mlx",
    dim: int = 256, num_layers: int = 2, num_heads: int = 4,
) -> Path:
    """The synthetic checkpoint for these parameters, generated once under `cache_root`.

    A `complete` marker is written last, so an interrupted generation is redone.
    """
    shape = "" if (dim, num_layers, num_heads) == (256, 2, 4) else f"-d{dim}l{num_layers}h{num_heads}"
    target = cache_root / f"synthetic-v{GENERATOR_VERSION}-{layout}-ctx{context}-seed{seed}{shape}"
    marker = target / ".complete"
    if not marker.exists():
        write_synthetic_checkpoint(target, context=context, seed=seed, layout=layout, dim=dim,
                                   num_layers=num_layers, num_heads=num_heads)
        marker.write_text("ok\n")
    return target
