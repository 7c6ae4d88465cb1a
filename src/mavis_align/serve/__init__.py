"""HTTP serving: OpenAI-compatible API with per-request objective weights, continuous batching,
and a playground page."""

from .app import create_app, serve
from .scheduler import GenRequest, Scheduler

__all__ = ["create_app", "serve", "GenRequest", "Scheduler"]
