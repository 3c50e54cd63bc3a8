"""Bonjour/zeroconf adverts (python-zeroconf), so nobody types an address: `_wyoming._tcp` for
Home Assistant (it offers to add the server by itself) and `_pinguin._tcp` for the iOS app, with
the /ws path, TLS and auth in TXT records. Setting `advertise`; a daemon listening on loopback
only never advertises."""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

from .. import __version__
from ..config import Config
from ..logs import get_logger

log = get_logger("advertise")

PINGUIN_TYPE = "_pinguin._tcp.local."
WYOMING_TYPE = "_wyoming._tcp.local."


def lan_addresses() -> list[str]:
    """IPv4 addresses of this machine other than loopback (what to type in the iOS app)."""
    found: set[str] = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(str(info[4][0]))
    except OSError:
        pass
    if sys.platform == "darwin":  # the Mac's Wi-Fi / Ethernet addresses, as System Settings shows
        for interface in ("en0", "en1"):
            try:
                out = subprocess.run(["ipconfig", "getifaddr", interface], capture_output=True,
                                     text=True, timeout=2).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                out = ""
            if out:
                found.add(out)
    return sorted(a for a in found if not a.startswith("127."))


def advertised_addresses(host: str) -> list[str]:
    """The IPv4 addresses to publish for the `host` setting (none for loopback)."""
    if host in ("0.0.0.0", "::", ""):
        return lan_addresses() or ["127.0.0.1"]  # no LAN: loopback (a machine alone, or a test)
    if host.startswith("127.") or host in ("localhost", "::1"):
        return []
    return [host]


class Advert:
    """The registered services; close() withdraws them (goodbye packets)."""

    def __init__(self, zeroconf: Any, infos: list[Any]) -> None:
        self.zeroconf = zeroconf
        self.infos = infos

    async def close(self) -> None:
        for info in self.infos:
            await self.zeroconf.async_unregister_service(info)
        await self.zeroconf.async_close()


async def advertise(cfg: Config, port: int, wyoming_port: int, tls: bool) -> Advert | None:
    """Register the services; None when `advertise` is off or the daemon listens on loopback."""
    addresses = advertised_addresses(cfg.host)
    if cfg.advertise != "on" or not addresses:
        return None
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    name = socket.gethostname().split(".")[0] or "pinguin"
    packed = [socket.inet_aton(a) for a in addresses]
    server = f"{name}.local."
    infos = [AsyncServiceInfo(PINGUIN_TYPE, f"{name}.{PINGUIN_TYPE}", addresses=packed, port=port,
                              server=server, properties={
                                  "path": "/ws", "v2": "/v2", "tls": "1" if tls else "0",
                                  "auth": "1" if cfg.auth_tokens else "0", "model": cfg.model,
                                  "version": __version__})]
    if wyoming_port:
        infos.append(AsyncServiceInfo(WYOMING_TYPE, f"pinguin-daemon-{name}.{WYOMING_TYPE}",
                                      addresses=packed, port=wyoming_port, server=server,
                                      properties={"program": "pinguin-daemon"}))
    zeroconf = AsyncZeroconf(ip_version=IPVersion.V4Only)
    try:
        for info in infos:
            await zeroconf.async_register_service(info)
    except Exception as exc:  # noqa: BLE001 - no multicast here: serve anyway, say why
        log.warning("advertise_failed", error=repr(exc))
        await zeroconf.async_close()
        return None
    log.info("advertised", services=[i.name for i in infos], addresses=addresses)
    return Advert(zeroconf, infos)
