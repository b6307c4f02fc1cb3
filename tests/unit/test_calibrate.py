"""`skiplayer calibrate`: self-distillation raises held-out draft agreement, calibrated drafts stay lossless
(greedy identity, exact sampling distribution), the artifact round-trips and refuses other models."""
import json
import random
import time
from collections import Counter

import pytest
import torch

from skiplayer.decoding.generate import GenerationConfig, generate_ids
from skiplayer.decoding.sampling import SamplingConfig, probabilities
from skiplayer.draft_artifact import Draft, ResidualAdapter, load_draft, save_draft
from skiplayer.errors import UserError
from skiplayer.policies import PolicyConfig
from skiplayer.train.calibrate import (CalibrationConfig, CalibrationPrompt, Sequence, calibrate,
                                      generate_and_capture, select_vocab, teacher_force)
from tests.helpers import FakeTokenizer, chi_square_pvalue, exact_sequence_distribution, predictable_model

EXITS = [1, 3]


def random_prompts(n, vocab, seed=0, max_steps=20, held_out_every=5):
    rng = random.Random(seed)
    return [CalibrationPrompt([rng.randrange(4, vocab) for _ in range(rng.randrange(2, 10))], "random", str(i),
                              max_steps, [], i % held_out_every == held_out_every - 1) for i in range(n)]


def small_config(**kw):
    base = dict(exit_layers=EXITS, draft_vocab_size=48, adapter_rank=32, budget_minutes=30, epochs=12,
                batch_size=64, lr=3e-3, progress=False)
    return CalibrationConfig(**(base | kw))


@pytest.fixture(scope="module")
def model():
    return predictable_model(seed=0, n_layers=5, deep_scale=1.0)  # a plain random model


@pytest.fixture(scope="module")
def calibrated(model):
    return calibrate(model, random_prompts(50, model.args.vocab_size), small_config())


def as_draft(result, full_vocab=False):
    return Draft(None if full_vocab else result.vocab_ids, dict(result.adapters), dict(result.after),
                 sorted(result.adapters))


def test_calibration_raises_held_out_agreement_deterministically(model, calibrated):
    for e in EXITS:
        assert calibrated.after[e] > calibrated.before[e] + 0.05, (e, calibrated.before, calibrated.after)
    assert calibrated.counts["held_out_positions"] > 50 and calibrated.counts["train_positions"] > 200
    assert calibrated.vocab_ids is not None and len(calibrated.vocab_ids) == 48
    assert 0.5 < calibrated.coverage <= 1.0
    # Same seed, same data -> the same adapters and numbers (the generous budget never cuts work short).
    again = calibrate(model, random_prompts(15, model.args.vocab_size, max_steps=10), small_config(epochs=2))
    once = calibrate(model, random_prompts(15, model.args.vocab_size, max_steps=10), small_config(epochs=2))
    assert again.after == once.after
    for e in EXITS:
        assert torch.equal(again.adapters[e].up.weight, once.adapters[e].up.weight)


