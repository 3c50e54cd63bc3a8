"""`make bench`: can this machine serve N phones in real time, and how fast is the text?

Starts the daemon (or targets --url), then for N = 1, 2, 4, ... concurrent clients streams real
speech (espeak-ng) paced like a microphone: half the clients speak the seed's /ws protocol in
2400-sample messages, half /v2 (1920-sample messages, a `flush` at the end of each utterance).
The same ramp runs against the baseline (`engine = "sequential"`: the seed's one-LmGen-per-session
design made correct) when the bench starts the daemon itself.

Measured per level: server-added latency (daemon side: from the arrival of the message
completing a frame to its step's output leaving; /metrics histogram), engine step time,
first-text latency, end-of-speech -> final word with and without flush, lag growth, samples
dropped, real-time factor, CPU and RSS of the daemon. Capacity: the largest N where every
session keeps up (latency growth under one frame, nothing dropped, all closed with 1000) and p99
server-added latency stays under two engine steps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ..model.loader import FRAME_SAMPLES, SAMPLE_RATE

SENTENCES = [
    ("en", "Turn on the lights in the living room and set the temperature to twenty degrees."),
    ("fr", "Rappelle-moi d'acheter du pain et du lait en rentrant ce soir."),
    ("en", "What is the weather going to be like tomorrow morning in Paris?"),
    ("fr", "Envoie un message à Claire pour lui dire que j'arrive dans dix minutes."),
]
PAUSE_S = 1.5  # silence after each utterance (a person waiting for the answer)
MODEL_DELAY_S = 0.5  # Kyutai STT's text delay
# Wall time of a level / audio streamed per client: above this the daemon did not keep up (the
# final flush and connection set-up take well under 10% of a 20 s run).
MAX_RTF = 1.1


@dataclass
class Utterance:
    pcm: np.ndarray  # speech then PAUSE_S of silence, 24 kHz float32
    speech_samples: int  # where the speech ends


def make_speech(cache: Path) -> list[Utterance]:
    """Real speech from espeak-ng (resampled to 24 kHz with sox), cached."""
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (voice, text) in enumerate(SENTENCES):
        raw = cache / f"utt{i}.f32"
        if not raw.exists():
            wav = subprocess.run(
                ["espeak-ng", "-v", voice, "--stdout", text], check=True, capture_output=True
            ).stdout
            raw.write_bytes(
                subprocess.run(
                    [
                        "sox",
                        "-t",
                        "wav",
                        "-",
                        "-t",
                        "raw",
                        "-e",
                        "floating-point",
                        "-b",
                        "32",
                        "-c",
                        "1",
                        "-r",
                        str(SAMPLE_RATE),
                        "-",
                    ],
                    input=wav,
                    check=True,
                    capture_output=True,
                ).stdout
            )
        speech = np.frombuffer(raw.read_bytes(), "<f4")
        pcm = np.concatenate([speech, np.zeros(int(PAUSE_S * SAMPLE_RATE), np.float32)])
        out.append(Utterance(pcm.astype(np.float32), len(speech)))
    return out


@dataclass
class ClientResult:
    endpoint: str
    samples_sent: int = 0
    first_text_s: float | None = None  # first audio sent -> first text received
    eos_to_final_s: list[float] = field(default_factory=list)  # end of speech -> final word
    eos_to_final_flush_s: list[float] = field(default_factory=list)  # same, with a flush
    close_code: int | None = None


async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def run_client(
    base_url: str, endpoint: str, utterances: list[Utterance], duration: float, offset: int
) -> ClientResult:
    """Stream utterances (rotating from `offset`) at real time for about `duration` seconds."""
    result = ClientResult(endpoint)
    chunk = 2400 if endpoint == "/ws" else FRAME_SAMPLES
    received: list[tuple[float, dict[str, Any] | str]] = []
    async with connect(base_url + endpoint, max_size=None, compression=None) as ws:

        async def reader() -> None:
            try:
                async for message in ws:
                    now = time.monotonic()
                    received.append((now, json.loads(message) if endpoint == "/v2" else str(message)))
            except ConnectionClosed:
                pass

        task = asyncio.create_task(reader())
        start = time.monotonic()
        sent_at = start
        ends: list[tuple[float, int]] = []  # (monotonic time the speech ended, utterance number)
        n = 0
        while time.monotonic() - start < duration:
            utt = utterances[(offset + n) % len(utterances)]
            for i in range(0, len(utt.pcm), chunk):
                sent_at += chunk / SAMPLE_RATE  # when a microphone would have this chunk
                await _sleep_until(sent_at)
                await ws.send(utt.pcm[i : i + chunk].tobytes())
                result.samples_sent += len(utt.pcm[i : i + chunk])
                if i < utt.speech_samples <= i + chunk:
                    ends.append((time.monotonic(), n))
                    if endpoint == "/v2" and n % 2 == 0:  # /v2 flushes every other utterance
                        await ws.send(json.dumps({"type": "flush", "id": n}))
            n += 1
        await ws.send(json.dumps({"type": "finish"}) if endpoint == "/v2" else b"")
        await asyncio.wait_for(task, 60)
        result.close_code = ws.close_code

    texts = [(t, m) for t, m in received if isinstance(m, str) or m.get("type") == "text"]
    if texts:
        result.first_text_s = texts[0][0] - start
    for end_t, n in ends:
        if endpoint == "/v2" and n % 2 == 0:
            flushed = [
                t
                for t, m in received
                if isinstance(m, dict) and m.get("type") == "flushed" and m.get("id") == n
            ]
            if flushed:
                result.eos_to_final_flush_s.append(flushed[0] - end_t)
        else:
            # The final word of the utterance: the last text before the next utterance's text can
            # show up (it starts PAUSE_S later and lags by the model's delay).
            window = [t for t, _ in texts if end_t < t < end_t + PAUSE_S + MODEL_DELAY_S]
            if window:
                result.eos_to_final_s.append(window[-1] - end_t)
    return result


def scrape(http_url: str) -> dict[str, float]:
    with urllib.request.urlopen(http_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(pinguin_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def histogram_percentile(before: dict[str, float], after: dict[str, float], name: str, q: float) -> float:
    """Percentile (seconds) of a Prometheus histogram over the interval between two scrapes."""
    buckets = []
    for key, value in after.items():
        match = re.match(rf'^{name}_bucket\{{le="([^"]+)"\}}$', key)
        if match:
            buckets.append((float(match.group(1)), value - before.get(key, 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return float("nan")
    lower = 0.0
    previous = 0.0
    for bound, count in buckets:
        if count >= q * total:
            if bound == float("inf"):
                return lower
            share = (q * total - previous) / max(count - previous, 1e-9)
            return lower + (bound - lower) * share  # linear inside the bucket, as Prometheus does
        lower, previous = bound, count
    return lower


def process_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds so far, RSS in MB) of a process, via ps (Linux and macOS)."""
    out = subprocess.run(
        ["ps", "-o", "rss=,time=", "-p", str(pid)], capture_output=True, text=True
    ).stdout.split()
    if len(out) < 2:
        return 0.0, 0.0
    parts = [float(p) for p in re.split("[:-]", out[1])]
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + p
    return seconds, float(out[0]) / 1024


