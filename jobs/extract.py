"""`steer-batch extract`: a contrastive steering vector for a positive minus a negative persona,
from hidden states captured inside vLLM (driver/capture.py) or by the HF reference (forward
hooks); and the default happy - sad vector that `run` uses, extracted once and cached.

    from steer_batch.jobs.extract import extract_file
    vector = extract_file("happy.safetensors", positive="happy", negative="sad", layers="8-20")
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from steer_batch.driver.launch import check_plugin_allowed
from steer_batch.engine.config import file_sha256
from steer_batch.errors import SteerBatchError
from steer_batch.jobs.models import cache_dir, model_hash, resolve_model
from steer_batch.vectors.datasets import ab_extraction_ids, parse_rows, read_ab, read_pairs, rows_text, text_ids
from steer_batch.vectors.methods import build_vector
from steer_batch.vectors.prompts import DEFAULT_TEMPLATE, check_template, pair_prompts, read_strings
from steer_batch.vectors.vector import SteeringVector

CAPTURES = ("vllm", "hf")
# The default vector: the happy - sad mean difference at layers 8-20 of SmolLM2's 30 (the same
# share of depth on other models), divided by 4, so alpha +-4 is where the raw difference at +-1
# is on SmolLM2: clearly shifted, still readable.
DEFAULT_SCALE = 0.25
# cli.py imports this module for CAPTURES as it starts: transformers (about 3 s) and vLLM (driver/
# capture.py, about 9 s) load inside the functions that use them, so `steer-batch --help` and the
# commands that never extract do not wait for them.


def default_layers(num_layers: int) -> list[int]:
    """8-20 of 30 layers; the same share of depth on other models (9-21 of 32, 1-3 of 4)."""
    return list(range(round(8 * num_layers / 30), round(20 * num_layers / 30) + 1))


def parse_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """ "all", "8-20", "3,5,7", a mix ("1-3,9"), or a list -> sorted 0-based layer indices."""
    if spec == "all":
        return list(range(num_layers))
    layers: set[int] = set()
    if isinstance(spec, str):
        try:
            for part in spec.split(","):
                lo, _, hi = part.partition("-")
                layers.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise SteerBatchError(
                f"{spec!r}: give 'all', a range like 8-20 or a list like 3,5,7", param="layers"
            ) from None
    else:
        layers = set(spec)
    bad = sorted(i for i in layers if not 0 <= i < num_layers)
    if bad or not layers:
        raise SteerBatchError(
            f"{spec!r}: layers {bad} are outside 0..{num_layers - 1} (this model has {num_layers})", param="layers"
        )
    return sorted(layers)


def hf_last_token_states(model, sequences: list[list[int]], layers: list[int], batch: int = 64):
    """The HF reference capture: [len(sequences), len(layers), hidden] float32, the output of each
    decoder layer at each token sequence's last token (forward hooks, so the last layer is not the
    normed entry)."""
    captured: dict[int, torch.Tensor] = {}
    last = torch.zeros(0, dtype=torch.long)

    def hook(module, args, out, i):
        h = out[0] if isinstance(out, tuple) else out  # [batch, seq, hidden]
        captured[i] = h[torch.arange(h.shape[0]), last].float()

    handles = [model.model.layers[i].register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i)) for i in layers]
    rows = []
    try:
        with torch.no_grad():
            for lo in range(0, len(sequences), batch):
                chunk = sequences[lo : lo + batch]
                width = max(map(len, chunk))  # right padding: the mask hides it from the real tokens
                ids = torch.tensor([s + [0] * (width - len(s)) for s in chunk], device=model.device)
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=model.device)
                last = torch.tensor([len(s) - 1 for s in chunk], device=model.device)
                model(input_ids=ids, attention_mask=mask)
                rows.append(torch.stack([captured[i] for i in layers], dim=1).cpu())
    finally:
        for h in handles:
            h.remove()
    return torch.cat(rows)


def extract_sequences(
    model_dir: Path,
    positives: list[list[int]],
    negatives: list[list[int]],
    layers: list[int],
    method: str = "mean_diff",
    capture: str = "vllm",
    engine_kwargs: dict | None = None,
    llm=None,
    *,
    concept: str,
    extra: dict[str, str],
) -> SteeringVector:
    """A steering vector from pairs of token sequences (positive k against negative k), with the
    states at their last tokens captured inside vLLM (`capture="vllm"`, engine speed on any model
    vLLM runs; `engine_kwargs` go to its engine, e.g. tensor_parallel_size; or `llm`, a running
    engine that captures `layers`) or by the HF reference (`"hf"`)."""
    from transformers import AutoConfig

    if capture not in CAPTURES:
        raise SteerBatchError(f"unknown capture {capture!r}; choose one of {list(CAPTURES)}", param="capture")
    if capture == "vllm":
        from steer_batch.driver.capture import capture_last_token_states, capture_states

        both = [{"prompt_token_ids": ids} for ids in positives + negatives]
        if llm is not None:
            states = capture_states(llm, both, layers)
        else:
            states = capture_last_token_states(model_dir, both, layers, **(engine_kwargs or {}))
        p, n = torch.from_numpy(states[: len(positives)]), torch.from_numpy(states[len(positives) :])
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        p, n = (hf_last_token_states(model, side, layers) for side in (positives, negatives))
    num_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    return build_vector(
        p, n, layers, num_layers, method, model=str(model_dir), concept=concept, extra={"capture": capture, **extra}
    )


def extract(
    model_dir: Path,
    positive: str,
    negative: str,
    suffixes: list[str],
    layers: list[int],
    method: str = "mean_diff",
    template: str = DEFAULT_TEMPLATE,
    capture: str = "vllm",
    engine_kwargs: dict | None = None,
    llm=None,
) -> SteeringVector:
    """A steering vector for the `positive` minus the `negative` persona over `suffixes`
    (vectors/prompts.py's pairs; the rest as extract_sequences)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    p, n = (
        [text_ids(tokenizer, text) for text in pair_prompts(tokenizer, template, persona, suffixes)]
        for persona in (positive, negative)
    )
    return extract_sequences(
        model_dir, p, n, layers, method, capture, engine_kwargs, llm,
        concept=f"{positive} - {negative}", extra={"template": template},
    )  # fmt: skip


