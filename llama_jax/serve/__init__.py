"""Serving: continuous batching over a paged KV cache (engine.py), for experiments/serve.py's
OpenAI-compatible HTTP API (api.py)."""

from llama_jax.serve.engine import Closed, Engine, Event, QueueFull, Settings

__all__ = ["Closed", "Engine", "Event", "QueueFull", "Settings"]
