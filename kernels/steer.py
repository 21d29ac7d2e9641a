"""The steering op, torch implementation: the reference and the CPU path.

Each token t carries M entries (slots) m, applied in order to its residual-stream state h:

    h <- h + p[t,m] * V[vid[t,m]] + (q[t,m] + r[t,m] * (h . U[vid[t,m]])) * U[vid[t,m]]

V holds one layer's raw direction of each vector and U the unit directions ([num_vectors,
hidden]; a zero row where a vector has no direction at that layer). The three operators are
coefficients of that one update, so a batch mixes them at the cost of any one:

    add     h + alpha v              p = alpha   q = 0       r = 0
    ablate  h - alpha (h . u) u      p = 0       q = 0       r = -alpha
    clamp   h + (alpha - h . u) u    p = 0       q = alpha   r = -1

Unused slots, unsteered tokens and padding have p = q = r = 0. Shapes: hidden, x, residual
[tokens, hidden]; p, q, r [>= tokens, M] float32; vid [>= tokens, M] int; only the first
`tokens` rows are read, so persistent buffers can be passed whole.

The update is formed in float32, and the steered state is clamped into the finite range of its
dtype, so steering itself never makes a state inf. Finite values in range pass bit for bit; a
NaN that was already there stays NaN.
"""

import torch


def _finite(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    limit = torch.finfo(dtype).max
    return s.clamp(-limit, limit)


def steer_delta(h, p, q, r, vid, V, U) -> torch.Tensor:
    """The float32 change [tokens, hidden] that the entries make to the states h."""
    n = h.shape[0]
    h = h.float()
    delta = torch.zeros_like(h)
    for m in range(p.shape[1]):
        rows = vid[:n, m]
        u = U.index_select(0, rows).float()  # [tokens, hidden]
        dot = ((h + delta) * u).sum(-1, keepdim=True)  # [tokens, 1]
        # r = 0 takes no part of the projection, even when an overflow upstream made it inf.
        projected = torch.where(r[:n, m, None] != 0, r[:n, m, None] * dot, 0.0)
        delta = delta + p[:n, m, None] * V.index_select(0, rows).float() + (q[:n, m, None] + projected) * u
    return delta


def steer_add(hidden, residual, p, q, r, vid, V, U) -> torch.Tensor:
    """A vLLM decoder layer's deferred output (hidden, residual) sums to the state h: returns
    hidden plus the entries' change to h, so that hidden + residual is the steered state."""
    delta = steer_delta(hidden.float() + residual.float(), p, q, r, vid, V, U)
    # The sum in float32, rounded once to the model's dtype (an unsteered token comes back as it was).
    return _finite(hidden.float() + delta, hidden.dtype).to(hidden.dtype)


def fused_add_rms_norm_steer(x, residual, weight, eps: float, p, q, r, vid, V, U):
    """(rms_norm(s) * weight, s) with s = x + residual steered by the entries, summed in float32:
    vLLM's fused_add_rms_norm (vllm/ir/ops/layernorm.py) when no token is steered."""
    dtype = x.dtype
    s = x.float() + residual.float()
    s = _finite(s + steer_delta(s, p, q, r, vid, V, U), dtype)
    normed = s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed.to(weight.dtype) * weight).to(dtype), s.to(dtype)


def steer_add_(hidden, residual, p, q, r, vid, V, U, summary) -> None:
    """`steer_add` in place, computing only what the step steers (the CPU path: no CUDA graph
    replays it, so it may look at the step). `summary` int32 is the step's, written on the host
    as it was built (kernels/step_inputs.py SUMMARY): how many slots any token uses (0: nothing is
    steered, and the layer's output is left as it is), whether those only add, whether every
    token is steered, the one bank row a one-slot step adds from (else -1). Only the steered
    tokens' rows and the used slots are computed, each row exactly as `steer_add` does. A step
    that only adds (its change does not depend on the state) skips the projection terms, which
    are exact zeros there, and works in place: the same bits in a few ops, and inside a model
    each op counts (docs/benchmarks.md). V is float32, as the engine's banks are."""
    k, adds_only, every, one_row = summary.tolist()
    if k == 0:
        return
    n = hidden.shape[0]
    if not adds_only:
        p, q, r, vid = p[:n, :k], q[:n, :k], r[:n, :k], vid[:n, :k]
        if every:
            hidden.copy_(steer_add(hidden, residual, p, q, r, vid, V, U))
            return
        rows = ((p != 0) | (q != 0) | (r != 0)).any(1).nonzero().squeeze(1)
        steered = steer_add(hidden[rows], residual[rows], p[rows], q[rows], r[rows], vid[rows], V, U)
        hidden.index_copy_(0, rows, steered)
        return
    limit = torch.finfo(hidden.dtype).max
    if every:
        delta = p[:n, :1] * V[one_row] if one_row >= 0 else _added(p[:n], vid[:n], V, k)
        if hidden.dtype == torch.float32:
            hidden.add_(delta).clamp_(-limit, limit)
        else:  # summed in float32, rounded once
            hidden.copy_(delta.add_(hidden).clamp_(-limit, limit))
        return
    rows = p[:n, :k].ne(0).any(1).nonzero().squeeze(1)
    steered = _added(p.index_select(0, rows), vid.index_select(0, rows), V, k)
    steered.add_(hidden.index_select(0, rows)).clamp_(-limit, limit)
    hidden.index_copy_(0, rows, steered.to(hidden.dtype))


def _added(p, vid, V, k: int) -> torch.Tensor:
    """The float32 sum of p[:, m] * V[vid[:, m]] over the first k slots, in slot order, as
    steer_delta sums them (a fresh tensor, so each step is in place)."""
    delta = V.index_select(0, vid[:, 0]).mul_(p[:, :1])
    for m in range(1, k):
        delta.add_(V.index_select(0, vid[:, m]).mul_(p[:, m, None]))
    return delta
