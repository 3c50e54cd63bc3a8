"""Audio on its way to the model: payload decoding, 80 ms framing, Mimi encoding."""
