"""The synthetic checkpoint is informative: codes follow the audio, tokens follow the codes,
and words form. Every equivalence test built on it depends on this."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from moshi_mlx import models, utils

from pinguin_daemon.model import loader, store
from pinguin_daemon.model.synthetic import _lm_weights, tiny_lm_config

FRAME = loader.FRAME_SAMPLES


@pytest.fixture(scope="module")
def model(synthetic_dir: Path) -> loader.LoadedModel:
    return loader.load_model(store.files_in_directory(synthetic_dir, "none"), "f32")


def encode(model: loader.LoadedModel, pcm: np.ndarray) -> np.ndarray:
    tokenizer = model.make_audio_tokenizer()
    frames = len(pcm) // FRAME
    return np.stack([tokenizer.encode_step(pcm[None, None, i * FRAME:(i + 1) * FRAME])[0, :, 0]
                     for i in range(frames)])


def greedy(model: loader.LoadedModel, codes: np.ndarray) -> np.ndarray:
    gen = models.LmGen(model.lm, max_steps=len(codes), text_sampler=utils.Sampler(temp=0),
                       audio_sampler=utils.Sampler(temp=0))
    return np.array([int(gen.step(mx.array(c[None]).astype(mx.int32))[0].item()) for c in codes])


def test_weights_are_deterministic() -> None:
    cfg = tiny_lm_config(750)
    a = _lm_weights(cfg, np.random.default_rng([0, 1]))
    b = _lm_weights(cfg, np.random.default_rng([0, 1]))
    c = _lm_weights(cfg, np.random.default_rng([1, 1]))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["text_linear.weight"], c["text_linear.weight"])


def test_mimi_codes_vary_with_the_audio(model: loader.LoadedModel,
                                        speech_clips: list[np.ndarray]) -> None:
    codes = encode(model, speech_clips[0])
    distinct = [len(set(codes[:, k])) for k in range(codes.shape[1])]
    # A naive random Mimi gives one code per codebook whatever the audio.
    assert min(distinct) >= 3, distinct
    assert np.median(distinct) >= 10, distinct


def test_greedy_tokens_follow_the_audio_and_form_words(model: loader.LoadedModel,
                                                       speech_clips: list[np.ndarray]) -> None:
    tokens = [greedy(model, encode(model, clip)) for clip in speech_clips[:2]]
    steps = min(len(t) for t in tokens)
    differ = int((tokens[0][:steps] != tokens[1][:steps]).sum())
    assert differ >= steps // 3, f"only {differ} of {steps} tokens differ between two clips"
    for toks in tokens:
        pad, boundary = float((toks == 3).mean()), float((toks == 0).mean())
        assert 0.2 <= pad <= 0.8, pad
        assert boundary >= 0.05, boundary
        # A word is a run of text tokens closed by a 0 or 3.
        words = sum(1 for a, b in zip(toks[:-1], toks[1:], strict=True)
                    if a not in (0, 3) and b in (0, 3))
        words_per_second = words / (len(toks) / loader.FRAME_RATE)
        assert words_per_second >= 1.0, words_per_second
