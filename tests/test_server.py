"""The real daemon on 127.0.0.1:0 with real WebSocket clients, synthetic model, f32."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pinguin_daemon.client import Transcript, stream
from pinguin_daemon.engine.reference import fresh_reference_model
from pinguin_daemon.model import loader, store

from .daemon import DaemonProcess, http_get, reference_text


@pytest.fixture(scope="module")
def daemon(synthetic_dir: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", "4",
                         "--max-message-bytes", "65536")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def ref_model(synthetic_dir: Path) -> loader.LoadedModel:
    return fresh_reference_model(loader.load_model(store.files_in_directory(synthetic_dir, "none"), "f32"))


async def closed_with(ws) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """Read until the server closes; its close code and reason."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), 30)
    except ConnectionClosed as exc:
        assert exc.rcvd is not None, "connection dropped without a close frame"
        return exc.rcvd.code, exc.rcvd.reason


def test_one_client_gets_the_reference_text(daemon: DaemonProcess, ref_model: loader.LoadedModel,
                                            speech_clips: list[np.ndarray]) -> None:
    result = asyncio.run(stream(daemon.url, speech_clips[0], chunk=2400))
    assert (result.close_code, result.close_reason) == (1000, "end of audio: transcript complete")
    expected = reference_text(ref_model, speech_clips[0])
    assert len(expected.split()) >= 5
    assert result.text == expected


def test_concurrent_clients_each_get_their_own_text(daemon: DaemonProcess,
                                                    ref_model: loader.LoadedModel,
                                                    speech_clips: list[np.ndarray]) -> None:
    # (clip, chunk size, start delay in s): different audio, chunking and join times.
    plan = [(speech_clips[0][:12000], 1, 0.0), (speech_clips[1], 1000, 0.2),
            (speech_clips[2], 2400, 0.5), (speech_clips[3], 10000, 0.9),
            (speech_clips[1][5000:], 1920, 2.0), (speech_clips[2][::-1].copy(), 2400, 2.5)]

    async def client(pcm: np.ndarray, chunk: int, delay: float) -> Transcript:
        await asyncio.sleep(delay)
        for _ in range(100):  # the last two wait for a slot when all four are busy
            result = await stream(daemon.url, pcm, chunk=chunk)
            if result.close_code != 1013:
                return result
            await asyncio.sleep(0.2)
        raise AssertionError("never got a slot")

    async def run_all() -> list[Transcript]:
        return await asyncio.gather(*(client(*p) for p in plan))

    results = asyncio.run(run_all())
    for (pcm, chunk, _), result in zip(plan, results, strict=True):
        assert result.close_code == 1000, result
        assert result.text == reference_text(ref_model, pcm), f"chunk size {chunk}"
    # Backpressure, not dropping: no session ever had more frames in flight than the bound.
    summaries = daemon.wait_event("session_closed", count=len(plan))
    assert all(int(s["max_lag_frames"]) <= 4 for s in summaries)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [
        ("hello", 1003, "text messages are not accepted on /ws"),
        (b"\x00\x00\x80", 1007, "binary message of 3 bytes is not whole float32 samples"),
        (np.array([0.1, np.nan], "<f4").tobytes(), 1007, "sample 1 of the message is NaN"),
        (np.array([0.1, np.inf], "<f4").tobytes(), 1007, "sample 1 of the message is NaN or infinite"),
        (bytes(65540), 1009, ""),
    ],
)
def test_bad_input_is_closed_with_its_code_and_others_are_unaffected(
        daemon: DaemonProcess, ref_model: loader.LoadedModel, speech_clips: list[np.ndarray],
        payload: str | bytes, code: int, reason: str) -> None:
    async def bad_client() -> tuple[int, str]:
        async with connect(daemon.url) as ws:
            await ws.send(np.zeros(4800, "<f4").tobytes())
            await ws.send(payload)
            return await closed_with(ws)

    async def both() -> tuple[tuple[int, str], Transcript]:
        good = asyncio.create_task(stream(daemon.url, speech_clips[2], chunk=2400))
        await asyncio.sleep(0.3)
        return await bad_client(), await good

    (got_code, got_reason), good = asyncio.run(both())
    assert got_code == code
    assert reason in got_reason
    assert good.close_code == 1000 and good.text == reference_text(ref_model, speech_clips[2])


