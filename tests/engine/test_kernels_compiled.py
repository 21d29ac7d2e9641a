"""The steering op where it meets vLLM and compilers: bit for bit vLLM's fused_add_rms_norm when
nothing is steered, the Triton kernel under the Triton interpreter (CPU), and the custom op under
torch.compile."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import KERNEL_EPS as EPS
from helpers import kernel_inputs as inputs
from helpers import kernel_reference as reference
from helpers import rel_err as rel
from steer_batch.kernels import fused_add_rms_norm_steer, steer_add

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_token_steered_is_exactly_vllms_fused_add_rms_norm(dtype):
    from vllm.ir.ops.layernorm import fused_add_rms_norm

    x, res, w, p, q, r, vid, V, U = inputs(17, 576, dtype, steered=0.0)
    want_out, want_res = fused_add_rms_norm(x.clone(), res.clone(), w, EPS)
    out, res_out = fused_add_rms_norm_steer(x, res, w, EPS, p, q, r, vid, V, U)
    assert torch.equal(out, want_out) and torch.equal(res_out, want_res)


def test_gpu_check_runs_its_cpu_parts(tmp_path):
    """kernels/gpu_check.py's CPU parts (Triton interpreter, compiled toy stack, step inputs): PASS and a report."""
    pytest.importorskip("triton", reason="Triton is not installed: its interpreter cannot run")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "kernels" / "gpu_check.py"),
            "--interpret",
            "--json",
            str(tmp_path / "gpu_check.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    verdict = done.stdout.strip().splitlines()[-1]
    assert verdict.startswith("gpu_check: PASS on cpu (interpreter): 61 of 61 checks passed"), verdict
    # kernels: 3 shapes x 3 dtypes x (3 outputs + 2 non-finite checks); graph: 2 dtypes x 2 replays x 3; step: 4
    assert done.stdout.count("ok  ") == 45 + 12 + 4
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] and len(report["checks"]) == 61 and report["device"] == "cpu (interpreter)"


def test_custom_ops_compile_to_the_same_result():
    from steer_batch.kernels import ops

    x, res, w, p, q, r, vid, V, U = inputs(9, 576, torch.float32)

    def layer_tail(x, res):
        out, res_out = ops.fused_add_rms_norm_steer(x, res, w, EPS, p, q, r, vid, V, U)
        return steer_add(out, res_out, p, q, r, vid, V, U), res_out

    eager = layer_tail(x, res)
    compiled = torch.compile(layer_tail, fullgraph=True, dynamic=True)(x, res)
    want_out, want_res = reference(x, res, w, p, q, r, vid, V, U)
    # The second application steers out + res_out, starting from the reference's outputs.
    _, want_twice = reference(want_out.float(), want_res.float(), w, p, q, r, vid, V, U)
    for got in (eager, compiled):
        assert rel(got[1], want_res) <= 1e-5
        assert rel(got[0].double() + got[1].double(), want_twice) <= 1e-5
