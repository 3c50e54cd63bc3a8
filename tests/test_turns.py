"""End of turn for every user, and OpenAI's transcription APIs to the letter: server_vad turns
from the voice on the audio (checkpoints with or without the end-of-turn heads), semantic_vad
from the heads, streamed file transcriptions, browsers' realtime auth, big appends, /v1/models,
and /v2's end of turn from silence when the checkpoint has no heads. Real clients: the official
`openai` SDK, websockets as a browser would use it."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from openai import AsyncOpenAI
from websockets.asyncio.client import connect

from pinguin_daemon.client import stream

from .daemon import DaemonProcess, http_get
from .test_wyoming_and_files import encode, free_port

TOKEN = "sk-turns"
PAUSE_S = 2.0
CHUNK = 2400  # 100 ms appends


@pytest.fixture(scope="module", params=["mlx", "candle"])
def daemon(request: pytest.FixtureRequest, synthetic_dir: Path, synthetic_candle_dir: Path
           ) -> Iterator[DaemonProcess]:
    """The daemon on each checkpoint layout: -mlx has no end-of-turn heads, -candle has them."""
    model = synthetic_dir if request.param == "mlx" else synthetic_candle_dir
    proc = DaemonProcess("--model", str(model), "--dtype", "f32", "--max-sessions", "3",
                         "--auth-tokens", TOKEN, "--http-port", str(free_port()),
                         "--allowed-origins", "https://app.example", "--wyoming-port", str(free_port()),
                         "--wyoming-allow", "127.0.0.1")
    proc.layout = request.param  # type: ignore[attr-defined]
    yield proc
    proc.stop()


def pcm16(samples: np.ndarray) -> np.ndarray:
    return np.clip(np.round(samples * 32768), -32768, 32767).astype("<i2")


def conversation(speech_clips: list[np.ndarray]) -> tuple[np.ndarray, list[float]]:
    """Two utterances, each followed by a 2 s pause; where each one's speech begins (s)."""
    pause = np.zeros(int(PAUSE_S * 24000), np.float32)
    first, second = speech_clips[0], speech_clips[2]
    audio = np.concatenate([first, pause, second, pause])
    onsets = [float(np.flatnonzero(np.abs(first) > 1e-3)[0]) / 24000,
              (len(first) + len(pause) + float(np.flatnonzero(np.abs(second) > 1e-3)[0])) / 24000]
    return audio, onsets


async def realtime(port: int, samples: np.ndarray, turn_detection: dict[str, Any] | None,
                   pace: float = 0.1) -> tuple[list[Any], list[tuple[float, str]]]:
    """Stream through the SDK at `pace` s per 100 ms append, then commit; every server event, and
    for each event how much audio (s) had been appended when it arrived."""
    client = AsyncOpenAI(api_key=TOKEN, base_url=f"http://127.0.0.1:{port}/v1")
    events: list[Any] = []
    arrivals: list[tuple[float, str]] = []
    sent = [0.0]
    async with client.realtime.connect(model="kyutai/stt-1b-en_fr",
                                       extra_query={"intent": "transcription"}) as conn:
        await conn.session.update(session={"type": "transcription", "audio": {  # type: ignore[arg-type]
            "input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": turn_detection}}})
        committed = asyncio.Event()

        async def reader() -> None:
            async for event in conn:
                events.append(event)
                arrivals.append((sent[0], event.type))
                if (event.type == "conversation.item.input_audio_transcription.completed"
                        and committed.is_set()):
                    return

        task = asyncio.create_task(reader())
        pcm = pcm16(samples)
        for start in range(0, len(pcm), CHUNK):
            chunk = base64.b64encode(pcm[start:start + CHUNK].tobytes()).decode()
            await conn.input_audio_buffer.append(audio=chunk)
            sent[0] = min(len(pcm), start + CHUNK) / 24000
            await asyncio.sleep(pace)
        await asyncio.sleep(1.0)  # the last turn's words come 0.5 s after its audio
        committed.set()
        await conn.input_audio_buffer.commit()
        await asyncio.wait_for(task, 60)
    return events, arrivals


def by_type(events: list[Any], kind: str) -> list[Any]:
    return [e for e in events if e.type == kind]


