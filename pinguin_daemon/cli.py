"""`pinguin-daemon` command line: serve, download, check-model, synthetic-model."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from .config import CHOICES, DEFAULT_MODEL, DEPRECATED, Config, load_config
from .errors import UserError


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config setting (later wins: file < env < flags)."""
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML config file (default: $PINGUIN_CONFIG, else built-in defaults)")
    for name in _setting_names():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name,
                            choices=CHOICES.get(name), help=f"overrides '{name}'")
    for name in DEPRECATED:  # accepted and ignored (a line in the log says so)
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, help=argparse.SUPPRESS)


def _setting_names() -> list[str]:
    return [f.name for f in fields(Config) if f.name != "deprecated"]


def config_from_args(args: argparse.Namespace) -> Config:
    """The one Config for this process, from --config / $PINGUIN_CONFIG, env and flags."""
    path = args.config
    if path is None and os.environ.get("PINGUIN_CONFIG"):
        path = Path(os.environ["PINGUIN_CONFIG"])
    names = [*_setting_names(), *DEPRECATED]
    return load_config(path, overrides={name: getattr(args, name, None) for name in names})


def config_path_from_args(args: argparse.Namespace) -> Path | None:
    """The config file this process reads: --config, else $PINGUIN_CONFIG, else none."""
    if args.config is not None:
        return Path(args.config)
    return Path(os.environ["PINGUIN_CONFIG"]) if os.environ.get("PINGUIN_CONFIG") else None


def warn_if_config_readable(path: Path | None) -> None:
    """Log one warning when the config holds auth_tokens that other accounts can read."""
    from .logs import get_logger
    from .service import config_permission_warning

    warning = config_permission_warning(path) if path is not None else None
    if warning:
        get_logger("config").warning("config_readable_by_others", path=str(path), detail=warning)


def cmd_serve(args: argparse.Namespace) -> int:
    from .logs import configure_logging
    from .server.app import serve_forever

    cfg = config_from_args(args)
    configure_logging(cfg.log_format, cfg.log_level,
                      Path(cfg.log_file).expanduser() if cfg.log_file else None)
    warn_if_config_readable(config_path_from_args(args))
    return serve_forever(cfg)


def quiet_hub_retries() -> None:
    """huggingface_hub logs each retry of an unreachable hub; the CLI's one-sentence error says it."""
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()


def cmd_download(args: argparse.Namespace) -> int:
    from .model.store import download_repo

    quiet_hub_retries()
    files = download_repo(args.repo, args.quantization)
    print(f"{args.repo}: ready in the Hugging Face cache")
    for label, path in (("config", files.config_path), ("weights", files.weights_path),
                        ("tokenizer", files.tokenizer_path), ("mimi", files.mimi_path)):
        print(f"  {label:<9} {path}")
    return 0


def cmd_synthetic_model(args: argparse.Namespace) -> int:
    from .model.synthetic import write_synthetic_checkpoint

    start = time.perf_counter()
    out = write_synthetic_checkpoint(args.dir, context=args.context, seed=args.seed,
                                     layout=args.layout)
    print(f"wrote a synthetic {args.layout} checkpoint to {out} in "
          f"{time.perf_counter() - start:.1f} s (random weights: its transcripts are meaningless)")
    for path in sorted(out.iterdir()):
        print(f"  {path.name:<40} {path.stat().st_size / 1e6:8.1f} MB")
    return 0


def cmd_check_model(args: argparse.Namespace) -> int:
    import numpy as np

    from .config import resolve_dtype
    from .engine.loop import mlx_device
    from .model.loader import FRAME_SAMPLES, load_model
    from .model.store import resolve

    quiet_hub_retries()
    start = time.perf_counter()
    files = resolve(args.path, args.quantization)
    device = mlx_device()
    model = load_model(files, resolve_dtype(args.dtype, device), args.quantization)
    load_s = time.perf_counter() - start
    cfg = model.lm_config
    print(f"checkpoint      {files.source}{'  (SYNTHETIC: random weights)' if files.synthetic else ''}")
    print(f"config          {files.config_path}")
    print(f"weights         {files.weights_path} ({'PyTorch/candle' if model.pytorch_names else 'MLX'} "
          f"names, file quantization {files.weights_quantized})")
    print(f"tokenizer       {files.tokenizer_path} ({model.text_tokenizer.vocab_size()} pieces)")
    print(f"mimi            {files.mimi_path}")
    print(f"lm              dim {cfg.transformer.d_model}, {cfg.transformer.num_layers} layers, "
          f"{cfg.transformer.num_heads} heads, context {model.context} steps, "
          f"{model.parameter_count() / 1e6:.1f} M parameters")
    print(f"audio           {model.num_codebooks} codebooks, text delay {model.asr_delay_steps} steps "
          f"({files.asr_delay_seconds:.2f} s)")
    print(f"end-of-turn     {model.vad_heads} VAD heads" if model.vad_heads else
          "end-of-turn     no VAD heads (use the -candle checkpoint for end-of-turn detection)")
    from .blas import blas_description

    print(f"compute         dtype {model.dtype}, quantization {model.quantization}, "
          f"loaded in {load_s:.1f} s, MLX device {device}, BLAS {blas_description()}")
    # One real frame through the daemon's Mimi encoder and one LM step: the files work together.
    import mlx.core as mx
    from moshi_mlx import models, utils

    from .engine.batched_mimi import BatchedMimiEncoder, load_mimi

    mimi = load_mimi(str(files.mimi_path), model.num_codebooks, mx.float32)
    encoder = BatchedMimiEncoder(mimi, 1, mx.float32)
    codes = encoder.encode(np.array([0]), np.zeros((1, FRAME_SAMPLES), np.float32))[:, :, None]
    gen = models.LmGen(model.lm, max_steps=2, text_sampler=utils.Sampler(temp=0),
                       audio_sampler=utils.Sampler(temp=0))
    step_start = time.perf_counter()
    token, _ = gen.step(mx.array(codes[:, :, 0]).astype(mx.int32))
    mx.eval(token)
    print(f"smoke test      1 frame encoded, 1 LM step in "
          f"{(time.perf_counter() - step_start) * 1000:.0f} ms: OK")
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    from .client import cmd_transcribe as transcribe

    return transcribe(args.file, args.url, args.realtime, args.chunk)


