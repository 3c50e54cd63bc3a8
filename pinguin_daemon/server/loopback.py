"""A client of the daemon's own /v2, over loopback, for the front ends that are not WebSockets
(the OpenAI file API, Wyoming). They get exactly what a /v2 client gets: the same slots (a
full daemon answers 1013, which they turn into their own "busy"), the same engine, the same text.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ..model.loader import SAMPLE_RATE
from .codes import Close


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the daemon's own /v2 is, and how to get in."""

    url: str  # ws://127.0.0.1:PORT/v2 (wss:// with TLS)
    token: str | None  # one of auth_tokens, when set
    ssl: ssl.SSLContext | None  # for wss:// to ourselves: the certificate is not checked


class Busy(Exception):
    """Every slot is taken (the daemon answered 1013)."""


@dataclass
class Transcript:
    """What a /v2 session produced."""

    text: str = ""  # the pieces, as /ws would send them, joined (leading space stripped)
    words: list[dict[str, Any]] = field(default_factory=list)  # {"word", "start", "end"}
    turns: list[int] = field(default_factory=list)  # index into words where each turn ended


class V2Stream:
    """One /v2 session: open, send audio, collect events, finish."""

    def __init__(self, endpoint: Endpoint, sample_rate: int = SAMPLE_RATE, encoding: str = "f32") -> None:
        self.endpoint = endpoint
        self.sample_rate = sample_rate
        self.encoding = encoding
        self.result = Transcript()
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pieces: list[str] = []
        self.on_text: Any = None  # called with each piece of text as it arrives

    async def open(self) -> None:
        headers = {"Authorization": f"Bearer {self.endpoint.token}"} if self.endpoint.token else None
        self._ws = await connect(self.endpoint.url, additional_headers=headers, ssl=self.endpoint.ssl,
                                 max_size=None, compression=None)
        try:
            first = json.loads(await self._ws.recv())
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == Close.TRY_AGAIN:
                raise Busy(exc.rcvd.reason) from None
            raise
        assert first["type"] == "ready"
        if (self.sample_rate, self.encoding) != (SAMPLE_RATE, "f32"):
            await self._ws.send(json.dumps({"type": "start", "encoding": self.encoding,
                                            "sample_rate": self.sample_rate}))
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for message in self._ws:
                event = json.loads(message)
                kind = event["type"]
                if kind == "text":
                    self._pieces.append(event["text"])
                    if self.on_text is not None:
                        self.on_text(event["text"])
                elif kind == "word":
                    self.result.words.append({"word": event["text"], "start": event["start"],
                                              "end": event["start"]})
                elif kind == "word_end" and self.result.words:
                    self.result.words[-1]["end"] = event["stop"]
                elif kind == "end_of_turn":
                    self.result.turns.append(len(self.result.words))
        except ConnectionClosed:
            pass

    async def send(self, audio: bytes | np.ndarray) -> None:
        assert self._ws is not None
        await self._ws.send(audio if isinstance(audio, bytes) else audio.astype("<f4").tobytes())

    async def finish(self) -> Transcript:
        """Send `finish`, wait for the last words and the close; the transcript."""
        assert self._ws is not None and self._reader is not None
        await self._ws.send(json.dumps({"type": "finish"}))
        await self._reader
        if self._ws.close_code != Close.NORMAL:
            raise ConnectionError(f"the daemon closed the session with {self._ws.close_code}: "
                                  f"{self._ws.close_reason}")
        self.result.text = "".join(self._pieces).strip()
        return self.result

    async def abort(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


async def transcribe(endpoint: Endpoint, samples: np.ndarray, chunk: int = 24000) -> Transcript:
    """A whole recording (float32 mono 24 kHz) through /v2, as fast as the engine steps it."""
    stream = V2Stream(endpoint)
    await stream.open()
    try:
        for start in range(0, len(samples), chunk):
            await stream.send(samples[start:start + chunk])
        return await stream.finish()
    except BaseException:
        await stream.abort()
        raise
