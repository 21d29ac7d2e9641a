"""`steer-batch sweep` on a tiny model with a direction planted at one layer only (the
calibrate test's word-level model: the last layer's direction writes VADER's positive words;
the other layers carry directions a million times smaller than their states): the sweep over
each layer recommends the planted layer, the other layers' cells show no effect at all (their
greedy tokens are the unsteered ones), every cell's rows equal a separate `run` with the slice
files, token for token (the shared alpha-0 row equal to each slice's own), and other layer sets
in the same folder are refused before anything is written. The --ab task is tested in
test_behaviour.py, on its A/B model."""

import json

import pyarrow.compute as pc
import torch
from click.testing import CliRunner

from helpers import LAYERS, planted_word_model
from steer_batch import SteeringVector
from steer_batch.cli import main
from steer_batch.eval.arrow_stream import read_table


def test_sweep_finds_the_planted_layer_and_its_cells_equal_separate_runs(tmp_path):
    model_dir, planted = planted_word_model(tmp_path / "model")
    g = torch.Generator().manual_seed(1)
    directions = {i: torch.randn(planted.shape[0], generator=g) * 1e-6 for i in range(LAYERS - 1)}
    directions[LAYERS - 1] = planted
    SteeringVector(directions, LAYERS, model=str(model_dir), method="planted").save(tmp_path / "v.safetensors")
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 400, (5,), generator=g)) for _ in range(12)]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    common = ["--model", str(model_dir), "--prompts", str(tmp_path / "prompts.json"), "--max-tokens", "8"]
    common += ["--classifier", "vader", "--enforce-eager"]
    out = tmp_path / "sweep"
    result = CliRunner().invoke(
        main,
        ["sweep", "--vector", f"v={tmp_path / 'v.safetensors'}", "--layers", "each", "--alphas", "-6,6",
         "--max-nll-increase", "100", "--out", str(out), *common],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    recommendation = json.loads((out / "sweep.json").read_text())
    assert recommendation["recommended"]["layers"] == str(LAYERS - 1), recommendation
    assert recommendation["recommended"]["alpha"] == 6.0 and recommendation["recommended"]["effect"] > 0.2
    cells = read_table(out / "sweep.arrow").to_pylist()
    assert len(cells) == LAYERS * 2
    for cell in cells:
        if cell["layers"] != str(LAYERS - 1):
            assert cell["effect"] == 0.0 and cell["nll_increase"] == 0.0, cell
    # Other layer sets in the same folder: refused before anything is written.
    slices_before = sorted(p.name for p in (out / "slices").iterdir())
    again = CliRunner().invoke(
        main, ["sweep", "--vector", f"v={tmp_path / 'v.safetensors'}", "--layers", f"0-{LAYERS - 1}", "--alphas",
               "-6,6", "--out", str(out), *common],
    )  # fmt: skip
    assert again.exit_code == 2 and "holds a sweep of other layer sets" in again.output, again.output
    assert sorted(p.name for p in (out / "slices").iterdir()) == slices_before
    generations = read_table(out / "generations.arrow")
    assert pc.sum(pc.equal(generations.column("alpha"), 0.0)).as_py() == len(prompts)  # alpha 0 once
    # Every cell again in a separate plain run with the slice files (alpha 0 under each slice).
    single = tmp_path / "single"
    names = [f"v@{i}" for i in range(LAYERS)]
    vectors = [x for name in names for x in ("--vector", f"{name}={out / 'slices' / f'{name}.safetensors'}")]
    result = CliRunner().invoke(
        main,
        ["run", *vectors, "--alphas", "-6,0,6", "--out", str(single), "--no-eval", *common[:-3], "--enforce-eager"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    alone = {
        (r["prompt_id"], r["vector"], r["alpha"]): r["token_ids"]
        for r in read_table(single / "generations.arrow").to_pylist()
    }
    swept = {(r["prompt_id"], r["vector"], r["alpha"]): r["token_ids"] for r in generations.to_pylist()}
    assert len(alone) == len(prompts) * LAYERS * 3 and len(swept) == len(prompts) * (LAYERS * 2 + 1)
    for (prompt, name, alpha), tokens in alone.items():
        assert swept[(prompt, name if alpha else names[0], alpha)] == tokens, (prompt, name, alpha)