def cmd_service(args: argparse.Namespace) -> int:
    from . import service

    cfg = config_from_args(args)
    repo = Path(__file__).resolve().parent.parent
    config_path = config_path_from_args(args) or repo / "config" / "default.toml"
    if args.action == "install":
        return service.install(repo, config_path, cfg, args.system, args.systemd, args.user)
    if args.action == "uninstall":
        return service.uninstall(args.system)
    return service.status(cfg, args.system)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pinguin-daemon",
                                     description="Real-time speech-to-text server (Kyutai STT, MLX).")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the WebSocket daemon")
    _add_setting_flags(serve)
    serve.set_defaults(func=cmd_serve)

    transcribe = sub.add_parser("transcribe", help="stream a WAV file to a running daemon, print the text")
    transcribe.add_argument("file", type=Path)
    transcribe.add_argument("--url", default="ws://127.0.0.1:8000/ws")
    transcribe.add_argument("--realtime", action="store_true", help="pace audio like a microphone")
    transcribe.add_argument("--chunk", type=int, default=2400, help="samples per message (iOS: 2400)")
    transcribe.set_defaults(func=cmd_transcribe)

    svc = sub.add_parser("service", help="install/uninstall/status of the background service")
    svc.add_argument("action", choices=("install", "uninstall", "status"))
    svc.add_argument("--system", action="store_true",
                     help="macOS: a LaunchDaemon started at boot (needs sudo) instead of a LaunchAgent")
    svc.add_argument("--systemd", action="store_true", help="Linux: install the systemd user unit")
    svc.add_argument("--user", default=None, metavar="NAME",
                     help="the account a LaunchDaemon runs as (default: who ran sudo; never root)")
    _add_setting_flags(svc)
    svc.set_defaults(func=cmd_service)

    download = sub.add_parser("download", help="fetch a checkpoint into the Hugging Face cache")
    download.add_argument("repo", nargs="?", default=DEFAULT_MODEL)
    download.add_argument("--quantization", choices=CHOICES["quantization"], default="none")
    download.set_defaults(func=cmd_download)

    check = sub.add_parser("check-model", help="load a checkpoint and report what it holds")
    check.add_argument("path", help="local directory, Hugging Face repo id, or 'synthetic'")
    check.add_argument("--dtype", choices=CHOICES["dtype"], default="auto")
    check.add_argument("--quantization", choices=CHOICES["quantization"], default="none")
    check.set_defaults(func=cmd_check_model)

    synth = sub.add_parser("synthetic-model", help="write a tiny random checkpoint (for tests)")
    synth.add_argument("dir", type=Path)
    synth.add_argument("--context", type=int, default=750, help="attention window in steps")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--layout", choices=("mlx", "candle"), default="mlx")
    synth.set_defaults(func=cmd_synthetic_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except UserError as exc:
        print(f"pinguin-daemon: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    return code


def entry() -> None:
    """The `pinguin-daemon` command (and `python -m pinguin_daemon`): `main`, then exit.

    After `serve`, the process leaves without running library teardown. The engine thread's
    thread-local MLX state (its compile cache) is destroyed when that OS thread finishes, which
    may be after the interpreter has begun to finalize: MLX then takes the GIL in a destructor and
    the process aborts ("terminate called without an active exception", status -6) instead of
    exiting with the daemon's status. Every session is closed and every log line written by now.
    """
    code = main()
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    sys.exit(main())
