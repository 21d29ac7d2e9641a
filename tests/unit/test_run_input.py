"""`steer-batch run` refuses bad input before any engine starts, writing nothing (the rest of
`run` is tested end to end in tests/engine/test_run.py)."""

import json

import pytest
from click.testing import CliRunner

from helpers import make_run_inputs
from steer_batch.cli import main

PROMPTS = ["That game", "I can see", "Hmm, this"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_run_inputs(tmp_path_factory.mktemp("run"), PROMPTS)


@pytest.mark.parametrize(
    "change, message",
    [
        (["--alphas", "4,,x"], "give comma-separated numbers"),
        (["--prompts", "missing.json"], "cannot read"),
        (["--prompts", "{bad}"], "must hold a JSON list of strings"),
        (["--classifier", "roberta"], "'roberta' is not one of"),
        (["--vector", "{other}"], "layers.0 has hidden size 64; expected 128"),
    ],
)
def test_bad_input_fails_before_any_engine_starts_and_writes_nothing(setup, tmp_path, change, message):
    import torch

    from steer_batch import SteeringVector

    folder, model_dir = setup
    (tmp_path / "bad.json").write_text(json.dumps({"prompts": PROMPTS}))
    SteeringVector({0: torch.ones(64)}, 4).save(tmp_path / "other.safetensors")
    change = [c.format(bad=tmp_path / "bad.json", other=tmp_path / "other.safetensors") for c in change]
    out = tmp_path / "out"
    options = {
        "--model": str(model_dir),
        "--vector": str(folder / "v.safetensors"),
        "--prompts": str(folder / "prompts.json"),
        "--out": str(out),
    }
    options.update(zip(change[::2], change[1::2]))
    result = CliRunner().invoke(main, ["run", *[x for pair in options.items() for x in pair]])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not out.exists()