def source(path: Path, rows: tuple[int, int | None]) -> dict[str, str]:
    """What a result records about the data file it came from: the file, its sha256, the rows."""
    return {"file": str(Path(path).resolve()), "sha256": file_sha256(path), "rows": rows_text(rows)}


def extract_data(
    model_dir: Path,
    kind: str,
    path: Path,
    rows: tuple[int, int | None],
    layers: list[int],
    method: str = "mean_diff",
    capture: str = "vllm",
    engine_kwargs: dict | None = None,
    llm=None,
) -> SteeringVector:
    """A steering vector from a file of contrastive data (vectors/datasets.py): `kind` "pairs"
    (texts as given) or "ab" (an A/B behaviour dataset, the state at the answer's letter), the
    records `rows` (the rest as extract_sequences). The metadata records the file, its sha256 and
    the rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if kind == "pairs":
        pairs = read_pairs(path, rows)
        p = [text_ids(tokenizer, pair.positive) for pair in pairs]
        n = [text_ids(tokenizer, pair.negative) for pair in pairs]
        concept = f"{Path(path).stem}: positive - negative"
    elif kind == "ab":
        p, n = ab_extraction_ids(tokenizer, read_ab(path, rows))
        concept = f"{Path(path).stem}: matching - not matching behaviour"
    else:
        raise SteerBatchError(f"unknown data kind {kind!r}; choose pairs or ab", param="kind")
    extra = {f"data_{k}": v for k, v in {"kind": kind, **source(path, rows)}.items()}
    return extract_sequences(model_dir, p, n, layers, method, capture, engine_kwargs, llm, concept=concept, extra=extra)


def extract_file(
    out: str | Path,
    *,
    positive: str | None = None,
    negative: str | None = None,
    pairs: str | Path | None = None,
    ab: str | Path | None = None,
    rows: str | None = None,
    model: str | Path | None = None,
    template: str | None = None,
    suffixes: str | Path | None = None,
    layers: str | list[int] = "all",
    method: str = "mean_diff",
    capture: str = "vllm",
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
) -> SteeringVector:
    """`extract` from the CLI's arguments, written to `out` whole or not at all: from a persona pair
    (`positive`, `negative`, with `template` over `suffixes`: a JSON list of strings, default the
    581 RepE sentence beginnings), or from a file, `pairs` or `ab` (vectors/datasets.py), its
    records `rows` ("START:STOP"). model: an HF folder or hub id (default: the embedded
    SmolLM2-135M-Instruct); layers: "all", "8-20", "3,5,7" or a list. Every input is checked
    before the model loads."""
    from transformers import AutoConfig

    data = {name: value for name, value in (("pairs", pairs), ("ab", ab)) if value is not None}
    persona = positive is not None or negative is not None
    if len(data) + persona != 1:
        raise SteerBatchError(
            "give the data once: --positive and --negative (personas), or --pairs FILE, or --ab FILE", param="pairs"
        )
    if persona:
        if positive is None or negative is None:
            raise SteerBatchError(
                "--positive and --negative go together", param="positive" if positive is None else "negative"
            )
        if rows is not None:
            raise SteerBatchError("--rows picks records of --pairs or --ab; personas use --suffixes", param="rows")
        template = check_template(DEFAULT_TEMPLATE if template is None else template)
        _, suffix_list = read_strings(suffixes, param="suffixes", item="suffix")
    else:
        for name, value in (("template", template), ("suffixes", suffixes)):
            if value is not None:
                raise SteerBatchError(
                    f"--{name} shapes persona prompts; --{next(iter(data))} data is used as given", param=name
                )
        kind, path = next(iter(data.items()))
        selected = parse_rows(rows)
        (read_pairs if kind == "pairs" else read_ab)(path, selected)  # refused here, before the model loads
    if capture == "vllm":
        check_plugin_allowed()
    model_dir = resolve_model(model)
    layer_list = parse_layers(layers, AutoConfig.from_pretrained(model_dir).num_hidden_layers)
    parallel = dict(tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size)
    if persona:
        vector = extract(model_dir, positive, negative, suffix_list, layer_list, method, template, capture, parallel)
    else:
        vector = extract_data(model_dir, kind, path, selected, layer_list, method, capture, parallel)
    vector.save(out)
    return vector


def default_vector_path(model_dir: Path) -> Path:
    """Where the happy - sad vector of `model_dir` is cached (keyed by the model's hash)."""
    from transformers import AutoConfig

    layers = default_layers(AutoConfig.from_pretrained(model_dir).num_hidden_layers)
    recipe = f"happy-sad-mean_diff-L{layers[0]}-{layers[-1]}-x{DEFAULT_SCALE:g}"
    key = f"{model_dir.name}-{model_hash(model_dir)[:12]}-{recipe}"
    return cache_dir() / "vectors" / f"{key}.safetensors"


def extract_default(model_dir: Path, llm=None, engine_kwargs: dict | None = None) -> Path:
    """Extract the happy - sad vector for `model_dir` (default_layers x DEFAULT_SCALE, the 581 RepE
    pairs captured in vLLM: in `llm`, a running engine that captures those layers, or an engine
    started for it with `engine_kwargs`), cache it and return its path."""
    from transformers import AutoConfig

    print("extracting the happy - sad vector (581 RepE pairs, captured in vLLM)...", file=sys.stderr)
    _, suffixes = read_strings(None, param="suffixes", item="suffix")
    layers = default_layers(AutoConfig.from_pretrained(model_dir).num_hidden_layers)
    vector = extract(model_dir, "happy", "sad", suffixes, layers, engine_kwargs=engine_kwargs, llm=llm) * DEFAULT_SCALE
    vector.metadata["scale"] = f"{DEFAULT_SCALE:g} x the raw mean difference"
    path = default_vector_path(model_dir)
    vector.save(path)
    return path


def default_vector(model_dir: Path, engine_kwargs: dict | None = None) -> Path:
    """The cached happy - sad vector for `model_dir`, extracted on first use (by an engine
    started with `engine_kwargs`)."""
    path = default_vector_path(model_dir)
    return path if path.is_file() else extract_default(model_dir, engine_kwargs=engine_kwargs)
