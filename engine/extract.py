"""Contrastive steering vectors. For now the HF reference path and the mean difference (ActAdd /
CAA): for pair k and layer i, p_k and n_k are the residual-stream outputs of decoder layer i at
the last token of the positive and negative prompt; the direction is mean_k(p_k - n_k)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_TEMPLATE = "Act as if you're extremely {persona}."


def pair_prompts(tokenizer, template: str, persona: str, suffixes: list[str]) -> list[str]:
    """Persona instruction as the user turn, the suffix opening the assistant turn (chat template
    when the model has one; plain concatenation otherwise)."""
    instruction = template.format(persona=persona)
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True)
        return [head + s for s in suffixes]
    return [f"{instruction} {s}" for s in suffixes]


def last_token_states(model, tokenizer, prompts: list[str], layers: list[int], batch: int = 64):
    """[len(prompts), len(layers), hidden] float32: output of each decoder layer at the last token."""
    import torch

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


def hf_mean_diff(model_dir: Path, positive: str, negative: str, suffixes: list[str], layers: list[int], template: str = DEFAULT_TEMPLATE):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steer_batch import SteeringVector

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="right")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    p = last_token_states(model, tokenizer, pair_prompts(tokenizer, template, positive, suffixes), layers)
    n = last_token_states(model, tokenizer, pair_prompts(tokenizer, template, negative, suffixes), layers)
    diff = (p - n).mean(0)  # [layers, hidden]
    return SteeringVector(
        {layer: diff[j] for j, layer in enumerate(layers)},
        model.config.num_hidden_layers,
        model=str(model_dir),
        method="mean_diff",
        concept=f"{positive} - {negative}",
        metadata={"reference": "ActAdd (Turner et al. 2023) / CAA mean difference", "template": template, "pairs": str(len(suffixes))},
    )
