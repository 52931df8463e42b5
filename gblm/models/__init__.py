"""Model loading, the embedded default model, and per-architecture layer access."""
