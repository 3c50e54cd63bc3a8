"""Test helpers: real speech from espeak-ng, and a fake Hugging Face hub on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote

import numpy as np


def speech(text: str, cache_dir: Path, voice: str = "en") -> np.ndarray:
    """`text` spoken by espeak-ng, as float32 mono at 24 kHz (cached by text and voice)."""
    key = hashlib.sha1(f"{voice}|{text}".encode()).hexdigest()[:16]
    raw = cache_dir / f"speech-{key}.f32"
    if not raw.exists():
        for tool in ("espeak-ng", "sox"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed (apt-get install espeak-ng sox)")
        cache_dir.mkdir(parents=True, exist_ok=True)
        wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text],
                             check=True, capture_output=True).stdout
        pcm = subprocess.run(["sox", "-t", "wav", "-", "-t", "raw", "-e", "floating-point",
                              "-b", "32", "-c", "1", "-r", "24000", "-"],
                             input=wav, check=True, capture_output=True).stdout
        raw.write_bytes(pcm)
    return np.frombuffer(raw.read_bytes(), dtype="<f4").copy()


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """Serves `/{owner}/{repo}/resolve/{revision}/{file}` the way the hub does."""

    root: Path  # directory holding owner/repo/ folders
    commit = "0123456789abcdef0123456789abcdef01234567"

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def _target(self) -> Path | None:
        parts = unquote(self.path.split("?")[0]).strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return None
        repo_dir = self.root / parts[0] / parts[1]
        if not repo_dir.is_dir():
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
            return None
        path = repo_dir / "/".join(parts[4:])
        if not path.is_file():
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            return None
        return path

    def _headers(self, path: Path) -> None:
        etag = hashlib.sha256(path.read_bytes()).hexdigest()
        self.send_response(200)
        self.send_header("X-Repo-Commit", self.commit)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802
        path = self._target()
        if path is not None:
            self._headers(path)

    def do_GET(self) -> None:  # noqa: N802
        path = self._target()
        if path is not None:
            self._headers(path)
            self.wfile.write(path.read_bytes())


@contextmanager
def fake_hub(root: Path) -> Iterator[str]:
    """Run a fake hub serving the repos under `root`; yields its endpoint URL."""
    handler = type("Handler", (_HubHandler,), {"root": root})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
