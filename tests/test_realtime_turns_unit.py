"""/v1/realtime attributes every piece of text to exactly one turn, in order, whatever the
client does between the voice detector's and the model's events (no daemon: the protocol alone)."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

from pinguin_daemon.audio.vad import SpeechStarted, SpeechStopped
from pinguin_daemon.engine.events import EndOfTurnProbs, TextPiece
from pinguin_daemon.server.protocols import AudioIn, Reply
from pinguin_daemon.server.protocols.base import SessionInfo
from pinguin_daemon.server.protocols.openai_realtime import MAX_ECHO, OpenAIRealtimeProtocol

# 4 end-of-turn heads, a delay of 6 steps: the text of step s is about (s - 6) / 12.5 s of audio.
INFO = SessionInfo("sid", "synthetic", 0.5, 6, 4, 1, 0.5, 0)


def completed(items: list[Any]) -> list[str]:
    return [i["transcript"] for i in items
            if i["type"] == "conversation.item.input_audio_transcription.completed"]


def text(proto: OpenAIRealtimeProtocol, piece: str, step: int) -> list[Any]:
    return proto.render([TextPiece(piece, 0, step)], step, 0)


def send(proto: OpenAIRealtimeProtocol, event: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for command in proto.parse(json.dumps(event)):
        if isinstance(command, Reply):
            out += command.items
    return out


def append(proto: OpenAIRealtimeProtocol, seconds: float) -> None:
    pcm = np.zeros(int(24000 * seconds), "<i2").tobytes()
    [command] = proto.parse(json.dumps({"type": "input_audio_buffer.append",
                                        "audio": base64.b64encode(pcm).decode()}))
    assert isinstance(command, AudioIn)


def test_speech_going_on_past_the_models_end_of_turn_is_the_next_turn() -> None:
    proto = OpenAIRealtimeProtocol(INFO)
    send(proto, {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}}})
    out = proto.on_vad([SpeechStarted(0, 0)])
    out += text(proto, " Turn", 10) + text(proto, " on", 12)
    out += proto.render([EndOfTurnProbs(20, (0.9, 0.1, 0.1, 0.1))], 20, 0)  # the voice goes on
    out += text(proto, " and the fan", 25)
    out += proto.on_vad([SpeechStopped(2400)])
    out += proto.render([EndOfTurnProbs(40, (0.9, 0.1, 0.1, 0.1))], 40, 0)
    assert completed(out) == ["Turn on", "and the fan"]


def test_a_clear_spares_the_turn_whose_speech_had_ended() -> None:
    proto = OpenAIRealtimeProtocol(INFO)  # server_vad
    append(proto, 1.2)
    out = proto.on_vad([SpeechStarted(0, 0)]) + text(proto, " hello", 10)
    out += proto.on_vad([SpeechStopped(1000)])
    out += send(proto, {"type": "input_audio_buffer.clear"})
    out += text(proto, " world", 16)  # 0.8 s: before the speech ended
    out += proto.render([], 20, 0)  # decoded past the end of the speech
    assert completed(out) == ["hello world"]


def test_text_waiting_for_a_turn_comes_first_when_turn_detection_goes_off() -> None:
    proto = OpenAIRealtimeProtocol(INFO)
    out = text(proto, " first", 10)  # no speech heard yet: waits for the next turn
    out += send(proto, {"type": "session.update", "session": {"type": "transcription", "audio": {
        "input": {"turn_detection": None}}}})
    out += text(proto, " second", 14)
    out += proto.flushed(None)  # the commit
    assert completed(out) == ["first second"]


def test_closing_completes_the_turn_that_has_text() -> None:
    proto = OpenAIRealtimeProtocol(INFO)
    append(proto, 1.0)
    out = proto.on_vad([SpeechStarted(0, 0)]) + text(proto, " going", 10)
    out += proto.closing(1001, "server shutting down", None)
    assert completed(out) == ["going"]
    assert completed(OpenAIRealtimeProtocol(INFO).closing(1001, "server shutting down", None)) == []


def test_what_is_echoed_of_a_client_event_stays_small() -> None:
    proto = OpenAIRealtimeProtocol(INFO)
    [error] = send(proto, {"type": "x" * 100_000, "event_id": "e" * 1_000_000})
    assert len(error["error"]["event_id"]) == MAX_ECHO
    assert len(json.dumps(error)) < 2 * MAX_ECHO + 500
    [error] = send(proto, {"type": "session.update", "session": {"audio": {"input": {
        "transcription": {"prompt": "p" * 100_000}}}}})
    assert error["error"]["code"] == "string_above_max_length"
    assert error["error"]["param"] == "session.audio.input.transcription.prompt"
    [error] = send(proto, {"type": "session.update", "session": {"audio": {"input": {
        "turn_detection": {"type": "semantic_vad", "eagerness": []}}}}})  # was a TypeError: 1007
    assert error["error"]["param"] == "turn_detection.eagerness"
    [updated] = send(proto, {"type": "session.update", "session": {"audio": {"input": {
        "transcription": {"prompt": "kitchen lights"}}}}})  # the session went on
    assert updated["session"]["audio"]["input"]["transcription"]["prompt"] == "kitchen lights"
