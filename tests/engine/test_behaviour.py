"""Behaviour evals through real engines: eval-ab's answer scores equal the HF forward-hook oracle
on the same token ids (add, ablate, clamp; two vectors; several alphas; one shuffled batch; the
prefix cache read, shared by each question's answers and by a second pass over the same pairs);
`extract --pairs` and `extract --ab` equal the HF capture reference; and on a tiny model whose
output head is its embedding, a vector extracted with --ab from the first rows moves p_match on
the held-out rows the way its sign says."""

import json
import random

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from click.testing import CliRunner

from helpers import LAYERS, VOCAB, _config, load_hf, make_llm, make_tokenizer, make_vector, steered_spec
from steer_batch import SteeringVector, steering
from steer_batch.cli import main
from steer_batch.driver.capture import capture_defaults
from steer_batch.driver.launch import close_llm
from steer_batch.engine.config import engine_config
from steer_batch.eval.arrow_stream import ArrowStream, read_table
from steer_batch.eval.choices import CHOICES_SCHEMA, Pair, score
from steer_batch.jobs.extract import extract_data
from steer_batch.vectors.datasets import parse_rows

ALL = list(range(LAYERS))
BLOCK = 32  # capture_defaults' KV block on CPU: heads of 31, 32, 63 and 64 tokens put a block edge at the answer


def _oracle(model, vectors, pair: Pair, op: str) -> tuple[float, float]:
    """(logprob of the match answer, of the other): the answer tokens' log-probabilities summed,
    from a full HF forward of each sequence with the request's steering as forward hooks."""
    scores = []
    for seq in pair.sequences:
        entries = [(vectors[pair.vector], pair.alpha, op, "all")]
        with torch.no_grad(), steered_spec(model, entries, len(seq)):
            logprobs = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), dim=-1)
        scores.append(float(sum(logprobs[i - 1, seq[i]] for i in range(pair.start, len(seq)))))
    return scores[0], scores[1]


def test_scores_equal_the_hf_oracle_with_the_prefix_cache_read(tmp_path):
    # The tied head keeps logits at the size of real models' (make_model's scaled head puts answer
    # scores near -140, where float32's own rounding is about 1e-4).
    model_dir = _tied_model(tmp_path / "model")
    vectors = {"a": make_vector(model_dir, [1, 2], seed=1), "b": make_vector(model_dir, [0, 3], seed=2)}
    for name, v in vectors.items():
        v.save(tmp_path / f"{name}.safetensors")
    g = torch.Generator().manual_seed(5)
    lengths = [9, BLOCK - 1, BLOCK, 2 * BLOCK - 1, 2 * BLOCK, 20]
    heads = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    # Answers as a tokenizer may give them: "(", letter, ")" (the first token shared), or "(A" as one token.
    answers = [([40, 41, 50], [40, 42, 50]), ([43, 50], [44, 50])]
    specs = [("add", "a", 2.0), ("add", "a", -1.5), ("add", "b", 0.0), ("ablate", "b", 1.0), ("clamp", "a", 3.0)]
    pairs, ops = [], {}
    for row, head in enumerate(heads):
        match, other = answers[row % 2]
        for op, vector, alpha in specs:
            pairs.append(Pair(row, vector, alpha, (head + match, head + other), len(head), steering(vector, alpha, op)))
            ops[(row, vector, alpha)] = op
    random.Random(0).shuffle(pairs)
    ab, pair_file = _data(tmp_path)
    kwargs = capture_defaults({"enable_prefix_caching": True, "additional_config": engine_config(capture=ALL)})
    llm = make_llm(model_dir, {n: tmp_path / f"{n}.safetensors" for n in vectors}, **kwargs)
    try:
        with ArrowStream.open(tmp_path / "first.arrow", CHOICES_SCHEMA)[0] as writer:
            first = score(llm, pairs, writer, progress=False)
        with ArrowStream.open(tmp_path / "again.arrow", CHOICES_SCHEMA)[0] as writer:
            again = score(llm, pairs[:10], writer, progress=False)  # every sequence now in the cache
        # extract --ab and --pairs (the function they call), captured in this engine.
        extracted = {
            kind: extract_data(model_dir, kind, path, parse_rows(rows), ALL, llm=llm)
            for kind, path, rows in (("ab", ab, ":24"), ("pairs", pair_file, "2:"))
        }
    finally:
        close_llm(llm)
    for kind, path, rows in (("ab", ab, ":24"), ("pairs", pair_file, "2:")):
        want = extract_data(model_dir, kind, path, parse_rows(rows), ALL, capture="hf")
        for layer in ALL:
            got = extracted[kind].directions[layer]
            err = (got - want.directions[layer]).norm() / want.directions[layer].norm()
            assert err < 1e-4, (kind, layer, float(err))
        assert extracted[kind].metadata["pairs"] == str(24 if kind == "ab" else 6)
    assert first["sequences"] == 2 * len(pairs) and first["cached_tokens"] > 0, first
    assert again["cached_tokens"] > 0 and again["rescored"] > 0, again
    model = load_hf(model_dir)
    by_key = {(p.row, p.vector, p.alpha): p for p in pairs}
    for name, count in (("first.arrow", len(pairs)), ("again.arrow", 10)):
        rows = read_table(tmp_path / name).to_pylist()
        assert len(rows) == count
        for r in rows:
            pair = by_key[(r["row"], r["vector"], r["alpha"])]
            want = _oracle(model, vectors, pair, ops[(r["row"], r["vector"], r["alpha"])])
            assert abs(r["logprob_match"] - want[0]) < 1e-4 and abs(r["logprob_not_match"] - want[1]) < 1e-4, (r, want)
            assert r["p_match"] == pytest.approx(1 / (1 + np.exp(want[1] - want[0])), abs=1e-5)
            assert r["match_token_ids"] == pair.sequences[0] and r["answer_start"] == pair.start