def test_capture_during_generation_matches_teacher_forcing(model):
    prompts = random_prompts(5, model.args.vocab_size, seed=7, max_steps=9)
    seqs, data = generate_and_capture(model, prompts, EXITS, (), None, time.monotonic() + 600, prompt_positions=3,
                                      progress=False)
    ref = teacher_force(model, seqs, EXITS, prompt_positions=3)
    assert len(data) == len(ref) == sum(min(len(p.ids), 4) + 9 - 1 for p in prompts)
    assert torch.equal(data.seq, ref.seq) and torch.equal(data.is_output, ref.is_output)
    assert torch.equal(data.target, ref.target)
    for e in EXITS:
        torch.testing.assert_close(data.hidden[e], ref.hidden[e], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(data.final, ref.final, atol=1e-4, rtol=1e-4)
    # Output rows predict exactly the generated tokens.
    out_targets = [t for s in seqs for t in s.output]
    assert data.target[data.is_output].tolist() == out_targets


def test_teacher_forcing_in_blocks_skips_blocks_before_the_kept_rows(model, monkeypatch):
    """Prompts longer than a teacher-forcing block: blocks wholly before the kept prompt rows keep nothing."""
    import skiplayer.train.calibrate as calib
    seqs = [Sequence(p, [7, 8, 9]) for p in random_prompts(3, model.args.vocab_size, seed=3)]
    seqs[0].prompt.ids = list(range(4, 16))
    whole = teacher_force(model, seqs, EXITS, prompt_positions=1)
    monkeypatch.setattr(calib, "CAPTURE_BLOCK", 4)
    blocks = teacher_force(model, seqs, EXITS, prompt_positions=1)
    assert len(blocks) == len(whole) == sum(min(len(s.prompt.ids), 2) + 3 - 1 for s in seqs)
    assert torch.equal(blocks.seq, whole.seq) and torch.equal(blocks.target, whole.target)
    torch.testing.assert_close(blocks.final, whole.final, atol=1e-4, rtol=1e-4)


def test_fresh_adapter_is_the_plain_exit(model):
    h = torch.randn(5, model.args.dim)
    assert torch.equal(ResidualAdapter(model.args.dim, 8)(h), h)


def test_measuring_in_half_precision_leaves_the_trained_adapter_alone(model):
    import copy
    from skiplayer.train.calibrate import agreement
    half = copy.deepcopy(model).half()
    adapter = ResidualAdapter(model.args.dim, 4)
    agreement(half, torch.randn(6, model.args.dim).half(), torch.zeros(6, dtype=torch.long), adapter)
    assert adapter.down.weight.dtype == torch.float32


def test_vocab_keeps_eos_and_most_frequent_outputs():
    ids = select_vocab([5, 5, 5, 7, 7, 9], 4, 100, always=[2], fallback=[11, 11, 12])
    assert ids.tolist() == [2, 5, 7, 9]
    assert select_vocab([5, 7], 4, 100, always=[2], fallback=[11, 11, 12]).tolist() == [2, 5, 7, 11]
    assert select_vocab([5], 0, 100) is None and select_vocab([5], 100, 100) is None


def run(model, prompt, strategy="autoregressive", E=1, k=1, draft=None, mode="none", max_steps=30):
    config = GenerationConfig(max_steps=max_steps, generation_strategy=strategy,
                              policy=PolicyConfig(exit_layer=E, num_speculations=k, dynamic_early_exit_mode=mode))
    ids, _, stats = generate_ids(model, prompt, config, tokenizer=FakeTokenizer(), draft=draft)
    return ids, stats


def test_calibrated_draft_greedy_is_lossless(model, calibrated):
    accepted = {False: 0, True: 0}
    for prompt in ([1, 5, 7, 9], [3], [11, 12, 13, 14, 15, 16, 17, 18]):
        ar, _ = run(model, prompt)
        for full_vocab in (False, True):
            draft = as_draft(calibrated, full_vocab)
            for E in (1, 2, 3):  # 2 has no adapter: plain exit with the draft vocabulary
                for k in (1, 4):
                    ss, stats = run(model, prompt, "self_speculative", E, k, draft)
                    assert ss == ar, (prompt, full_vocab, E, k)
                    accepted[full_vocab] += stats.accepted
            ss, _ = run(model, prompt, "self_speculative", 3, 4, draft, mode="adaptive")
            assert ss == ar
    assert accepted[False] > 0 and accepted[True] > 0


@pytest.fixture(scope="module")
def small_vocab():
    model = predictable_model(seed=2, n_layers=4, vocab_size=8, deep_scale=0.5)
    result = calibrate(model, random_prompts(20, 8, seed=3, max_steps=6),
                       small_config(exit_layers=[1, 2], draft_vocab_size=5, adapter_rank=8, epochs=4))
    assert result.vocab_ids is not None and len(result.vocab_ids) == 5  # 3 tokens the draft can never propose
    return model, result


@pytest.mark.parametrize("sampling", [SamplingConfig(True, 1.0), SamplingConfig(True, 0.8, top_k=4, top_p=0.9)])
def test_calibrated_draft_sampling_distribution_is_exact(small_vocab, sampling):
    model, result = small_vocab
    prompt = [1, 2, 3]
    exact = exact_sequence_distribution(model, prompt, 3, lambda logits: probabilities(logits, sampling))
    draws, counts = 1500, Counter()
    for seed in range(draws):
        draft = as_draft(result, full_vocab=seed % 4 == 0)
        config = GenerationConfig(max_steps=3, generation_strategy="self_speculative", sampling=sampling, seed=seed,
                                  policy=PolicyConfig(exit_layer=1 + seed % 2, num_speculations=1 + seed % 3))
        ids, _, _ = generate_ids(model, prompt, config, draft=draft)
        counts[tuple(ids)] += 1
    assert chi_square_pvalue(counts, exact, draws) > 1e-3


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from tests.conftest import save_tiny_model
    root = tmp_path_factory.mktemp("calib")
    data = root / "prompts.jsonl"
    rng = random.Random(0)
    with open(data, "w") as f:
        for i in range(30):
            words = " ".join(f"w{rng.randrange(4, 97)}" for _ in range(rng.randrange(2, 8)))
            f.write(json.dumps({"prompt": words, "response": "w5"}) + "\n")
    return save_tiny_model(root / "m0", seed=0), save_tiny_model(root / "m1", seed=1), data, root


def test_cli_artifact_round_trip_generate_and_errors(tiny_dirs, capsys):
    from skiplayer.cli import main
    from skiplayer.model.load import load_model
    from skiplayer.options import DEFAULT_DTYPE
    m0, m1, data, root = tiny_dirs
    out = root / "draft"
    rc = main(["calibrate", "--model", str(m0), "--exit_layers", "1,2", "--data", "custom_jsonl", "--data_path",
               str(data), "--num_prompts", "20", "--max_steps", "10", "--draft_vocab_size", "40", "--adapter_rank",
               "16", "--epochs", "3", "--no_progress", "--output", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "calibrated" in printed.out and "wrote" in printed.out
    loaded = load_model(str(m0), dtype=DEFAULT_DTYPE)  # calibrate and generate share the default dtype
    meta = json.loads((out / "draft.json").read_text())
    assert meta["fingerprint"] == loaded.fingerprint and meta["exit_layers"] == [1, 2]
    assert meta["adapter_rank"] == 16 and meta["draft_vocab_size"] == 40
    assert set(meta["acceptance"]) == {"1", "2"} and set(meta["agreement_before"]) == {"1", "2"}
    assert meta["calibration_seconds"] > 0 and "calibrate" in meta["command"]

    draft = load_draft(out, loaded)
    again = load_draft(out / "draft.json", loaded)
    assert draft.exit_layers == [1, 2] and len(draft.vocab_ids) == 40
    assert torch.equal(draft.vocab_ids, again.vocab_ids)
    assert draft.acceptance == {int(e): a for e, a in meta["acceptance"].items()}
    # Saving the loaded draft again gives identical tensors.
    save_draft(root / "copy", draft.adapters, draft.vocab_ids, {"fingerprint": loaded.fingerprint})
    copy = load_draft(root / "copy", loaded)
    for e in (1, 2):
        for name in ("down", "up"):
            assert torch.equal(getattr(draft.adapters[e], name).weight, getattr(copy.adapters[e], name).weight)
        assert draft.adapters[e].up.weight.abs().sum() > 0  # trained, not the zero init
    assert torch.equal(draft.vocab_ids, copy.vocab_ids)

    # generate --draft: same tokens as autoregressive.
    outs = {}
    for strategy in ("autoregressive", "self_speculative"):
        rc = main(["generate", "--model", str(m0), "--draft", str(out), "--prompt", "w5 w9 w11", "--max_steps", "12",
                   "--generation_strategy", strategy, "--exit_layer", "2", "--num_speculations", "3",
                   "--output_format", "json"])
        assert rc == 0
        outs[strategy] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]
    assert outs["autoregressive"] == outs["self_speculative"]

    other = load_model(str(m1), dtype=DEFAULT_DTYPE)
    with pytest.raises(UserError, match=r"was calibrated for model .* \(fingerprint .*\), not .*recalibrate"):
        load_draft(out, other)
    other_dtype = "float32" if DEFAULT_DTYPE != "float32" else "bfloat16"
    with pytest.raises(UserError, match=f"--dtype {other_dtype}"):
        load_draft(out, load_model(str(m0), dtype=other_dtype))
    rc = main(["generate", "--model", str(m1), "--draft", str(out), "--prompt", "w5", "--max_steps", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "recalibrate" in err and len(err.strip().splitlines()) == 1


def test_missing_or_corrupt_artifact_is_a_user_error(tiny_dirs, calibrated, model):
    from skiplayer.model.load import LoadedModel
    _, _, _, root = tiny_dirs
    loaded = LoadedModel(model, None, "tiny", "tiny", [2], "abc123")
    with pytest.raises(UserError, match="not found"):
        load_draft(root / "nowhere", loaded)
    good = save_draft(root / "good", calibrated.adapters, calibrated.vocab_ids, {"fingerprint": "abc123"})
    assert load_draft(good, loaded).exit_layers == EXITS
    broken = save_draft(root / "broken", calibrated.adapters, calibrated.vocab_ids, {"fingerprint": "abc123"})
    (broken / "draft.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="corrupt"):
        load_draft(broken, loaded)
    (broken / "draft.json").write_text("{ nope")
    with pytest.raises(UserError, match="corrupt"):
        load_draft(broken, loaded)
    (broken / "draft.json").unlink()
    with pytest.raises(UserError, match="missing"):
        load_draft(broken, loaded)


def test_exclude_first_keeps_benchmark_rows_out_of_calibration(tmp_path):
    """`--exclude_first N` never draws a dataset's first N rows (what `benchmark --num_samples N` measures)."""
    from skiplayer.commands.calibrate import collect_prompts

    class Loaded:
        def encode(self, prompt, chat_template=True):
            return [4 + len(prompt)]

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"row {i}", "response": "x"}) + "\n" for i in range(12)))
    for exclude in (0, 5, 12):
        prompts, _ = collect_prompts(Loaded(), ["custom_jsonl"], [str(data)], 100, 8, seed=1, chat_template=False,
                                     held_out=0.25, max_prompt_tokens=64, exclude_first=exclude)
        ids = sorted(int(p.id.split("/")[1]) for p in prompts)
        assert ids == list(range(exclude, 12))


@pytest.mark.parametrize("args,needle", [
    (["--exit_layers", "9"], "--exit_layers"),
    (["--exit_layers", "a,b"], "--exit_layers"),
    (["--data", "nope"], "unknown dataset"),
    (["--data", "custom_jsonl", "--data_path", "/no/such.jsonl"], "not found"),
])
def test_calibrate_bad_input_is_one_line(tiny_dirs, tmp_path, capsys, args, needle):
    from skiplayer.cli import main
    m0, _, data, _ = tiny_dirs
    base = {"--exit_layers": "1", "--data": "custom_jsonl", "--data_path": str(data)}
    given = dict(zip(args[::2], args[1::2]))
    argv = ["calibrate", "--model", str(m0), "--output", str(tmp_path / "d"), "--no_progress"]
    for key, value in (base | given).items():
        if key == "--data_path" and given.get("--data", "custom_jsonl") != "custom_jsonl":
            continue
        argv += [key, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
