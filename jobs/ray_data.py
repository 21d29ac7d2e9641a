"""`steer-batch run --ray`: the run's generation through Ray Data LLM (`ray.data.llm`), across
`replicas` vLLM engines (each with its own tensor/pipeline parallelism), on a local or an
existing Ray cluster. Rows come back to the driver as Ray finishes them and go into the same
OUT/generations.arrow as a single-engine run (same schema, same resume: rows already written are
not generated again), so `classify` and `report` read them as they are.

Facts this relies on (read in Ray 2.60's source): the vLLM stage builds an AsyncLLM from
`engine_kwargs` (our `additional_config` rides there) and a request from each row's
`sampling_params` (our `extra_args` ride there); a CPU-only cluster needs CPU bundles
(`bundle_per_worker={"CPU": 1, "GPU": 0}`) and vLLM's "mp" executor, or the actors never
schedule; Arrow fills a row's missing struct keys with None (our request parsing reads None as
absent); vLLM's Ray metrics need Ray Serve, which the `ray` extra leaves out (metrics off).
Every engine gets steer-batch's worker extension, whose import registers the plugin in the
worker, so a node without steer-batch installed fails at start-up instead of running unsteered.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from steer_batch.driver.launch import CPU_ENV, check_plugin_allowed, engine_defaults, on_cpu
from steer_batch.engine.config import WORKER_EXTENSION, engine_config, steering
from steer_batch.errors import SteerBatchError

BATCH_SIZE = 16  # rows per Ray Data batch sent to an engine


def generate_ray(llm_engine_kwargs: dict, spec, todo: list[tuple[int, str, float]], prompts: list[str], writer,
                 replicas: int, progress: bool) -> None:  # fmt: skip
    """Generate `todo`'s (prompt_id, vector, alpha) rows on `replicas` engines; write each
    batch of finished rows to `writer` as it arrives."""
    try:
        import ray
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    except ImportError:
        raise SteerBatchError(
            "--ray needs Ray Data: pip install 'steer-batch[ray]' (or install-cpu.sh, which installs it)", param="ray"
        ) from None
    check_plugin_allowed()
    engine_kwargs = {
        **engine_defaults(llm_engine_kwargs),
        "additional_config": engine_config(vectors={n: v["path"] for n, v in spec.vectors.items()}),
        "worker_extension_cls": WORKER_EXTENSION,
        "distributed_executor_backend": "mp",
    }
    config = vLLMEngineProcessorConfig(
        model_source=spec.model,
        engine_kwargs=engine_kwargs,
        concurrency=replicas,
        batch_size=BATCH_SIZE,
        placement_group_config={"bundle_per_worker": {"CPU": 1, "GPU": 0}} if on_cpu() else None,
        runtime_env={"env_vars": CPU_ENV} if on_cpu() else None,
        tokenize_stage=False,  # vLLM tokenizes and detokenizes, as in a single-engine run
        detokenize_stage=False,
        chat_template_stage=False,
        log_engine_metrics=False,
    )
    s = spec.sampling

    def request(row: dict) -> dict:
        extra = steering(row["vector"], row["alpha"], spec.op, spec.scope)
        params = dict(
            max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=row["seed"], extra_args=extra
        )
        return dict(prompt=row["prompt"], sampling_params=params)

    def result(row: dict) -> dict:
        tokens = [int(t) for t in row["generated_tokens"]]
        return {
            "prompt_id": row["prompt_id"], "prompt": row["prompt"], "alpha": row["alpha"], "vector": row["vector"],
            "text": row["generated_text"], "token_ids": tokens, "num_tokens": len(tokens),
            "finish_reason": "length" if len(tokens) == s.max_tokens else "stop", "seed": row["seed"],
        }  # fmt: skip

    rows = [
        {"prompt_id": p, "prompt": prompts[p], "vector": v, "alpha": a, "seed": spec.seed(p, v, a)} for p, v, a in todo
    ]
    ray.init(ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    processor = build_processor(config, preprocess=request, postprocess=result)
    bar = tqdm(
        total=len(rows), unit="req", disable=not progress, file=sys.stderr, desc=f"generating on {replicas} replicas"
    )
    start, tokens = time.monotonic(), 0
    for batch in processor(ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // BATCH_SIZE))).iter_batches(
        batch_size=None, batch_format="pyarrow"
    ):
        written = batch.to_pylist()
        writer.write(written)
        tokens += sum(r["num_tokens"] for r in written)
        bar.set_postfix_str(f"{tokens / (time.monotonic() - start):.0f} tok/s", refresh=False)
        bar.update(len(written))
    bar.close()
