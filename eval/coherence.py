"""Coherence of generated text: the negative log-likelihood (natural log) of each continuation,
token by token, under the unsteered model, computed by vLLM as a prefill of prompt +
continuation tokens with `prompt_logprobs` (a scoring request: `scoring_prompt`, `scoring_params`).
Steered text the model itself finds unlikely scores high; the mean per token is the `nll` of a
row. A row generated without steering already has them: its own logprobs (`own_nlls`),
requested at generation."""

from __future__ import annotations

import numpy as np


def token_nlls(llm, prompts: list[str], continuations: list[list[int]]) -> list[np.ndarray]:
    """For each (prompt text, continuation token ids): the NLL of every continuation token given
    the prompt and the tokens before it, float64 [len(continuation)], from `llm` without steering
    (requests carry no steering fields, so a steering engine scores like a stock one)."""
    nlls = [np.zeros(0) for _ in prompts]
    todo = [k for k, c in enumerate(continuations) if c]
    if not todo:  # nothing to score: no engine needed
        return nlls
    tokenizer = llm.get_tokenizer()
    params = scoring_params()
    requests = [scoring_prompt(tokenizer, prompts[k], continuations[k]) for k in todo]
    for k, out in zip(todo, llm.generate(requests, params, use_tqdm=False)):
        nlls[k] = continuation_nlls(out, len(continuations[k]))
    return nlls


def scoring_prompt(tokenizer, prompt: str, continuation: list[int]):
    """The request that scores `continuation` after `prompt`: prompt + continuation token ids,
    the prompt tokenized as vLLM tokenizes a text prompt (special tokens included)."""
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=tokenizer.encode(prompt) + list(continuation))


def scoring_params():
    """A scoring request's sampling: prefill only, the logprob of every prompt token."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)


def continuation_nlls(output, num_tokens: int) -> np.ndarray:
    """The NLL of the last `num_tokens` prompt tokens of a finished scoring request's output."""
    ids = output.prompt_token_ids
    # prompt_logprobs[i]: {token: Logprob} for position i, holding the prompt's own token.
    return np.array([-output.prompt_logprobs[i][ids[i]].logprob for i in range(len(ids) - num_tokens, len(ids))])


def own_nlls(completion) -> np.ndarray:
    """The NLL of every token of a vLLM completion generated with `logprobs=0`, from its own
    logprobs (vLLM's raw logprobs: the model's, before temperature or top-p), float64. For a
    request without steering these are `token_nlls` of its tokens, with no second pass."""
    lps = completion.logprobs
    return np.array([-lps[i][t].logprob for i, t in enumerate(completion.token_ids)], np.float64)


def mean_nll(nlls: np.ndarray) -> float:
    """A row's coherence: its mean NLL per token (NaN for an empty continuation)."""
    return float(nlls.mean()) if len(nlls) else float("nan")
