"""`steer-batch sweep` without an engine: on synthetic classified sweep folders whose effects
and costs are known by construction, every cell pairs with the one set of unsteered rows (the
generations' for a sentiment target, the A/B scores' with --ab), and the recommendation is the
largest effect within the budget; bad input, a wrong folder, a slice of another vector and a
grid larger than a bank are refused before anything is written."""

from dataclasses import asdict

import pytest
import torch
from click.testing import CliRunner

from helpers import make_run_inputs
from steer_batch import SteeringVector
from steer_batch.cli import main
from steer_batch.errors import SteerBatchError
from steer_batch.eval import runfiles
from steer_batch.eval.arrow_stream import ArrowStream
from steer_batch.eval.choices import CHOICES, CHOICES_SCHEMA
from steer_batch.jobs.eval_ab import EvalSpec
from steer_batch.jobs.run import AB_SCORES, RunSpec
from steer_batch.jobs.sweep import check_bank, plot, slices, sweep_table, write_report

PROMPTS = 6


def _folder(out, cells):
    """cells: {(slice, alpha): (p_positive, nll)} for every prompt; alpha 0 under the first slice."""
    out.mkdir()
    rows = [
        {
            "prompt_id": i, "vector": name, "alpha": alpha, "classifier": "vader", "p_negative": 0.0,
            "p_neutral": 1.0 - p, "p_positive": p, "nll": nll + 0.01 * i,
        }
        for (name, alpha), (p, nll) in cells.items()
        for i in range(PROMPTS)
    ]  # fmt: skip
    with ArrowStream.open(out / runfiles.SENTIMENT, runfiles.SENTIMENT_SCHEMA)[0] as writer:
        writer.write(rows)


def test_cells_pair_with_the_shared_alpha_0_and_the_best_cell_within_budget_wins(tmp_path):
    cells = {
        ("v@0-1", 0.0): (0.2, 1.0),
        ("v@0-1", 4.0): (0.5, 1.3),  # effect 0.3, cost 0.3
        ("v@0-1", 8.0): (0.9, 2.0),  # effect 0.7, cost 1.0: over 0.5
        ("v@2-3", 4.0): (0.6, 1.4),  # effect 0.4, cost 0.4: the recommendation
        ("v@2-3", 8.0): (0.1, 1.1),  # effect -0.1
    }
    _folder(tmp_path / "s", cells)
    table, rec = sweep_table(tmp_path / "s", "positive", 0.5)
    got = {(r["layers"], r["alpha"]): (r["effect"], r["nll_increase"], r["n"]) for r in table.to_pylist()}
    assert set(got) == {("0-1", 4.0), ("0-1", 8.0), ("2-3", 4.0), ("2-3", 8.0)}
    for (name, alpha), (p, nll) in cells.items():
        if alpha:
            effect, increase, n = got[(name.partition("@")[2], alpha)]
            assert effect == pytest.approx(p - 0.2) and increase == pytest.approx(nll - 1.0) and n == PROMPTS
    assert rec["recommended"]["layers"] == "2-3" and rec["recommended"]["alpha"] == 4.0
    assert {s: r["alpha"] for s, r in rec["best_per_layer_set"].items()} == {"0-1": 4.0, "2-3": 4.0}
    _, tight = sweep_table(tmp_path / "s", "positive", 0.35)
    assert tight["recommended"]["layers"] == "0-1"
    _, negative = sweep_table(tmp_path / "s", "negative", 0.5)
    assert negative["recommended"] is None  # p_negative never moves here
    plot(table, rec, tmp_path / "sweep.png", "t")
    write_report(table, rec, tmp_path / "sweep.md", "t")
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert "Recommended: layers 2-3 at alpha 4" in (tmp_path / "sweep.md").read_text()


def test_zero_once_keeps_one_unsteered_row_per_prompt():
    vectors = {"v@0-1": {"path": "a", "sha256": "1"}, "v@2-3": {"path": "b", "sha256": "2"}}
    spec = RunSpec(
        model="m", model_hash="h", vectors=vectors, alphas=[-4.0, 0.0, 4.0],
        prompts_file="p", prompts_sha256="s", num_prompts=2, zero_once=True,
    )  # fmt: skip
    assert [r for r in spec.rows if r[2] == 0.0] == [(0, "v@0-1", 0.0), (1, "v@0-1", 0.0)]
    assert len(spec.rows) == 2 * (2 * 2 + 1)
    assert spec.same_run(asdict(spec))
    old = {k: v for k, v in asdict(spec).items() if k != "zero_once"}
    assert not spec.same_run(old)  # a manifest from before the field: a plain run, not this one


def _ab_scores(folder, p_match):
    """folder/ab/choices.arrow: p_match[(slice, alpha)][row] per row; alpha 0 under the first slice."""
    (folder / AB_SCORES).mkdir()
    rows = [
        {
            "row": row, "vector": name, "alpha": alpha, "p_match": p, "logprob_match": -1.0,
            "logprob_not_match": -1.0, "match_token_ids": [1], "not_match_token_ids": [2], "answer_start": 0,
        }
        for (name, alpha), ps in p_match.items()
        for row, p in enumerate(ps)
    ]  # fmt: skip
    with ArrowStream.open(folder / AB_SCORES / CHOICES, CHOICES_SCHEMA)[0] as writer:
        writer.write(rows)


