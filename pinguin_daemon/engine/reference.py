"""Kyutai's reference path, run alone: a fresh `Lm`, `LmGen` at batch 1, greedy.

The correctness oracle of the engine (tests) and the one-after-another baseline (bench).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from moshi_mlx import models, utils

from ..model.loader import LoadedModel, load_model


@dataclass(frozen=True, slots=True)
class ReferenceRun:
    """Greedy tokens and VAD probabilities of one stream."""

    tokens: list[int]
    vad: list[tuple[float, ...]]  # per step, P(end of turn) per head; empty tuples without heads


def fresh_reference_model(model: LoadedModel, max_seq_len: int = 4096) -> LoadedModel:
    """A second copy of the checkpoint with its own `Lm` (own KV cache).

    Args:
        model: the checkpoint to copy (same files, dtype, quantization).
        max_seq_len: the reference cache size. moshi_mlx defaults to 4096 and degrades after
            that many steps, so a reference for longer streams needs more.
    """
    ref = load_model(model.files, model.dtype, model.quantization)
    if max_seq_len != ref.lm_config.transformer.max_seq_len:
        ref.lm_config.transformer.max_seq_len = max_seq_len
        ref.lm.transformer_cache = ref.lm.transformer.make_rot_cache()
    return ref


def reference_run(model: LoadedModel, codes: np.ndarray) -> ReferenceRun:
    """Run one stream alone through `LmGen`, greedy, from a clean cache.

    Args:
        model: a model used by nothing else (see fresh_reference_model).
        codes: (T, n_q) audio codes, one row per frame.
    """
    for cache in model.lm.transformer_cache:
        cache.reset()
    gen = models.LmGen(model.lm, max_steps=len(codes), text_sampler=utils.Sampler(temp=0),
                       audio_sampler=utils.Sampler(temp=0))
    tokens: list[int] = []
    vad: list[tuple[float, ...]] = []
    for frame in codes:
        audio = mx.array(frame[None].astype(np.int32))
        if model.lm.extra_heads:
            token, heads = gen.step_with_extra_heads(audio)
            mx.eval(token, heads)
            vad.append(tuple(float(h[0, 0, 0]) for h in heads))
        else:
            token, _ = gen.step(audio)  # (text tokens, transformer output)
            mx.eval(token)
            vad.append(())
        tokens.append(int(np.array(token).reshape(-1)[0]))
    return ReferenceRun(tokens, vad)
