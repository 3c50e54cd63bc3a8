"""The front ends that are not the WebSocket port: OpenAI's file API (`http_port`), Wyoming for
Home Assistant (`wyoming_port`) and their Bonjour/zeroconf adverts (`advertise`). They reach the
engine through the daemon's own /v2 over loopback."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..logs import get_logger
from .auth import token_ok
from .loopback import Endpoint

log = get_logger("frontends")


def loopback_endpoint(cfg: Config, port: int, tls: bool) -> Endpoint:
    """The daemon's own /v2 as its front ends reach it."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "", "localhost") else cfg.host
    host = f"[{host}]" if ":" in host else host
    context = None
    if tls:  # our own certificate, on our own address: nothing to verify
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return Endpoint(f"{'wss' if tls else 'ws'}://{host}:{port}/v2",
                    cfg.auth_tokens[0] if cfg.auth_tokens else None, context)


@dataclass
class Frontends:
    """What was started, with the ports actually bound (0 when off)."""

    file_api: Any = None
    wyoming: Any = None
    advert: Any = None
    http_port: int = 0
    wyoming_port: int = 0

    async def stop(self) -> None:
        """Stop taking new work (open sessions drain through /v2 as any other)."""
        if self.advert is not None:
            await self.advert.close()
        if self.wyoming is not None:
            await self.wyoming.stop()
        if self.file_api is not None:
            await self.file_api.stop()


async def start_frontends(cfg: Config, port: int, ssl_context: ssl.SSLContext | None) -> Frontends:
    """Start the file API and the Wyoming server as configured; advertise them."""
    endpoint = loopback_endpoint(cfg, port, ssl_context is not None)
    started = Frontends()
    if cfg.http_port:
        from .http_api import FileApi

        started.file_api = FileApi(endpoint, lambda h, q: token_ok(cfg.auth_tokens, h, q),
                                   cfg.max_upload_bytes)
        await started.file_api.start(cfg.host, cfg.http_port, ssl_context)
        started.http_port = started.file_api.port
    if cfg.wyoming_port:
        from .wyoming_server import start_wyoming

        started.wyoming = await start_wyoming(cfg.host, cfg.wyoming_port, endpoint, cfg.model)
        started.wyoming_port = started.wyoming.port
    from .advertise import advertise

    started.advert = await advertise(cfg, port, started.wyoming_port, ssl_context is not None)
    return started
