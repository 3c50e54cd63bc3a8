"""Batched equals alone: every session's tokens are exactly what Kyutai's reference (LmGen,
batch 1, fresh cache, greedy) gives for that session's audio alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pinguin_daemon.blas import blas_description
from pinguin_daemon.engine import batched_lm
from pinguin_daemon.engine.core import EngineCore
from pinguin_daemon.engine.reference import fresh_reference_model, reference_run
from pinguin_daemon.model import loader, store

from .conftest import SMALL_CONTEXT
from .engine_driver import StreamSpec, mismatches, run_schedule

FRAME = loader.FRAME_SAMPLES


def load(directory: Path, dtype: str = "f32", quant: str = "none") -> loader.LoadedModel:
    return loader.load_model(store.files_in_directory(directory, quant), dtype, quant)


def random_specs(n: int, seed: int, length: int = 40) -> list[StreamSpec]:
    """n streams of different lengths, staggered joins, some skipping ticks, one leaving early."""
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n):
        codes = rng.integers(0, 2048, (length - 3 * (i % 4), 32))
        specs.append(StreamSpec(f"s{i}", codes, join_tick=2 * i,
                                leave_after=len(codes) // 2 if i == 1 else None,
                                skip_every=3 if i % 3 == 2 else 0))
    return specs


def references(model: loader.LoadedModel, specs: list[StreamSpec], max_seq_len: int = 4096):
    ref_model = fresh_reference_model(model, max_seq_len)
    return {s.name: reference_run(ref_model, s.codes[: s.frames]) for s in specs}


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8])
def test_batched_equals_alone_with_joins_leaves_and_skips(synthetic_dir: Path, batch: int) -> None:
    model = load(synthetic_dir)
    # Two more streams than slots: they wait, then take the slots of streams that left.
    specs = random_specs(batch + 2, seed=batch)
    core = EngineCore(model, batch)
    rec = run_schedule(core, specs)
    assert rec.max_batch == batch
    assert len(set(rec.slots.values())) == batch  # every slot used, some twice
    assert mismatches(rec, references(model, specs)) == []


def test_past_the_context_wrap(small_context_dir: Path) -> None:
    model = load(small_context_dir)
    specs = random_specs(6, seed=11, length=5 * SMALL_CONTEXT)
    rec = run_schedule(EngineCore(model, 4), specs)
    assert mismatches(rec, references(model, specs)) == []


@pytest.mark.parametrize(("dtype", "quant"), [("bf16", "none"), ("bf16", "q8"), ("f32", "q4")])
def test_other_dtypes_and_quantized_models(synthetic_dir: Path, dtype: str, quant: str) -> None:
    model = load(synthetic_dir, dtype, quant)
    specs = random_specs(4, seed=3)
    rec = run_schedule(EngineCore(model, 3), specs)
    # Before any context wrap the summation order is the reference's, and RoPE is mx.fast.rope's
    # bit for bit: tokens exact in every dtype, and VAD probabilities too, but for float32 under
    # an optimized BLAS: OpenBLAS picks its sgemm kernel by matrix size, so the VAD heads'
    # products for 3 rows and for the reference's 1 may differ in the last bit (measured: 3e-8).
    reference_blas = blas_description().startswith("reference")
    vad_tol = 1e-6 if dtype == "f32" and not reference_blas else 0.0
    assert mismatches(rec, references(model, specs), vad_tol=vad_tol) == []


def test_real_speech_through_rustymimi(synthetic_dir: Path, speech_clips: list[np.ndarray]) -> None:
    model = load(synthetic_dir)
    specs = []
    for i, clip in enumerate(speech_clips):
        tokenizer = model.make_audio_tokenizer()
        frames = [tokenizer.encode_step(clip[None, None, j * FRAME:(j + 1) * FRAME])[0, :, 0]
                  for j in range(len(clip) // FRAME)]
        specs.append(StreamSpec(f"speech{i}", np.stack(frames).astype(np.int64), join_tick=5 * i,
                                skip_every=4 if i == 1 else 0))
    rec = run_schedule(EngineCore(model, 3), specs)
    refs = references(model, specs)
    assert mismatches(rec, refs) == []
    # The clips are told apart: the test would see a model that ignores its input.
    assert rec.tokens["speech0"][:30] != rec.tokens["speech2"][:30]


@pytest.mark.slow
def test_past_4096_steps(small_context_dir: Path) -> None:
    """An hour of dictation must not degrade: stock LmGen's 4096-step cache is not a limit here."""
    model = load(small_context_dir)
    rng = np.random.default_rng(5)
    specs = [StreamSpec("long", rng.integers(0, 2048, (4200, 32)), join_tick=0),
             StreamSpec("late", rng.integers(0, 2048, (60, 32)), join_tick=4120)]
    rec = run_schedule(EngineCore(model, 2), specs)
    assert mismatches(rec, references(model, specs, max_seq_len=4300)) == []


