"""Starting: every port is bound before the model loads, and a port another program holds is one
line naming the setting and its environment variable, exit status 2, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# A requirement of the issue, not a speed claim: the person at the Mac waits for this answer.
ANSWER_WITHIN_S = 5.0


@pytest.mark.parametrize("setting", ["port", "http_port", "wyoming_port"])
def test_a_port_in_use_is_one_line_and_exit_2(synthetic_dir: Path, setting: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = {"port": 0, "http_port": 0, "wyoming_port": 0, setting: busy}
        started = time.monotonic()
        flags = [arg for name, value in ports.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
        proc = subprocess.run([sys.executable, "-m", "pinguin_daemon", "serve", "--host", "127.0.0.1",
                               "--model", str(synthetic_dir), "--log-format", "json", *flags],
                              capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"pinguin-daemon: error: port {busy} ({setting}, PINGUIN_{setting.upper()}) is in use by another "
        f"program: stop it, or set {setting} to another port{' or 0' if setting != 'port' else ''}")
    assert "Traceback" not in proc.stderr and "engine_ready" not in proc.stderr  # the model never loaded
    assert elapsed < ANSWER_WITHIN_S, (elapsed, proc.stderr)