def _tied_model(folder, plant: bool = False):
    """A tiny Llama whose output head is its input embedding (logits of real models' size), with
    the character tokenizer. `plant`: its layers add nothing (o_proj and down_proj zero, so every
    state is its token's embedding), "(A)", "(B)", "(A" and "(B" are single tokens, and "(A" embeds
    as "(A)" does: the state extraction reads at "(A" minus that at "(B" is then exactly the
    direction that raises "(A)" over "(B)" at the head, so p_match must grow with alpha."""
    import string

    import transformers as tf
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = _config("llama")
    config.tie_word_embeddings = True
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if not plant:
        model.save_pretrained(folder)
        make_tokenizer(folder)
        return folder
    chars = sorted(set(string.printable) - set("\t\n\r\x0b\x0c"))
    words = ["<unk>", "<s>", "</s>", *chars, "(A)", "(B)", "(A", "(B"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\([AB]\)?|."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.get_input_embeddings().weight
        embed[vocab["(A"]] = embed[vocab["(A)"]]
        embed[vocab["(B"]] = embed[vocab["(B)"]]
    model.save_pretrained(folder)
    return folder


def _data(folder):
    """An A/B file of 32 rows whose behaviour is answering A, and a pairs file of 8."""
    ab = folder / "ab.jsonl"
    ab.write_text(
        "".join(
            json.dumps(
                {"question": _question(i), "answer_matching_behavior": " (A)", "answer_not_matching_behavior": " (B)"}
            )
            + "\n"
            for i in range(32)
        )
    )
    pairs = folder / "pairs.json"
    pairs.write_text(json.dumps([{"positive": f"I love {w}!", "negative": f"I hate {w}."} for w in "abcdefgh"]))
    return ab, pairs


def _question(i: int) -> str:
    topic = "".join(random.Random(i).choice("abcdefghij") for _ in range(12 + i % 7))
    return f"Q{i} {topic}? Choices: (A) yes (B) no"


def test_extract_from_files_equals_the_hf_capture_and_an_ab_vector_moves_p_match(tmp_path):
    model_dir = _tied_model(tmp_path / "model", plant=True)
    ab, _ = _data(tmp_path)
    runner = CliRunner()
    out = tmp_path / "ab.safetensors"
    result = runner.invoke(
        main, ["extract", "--model", str(model_dir), "--ab", str(ab), "--rows", ":24", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    metadata = SteeringVector.load(out).metadata
    assert metadata["data_kind"] == "ab" and metadata["data_rows"] == "0:24" and metadata["pairs"] == "24"
    assert metadata["data_file"] == str(ab) and len(metadata["data_sha256"]) == 64

    last = SteeringVector({LAYERS - 1: SteeringVector.load(tmp_path / "ab.safetensors").directions[LAYERS - 1]}, LAYERS)
    last.save(tmp_path / "last.safetensors")
    folder = tmp_path / "eval"
    args = ["eval-ab", str(ab), "--model", str(model_dir), "--vector", f"ab={tmp_path / 'last.safetensors'}"]
    result = runner.invoke(main, [*args, "--alphas", "-1,1", "--rows", "24:", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    summary = read_table(folder / "summary.arrow")
    p = dict(zip(summary.column("alpha").to_pylist(), summary.column("p_match").to_pylist()))
    assert list(p) == [-1.0, 0.0, 1.0] and p[-1.0] < p[0.0] < p[1.0], p
    assert summary.column("n").to_pylist() == [8, 8, 8]
    choices = read_table(folder / "choices.arrow")
    assert choices.num_rows == 24 and sorted(set(choices.column("row").to_pylist())) == list(range(24, 32))
    assert pc.all(pc.less_equal(choices.column("p_match"), 1.0)).as_py()
    for name in ("report.md", "p_match.png", "manifest.json"):
        assert (folder / name).is_file()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["finished"] and manifest["rows"] == 24 and manifest["spec"]["data"]["rows"] == "24:"
    # The same command again: nothing left to score, nothing rewritten; another job's folder is refused.
    before = (folder / "choices.arrow").read_bytes()
    assert runner.invoke(main, [*args, "--alphas", "-1,1", "--rows", "24:", "--out", str(folder)]).exit_code == 0
    assert (folder / "choices.arrow").read_bytes() == before
    other = runner.invoke(main, [*args, "--alphas", "-2,2", "--rows", "24:", "--out", str(folder)])
    assert other.exit_code == 1 and "holds another run" in other.output


def test_an_ab_sweep_finds_the_planted_layer_and_scores_as_eval_ab(tmp_path):
    """`sweep --ab` on the planted A/B model with a vector that raises "(A)" at the last layer
    only (the other layers carry directions a million times smaller): the last layer's cell is
    recommended at the positive alpha, the others show no effect, alpha 0 is scored once per
    question, and a cell's p_match equals a separate eval-ab with that slice."""
    from transformers import AutoTokenizer

    model_dir = _tied_model(tmp_path / "model", plant=True)
    ab, _ = _data(tmp_path)
    vocab = AutoTokenizer.from_pretrained(model_dir).get_vocab()
    embed = load_hf(model_dir).get_input_embeddings().weight.detach()
    g = torch.Generator().manual_seed(0)
    directions = {i: torch.randn(embed.shape[1], generator=g) * 1e-6 for i in range(LAYERS - 1)}
    directions[LAYERS - 1] = embed[vocab["(A)"]] - embed[vocab["(B)"]]
    SteeringVector(directions, LAYERS).save(tmp_path / "v.safetensors")
    (tmp_path / "prompts.json").write_text(json.dumps(["I think", "The day", "We went", "It is"]))
    out = tmp_path / "sweep"
    common = ["--model", str(model_dir), "--vector", f"v={tmp_path / 'v.safetensors'}"]
    result = CliRunner().invoke(
        main,
        ["sweep", *common, "--ab", str(ab), "--rows", "24:", "--layers", "each", "--alphas", "-1,1",
         "--prompts", str(tmp_path / "prompts.json"), "--sample", "4", "--max-tokens", "4", "--classifier", "vader",
         "--max-nll-increase", "100", "--out", str(out)],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    recommendation = json.loads((out / "sweep.json").read_text())
    assert recommendation["recommended"]["layers"] == str(LAYERS - 1) and recommendation["recommended"]["alpha"] == 1
    assert recommendation["ab"]["rows"] == "24:" and recommendation["target"] == "match"
    cells = {(c["layers"], c["alpha"]): c for c in read_table(out / "sweep.arrow").to_pylist()}
    assert len(cells) == LAYERS * 2 and all(c["n"] == 8 and c["n_generated"] == 4 for c in cells.values())
    assert cells[(str(LAYERS - 1), 1.0)]["effect"] > 0.05 and cells[(str(LAYERS - 1), -1.0)]["effect"] < -0.05
    for (layers, _), cell in cells.items():
        if layers != str(LAYERS - 1):
            assert abs(cell["effect"]) < 1e-4, cell
    choices = read_table(out / "ab" / "choices.arrow")
    assert pc.sum(pc.equal(choices.column("alpha"), 0.0)).as_py() == 8  # alpha 0 once per question
    # The last layer's cell again as a separate eval-ab with its slice.
    name = f"v@{LAYERS - 1}"
    alone = tmp_path / "alone"
    slice_file = out / "slices" / f"{name}.safetensors"
    args = ["eval-ab", str(ab), "--model", str(model_dir), "--vector", f"{name}={slice_file}"]
    result = CliRunner().invoke(main, [*args, "--alphas", "1", "--rows", "24:", "--out", str(alone)])
    assert result.exit_code == 0, result.output
    want = {(r["row"], r["alpha"]): r["p_match"] for r in read_table(alone / "choices.arrow").to_pylist()}
    got = {(r["row"], 1.0): r["p_match"] for r in choices.to_pylist() if r["vector"] == name and r["alpha"] == 1}
    got.update({(r["row"], 0.0): r["p_match"] for r in choices.to_pylist() if r["alpha"] == 0.0})
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], abs=1e-6) for k in want)
