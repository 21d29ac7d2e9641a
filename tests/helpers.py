"""Test helpers: tiny random models built on the spot, the HF forward-hook oracle, engine set-up.

The oracle is independent of the code under test: plain transformers, a forward hook on each
steered decoder layer that adds alpha * v to its output, and a greedy loop without KV cache.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from steer_batch import SteeringVector
from steer_batch.driver import launch
from steer_batch.driver.launch import close_llm  # noqa: F401  (re-exported for the tests)

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: tiny models need little

VOCAB = 512
LAYERS = 4


def _config(family: str):
    import transformers as tf

    # head_dim 64: vLLM's CPU attention refuses smaller heads.
    common = dict(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(head_dim=64, sliding_window=None, **common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=64, **common)
    # Gemma always ties its output head to the embeddings in vLLM.
    # A window longer than any test prompt: HF and vLLM need not agree on sliding-window edges.
    gemma = dict(common, tie_word_embeddings=True, head_dim=64, query_pre_attn_scalar=64, sliding_window=512)
    if family == "gemma2":
        # No attention soft-capping: hidden states then agree with HF to fp32 rounding (with it,
        # layer outputs differed by ~1% here, though greedy tokens still matched).
        return tf.Gemma2Config(**gemma, attn_logit_softcapping=None)
    if family == "gpt2":  # an architecture steer-batch does not support
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=2)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**gemma)
    raise ValueError(family)


def make_tokenizer(folder: Path) -> None:
    """A character-level tokenizer (printable ASCII) saved beside a tiny model, for text prompts."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\t\n\r\x0b\x0c"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        folder
    )


def make_model(family: str, folder: Path, seed: int = 0, tokenizer: bool = False) -> Path:
    """A tiny random model of `family`, saved as an HF folder (safetensors, fp32), with a
    character-level tokenizer when asked for."""
    import transformers as tf

    torch.manual_seed(seed)
    config = _config(family)
    model = tf.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    # Scale up an untied head so greedy argmax has clear margins (random init is near-uniform).
    # Gemma's head is the embedding, and its logit soft-capping would saturate a scaled one.
    if not config.tie_word_embeddings:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(folder)
    if tokenizer:
        make_tokenizer(folder)
    return folder


def make_run_inputs(folder: Path, prompts: list[str]) -> tuple[Path, Path]:
    """(folder, model) for `steer-batch run`: a tiny Llama with a character tokenizer in
    folder/model, a vector on layers 1-2 in folder/v.safetensors, prompts in folder/prompts.json."""
    import json

    model_dir = make_model("llama", folder / "model", tokenizer=True)
    make_vector(model_dir, [1, 2], seed=1).save(folder / "v.safetensors")
    (folder / "prompts.json").write_text(json.dumps(prompts))
    return folder, model_dir


def make_vector(model_dir: Path, layers: list[int], seed: int, scale: float = 1.0) -> SteeringVector:
    """A random direction per layer, `scale` times the mean hidden-state norm at that layer, so
    that alphas around 1 visibly change greedy text on every family."""
    g = torch.Generator().manual_seed(seed)
    model = load_hf(model_dir)
    with torch.no_grad():
        states = model(torch.randint(3, VOCAB, (1, 32), generator=g), output_hidden_states=True).hidden_states
    dirs = {}
    for i in layers:
        d = torch.randn(model.config.hidden_size, generator=g)
        dirs[i] = d / d.norm() * states[i + 1][0].norm(dim=-1).mean() * scale
    return SteeringVector(dirs, LAYERS, model=str(model_dir), method="random", concept=f"random{seed}")


def spike_vector(layers: tuple[int, ...], value: float, hidden: int = 128) -> SteeringVector:
    """A vector that is `value` in one coordinate of each of `layers`, nothing else. With
    `max_abs_alpha` x `value` just under float32's largest value it fits the engine's alpha
    bound at load, yet at that alpha the residual stream, steered the same way at two layers,
    sums past float32's range and the request's states turn NaN."""
    direction = torch.zeros(hidden)
    direction[0] = value
    return SteeringVector({i: direction.clone() for i in layers}, LAYERS, method="spike", concept="overflow")


# The alpha bound the overflow tests raise an engine to: the largest allowed for vectors of norm
# up to 300 (make_vector's are 11 to 234 on the tiny Llama), so requests whose states overflow
# still reach the engine. A spike of SPIKE at that bound is 3e38 in one coordinate per layer.
OVERFLOW_MAX_ABS_ALPHA = 1e36
SPIKE = 300.0


