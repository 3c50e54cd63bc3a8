"""structlog, configured once: key=value on a terminal, JSON lines otherwise."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

import structlog

from .errors import UserError

# A log file rolls over at this size, keeping this many older files (daemon.log.1 ... .5): a
# service that runs for a year keeps at most 60 MB of logs.
LOG_FILE_MAX_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 5


def rotating_file_handler(path: Path) -> logging.Handler:
    """The service's log file, rotated at LOG_FILE_MAX_BYTES with LOG_FILE_BACKUPS older files kept.

    The daemon rotates it itself: launchd opens the files named by StandardOutPath and
    StandardErrorPath once, for the life of the process, and never reopens them, so a file renamed
    under it (newsyslog) would go on growing under its new name.

    Args:
        path: the log file; its directory is created.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return logging.handlers.RotatingFileHandler(path, maxBytes=LOG_FILE_MAX_BYTES,
                                                    backupCount=LOG_FILE_BACKUPS, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write the log file {path} (setting 'log_file'): "
                        f"{exc.strerror or exc}") from None


def _route_library_loggers() -> None:
    """Make huggingface_hub's log lines go through structlog only.

    huggingface_hub adds a StreamHandler of its own to its logger when it is first imported, and
    its records also propagate to the root logger: every warning (each retry of an unreachable
    hub, say) came out twice, once plain and once as JSON. Importing it here, then dropping its
    handler, leaves the root logger's handler as the only one, whatever is imported later.
    """
    try:
        import huggingface_hub.utils.logging  # noqa: F401 - the import installs the handler
    except ImportError:
        return
    logging.getLogger("huggingface_hub").handlers.clear()


def configure_logging(fmt: str = "auto", level: str = "info", log_file: Path | None = None) -> None:
    """Configure structlog and route the stdlib loggers (websockets, huggingface_hub) through it.

    Args:
        fmt: "auto" (console on a TTY, JSON otherwise), "console" or "json".
        level: minimum level name.
        log_file: write to this file instead of stderr, rotated at LOG_FILE_MAX_BYTES with
            LOG_FILE_BACKUPS older files kept (the launchd service); "auto" then means JSON.
    """
    use_json = fmt == "json" or (fmt == "auto" and (log_file is not None or not sys.stderr.isatty()))
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    handler = rotating_file_handler(log_file) if log_file is not None else logging.StreamHandler(sys.stderr)
    # The console renderer prints tracebacks itself; JSON needs them turned into an "exception"
    # string, or a failure's log line says exc_info=true and nothing else.
    tracebacks: list[structlog.typing.Processor] = [structlog.processors.format_exc_info] if use_json else []
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tracebacks, renderer],
        foreign_pre_chain=shared,
    ))
    root = logging.getLogger()
    for previous in root.handlers:  # a log file configured before (tests configure twice) is closed
        if isinstance(previous, logging.FileHandler):
            previous.close()
    root.handlers[:] = [handler]
    _route_library_loggers()
    root.setLevel(numeric)
    # websockets logs every HTTP request and close at INFO; the daemon logs sessions itself.
    logging.getLogger("websockets").setLevel(max(numeric, logging.WARNING))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger bound to a component name."""
    return structlog.get_logger(name)
