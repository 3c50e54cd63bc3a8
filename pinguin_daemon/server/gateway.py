"""The one door to the engine: admission, the registry of open sessions, idle timeouts, draining
and cuts, and each session's summary log line, the same for every front end."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..engine.loop import Engine
from ..logs import get_logger
from .codes import Close
from .metrics import Metrics
from .session import Ending, Listener, Session

log = get_logger("session")

# A session arriving when every slot is taken waits this long for one before it is refused: a
# slot whose client has just gone (a phone reconnecting after a Wi-Fi switch) frees meanwhile, so
# a client is never refused by its own ghost.
ADMISSION_WAIT_S = 1.0
ADMISSION_POLL_S = 0.02
# How often idle sessions are looked for.
IDLE_CHECK_S = 0.25
# How long a cut waits for a client's close handshake (all clients at once).
CUT_CLOSE_S = 5.0
# Ended normally (info in the log); anything else is a warning.
CLEAN_CODES = (Close.NORMAL, Close.GOING_AWAY)


class Refused(Exception):
    """No slot for a new session; `str(exc)` is the reason to give the client."""

    def __init__(self, reason: str, busy: bool) -> None:
        super().__init__(reason)
        self.busy = busy  # every slot is taken (try again soon), else the daemon is not serving


class Gateway:
    """Admits sessions into the engine's slots and keeps the registry of the open ones."""

    def __init__(self, engine: Engine, max_sessions: int, idle_timeout: float,
                 metrics: Metrics | None = None) -> None:
        """Args:
            engine: the inference engine (owns the slots).
            max_sessions: its slot count (for messages).
            idle_timeout: seconds without anything from a client before its session ends (0: never).
            metrics: the daemon's metrics.
        """
        self.engine = engine
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.serving = False  # the daemon admits sessions (set once the model is warm)
        self.refused = 0  # sessions refused since start
        self._ids = itertools.count(1)
        self._watch: asyncio.Task[None] | None = None

    @property
    def delay_steps(self) -> int:
        model = self.engine.model
        assert model is not None, "sessions open once the model is loaded"
        return model.asr_delay_steps

    def new_id(self) -> str:
        """A session id: a counter for reading logs, a random part for uniqueness across restarts."""
        return f"{next(self._ids):05d}-{secrets.token_hex(3)}"

    def start(self) -> None:
        """Start admitting sessions and watching for idle ones."""
        self.serving = True
        if self._watch is None and self.idle_timeout > 0:
            self._watch = asyncio.create_task(self._watch_idle())

    async def stop(self) -> None:
        self.serving = False
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None

    # ---- admission ----------------------------------------------------------------------------
    async def open(self, frontend: str, peer: str, listener: Listener,
                   session_id: str | None = None) -> Session:
        """A new session with a slot of its own.

        Args:
            frontend: the front end's name ("/ws", "/v2", "files", "wyoming", ...).
            peer: the client's address.
            listener: receives the session's events.
            session_id: the id, when the front end needed it before (default: a new one).

        Raises:
            Refused: every slot stayed busy for ADMISSION_WAIT_S, or the daemon is not serving.
        """
        session = Session(session_id or self.new_id(), frontend, peer, self.engine, self.delay_steps,
                          listener, self.metrics)
        bound = log.bind(session_id=session.id, peer=peer, frontend=frontend)
        deadline = time.monotonic() + ADMISSION_WAIT_S
        while True:
            if not self.serving:
                raise self._refuse(bound, "server shutting down; try again later", busy=False)
            if self.engine.open_session(session.id, session.sink):
                break
            if time.monotonic() >= deadline:
                raise self._refuse(bound, f"server full: all {self.max_sessions} slots are busy, "
                                   "try again later", busy=True)
            await asyncio.sleep(ADMISSION_POLL_S)
        session.task = asyncio.current_task()
        self.sessions[session.id] = session
        if self.metrics is not None:
            self.metrics.sessions_open.inc()
            self.metrics.sessions_opened.labels(endpoint=frontend).inc()
        bound.info("session_opened", sessions=len(self.sessions))
        return session

    def _refuse(self, bound: object, reason: str, busy: bool) -> Refused:
        self.refused += 1
        if self.metrics is not None:
            self.metrics.sessions_refused.inc()
        bound.warning("session_refused", reason=reason)  # type: ignore[attr-defined]
        return Refused(reason, busy)

    def close(self, session: Session, ending: Ending | None = None) -> None:
        """Free the slot (if not yet), forget the session, log its summary line. Idempotent."""
        session.release()
        if self.sessions.pop(session.id, None) is None:
            return
        ending = ending or session.ending or Ending(1006, "connection lost")
        if self.metrics is not None:
            self.metrics.sessions_open.dec()
            self.metrics.sessions_closed.labels(code=str(int(ending.code))).inc()
        level = logging.INFO if ending.code in CLEAN_CODES else logging.WARNING
        log.bind(session_id=session.id, peer=session.peer, frontend=session.frontend).log(
            level, "session_closed", code=int(ending.code), reason=ending.reason, **session.summary())

    @asynccontextmanager
    async def session(self, frontend: str, peer: str, listener: Listener,
                      session_id: str | None = None) -> AsyncIterator[Session]:
        """`open`, then `close` however the block ends (an exception is a 1011 in the log)."""
        session = await self.open(frontend, peer, listener, session_id)
        try:
            yield session
        except asyncio.CancelledError:
            self.close(session, session.ending or Ending(Close.INTERNAL, "session cancelled"))
            raise
        except Exception:
            log.bind(session_id=session.id, peer=peer, frontend=frontend).exception("session_failed")
            self.close(session, Ending(Close.INTERNAL, "internal error"))
            raise
        self.close(session)

    # ---- the daemon's decisions ---------------------------------------------------------------
    def drain(self) -> None:
        """Refuse new sessions; ask every open one to finish (its last words, then its end)."""
        self.serving = False
        for session in list(self.sessions.values()):
            session.interrupt(Ending(Close.GOING_AWAY, "server shutting down"))

    async def cut(self, code: int, reason: str) -> None:
        """End every open session now: its front end closes its client, its task is cancelled
        (which frees the slot)."""
        sessions = list(self.sessions.values())
        for session in sessions:
            session.ending = session.ending or Ending(code, reason)

        async def close_client(session: Session) -> None:
            if session.closer is not None:
                try:
                    await asyncio.wait_for(session.closer(code, reason), CUT_CLOSE_S)
                except Exception:  # noqa: BLE001 - a client already gone, or not reading
                    pass

        await asyncio.gather(*(close_client(session) for session in sessions))  # all at once
        for session in sessions:
            if session.task is not None and session.task is not asyncio.current_task():
                session.task.cancel()
            self.close(session)

    async def wait_closed(self, timeout: float) -> bool:
        """Wait until no session is open (True) or `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.sessions

    async def _watch_idle(self) -> None:
        reason = f"idle: nothing received for {self.idle_timeout:g} s"
        while True:
            await asyncio.sleep(min(IDLE_CHECK_S, self.idle_timeout / 4))
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if session.idle_for(now) >= self.idle_timeout and session.interruption is None:
                    log.bind(session_id=session.id, peer=session.peer, frontend=session.frontend).info(
                        "session_idle", seconds=self.idle_timeout)
                    session.interrupt(Ending(Close.POLICY, reason, "idle"))
