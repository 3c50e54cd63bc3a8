"""The daemon's one encoder, on its default configuration: the engine encodes every session's
audio in its batch (the batched MLX Mimi, on every backend). Concurrent sessions get exactly what
each gets alone (f32 and bf16); a session costs no codec memory of its own; hundreds of
connect/disconnect cycles leave the idle daemon as it was, and no reconnect is ever refused."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect

from pinguin_daemon.client import Transcript, stream

from .daemon import DaemonProcess, http_get


def rss_mb(proc: DaemonProcess) -> float:
    """Resident memory of the daemon process, MB."""
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_concurrent_sessions_get_what_each_gets_alone(synthetic_dir: Path, speech_clips: list[np.ndarray],
                                                      dtype: str) -> None:
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", dtype, "--max-sessions", "3")
    try:
        ready = json.loads(http_get(proc.port, "/readyz")[1])
        assert (ready["encoder"], ready["device"]) == ("mlx", "cpu")
        clips = [speech_clips[0][:48000], speech_clips[1][12000:60000], speech_clips[3][:40000]]

        async def together() -> list[Transcript]:
            async def late(i: int, clip: np.ndarray) -> Transcript:
                await asyncio.sleep(0.4 * i)  # staggered joins, different chunking
                return await stream(proc.url, clip, chunk=(2400, 1000, 4000)[i])
            return await asyncio.gather(*(late(i, c) for i, c in enumerate(clips)))

        crowded = asyncio.run(together())
        alone = [asyncio.run(stream(proc.url, clip, chunk=1920)) for clip in clips]
        for a, c in zip(alone, crowded, strict=True):
            assert a.close_code == c.close_code == 1000
            assert a.text == c.text and len(a.text.split()) >= 2
        assert len({a.text for a in alone}) == 3
    finally:
        proc.stop()


def test_sessions_cost_no_codec_memory_and_churn_leaves_nothing_behind(
        synthetic_dir: Path, speech_clips: list[np.ndarray]) -> None:
    slots = 4
    proc = DaemonProcess("--model", str(synthetic_dir), "--max-sessions", str(slots))
    try:
        clip = speech_clips[2][:24000]
        asyncio.run(stream(proc.url, clip))  # the first session primes MLX's buffer cache
        fresh = rss_mb(proc)

        async def concurrent() -> float:
            sockets = [await connect(proc.url) for _ in range(slots)]
            for start in range(0, len(clip), 4800):
                for ws in sockets:
                    await ws.send(clip[start:start + 4800].tobytes())
            await asyncio.sleep(1.0)
            peak = rss_mb(proc)  # every slot is streaming now
            for ws in sockets:
                await ws.close()
            return peak

        per_session = (asyncio.run(concurrent()) - fresh) / slots
        # The KV caches of every slot are allocated at start; a session adds its buffers only
        # (rustymimi: ~374 MB each).
        assert per_session <= 20, f"{per_session:.1f} MB per extra session"

        async def churn(cycles: int) -> None:
            for i in range(cycles):  # the iOS app's path; a dropped /v2 session would wait for a resume
                ws = await connect(proc.url)
                await ws.send(clip[(i % 10) * 960:(i % 10) * 960 + 960].tobytes())  # half a frame
                ws.transport.abort()

        asyncio.run(churn(500))
        asyncio.run(stream(proc.url, clip))
        after = rss_mb(proc)
        assert after <= fresh * 1.10, (fresh, after)
        status, body = http_get(proc.port, "/readyz")
        assert json.loads(body)["free_slots"] == slots
        assert len(proc.events("session_opened")) >= 500 and not proc.events("session_refused")
    finally:
        proc.stop()
