"""One-shot check of everything below vLLM on a GPU: correctness, CUDA graphs, timing.

    python kernels/gpu_check.py [--json report.json]        # a GPU machine, from the repository root
    TRITON_INTERPRET=1 python kernels/gpu_check.py --interpret   # the parts a CPU can run (the test suite)

Needs only PyTorch and Triton (no vLLM, the project not installed). Sections:

1. kernels: the fused op (Triton) and the separate add (the torch op torch.compile fuses in the
   engine) against a float64 reference, hidden {896, 4096} x tokens {1, 17, 512, 8192} x {bf16,
   fp16, fp32}, each token with a random mix of add, ablate and clamp in two slots; outputs
   pre-filled with NaN so an unwritten element shows; an alpha of 1e30 stays finite, a NaN in
   the input stays visible.
2. graph: a toy stack of steered layers on the engine's buffers (kernels/step_inputs.py fills
   them, banks written in place), compiled and captured in a CUDA graph at a padded token count,
   replayed after the buffers and a bank row change in place: each replay equals eager, and the
   padded rows come out unsteered. `capture_rows_` inside the graph gives the float32 rows.
3. step inputs: a large step, then a small one: the rows past the small one are cleared.
4. timing (GPU only): per layer (hidden 4096; 1, 512 and 8192 tokens), the separate add with 1
   and 4 slots (half the tokens steered, and none), the fused op, and an unsteered add + RMSNorm,
   each compiled as the engine runs it.

Prints one verdict line last (`gpu_check: PASS ...` or `gpu_check: FAIL ...`) and writes a JSON
report with every check and timing (`--json`, default gpu_check.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `import kernels`

from kernels import ops  # noqa: E402, F401  (registers torch.ops.steer_batch.*)
from kernels import steer as ref  # noqa: E402
from kernels import triton_steer as tri  # noqa: E402
from kernels.step_inputs import HI, LO, VID, P, Q, R, StepInputs  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}  # max error / max |reference|
EPS = 1e-6
NUM_VECTORS = 4
SLOTS = 2  # entries per token in section 1: a random mix of add, ablate and clamp


class Report:
    def __init__(self):
        self.checks: list[dict] = []
        self.timings: list[dict] = []

    def check(self, section: str, name: str, ok: bool, **detail) -> None:
        self.checks.append({"section": section, "name": name, "ok": bool(ok), **detail})
        extra = " ".join(f"{k}={v}" for k, v in detail.items())
        print(f"{'ok  ' if ok else 'FAIL'} {section:<6} {name:<28} {extra}", flush=True)

    @property
    def failures(self) -> list[dict]:
        return [c for c in self.checks if not c["ok"]]


def make_inputs(
    tokens: int, hidden: int, dtype: torch.dtype, device: str, steered: float = 0.5, seed: int = 0, slots: int = SLOTS
):
    """x, residual, weight, p, q, r, vid, V, U; a `steered` share of the token slots carries an
    add, an ablate or a clamp (kernels/steer.py), the rest all-zero coefficients."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    residual = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(device, dtype)
    V = torch.randn(NUM_VECTORS, hidden, generator=g)
    V[-1] = 0  # a vector without a direction at this layer
    U = V / V.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    vid = torch.randint(0, NUM_VECTORS, (tokens, slots), generator=g, dtype=torch.int32)
    alpha = torch.randn(tokens, slots, generator=g) * 4
    op = torch.randint(0, 3, (tokens, slots), generator=g)
    on = torch.rand(tokens, slots, generator=g) < steered
    zero = torch.zeros_like(alpha)
    p = torch.where(on & (op == 0), alpha, zero)
    q = torch.where(on & (op == 2), alpha, zero)
    r = torch.where(on & (op == 1), -alpha, torch.where(on & (op == 2), -1.0, zero))
    p, q, r, V, U = (t.to(device, torch.float32) for t in (p, q, r, V, U))
    return x, residual, weight, p, q, r, vid.to(device), V, U


def reference64(x, residual, weight, p, q, r, vid, V, U):
    """(normed output, steered sum) in float64, slot by slot: the oracle."""
    s = x.double() + residual.double()
    n = s.shape[0]
    for m in range(p.shape[1]):
        rows = vid[:n, m].long()
        v, u = V.double()[rows], U.double()[rows]
        dot = (s * u).sum(-1, keepdim=True)
        s = s + p[:n, m, None].double() * v + (q[:n, m, None].double() + r[:n, m, None].double() * dot) * u
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * weight.double(), s


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12))


