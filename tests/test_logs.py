"""Logging: library lines come out once, and the service's log file rotates (10 MB, 5 kept)."""

from __future__ import annotations

import json
import logging.handlers
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pinguin_daemon import logs

HUB_WARNING = 'logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")'


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter: logging is configured once per process."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("hub_imported_first", [True, False])
def test_huggingface_hub_lines_are_printed_once(tmp_path: Path, hub_imported_first: bool) -> None:
    """huggingface_hub has a handler of its own; its lines went out twice (plain, then JSON)."""
    hub_import = "import huggingface_hub.file_download"
    proc = run_python(f"""
        import logging
        {hub_import if hub_imported_first else ""}
        from pinguin_daemon.logs import configure_logging
        configure_logging("json", "info")
        {"" if hub_imported_first else hub_import}
        {HUB_WARNING}
        """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    record = json.loads(lines[0])
    assert record["event"] == "Retrying in 1s [Retry 1/5]." and record["level"] == "warning"


def test_the_log_file_rotates_and_keeps_five(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "daemon.log"
    proc = run_python(f"""
        from pathlib import Path
        from pinguin_daemon import logs
        logs.LOG_FILE_MAX_BYTES = 2000  # the real size is checked below; this keeps the test small
        logs.configure_logging("auto", "info", log_file=Path({str(log_file)!r}))
        log = logs.get_logger("test")
        for i in range(400):
            log.info("line", i=i)
        """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # everything went to the file
    names = sorted(p.name for p in log_file.parent.iterdir())
    assert names == ["daemon.log", *(f"daemon.log.{n}" for n in range(1, 6))]
    for path in log_file.parent.iterdir():
        assert path.stat().st_size <= 2000
        records = [json.loads(line) for line in path.read_text().splitlines()]  # JSON: not a terminal
        assert records and all(r["event"] == "line" for r in records)
    newest = [json.loads(line)["i"] for line in log_file.read_text().splitlines()]
    assert newest[-1] == 399


def test_rotation_is_ten_megabytes_keeping_five(tmp_path: Path) -> None:
    handler = logs.rotating_file_handler(tmp_path / "daemon.log")
    try:
        assert isinstance(handler, logging.handlers.RotatingFileHandler)
        assert handler.maxBytes == 10 * 1024 * 1024 and handler.backupCount == 5
    finally:
        handler.close()


def test_an_unwritable_log_file_is_one_sentence(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(logs.UserError, match=r"cannot write the log file .*daemon\.log \(setting"):
        logs.rotating_file_handler(blocker / "daemon.log")
