"""Engine micro-benchmark: ms per tick, batched engine vs one LmGen per stream one after another.

    python -m pinguin_daemon.bench.engine_bench [--out bench-results/engine.json]

For each model shape and each number of active streams N, every stream gets one frame per tick:
- batched: the engine steps all N slots in one MLX call;
- baseline: the seed's design made correct, one `LmGen` per stream, each with its own KV cache,
  stepped one after another (this is also the reference each stream's tokens are compared with).
Then the whole step with the audio codec, encode + LM per tick, for each encoder:
- mlx: the engine's batched Mimi encodes every stream's frame in its step, then the LM step;
- rustymimi: one rustymimi encoder per stream on a pool of worker threads, then the LM step;
and the cost of a half-active batch, compacted (only the active rows) vs fixed-shape (every slot
computed, idle rows masked: what the engine does on a GPU).
Synthetic weights: the figures measure compute, not transcription quality.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from moshi_mlx import models, utils

from ..engine.core import EngineCore
from ..engine.loop import mlx_device
from ..model import loader, store
from ..model.synthetic import cached_synthetic_checkpoint

SHAPES = {"tiny (dim 256, 2 layers)": (256, 2, 4), "larger (dim 1024, 8 layers)": (1024, 8, 16),
          "1b shape (dim 2048, 16 layers)": (2048, 16, 16)}
FRAME = loader.FRAME_SAMPLES


@dataclass
class Row:
    shape: str
    dtype: str
    streams: int
    batched_ms: float  # median ms per tick, all streams in one batched step
    baseline_ms: float  # median ms per tick, one LmGen per stream one after another
    speedup: float
    token_agreement: float  # share of batched tokens equal to the baseline's (the reference's)


def _baseline_tick_ms(model: loader.LoadedModel, codes: np.ndarray, warmup: int) -> tuple[float, np.ndarray]:
    """One LmGen per stream, each with its own cache, stepped in turn. codes: (ticks, N, n_q)."""
    lm = model.lm
    ticks, n, _ = codes.shape
    caches, gens = [], []
    for _ in range(n):
        cache = lm.transformer.make_rot_cache()
        lm.transformer_cache = cache
        caches.append(cache)
        gens.append(models.LmGen(lm, max_steps=ticks, text_sampler=utils.Sampler(temp=0),
                                 audio_sampler=utils.Sampler(temp=0)))
    tokens = np.zeros((ticks, n), np.int64)
    times = []
    for t in range(ticks):
        start = time.perf_counter()
        for i in range(n):
            lm.transformer_cache = caches[i]
            tokens[t, i] = gens[i].step(mx.array(codes[t, i][None].astype(np.int32)))[0].item()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:]) * 1000, tokens


def _batched_tick_ms(model: loader.LoadedModel, codes: np.ndarray, warmup: int) -> tuple[float, np.ndarray]:
    ticks, n, _ = codes.shape
    core = EngineCore(model, n)
    for i in range(n):
        core.join(f"s{i}")
    tokens = np.zeros((ticks, n), np.int64)
    times = []
    for t in range(ticks):
        start = time.perf_counter()
        for i in range(n):
            core.push(f"s{i}", codes[t, i])
        plan = core.plan()
        assert plan is not None
        out = core.run(plan)
        core.update(plan, out)
        times.append(time.perf_counter() - start)
        tokens[t] = out.tokens
    return statistics.median(times[warmup:]) * 1000, tokens


@dataclass
class EncoderRow:
    shape: str
    dtype: str
    encoder: str  # "mlx" (in the engine's batch) or "rustymimi" (worker pool)
    slots: int  # batch slots
    active: int  # streams with a frame this tick
    fixed_shape: bool  # every slot computed each tick (idle rows masked)
    tick_ms: float  # median ms per tick: encode every active stream's frame, then one LM step


def _audio(ticks: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(ticks, n, 1920) of noise shaped like speech levels: the codec's cost does not depend on it."""
    return (rng.standard_normal((ticks, n, FRAME)) * 0.1).astype(np.float32)


def _encoder_tick_ms(model: loader.LoadedModel, encoder: str, slots: int, active: int,
                     fixed_shape: bool, ticks: int, warmup: int, rng: np.random.Generator) -> float:
    pcm = _audio(ticks, active, rng)
    core = EngineCore(model, slots, encode_audio=encoder == "mlx", fixed_shape=fixed_shape)
    for i in range(active):
        core.join(f"s{i}")
    pool = None
    tokenizers = []
    if encoder == "rustymimi":
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(min(active, os.cpu_count() or 1))
        tokenizers = [model.make_audio_tokenizer() for _ in range(active)]
    times = []
    for t in range(ticks):
        start = time.perf_counter()
        if pool is not None:
            frames = list(pool.map(lambda enc, x: enc.encode_step(x[None, None])[0, :, 0],
                                   tokenizers, pcm[t]))
        else:
            frames = list(pcm[t])
        for i in range(active):
            core.push(f"s{i}", np.asarray(frames[i]))
        plan = core.plan()
        assert plan is not None
        core.update(plan, core.run(plan))
        times.append(time.perf_counter() - start)
    if pool is not None:
        pool.shutdown()
    return statistics.median(times[warmup:]) * 1000