def test_a_broken_engine_is_caught(synthetic_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The equivalence check has teeth: a slot that is not reset leaks history into the next."""
    model = load(synthetic_dir)
    specs = random_specs(4, seed=21)
    refs = references(model, specs)
    monkeypatch.setattr(batched_lm.BatchedLm, "reset_slot", lambda self, slot: None)
    rec = run_schedule(EngineCore(model, 2), specs)
    problems = mismatches(rec, refs)
    reused = [name for name, slot in rec.slots.items() if name in ("s2", "s3")]
    assert reused and any(p.startswith(tuple(reused)) for p in problems), problems


def test_sampling_does_not_depend_on_neighbours(synthetic_dir: Path) -> None:
    model = load(synthetic_dir)
    specs = random_specs(3, seed=8)
    alone = run_schedule(EngineCore(model, 3, temperature=0.8, seed=1), specs[:1])
    crowded = run_schedule(EngineCore(model, 3, temperature=0.8, seed=1), specs)
    greedy = run_schedule(EngineCore(model, 3), specs[:1])
    assert alone.tokens["s0"] == crowded.tokens["s0"]
    assert alone.tokens["s0"] != greedy.tokens["s0"]  # it does sample


def test_sequential_baseline_gives_the_same_tokens(synthetic_dir: Path) -> None:
    """The bench's baseline (the seed's design made correct) must transcribe identically."""
    from pinguin_daemon.engine.sequential import SequentialCore

    model = load(synthetic_dir)
    specs = random_specs(4, seed=13)
    rec = run_schedule(SequentialCore(model, 2), specs)
    assert mismatches(rec, references(model, specs)) == []


def test_fixed_shape_steps_equal_the_reference(small_context_dir: Path) -> None:
    """Fixed-shape steps (every slot computed, idle rows masked: the accelerator path) keep the
    f32 equality with LmGen alone, joins, leaves, skips and the context wrap included."""
    model = load(small_context_dir)
    specs = random_specs(5, seed=17, length=2 * SMALL_CONTEXT)
    rec = run_schedule(EngineCore(model, 3, fixed_shape=True), specs)
    assert mismatches(rec, references(model, specs)) == []


@pytest.mark.parametrize("fixed_shape", [False, True], ids=["compacted", "fixed-shape"])
def test_bf16_tokens_do_not_depend_on_neighbours(small_context_dir: Path, fixed_shape: bool) -> None:
    """Neighbour invariance in bf16: a stream's tokens and VAD are bit-identical alone and in a
    full, changing batch, past the context wrap."""
    model = load(small_context_dir, "bf16")
    specs = random_specs(5, seed=19, length=2 * SMALL_CONTEXT)
    subject = StreamSpec("subject", specs[0].codes, join_tick=3, skip_every=4)
    alone = run_schedule(EngineCore(model, 3, fixed_shape=fixed_shape), [subject])
    crowded = run_schedule(EngineCore(model, 3, fixed_shape=fixed_shape), [*specs[1:], subject])
    assert crowded.max_batch == 3
    assert crowded.tokens["subject"] == alone.tokens["subject"]
    assert crowded.vad["subject"] == alone.vad["subject"]