def test_an_ab_sweep_takes_the_effect_from_p_match_and_the_cost_from_the_generations(tmp_path):
    costs = {("v@0", 0.0): (0.5, 1.0), ("v@0", 2.0): (0.5, 1.2), ("v@1", 2.0): (0.5, 1.9)}
    _folder(tmp_path / "s", costs)
    _ab_scores(
        tmp_path / "s",
        {("v@0", 0.0): [0.5, 0.4, 0.6], ("v@0", 2.0): [0.6, 0.5, 0.7], ("v@1", 2.0): [0.9, 0.8, 0.9]},
    )
    table, rec = sweep_table(tmp_path / "s", "match", 0.5)
    got = {r["layers"]: r for r in table.to_pylist()}
    assert got["0"]["effect"] == pytest.approx(0.1) and got["1"]["effect"] == pytest.approx((0.4 + 0.4 + 0.3) / 3)
    assert got["0"]["n"] == 3 and got["0"]["n_generated"] == PROMPTS
    assert got["0"]["nll_increase"] == pytest.approx(0.2) and got["1"]["nll_increase"] == pytest.approx(0.9)
    assert got["1"]["effect_lo"] <= got["1"]["effect"] <= got["1"]["effect_hi"]
    assert rec["recommended"]["layers"] == "0"  # layer 1 moves p_match more, over the budget
    assert sweep_table(tmp_path / "s", "match", 1.0)[1]["recommended"]["layers"] == "1"
    down, rec_down = sweep_table(tmp_path / "s", "not_match", 1.0)
    assert [r["effect"] for r in down.to_pylist()] == pytest.approx([-r["effect"] for r in table.to_pylist()])
    assert all(r["effect_lo"] <= r["effect"] <= r["effect_hi"] for r in down.to_pylist())
    assert rec_down["recommended"] is None  # nothing lowers p_match


def test_zero_once_in_an_ab_spec_scores_one_unsteered_row_per_question():
    vectors = {"v@0": {"path": "a", "sha256": "1"}, "v@1": {"path": "b", "sha256": "2"}}
    data = {"file": "f", "sha256": "s", "rows": "0:3"}
    spec = EvalSpec("m", "h", data, 0, 3, vectors, [-1.0, 0.0, 1.0], zero_once=True)
    assert [r for r in spec.rows if r[2] == 0.0] == [(0, "v@0", 0.0), (1, "v@0", 0.0), (2, "v@0", 0.0)]
    assert len(spec.rows) == 3 * (2 * 2 + 1) and spec.same_run(asdict(spec))
    assert not spec.same_run({k: v for k, v in asdict(spec).items() if k != "zero_once"})


def test_a_grid_larger_than_a_bank_is_refused_with_the_number_needed():
    check_bank(4096)
    with pytest.raises(SteerBatchError, match="4097 layer sets need 4097 bank rows.*at most 4096"):
        check_bank(4097)


def test_a_resumed_sweep_refuses_slices_of_another_vector(tmp_path):
    first = SteeringVector({0: torch.ones(8), 1: torch.ones(8)}, 2)
    files = slices(first, "v", [[0], [1]], tmp_path)
    assert list(files) == ["v@0", "v@1"] and SteeringVector.load(files["v@1"]).layers == [1]
    assert slices(first, "v", [[0], [1]], tmp_path) == files  # the same vector: resumed
    other = SteeringVector({0: torch.ones(8), 1: -torch.ones(8)}, 2)
    before = {f: f.read_bytes() for f in files.values()}
    with pytest.raises(SteerBatchError, match="v@1.safetensors is a slice of another vector"):
        slices(other, "v", [[0], [1]], tmp_path)
    assert {f: f.read_bytes() for f in files.values()} == before


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_run_inputs(tmp_path_factory.mktemp("sweep"), ["That game", "I can see", "Hmm, this"])


@pytest.mark.parametrize(
    "change, message",
    [
        (["--prompts", "missing.json"], "cannot read"),
        (["--rows", "0:2"], "give --ab FILE with --rows"),
        (["--ab", "missing.jsonl"], "missing.jsonl"),
        (["--target", "match"], "target='match'; allowed"),
        (["--layers", "0-3"], "not among the vector's layers [1, 2]"),
        (["--stray"], "is not a steer-batch run folder"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(inputs, tmp_path, change, message):
    folder, model_dir = inputs
    out = tmp_path / "out"
    if change == ["--stray"]:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        change = []
    options = {
        "--model": str(model_dir),
        "--vector": f"v={folder / 'v.safetensors'}",
        "--prompts": str(folder / "prompts.json"),
        "--out": str(out),
    }
    options.update(zip(change[::2], change[1::2]))
    result = CliRunner().invoke(main, ["sweep", *[x for pair in options.items() for x in pair]])
    assert result.exit_code in (1, 2), result.output
    assert message in " ".join(result.output.split())
    assert not out.exists() or [p.name for p in out.iterdir()] == ["notes.txt"]
