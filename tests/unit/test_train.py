"""skiplayer train: layer-dropout scales, early-exit layer parsing / loss scales / curricula, and short training
runs of a tiny random Llama (char tokenizer) on synthetic data: early-exit loss raises layer-E agreement with the
final layer, resume continues from the checkpoint step, JSONL prompt masking."""
from __future__ import annotations

import argparse
import json
import math
import random
import string

import pytest
import torch

from skiplayer.errors import UserError
from skiplayer.train.early_exit_loss import (
    IGNORE_INDEX, EarlyExitCurriculum, exit_agreement, loss_scales, parse_curriculum, parse_layers, parse_loss_scale,
    shifted_ce,
)
from skiplayer.train.layer_dropout import LayerDropout, layer_dropout_probs, layer_scale, parse_scale
from skiplayer.train.trainer import (
    TrainConfig, add_train_arguments, encode_pair, jsonl_examples, lr_factor, run_train, train,
)
from tests.conftest import tiny_hf_model

CHARS = string.ascii_lowercase + string.digits + " .,:?!#=+-*/\n"


def tiny_tokenizer():
    """Character-level fast tokenizer: <pad>=0 <s>=1 </s>=2 <unk>=3, then one id per char (< 97 ids)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    assert len(vocab) <= 97
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models on a shared CPU: one intra-op thread is several times faster than contended threads.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama", seed=0, n_layers=4, hidden_size=32).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def pattern_text(seed: int, lines: int) -> str:
    """Runs of consecutive letters (cyclic alphabet) from random starts: the next char is predictable."""
    rng = random.Random(seed)
    letters = string.ascii_lowercase
    out = []
    for _ in range(lines):
        start, n = rng.randrange(26), rng.randrange(8, 30)
        out.append("".join(letters[(start + i) % 26] for i in range(n)))
    return "\n".join(out) + "\n"


def cfg(tiny_dir, tmp_path, **kw) -> TrainConfig:
    base = dict(model=tiny_dir, output_dir=str(tmp_path / "run"), max_steps=6, batch_size=4, seq_len=32,
                lr=3e-3, warmup_steps=2, layer_dropout_prob_max=0.0, early_exit_loss_layers="none", seed=0,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------------------- layer dropout

@pytest.mark.parametrize("scale,f", [
    ("uniform", lambda x, L: 1.0),
    ("linear", lambda x, L: x),
    ("exp", lambda x, L: 2 ** x - 1),
    ("log", lambda x, L: math.log(1 + x * (L - 1)) / math.log(L)),
    ("sin", lambda x, L: math.sin(math.pi / 2 * x)),
    ("sigmoid", lambda x, L: 1 / (1 + math.exp(-10 * (x - 0.5)))),
])
def test_layer_dropout_scales_match_formulas(scale, f):
    L = 9
    for l in (0, 2, 4, 8):
        assert layer_scale(scale, l, L) == pytest.approx(f(l / (L - 1), L))
    probs = layer_dropout_probs(L, 0.3, scale)
    assert probs[-1] == pytest.approx(0.3 * f(1.0, L))  # the last layer follows the scale
    assert all(0 <= p <= 0.3 + 1e-12 for p in probs)
    assert layer_dropout_probs(L, 0.3, scale, disable_below=3)[:3] == [0.0, 0.0, 0.0]


def test_layer_dropout_bad_input():
    with pytest.raises(UserError, match="outside"):
        layer_dropout_probs(4, 1.5, "exp")
    with pytest.raises(UserError, match="layer_dropout_scale"):
        parse_scale("cubic")


def test_layer_dropout_skips_residual_update():
    layers = [torch.nn.Linear(3, 3) for _ in range(2)]
    x = torch.randn(64, 3)
    LayerDropout(layers, [1.0, 0.0])
    assert torch.equal(layers[0](x), x)  # always dropped: input unchanged
    half = LayerDropout([torch.nn.Linear(3, 3)], [0.5], generator=torch.Generator().manual_seed(0))
    y = half.layers[0](x)
    same = (y == x).all(-1)
    assert 0 < int(same.sum()) < 64  # per-sample coins
    half.layers[0].eval()
    assert not (half.layers[0](x) == x).all(-1).any()  # off in eval mode
    half.remove()
    assert "forward" not in half.layers[0].__dict__


# ---------------------------------------------------------------------------------------- early-exit loss

def test_layer_slices_always_include_last():
    assert parse_layers("0::4", 10) == [0, 4, 8, 9]
    assert parse_layers("0::4", 9) == [0, 4, 8]
    assert parse_layers("2:5", 8) == [2, 3, 4, 7]
    assert parse_layers("0,3,-2", 8) == [0, 3, 6, 7]
    assert parse_layers([1, 2], 4) == [1, 2, 3]
    assert parse_layers("none", 4) == [3] and parse_layers(None, 4) == [3]
    assert parse_layers("0::4", 10, include_last=False) == [0, 4, 8]
    for bad in ("0::0", "a:b", "12", "0:2,4", "5:5", "1:2:3:4"):
        with pytest.raises(UserError, match="early_exit_loss_layers"):
            parse_layers(bad, 8)
    with pytest.raises(UserError, match="early_exit_loss_scale"):
        parse_loss_scale("quadratic")
    with pytest.raises(UserError, match="early_exit_curriculum"):
        parse_curriculum("random")


def test_loss_scales():
    s = loss_scales([0, 1, 3], 4, "sum_l")
    assert sum(s.values()) == pytest.approx(1.0)
    assert s[0] / s[3] == pytest.approx(1 / 10) and s[1] / s[3] == pytest.approx(3 / 10)  # d(d+1)/2
    assert loss_scales([3], 4, "l") == {3: 1.0}
    one = loss_scales([0, 3], 4, "one", e_scale=0.5)
    assert one[0] == pytest.approx(1 / 3) and one[3] == pytest.approx(2 / 3)
    inv = loss_scales([0, 3], 4, "inv_l")
    assert inv[0] == pytest.approx(0.8)
    sq = loss_scales([0, 3], 4, "sqrt_l")
    assert sq[3] / sq[0] == pytest.approx(2.0)


def test_shifted_ce_masks_and_stacks():
    logits = torch.randn(2, 1, 5, 7)
    labels = torch.tensor([[1, 2, IGNORE_INDEX, 4, 5]])
    per = shifted_ce(logits, labels)
    assert per.shape == (2,)
    ref = torch.nn.functional.cross_entropy(logits[1, 0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX)
    assert per[1] == pytest.approx(float(ref), rel=1e-5)


def test_curricula():
    L = 8
    none = EarlyExitCurriculum([0, 4], L, "none")
    assert all(none.active(t) == [0, 4, 7] for t in range(5))
    rot = EarlyExitCurriculum([0, 4], L, "rotational")
    seq = [rot.active(t) for t in range(2 * L)]
    assert seq[0] == [0, 4, 7] and seq[1] == [1, 5, 7] and seq[3] == [3, 7]
    assert seq[L:] == seq[:L]  # cycles with period L
    assert all(7 in a for a in seq)
    grad = EarlyExitCurriculum(list(range(L)), L, "gradual", max_steps=20, fraction=0.5)
    sets = [grad.active(t) for t in range(21)]
    assert sets[0] == [7]
    assert all(set(a) <= set(b) for a, b in zip(sets, sets[1:]))  # layers only get added
    assert sets[10] == list(range(L)) and len(sets[5]) < L  # all on from fraction * max_steps
    assert min(sets[3]) > min(sets[8])  # deep layers first


def test_lr_schedule():
    assert lr_factor(0, 4, 20) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20) == pytest.approx(1.0)
    assert lr_factor(20, 4, 20) == pytest.approx(0.0)
    assert lr_factor(12, 4, 20) == pytest.approx(0.5)


# -------------------------------------------------------------------------------------------------- training

def _agreement(path: str, heldout: str, layer: int) -> float:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    tok = tiny_tokenizer()
    ids = torch.tensor([tok(line, add_special_tokens=False)["input_ids"] for line in
                        [heldout[i:i + 40] for i in range(0, 400, 40)]])
    return exit_agreement(model, ids, layer)


def test_early_exit_loss_raises_layer_agreement(tiny_dir, tmp_path):
    """Same model, data, seed and steps; only the early-exit loss on exit E differs. Measured on held-out text:
    top-1 agreement of exit E (final norm + head on layer E's output) with the final layer."""
    E = 0
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(pattern_text(1, 400))
    heldout = pattern_text(2, 60)
    common = dict(data_path=str(corpus), max_steps=40, batch_size=8, layer_dropout_prob_max=0.1,
                  layer_dropout_scale="linear")
    with_ee = train(cfg(tiny_dir, tmp_path / "ee", early_exit_loss_layers=str(E), **common))
    without = train(cfg(tiny_dir, tmp_path / "plain", early_exit_loss_layers="none", **common))
    assert set(with_ee["exit_losses"]) == {str(E), "3"} and set(without["exit_losses"]) == {"3"}
    a_with = _agreement(with_ee["final_path"], heldout, E)
    a_without = _agreement(without["final_path"], heldout, E)
    print(f"layer-{E} top-1 agreement with the final layer: with early-exit loss {a_with:.3f}, without {a_without:.3f}")
    assert a_with > a_without + 0.05


def test_resume_continues_from_checkpoint(tiny_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(pattern_text(3, 100))
    out = tmp_path / "run"
    first = train(cfg(tiny_dir, tmp_path, data_path=str(corpus), max_steps=4, save_steps=2,
                      early_exit_loss_layers="0::2", layer_dropout_prob_max=0.2))
    assert [p.rsplit("-", 1)[1] for p in first["checkpoints"]] == ["2", "4"]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4
    # A crashed run wrote log lines past its last checkpoint: they are dropped on resume.
    with (out / "train_log.jsonl").open("a") as f:
        f.write(json.dumps({"step": 5, "loss": 9.9}) + "\n")
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["--model", tiny_dir, "--data_path", str(corpus), "--output_dir", str(out),
                              "--max_steps", "7", "--save_steps", "2", "--batch_size", "4", "--seq_len", "32",
                              "--lr", "3e-3", "--early_exit_loss_layers", "0::2", "--layer_dropout_prob_max", "0.2",
                              "--resume", "--no_progress"])
    second = run_train(args)
    assert second["start_step"] == 4 and second["steps"] == 7
    assert json.loads((out / "checkpoint-7" / "trainer_state.json").read_text())["step"] == 7
    steps = [json.loads(l)["step"] for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))
    # Final directory loads with the project's loader.
    from skiplayer.model.load import load_model
    loaded = load_model(second["final_path"])
    assert loaded.model.n_layers == 4


