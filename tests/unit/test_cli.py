"""The click app, in-process: bad input gets a clear error naming the option, nothing is written."""

import re

import pytest
from click.testing import CliRunner

from helpers import make_model
from steer_batch.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model("llama", tmp_path_factory.mktemp("cli") / "model")


def _extract(model_dir, tmp_path, *extra):
    out = tmp_path / "v.safetensors"
    result = CliRunner().invoke(
        main,
        ["extract", "--model", str(model_dir), "--positive", "happy", "--negative", "sad", "--out", str(out), *extra],
    )
    return result, out


def test_version():
    result = CliRunner().invoke(main, ["version"])
    assert result.exit_code == 0 and result.output.startswith("steer-batch ")


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp: ["--template", "Act happy."], r"has no \{persona\} placeholder"),
        (lambda tmp: ["--suffixes", str(tmp / "missing.json")], "cannot read"),
        (lambda tmp: ["--suffixes", _write(tmp / "s.json", "[]")], "holds no non-empty suffix"),
        (lambda tmp: ["--suffixes", _write(tmp / "s.json", '["", ""]')], "holds no non-empty suffix"),
        (lambda tmp: ["--suffixes", _write(tmp / "s.json", '{"a": 1}')], "must hold a JSON list of strings"),
        (lambda tmp: ["--suffixes", _write(tmp / "s.json", "not json")], "cannot read"),
        (lambda tmp: ["--layers", "2-9"], r"layers \[4, 5, 6, 7, 8, 9\] are outside 0..3"),
        (lambda tmp: ["--layers", "x"], "give 'all', a range like 8-20"),
        (lambda tmp: ["--method", "pca"], "'pca' is not one of 'mean_diff', 'pca_diff', 'pca_center'"),
    ],
)
def test_extract_bad_input(model_dir, tmp_path, make_args, message):
    result, out = _extract(model_dir, tmp_path, *make_args(tmp_path))
    assert result.exit_code == 2, result.output
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_convert_round_trip_and_refusal(tmp_path):
    import torch

    from steer_batch import SteeringVector

    v = SteeringVector({0: torch.ones(8), 2: torch.arange(8.0)}, 4, model="m", method="mean_diff", concept="c")
    v.save(tmp_path / "v.safetensors")
    refused = CliRunner().invoke(main, ["convert", str(tmp_path / "v.safetensors"), str(tmp_path / "v.gguf")])
    assert refused.exit_code == 1 and "cannot steer block 0" in refused.output and not (tmp_path / "v.gguf").exists()
    ok = CliRunner().invoke(
        main, ["convert", str(tmp_path / "v.safetensors"), str(tmp_path / "v.gguf"), "--drop-layer-0"]
    )
    assert ok.exit_code == 0 and "layers [2]" in ok.output
    back = CliRunner().invoke(main, ["convert", str(tmp_path / "v.gguf"), str(tmp_path / "w.safetensors")])
    assert back.exit_code == 0
    w = SteeringVector.load(tmp_path / "w.safetensors")
    assert w.layers == [2] and torch.equal(w.directions[2], v.directions[2])


def test_run_rejects_malformed_alphas():
    result = CliRunner().invoke(main, ["run", "--alphas", "4,,x"])
    assert result.exit_code == 2 and "give comma-separated numbers" in result.output


@pytest.mark.parametrize("command", ["report", "classify"])
def test_a_folder_without_a_run_is_a_one_line_error(tmp_path, command):
    result = CliRunner().invoke(main, [command, str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path} holds no generations.arrow: run `steer-batch run --out {tmp_path}` first"
    ]


def test_steering_left_out_of_vllm_plugins_is_a_one_line_error_and_writes_nothing(model_dir, tmp_path, monkeypatch):
    import json

    from helpers import make_tokenizer, make_vector

    make_tokenizer(model_dir)
    make_vector(model_dir, [1], seed=1).save(tmp_path / "v.safetensors")
    (tmp_path / "prompts.json").write_text(json.dumps(["Hello"]))
    monkeypatch.setenv("VLLM_PLUGINS", "none")
    out = tmp_path / "out"
    args = [
        "run",
        "--model",
        str(model_dir),
        "--vector",
        str(tmp_path / "v.safetensors"),
        "--prompts",
        str(tmp_path / "prompts.json"),
    ]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "VLLM_PLUGINS='none' leaves out 'steer_batch'" in result.output
    assert not out.exists()