def run_encoders(shapes: list[str], slots_list: list[int], encoders: list[str], dtype: str,
                 ticks: int, cache_root: Path) -> list[EncoderRow]:
    """Encode + LM per tick for each encoder and batch size (all active), then half-active
    batches compacted vs fixed-shape."""
    rows = []
    rng = np.random.default_rng(2)
    for label in shapes:
        dim, layers, heads = SHAPES[label]
        directory = cached_synthetic_checkpoint(cache_root, dim=dim, num_layers=layers, num_heads=heads)
        model = loader.load_model(store.files_in_directory(directory, "none"), dtype)
        cases = [(enc, n, n, False) for enc in encoders for n in slots_list]
        if "mlx" in encoders:
            top = max(slots_list)
            cases += [("mlx", top, max(1, top // 2), False), ("mlx", top, max(1, top // 2), True),
                      ("mlx", top, top, True)]
        for enc, slots, active, fixed in cases:
            ms = _encoder_tick_ms(model, enc, slots, active, fixed, ticks, 2, rng)
            row = EncoderRow(label, dtype, enc, slots, active, fixed, round(ms, 2))
            rows.append(row)
            print(f"{label:<28} {dtype:<5} {enc:<9} slots {slots:<4} active {active:<4} "
                  f"{'fixed' if fixed else 'compacted':<9} {ms:8.1f} ms/tick", flush=True)
    return rows


def run(streams: list[int], ticks: dict[str, int], dtype: str, cache_root: Path,
        shapes: list[str]) -> list[Row]:
    rows = []
    rng = np.random.default_rng(0)
    for label in shapes:
        dim, layers, heads = SHAPES[label]
        directory = cached_synthetic_checkpoint(cache_root, dim=dim, num_layers=layers, num_heads=heads)
        model = loader.load_model(store.files_in_directory(directory, "none"), dtype)
        n_ticks = ticks[label]
        for n in streams:
            codes = rng.integers(0, 2048, (n_ticks, n, model.num_codebooks))
            batched_ms, batched_tokens = _batched_tick_ms(model, codes, warmup=2)
            baseline_ms, baseline_tokens = _baseline_tick_ms(model, codes, warmup=2)
            row = Row(label, dtype, n, round(batched_ms, 2), round(baseline_ms, 2),
                      round(baseline_ms / batched_ms, 2),
                      round(float((batched_tokens == baseline_tokens).mean()), 4))
            rows.append(row)
            print(f"{label:<28} {dtype:<5} N={n:<3} batched {row.batched_ms:8.1f} ms  "
                  f"baseline {row.baseline_ms:8.1f} ms  x{row.speedup:<6} "
                  f"tokens equal {row.token_agreement:.2%}", flush=True)
    return rows


def wrap_agreement(dtype: str, cache_root: Path, streams: int = 8, ticks: int = 200,
                   context: int = 24) -> float:
    """Share of batched tokens equal to the reference's over streams that wrap their window.

    In bf16 the ring's key order after a wrap changes the attention's summation order, which may
    flip a near-tied argmax; f32 is exact (the tests assert it).
    """
    directory = cached_synthetic_checkpoint(cache_root, context=context)
    model = loader.load_model(store.files_in_directory(directory, "none"), dtype)
    codes = np.random.default_rng(1).integers(0, 2048, (ticks, streams, model.num_codebooks))
    _, batched = _batched_tick_ms(model, codes, warmup=0)
    _, baseline = _baseline_tick_ms(model, codes, warmup=0)
    return float((batched == baseline).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-results/engine.json"))
    parser.add_argument("--streams", default="1,2,4,8,16")
    parser.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    parser.add_argument("--ticks", type=int, default=30, help="ticks per measurement (tiny model)")
    parser.add_argument("--shapes", default="tiny,larger",
                        help="model shapes, of: tiny, larger, 1b (random weights at the 1B shape)")
    parser.add_argument("--encoder-slots", default="1,2,4,8,16",
                        help="batch sizes of the encode + LM section ('' to skip it)")
    parser.add_argument("--encoders", default="mlx,rustymimi")
    parser.add_argument("--encoder-ticks", type=int, default=8)
    args = parser.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    names = {key: label for key, label in zip(("tiny", "larger", "1b"), SHAPES, strict=True)}
    shapes = [names[s.strip()] for s in args.shapes.split(",")]
    ticks = {label: args.ticks if i == 0 else max(6, args.ticks // 3) for i, label in enumerate(SHAPES)}
    rows = run(streams, ticks, args.dtype, store.default_cache_root(), shapes)
    agreement = wrap_agreement(args.dtype, store.default_cache_root())
    encoder_rows: list[EncoderRow] = []
    if args.encoder_slots:
        encoder_rows = run_encoders(shapes[:1], [int(s) for s in args.encoder_slots.split(",")],
                                    args.encoders.split(","), args.dtype, args.encoder_ticks,
                                    store.default_cache_root())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "mlx_device": mlx_device(), "cpus": os.cpu_count()},
        "rows": [asdict(r) for r in rows],
        "encoder_rows": [asdict(r) for r in encoder_rows],
        "token_agreement_past_context_wrap": {"dtype": args.dtype, "streams": 8, "ticks": 200,
                                              "context": 24, "agreement": agreement},
    }, indent=2) + "\n")
    print("\n| model | dtype | streams | batched ms/tick | baseline ms/tick | speedup | tokens equal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.shape} | {r.dtype} | {r.streams} | {r.batched_ms} | {r.baseline_ms} | "
              f"x{r.speedup} | {r.token_agreement:.2%} |")
    if encoder_rows:
        print("\n| model | encoder | slots | active | step | encode + LM ms/tick |")
        print("|---|---|---|---|---|---|")
        for e in encoder_rows:
            print(f"| {e.shape} | {e.encoder} | {e.slots} | {e.active} | "
                  f"{'fixed shape' if e.fixed_shape else 'compacted'} | {e.tick_ms} |")
    print(f"\n{args.dtype} tokens equal to the reference past the context wrap "
          f"(8 streams x 200 steps, context 24): {agreement:.2%}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
