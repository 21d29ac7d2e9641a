"""The vLLM plugin: steerable decoder layers, per-token steering buffers, request validation."""
