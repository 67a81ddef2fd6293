"""herd: an OpenAI-compatible reverse proxy that coalesces LLM requests."""

__version__ = "0.1.0"
