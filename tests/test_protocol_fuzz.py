"""Fuzz the three wire parsers (random and mutated valid messages): every input becomes commands
or a documented close code (1003, 1007) with a reason that fits a close frame; never an
exception (the daemon's 1011), never a hang. Then a sample of the same inputs on the real daemon."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pinguin_daemon.server.protocols import (
    AudioIn,
    FinishIn,
    FlushIn,
    KyutaiProtocol,
    MarkerIn,
    Protocol,
    Reject,
    Reply,
    SeedProtocol,
    SessionInfo,
    V2Protocol,
)

from .daemon import DaemonProcess

INFO = SessionInfo("sid", "synthetic", 0.5, 6, 4, 1, 0.5, 0)
DOCUMENTED_REJECTS = {1003, 1007}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=10), inner, max_size=6)), max_leaves=30)
pack_values = st.recursive(st.one_of(scalars, st.binary(max_size=40)), lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=10), inner, max_size=6)), max_leaves=30)

V2_TYPES = st.sampled_from(["start", "flush", "finish", "dance", "", "START"])
v2_controls = st.builds(
    lambda kind, fields: json.dumps({**fields, "type": kind}),
    V2_TYPES,
    st.dictionaries(st.sampled_from(["encoding", "sample_rate", "vad_interval", "id", "extra"]),
                    st.one_of(st.sampled_from(["f32", "s16", "mp3"]), st.integers(-10, 100_000), json_values),
                    max_size=4))
v2_messages = st.one_of(
    v2_controls,
    st.builds(json.dumps, json_values),
    st.text(max_size=200),
    st.binary(max_size=400),
    st.integers(1, 40).map(lambda depth: "[" * (depth * 2000) + "]" * (depth * 2000)),
    st.integers(1, 40).map(lambda depth: '{"type": "flush", "id": ' + "[" * (depth * 2000)),
)
kyutai_messages = st.one_of(
    st.builds(lambda kind, pcm: msgpack.packb({"type": kind, "pcm": pcm}, use_bin_type=True),
              st.sampled_from(["Audio", "Marker", "Nope"]), pack_values),
    st.builds(lambda kind, marker: msgpack.packb({"type": kind, "id": marker}, use_bin_type=True),
              st.sampled_from(["Marker", "Audio"]), pack_values),
    st.builds(lambda v: msgpack.packb(v, use_bin_type=True), pack_values),
    st.binary(max_size=400),
    st.text(max_size=100),
    st.integers(1, 40).map(lambda depth: b"\x91" * (depth * 2000) + b"\xc0"),
)
seed_messages = st.one_of(st.binary(max_size=400), st.text(max_size=100),
                          st.lists(st.floats(width=32), max_size=100).map(
                              lambda xs: np.array(xs, "<f4").tobytes()))
v2_starts = st.one_of(st.none(), st.builds(
    lambda enc, rate: json.dumps({"type": "start", "encoding": enc, "sample_rate": rate}),
    st.sampled_from(["f32", "s16"]), st.sampled_from([8000, 16000, 24000, 44100, 48000])))


def check(protocol: Protocol, message: str | bytes) -> list[Any]:
    commands = protocol.commands(message)
    for command in commands:
        assert isinstance(command, AudioIn | FlushIn | FinishIn | MarkerIn | Reply | Reject)
        if isinstance(command, Reject):
            assert command.code in DOCUMENTED_REJECTS, command
            assert command.reason and len(command.reason.encode()) <= 123, command
        if isinstance(command, AudioIn):
            assert command.samples.dtype == np.float32 and command.samples.ndim == 1
            assert np.isfinite(command.samples).all()
    return commands


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(v2_starts, st.lists(v2_messages, min_size=1, max_size=4))
def test_v2_parser_never_fails(start: str | None, messages: list[str | bytes]) -> None:
    protocol = V2Protocol(INFO)
    if start is not None:
        check(protocol, start)
    for message in messages:
        if any(isinstance(c, Reject) for c in check(protocol, message)):
            break


@FUZZ
@given(st.lists(kyutai_messages, min_size=1, max_size=4))
def test_kyutai_parser_never_fails(messages: list[str | bytes]) -> None:
    protocol = KyutaiProtocol(INFO)
    for message in messages:
        if any(isinstance(c, Reject) for c in check(protocol, message)):
            break


@FUZZ
@given(seed_messages)
def test_seed_parser_never_fails(message: str | bytes) -> None:
    check(SeedProtocol(INFO), message)


# ---- the same kinds of input on the real daemon ----------------------------------------------
@pytest.fixture(scope="module")
def daemon(synthetic_dir: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", "2")
    yield proc
    proc.stop()


END_OF_STREAM: dict[str, str | bytes | None] = {"/ws": b"", "/v2": json.dumps({"type": "finish"}),
                                                "/api/asr-streaming": None}


async def one_connection(port: int, path: str, messages: list[str | bytes]) -> int:
    """Send the messages, then the endpoint's end of stream (or a client close); the close code."""
    async with connect(f"ws://127.0.0.1:{port}{path}", max_size=None) as ws:
        try:
            async with asyncio.timeout(60):  # never a hang
                for message in messages:
                    await ws.send(message)
                end = END_OF_STREAM[path]
                if end is None:
                    await ws.close()
                else:
                    await ws.send(end)
                async for _ in ws:
                    pass
        except ConnectionClosed:
            pass
        assert ws.close_code is not None
        return ws.close_code


LIVE = settings(max_examples=12, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@LIVE
@given(st.one_of(
    st.tuples(st.just("/v2"), st.lists(v2_messages, min_size=1, max_size=3)),
    st.tuples(st.just("/api/asr-streaming"), st.lists(kyutai_messages, min_size=1, max_size=3)),
    st.tuples(st.just("/ws"), st.lists(seed_messages, min_size=1, max_size=3)),
))
def test_the_daemon_closes_every_fuzzed_session_with_a_documented_code(
        daemon: DaemonProcess, case: tuple[str, list[str | bytes]]) -> None:
    path, messages = case
    code = asyncio.run(one_connection(daemon.port, path, messages))
    assert code in {1000, 1003, 1007}, (path, code)
    assert not daemon.events("session_failed")
