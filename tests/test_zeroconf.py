"""Bonjour/zeroconf: a browser finds `_pinguin._tcp` (path, TLS, auth in TXT) and `_wyoming._tcp`
(what Home Assistant discovers). Multicast stays inside a network namespace the test makes, with
only a loopback interface: no packet leaves this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .daemon import DaemonProcess

BROWSE = r"""
import json, sys, time
from zeroconf import IPVersion, ServiceBrowser, Zeroconf
found = {}
class Listener:
    def add_service(self, zc, kind, name):
        info = zc.get_service_info(kind, name, timeout=3000)
        if info is not None:
            props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
            found[kind] = {"name": name, "port": info.port, "addresses": info.parsed_addresses(),
                           "properties": props}
    update_service = add_service
    def remove_service(self, zc, kind, name):
        pass
zc = Zeroconf(ip_version=IPVersion.V4Only)
browser = ServiceBrowser(zc, ["_pinguin._tcp.local.", "_wyoming._tcp.local."], Listener())
deadline = time.time() + 15
while len(found) < 2 and time.time() < deadline:
    time.sleep(0.1)
zc.close()
print(json.dumps(found))
"""


@pytest.fixture
def namespace() -> Iterator[str]:
    """A network namespace with only `lo`, multicast routed to it."""
    name = f"pinguin-zc-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        if os.environ.get("CI"):
            raise AssertionError(f"cannot make a network namespace: {made.stderr}")
        pytest.skip(f"cannot make a network namespace here (root and iproute2 needed): {made.stderr}")
    try:
        for cmd in (["link", "set", "lo", "up"], ["link", "set", "lo", "multicast", "on"],
                    ["route", "add", "224.0.0.0/4", "dev", "lo"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_a_zeroconf_browser_finds_both_services(synthetic_dir: Path, namespace: str) -> None:
    wyoming_port = 10300
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", "1",
                         "--host", "0.0.0.0", "--wyoming-port", str(wyoming_port), "--auth-tokens", "t",
                         "--wyoming-allow", "192.168.1.20",
                         prefix=("ip", "netns", "exec", namespace))
    try:
        proc.wait_event("advertised")
        out = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", BROWSE],
                             capture_output=True, text=True, timeout=60, check=True)
        found = json.loads(out.stdout)
        pinguin = found["_pinguin._tcp.local."]
        assert pinguin["port"] == proc.port and pinguin["addresses"] == ["127.0.0.1"]
        assert pinguin["properties"]["path"] == "/ws"
        assert (pinguin["properties"]["tls"], pinguin["properties"]["auth"]) == ("0", "1")
        wyoming = found["_wyoming._tcp.local."]
        assert wyoming["port"] == wyoming_port and wyoming["name"].startswith("pinguin-daemon-")
    finally:
        proc.stop()


def test_a_daemon_on_loopback_only_does_not_advertise(synthetic_dir: Path) -> None:
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", "1")
    try:
        assert proc.events("listening") and not proc.events("advertised")
    finally:
        proc.stop()


def test_wyoming_is_advertised_only_while_someone_may_use_it() -> None:
    from pinguin_daemon.server.wyoming_server import advertised

    assert advertised(auth_required=False, allow=())  # no tokens: a trusted LAN, open to all
    assert advertised(auth_required=True, allow=("192.168.1.20",))
    assert not advertised(auth_required=True, allow=())  # tokens and nobody allowed: hidden
