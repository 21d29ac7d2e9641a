"""Contrastive steering vectors from pairs of prompts.

For pair k and layer i, p_k and n_k are the residual-stream outputs of decoder layer i at the
last token of the positive and the negative prompt (the vector format's convention).

- `mean_diff` (ActAdd, Turner et al. 2023; CAA): mean_k (p_k - n_k), not normalized: alpha 1
  moves the average negative example onto the average positive one.
- `pca_diff` (RepE, Zou et al. 2023; repeng's default): the first principal component of the
  d_k = p_k - n_k (centered first, as scikit-learn's PCA does), unit norm.
- `pca_center` (RepE): with c_k = (p_k + n_k) / 2, the first principal component of the 2K rows
  p_k - c_k and n_k - c_k (centered as well), unit norm.
- Sign rule for both PCA methods: flip the direction if p_k projects below n_k for more pairs
  than above.

Diagnostics per layer: `separation`, the fraction of held-out pairs (every 5th pair, the
direction fit on the others) where p projects above n; `mean_diff_norm`, the norm of
mean_k (p_k - n_k); `median_token_norm`, the median norm of the captured states.
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_TEMPLATE = "Act as if you're extremely {persona}."
REFERENCES = {
    "mean_diff": "ActAdd (Turner et al. 2023) / CAA: mean of p - n, not normalized",
    "pca_diff": "RepE (Zou et al. 2023), repeng default: first PC of centered p - n, unit norm",
    "pca_center": "RepE (Zou et al. 2023): first PC of p - c and n - c, c = (p + n) / 2, unit norm",
}
METHODS = tuple(REFERENCES)
SIGN_RULE = "PCA directions flip if p projects below n for more pairs than above"
HELD_OUT_EVERY = 5


def _first_pc(rows):
    """Unit first principal component of rows [N, hidden], centered first."""
    centered = rows - rows.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centered.double(), full_matrices=False)
    return vh[0].to(rows.dtype)


def direction(p, n, method: str):
    """One layer's direction from p, n [pairs, hidden] float32, by `method` (see module doc)."""
    if method == "mean_diff":
        return (p - n).mean(0)
    if method == "pca_diff":
        d = _first_pc(p - n)
    elif method == "pca_center":
        c = (p + n) / 2
        d = _first_pc(torch.cat([p - c, n - c]))
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    above = int(((p - n) @ d > 0).sum())
    return d if above >= len(p) - above else -d


def diagnostics(p, n, method: str) -> dict[str, float]:
    """separation on held-out pairs, mean-difference norm, median token norm (one layer)."""
    held = torch.arange(len(p)) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    d = direction(p[~held], n[~held], method)
    return {
        "separation": float(((p[held] - n[held]) @ d > 0).float().mean()),
        "mean_diff_norm": float((p - n).mean(0).norm()),
        "median_token_norm": float(torch.cat([p, n]).norm(dim=-1).median()),
    }


def pair_prompts(tokenizer, template: str, persona: str, suffixes: list[str]) -> list[str]:
    """Persona instruction as the user turn, the suffix opening the assistant turn (chat template
    when the model has one; plain concatenation otherwise)."""
    instruction = template.format(persona=persona)
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True)
        return [head + s for s in suffixes]
    return [f"{instruction} {s}" for s in suffixes]


def hf_last_token_states(model, tokenizer, prompts: list[str], layers: list[int], batch: int = 64):
    """The HF reference capture: [len(prompts), len(layers), hidden] float32, the output of each
    decoder layer at the last token (forward hooks, so the last layer is not the normed entry)."""
    captured: dict[int, torch.Tensor] = {}
    last = torch.zeros(0, dtype=torch.long)

    def hook(module, args, out, i):
        h = out[0] if isinstance(out, tuple) else out  # [batch, seq, hidden]
        captured[i] = h[torch.arange(h.shape[0]), last].float()

    handles = [model.model.layers[i].register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i)) for i in layers]
    rows = []
    try:
        with torch.no_grad():
            for lo in range(0, len(prompts), batch):
                enc = tokenizer(prompts[lo : lo + batch], return_tensors="pt", padding=True)
                last = enc["attention_mask"].sum(1) - 1  # right padding: index of the last real token
                model(**enc)
                rows.append(torch.stack([captured[i] for i in layers], dim=1))
    finally:
        for h in handles:
            h.remove()
    return torch.cat(rows)


def build_vector(p, n, layers: list[int], num_layers: int, method: str, *, model: str, concept: str, extra: dict[str, str] | None = None):
    """A SteeringVector from captured states p, n [pairs, len(layers), hidden], with the method,
    its reference, the sign rule and per-layer diagnostics in the metadata."""
    import json

    from steer_batch import SteeringVector

    dirs, diags = {}, {}  # direction() refuses an unknown method
    for j, layer in enumerate(layers):
        dirs[layer] = direction(p[:, j], n[:, j], method)
        diags[str(layer)] = diagnostics(p[:, j], n[:, j], method)
    metadata = {"reference": REFERENCES[method], "sign_rule": SIGN_RULE, "pairs": str(len(p)), "diagnostics": json.dumps(diags), **(extra or {})}
    return SteeringVector(dirs, num_layers, model=model, method=method, concept=concept, metadata=metadata)


CAPTURES = ("vllm", "hf")


def extract(model_dir: Path, positive: str, negative: str, suffixes: list[str], layers: list[int],
            method: str = "mean_diff", template: str = DEFAULT_TEMPLATE, capture: str = "vllm"):
    """A steering vector for `positive` minus `negative`, with hidden states captured inside vLLM
    (`capture="vllm"`, engine speed on any model vLLM runs) or by the HF reference (`"hf"`)."""
    from transformers import AutoConfig, AutoTokenizer

    if capture not in CAPTURES:
        raise ValueError(f"unknown capture {capture!r}; choose one of {list(CAPTURES)}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="right")
    prompts = {side: pair_prompts(tokenizer, template, persona, suffixes) for side, persona in (("p", positive), ("n", negative))}
    if capture == "vllm":
        from steer_batch.engine.capture import capture_last_token_states

        states = capture_last_token_states(model_dir, prompts["p"] + prompts["n"], layers)
        p, n = torch.from_numpy(states[: len(suffixes)]), torch.from_numpy(states[len(suffixes) :])
    else:
        from transformers import AutoModelForCausalLM

        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        p, n = (hf_last_token_states(model, tokenizer, prompts[side], layers) for side in ("p", "n"))
    num_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    return build_vector(p, n, layers, num_layers, method, model=str(model_dir), concept=f"{positive} - {negative}",
                        extra={"template": template, "capture": capture})
