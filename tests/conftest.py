"""Shared fixtures: synthetic checkpoints (generated once, cached between runs) and speech."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pinguin_daemon.model.synthetic import cached_synthetic_checkpoint

from .helpers import speech

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("PINGUIN_TEST_CACHE", REPO / ".cache" / "test"))

# Small context so that streams wrap the attention window after a few seconds.
SMALL_CONTEXT = 24


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


@pytest.fixture(scope="session")
def synthetic_dir(cache_dir: Path) -> Path:
    """MLX-layout synthetic checkpoint (with q8/q4 files), context 750 like the real model."""
    return cached_synthetic_checkpoint(cache_dir)


@pytest.fixture(scope="session")
def synthetic_candle_dir(cache_dir: Path) -> Path:
    """The same weights in the PyTorch (-candle) layout."""
    return cached_synthetic_checkpoint(cache_dir, layout="candle")


@pytest.fixture(scope="session")
def candle_ref_model(synthetic_candle_dir: Path) -> Any:
    """Kyutai's reference (its own Lm and cache) for the -candle synthetic checkpoint, f32."""
    from pinguin_daemon.engine.reference import fresh_reference_model
    from pinguin_daemon.model import loader, store

    return fresh_reference_model(
        loader.load_model(store.files_in_directory(synthetic_candle_dir, "none"), "f32"))


@pytest.fixture(scope="session")
def small_context_dir(cache_dir: Path) -> Path:
    """Synthetic checkpoint whose attention window is SMALL_CONTEXT steps."""
    return cached_synthetic_checkpoint(cache_dir, context=SMALL_CONTEXT)


SENTENCES = (
    ("en", "The quick brown fox jumps over the lazy dog, then runs into the forest."),
    ("fr", "Bonjour, je voudrais réserver une table pour deux personnes ce soir."),
    ("en", "Set a timer for ten minutes and remind me to call my sister."),
    ("fr", "Le petit chat dort sur le canapé pendant que la pluie tombe."),
)


@pytest.fixture(scope="session")
def speech_clips(cache_dir: Path) -> list[np.ndarray]:
    """Real speech (espeak-ng), 24 kHz float32, in English and French."""
    return [speech(text, cache_dir, voice) for voice, text in SENTENCES]
