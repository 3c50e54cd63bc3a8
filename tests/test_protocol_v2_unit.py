"""/v2 and Kyutai message parsing and rendering, without a server."""

from __future__ import annotations

import dataclasses
import json

import msgpack
import numpy as np
import pytest

from pinguin_daemon.engine.events import EndOfTurnProbs, TextPiece, Word, WordEnd
from pinguin_daemon.server.protocols import (
    AudioIn,
    FinishIn,
    FlushIn,
    KyutaiProtocol,
    MarkerIn,
    Reject,
    Reply,
    SessionInfo,
    V2Protocol,
    v2,
)

INFO = SessionInfo("sid", "synthetic", 0.5, 6, 4, 1, 0.5, 0)


@pytest.mark.parametrize(
    ("message", "error", "code"),
    [
        ("{not json", "bad_json", 1007),
        ('["start"]', "bad_json", 1007),
        ('{"type": "dance"}', "unknown_type", 1003),
        ('{"type": "start", "encoding": "mp3"}', "bad_start", 1007),
        ('{"type": "start", "sample_rate": 96000}', "bad_start", 1007),
        ('{"type": "start", "sample_rate": "16k"}', "bad_start", 1007),
        ('{"type": "start", "rate": 16000}', "bad_start", 1007),
    ],
)
def test_v2_rejects_bad_control_messages(message: str, error: str, code: int) -> None:
    [command] = V2Protocol(INFO).parse(message)
    assert isinstance(command, Reject)
    assert (command.error, command.code) == (error, code)


def test_v2_start_then_audio_then_start_again() -> None:
    proto = V2Protocol(INFO)
    [reply] = proto.parse('{"type": "start", "encoding": "s16", "sample_rate": 16000}')
    assert isinstance(reply, Reply)
    assert reply.items[0]["sample_rate"] == 16000 and reply.items[0]["encoding"] == "s16"
    [audio] = proto.parse(np.array([16384, -32768] * 800, "<i2").tobytes())
    assert isinstance(audio, AudioIn) and audio.samples.dtype == np.float32
    assert len(proto.drain()) + len(audio.samples) == 2400  # resampled to 24 kHz, none held back
    [late] = proto.parse('{"type": "start"}')
    assert isinstance(late, Reject) and late.error == "start_after_audio"
    [odd] = proto.parse(b"\x00\x01\x02")
    assert isinstance(odd, Reject) and odd.error == "bad_audio"
    assert isinstance(proto.parse('{"type": "flush", "id": 7}')[0], FlushIn)
    assert isinstance(proto.parse('{"type": "finish"}')[0], FinishIn)


def test_v2_renders_words_and_one_end_of_turn_per_turn() -> None:
    proto = V2Protocol(INFO)
    high = EndOfTurnProbs(20, (0.1, 0.9, 0.2, 0.3))
    assert proto.render([high], 20, 0) == []  # no word yet: nothing has ended
    out = proto.render([TextPiece(" hi", 5, 21), Word("hi", (5,), 0.4), WordEnd(0.8), high], 21, 0)
    assert [m["type"] for m in out] == ["text", "word", "word_end", "end_of_turn"]
    assert out[1] == {"type": "word", "text": "hi", "start": 0.4, "seq": 2}
    assert [m["seq"] for m in out] == [1, 2, 3, 4]  # every transcript or state event is numbered
    assert out[3]["head"] == 1 and out[3]["probability"] == 0.9 and out[3]["time"] == (20 - 6) / 12.5
    assert proto.render([high], 22, 0) == []  # once per turn
    assert proto.flushed("f") == [{"type": "flushed", "id": "f", "seq": 5}]
    # Each numbered event is its own message (merging would skip numbers).
    sent = proto.wire([{"type": "text", "text": " a", "seq": 6}, {"type": "text", "text": "b", "seq": 7}])
    assert [json.loads(m)["seq"] for m in sent] == [6, 7]


def test_v2_keeps_events_for_a_resume_and_says_when_it_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    proto = V2Protocol(dataclasses.replace(INFO, resume_token="secret"))
    assert proto.opening()[0]["resume_token"] == "secret"
    for step in range(1, 6):
        proto.render([TextPiece(f" w{step}", 5, step)], step, 0)
    [audio] = proto.parse(np.zeros(480, "<f4").tobytes())
    assert isinstance(audio, AudioIn)
    assert [m["text"] for m in proto.replay(2) or []] == [" w3", " w4", " w5"]
    assert proto.replay(5) == []
    assert proto.resumed()["samples"] == 480 and proto.resumed()["last_seq"] == 5
    monkeypatch.setattr(v2, "MAX_REPLAY", 2)  # bounded: the oldest events go first
    forgetful = V2Protocol(dataclasses.replace(INFO, resume_token="s"))
    for step in range(1, 4):
        forgetful.render([TextPiece(f" x{step}", 5, step)], step, 0)
    assert forgetful.replay(0) is None  # event 1 is gone: a resume cannot be exact
    assert [m["seq"] for m in forgetful.replay(1) or []] == [2, 3]
    assert "resume_token" not in V2Protocol(INFO).opening()[0]


def test_kyutai_messages() -> None:
    proto = KyutaiProtocol(INFO)
    [audio] = proto.parse(msgpack.packb({"type": "Audio", "pcm": [0.0, 0.5]}))
    assert isinstance(audio, AudioIn) and audio.samples.tolist() == [0.0, 0.5]
    [marker] = proto.parse(msgpack.packb({"type": "Marker", "id": 3}))
    assert marker == MarkerIn(3)
    [bad] = proto.parse(msgpack.packb({"type": "Audio", "pcm": [float("nan")]}))
    assert isinstance(bad, Reject) and bad.code == 1007
    out = proto.render([Word("hi", (5,), 0.4), WordEnd(0.8), EndOfTurnProbs(9, (0.1, 0.2))], 9, 100)
    assert out == [{"type": "Word", "text": "hi", "start_time": 0.4},
                   {"type": "EndWord", "stop_time": 0.8},
                   {"type": "Step", "step_idx": 9, "prs": [0.1, 0.2], "buffered_pcm": 100}]
