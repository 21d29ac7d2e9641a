"""`steer-batch run --ray` on a real local Ray cluster: two vLLM replicas through Ray Data LLM
write the same rows as a single-engine run, token for token (every Ray batch mixes steered and
unsteered rows), and a cut run resumes without generating written rows again."""

import json

import pytest
import ray
from click.testing import CliRunner

from helpers import make_run_inputs
from steer_batch.cli import main
from steer_batch.eval import runfiles
from steer_batch.eval.arrow_stream import ArrowStream, read_table

PROMPTS = ["That game", "I can see", "Hmm, this", "Who is", "Ugh,", "It was my pleasure"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder, model_dir = make_run_inputs(tmp_path_factory.mktemp("ray"), PROMPTS)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # the local cluster the run joins
    yield folder, model_dir
    ray.shutdown()


def _run(setup, out, *extra):
    folder, model_dir = setup
    args = ["run", "--model", str(model_dir), "--vector", str(folder / "v.safetensors"), "--alphas", "-2,0,2"]
    args += ["--prompts", str(folder / "prompts.json"), "--max-tokens", "6", "--no-eval", "--enforce-eager"]
    result = CliRunner().invoke(main, [*args, "--out", str(out), *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {(r["prompt_id"], r["vector"], r["alpha"]): r for r in read_table(out / "generations.arrow").to_pylist()}


def test_two_replicas_write_the_single_engine_rows(setup, tmp_path):
    single = _run(setup, tmp_path / "single")
    on_ray = _run(setup, tmp_path / "ray", "--ray", "--replicas", "2")
    assert sorted(on_ray) == sorted(single) and len(on_ray) == len(PROMPTS) * 3
    assert {k: r["token_ids"] for k, r in on_ray.items()} == {k: r["token_ids"] for k, r in single.items()}
    assert {k: r["text"] for k, r in on_ray.items()} == {k: r["text"] for k, r in single.items()}
    assert {k: r["seed"] for k, r in on_ray.items()} == {k: r["seed"] for k, r in single.items()}
    steered = [k for k in single if k[2] != 0 and single[k]["token_ids"] != single[(k[0], k[1], 0.0)]["token_ids"]]
    assert len(steered) >= 4, "steering must change rows, or the comparison tests nothing"
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["finished"] and manifest["rows"] == 18

    # A run killed after 7 rows resumes on Ray and generates only what is missing.
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "manifest.json").write_text(
        (tmp_path / "ray" / "manifest.json").read_text().replace('"finished": "', '"was": "')
    )
    rows = list(single.values())
    with ArrowStream.open(cut / "generations.arrow", runfiles.GENERATIONS_SCHEMA)[0] as writer:
        writer.write(rows[:7])
    resumed = _run(setup, cut, "--ray", "--replicas", "2")
    table = read_table(cut / "generations.arrow")
    assert table.num_rows == 18 and table.slice(0, 7).to_pylist() == rows[:7]
    assert {k: r["token_ids"] for k, r in resumed.items()} == {k: r["token_ids"] for k, r in single.items()}
