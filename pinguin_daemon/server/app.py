"""The daemon: loads the model, then listens; routes /ws, /healthz, /readyz; shuts down in order.

Lifecycle (a small state machine; a signal only changes the state):
    starting -> serving -> draining -> stopped
- starting: the engine thread loads and warms the model; the port is not open yet.
- serving: sessions are admitted up to max_sessions; one more is refused with 1013.
- draining (SIGTERM/SIGINT): the listener closes; each open session gets its last words and a
  1001; after shutdown_timeout the rest are cut. Exit 0.
If the engine thread dies, sessions are closed with 1011 and the daemon exits 1 (launchd restarts).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import secrets
import signal
import ssl
import time
from http import HTTPStatus
from importlib import resources
from urllib.parse import urlsplit

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from ..audio.encoder import EncoderPool
from ..config import Config
from ..engine.loop import REALTIME_BUDGET_S, Engine
from ..errors import UserError
from ..logs import get_logger
from ..model.loader import LoadedModel, load_model
from ..model.store import resolve
from .advertise import lan_addresses
from .auth import token_ok
from .codes import HEALTH_PATH, METRICS_PATH, PAGE_PATH, READY_PATH, STATUS_PATH, WS_PATH, Close
from .frontends import Frontends, start_frontends
from .metrics import CONTENT_TYPE, Metrics
from .protocols import PROTOCOLS, SessionInfo
from .session import Session

log = get_logger("daemon")

# Incoming messages websockets buffers per connection before it stops reading the socket.
MAX_QUEUE = 16
# Outgoing bytes buffered per connection before send() waits for the client to read.
WRITE_LIMIT = 64 * 1024
# A session arriving when every slot is taken looks for one this many times, this far apart, before
# 1013 (1 s on an idle machine). Counted in looks, not wall time: while something stalls the whole
# process (rustymimi holds the GIL for each encoder build, ~0.35 s), the event loop cannot process
# the closes that free slots, and that time must not count against the newcomer.
ADMISSION_POLLS = 50
ADMISSION_POLL_S = 0.02


class Daemon:
    """Owns the listener, the session records and the shutdown; the engine owns the model."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.engine = Engine(self._load_model, cfg.max_sessions, cfg.temperature, cfg.seed, cfg.engine,
                             cfg.encoder)
        self.encoders: EncoderPool | None = None
        self.frontends = Frontends()  # file API, Wyoming, adverts: started once serving
        self.sessions: dict[str, Session] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}  # handler task per session
        self.state = "starting"
        self.stop_requested = asyncio.Event()
        self.stopping = asyncio.Event()  # tells sessions to finish
        self.refused = 0
        self._ids = itertools.count(1)
        self.port = 0
        self.metrics = Metrics(lambda: self.engine.free_slots)
        self.started = time.monotonic()
        # The status page: static, self-contained (the Mac may be offline), read once.
        self.page = (resources.files("pinguin_daemon") / "web" / "index.html").read_bytes()
        self.engine.on_step = self.metrics.observe_step

    def _load_model(self) -> LoadedModel:
        """Runs on the engine thread."""
        files = resolve(self.cfg.model, self.cfg.quantization)
        return load_model(files, self.cfg.dtype, self.cfg.quantization)

    def request_stop(self) -> None:
        """Signal handler: only changes state."""
        if not self.stop_requested.is_set():
            log.info("shutdown_requested", sessions=len(self.sessions))
        self.stop_requested.set()

    # ---- HTTP side ----------------------------------------------------------------------------
    def _json(self, connection: ServerConnection, status: int, body: dict[str, object]) -> Response:
        return self._body(connection, (json.dumps(body) + "\n").encode(), "application/json", status)

    def _body(self, connection: ServerConnection, body: bytes, content_type: str,
              status: int = HTTPStatus.OK) -> Response:
        response = connection.respond(status, "")
        response.body = body
        del response.headers["Content-Type"]
        del response.headers["Content-Length"]
        response.headers["Content-Type"] = content_type
        response.headers["Content-Length"] = str(len(body))
        return response

    def status(self) -> dict[str, object]:
        """What the status page shows: the model, where it computes, slots, step times."""
        model = self.engine.model
        by_endpoint: dict[str, int] = {}
        for session in self.sessions.values():
            by_endpoint[session.protocol.path] = by_endpoint.get(session.protocol.path, 0) + 1
        return {
            "state": self.state, "model": self.cfg.model,
            "dtype": model.dtype if model is not None else self.cfg.dtype,
            "device": self.engine.device, "encoder": self.engine.encoder,
            "slots": self.cfg.max_sessions, "free_slots": self.engine.free_slots,
            "sessions": len(self.sessions), "sessions_by_endpoint": by_endpoint,
            "step_ms": self.metrics.step_percentiles_ms(), "budget_ms": round(REALTIME_BUDGET_S * 1000),
            "uptime_s": round(time.monotonic() - self.started, 1),
        }

    def _authorized(self, request: Request) -> bool:
        return token_ok(self.cfg.auth_tokens, request.headers, urlsplit(request.path).query)

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == HEALTH_PATH:  # liveness carries no data: open even with auth_tokens
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == PAGE_PATH and "upgrade" not in request.headers.get("Connection", "").lower():
            # The page holds no data (it asks /status and /v2 with the token the user types).
            return self._body(connection, self.page, "text/html; charset=utf-8")
        authorized = self._authorized(request)
        if path == STATUS_PATH and not authorized:
            # The page asks before the user has typed a token: say one is needed, and nothing
            # else (a 401 would also do, but browsers log every 401 as a console error).
            return self._json(connection, HTTPStatus.OK, {"auth_required": True})
        if not authorized:
            # Logged without the token or the query string.
            log.warning("unauthorized", path=path, peer=str(connection.remote_address[0])
                        if connection.remote_address else "")
            return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong token: send it in "
                                      "the kyutai-api-key header, as Authorization: Bearer, or ?token=\n")
        serving = self.state == "serving" and self.engine.alive
        if path == METRICS_PATH:
            return self._body(connection, self.metrics.render(), CONTENT_TYPE)
        if path == STATUS_PATH:
            return self._json(connection, HTTPStatus.OK, self.status())
        if path == READY_PATH:
            # Ready = would accept one more session now: a full daemon answers 503 too, so a load
            # balancer (deploy/haproxy.cfg) sends no session it would refuse with 1013.
            free = self.engine.free_slots
            ready = serving and free > 0
            return self._json(connection, HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, {
                "ready": ready, "state": self.state, "engine_alive": self.engine.alive,
                "full": serving and free == 0,
                "sessions": len(self.sessions),
                "free_slots": free,
                "model": self.cfg.model, "device": self.engine.device, "encoder": self.engine.encoder,
            })
        if path not in PROTOCOLS:
            return connection.respond(HTTPStatus.NOT_FOUND, f"unknown path {path}: stream audio to "
                                      f"{', '.join(PROTOCOLS)}\n")
        if not serving:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"daemon is {self.state}\n")
        return None

    # ---- sessions -----------------------------------------------------------------------------
    async def handler(self, ws: ServerConnection) -> None:
        assert self.engine.model is not None
        session_id = f"{next(self._ids):05d}-{secrets.token_hex(3)}"
        bound = log.bind(session_id=session_id, peer=str(ws.remote_address[0]) if ws.remote_address else "")
        model = self.engine.model
        info = SessionInfo(session_id, self.cfg.model, model.files.asr_delay_seconds,
                           model.asr_delay_steps, model.vad_heads, self.cfg.eot_head,
                           self.cfg.eot_threshold, self.cfg.vad_interval)
        protocol = PROTOCOLS[urlsplit(ws.request.path).path](info)  # type: ignore[union-attr]
        session = Session(ws, session_id, self.engine, self.encoders, protocol, self.stopping, self.metrics)
        if not await self._admit(session_id, session):
            self.refused += 1
            self.metrics.sessions_refused.inc()
            reason = f"server full: all {self.cfg.max_sessions} slots are busy, try again later"
            bound.warning("session_refused", reason=reason)
            await ws.close(Close.TRY_AGAIN, reason)
            return
        self.sessions[session_id] = session
        task = asyncio.current_task()
        assert task is not None
        self.tasks[session_id] = task
        self.metrics.sessions_open.inc()
        self.metrics.sessions_opened.labels(endpoint=protocol.path).inc()
        bound.info("session_opened", endpoint=protocol.path, sessions=len(self.sessions))
        code, reason = int(Close.INTERNAL), "internal error"
        try:
            code, reason = await session.run()
        except asyncio.CancelledError:
            code, reason = int(Close.INTERNAL), "session cancelled"
            raise
        except Exception:
            bound.exception("session_failed")
            await ws.close(Close.INTERNAL, "internal error")
        finally:
            session.release()
            self.sessions.pop(session_id, None)
            self.tasks.pop(session_id, None)
            self.metrics.sessions_open.dec()
            self.metrics.sessions_closed.labels(code=str(int(code))).inc()
            level = logging.INFO if code in (Close.NORMAL, Close.GOING_AWAY, 1000, 1001) else logging.WARNING
            bound.log(level, "session_closed", code=int(code), reason=reason, **session.summary())

    async def _admit(self, session_id: str, session: Session) -> bool:
        """Take a slot, waiting a moment when all are taken: a slot whose client has just gone (a
        phone reconnecting after a Wi-Fi switch) frees meanwhile, so a client is never refused by
        its own ghost. False: still full (1013) or not serving."""
        for _ in range(ADMISSION_POLLS):
            if self.state != "serving":
                return False
            if self.engine.open_session(session_id, session.sink):
                return True
            await asyncio.sleep(ADMISSION_POLL_S)
        return False

    # ---- lifecycle ----------------------------------------------------------------------------
    async def _wait_engine_ready(self) -> LoadedModel:
        loop = asyncio.get_running_loop()
        while not await loop.run_in_executor(None, self.engine.ready.wait, 0.2):
            if self.engine.failed is not None or not self.engine.alive:
                failure = self.engine.failed
                if isinstance(failure, UserError):
                    raise failure
                raise RuntimeError(f"the inference engine failed to start: {failure!r}")
        assert self.engine.model is not None
        return self.engine.model

    async def _engine_watch(self) -> None:
        while self.engine.alive:
            await asyncio.sleep(0.5)

    async def run(self) -> int:
        """Start, serve until a signal or an engine failure, drain, stop. Returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        started = time.perf_counter()
        self.engine.start()
        try:
            ssl_context = self._ssl_context()
            model = await self._wait_engine_ready()
            self.metrics.model_load_seconds.set(self.engine.load_seconds)
            threads = 0
            if self.engine.encoder == "rustymimi":  # otherwise the engine encodes in its batch
                threads = self.cfg.encoder_threads or min(self.cfg.max_sessions, os.cpu_count() or 1)
                self.encoders = EncoderPool(model.make_audio_tokenizer, self.cfg.max_sessions, threads)
                try:
                    await loop.run_in_executor(self.encoders.builder, self.encoders.preload)
                except Exception as exc:  # rustymimi reports bad files with plain exceptions
                    raise UserError(f"Mimi codec {model.files.mimi_path} cannot be loaded: {exc}") from None
            async with serve(self.handler, self.cfg.host, self.cfg.port,
                             process_request=self.process_request,
                             max_size=self.cfg.max_message_bytes, max_queue=MAX_QUEUE,
                             write_limit=WRITE_LIMIT, compression=None, ssl=ssl_context,
                             logger=logging.getLogger("websockets")) as server:
                self.port = int(server.sockets[0].getsockname()[1])
                self.frontends = await start_frontends(self.cfg, self.port, ssl_context)
                self._log_listening(model, threads, time.perf_counter() - started)
                self.state = "serving"
                return await self._serve_until_stop(server)
        finally:
            self.engine.stop()
            if self.encoders is not None:
                self.encoders.shutdown()
            self.state = "stopped"

    def _ssl_context(self) -> ssl.SSLContext | None:
        """TLS for wss:// when tls_cert and tls_key are set (both or neither)."""
        cert, key = self.cfg.tls_cert, self.cfg.tls_key
        if not cert and not key:
            return None
        if not (cert and key):
            raise UserError("settings 'tls_cert' and 'tls_key' go together: set both or neither")
        for name, value in (("tls_cert", cert), ("tls_key", key)):
            if not os.path.isfile(value):
                raise UserError(f"setting '{name}' names {value}, which does not exist")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise UserError(f"cannot use tls_cert {cert} with tls_key {key}: {exc}") from None
        return context

    def _log_listening(self, model: LoadedModel, threads: int, startup_s: float) -> None:
        host = self.cfg.host
        hosts = lan_addresses() if host in ("0.0.0.0", "::", "") else [host]
        ws, http = ("wss", "https") if self.cfg.tls_cert else ("ws", "http")
        urls = [f"{ws}://{h}:{self.port}{WS_PATH}" for h in hosts] or [f"{ws}://127.0.0.1:{self.port}{WS_PATH}"]
        for h in hosts:
            log.info(f"Local network address: {http}://{h}:{self.port}")
        if not hosts:
            log.warning("no_lan_address", note="no LAN address found; give the phone this machine's "
                        "IP address (System Settings > Network) and port")
        log.info("listening", host=host, port=self.port, urls=urls, model=model.files.source,
                 dtype=model.dtype, quantization=model.quantization, slots=self.cfg.max_sessions,
                 vad_heads=model.vad_heads, delay_s=model.files.asr_delay_seconds,
                 device=self.engine.device, encoder=self.engine.encoder, encoder_threads=threads,
                 encoder_memory=("~450 MB per active session (rustymimi)" if self.encoders is not None
                                 else "shared by all sessions (batched MLX Mimi)"),
                 engine=self.cfg.engine, http_port=self.frontends.http_port,
                 wyoming_port=self.frontends.wyoming_port,
                 startup_s=round(startup_s, 2))
        if model.files.synthetic:
            log.warning("synthetic_model", note="serving a synthetic model with random weights: "
                        "transcripts are meaningless; set 'model' to kyutai/stt-1b-en_fr-mlx")

    async def _serve_until_stop(self, server: Server) -> int:
        stop = asyncio.ensure_future(self.stop_requested.wait())
        watch = asyncio.ensure_future(self._engine_watch())
        await asyncio.wait({stop, watch}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        watch.cancel()
        if not self.engine.alive:
            self.state = "failed"
            log.error("engine_died", error=repr(self.engine.failed), sessions=len(self.sessions))
            await self._cut_sessions(Close.INTERNAL, "inference engine stopped; try again later")
            await self.frontends.stop()
            server.close()
            await server.wait_closed()
            return 1
        self.state = "draining"
        server.close(close_connections=False)  # stop accepting; open sessions carry on
        await self.frontends.stop()
        self.stopping.set()
        deadline = time.monotonic() + self.cfg.shutdown_timeout
        while self.tasks and time.monotonic() < deadline:
            await asyncio.wait(list(self.tasks.values()), timeout=deadline - time.monotonic())
        if self.sessions:
            log.warning("shutdown_deadline", sessions=list(self.sessions))
        await self._cut_sessions(Close.GOING_AWAY, "server shutting down")
        server.close()
        await server.wait_closed()
        log.info("stopped", refused=self.refused)
        return 0

    async def _cut_sessions(self, code: int, reason: str) -> None:
        """Close every open session now and cancel its handler (it releases its slot)."""
        for sid, session in list(self.sessions.items()):
            await session.ws.close(code, reason)
            task = self.tasks.get(sid)
            if task is not None:
                task.cancel()


def serve_forever(cfg: Config) -> int:
    """Run the daemon on uvloop; returns the process exit code."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        with structlog.contextvars.bound_contextvars(pid=os.getpid()):
            return runner.run(Daemon(cfg).run())