_HF = {}


def load_hf(model_dir: Path, dtype: torch.dtype = torch.float32):
    import transformers as tf

    if (model_dir, dtype) not in _HF:
        _HF[model_dir, dtype] = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    return _HF[model_dir, dtype]


def decoder_layers(model):
    return model.model.layers


@contextlib.contextmanager
def steered(model, vector: SteeringVector | None, alpha: float):
    """Forward hooks adding alpha * v[i] to the output of each steered decoder layer i."""
    with steered_spec(model, [] if vector is None else [(vector, alpha, "add", "all")], 0):
        yield


@contextlib.contextmanager
def steered_spec(model, entries: list[tuple], prompt_len: int, positions: tuple[int, int | None] = (0, None)):
    """Forward hooks applying a steering spec to a full forward of one sequence (no KV cache, so
    its positions are 0..len-1): entries (vector, alpha, op, scope) in order at each layer where
    the vector has a direction v, with u = v/|v| and h the layer's output at a position of the
    entry's scope ("prompt": < prompt_len, "generated": >= prompt_len) within `positions`:
    add h + alpha v, ablate h - alpha (h.u) u, clamp h + (alpha - h.u) u."""

    def in_scope(scope: str, seq: int) -> torch.Tensor:
        pos = torch.arange(seq)
        keep = {"all": pos >= 0, "prompt": pos < prompt_len, "generated": pos >= prompt_len}[scope]
        start, end = positions
        return keep & (pos >= start) & (pos < (seq if end is None else end))

    def hook(module, args, out, i):
        h = out[0] if isinstance(out, tuple) else out  # [1, seq, hidden]
        h = h.clone()
        for vector, alpha, op, scope in entries:
            if i not in vector.directions:
                continue
            v = vector.directions[i].to(h.dtype)
            u = v / v.norm()
            rows = in_scope(scope, h.shape[1])
            x = h[0, rows]  # [positions, hidden]
            dot = (x @ u)[:, None]
            if op == "add":
                x = x + alpha * v
            elif op == "ablate":
                x = x - alpha * dot * u
            else:
                x = x + (alpha - dot) * u
            h[0, rows] = x
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    handles = []
    if any(alpha != 0 or op == "clamp" for _, alpha, op, _ in entries):
        for i in range(len(decoder_layers(model))):
            handles.append(decoder_layers(model)[i].register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def oracle_greedy(
    model_dir: Path,
    prompt: list[int],
    n: int,
    vector: SteeringVector | None = None,
    alpha: float = 0.0,
    *,
    entries: list[tuple] | None = None,
    positions: tuple[int, int | None] = (0, None),
    dtype: torch.dtype = torch.float32,
    logits_out: list[torch.Tensor] | None = None,
) -> list[int]:
    """Greedy tokens of plain transformers with forward hooks: `vector` at `alpha` (add, every
    position), or a whole spec, `entries` of (vector, alpha, op, scope) and `positions`; the
    model in `dtype`. `logits_out`, if given, receives each step's logits (float32)."""
    model = load_hf(model_dir, dtype)
    ids = list(prompt)
    if entries is None:
        entries = [] if vector is None else [(vector, alpha, "add", "all")]
    with steered_spec(model, entries, len(prompt), positions):
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            ids.append(int(logits.argmax()))
            if logits_out is not None:
                logits_out.append(logits)
    return ids[len(prompt) :]


def hf_last_token_outputs(model_dir: Path, prompt: list[int], layers: list[int], dtype: torch.dtype = torch.float32):
    """[len(layers), hidden] float32 numpy: each decoder layer's output at the last token, read by
    forward hooks (so the last layer is the residual stream, not HF's normed hidden_states entry)."""
    model, got = load_hf(model_dir, dtype), {}
    handles = [
        decoder_layers(model)[i].register_forward_hook(
            lambda m, a, out, i=i: got.__setitem__(i, (out[0] if isinstance(out, tuple) else out)[0, -1])
        )
        for i in layers
    ]
    with torch.no_grad():
        model(torch.tensor([prompt]))
    for h in handles:
        h.remove()
    return torch.stack([got[i] for i in layers]).float().numpy()


def make_prompts(count: int, seed: int, min_len: int = 5, max_len: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (count,), generator=g)
    return [torch.randint(3, VOCAB, (int(n),), generator=g).tolist() for n in lens]


def make_llm(model_dir: Path, vectors: dict[str, Path] | None = None, *, eager: bool = True, **kwargs):
    return launch.make_llm(
        model_dir,
        vectors,
        **{"skip_tokenizer_init": True, "seed": 0, "max_model_len": 512, "enforce_eager": eager, **kwargs},
    )


def generate(llm, prompts: list[list[int]], n: int, steer: list[tuple[str, float] | dict | None]) -> list[list[int]]:
    """Greedy tokens of each prompt; steer: None, (vector, alpha), or a request's extra_args."""
    from vllm import SamplingParams

    def extra_args(s):
        return s if isinstance(s, dict) or s is None else {"steering_vector": s[0], "steering_alpha": s[1]}

    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, extra_args=extra_args(s)) for s in steer]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