def test_server_vad_ends_two_turns_with_every_word_once(daemon: DaemonProcess,
                                                        speech_clips: list[np.ndarray]) -> None:
    audio, onsets = conversation(speech_clips)
    events, arrivals = asyncio.run(realtime(daemon.port, audio, {"type": "server_vad"}))
    started = by_type(events, "input_audio_buffer.speech_started")
    stopped = by_type(events, "input_audio_buffer.speech_stopped")
    completed = by_type(events, "conversation.item.input_audio_transcription.completed")
    assert len(started) == len(stopped) == 2, [e.type for e in events]
    assert len(completed) == 3  # two turns, then the commit's (the trailing silence)
    for begin, onset in zip(started, onsets, strict=True):
        assert abs(begin.audio_start_ms / 1000 + 0.3 - onset) < 0.4  # the prefix padding is 300 ms
        # Sent as the speech arrives: well before the model's 0.5 s delay could produce a word.
        heard_at = next(sent for sent, kind in arrivals if kind == "input_audio_buffer.speech_started"
                        and sent >= onset - 0.1)
        assert heard_at - onset < 0.45
    for turn_start, turn_stop in zip(started, stopped, strict=True):
        item = turn_start.item_id
        order = [e.type for e in events if getattr(e, "item_id", None) == item
                 or getattr(getattr(e, "item", None), "id", None) == item]
        kinds = [k for k in order if k != "conversation.item.input_audio_transcription.delta"]
        assert kinds == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed", "conversation.item.added",
                         "conversation.item.input_audio_transcription.completed", "conversation.item.done"]
        turn = next(c for c in completed if c.item_id == item)
        deltas = "".join(d.delta for d in by_type(events, "conversation.item.input_audio_transcription.delta")
                         if d.item_id == item)
        assert turn.transcript == deltas and turn.transcript
        assert turn_stop.audio_end_ms > turn_start.audio_start_ms
        assert turn.usage.seconds > 0
    done = by_type(events, "conversation.item.done")
    assert done[0].item.content[0].transcript == completed[0].transcript
    # Every piece of text is in exactly one completed turn: together they are /ws's text.
    ws = asyncio.run(stream(f"ws://127.0.0.1:{daemon.port}/ws?token={TOKEN}", pcm16(audio) / 32768))
    assert "".join(c.transcript for c in completed).replace(" ", "") == ws.text.replace(" ", "")


def test_semantic_vad_ends_turns_with_the_heads_or_says_why_not(daemon: DaemonProcess,
                                                                 speech_clips: list[np.ndarray]) -> None:
    audio, _ = conversation(speech_clips)
    semantic = {"type": "semantic_vad", "eagerness": "high"}
    events, _ = asyncio.run(realtime(daemon.port, audio, semantic))
    if daemon.layout == "mlx":  # type: ignore[attr-defined]
        [error] = by_type(events, "error")
        assert error.error.param == "turn_detection.type" and "end-of-turn heads" in error.error.message
        return
    assert not by_type(events, "error")
    ended = [e.item_id for e in by_type(events, "input_audio_buffer.speech_stopped")]
    completed = [e.item_id for e in by_type(events, "conversation.item.input_audio_transcription.completed")]
    assert ended and set(ended) <= set(completed[:-1])  # turns the heads ended, before the commit


def test_realtime_takes_big_appends_and_browser_auth(daemon: DaemonProcess,
                                                    speech_clips: list[np.ndarray]) -> None:
    big = pcm16(np.tile(speech_clips[1], 18))  # ~64 s: a 4 MB append of base64
    payload = base64.b64encode(big.tobytes()).decode()
    assert len(payload) > 4_000_000

    async def browser() -> tuple[str | None, list[str]]:
        async with connect(f"ws://127.0.0.1:{daemon.port}/v1/realtime?intent=transcription",
                           subprotocols=["realtime", f"openai-insecure-api-key.{TOKEN}",  # type: ignore[list-item]
                                         "openai-beta.realtime-v1"], max_size=None) as ws:
            kinds = [json.loads(await ws.recv())["type"]]
            await ws.send(json.dumps({"type": "session.update", "session": {
                "type": "transcription", "audio": {"input": {"turn_detection": None}}}}))
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": payload}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            while kinds[-1] != "conversation.item.input_audio_transcription.completed":
                kinds.append(json.loads(await asyncio.wait_for(ws.recv(), 120))["type"])
            return ws.subprotocol, kinds

    subprotocol, kinds = asyncio.run(browser())
    assert subprotocol == "realtime"
    assert "error" not in kinds and "conversation.item.input_audio_transcription.delta" in kinds


