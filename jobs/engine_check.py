"""`steer-batch engine-check`: the GPU checks through a real vLLM engine, for a user's GPU box
(kernels/gpu_check.py checks what lies below vLLM with PyTorch and Triton alone). It runs on a
CPU as well, where the checks that need a GPU (async scheduling on vs off, Model Runner V2) are
reported as skipped.

Engines start one after another, so each has the device to itself: stock vLLM (its own runner
choice: V2 on CUDA with Triton), on a GPU stock vLLM on the V1 runner, the steering engine, and on
a GPU the steering engine with async scheduling off. Checks, on batches of 1, 3, 17 and 70
prompts (several CUDA-graph capture sizes): unsteered and alpha-0 requests equal stock vLLM token
for token; a mixed batch equals each request run alone; captured states equal transformers' in
the model's dtype; a vector added at runtime steers bit for bit like the same file given at
start-up (compiled engine); a request whose states overflow ends in an error and leaves every
other request as it was alone; async on and off give the same tokens. Throughput (tok/s) of
unsteered traffic and of 256 distinct alphas against stock V1 and V2.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from vllm import SamplingParams

from steer_batch.data import sentence_beginnings
from steer_batch.driver.capture import capture_states
from steer_batch.driver.launch import close_llm, make_llm, on_cpu
from steer_batch.driver.runtime import add_vector
from steer_batch.engine import hooks
from steer_batch.engine.config import engine_config, steering
from steer_batch.jobs.bench import random_vector, spread, vllm_tok_s
from steer_batch.jobs.extract import hf_last_token_states
from steer_batch.jobs.models import resolve_model
from steer_batch.vectors.datasets import text_ids

BATCHES = (1, 3, 17, 70)
CAPTURED = 2  # layers captured: the first and the last of the vector's


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Checks:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, name: str, ok: bool | None, detail: str = "") -> None:
        """ok None: skipped (detail says why)."""
        self.rows.append({"check": name, "ok": ok, "detail": detail})
        print(f"{'skip' if ok is None else 'ok  ' if ok else 'FAIL'} {name:<44} {detail}", flush=True)


def _generate(llm, prompts: list[str], extra_args: list, max_tokens: int, logprobs: bool = False) -> list:
    params = [
        SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=a, logprobs=0 if logprobs else None
        )
        for a in extra_args
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    if logprobs:
        return [
            (list(o.outputs[0].token_ids), [next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs])
            for o in outs
        ]
    return [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in outs]


def engine_check(
    model: str | Path | None = None, eager: bool = False, max_tokens: int = 16, json_path: Path | None = None
) -> dict:
    """Run the checks (module doc) on `model` (default: the embedded SmolLM2); returns and
    optionally writes the report. Progress on stderr, one line per check on stdout."""
    model_dir = resolve_model(model)
    gpu = not on_cpu()
    checks, tok_s = Checks(), {}
    beginnings = sentence_beginnings()
    groups = [beginnings[sum(BATCHES[:i]) : sum(BATCHES[: i + 1])] for i in range(len(BATCHES))]
    flat = [p for g in groups for p in g]
    many = [beginnings[i % len(beginnings)] for i in range(256)]
    num_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    layers = list(range(num_layers // 4, 3 * num_layers // 4 + 1))
    captured = [layers[0], layers[-1]][:CAPTURED]
    alphas = [None, 0.0, 4.0, -4.0, 8.0, -2.0]
    mixed = [None if a is None else steering("v", a) for a in (alphas * len(flat))[: len(flat)]]
    engine = dict(enforce_eager=eager, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        vector = random_vector(model_dir)
        vector.directions = {i: d * 4 for i, d in vector.directions.items() if i in layers}
        path = Path(tmp) / "v.safetensors"
        vector.save(path)

        _log("stock vLLM (its own runner choice)")
        llm = make_llm(model_dir, **engine)
        stock = [_generate(llm, g, [None] * len(g), max_tokens) for g in groups]
        tok_s["stock vLLM (default runner)"] = vllm_tok_s(llm, many, [None] * 256, max_tokens)
        runner_v2 = hooks.engine_vllm_config(llm).use_v2_model_runner
        close_llm(llm)
        if gpu and runner_v2:
            _log("stock vLLM, V1 runner")
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # read by this engine's processes as they start
            try:
                llm = make_llm(model_dir, **engine)
            finally:
                del os.environ["VLLM_USE_V2_MODEL_RUNNER"]
            tok_s["stock vLLM, V1 runner"] = vllm_tok_s(llm, many, [None] * 256, max_tokens)
            close_llm(llm)

        _log("steering engine")
        steer_config = engine_config(capture=captured, runtime_vectors=True, layers=layers, max_abs_alpha=1e31)
        llm = make_llm(model_dir, {"v": path}, additional_config=steer_config, **engine)
        checks.add("steering engine runs the V1 runner", not hooks.engine_vllm_config(llm).use_v2_model_runner)
        for g, want in zip(groups, stock):
            for name, args in (("unsteered", None), ("alpha 0", steering("v", 0.0))):
                got = _generate(llm, g, [args] * len(g), max_tokens)
                checks.add(f"{name} = stock vLLM, batch of {len(g)}", got == want)
        together = _generate(llm, flat, mixed, max_tokens)
        alone = [_generate(llm, [p], [a], max_tokens)[0] for p, a in zip(flat[:24], mixed[:24])]
        checks.add("mixed batch = each request alone", together[:24] == alone, f"{len(flat)} requests")
        changed = sum(t != s for t, s, a in zip(together, [x for want in stock for x in want], mixed) if a)
        checks.add("steering changes the text", changed > 0, f"{changed} steered requests differ from stock")
        states = capture_states(llm, flat[:8], captured)
        add_vector(llm, "rt", path)
        for op, alpha in (("add", 4.0), ("ablate", 1.0), ("clamp", 2.0)):
            a = _generate(llm, flat[:8], [steering("v", alpha, op)] * 8, max_tokens, logprobs=True)
            b = _generate(llm, flat[:8], [steering("rt", alpha, op)] * 8, max_tokens, logprobs=True)
            checks.add(f"runtime vector = start-up vector ({op})", a == b, "token ids and logprobs")
        overflow = [steering("v", 1e30)] + mixed[1:12]
        outs = _generate(llm, flat[:12], overflow, max_tokens)
        others = all(o == t for o, t in zip(outs[1:], together[1:12]))
        checks.add("an overflowing request changes no other", others, f"alpha 1e30; its own finish: {outs[0][1]}")
        tok_s["steering engine, unsteered"] = vllm_tok_s(llm, many, [None] * 256, max_tokens)
        alphas_256 = [steering("v", float(a)) for a in spread(256)]
        tok_s["steering engine, 256 alphas"] = vllm_tok_s(llm, many, alphas_256, max_tokens)
        async_on = hooks.engine_vllm_config(llm).scheduler_config.async_scheduling
        dtype = hooks.engine_vllm_config(llm).model_config.dtype
        close_llm(llm)
        if gpu and async_on:
            _log("steering engine, async scheduling off")
            llm = make_llm(model_dir, {"v": path}, additional_config=steer_config, async_scheduling=False, **engine)
            checks.add("async scheduling on = off", _generate(llm, flat, mixed, max_tokens) == together)
            close_llm(llm)
        else:
            checks.add("async scheduling on = off", None, "async scheduling is off here (vLLM's CPU backend)")

        _log("transformers capture reference")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda" if gpu else "cpu").eval()
        want = hf_last_token_states(hf, [text_ids(tokenizer, p) for p in flat[:8]], captured).numpy()
        err = float((np.linalg.norm(states - want, axis=-1) / np.linalg.norm(want, axis=-1)).max())
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        checks.add(f"capture = transformers ({str(dtype).removeprefix('torch.')})", err <= tolerance, f"{err:.1e}")
    base = tok_s["stock vLLM (default runner)"]
    for name, value in tok_s.items():
        print(f"{name:<34}{value:>10.1f} tok/s{value / base:>8.3f} of stock (default runner)")
    failed = [r["check"] for r in checks.rows if r["ok"] is False]
    passed = sum(r["ok"] is True for r in checks.rows)
    skipped = sum(r["ok"] is None for r in checks.rows)
    report = {
        "model": str(model_dir),
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "dtype": str(dtype),
        "eager": eager,
        "checks": checks.rows,
        "tok_s": tok_s,
        "passed": not failed,
    }
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=1))
    verdict = "PASS" if not failed else "FAIL"
    print(f"engine-check: {verdict} on {report['device']}: {passed} passed, {len(failed)} failed, {skipped} skipped"
          + (f"; failed: {failed}" if failed else ""))  # fmt: skip
    return report