def test_unknown_path_is_404(daemon: DaemonProcess) -> None:
    async def go() -> int:
        try:
            async with connect(f"ws://127.0.0.1:{daemon.port}/transcribe"):
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code
    assert asyncio.run(go()) == 404
    status, body = http_get(daemon.port, "/transcribe")
    assert status == 404 and "stream audio to /ws" in body


def test_health_and_readiness(daemon: DaemonProcess) -> None:
    assert http_get(daemon.port, "/healthz") == (200, "ok\n")
    status, body = http_get(daemon.port, "/readyz")
    info = json.loads(body)
    assert status == 200 and info["ready"] is True and info["free_slots"] == 4


def test_full_server_refuses_then_serves_and_slots_are_clean(
        synthetic_dir: Path, ref_model: loader.LoadedModel, speech_clips: list[np.ndarray]) -> None:
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", "1")
    try:
        async def scenario() -> tuple[tuple[int, str], Transcript]:
            async with connect(proc.url) as first:
                # The first client streams half a clip, then vanishes mid-stream.
                for start in range(0, len(speech_clips[3]) // 2, 2400):
                    await first.send(speech_clips[3][start:start + 2400].astype("<f4").tobytes())
                async with connect(proc.url) as extra:
                    refused = await closed_with(extra)
            # The slot is released when the first client leaves; the next one gets it.
            for _ in range(100):
                result = await stream(proc.url, speech_clips[0], chunk=2400)
                if result.close_code != 1013:
                    return refused, result
                await asyncio.sleep(0.1)
            raise AssertionError("slot never freed")

        refused, result = asyncio.run(scenario())
        assert refused == (1013, "server full: all 1 slots are busy, try again later")
        # Same slot, same encoder, yet nothing of the previous occupant leaks in.
        assert result.close_code == 1000
        assert result.text == reference_text(ref_model, speech_clips[0])
        assert proc.events("session_refused")
    finally:
        proc.stop()


def test_sigterm_flushes_sessions_and_exits_zero(synthetic_dir: Path, ref_model: loader.LoadedModel,
                                                 speech_clips: list[np.ndarray]) -> None:
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", "2")
    try:
        async def scenario() -> list[Transcript]:
            clients = [asyncio.create_task(stream(proc.url, clip, chunk=2400, realtime=True))
                       for clip in speech_clips[:2]]
            await asyncio.sleep(1.5)
            proc.proc.send_signal(15)
            return await asyncio.gather(*clients)

        results = asyncio.run(scenario())
        assert proc.proc.wait(60) == 0, "".join(line for line in proc.raw if not line.startswith("{"))[-3000:]
        for clip, result in zip(speech_clips, results, strict=False):
            assert result.close_code == 1001, result
            prefix = "server shutting down; transcribed the first "
            assert result.close_reason.startswith(prefix)
            samples = int(result.close_reason.removeprefix(prefix).split()[0])
            assert 0 < samples < len(clip)
            # The final words of what was received arrive before the 1001.
            assert result.text == reference_text(ref_model, clip[:samples])
        assert proc.events("stopped")
    finally:
        proc.stop()


def test_transcribe_command_streams_a_wav_file(daemon: DaemonProcess, ref_model: loader.LoadedModel,
                                               tmp_path: Path) -> None:
    import subprocess
    import sys

    from pinguin_daemon.client import read_wav

    wav = tmp_path / "hello.wav"  # espeak-ng writes 22.05 kHz 16-bit PCM: resampled by the client
    subprocess.run(["espeak-ng", "-w", str(wav), "turn on the kitchen lights"], check=True)
    proc = subprocess.run([sys.executable, "-m", "pinguin_daemon", "transcribe", str(wav),
                           "--url", daemon.url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n") == reference_text(ref_model, read_wav(wav))
    missing = subprocess.run([sys.executable, "-m", "pinguin_daemon", "transcribe",
                              str(tmp_path / "nope.wav")], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_serve_with_a_bad_model_says_why(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pinguin_daemon", "serve", "--model", str(tmp_path),
                           "--port", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{tmp_path}/config.json does not exist" in proc.stderr
