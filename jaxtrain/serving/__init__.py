"""Serving: jitted decoding (`generate.py`), continuous batching (`engine.py`), an
OpenAI-compatible server (`server.py`) and a serving benchmark with vLLM's metrics (`bench.py`).

`jaxtrain.generate` (engine.generate) is the one-call Python API."""
