"""The latency harness: its arithmetic, and a short real run against the synthetic model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from pinguin_daemon.bench.latency import histogram_percentile

NAME = "pinguin_server_added_latency_seconds"


def scrape_of(counts: dict[str, float]) -> dict[str, float]:
    return {f'{NAME}_bucket{{le="{le}"}}': value for le, value in counts.items()}


def test_histogram_percentile_over_an_interval() -> None:
    before = scrape_of({"0.01": 5, "0.02": 5, "0.05": 5, "+Inf": 5})
    # 100 new samples: 50 under 10 ms, 40 in (10, 20], 10 in (20, 50].
    after = scrape_of({"0.01": 55, "0.02": 95, "0.05": 105, "+Inf": 105})
    assert math.isclose(histogram_percentile(before, after, NAME, 0.5), 0.01)
    assert math.isclose(histogram_percentile(before, after, NAME, 0.9), 0.01 + 0.01 * 40 / 40)
    assert math.isclose(histogram_percentile(before, after, NAME, 0.95), 0.02 + 0.03 * 0.5)
    assert math.isnan(histogram_percentile(after, after, NAME, 0.5))  # nothing happened


def test_short_bench_run(tmp_path: Path, cache_dir: Path) -> None:
    env = {**os.environ, "PINGUIN_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-m", "pinguin_daemon.bench.latency", "--max-sessions", "1",
                           "--duration", "4", "--no-baseline", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "latency.json").read_text())
    [level] = report["levels"]
    assert level["sessions"] == 1 and level["closed_1000"] == 1
    assert level["samples_dropped"] == 0  # every sample sent was taken in
    assert level["server_p50_ms"] > 0 and level["step_mean_ms"] > 0
    assert level["eos_final_flush_p50_s"] is not None  # the /v2 client flushed and got `flushed`
    assert "| batched | 1 |" in proc.stdout


def test_short_engine_bench_compares_the_engine_with_rustymimi(tmp_path: Path, cache_dir: Path) -> None:
    env = {**os.environ, "PINGUIN_CACHE_DIR": str(cache_dir)}
    out = tmp_path / "engine.json"
    proc = subprocess.run([sys.executable, "-m", "pinguin_daemon.bench.engine_bench", "--shapes", "tiny",
                           "--streams", "1,8", "--ticks", "4", "--encoder-slots", "1,2",
                           "--encoder-ticks", "3", "--no-wrap", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["blas"]  # which BLAS ran the matmuls is part of the result
    assert [(r["streams"], r["token_agreement"]) for r in report["rows"]] == [(1, 1.0), (8, 1.0)]
    cases = {(r["encoder"], r["slots"], r["active"], r["fixed_shape"]) for r in report["encoder_rows"]}
    assert {("mlx", 1, 1, False), ("mlx", 2, 2, False), ("rustymimi", 1, 1, False),
            ("rustymimi", 2, 2, False), ("mlx", 2, 1, True), ("mlx", 2, 1, False)} <= cases
    assert all(r["tick_ms"] > 0 for r in report["encoder_rows"])
    # The engine's tick against rustymimi's per-stream cost x N, as the targets compare.
    comparisons = {c["streams"]: c for c in report["encoder_vs_rustymimi"]}
    assert sorted(comparisons) == [1, 2]
    for n, c in comparisons.items():
        assert abs(c["ratio"] - c["engine_ms"] / c["rustymimi_ms"]) < 1e-2
        assert abs(c["rustymimi_per_stream_ms"] - c["rustymimi_ms"] / n) < 1e-2
    # Every target whose streams were measured is reported, met or not, with its bound.
    goals = {(g["what"].split(",")[0], g["limit"]): g for g in report["targets"]}
    assert set(goals) == {("LM: batched / one LmGen per stream", 0.35),
                          ("LM: batched 8 streams / 1 stream", 2.0),
                          ("encode + LM: engine / rustymimi per stream x 1", 1.3)}
    assert all(g["met"] == (g["measured"] <= g["limit"]) for g in report["targets"])
    assert "| tiny (dim 256, 2 layers) | rustymimi | 2 | 2 | one per stream, encode only |" in proc.stdout
    assert "| target (issue 21) |" in proc.stdout


def test_gpu_check_runs_its_checks_on_this_device(tmp_path: Path, cache_dir: Path) -> None:
    """`make gpu-check` on a CPU-only MLX (tiny shape): the correctness checks pass, timings come out."""
    env = {**os.environ, "PINGUIN_CACHE_DIR": str(cache_dir)}
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "pinguin_daemon.bench.gpu_check", "--shape", "tiny",
                           "--streams", "1,4", "--encoder-streams", "2", "--ticks", "4", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["mlx_device"] == "cpu"
    checks = {c["check"]: (c["equal"], c["total"]) for c in report["checks"]}
    # Equality and invariance are exact; agreement with rustymimi is reported (float near-ties).
    assert all(equal == total for name, (equal, total) in checks.items() if "rustymimi" not in name), checks
    assert len(checks) == 4
    timings = [(t["what"], t["streams"]) for t in report["timings"]]
    assert timings == [("LM", 1), ("LM", 4), ("encode + LM", 2)]
