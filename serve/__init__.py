"""Serving steer-batch over vLLM's OpenAI-compatible HTTP server."""
