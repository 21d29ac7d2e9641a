"""Two tiers: tests/unit imports no engine and runs in seconds (`python3 -m pytest -q tests/unit`);
tests/engine starts real vLLM engines on tiny random models. Both import the shared `helpers`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