@dataclass
class Level:
    engine: str
    sessions: int
    ok: bool  # keeps up AND p99 server-added latency <= 2 engine steps
    keeps_up: bool  # all closed 1000, nothing dropped, latency growth under one frame
    closed_1000: int
    server_p50_ms: float
    server_p99_ms: float
    step_mean_ms: float
    first_text_p50_s: float | None
    eos_final_no_flush_p50_s: float | None
    eos_final_flush_p50_s: float | None
    latency_growth_max_ms: float | None
    samples_dropped: int
    real_time_factor: float
    cpu_percent: float
    rss_mb: float


class Daemon:
    """The daemon under test, started by the bench."""

    def __init__(self, model: str, slots: int, engine: str, extra: list[str]) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pinguin_daemon",
                "serve",
                "--host",
                "127.0.0.1",
                "--http-port",
                "0",
                "--wyoming-port",
                "0",
                "--port",
                "0",
                "--model",
                model,
                "--max-sessions",
                str(slots),
                "--engine",
                engine,
                "--log-format",
                "json",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.summaries: list[dict[str, Any]] = []
        self.port = 0
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            record = _json_line(line)
            if record.get("event") == "listening":
                self.port = int(record["port"])
                break
        else:
            raise SystemExit("the daemon did not start; run it by hand to see why")
        import threading

        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            record = _json_line(line)
            if record.get("event") == "session_closed":
                self.summaries.append(record)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _json_line(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
        return value if isinstance(value, dict) else {}
    except json.JSONDecodeError:
        return {}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def run_level(
    base: str, daemon: Daemon | None, engine: str, n: int, utterances: list[Utterance], duration: float
) -> Level:
    http = base.replace("ws://", "http://").replace("wss://", "https://")
    before = scrape(http)
    pid = daemon.proc.pid if daemon else None
    cpu0, _ = process_usage(pid) if pid else (0.0, 0.0)
    summaries_before = len(daemon.summaries) if daemon else 0
    started = time.monotonic()

    async def all_clients() -> list[ClientResult]:
        tasks = [run_client(base, "/v2" if i % 2 == 0 else "/ws", utterances, duration, i) for i in range(n)]
        return await asyncio.gather(*tasks)

    progress = _Progress(f"{engine:<10} N={n:<3}", duration)
    results = asyncio.run(_with_progress(all_clients(), progress))
    wall = time.monotonic() - started
    after = scrape(http)
    cpu1, rss = process_usage(pid) if pid else (0.0, 0.0)
    if daemon:
        deadline = time.monotonic() + 60
        while len(daemon.summaries) < summaries_before + n and time.monotonic() < deadline:
            time.sleep(0.05)
    summaries = daemon.summaries[summaries_before:] if daemon else []
    steps = after.get("pinguin_engine_step_seconds_count", 0) - before.get(
        "pinguin_engine_step_seconds_count", 0
    )
    step_sum = after.get("pinguin_engine_step_seconds_sum", 0) - before.get(
        "pinguin_engine_step_seconds_sum", 0
    )
    step_mean = step_sum / steps if steps else float("nan")
    p50 = histogram_percentile(before, after, "pinguin_server_added_latency_seconds", 0.5)
    p99 = histogram_percentile(before, after, "pinguin_server_added_latency_seconds", 0.99)
    # Audio the clients sent that the daemon did not take in (must be 0).
    dropped = sum(r.samples_sent for r in results) - sum(int(s.get("samples", 0)) for s in summaries)
    growth = [float(s["latency_growth_ms"]) for s in summaries if "latency_growth_ms" in s]
    audio_s = sum(r.samples_sent for r in results) / SAMPLE_RATE / max(n, 1)
    closed = sum(1 for r in results if r.close_code == 1000)
    rtf = wall / audio_s if audio_s else float("nan")
    # A daemon that falls behind builds a backlog in socket buffers first (the client is not held
    # back for many seconds), so keeping up is judged by the wall time of the whole run.
    keeps_up = (
        closed == n and (dropped == 0 or not daemon) and rtf <= MAX_RTF and (not growth or max(growth) < 80.0)
    )
    ok = keeps_up and p99 <= 2 * step_mean
    return Level(
        engine=engine,
        sessions=n,
        ok=ok,
        keeps_up=keeps_up,
        closed_1000=closed,
        server_p50_ms=round(p50 * 1000, 1),
        server_p99_ms=round(p99 * 1000, 1),
        step_mean_ms=round(step_mean * 1000, 1),
        first_text_p50_s=_median([r.first_text_s for r in results if r.first_text_s is not None]),
        eos_final_no_flush_p50_s=_median([x for r in results for x in r.eos_to_final_s]),
        eos_final_flush_p50_s=_median([x for r in results for x in r.eos_to_final_flush_s]),
        latency_growth_max_ms=round(max(growth), 1) if growth else None,
        samples_dropped=int(dropped),
        real_time_factor=round(rtf, 3),
        cpu_percent=round(100 * (cpu1 - cpu0) / wall, 1),
        rss_mb=round(rss, 1),
    )


def _mean_of(before: dict[str, float], after: dict[str, float], name: str) -> float:
    count = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
    total = after.get(f"{name}_sum", 0) - before.get(f"{name}_sum", 0)
    return total / count if count else float("nan")


class _Progress:
    def __init__(self, label: str, duration: float) -> None:
        self.label = label
        self.duration = duration
        self.tty = sys.stderr.isatty()

    def show(self, elapsed: float) -> None:
        done = min(1.0, elapsed / self.duration)
        bar = "#" * int(done * 30) + "." * (30 - int(done * 30))
        line = f"{self.label} [{bar}] {elapsed:5.1f}/{self.duration:.0f} s"
        if self.tty:
            sys.stderr.write("\r" + line)
        elif int(elapsed) % 10 == 0:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


async def _with_progress(work: Any, progress: _Progress) -> Any:
    task = asyncio.ensure_future(work)
    start = time.monotonic()
    while not task.done():
        progress.show(time.monotonic() - start)
        await asyncio.wait([task], timeout=1.0)
    if progress.tty:
        sys.stderr.write("\n")
    return task.result()


def engine_alone_capacity(model: str, utterances: list[Utterance], max_n: int,
                          ticks: int = 40) -> dict[str, Any]:
    """What the engine sustains without sockets: ms per tick for N streams (one step that encodes
    every stream's frame with the batched Mimi and steps the LM), and the largest N under 80 ms."""
    from ..config import resolve_dtype
    from ..engine.core import EngineCore
    from ..engine.loop import mlx_device
    from ..model.loader import load_model
    from ..model.store import resolve

    loaded = load_model(resolve(model), resolve_dtype("auto", mlx_device()))
    pcm = np.concatenate([u.pcm for u in utterances])
    rows = []
    capacity = 0
    n = 1
    while n <= max_n:
        core = EngineCore(loaded, n, encode_audio=True, fixed_shape=mlx_device() != "cpu")
        for i in range(n):
            core.join(f"s{i}")
        times = []
        for t in range(ticks):
            start = time.perf_counter()
            frame = pcm[(t * FRAME_SAMPLES) % (len(pcm) - FRAME_SAMPLES) :][:FRAME_SAMPLES]
            for i in range(n):
                core.push(f"s{i}", frame)
            core.step()
            times.append(time.perf_counter() - start)
        ms = statistics.median(times[3:]) * 1000
        rows.append({"sessions": n, "tick_ms": round(ms, 1)})
        if ms <= 80:
            capacity = n
        n *= 2
    return {"rows": rows, "capacity": capacity}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running daemon (ws://host:port); default: start one")
    parser.add_argument("--model", default="synthetic", help="model for the daemon the bench starts")
    parser.add_argument("--max-sessions", type=int, default=8, help="ramp N = 1, 2, 4, ... up to this")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of speech per level")
    parser.add_argument("--no-baseline", action="store_true", help="skip the sequential baseline")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument(
        "--daemon-arg",
        action="append",
        default=[],
        help="extra flag for the daemon, e.g. --daemon-arg=--dtype=f32",
    )
    args = parser.parse_args()

    utterances = make_speech(
        Path(os.environ.get("PINGUIN_CACHE_DIR", Path.home() / ".cache" / "pinguin-daemon")) / "bench-speech"
    )
    ramp = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= args.max_sessions]
    engines = ["batched"] if (args.url or args.no_baseline) else ["batched", "sequential"]
    levels: list[Level] = []
    for engine in engines:
        daemon = None if args.url else Daemon(args.model, args.max_sessions, engine, args.daemon_arg)
        base = args.url or f"ws://127.0.0.1:{daemon.port}"  # type: ignore[union-attr]
        try:
            for n in ramp:
                level = run_level(base, daemon, engine, n, utterances, args.duration)
                levels.append(level)
                print(_row(level), flush=True)
        finally:
            if daemon:
                daemon.stop()
    alone = None if args.url else engine_alone_capacity(args.model, utterances, args.max_sessions)
    capacity = {
        e: max([lv.sessions for lv in levels if lv.engine == e and lv.ok], default=0) for e in engines
    }
    keeps_up = {
        e: max([lv.sessions for lv in levels if lv.engine == e and lv.keeps_up], default=0) for e in engines
    }
    report = {
        "levels": [asdict(lv) for lv in levels],
        "capacity": capacity,
        "keeps_up": keeps_up,
        "engine_plus_encoder_alone": alone,
        "duration_s": args.duration,
        "model": args.url or args.model,
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latency.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(
        "| engine | N | keeps up | ok | p50 ms | p99 ms | step ms | first text s | "
        "final word s (no flush / flush) | growth ms | dropped | RTF | CPU % | RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for lv in levels:
        print(
            f"| {lv.engine} | {lv.sessions} | {'yes' if lv.keeps_up else 'no'} | "
            f"{'yes' if lv.ok else 'no'} | {lv.server_p50_ms} | "
            f"{lv.server_p99_ms} | {lv.step_mean_ms} | {lv.first_text_p50_s} | "
            f"{lv.eos_final_no_flush_p50_s} / {lv.eos_final_flush_p50_s} | {lv.latency_growth_max_ms} | "
            f"{lv.samples_dropped} | {lv.real_time_factor} | {lv.cpu_percent} | {lv.rss_mb} |"
        )
    print(f"\nkeeps up with real time up to: {keeps_up}")
    print(f"capacity (keeps up and p99 server-added latency <= 2 engine steps): {capacity}")
    if not args.url and args.model == "synthetic":
        print(
            "note: the synthetic model emits random text during silence too, so 'final word "
            "without flush' is not meaningful with it; the flush figure is."
        )
    if alone:
        print(f"engine + encoder alone (no sockets): {alone['rows']}, capacity {alone['capacity']}")
    _plot(levels, args.out / "latency.png")
    print(f"written: {args.out / 'latency.json'}, {args.out / 'latency.png'}")


def _row(lv: Level) -> str:
    return (
        f"{lv.engine:<10} N={lv.sessions:<3} {'OK ' if lv.ok else 'NO '} server p50 {lv.server_p50_ms} ms "
        f"p99 {lv.server_p99_ms} ms, step {lv.step_mean_ms} ms (Mimi + LM), "
        f"RTF {lv.real_time_factor}, growth {lv.latency_growth_max_ms} ms, "
        f"dropped {lv.samples_dropped}, CPU {lv.cpu_percent}%, RSS {lv.rss_mb} MB"
    )


def _plot(levels: list[Level], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install matplotlib, or `make bench` which installs it)")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for engine in sorted({lv.engine for lv in levels}):
        rows = [lv for lv in levels if lv.engine == engine]
        xs = [lv.sessions for lv in rows]
        ax.plot(xs, [lv.server_p50_ms for lv in rows], "o-", label=f"{engine}: server-added p50")
        ax.plot(xs, [lv.server_p99_ms for lv in rows], "s--", label=f"{engine}: server-added p99")
        ax.plot(xs, [lv.step_mean_ms for lv in rows], "^:", label=f"{engine}: engine step")
    ax.axhline(80, color="grey", linewidth=0.8)
    ax.text(1, 82, "80 ms = one frame (real time)", color="grey", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("ms")
    ax.set_title("pinguin-daemon latency vs concurrent sessions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
