"""`steer-batch calibrate` and `run --alphas auto` on a tiny model with a planted direction: a
word-level vocabulary holding VADER's positive and negative words among neutral fillers, and a
vector at the last layer along the output rows of the positive words minus the negative ones,
so +alpha writes positive words, -alpha negative ones, and both cost coherence (the model's
scaled head makes its own continuations likely and the planted words unlikely)."""

import json

import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from helpers import LAYERS, planted_word_model
from steer_batch import SteeringVector
from steer_batch.cli import main
from steer_batch.eval.arrow_stream import read_table

ALPHAS = "-6:6:9"  # -6, -4.5, ..., 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibrate")
    model_dir, direction = planted_word_model(folder / "model")
    last = LAYERS - 1
    SteeringVector({last: direction}, LAYERS, model=str(model_dir), method="planted", concept="positive words").save(
        folder / "planted.safetensors"
    )
    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 400, (5,), generator=g)) for _ in range(16)]
    (folder / "prompts.json").write_text(json.dumps(prompts))
    return folder, model_dir


def _calibrate(setup, out, *extra):
    folder, model_dir = setup
    args = ["calibrate", "--model", str(model_dir), "--vector", f"planted={folder / 'planted.safetensors'}"]
    args += ["--alphas", ALPHAS, "--prompts", str(folder / "prompts.json"), "--max-tokens", "8", "--out", str(out)]
    result = CliRunner().invoke(
        main, [*args, "--classifier", "vader", "--enforce-eager", *extra], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return read_table(out / "calibration.arrow").to_pylist(), json.loads((out / "calibration.json").read_text())


def _within_budget(rows, chosen, budget):
    """The recommendation walks outward from 0: every alpha up to it within the budget, the next over."""
    for side, sign in (("negative", -1), ("positive", 1)):
        outward = sorted((r for r in rows if r["alpha"] * sign > 0), key=lambda r: abs(r["alpha"]))
        if chosen[side] is None:
            assert outward[0]["nll_increase"] > budget
            continue
        k = [r["alpha"] for r in outward].index(chosen[side])
        assert all(r["nll_increase"] <= budget for r in outward[: k + 1])
        assert k + 1 == len(outward) or outward[k + 1]["nll_increase"] > budget


@pytest.fixture(scope="module")
def calibrated(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "c"
    return out, *_calibrate(setup, out)


def test_calibrate_finds_the_planted_side_and_respects_the_budget(setup, calibrated):
    out, rows, calibration = calibrated
    by_alpha = {r["alpha"]: r for r in rows}
    assert list(by_alpha) == [-6.0, -4.5, -3.0, -1.5, 0.0, 1.5, 3.0, 4.5, 6.0]
    assert by_alpha[6.0]["effect"] > 0.3 and by_alpha[6.0]["p_positive"] > 0.5  # the planted words came out
    assert by_alpha[-6.0]["effect"] <= 0  # negative words: p_positive does not rise
    assert by_alpha[0.0]["effect"] == 0 and by_alpha[0.0]["nll_increase"] == 0
    assert by_alpha[6.0]["nll_increase"] > 0.5 and by_alpha[-6.0]["nll_increase"] > 0.5  # steering costs coherence
    assert calibration["toward_target"] == "positive" and calibration["max_nll_increase"] == 0.5
    _within_budget(rows, calibration["recommended"], 0.5)
    assert calibration["sample"] == 16 and calibration["vector"]["name"] == "planted"
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pa.ipc.open_stream(str(out / "calibration.arrow")).schema.names[:3] == ["alpha", "n", "p_positive"]

    # The budget decides (recomputed from the same run folder, no new generation): more steering
    # costs more coherence here, so a budget between the k-th and the next increase on the
    # positive side picks the k-th alpha, and one below the first picks none.
    positive = sorted((r for r in rows if r["alpha"] > 0), key=lambda r: r["alpha"])
    increases = [r["nll_increase"] for r in positive]
    assert increases == sorted(increases)
    for budget, want in (((increases[1] + increases[2]) / 2, positive[1]["alpha"]), (increases[0] / 2, None)):
        _, other = _calibrate(setup, out, "--max-nll-increase", str(budget))
        assert other["recommended"]["positive"] == want and other["max_nll_increase"] == budget
        _within_budget(rows, other["recommended"], budget)
    _, toward = _calibrate(setup, out, "--target", "negative")
    assert toward["toward_target"] == "negative" and toward["target"] == "negative"


def test_calibration_is_reproducible(setup, calibrated, tmp_path):
    _, rows, calibration = calibrated
    again_rows, again = _calibrate(setup, tmp_path / "again")
    assert again["recommended"] == calibration["recommended"]
    assert again_rows == rows


def test_run_alphas_auto_runs_at_the_recommended_alpha(setup, tmp_path):
    folder, model_dir = setup
    out = tmp_path / "auto"
    args = ["run", "--model", str(model_dir), "--vector", f"planted={folder / 'planted.safetensors'}", "--alphas"]
    args += ["auto", "--prompts", str(folder / "prompts.json"), "--max-tokens", "8", "--classifier", "vader"]
    args += ["--enforce-eager"]
    result = CliRunner().invoke(main, [*args, "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # The calibration (calibrate's defaults: alphas -8..8, budget 0.5) sits in OUT/calibration.
    calibration = json.loads((out / "calibration" / "calibration.json").read_text())
    chosen = calibration["recommended"]
    assert calibration["alphas"] == [float(a) for a in range(-8, 9)] and None not in chosen.values()
    _within_budget(read_table(out / "calibration" / "calibration.arrow").to_pylist(), chosen, 0.5)
    a = min(-chosen["negative"], chosen["positive"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec"]["alphas"] == [-a, 0.0, a]
    assert manifest["calibration"]["alpha"] == a and manifest["calibration"]["recommended"] == chosen
    assert set(read_table(out / "generations.arrow").column("alpha").to_pylist()) == {-a, 0.0, a}
    # A budget no alpha meets on a side: auto stops before the full run, naming the fix.
    refused = CliRunner().invoke(main, [*args, "--max-nll-increase", "1e-6", "--out", str(tmp_path / "no")])
    assert refused.exit_code != 0 and "raise --max-nll-increase" in refused.output
    assert not (tmp_path / "no" / "generations.arrow").exists()
