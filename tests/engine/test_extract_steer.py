"""Extract through vLLM, then steer with the result: on a tiny model whose positive prompts open
with one block of tokens and negative prompts with another, steering layer 1 with +alpha moves
the generated tokens' hidden states at layer 3 along the layer-3 direction, -alpha against it.
(Measured downstream of the steered layer, so the add itself cannot make the test pass.)"""

import numpy as np
import torch

from helpers import VOCAB, close_llm, generate, load_hf, make_llm, make_model, make_prompts, steered
from steer_batch import SteeringVector
from steer_batch.driver.capture import capture_last_token_states
from steer_batch.vectors.methods import build_vector

STEER, READ = 1, 3


def _projection(
    model_dir, prompt: list[int], generated: list[int], steer_vector, alpha: float, direction: torch.Tensor
) -> float:
    """Mean projection, on the unit direction, of the generated tokens' states at READ's output
    in the steered forward (the HF oracle, which the engine equals token for token)."""
    model, got = load_hf(model_dir), {}
    handle = model.model.layers[READ].register_forward_hook(
        lambda m, a, out: got.__setitem__("h", out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad(), steered(model, steer_vector, alpha):
        model(torch.tensor([prompt + generated]))
    handle.remove()
    states = got["h"][0, len(prompt) :]  # [generated, hidden]
    return float((states @ (direction / direction.norm())).mean())


def test_extracted_vector_steers_generation_along_itself(tmp_path):
    model_dir = make_model("llama", tmp_path / "model")
    g = torch.Generator().manual_seed(11)
    pos_block, neg_block = (
        torch.randint(3, VOCAB, (6,), generator=g).tolist(),
        torch.randint(3, VOCAB, (6,), generator=g).tolist(),
    )
    suffixes = make_prompts(40, seed=12, min_len=3, max_len=12)
    prompts = [{"prompt_token_ids": block + s} for block in (pos_block, neg_block) for s in suffixes]
    states = torch.from_numpy(
        capture_last_token_states(
            model_dir, prompts, [STEER, READ], skip_tokenizer_init=True, max_model_len=512, enforce_eager=True
        )
    )
    p, n = states[: len(suffixes)], states[len(suffixes) :]
    vector = build_vector(p, n, [STEER, READ], 4, "mean_diff", model=str(model_dir), concept="pos - neg")
    steer_vector = SteeringVector({STEER: vector.directions[STEER]}, 4)
    steer_vector.save(tmp_path / "v.safetensors")

    llm = make_llm(model_dir, {"v": tmp_path / "v.safetensors"})
    test_prompts = make_prompts(12, seed=13)
    try:
        runs = {a: generate(llm, test_prompts, 16, [("v", a)] * len(test_prompts)) for a in (-1.0, 0.0, 1.0)}
    finally:
        close_llm(llm)
    d = vector.directions[READ]
    proj = {
        a: np.mean([_projection(model_dir, pr, out, steer_vector, a, d) for pr, out in zip(test_prompts, runs[a])])
        for a in runs
    }
    assert proj[-1.0] < proj[0.0] < proj[1.0], f"projections by alpha: {proj}"
