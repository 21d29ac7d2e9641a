"""Steering vectors: the file format and `SteeringVector`, the extraction math, the contrastive
prompts, GGUF interop. Imports nothing else of steer_batch but its errors."""