def test_resume_matches_uninterrupted_run(tiny_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(pattern_text(4, 100))
    kw = dict(data_path=str(corpus), early_exit_loss_layers="1", layer_dropout_prob_max=0.3)
    full = train(cfg(tiny_dir, tmp_path / "a", max_steps=4, **kw))
    train(cfg(tiny_dir, tmp_path / "b", max_steps=2, save_steps=2, **kw))
    resumed = train(cfg(tiny_dir, tmp_path / "b", max_steps=4, resume="latest", **kw))
    assert resumed["loss"] == pytest.approx(full["loss"], rel=1e-4)


def test_jsonl_masks_prompt_and_trains(tiny_dir, tmp_path):
    tok = tiny_tokenizer()
    ids, labels = encode_pair(tok, "what is 2+3?", "2+3=5 #### 5", seq_len=64, use_chat_template=False)
    n_prompt = len(tok("what is 2+3?\n")["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == "2+3=5 #### 5"
    # Over-long pairs keep the response head and cut the prompt from the left.
    ids, labels = encode_pair(tok, "x" * 50, "y" * 30, seq_len=32, use_chat_template=False)
    assert len(ids) == 32 and sum(l != IGNORE_INDEX for l in labels) == 16  # seq_len // 2 response tokens
    assert tok.decode(ids[:16]) == "x" * 15 + "\n" and tok.decode(ids[16:]) == "y" * 16

    data = tmp_path / "qa.jsonl"
    rng = random.Random(0)
    rows = []
    for _ in range(40):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"question": f"what is {a}+{b}?", "answer": f"{a}+{b}={a + b} #### {a + b}"})
    data.write_text("\n".join(json.dumps(r) for r in rows))
    examples = jsonl_examples(data, tok, 32, "question", "answer")
    assert len(examples) == 40 and all(l[0] == IGNORE_INDEX and l[-1] == tok.eos_token_id for _, l in examples)
    summary = train(cfg(tiny_dir, tmp_path, data_path=str(data), prompt_field="question", response_field="answer",
                        max_steps=3, early_exit_loss_layers="0::2", early_exit_curriculum="rotational",
                        gradient_accumulation_steps=2))
    assert summary["steps"] == 3 and math.isfinite(summary["loss"])
    with pytest.raises(UserError, match=r"line 2 has no field 'answer'.*--response_field"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "q"}) + "\n")
        jsonl_examples(bad, tok, 32, "question", "answer")