# -- the steering op's inputs and float64 reference (tests of kernels/) --
KERNEL_EPS = 1e-6
KERNEL_SLOTS = 3


def kernel_inputs(tokens, hidden, dtype, steered=0.5, seed=0):
    """x, residual, weight, then p, q, r, vid [tokens + 5, slots] (longer than tokens, as the
    engine's buffers) and V, U [4, hidden] (the last vector without a direction): a `steered`
    share of the slots carries an add, an ablate or a clamp, the rest zero coefficients."""
    g = torch.Generator().manual_seed(seed)
    x, res = (torch.randn(tokens, hidden, generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    V = torch.randn(4, hidden, generator=g)
    V[3] = 0
    U = V / V.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    shape = (tokens + 5, KERNEL_SLOTS)
    vid = torch.randint(0, 4, shape, generator=g, dtype=torch.int32)
    alpha = 3 * torch.randn(shape, generator=g)
    op = torch.randint(0, 3, shape, generator=g)  # add, ablate, clamp
    on = torch.rand(shape, generator=g) < steered
    zero = torch.zeros(shape)
    p = torch.where(on & (op == 0), alpha, zero)
    q = torch.where(on & (op == 2), alpha, zero)
    r = torch.where(on & (op == 1), -alpha, torch.where(on & (op == 2), -1.0, zero))
    return x, res, w, p, q, r, vid, V, U


def kernel_reference(x, res, w, p, q, r, vid, V, U):
    """(rms_norm(s) * w, s) in float64, s = x + res with every slot applied in order: add
    (p = alpha) s + alpha v, ablate (r = -alpha) s - alpha (s.u) u, clamp (q = alpha, r = -1)
    s + (alpha - s.u) u."""
    n = x.shape[0]
    s = x.double() + res.double()
    for m in range(p.shape[1]):
        rows = vid[:n, m].long()
        v, u = V.double()[rows], U.double()[rows]
        dot = (s * u).sum(-1, keepdim=True)
        s = s + p[:n, m, None].double() * v + (q[:n, m, None].double() + r[:n, m, None].double() * dot) * u
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + KERNEL_EPS) * w.double(), s


def rel_err(got, want):
    return float((got.double() - want).abs().max() / want.abs().max())


# A word-level vocabulary holding VADER's positive and negative words among neutral fillers: a
# direction along the output rows of the positive words minus the negative ones makes +alpha
# write positive words (the calibrate and sweep tests' planted model).
POSITIVE = ["good", "great", "happy", "love", "wonderful", "excellent", "nice", "joy"]
NEGATIVE = ["bad", "awful", "sad", "hate", "terrible", "horrible", "ugly", "pain"]


def word_tokenizer(folder: Path) -> dict[str, int]:
    """Save that vocabulary's tokenizer into `folder`; word -> id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", *POSITIVE, *NEGATIVE]
    words += [f"w{i}" for i in range(VOCAB - len(words))]  # neutral fillers: every id decodes
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        folder
    )
    return {w: i for i, w in enumerate(words)}


def planted_word_model(folder: Path) -> tuple[Path, torch.Tensor]:
    """(a tiny Llama in `folder` with word_tokenizer's vocabulary, the direction that makes it
    write the positive words): the positive words' output rows minus the negative ones', scaled
    to the mean norm of the last layer's states."""
    model_dir = make_model("llama", folder, seed=3)
    ids = word_tokenizer(model_dir)
    model = load_hf(model_dir)
    head = model.get_output_embeddings().weight.detach()
    direction = head[[ids[w] for w in POSITIVE]].mean(0) - head[[ids[w] for w in NEGATIVE]].mean(0)
    with torch.no_grad():
        states = model(torch.randint(3, VOCAB, (1, 32)), output_hidden_states=True).hidden_states
    return model_dir, direction / direction.norm() * states[LAYERS][0].norm(dim=-1).mean()
