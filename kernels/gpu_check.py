"""One-call check of the steering kernels on a GPU: correctness, then timing.

    python kernels/gpu_check.py              # on a GPU machine, from the repository root
    TRITON_INTERPRET=1 python kernels/gpu_check.py --interpret   # correctness only, on CPU

Needs only PyTorch and Triton (no vLLM, the project not installed). Each token carries two
entries, a random mix of add, ablate and clamp. Correctness: fresh random inputs for
fp32/fp16/bf16 over a grid of shapes, the Triton op against a float64 reference, outputs
pre-filled with NaN so an unwritten element shows, and every output finite when one token is
steered with alpha 1e30. Timing (CUDA events, median of many repeats after warm-up, inputs
rotated through more memory than L2): the fused op with half the token slots steered, the same
op with none steered, the torch sequence (add, steer, rms_norm), that sequence under
torch.compile, and a device-to-device copy of the same bytes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `import kernels`

from kernels import steer as ref  # noqa: E402
from kernels import triton_steer as tri  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}  # max error / max |reference|
EPS = 1e-6
NUM_VECTORS = 4
SLOTS = 2  # entries per token: a random mix of add, ablate and clamp


def make_inputs(tokens: int, hidden: int, dtype: torch.dtype, device: str, steered: float = 0.5, seed: int = 0):
    """x, residual, weight, p, q, r, vid, V, U; a `steered` share of the token slots carries an
    add, an ablate or a clamp (kernels/steer.py), the rest all-zero coefficients."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    residual = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(device, dtype)
    V = torch.randn(NUM_VECTORS, hidden, generator=g)
    V[-1] = 0  # a vector without a direction at this layer
    U = V / V.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    vid = torch.randint(0, NUM_VECTORS, (tokens, SLOTS), generator=g, dtype=torch.int32)
    alpha = torch.randn(tokens, SLOTS, generator=g) * 4
    op = torch.randint(0, 3, (tokens, SLOTS), generator=g)
    on = torch.rand(tokens, SLOTS, generator=g) < steered
    zero = torch.zeros_like(alpha)
    p = torch.where(on & (op == 0), alpha, zero)
    q = torch.where(on & (op == 2), alpha, zero)
    r = torch.where(on & (op == 1), -alpha, torch.where(on & (op == 2), -1.0, zero))
    floats = (p, q, r, V, U)
    p, q, r, V, U = (t.to(device, torch.float32) for t in floats)
    return x, residual, weight, p, q, r, vid.to(device), V, U


def reference64(x, residual, weight, p, q, r, vid, V, U):
    """The same update in float64, token by token and entry by entry: the oracle."""
    s = x.double() + residual.double()
    for t in range(s.shape[0]):
        for m in range(p.shape[1]):
            v, u = V[vid[t, m]].double(), U[vid[t, m]].double()
            s[t] = s[t] + p[t, m].double() * v + (q[t, m].double() + r[t, m].double() * (s[t] @ u)) * u
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * weight.double(), s


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12))


def check(device: str, shapes, dtypes) -> list[str]:
    failures = []
    for dtype in dtypes:
        for tokens, hidden in shapes:
            inputs = make_inputs(tokens, hidden, dtype, device)
            x, res, w, p, q, r, vid, V, U = inputs
            want_out, want_res = reference64(*inputs)
            out, res_out = torch.full_like(x, float("nan")), torch.full_like(res, float("nan"))
            tri.fused_add_rms_norm_steer(x, res, w, EPS, p, q, r, vid, V, U, out=out, residual_out=res_out)
            torch_out, torch_res = ref.fused_add_rms_norm_steer(x, res, w, EPS, p, q, r, vid, V, U)
            for name, got, want in (
                ("fused out", out, want_out),
                ("fused residual", res_out, want_res),
                ("torch out", torch_out, want_out),
                ("torch residual", torch_res, want_res),
            ):
                err = rel_err(got, want)
                ok = err <= TOLERANCE[dtype] and not bool(torch.isnan(got).any())
                print(
                    f"{'ok  ' if ok else 'FAIL'} {name:<15} tokens={tokens:<6} hidden={hidden:<5} {str(dtype):<15} "
                    f"rel err {err:.2e}"
                )
                if not ok:
                    failures.append(f"{name} {tokens}x{hidden} {dtype}: {err:.2e}")
            # An absurd alpha on the first token: the steered sum is clamped, never inf or NaN.
            p[0, 0], vid[0, 0] = 1e30, 0
            for name, op in (("fused", tri.fused_add_rms_norm_steer), ("torch", ref.fused_add_rms_norm_steer)):
                outs = op(x, res, w, EPS, p, q, r, vid, V, U)
                ok = all(bool(torch.isfinite(t).all()) for t in outs)
                print(
                    f"{'ok  ' if ok else 'FAIL'} {name + ' finite':<15} tokens={tokens:<6} hidden={hidden:<5} "
                    f"{str(dtype):<15} alpha 1e30"
                )
                if not ok:
                    failures.append(f"{name} not finite at alpha 1e30 {tokens}x{hidden} {dtype}")
    return failures


