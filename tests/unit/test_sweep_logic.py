"""`steer-batch sweep`'s table without an engine: on a synthetic classified sweep folder whose
effects and costs are known by construction, every cell pairs with the one set of unsteered
rows, and the recommendation is the largest effect within the budget."""

from dataclasses import asdict

import pytest

from steer_batch.eval import runfiles
from steer_batch.eval.arrow_stream import ArrowStream
from steer_batch.jobs.run import RunSpec
from steer_batch.jobs.sweep import plot, sweep_table, write_report

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
