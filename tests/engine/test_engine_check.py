"""`steer-batch engine-check` (jobs/engine_check.py), the GPU checks through real engines, runs
here on a tiny model: every check that a CPU can run passes, and the GPU-only ones say so."""

import json
import subprocess
import sys

from helpers import make_run_inputs


def test_engine_check_passes_on_the_cpu(tmp_path):
    _, model_dir = make_run_inputs(tmp_path, ["unused"])
    done = subprocess.run(
        [sys.executable, "-m", "steer_batch.cli", "engine-check", "--model", str(model_dir), "--eager",
         "--max-tokens", "6", "--json", str(tmp_path / "report.json")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("engine-check: PASS on cpu:")
    report = json.loads((tmp_path / "report.json").read_text())
    checks = {row["check"]: row["ok"] for row in report["checks"]}
    assert [name for name, ok in checks.items() if ok is None] == ["async scheduling on = off"]
    for name in (
        "steering engine runs the V1 runner",
        "unsteered = stock vLLM, batch of 70",
        "alpha 0 = stock vLLM, batch of 17",
        "mixed batch = each request alone",
        "steering changes the text",
        "runtime vector = start-up vector (clamp)",
        "an overflowing request changes no other",
        "capture = transformers (float32)",
    ):
        assert checks[name] is True, name
    assert set(report["tok_s"]) == {
        "stock vLLM (default runner)",
        "steering engine, unsteered",
        "steering engine, 256 alphas",
    }
