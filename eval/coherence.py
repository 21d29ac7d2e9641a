"""Coherence of generated text: the negative log-likelihood (natural log) of each continuation,
token by token, under the unsteered model, computed by vLLM in one batched prefill pass
(`prompt_logprobs`) over prompt + continuation tokens. Steered text the model itself finds
unlikely scores high; the mean per token is the `nll` of a row. A row generated without
steering already has them: its own logprobs (`own_nlls`), requested at generation."""

from __future__ import annotations

import numpy as np


def token_nlls(llm, prompts: list[str], continuations: list[list[int]]) -> list[np.ndarray]:
    """For each (prompt text, continuation token ids): the NLL of every continuation token given
    the prompt and the tokens before it, float64 [len(continuation)], from `llm` without steering
    (requests carry no steering fields, so a steering engine scores like a stock one). The prompt
    is tokenized as vLLM tokenizes a text prompt (special tokens included)."""
    nlls = [np.zeros(0) for _ in prompts]
    todo = [k for k, c in enumerate(continuations) if c]
    if not todo:  # nothing to score: no engine needed
        return nlls
    # cli.py imports this module (through eval/classify.py) as it starts: vLLM loads only here.
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tokenizer = llm.get_tokenizer()
    ids = [tokenizer.encode(p) + list(c) for p, c in zip(prompts, continuations)]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids[k]) for k in todo], params, use_tqdm=False)
    for k, out in zip(todo, outs):
        start = len(ids[k]) - len(continuations[k])
        # prompt_logprobs[i]: {token: Logprob} for position i, holding the prompt's own token.
        nlls[k] = np.array([-out.prompt_logprobs[i][ids[k][i]].logprob for i in range(start, len(ids[k]))])
    return nlls


def own_nlls(completion) -> np.ndarray:
    """The NLL of every token of a vLLM completion generated with `logprobs=0`, from its own
    logprobs (vLLM's raw logprobs: the model's, before temperature or top-p), float64. For a
    request without steering these are `token_nlls` of its tokens, with no second pass."""
    lps = completion.logprobs
    return np.array([-lps[i][t].logprob for i, t in enumerate(completion.token_ids)], np.float64)


def mean_nll(nlls: np.ndarray) -> float:
    """A row's coherence: its mean NLL per token (NaN for an empty continuation)."""
    return float(nlls.mean()) if len(nlls) else float("nan")
