"""Fan-out to one socket: a slow reader gets its text merged, never dropped, and past the bound
its session is marked for closing (1008) without touching the engine."""

from __future__ import annotations

import asyncio

from pinguin_daemon.engine.events import TextPiece
from pinguin_daemon.server.protocols import SeedProtocol, SessionInfo
from pinguin_daemon.server.session import MAX_UNSENT_TEXT_BYTES, Session


class GatedSocket:
    """A client that reads only when the test opens the gate."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.gate = asyncio.Event()

    async def send(self, text: str) -> None:
        await self.gate.wait()
        self.sent.append(text)


def piece(text: str) -> TextPiece:
    return TextPiece(text, 100, 1)


def test_slow_reader_gets_merged_text_then_is_cut_off() -> None:
    async def scenario() -> tuple[list[str], bool, bool]:
        ws = GatedSocket()
        info = SessionInfo("s", "synthetic", 0.5, 6, 0, 1, 0.5, 0)
        session = Session(ws, "s", engine=None, encoders=None,  # type: ignore[arg-type]
                          protocol=SeedProtocol(info), stopping=asyncio.Event())
        sender = asyncio.create_task(session._send_loop())
        session._deliver([piece(" hel")])
        await asyncio.sleep(0.01)  # the sender is now stuck in send(" hel")
        session._deliver([piece("lo")])
        session._deliver([])  # a step without text
        session._deliver([piece(" world")])
        assert session.stepped == 4
        ws.gate.set()
        await asyncio.sleep(0.01)
        before = session.too_slow.is_set()
        ws.gate.clear()
        session._deliver([piece(" x")])
        await asyncio.sleep(0.01)
        session._deliver([piece("y" * (MAX_UNSENT_TEXT_BYTES + 1))])
        sender.cancel()
        return ws.sent, before, session.too_slow.is_set()

    sent, slow_before, slow_after = asyncio.run(scenario())
    assert sent == [" hel", "lo world"]
    assert not slow_before and slow_after