def test_file_api_streams_deltas_and_speaks_openai(daemon: DaemonProcess,
                                                   speech_clips: list[np.ndarray]) -> None:
    base = f"http://127.0.0.1:{daemon.events('listening')[0]['http_port']}/v1"
    client = openai.OpenAI(api_key=TOKEN, base_url=base, max_retries=0)
    data = encode(speech_clips[3], "flac", "flac")
    whole = client.audio.transcriptions.create(model="kyutai/stt-1b-en_fr", file=("a.flac", data))
    assert whole.usage is not None and whole.usage.seconds == pytest.approx(len(speech_clips[3]) / 24000,  # type: ignore[union-attr]
                                                                         abs=0.05)
    streamed = client.audio.transcriptions.create(model="kyutai/stt-1b-en_fr", file=("a.flac", data),
                                                  stream=True)
    events = list(streamed)
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    done = [e for e in events if e.type == "transcript.text.done"]
    assert len(deltas) > 3 and "".join(deltas) == whole.text == done[0].text
    models = client.models.list()
    assert [m.id for m in models.data] == [daemon.events("listening")[0]["model"]]
    with pytest.raises(openai.BadRequestError, match="language 'de' is not supported"):
        client.audio.transcriptions.create(model="m", file=("a.flac", data), language="de")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o-transcribe")
    request = urllib.request.Request(f"{base}/audio/translations", method="POST", data=b"",
                                     headers={"Authorization": f"Bearer {TOKEN}", "Origin": "https://app.example"})
    try:
        urllib.request.urlopen(request, timeout=10)
        raise AssertionError("an unknown path answered")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404 and exc.headers["Content-Type"].startswith("application/json")
        assert json.loads(exc.read())["error"]["message"] == "Invalid URL (POST /v1/audio/translations)"
        assert exc.headers["Access-Control-Allow-Origin"] == "https://app.example"


def test_v2_ends_turns_without_heads_on_silence(daemon: DaemonProcess,
                                                speech_clips: list[np.ndarray]) -> None:
    audio, onsets = conversation(speech_clips)

    async def session() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with connect(f"ws://127.0.0.1:{daemon.port}/v2?token={TOKEN}") as ws:
            ready = json.loads(await ws.recv())
            for start in range(0, len(audio), CHUNK):
                await ws.send(audio[start:start + CHUNK].astype("<f4").tobytes())
                await asyncio.sleep(0.02)
            await ws.send(json.dumps({"type": "finish"}))
            received = [json.loads(m) async for m in ws]
            return ready, received

    ready, received = asyncio.run(session())
    expected = "model" if daemon.layout == "candle" else "silence"  # type: ignore[attr-defined]
    assert ready["end_of_turn"] is True and ready["turn_detection"] == expected
    turns = [m for m in received if m["type"] == "end_of_turn"]
    assert turns and all(m["source"] == expected for m in turns)
    if expected == "silence":  # one per pause, once the turn's words are out
        assert len(turns) == 2
        words_before = [sum(1 for m in received[:received.index(t)] if m["type"] == "word") for t in turns]
        assert 0 < words_before[0] < words_before[1]
        assert onsets[0] < turns[0]["time"] < onsets[1] < turns[1]["time"]


def test_status_says_whether_the_heads_are_there(daemon: DaemonProcess) -> None:
    status = json.loads(http_get(daemon.port, "/status", {"Authorization": f"Bearer {TOKEN}"})[1])
    assert status["end_of_turn"] is (daemon.layout == "candle")  # type: ignore[attr-defined]
    assert status["blas"] and status["dtype"] == "f32"


def test_wyoming_ends_the_utterance_at_the_models_end_of_turn(daemon: DaemonProcess,
                                                              speech_clips: list[np.ndarray]) -> None:
    """With the heads, the transcript comes as soon as the model says the turn is over, before
    Home Assistant's own VAD would stop the audio; without them, after audio-stop as always."""
    from wyoming.asr import Transcribe, Transcript, TranscriptStop
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient
    from wyoming.info import Describe, Info

    audio, _ = conversation(speech_clips)
    pcm = pcm16(audio).tobytes()

    async def home_assistant() -> tuple[Info, list[str], Transcript]:
        port = daemon.events("listening")[0]["wyoming_port"]
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Describe().event())
            info = Info.from_event(await client.read_event())  # type: ignore[arg-type]
        seen: list[str] = []
        async with AsyncTcpClient("127.0.0.1", port) as client:
            transcript: list[Transcript] = []

            async def reader() -> None:
                while (event := await client.read_event()) is not None:
                    seen.append(event.type)
                    if Transcript.is_type(event.type):
                        transcript.append(Transcript.from_event(event))
                    if TranscriptStop.is_type(event.type):
                        return

            task = asyncio.create_task(reader())
            await client.write_event(Transcribe(language="en").event())
            await client.write_event(AudioStart(rate=24000, width=2, channels=1).event())
            for start in range(0, len(pcm), 4800):
                await client.write_event(AudioChunk(rate=24000, width=2, channels=1,
                                                    audio=pcm[start:start + 4800]).event())
                await asyncio.sleep(0.05)
            seen.append("--audio-stop--")
            await client.write_event(AudioStop().event())
            await asyncio.wait_for(task, 60)
            return info, seen, transcript[0]

    info, seen, transcript = asyncio.run(home_assistant())
    [program] = info.asr
    assert not program.prefers_auto_gain_enabled and not program.prefers_noise_reduction_enabled
    assert program.requires_external_vad  # Home Assistant keeps its own end as well
    assert transcript.text
    if daemon.layout == "candle":  # type: ignore[attr-defined]
        assert seen.index("transcript") < seen.index("--audio-stop--")
    else:
        assert seen.index("transcript") > seen.index("--audio-stop--")