def cuda_time(fn, inputs: list, repeats: int = 50) -> float:
    """Median milliseconds of fn(*inputs[i]) over repeats, cycling through the input sets."""
    for i in range(5):
        fn(*inputs[i % len(inputs)])
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        args = inputs[i % len(inputs)]
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def unfused(x, residual, weight, p, q, r, vid, V, U):
    """The torch path (kernels/steer.py), which torch.compile may fuse."""
    return ref.fused_add_rms_norm_steer(x, residual, weight, EPS, p, q, r, vid, V, U)


def timing(dtype: torch.dtype) -> None:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    compiled = torch.compile(unfused)
    print(f"\n{torch.cuda.get_device_name(0)}, {dtype}; times in microseconds, median of 50 after warm-up")
    header = (
        f"{'tokens':>6} {'hidden':>6} | {'fused steer':>11} {'GB/s':>6} {'of copy':>7} | {'fused none':>10} "
        f"{'steer/none':>10} | {'torch':>7} {'compiled':>8} {'copy':>7}"
    )
    print(header)
    print("-" * len(header))
    for hidden in (4096, 8192):
        for tokens in (256, 1024, 4096, 16384):
            bytes_moved = 4 * tokens * hidden * x_size(dtype)  # read x, residual; write out, residual
            sets = max(2, int(3 * l2 // bytes_moved) + 1)  # rotate through > L2 of inputs
            steer_sets = [make_inputs(tokens, hidden, dtype, "cuda", 0.5, seed) for seed in range(sets)]
            none_sets = [make_inputs(tokens, hidden, dtype, "cuda", 0.0, seed) for seed in range(sets)]

            def fused(x, res, w, p, q, r, vid, V, U):
                return tri.fused_add_rms_norm_steer(x, res, w, EPS, p, q, r, vid, V, U, out=x, residual_out=res)

            t_steer = cuda_time(fused, steer_sets)
            t_none = cuda_time(fused, none_sets)
            t_torch = cuda_time(unfused, steer_sets)
            t_compiled = cuda_time(compiled, steer_sets)
            copies = [
                (
                    torch.empty(2 * tokens * hidden, dtype=dtype, device="cuda"),
                    torch.empty(2 * tokens * hidden, dtype=dtype, device="cuda"),
                )
                for _ in range(sets)
            ]
            t_copy = cuda_time(lambda dst, src: dst.copy_(src), copies)
            gbs = bytes_moved / (t_steer * 1e-3) / 1e9
            print(
                f"{tokens:>6} {hidden:>6} | {t_steer * 1e3:>11.1f} {gbs:>6.0f} {t_copy / t_steer:>7.2f} | "
                f"{t_none * 1e3:>10.1f} "
                f"{t_steer / t_none:>10.3f} | {t_torch * 1e3:>7.1f} {t_compiled * 1e3:>8.1f} {t_copy * 1e3:>7.1f}"
            )
            del steer_sets, none_sets, copies
            torch.cuda.empty_cache()


def x_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true", help="CPU, Triton interpreter, small shapes, no timing")
    args = parser.parse_args()
    if args.interpret:
        failures = check("cpu", [(1, 64), (5, 576), (3, 640)], [torch.float32, torch.float16, torch.bfloat16])
    else:
        if not torch.cuda.is_available():
            print("no CUDA device; run with TRITON_INTERPRET=1 ... --interpret on CPU", file=sys.stderr)
            return 2
        shapes = [(t, h) for h in (576, 640, 4096, 8192) for t in (1, 17, 256, 16384)]
        failures = check("cuda", shapes, [torch.float32, torch.float16, torch.bfloat16])
        if not failures:
            for dtype in (torch.bfloat16, torch.float16):
                timing(dtype)
    print("all correct" if not failures else f"{len(failures)} FAILED: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