def check_kernels(report: Report, device: str, shapes, dtypes) -> None:
    for dtype in dtypes:
        for tokens, hidden in shapes:
            inputs = make_inputs(tokens, hidden, dtype, device)
            x, res, w, p, q, r, vid, V, U = inputs
            want_out, want_res = reference64(*inputs)
            out, res_out = torch.full_like(x, float("nan")), torch.full_like(res, float("nan"))
            tri.fused_add_rms_norm_steer(x, res, w, EPS, p, q, r, vid, V, U, out=out, residual_out=res_out)
            added = ref.steer_add(x, res, p, q, r, vid, V, U)  # hidden + change: added + res is the steered sum
            shape = dict(tokens=tokens, hidden=hidden, dtype=str(dtype).removeprefix("torch."))
            for name, got, want in (
                ("fused out", out, want_out),
                ("fused residual", res_out, want_res),
                ("add", added.double() + res.double(), want_res),
            ):
                err = rel_err(got, want)
                ok = err <= TOLERANCE[dtype] and not bool(torch.isnan(got).any())
                report.check("kernel", name, ok, rel_err=f"{err:.2e}", **shape)
            # Non-finite handling: an absurd alpha saturates instead of overflowing; a NaN stays.
            p[0, 0], vid[0, 0] = 1e30, 0
            fused = tri.fused_add_rms_norm_steer(x, res, w, EPS, p, q, r, vid, V, U)
            added = ref.steer_add(x, res, p, q, r, vid, V, U)
            finite = all(bool(torch.isfinite(t).all()) for t in (*fused, added))
            report.check("kernel", "alpha 1e30 stays finite", finite, **shape)
            nan = x.clone()
            nan[0, 0] = float("nan")
            kept = bool(torch.isnan(tri.fused_add_rms_norm_steer(nan, res, w, EPS, p, q, r, vid, V, U)[1][0, 0]))
            kept &= bool(torch.isnan(ref.steer_add(nan, res, p, q, r, vid, V, U)[0, 0]))
            report.check("kernel", "a NaN stays visible", kept, **shape)


class ToyStack(torch.nn.Module):
    """Decoder-like layers on vLLM's deferred (hidden, residual) form: each adds its input to the
    residual, normalises, applies a linear map, and steers its output with the engine's op on
    the shared per-token buffers; layer 1 also copies its output at the capture rows."""

    def __init__(self, hidden: int, layers: int, max_tokens: int, slots: int, device: str, dtype: torch.dtype):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.lins = [(torch.randn(hidden, hidden, generator=g) / hidden**0.5).to(device, dtype) for _ in range(layers)]
        self.p, self.q, self.r = (torch.zeros(max_tokens, slots, device=device) for _ in range(3))
        self.vid = torch.zeros(max_tokens, slots, dtype=torch.int32, device=device)
        self.V = torch.randn(NUM_VECTORS, hidden, generator=g).to(device) * 4
        self.U = self.V / self.V.norm(dim=-1, keepdim=True)
        self.capture_rows = torch.zeros(4, dtype=torch.long, device=device)
        self.captured = torch.zeros(4, hidden, device=device)  # float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, residual = x, torch.zeros_like(x)
        for i, lin in enumerate(self.lins):
            residual = hidden + residual
            normed = residual * torch.rsqrt(residual.float().pow(2).mean(-1, keepdim=True) + EPS).to(x.dtype)
            hidden = normed @ lin
            hidden = ref.steer_add(hidden, residual, self.p, self.q, self.r, self.vid, self.V, self.U)
            if i == 1:
                torch.ops.steer_batch.capture_rows_(self.captured, hidden, residual, self.capture_rows)
        return hidden + residual


def _plans(requests: int, slots: int, seed: int) -> np.ndarray:
    """Random plans: adds, ablates and clamps on random bank rows, some slots unused, each entry
    steering a random range of positions."""
    rng = np.random.default_rng(seed)
    plans = np.zeros((requests, 6, slots))
    for k in range(requests):
        for m in range(rng.integers(0, slots + 1)):
            plans[k, VID, m] = rng.integers(0, NUM_VECTORS)
            plans[k, [P, Q, R][rng.integers(0, 3)], m] = rng.normal() * 2
            plans[k, LO, m], plans[k, HI, m] = rng.integers(0, 4), rng.choice([rng.integers(4, 12), np.inf])
    return plans


