"""The daemon: binds its ports, loads the model, serves every front end, shuts down in order.

Lifecycle (a small state machine; a signal only changes the state):
    starting -> serving -> draining -> stopped
- starting: every port is bound first (a port in use stops the daemon at once, in one line);
  health checks answer while the engine thread loads and warms the model, sessions get 503.
- serving: sessions are admitted up to max_sessions through the gateway, from every front end.
- draining (SIGTERM/SIGINT): the listeners stop accepting; each open session, whatever its front
  end, gets its last words and its protocol's end; after shutdown_timeout the rest are cut. Exit 0.
If the engine thread dies, sessions are cut (1011) and the daemon exits 1 (launchd restarts it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import time
from collections.abc import Sequence
from http import HTTPStatus
from importlib import resources
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from ..blas import blas_description, blas_warning
from ..config import DEPRECATED, Config, resolve_dtype
from ..engine.loop import REALTIME_BUDGET_S, Engine, mlx_device
from ..errors import UserError
from ..logs import get_logger
from ..model.loader import LoadedModel, load_model
from ..model.store import resolve
from .advertise import Advert, advertise, lan_addresses
from .auth import matching_token, origin_allowed, token_ok
from .codes import HEALTH_PATH, METRICS_PATH, PAGE_PATH, READY_PATH, STATUS_PATH, WS_PATH, Close
from .connections import ConnectionBudget, bind, close_quietly, raise_nofile_limit, serve_gated
from .gateway import Gateway
from .metrics import CONTENT_TYPE, Metrics
from .protocols import PROTOCOLS, SessionInfo
from .protocols.openai_realtime import MAX_EVENT_BYTES as REALTIME_MAX_EVENT_BYTES
from .protocols.openai_realtime import OpenAIRealtimeProtocol
from .session import Ending
from .websocket import Resumables, resume_connection, serve_connection

log = get_logger("daemon")

# Incoming messages websockets buffers per connection before it stops reading the socket.
MAX_QUEUE = 16
# Outgoing bytes buffered per connection before send() waits for the client to read.
WRITE_LIMIT = 64 * 1024
# A WebSocket handshake (TLS included) must complete within this many seconds.
OPEN_TIMEOUT_S = 10.0
# Paths a connection past max_connections may still ask (the health reserve).
HEALTH_PATHS = (HEALTH_PATH, READY_PATH, METRICS_PATH)


def select_subprotocol(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """Browsers' OpenAI realtime clients ask for "realtime" (their key rides in another offered
    subprotocol, checked with the tokens): answer with it. Other clients offer none."""
    return Subprotocol("realtime") if "realtime" in offered else None


class Daemon:
    """Owns the listeners, the gateway and the shutdown; the engine owns the model."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.engine = Engine(self._load_model, cfg.max_sessions, cfg.temperature, cfg.seed, cfg.engine)
        self.metrics = Metrics(lambda: self.engine.free_slots)
        self.engine.on_step = self.metrics.observe_step
        self.gateway = Gateway(self.engine, cfg.max_sessions, cfg.idle_timeout, self.metrics)
        # /v2 sessions that survive a dropped connection for resume_grace seconds (0: off).
        self.resumables = (Resumables(self.gateway, cfg.resume_grace, self.metrics)
                           if cfg.resume_grace > 0 else None)
        self.state = "starting"
        self.stop_requested = asyncio.Event()
        self.port = 0
        self.http_port = 0
        self.wyoming_port = 0
        self.budget = ConnectionBudget(cfg.max_connections, 1 << 20)  # resized at start
        self.started = time.monotonic()
        self.ssl_context: ssl.SSLContext | None = None
        self._side_servers: list[asyncio.Server] = []  # file API and Wyoming listeners
        self.file_api: Any = None
        self.wyoming: Any = None
        self.advert: Advert | None = None
        # The status page: static, self-contained (the Mac may be offline), read once.
        self.page = (resources.files("pinguin_daemon") / "web" / "index.html").read_bytes()

    def _load_model(self) -> LoadedModel:
        """Runs on the engine thread."""
        files = resolve(self.cfg.model, self.cfg.quantization)
        return load_model(files, resolve_dtype(self.cfg.dtype, mlx_device()), self.cfg.quantization)

    def request_stop(self) -> None:
        """Signal handler: only changes state."""
        if not self.stop_requested.is_set():
            log.info("shutdown_requested", sessions=len(self.gateway.sessions))
        self.stop_requested.set()

    # ---- HTTP side of the main port -----------------------------------------------------------
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

    @property
    def serving(self) -> bool:
        return self.state == "serving" and self.engine.alive

    def _model_facts(self) -> dict[str, object]:
        model = self.engine.model
        return {"model": self.cfg.model,
                "dtype": model.dtype if model is not None else self.cfg.dtype,
                "end_of_turn": (model.vad_heads > 0) if model is not None else None,
                "device": self.engine.device, "encoder": "mlx", "blas": blas_description()}

    def status(self) -> dict[str, object]:
        """What the status page shows: the model, where it computes, slots, step times."""
        by_endpoint: dict[str, int] = {}
        for session in self.gateway.sessions.values():
            by_endpoint[session.frontend] = by_endpoint.get(session.frontend, 0) + 1
        return {
            "state": self.state, **self._model_facts(),
            "slots": self.cfg.max_sessions, "free_slots": self.engine.free_slots,
            "sessions": len(self.gateway.sessions), "sessions_by_endpoint": by_endpoint,
            "connections": self.budget.open, "max_connections": self.budget.limit,
            "resumable": self.resumables.counts() if self.resumables is not None else None,
            "step_ms": self.metrics.step_percentiles_ms(), "budget_ms": round(REALTIME_BUDGET_S * 1000),
            "uptime_s": round(time.monotonic() - self.started, 1),
        }

    def _ready(self) -> tuple[bool, dict[str, object]]:
        free = self.engine.free_slots
        ready = self.serving and free > 0
        return ready, {"ready": ready, "state": self.state, "engine_alive": self.engine.alive,
                       "full": self.serving and free == 0, "sessions": len(self.gateway.sessions),
                       "free_slots": free, **self._model_facts()}

    def _authorized(self, request: Request) -> bool:
        return token_ok(self.cfg.auth_tokens, request.headers, urlsplit(request.path).query)

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        peer = str(connection.remote_address[0]) if connection.remote_address else ""
        if getattr(connection, "admission", "ok") == "health" and path not in HEALTH_PATHS:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections: try again "
                                      "later\n")
        if path == HEALTH_PATH:  # liveness carries no data: open even with auth_tokens
            return connection.respond(HTTPStatus.OK, "ok\n")
        upgrade = "upgrade" in request.headers.get("Connection", "").lower()
        if path == PAGE_PATH and not upgrade:
            # The page holds no data (it asks /status and /v2 with the token the user types).
            return self._body(connection, self.page, "text/html; charset=utf-8")
        if upgrade and not origin_allowed(request.headers, self.cfg.allowed_origins):
            # A web page from elsewhere must not stream to (or hold the slots of) this daemon.
            log.warning("origin_refused", path=path, peer=peer,
                        origin=request.headers.get("Origin", "")[:200])
            return connection.respond(HTTPStatus.FORBIDDEN, "this web origin may not use the daemon: add it "
                                      "to allowed_origins\n")
        authorized = self._authorized(request)
        if path == STATUS_PATH and not authorized:
            # The page asks before the user has typed a token: say one is needed, and nothing
            # else (a 401 would also do, but browsers log every 401 as a console error).
            return self._json(connection, HTTPStatus.OK, {"auth_required": True})
        if not authorized:
            # Logged without the token or the query string.
            log.warning("unauthorized", path=path, peer=peer)
            return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong token: send it in "
                                      "the kyutai-api-key header, as Authorization: Bearer, or ?token=\n")
        if path == METRICS_PATH:
            return self._body(connection, self.metrics.render(), CONTENT_TYPE)
        if path == STATUS_PATH:
            return self._json(connection, HTTPStatus.OK, self.status())
        if path == READY_PATH:
            # Ready = would accept one more session now: a full daemon answers 503 too, so a load
            # balancer (deploy/haproxy.cfg) sends no session it would refuse with 1013.
            ready, body = self._ready()
            return self._json(connection, HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, body)
        if path not in PROTOCOLS:
            return connection.respond(HTTPStatus.NOT_FOUND, f"unknown path {path}: stream audio to "
                                      f"{', '.join(PROTOCOLS)}\n")
        if not self.serving:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"daemon is {self.state}\n")
        return None

    # ---- WebSocket sessions -------------------------------------------------------------------
    async def handler(self, ws: ServerConnection) -> None:
        model = self.engine.model
        assert model is not None and ws.request is not None
        url = urlsplit(ws.request.path)
        path = url.path
        owner = matching_token(self.cfg.auth_tokens, ws.request.headers, url.query)
        query = parse_qs(url.query)
        if path == "/v2" and "resume" in query:
            if self.resumables is None:
                await ws.close(Close.RESUME_UNKNOWN, "resume: resume_grace is 0 on this daemon")
                return
            last_seq = query.get("last_seq", ["0"])[0]
            if not (last_seq.isascii() and last_seq.isdigit() and len(last_seq) <= 18):
                await ws.close(Close.BAD_PAYLOAD, "resume: last_seq must be a non-negative integer")
                return
            await resume_connection(self.gateway, ws, self.resumables, query["resume"][0], int(last_seq),
                                    owner)
            return
        # The SDK appends up to 15 MiB of base64 at once: allowed once the session has a slot.
        big = None
        if path == OpenAIRealtimeProtocol.path:
            big = max(self.cfg.max_message_bytes, REALTIME_MAX_EVENT_BYTES)
        session_id = self.gateway.new_id()
        token = secrets.token_urlsafe(24) if path == "/v2" and self.resumables is not None else None
        info = SessionInfo(session_id, self.cfg.model, model.files.asr_delay_seconds,
                           model.asr_delay_steps, model.vad_heads, self.cfg.eot_head,
                           self.cfg.eot_threshold, self.cfg.vad_interval, token)
        await serve_connection(self.gateway, ws, path, PROTOCOLS[path](info), session_id, self.metrics,
                               self.resumables, token, owner, big)

    def _connection_class(self) -> type[ServerConnection]:
        """websockets' connection, counted in the connection budget (past it: closed at once)."""
        budget = self.budget

        class CountedConnection(ServerConnection):
            admission: str | None = None  # "ok", "health" (the reserve: health checks only), None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                self.admission = budget.enter_main()
                if self.admission is None:
                                cast(asyncio.Transport, transport).abort()

            def connection_lost(self, exc: Exception | None) -> None:
                if self.admission is not None:
                    budget.main -= 1
                    self.admission = None
                super().connection_lost(exc)

        return CountedConnection

    # ---- lifecycle ----------------------------------------------------------------------------
    def _bind_all(self) -> list[tuple[str, socket.socket]]:
        """Every port, bound now: one sentence and exit 2 for a port in use, before the model loads."""
        bound: list[tuple[str, socket.socket]] = []
        try:
            for setting, port in (("port", self.cfg.port), ("http_port", self.cfg.http_port),
                                  ("wyoming_port", self.cfg.wyoming_port)):
                if setting == "port" or port:
                    bound.append((setting, bind(self.cfg.host, port, setting)))
        except UserError:
            for _, sock in bound:
                close_quietly(sock)
            raise
        return bound

    async def _start_side_ports(self, sockets: dict[str, socket.socket]) -> None:
        from .http_api import FileApi
        from .wyoming_server import WyomingServer

        if "http_port" in sockets:
            self.file_api = FileApi(self.gateway, lambda h, q: token_ok(self.cfg.auth_tokens, h, q),
                                    self.cfg.model, self.cfg.max_upload_bytes, self.cfg.max_upload_seconds,
                                    self.cfg.allowed_origins, (self.cfg.eot_head, self.cfg.eot_threshold))
            await self.file_api.setup()
            self._side_servers.append(await serve_gated(self.file_api.protocol, sockets["http_port"],
                                                        self.budget, "http_port", self.ssl_context))
            self.http_port = int(sockets["http_port"].getsockname()[1])
        if "wyoming_port" in sockets:
            self.wyoming = WyomingServer(self.gateway, self.cfg.model, bool(self.cfg.auth_tokens),
                                         self.cfg.wyoming_allow, (self.cfg.eot_head, self.cfg.eot_threshold))
            self._side_servers.append(await serve_gated(
                self.wyoming.protocol_factory, sockets["wyoming_port"], self.budget, "wyoming_port"))
            self.wyoming_port = int(sockets["wyoming_port"].getsockname()[1])

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
        """Bind, load, serve until a signal or an engine failure, drain, stop. The exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        started = time.perf_counter()
        self.ssl_context = self._ssl_context()
        nofile = raise_nofile_limit()
        self.budget = ConnectionBudget(self.cfg.max_connections, nofile)
        self._log_settings_notes()
        bound = self._bind_all()
        sockets = dict(bound)
        try:
            async with serve(self.handler, sock=sockets["port"], process_request=self.process_request,
                             max_size=self.cfg.max_message_bytes, max_queue=MAX_QUEUE,
                             write_limit=WRITE_LIMIT, compression=None, ssl=self.ssl_context,
                             open_timeout=OPEN_TIMEOUT_S, create_connection=self._connection_class(),
                             select_subprotocol=select_subprotocol,
                             logger=logging.getLogger("websockets")) as server:
                self.port = int(sockets["port"].getsockname()[1])
                await self._start_side_ports(sockets)
                self.engine.start()
                loading = asyncio.ensure_future(self._wait_engine_ready())
                stop = asyncio.ensure_future(self.stop_requested.wait())
                await asyncio.wait({loading, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if not loading.done():  # a signal while the model loads: nothing to drain
                    loading.cancel()
                    log.info("stopped", note="stopped while the model was loading")
                    return 0
                model = loading.result()
                self.metrics.model_load_seconds.set(self.engine.load_seconds)
                self.gateway.start()
                self.state = "serving"
                self.advert = await advertise(self.cfg, self.port, self._advertised_wyoming_port(),
                                              self.ssl_context is not None)
                self._log_listening(model, time.perf_counter() - started, nofile)
                return await self._serve_until_stop(server)
        finally:
            self.engine.stop()
            for _, sock in bound:
                close_quietly(sock)
            self.state = "stopped"

    def _advertised_wyoming_port(self) -> int:
        from .wyoming_server import advertised

        if not self.wyoming_port:
            return 0
        if not advertised(bool(self.cfg.auth_tokens), self.cfg.wyoming_allow):
            log.info("wyoming_not_advertised", note="auth_tokens is set and wyoming_allow is empty: nobody "
                     "may use the Wyoming port, so Home Assistant is not offered it")
            return 0
        return self.wyoming_port

    def _log_settings_notes(self) -> None:
        for item in self.cfg.deprecated:
            name = item.split(" ")[0]
            log.warning("deprecated_setting", setting=item, note=f"ignored: {DEPRECATED[name]}; remove it")
        warning = blas_warning()
        if warning is not None:
            log.warning("slow_blas", note=warning)

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

    def _log_listening(self, model: LoadedModel, startup_s: float, nofile: int) -> None:
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
                 device=self.engine.device, encoder="mlx (batched in the engine's step)",
                 blas=blas_description(), engine=self.cfg.engine, http_port=self.http_port,
                 wyoming_port=self.wyoming_port, max_connections=self.budget.limit, nofile=nofile,
                 idle_timeout=self.cfg.idle_timeout, startup_s=round(startup_s, 2))
        if model.files.synthetic:
            log.warning("synthetic_model", note="serving a synthetic model with random weights: "
                        "transcripts are meaningless; set 'model' to kyutai/stt-1b-en_fr-candle")

    async def _stop_listening(self, server: Server) -> None:
        """Stop accepting on every port; open sessions carry on."""
        server.close(close_connections=False)
        for side in self._side_servers:
            side.close()
        if self.advert is not None:
            await self.advert.close()
            self.advert = None

    async def _close_side_ports(self) -> None:
        if self.wyoming is not None:
            await self.wyoming.close_idle()
        if self.file_api is not None:
            await self.file_api.stop()

    async def _serve_until_stop(self, server: Server) -> int:
        stop = asyncio.ensure_future(self.stop_requested.wait())
        watch = asyncio.ensure_future(self._engine_watch())
        await asyncio.wait({stop, watch}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        watch.cancel()
        if not self.engine.alive:
            self.state = "failed"
            log.error("engine_died", error=repr(self.engine.failed), sessions=len(self.gateway.sessions))
            await self.gateway.stop()
            await self.gateway.cut(1011, "inference engine stopped; try again later")
            await self._stop_listening(server)
            await self._close_side_ports()
            server.close()
            await server.wait_closed()
            return 1
        self.state = "draining"
        await self._stop_listening(server)
        self.gateway.drain()
        if self.resumables is not None:  # nobody to tell the last words to
            self.resumables.end_waiting(Ending(Close.GOING_AWAY, "server shutting down"))
        if self.wyoming is not None:  # Wyoming connections with no stream have nothing to finish
            await self.wyoming.close_quiet()
        if not await self.gateway.wait_closed(self.cfg.shutdown_timeout):
            log.warning("shutdown_deadline", sessions=list(self.gateway.sessions))
        await self.gateway.stop()
        await self.gateway.cut(1001, "server shutting down")
        await self._close_side_ports()
        server.close()
        await server.wait_closed()
        log.info("stopped", refused=self.gateway.refused)
        return 0


def serve_forever(cfg: Config) -> int:
    """Run the daemon on uvloop; returns the process exit code."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        with structlog.contextvars.bound_contextvars(pid=os.getpid()):
            return runner.run(Daemon(cfg).run())
