"""OpenAI's realtime transcription on /v1/realtime, driven by the official `openai` SDK: words
arrive as deltas while the audio streams, a commit completes the turn, and the text equals what
/ws gives for the same samples."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from openai import AsyncOpenAI

from pinguin_daemon.client import stream
from pinguin_daemon.model import loader

from .daemon import DaemonProcess, reference_text

TOKEN = "sk-local-test"


@pytest.fixture(scope="module")
def daemon(synthetic_candle_dir: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess("--model", str(synthetic_candle_dir), "--dtype", "f32", "--max-sessions", "3",
                         "--auth-tokens", TOKEN)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def ref_model(candle_ref_model: loader.LoadedModel) -> loader.LoadedModel:
    return candle_ref_model


def pcm16(clip: np.ndarray) -> np.ndarray:
    return np.clip(np.round(clip * 32768), -32768, 32767).astype("<i2")


async def realtime_session(port: int, samples: np.ndarray, session: dict[str, Any],
                           beta: bool = False) -> list[Any]:
    """Stream pcm16 through the SDK in 100 ms appends, commit, and collect every server event
    until the committed turn's transcript is completed."""
    client = AsyncOpenAI(api_key=TOKEN, base_url=f"http://127.0.0.1:{port}/v1")
    events: list[Any] = []
    async with client.realtime.connect(model="kyutai/stt-1b-en_fr",
                                       extra_query={"intent": "transcription"}) as conn:
        if beta:
            await conn.send({"type": "transcription_session.update", "session": session})  # type: ignore[arg-type]
        else:
            await conn.session.update(session=session)  # type: ignore[arg-type]

        async def reader() -> None:  # until the turn the commit ends (VAD may end others first)
            async for event in conn:
                events.append(event)
                if (event.type == "conversation.item.input_audio_transcription.completed"
                        and "--commit--" in events):
                    return

        task = asyncio.create_task(reader())
        for start in range(0, len(samples), 2400):
            chunk = samples[start:start + 2400].tobytes()
            await conn.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())
            await asyncio.sleep(0.02)
        events.append("--commit--")
        await conn.input_audio_buffer.commit()
        await asyncio.wait_for(task, 60)
    return events


def test_deltas_stream_and_commit_completes_with_the_ws_text(
        daemon: DaemonProcess, ref_model: loader.LoadedModel, speech_clips: list[np.ndarray]) -> None:
    samples = pcm16(speech_clips[0])
    session = {"type": "transcription",
               "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None,
                                   "transcription": {"model": "kyutai/stt-1b-en_fr", "language": "en"}}}}
    events = asyncio.run(realtime_session(daemon.port, samples, session))
    types = [e if isinstance(e, str) else e.type for e in events]
    assert types[:2] == ["session.created", "session.updated"]
    assert events[1].session.audio.input.turn_detection is None
    deltas = [e for e in events if not isinstance(e, str)
              and e.type == "conversation.item.input_audio_transcription.delta"]
    # Words arrive while the audio is still being sent, not only after the commit.
    assert types.index("conversation.item.input_audio_transcription.delta") < types.index("--commit--")
    assert "input_audio_buffer.speech_started" not in types  # no turn detection asked for
    committed = next(e for e in events if not isinstance(e, str) and e.type == "input_audio_buffer.committed")
    completed = events[-1]
    assert completed.item_id == committed.item_id == deltas[0].item_id
    assert completed.transcript == "".join(d.delta for d in deltas)
    heard = samples.astype(np.float32) / 32768.0
    expected = reference_text(ref_model, heard)
    assert completed.transcript == expected.strip() and len(expected.split()) >= 5
    ws = asyncio.run(stream(f"ws://127.0.0.1:{daemon.port}/ws?token={TOKEN}", heard))
    assert ws.text.strip() == completed.transcript


def test_beta_transcription_session_and_server_vad(daemon: DaemonProcess,
                                                   speech_clips: list[np.ndarray]) -> None:
    samples = pcm16(speech_clips[3])
    session = {"input_audio_format": "pcm16", "turn_detection": {"type": "server_vad"},
               "input_audio_transcription": {"model": "kyutai/stt-1b-en_fr", "language": "fr"}}
    events = asyncio.run(realtime_session(daemon.port, samples, session, beta=True))
    types = [e if isinstance(e, str) else e.type for e in events]
    assert types[1] == "transcription_session.updated"
    # With turn detection, a turn starts with speech_started before its first word.
    first_delta = types.index("conversation.item.input_audio_transcription.delta")
    assert "input_audio_buffer.speech_started" in types[:first_delta]
    completed = [e for e in events if not isinstance(e, str)
                 and e.type == "conversation.item.input_audio_transcription.completed"]
    deltas = [e for e in events if not isinstance(e, str)
              and e.type == "conversation.item.input_audio_transcription.delta"]
    assert completed and completed[-1] is events[-1]
    # Each turn's transcript is exactly its deltas, in order (turns end at the model's end of
    # turn, or at the commit).
    for turn in completed:
        assert turn.transcript == "".join(d.delta for d in deltas if d.item_id == turn.item_id)
    assert {d.item_id for d in deltas} <= {c.item_id for c in completed}


def test_bad_events_get_error_events_and_the_session_goes_on(daemon: DaemonProcess) -> None:
    async def go() -> list[Any]:
        client = AsyncOpenAI(api_key=TOKEN, base_url=f"http://127.0.0.1:{daemon.port}/v1")
        events = []
        async with client.realtime.connect(model="x", extra_query={"intent": "transcription"}) as conn:
            await conn.send({"type": "input_audio_buffer.append", "audio": "not base64!!",  # type: ignore[arg-type]
                             "event_id": "evt_1"})
            await conn.session.update(session={"type": "transcription", "audio": {  # type: ignore[arg-type]
                "input": {"format": {"type": "audio/pcmu"}}}})
            await conn.send({"type": "response.create"})  # type: ignore[arg-type]
            await conn.input_audio_buffer.commit()
            async for event in conn:
                events.append(event)
                if event.type == "conversation.item.input_audio_transcription.completed":
                    break
        return events

    events = asyncio.run(go())
    errors = [e.error for e in events if e.type == "error"]
    assert [(e.code, e.param) for e in errors] == [("invalid_value", "audio"),
                                                   ("invalid_value", "session.audio.input.format"),
                                                   ("unsupported_event", None)]
    assert errors[0].event_id == "evt_1"
    assert events[-1].transcript == ""  # the session went on: an empty turn, committed


def test_unauthenticated_sdk_is_refused(daemon: DaemonProcess) -> None:
    async def go() -> None:
        client = AsyncOpenAI(api_key="wrong", base_url=f"http://127.0.0.1:{daemon.port}/v1")
        async with client.realtime.connect(model="x", extra_query={"intent": "transcription"}):
            pass

    with pytest.raises(Exception, match="401"):
        asyncio.run(go())