def check_graph(report: Report, device: str, dtype: torch.dtype) -> None:
    """Section 2 on `device`: a CUDA graph on a GPU; on the CPU the compiled stack alone."""
    hidden, max_tokens, padded = 256, 64, 16
    stack = ToyStack(hidden, 3, max_tokens, 4, device, dtype)
    inputs = StepInputs(stack.p, stack.q, stack.r, stack.vid)
    compiled = torch.compile(stack.forward, dynamic=False)
    static_x = torch.zeros(padded, hidden, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(2)

    def step(tokens: list[int], computed: list[int], seed: int) -> None:
        inputs.fill(_plans(len(tokens), 4, seed), np.array(tokens), np.array(computed))
        static_x.zero_()
        static_x[: sum(tokens)] = torch.randn(sum(tokens), hidden, generator=g).to(device, dtype)
        stack.capture_rows.copy_(torch.tensor([0, sum(tokens) - 1, 2, 5]))

    kind = {"dtype": str(dtype).removeprefix("torch."), "cuda_graph": device == "cuda"}
    step([8, 8], [0, 3], seed=0)  # a full padded step first: its rows must not leak into the next
    graph = None
    if device == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                compiled(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = compiled(static_x)
    for replay, (tokens, computed) in enumerate([([5, 1, 7], [0, 9, 2]), ([1, 1, 1, 10], [4, 0, 30, 6])]):
        step(tokens, computed, seed=replay + 1)
        stack.V[replay + 1].mul_(-0.5)  # a bank row rewritten in place, as a runtime vector is
        stack.U[replay + 1].copy_(stack.V[replay + 1] / stack.V[replay + 1].norm())
        if graph is not None:
            graph.replay()
            got, got_captured = static_out.clone(), stack.captured.clone()
        else:
            got, got_captured = compiled(static_x), stack.captured.clone()
        want = stack(static_x)  # eager on the same buffers
        n = sum(tokens)
        err = rel_err(got[:n], want[:n].double())
        report.check("graph", f"replay {replay + 1} = eager", err <= TOLERANCE[dtype], rel_err=f"{err:.2e}", **kind)
        # Padded rows were steered in the first step; now they must be unsteered.
        saved = [t.clone() for t in (stack.p, stack.q, stack.r)]
        for t in (stack.p, stack.q, stack.r):
            t.zero_()
        plain = stack(static_x)
        for t, s in zip((stack.p, stack.q, stack.r), saved):
            t.copy_(s)
        stack(static_x)  # restore the capture buffer to this step's
        err = rel_err(got[n:], plain[n:].double())
        report.check("graph", f"replay {replay + 1} padded rows", err <= TOLERANCE[dtype], rel_err=f"{err:.2e}", **kind)
        err = rel_err(got_captured, stack.captured.double())
        report.check("graph", f"replay {replay + 1} capture fp32", got_captured.dtype == torch.float32 and
                     err <= TOLERANCE[dtype], rel_err=f"{err:.2e}", **kind)  # fmt: skip


def check_step_inputs(report: Report, device: str) -> None:
    """Section 3: a fake runner's large step, then a small one."""
    bufs = [torch.zeros(32, 3, device=device) for _ in range(3)] + [
        torch.zeros(32, 3, dtype=torch.int32, device=device)
    ]
    inputs = StepInputs(*bufs)
    big = np.zeros((2, 6, 3))
    big[:, P, 0], big[:, VID, 0], big[:, HI, 0] = 2.0, 1, np.inf
    inputs.fill(big, np.array([10, 14]), np.array([0, 0]))
    report.check(
        "step", "large step written", bool((bufs[0][:24, 0] == 2).all()) and bool((bufs[3][:24, 0] == 1).all())
    )
    small = big[:1].copy()
    small[0, HI, 0] = 6  # steers positions < 6 only
    inputs.fill(small, np.array([3]), np.array([4]))  # positions 4, 5, 6
    if device == "cuda":
        torch.cuda.synchronize()
    want = torch.tensor([2.0, 2.0, 0.0], device=device)
    report.check("step", "positions bound the entry", torch.equal(bufs[0][:3, 0], want))
    report.check("step", "stale rows cleared", all(bool((b[3:] == 0).all()) for b in bufs))
    inputs.fill(None, np.array([2]), np.array([0]))
    if device == "cuda":
        torch.cuda.synchronize()
    report.check("step", "unsteered step all zero", all(bool((b == 0).all()) for b in bufs))


def cuda_time(fn, inputs: list, repeats: int = 50) -> float:
    """Median microseconds of fn(*inputs[i]) over repeats, cycling through the input sets."""
    for i in range(5):
        fn(*inputs[i % len(inputs)])
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*inputs[i % len(inputs)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def timing(report: Report, dtype: torch.dtype) -> None:
    """Section 4: microseconds per layer, compiled as the engine runs each op."""

    def add(x, res, w, p, q, r, vid, V, U):
        return ref.steer_add(x, res, p, q, r, vid, V, U)

    def stock(x, res, w, p, q, r, vid, V, U):  # vLLM's add + RMSNorm, unsteered
        s = x.float() + res.float()
        return (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * w, s.to(x.dtype)

    def fused(x, res, w, p, q, r, vid, V, U):
        return tri.fused_add_rms_norm_steer(x, res, w, EPS, p, q, r, vid, V, U, out=x, residual_out=res)

    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    print(f"\n{torch.cuda.get_device_name(0)}, {str(dtype)}: microseconds per layer (median of 50)")
    header = (
        f"{'tokens':>6} {'hidden':>6} | {'add 1':>7} {'add 4':>7} {'add 4 none':>10} | {'fused 4':>7} | {'stock':>7}"
    )
    print(header + "\n" + "-" * len(header))
    for hidden in (4096,):
        for tokens in (1, 512, 8192):
            add_c, stock_c = torch.compile(add, dynamic=False), torch.compile(stock, dynamic=False)
            size = 2 * tokens * hidden * torch.empty(0, dtype=dtype).element_size()
            sets = max(2, int(3 * l2 // size) + 1)  # rotate through more than L2
            row = {"tokens": tokens, "hidden": hidden, "dtype": str(dtype).removeprefix("torch.")}
            for name, fn, slots, steered in (
                ("add 1", add_c, 1, 0.5),
                ("add 4", add_c, 4, 0.5),
                ("add 4 none", add_c, 4, 0.0),
                ("fused 4", fused, 4, 0.5),
                ("stock", stock_c, 4, 0.0),
            ):
                args = [make_inputs(tokens, hidden, dtype, "cuda", steered, seed, slots) for seed in range(sets)]
                row[name] = round(cuda_time(fn, args), 2)
                del args
            report.timings.append(row)
            print(f"{tokens:>6} {hidden:>6} | {row['add 1']:>7} {row['add 4']:>7} {row['add 4 none']:>10} | "
                  f"{row['fused 4']:>7} | {row['stock']:>7}")  # fmt: skip
            torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true", help="CPU, Triton interpreter, small shapes, no timing")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="where to write the report")
    args = parser.parse_args()
    report = Report()
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    if args.interpret:
        device = "cpu"
        check_kernels(report, device, [(1, 64), (5, 576), (3, 896)], dtypes)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device; run with TRITON_INTERPRET=1 ... --interpret on CPU", file=sys.stderr)
            return 2
        device = "cuda"
        check_kernels(report, device, [(t, h) for h in (896, 4096) for t in (1, 17, 512, 8192)], dtypes)
    for dtype in (torch.float32, torch.bfloat16):
        check_graph(report, device, dtype)
    check_step_inputs(report, device)
    if device == "cuda" and not report.failures:
        for dtype in (torch.bfloat16, torch.float16):
            timing(report, dtype)
    failures = report.failures
    where = "cpu (interpreter)" if device == "cpu" else torch.cuda.get_device_name(0)
    args.json.write_text(json.dumps({
        "device": where, "torch": torch.__version__, "python": platform.python_version(),
        "passed": not failures, "checks": report.checks, "timings": report.timings,
    }, indent=1))  # fmt: skip
    verdict = "PASS" if not failures else "FAIL"
    print(f"gpu_check: {verdict} on {where}: {len(report.checks) - len(failures)} of {len(report.checks)} checks passed"
          + (f"; failed: {[f['section'] + ' ' + f['name'] for f in failures]}" if failures else "")
          + f"; report {args.json}")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
