"""`make gpu-check`: does the engine compute right on this machine's accelerator, and how fast?

    python -m pinguin_daemon.bench.gpu_check [--streams 1,8,64,256] [--out bench-results/gpu.json]

For an operator on an NVIDIA (MLX CUDA) or Apple (Metal) machine; it runs on a CPU-only MLX too.
1. Equality: every stream's tokens, stepped in a batch with staggered joins and skipped ticks,
   equal Kyutai's reference (LmGen alone, greedy) token for token, in f32 (tiny synthetic model).
2. Neighbour invariance: a stream's tokens (bf16 LM) and codes (the batched MLX Mimi) are
   bit-identical alone and in a changing batch, with the steps the daemon takes on this device.
3. Speed: ms per step against concurrent streams at the 1B shape (random weights, or the real
   checkpoint when it is in the Hugging Face cache), LM alone and encode + LM.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DEFAULT_MODEL
from ..engine.batched_mimi import BatchedMimiEncoder, load_mimi
from ..engine.core import EngineCore
from ..engine.loop import mlx_device
from ..engine.reference import fresh_reference_model, reference_run
from ..errors import UserError
from ..model import loader, store
from ..model.synthetic import cached_synthetic_checkpoint

FRAME = loader.FRAME_SAMPLES


def _stagger(core: EngineCore, streams: dict[str, np.ndarray], skip: dict[str, int]) -> dict[str, list[int]]:
    """Stream i joins from tick 2*i on, when a slot is free (later streams reuse slots), pushes
    one row per tick (none on ticks divisible by skip[name]) and leaves when done; each stream's
    tokens."""
    tokens: dict[str, list[int]] = {name: [] for name in streams}
    sent = dict.fromkeys(streams, 0)
    waiting = list(streams)
    tick = 0
    while waiting or core.slot_of:
        for i, name in enumerate(streams):
            if name in waiting and tick >= 2 * i and core.free_slots:
                core.join(name)
                waiting.remove(name)
            rows, every = streams[name], skip.get(name, 0)
            if name in core.slot_of and sent[name] < len(rows) and not (every and tick % every == 0):
                core.push(name, rows[sent[name]])
                sent[name] += 1
        plan = core.plan()
        if plan is not None:
            core.update(plan, core.run(plan))
            for slot in plan.slots:
                state = core.slots[int(slot)]
                tokens[str(state.session_id)].append(state.prev_text)
        for name, rows in streams.items():
            if name in core.slot_of and sent[name] == len(rows) and core.pending_frames(name) == 0:
                core.leave(name)
        tick += 1
    return tokens


def check_equality(cache: Path, fixed: bool, streams: int = 6, steps: int = 40) -> dict[str, Any]:
    model = loader.load_model(store.files_in_directory(cached_synthetic_checkpoint(cache), "none"), "f32")
    rng = np.random.default_rng(0)
    codes = {f"s{i}": rng.integers(0, 2048, (steps - 2 * i, model.num_codebooks)) for i in range(streams)}
    got = _stagger(EngineCore(model, streams - 2, fixed_shape=fixed), codes, {"s1": 3})
    ref_model = fresh_reference_model(model)
    equal = total = 0
    for name, rows in codes.items():
        want = reference_run(ref_model, rows).tokens
        equal += sum(a == b for a, b in zip(got[name], want, strict=True))
        total += len(want)
    return {"check": "f32 tokens equal to LmGen alone", "equal": equal, "total": total}


def check_invariance(cache: Path, fixed: bool, steps: int = 40) -> list[dict[str, Any]]:
    model = loader.load_model(store.files_in_directory(cached_synthetic_checkpoint(cache), "none"), "bf16")
    rng = np.random.default_rng(1)
    subject = rng.integers(0, 2048, (steps, model.num_codebooks))
    crowd = {f"n{i}": rng.integers(0, 2048, (steps // 2 + 5 * i, model.num_codebooks)) for i in range(4)}
    alone = _stagger(EngineCore(model, 4, fixed_shape=fixed), {"subject": subject}, {})["subject"]
    together = _stagger(EngineCore(model, 4, fixed_shape=fixed), {**crowd, "subject": subject},
                        {"subject": 4})["subject"]
    rows = [{"check": "bf16 LM tokens alone vs in a batch", "equal": sum(
        a == b for a, b in zip(alone, together, strict=True)), "total": len(alone)}]
    import mlx.core as mx

    mimi = load_mimi(str(model.files.mimi_path), model.num_codebooks, mx.float32)
    pcm = (rng.standard_normal((3, 16, FRAME)) * 0.1).astype(np.float32)
    alone_enc = BatchedMimiEncoder(mimi, 3, mx.float32, fixed)
    alone_enc.reset_slot(0)
    solo = np.stack([alone_enc.encode(np.array([0]), pcm[0, t][None])[0] for t in range(16)])
    crowd_enc = BatchedMimiEncoder(mimi, 3, mx.float32, fixed)
    for slot in range(3):
        crowd_enc.reset_slot(slot)
    mixed = []
    for t in range(16):
        slots = np.array([0, 1, 2] if t % 3 else [0, 2])
        mixed.append(crowd_enc.encode(slots, pcm[slots, t])[0])
    rows.append({"check": "f32 Mimi codes alone vs in a batch", "equal": int((np.stack(mixed) == solo).sum()),
                 "total": int(solo.size)})
    tokenizer = model.make_audio_tokenizer()
    reference = np.stack([tokenizer.encode_step(f[None, None])[0, :, 0] for f in pcm[0]])
    rows.append({"check": "f32 Mimi codes equal to rustymimi (CPU)",
                 "equal": int((reference == solo).sum()), "total": int(solo.size)})
    return rows


def step_times(model: loader.LoadedModel, streams: list[int], fixed: bool, ticks: int,
               with_encoder: bool) -> list[dict[str, Any]]:
    rows = []
    rng = np.random.default_rng(2)
    for n in streams:
        core = EngineCore(model, n, encode_audio=with_encoder, fixed_shape=fixed)
        for i in range(n):
            core.join(f"s{i}")
        times = []
        for _ in range(ticks):
            frames = ((rng.standard_normal((n, FRAME)) * 0.1).astype(np.float32) if with_encoder
                      else rng.integers(0, 2048, (n, model.num_codebooks)))
            start = time.perf_counter()
            for i in range(n):
                core.push(f"s{i}", frames[i])
            plan = core.plan()
            assert plan is not None
            core.update(plan, core.run(plan))
            times.append(time.perf_counter() - start)
        ms = statistics.median(times[2:]) * 1000
        rows.append({"streams": n, "what": "encode + LM" if with_encoder else "LM", "ms": round(ms, 2)})
        print(f"  {rows[-1]['what']:<12} {n:>5} streams {ms:9.2f} ms per step", flush=True)
        del core
    return rows


def big_model(cache: Path, dtype: str) -> tuple[loader.LoadedModel, str]:
    """The real checkpoint when it is in the Hugging Face cache, else random weights at its shape."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(DEFAULT_MODEL, "config.json"), str):
        try:  # the files are cached: hf_hub_download falls back to them without a network
            return loader.load_model(store.download_repo(DEFAULT_MODEL), dtype), f"{DEFAULT_MODEL} (cached)"
        except UserError as exc:
            print(f"  {DEFAULT_MODEL} is only partly cached ({exc}); using random weights")
    directory = cached_synthetic_checkpoint(cache, dim=2048, num_layers=16, num_heads=16)
    return loader.load_model(store.files_in_directory(directory, "none"), dtype), "1B shape, random weights"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--streams", default="1,8,64,256", help="concurrent streams for the timings")
    parser.add_argument("--encoder-streams", default="1,8,64", help="streams for encode + LM ('' to skip)")
    parser.add_argument("--ticks", type=int, default=12)
    parser.add_argument("--shape", choices=("1b", "tiny"), default="1b", help="model of the timings")
    parser.add_argument("--out", type=Path, default=Path("bench-results/gpu.json"))
    args = parser.parse_args()
    cache = store.default_cache_root()
    device = mlx_device()
    fixed = device != "cpu"  # as the daemon: fixed-shape steps on an accelerator
    print(f"MLX device: {device}; steps: {'fixed shape' if fixed else 'compacted'}", flush=True)
    checks = [check_equality(cache, fixed), *check_invariance(cache, fixed)]
    if args.shape == "1b":
        model, label = big_model(cache, "bf16")
    else:
        directory = cached_synthetic_checkpoint(cache)
        model, label = loader.load_model(store.files_in_directory(directory, "none"), "bf16"), "tiny"
    print(f"timings: {label}, bf16", flush=True)
    streams = [int(s) for s in args.streams.split(",")]
    timings = step_times(model, streams, fixed, args.ticks, with_encoder=False)
    if args.encoder_streams:
        timings += step_times(model, [int(s) for s in args.encoder_streams.split(",")], fixed,
                              args.ticks, with_encoder=True)
    print("\n| check | equal | total |\n|---|---|---|")
    for c in checks:
        print(f"| {c['check']} | {c['equal']} | {c['total']} |")
    print(f"\n| {label} bf16 | streams | ms per step | budget 80 ms |\n|---|---|---|---|")
    for t in timings:
        print(f"| {t['what']} | {t['streams']} | {t['ms']} | {'ok' if t['ms'] <= 80 else 'over'} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "mlx_device": device, "fixed_shape": fixed},
        "model": label, "checks": checks, "timings": timings}, indent=2) + "\n")
    print(f"\nwritten to {args.out}")
    if any(c["equal"] != c["total"] for c in checks if "rustymimi" not in c["check"]):
        raise SystemExit("a correctness check failed: see the table")


if __name__ == "__main__":
    main()