def test_bad_input_is_user_error(tiny_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(pattern_text(0, 50))
    for kw, msg in [(dict(data_path=str(tmp_path / "missing.txt")), "not found"),
                    (dict(data_path=str(corpus), layer_dropout_prob_max=1.2), r"outside \[0, 1\]"),
                    (dict(data_path=str(corpus), early_exit_curriculum="zigzag"), "curriculum"),
                    (dict(data_path=str(corpus), early_exit_loss_scale="cube"), "loss scale"),
                    (dict(data_path=str(corpus), early_exit_loss_layers="0::9:1"), "layer spec"),
                    (dict(data_path=str(corpus), resume="latest"), "no checkpoint")]:
        with pytest.raises(UserError, match=msg) as err:
            train(cfg(tiny_dir, tmp_path / "bad", **kw))
        assert "\n" not in str(err.value)


def test_lora_trains_saves_adapter_and_merges(tiny_dir, tmp_path):
    pytest.importorskip("peft")
    corpus = tmp_path / "c.txt"
    corpus.write_text(pattern_text(5, 60))
    kw = dict(data_path=str(corpus), lora_rank=4, early_exit_loss_layers="1", layer_dropout_prob_max=0.2)
    train(cfg(tiny_dir, tmp_path, max_steps=2, save_steps=2, **kw))
    assert (tmp_path / "run" / "checkpoint-2" / "adapter_config.json").exists()
    resumed = train(cfg(tiny_dir, tmp_path, max_steps=3, resume="latest", **kw))
    assert resumed["start_step"] == 2
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(resumed["final_path"], local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    assert not any("lora" in k for k in merged.state_dict())
    w, w0 = merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(w, w0)  # the adapter is merged in
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)  # only adapters train
