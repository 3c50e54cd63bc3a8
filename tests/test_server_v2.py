"""/v2, the Kyutai-compatible /api/asr-streaming, and auth, on the real daemon."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import soxr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pinguin_daemon.model import loader

from .daemon import DaemonProcess, flushed_audio, http_get, reference_tokens, reference_words

TOKEN = "s3cret-token-value"


@pytest.fixture(scope="module")
def candle_daemon(synthetic_candle_dir: Path) -> Iterator[DaemonProcess]:
    """The -candle layout: it carries the end-of-turn heads."""
    proc = DaemonProcess("--model", str(synthetic_candle_dir), "--dtype", "f32", "--max-sessions", "3",
                         "--auth-tokens", f"{TOKEN},another-token", "--vad-interval", "5")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def ref_model(candle_ref_model: loader.LoadedModel) -> loader.LoadedModel:
    return candle_ref_model


def url(proc: DaemonProcess, path: str, query: str = f"?token={TOKEN}") -> str:
    return f"ws://127.0.0.1:{proc.port}{path}{query}"


async def v2_session(address: str, start: dict[str, Any] | None, chunks: list[bytes],
                     controls: dict[int, dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], int]:
    """Send `start`, the audio chunks (with control messages after chunk i), then `finish`;
    collect every JSON message until the server closes."""
    received: list[dict[str, Any]] = []
    async with connect(address) as ws:
        async def reader() -> None:
            try:
                async for message in ws:
                    received.append(json.loads(message))
            except ConnectionClosed:
                pass

        task = asyncio.create_task(reader())
        if start is not None:
            await ws.send(json.dumps(start))
        for i, chunk in enumerate(chunks):
            await ws.send(chunk)
            control = (controls or {}).get(i)
            if control is not None:
                await ws.send(json.dumps(control))
                while not any(m["type"] == "flushed" and m["id"] == control.get("id") for m in received):
                    await asyncio.sleep(0.02)
        await ws.send(json.dumps({"type": "finish"}))
        await task
        assert ws.close_code is not None
        return received, ws.close_code


def words_of(messages: list[dict[str, Any]]) -> list[tuple[str, str, float]]:
    return [("word", m["text"], m["start"]) if m["type"] == "word" else ("word_end", "", m["stop"])
            for m in messages if m["type"] in ("word", "word_end")]


@pytest.mark.parametrize(("encoding", "rate"), [("s16", 16000), ("f32", 24000)])
def test_v2_words_and_timestamps_match_the_reference(candle_daemon: DaemonProcess,
                                                     ref_model: loader.LoadedModel,
                                                     speech_clips: list[np.ndarray],
                                                     encoding: str, rate: int) -> None:
    clip24 = speech_clips[1]
    if encoding == "s16":
        pcm = np.clip(soxr.resample(clip24, 24000, rate) * 32768, -32768, 32767).astype("<i2")
        audio24 = soxr.resample(pcm.astype(np.float32) / 32768.0, rate, 24000)  # what the server hears
    else:
        pcm = clip24.astype("<f4")
        audio24 = clip24
    chunks = [pcm[i:i + 1600].tobytes() for i in range(0, len(pcm), 1600)]
    start = {"type": "start", "encoding": encoding, "sample_rate": rate}
    received, code = asyncio.run(v2_session(url(candle_daemon, "/v2"), start, chunks))
    assert code == 1000
    types = [m["type"] for m in received]
    assert types[:2] == ["ready", "ready"] and received[1]["sample_rate"] == rate
    assert received[0]["end_of_turn"] is True
    assert types[-1] == "closing" and received[-1]["code"] == 1000
    expected = reference_words(ref_model, reference_tokens(ref_model, flushed_audio(audio24, ref_model)))
    assert len(expected) >= 6
    assert words_of(received) == expected
    assert "vad" in types  # every 5 steps, as configured
    assert all(len(m["probs"]) == 4 for m in received if m["type"] == "vad")


def test_v2_flush_mid_stream_then_go_on(candle_daemon: DaemonProcess, ref_model: loader.LoadedModel,
                                        speech_clips: list[np.ndarray]) -> None:
    clip = speech_clips[2]
    half = len(clip) // 2
    chunks = [clip[i:i + 2400].astype("<f4").tobytes() for i in range(0, len(clip), 2400)]
    flush_after = half // 2400 - 1  # chunk index after which the flush is sent
    sent_before = (flush_after + 1) * 2400
    received, code = asyncio.run(v2_session(url(candle_daemon, "/v2"), None, chunks,
                                            {flush_after: {"type": "flush", "id": "f1"}}))
    assert code == 1000
    cut = next(i for i, m in enumerate(received) if m["type"] == "flushed")
    assert received[cut] == {"type": "flushed", "id": "f1", "seq": received[cut]["seq"]}
    # Everything spoken before the flush arrives before `flushed`.
    first = flushed_audio(clip[:sent_before], ref_model)
    expected_first = reference_words(ref_model, reference_tokens(ref_model, first))
    assert words_of(received[:cut]) == expected_first
    # The stream goes on: the whole session equals the reference on what the model heard.
    whole = np.concatenate([first, flushed_audio(clip[sent_before:], ref_model)])
    assert words_of(received) == reference_words(ref_model, reference_tokens(ref_model, whole))


@pytest.mark.parametrize(
    ("first", "error", "code"),
    [("{oops", "bad_json", 1007), ('{"type": "shout"}', "unknown_type", 1003),
     ('{"type": "start", "sample_rate": 4000}', "bad_start", 1007),
     (b"AUDIO", "bad_audio", 1007)],
)
def test_v2_errors_are_answered_then_closed(candle_daemon: DaemonProcess, ref_model: loader.LoadedModel,
                                            speech_clips: list[np.ndarray], first: str | bytes,
                                            error: str, code: int) -> None:
    async def bad() -> tuple[list[dict[str, Any]], int | None]:
        received = []
        async with connect(url(candle_daemon, "/v2")) as ws:
            await ws.send(first)
            try:
                async for message in ws:
                    received.append(json.loads(message))
            except ConnectionClosed:
                pass
            return received, ws.close_code

    async def both() -> tuple[tuple[list[dict[str, Any]], int | None], tuple[list[dict[str, Any]], int]]:
        clip = speech_clips[3]
        chunks = [clip[i:i + 2400].astype("<f4").tobytes() for i in range(0, len(clip), 2400)]
        good = asyncio.create_task(v2_session(url(candle_daemon, "/v2"), None, chunks))
        await asyncio.sleep(0.3)
        return await bad(), await good

    (received, close_code), (good, good_code) = asyncio.run(both())
    assert [m["type"] for m in received] == ["ready", "error", "closing"]
    assert received[1]["code"] == error and received[1]["message"]
    assert close_code == code == received[2]["code"]
    # A neighbour streaming at the same time is unaffected.
    heard = flushed_audio(speech_clips[3], ref_model)
    expected = reference_words(ref_model, reference_tokens(ref_model, heard))
    assert good_code == 1000 and words_of(good) == expected


def test_v2_start_after_audio_is_an_error(candle_daemon: DaemonProcess) -> None:
    async def go() -> list[dict[str, Any]]:
        received = []
        async with connect(url(candle_daemon, "/v2")) as ws:
            await ws.send(np.zeros(1920, "<f4").tobytes())
            await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
            try:
                async for message in ws:
                    received.append(json.loads(message))
            except ConnectionClosed:
                pass
        return received

    errors = [m for m in asyncio.run(go()) if m["type"] == "error"]
    assert errors and errors[0]["code"] == "start_after_audio"


def test_kyutai_client_flow(candle_daemon: DaemonProcess, ref_model: loader.LoadedModel,
                            speech_clips: list[np.ndarray]) -> None:
    """As Kyutai's stt_from_file_rust_server.py: audio in 1920-sample chunks, a Marker, then
    silence until the Marker comes back."""
    clip = speech_clips[0]
    frames = -(-len(clip) // 1920)

    async def go() -> list[dict[str, Any]]:
        received: list[dict[str, Any]] = []
        headers = {"kyutai-api-key": TOKEN}
        async with connect(url(candle_daemon, "/api/asr-streaming", ""), additional_headers=headers) as ws:
            async def reader() -> None:
                async for message in ws:
                    msg = msgpack.unpackb(message)
                    received.append(msg)
                    if msg["type"] == "Marker":
                        return

            task = asyncio.create_task(reader())
            for i in range(0, len(clip), 1920):
                await ws.send(msgpack.packb({"type": "Audio", "pcm": clip[i:i + 1920].tolist()}))
            await ws.send(msgpack.packb({"type": "Marker", "id": 42}))
            for _ in range(40):
                if task.done():
                    break
                await ws.send(msgpack.packb({"type": "Audio", "pcm": [0.0] * 1920}))
                await asyncio.sleep(0.05)
            await asyncio.wait_for(task, 60)
        return received

    received = asyncio.run(go())
    assert received[0] == {"type": "Ready"}
    assert received[-1] == {"type": "Marker", "id": 42}
    steps = [m for m in received if m["type"] == "Step"]
    # The marker comes back once its audio and the model's delay have been processed.
    assert len(steps) == frames + ref_model.asr_delay_steps
    assert [s["step_idx"] for s in steps] == list(range(1, len(steps) + 1))
    assert all(len(s["prs"]) == 4 for s in steps)
    audio = np.zeros(len(steps) * 1920, np.float32)
    audio[: len(clip)] = clip
    expected = reference_words(ref_model, reference_tokens(ref_model, audio))
    got = [("word", m["text"], round(m["start_time"], 3)) if m["type"] == "Word"
           else ("word_end", "", round(m["stop_time"], 3))
           for m in received if m["type"] in ("Word", "EndWord")]
    assert got == expected and len(got) >= 4


def test_auth_forms_and_refusals(candle_daemon: DaemonProcess) -> None:
    async def handshake(address: str, headers: dict[str, str] | None = None) -> int:
        try:
            async with connect(address, additional_headers=headers) as ws:
                await ws.close()
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    base = f"ws://127.0.0.1:{candle_daemon.port}/ws"
    accepted = [(f"{base}?token={TOKEN}", None), (f"{base}?auth_id=another-token", None),
                (base, {"kyutai-api-key": TOKEN}), (base, {"Authorization": f"Bearer {TOKEN}"})]
    refused = [(base, None), (f"{base}?token=wrong", None), (base, {"Authorization": "Bearer nope"}),
               (base, {"kyutai-api-key": TOKEN[:-1]})]
    for address, headers in accepted:
        assert asyncio.run(handshake(address, headers)) == 101, (address, headers)
    for address, headers in refused:
        assert asyncio.run(handshake(address, headers)) == 401, (address, headers)
    assert http_get(candle_daemon.port, "/readyz")[0] == 401
    assert http_get(candle_daemon.port, "/readyz", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert http_get(candle_daemon.port, "/healthz")[0] == 200
    candle_daemon.wait_event("unauthorized", count=len(refused) + 1)
    assert not any(TOKEN in line or "another-token" in line for line in candle_daemon.raw)
