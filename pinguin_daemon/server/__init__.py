"""The WebSocket daemon: listener, sessions, fan-out, health, shutdown."""
