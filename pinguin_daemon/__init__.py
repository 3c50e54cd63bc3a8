"""pinguin-daemon: real-time speech-to-text server for the Pinguin iOS app."""

__version__ = "0.1.0"
