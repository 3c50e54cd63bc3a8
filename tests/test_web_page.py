"""The status page in a real browser: Debian's chromium, headless, with a fake microphone that
plays espeak speech. Start streams it to /v2 through an AudioWorklet; words fill #transcript while
the audio plays; Stop sends `finish` and the last words come; no console error; the status panel
agrees with /readyz."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from .daemon import DaemonProcess, http_get

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)",
                allow_module_level=True)

TOKEN = "page-token"


@pytest.fixture(scope="module")
def daemon(synthetic_dir: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", "3",
                         "--auth-tokens", TOKEN)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory: pytest.TempPathFactory, speech_clips: list[np.ndarray]) -> Path:
    """About 12 s of speech as a 16-bit WAV at 48 kHz, what Chromium's fake microphone plays."""
    raw = tmp_path_factory.mktemp("mic") / "speech.f32"
    pcm = np.concatenate([speech_clips[0], np.zeros(12000, np.float32), speech_clips[2],
                          np.zeros(12000, np.float32), speech_clips[1]])
    raw.write_bytes(pcm.astype("<f4").tobytes())
    wav = raw.with_suffix(".wav")
    subprocess.run(["sox", "-t", "raw", "-e", "floating-point", "-b", "32", "-c", "1", "-r", "24000",
                    str(raw), "-b", "16", "-r", "48000", str(wav)], check=True)
    return wav


def test_page_streams_the_microphone_and_shows_the_words(daemon: DaemonProcess, speech_wav: Path) -> None:
    from playwright.sync_api import sync_playwright

    audio_seconds = float(subprocess.run(["soxi", "-D", str(speech_wav)], capture_output=True,
                                         text=True, check=True).stdout)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={speech_wav}%noloop",
            "--autoplay-policy=no-user-gesture-required", "--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(f"http://127.0.0.1:{daemon.port}/")
        # With auth_tokens set the panel asks for the token, which the page keeps in its storage.
        page.wait_for_function("document.getElementById('status-model').textContent.includes('token')")
        page.fill("#token", TOKEN)
        page.dispatch_event("#token", "change")
        page.wait_for_function("document.getElementById('total-slots').textContent === '3'")
        page.reload()  # the token survives a reload
        assert page.input_value("#token") == TOKEN

        page.click("#start")
        started = time.monotonic()
        page.wait_for_function("document.getElementById('state').textContent === 'listening'",
                               timeout=30_000)
        # Words appear while the microphone is still playing.
        page.wait_for_function("document.getElementById('transcript').textContent.trim().length > 0",
                               timeout=int(audio_seconds * 1000))
        assert time.monotonic() - started < audio_seconds
        # The status panel says what /readyz says (one slot taken by this page).
        page.wait_for_function("document.getElementById('free-slots').textContent === '2'")
        ready = json.loads(http_get(daemon.port, "/readyz", {"Authorization": f"Bearer {TOKEN}"})[1])
        assert page.text_content("#free-slots") == str(ready["free_slots"]) == "2"
        latency = page.text_content("#latency") or ""
        assert latency.endswith(" s") and float(latency.split()[0]) > 0
        while time.monotonic() - started < audio_seconds * 0.7:  # let more words come
            page.wait_for_timeout(200)
        words_before_stop = len((page.text_content("#transcript") or "").split())

        page.click("#stop")
        page.wait_for_function("document.getElementById('state').textContent === 'done'", timeout=30_000)
        words = len((page.text_content("#transcript") or "").split())
        assert words >= words_before_stop >= 3
        assert page.text_content("#error") == ""
        page.wait_for_function("document.getElementById('free-slots').textContent === '3'")
        browser.close()
    assert problems == []
    summary = daemon.wait_event("session_closed")[-1]
    assert summary["endpoint"] == "/v2" and summary["code"] == 1000
    assert float(summary["audio_s"]) > 3  # type: ignore[arg-type]


def test_page_is_served_without_a_token_and_status_needs_one(daemon: DaemonProcess) -> None:
    status, body = http_get(daemon.port, "/")
    assert status == 200 and 'id="transcript"' in body and 'id="start"' in body
    assert "http://" not in body.replace("http://www.w3.org", "")  # self-contained: no CDN
    assert http_get(daemon.port, "/status") == (200, json.dumps({"auth_required": True}) + "\n")
    assert http_get(daemon.port, "/status", {"Authorization": "Bearer wrong"})[1] == \
        json.dumps({"auth_required": True}) + "\n"
    status, body = http_get(daemon.port, "/status", {"Authorization": f"Bearer {TOKEN}"})
    info = json.loads(body)
    assert status == 200 and info["slots"] == 3 and info["device"] == "cpu"
    assert info["budget_ms"] == 80 and info["uptime_s"] > 0
