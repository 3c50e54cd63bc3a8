"""Listening sockets and the connections they accept, for every port of the daemon.

- Ports are bound before anything slow happens (the model loads afterwards), and a port in use is
  one sentence naming the setting, never a traceback.
- One budget of TCP connections across all ports (`max_connections`): the side ports (file API,
  Wyoming) together get at most `max_connections - MAIN_RESERVE`, so a flood there never starves
  the main port; past `max_connections`, the main port still takes HEALTH_RESERVE connections that
  may only ask `/healthz`, `/readyz` or `/metrics`. Anything beyond is closed at once.
- A connection that sends nothing for FIRST_BYTES_S after it is accepted is closed.
- A closed connection leaves the budget within CLOSE_S (`close_soon`), even when its peer never
  reads what was still buffered for it.
- The soft descriptor limit is raised to the hard one at start (macOS launchd's default soft
  limit is 256); the budget shrinks to fit what the system allows.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any, cast

from ..errors import UserError
from ..logs import get_logger

log = get_logger("connections")

# Connections of the main port no side port may take (sessions and health checks still fit).
MAIN_RESERVE = 64
# Connections past max_connections on the main port, for health checks and metrics only.
HEALTH_RESERVE = 16
# Descriptors kept for everything that is not a client connection (model files, logs, pipes).
FD_RESERVE = 128
# A client that connects and sends nothing for this long is closed (handshakes, idle sockets).
FIRST_BYTES_S = 10.0
# A connection closed with output still unsent gets this long to take it, then it is aborted.
CLOSE_S = 5.0
# Never ask for more descriptors than this (macOS refuses RLIM_INFINITY as a soft limit).
MAX_NOFILE = 1 << 20


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (as far as the system allows); the soft
    limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_NOFILE if hard == resource.RLIM_INFINITY else min(hard, MAX_NOFILE)
    for candidate in (target, 10240):  # 10240: macOS's OPEN_MAX, when the hard limit is unlimited
        if candidate <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (candidate, hard))
            return candidate
        except (ValueError, OSError):
            continue
    return soft


def bind(host: str, port: int, setting: str) -> socket.socket:
    """A listening TCP socket for a port setting.

    Args:
        host: the `host` setting.
        port: the port (0: any free port).
        setting: the setting's name ("port", "http_port", "wyoming_port"), for messages.

    Raises:
        UserError: the port is in use, not allowed, or `host` is not an address of this machine.
    """
    env = f"PINGUIN_{setting.upper()}"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=511)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} ({setting}, {env}) is in use by another program: stop it, "
                            f"or set {setting} to another port"
                            f"{' or 0' if setting != 'port' else ''}") from None
        if exc.errno == errno.EACCES:
            raise UserError(f"port {port} ({setting}, {env}) needs administrator rights: use a port "
                            "above 1023") from None
        if exc.errno in (errno.EADDRNOTAVAIL, socket.EAI_NONAME) or isinstance(exc, socket.gaierror):
            raise UserError(f"setting 'host' is {host!r}, which is not an address of this machine; "
                            "use 0.0.0.0 (every interface) or 127.0.0.1 (this machine only)") from None
        raise UserError(f"cannot listen on {host}:{port} ({setting}, {env}): {exc.strerror or exc}") from None


class ConnectionBudget:
    """Counts open client connections across the ports and decides on each new one."""

    def __init__(self, max_connections: int, nofile: int) -> None:
        """Args:
            max_connections: the setting.
            nofile: the soft descriptor limit in force.
        """
        usable = max(32, nofile - FD_RESERVE - HEALTH_RESERVE)
        self.limit = min(max_connections, usable)
        if self.limit < max_connections:
            log.warning("connection_limit_lowered", max_connections=max_connections, limit=self.limit,
                        nofile=nofile, note="the descriptor limit allows fewer connections; raise it "
                        "(ulimit -n, or NumberOfFiles in the launchd plist)")
        self.side_limit = max(1, self.limit - min(MAIN_RESERVE, self.limit // 4))
        self.main = 0  # open connections on the main port (reserve included)
        self.side = 0  # open connections on the side ports
        self.turned_away = 0  # connections closed at once since start

    @property
    def open(self) -> int:
        return self.main + self.side

    def enter_main(self) -> str | None:
        """"ok", "health" (past the limit: health checks only), or None (close it at once)."""
        if self.open < self.limit:
            self.main += 1
            return "ok"
        if self.open < self.limit + HEALTH_RESERVE:
            self.main += 1
            return "health"
        self._turn_away("main")
        return None

    def enter_side(self, port: str) -> bool:
        if self.side < self.side_limit and self.open < self.limit:
            self.side += 1
            return True
        self._turn_away(port)
        return False

    def _turn_away(self, port: str) -> None:
        self.turned_away += 1
        if self.turned_away == 1 or self.turned_away % 100 == 0:  # a flood logs a line per 100
            log.warning("connection_refused", port=port, open=self.open, limit=self.limit,
                        turned_away=self.turned_away)


class GatedProtocol(asyncio.Protocol):
    """Wraps a side port's protocol: counts the connection in the budget (or closes it at once)
    and closes it when the client sends nothing for FIRST_BYTES_S."""

    def __init__(self, inner: asyncio.Protocol, budget: ConnectionBudget, port: str) -> None:
        self.inner = inner
        self.budget = budget
        self.port = port
        self.admitted = False
        self._silence: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)
        if not self.budget.enter_side(self.port):
            stream.abort()
            return
        self.admitted = True
        self._silence = asyncio.get_running_loop().call_later(FIRST_BYTES_S, stream.abort)
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            return
        self.admitted = False
        self.budget.side -= 1
        if self._silence is not None:
            self._silence.cancel()
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._silence is not None:
            self._silence.cancel()
            self._silence = None
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def __getattr__(self, name: str) -> Any:  # anything else the transport or a stream asks for
        return getattr(self.inner, name)


async def serve_gated(factory: Any, sock: socket.socket, budget: ConnectionBudget, port: str,
                      ssl: Any = None) -> asyncio.Server:
    """Serve a side port's protocol on an already bound socket, through the budget."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: GatedProtocol(factory(), budget, port), sock=sock, ssl=ssl,
                                    ssl_handshake_timeout=FIRST_BYTES_S if ssl is not None else None)


def close_soon(transport: asyncio.WriteTransport) -> None:
    """Close a connection, and abort it if it is still there CLOSE_S later.

    A close waits until the write buffer is empty before the connection is lost (uvloop, asyncio):
    a peer that never reads would keep it, and its place in the budget, forever. An abort of a
    connection already lost does nothing.
    """
    transport.close()
    asyncio.get_running_loop().call_later(CLOSE_S, transport.abort)


def close_quietly(sock: socket.socket | None) -> None:
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass
