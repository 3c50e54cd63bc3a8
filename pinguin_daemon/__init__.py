"""pinguin-daemon: real-time speech-to-text server for the Pinguin iOS app."""

# First, before any module can import mlx: on Linux, put an optimized BLAS under MLX's CPU
# backend in place of the reference one the mlx-cpu wheel bundles (see blas.py).
from . import blas as _blas

_blas.preload()

__version__ = "0.1.0"
