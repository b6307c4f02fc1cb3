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
from skiplayer.draft_artifact import (AttentionAdapter, Draft, ResidualAdapter, adapter_tensors,
                                     attention_adapter_from_layer, load_draft, save_draft)
from skiplayer.drafts.ngram import NGramTable
from skiplayer.errors import UserError
from skiplayer.policies import PolicyConfig
from skiplayer.train.calibrate import (Captured, CalibrationConfig, CalibrationPrompt, Sequence, agreement,
                                      calibrate, generate_and_capture, select_vocab, teacher_force)
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


@pytest.fixture(scope="module", params=["attention", "mlp"])
def calibrated(model, request):
    return calibrate(model, random_prompts(50, model.args.vocab_size), small_config(adapter_form=request.param))


def same_adapters(a, b, layers=EXITS):
    return all(torch.equal(x, y) for e in layers
               for x, y in zip(adapter_tensors(e, a[e]).values(), adapter_tensors(e, b[e]).values()))


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
    form = "mlp" if isinstance(calibrated.adapters[EXITS[0]], ResidualAdapter) else "attention"
    again = calibrate(model, random_prompts(15, model.args.vocab_size, max_steps=10),
                      small_config(epochs=2, adapter_form=form))
    once = calibrate(model, random_prompts(15, model.args.vocab_size, max_steps=10),
                     small_config(epochs=2, adapter_form=form))
    assert again.after == once.after and same_adapters(again.adapters, once.adapters)


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
    half = copy.deepcopy(model).half()
    data = Captured({1: torch.randn(6, model.args.dim).half()}, torch.zeros(6, model.args.dim),
                    torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.bool))
    for adapter in (ResidualAdapter(model.args.dim, 4), attention_adapter_from_layer(model, 1, 4)):
        agreement(half, data, 1, data.is_output, adapter)
        assert all(p.dtype == torch.float32 for p in adapter.parameters())


def test_attention_adapter_training_path_equals_decoding_path(model):
    """forward_batch (whole padded sequences, what training sees) computes what decoding computes token by token
    on the KV cache, and a fresh adapter is layer E's attention followed by an identity MLP."""
    torch.manual_seed(0)
    adapter = attention_adapter_from_layer(model, 2, 8)
    torch.nn.init.normal_(adapter.mlp.up.weight, std=0.1)
    lengths, dim = [7, 4], model.args.dim
    h = torch.randn(2, 7, dim)
    batch = adapter.forward_batch(h, model.rope_cos[:7], model.rope_sin[:7])
    for b, n in enumerate(lengths):
        cache = model.new_cache(n, extra_layers=1)
        slot = model.n_layers
        steps = [adapter(h[b, t:t + 1], *model.rope(t, 1), cache, slot, t) for t in range(n)]
        torch.testing.assert_close(torch.cat(steps), batch[b, :n], atol=1e-5, rtol=1e-5)
    block = model.layers[2]
    cache = model.new_cache(7)
    ref = h[0] + block.attention(block.attention_norm(h[0]), *model.rope(0, 7), cache, 2, 0)
    fresh = attention_adapter_from_layer(model, 2, 8)
    torch.testing.assert_close(fresh.forward_batch(h[:1], model.rope_cos[:7], model.rope_sin[:7])[0], ref,
                               atol=1e-5, rtol=1e-5)


def test_residual_adapter_native_step_is_the_same_function():
    """A draft step's adapter MLP through the native norm and products (what use_kernels_of turns on) computes the
    stock float32 function of its weights to fp32 rounding, float16 weights (the built-in draft's) included; batched
    (training) inputs keep the stock path."""
    import copy
    from skiplayer.model.optimize import native_kernels_available
    if not native_kernels_available():
        pytest.skip("native CPU kernels cannot be built here")
    torch.manual_seed(0)
    h = torch.randn(3, 64)
    for dtype in (torch.float32, torch.float16):
        adapter = ResidualAdapter(64, 8)
        torch.nn.init.normal_(adapter.up.weight, std=0.1)
        adapter = adapter.to(dtype)
        stock = copy.deepcopy(adapter).float()(h)  # the same weight values in float32, stock path
        assert not torch.allclose(stock, h)  # the MLP does something
        adapter.native = True
        torch.testing.assert_close(adapter(h), stock, atol=1e-5, rtol=1e-5)
        if dtype == torch.float32:
            torch.testing.assert_close(adapter(h[None])[0], stock, atol=1e-5, rtol=1e-5)
        assert "unit" not in adapter.state_dict()  # nothing new in saved drafts


def test_vocab_keeps_eos_and_most_frequent_outputs():
    ids = select_vocab([5, 5, 5, 7, 7, 9], 4, 100, always=[2], fallback=[11, 11, 12])
    assert ids.tolist() == [2, 5, 7, 9]
    assert select_vocab([5, 7], 4, 100, always=[2], fallback=[11, 11, 12]).tolist() == [2, 5, 7, 11]
    assert select_vocab([5], 0, 100) is None and select_vocab([5], 100, 100) is None


def run(model, prompt, strategy="autoregressive", E=1, k=1, draft=None, mode="none", max_steps=30, skip=0.0,
        **tree):
    config = GenerationConfig(max_steps=max_steps, generation_strategy=strategy,
                              policy=PolicyConfig(exit_layer=E, num_speculations=k, dynamic_early_exit_mode=mode,
                                                  layer_skip_proportion=skip, **tree))
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
            # Exits and skipped layers that vary per token leave gaps in an attention adapter's K/V while drafting.
            for mode, skip in (("adaptive", 0.0), ("random", 0.0), ("logits_current", 0.0), ("none", 0.5)):
                ss, _ = run(model, prompt, "self_speculative", 3, 4, draft, mode=mode, skip=skip)
                assert ss == ar, (prompt, mode, skip)
            for mode in ("none", "adaptive"):  # draft-tree siblings from the (reduced-vocabulary) draft head
                ss, _ = run(model, prompt, "self_speculative", 1, 3, draft, mode=mode, tree_width=3,
                            draft_source="both")
                assert ss == ar, (prompt, full_vocab, mode, "siblings")
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
    report = meta["ngram_table"]  # the n-gram table of the training outputs, checked on the held-out ones
    assert len(draft.ngrams) == report["entries"] > 0 and report["positions"] > 0
    assert 0 <= report["named"] <= 1 and 0 <= report["next_token_right"] <= 1
    assert torch.equal(draft.vocab_ids, again.vocab_ids)
    assert draft.acceptance == {int(e): a for e, a in meta["acceptance"].items()}
    # Saving the loaded draft again gives identical tensors.
    save_draft(root / "copy", draft.adapters, draft.vocab_ids, {"fingerprint": loaded.fingerprint})
    copy = load_draft(root / "copy", loaded)
    assert meta["form"] == "attention" and meta["adapter_form"] == "attention"
    assert same_adapters(draft.adapters, copy.adapters, [1, 2])
    for e in (1, 2):
        assert isinstance(draft.adapters[e], AttentionAdapter)  # the default form
        assert adapter_tensors(e, draft.adapters[e])[f"layers.{e}.up.weight"].abs().sum() > 0  # trained
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
    good_table = save_draft(root / "table", calibrated.adapters, calibrated.vocab_ids, {"fingerprint": "abc123"},
                            NGramTable({(5, 6): 7, (6,): 9}, 2))
    assert load_draft(good_table, loaded).ngrams.next_token == {(5, 6): 7, (6,): 9}
    (good_table / "ngrams.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="ngrams.safetensors is corrupt"):
        load_draft(good_table, loaded)
    from safetensors.torch import save_file
    save_file({"ngrams.2.keys": torch.zeros(1, 2, dtype=torch.int64)}, str(good_table / "ngrams.safetensors"))
    with pytest.raises(UserError, match="ngrams.safetensors is corrupt"):  # keys without their next tokens
        load_draft(good_table, loaded)
    save_draft(good_table, calibrated.adapters, calibrated.vocab_ids, {"fingerprint": "abc123"},
               NGramTable({(5,): model.args.vocab_size}, 1))
    with pytest.raises(UserError, match="outside this model's"):
        load_draft(good_table, loaded)
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


def test_saved_outputs_survive_an_interruption_and_are_reused(model, tmp_path, monkeypatch):
    """Finished outputs reach disk even when generation is interrupted; a rerun reuses them (same rows, no new
    generation for them) and generates only the prompts not answered yet."""
    import skiplayer.train.calibrate as cal
    from skiplayer.train.capture_store import CaptureStore

    settings = {"fingerprint": "abc", "capture_layers": [*EXITS, model.n_layers], "prompt_positions": 2}
    prompts = random_prompts(9, model.args.vocab_size, seed=11, max_steps=7)
    ref_seqs, ref = generate_and_capture(model, prompts, EXITS, (), None, time.monotonic() + 600, 2, False, 4)

    real = cal.generate_batched

    def interrupted_after_five(*args, **kw):
        for n, done in enumerate(real(*args, **kw)):
            if n == 5:
                raise KeyboardInterrupt
            yield done

    monkeypatch.setattr(cal, "generate_batched", interrupted_after_five)
    with pytest.raises(KeyboardInterrupt):
        generate_and_capture(model, prompts, EXITS, (), None, time.monotonic() + 600, 2, False, 4,
                             CaptureStore(tmp_path, settings, part_size=2))
    assert len(CaptureStore(tmp_path, settings).load()) == 5  # 2 full parts + the pending one flushed

    asked = []

    def counting(model_, prompt_ids, *args, **kw):
        asked.extend(prompt_ids)
        return real(model_, prompt_ids, *args, **kw)

    monkeypatch.setattr(cal, "generate_batched", counting)
    seqs, data = generate_and_capture(model, prompts, EXITS, (), None, time.monotonic() + 600, 2, False, 4,
                                      CaptureStore(tmp_path, settings, part_size=2))
    assert len(asked) == 4  # only the prompts without a saved output
    by_prompt = {tuple(s.prompt.ids): s.output for s in seqs}
    assert by_prompt == {tuple(s.prompt.ids): s.output for s in ref_seqs}
    # The same rows as one uninterrupted run, sequence by sequence (up to rounding: these torch kernels are not
    # batch-invariant and the batches differ).
    for i, s in enumerate(seqs):
        j = next(j for j, r in enumerate(ref_seqs) if r.prompt is s.prompt)
        assert torch.equal(data.target[data.seq == i], ref.target[ref.seq == j])
        assert torch.equal(data.is_output[data.seq == i], ref.is_output[ref.seq == j])
        for a, b in [(data.final, ref.final), *((data.hidden[e], ref.hidden[e]) for e in EXITS)]:
            torch.testing.assert_close(a[data.seq == i], b[ref.seq == j], atol=1e-5, rtol=1e-5)
    # Everything is saved now: a third run generates nothing.
    asked.clear()
    generate_and_capture(model, prompts, EXITS, (), None, time.monotonic() + 600, 2, False, 4,
                         CaptureStore(tmp_path, settings))
    assert asked == []
    with pytest.raises(UserError, match="other settings.*delete"):
        CaptureStore(tmp_path, settings | {"prompt_positions": 3})


def test_calibrate_command_reuses_its_saved_outputs(tiny_dirs, capsys):
    from skiplayer.cli import main
    m0, _, data, root = tiny_dirs
    out = root / "reused"
    argv = ["calibrate", "--model", str(m0), "--exit_layers", "1", "--data", "custom_jsonl", "--data_path",
            str(data), "--num_prompts", "12", "--max_steps", "6", "--draft_vocab_size", "40", "--adapter_rank", "8",
            "--epochs", "2", "--no_progress", "--output", str(out)]
    assert main(argv) == 0
    first = json.loads((out / "draft.json").read_text())
    assert "reusing" not in capsys.readouterr().err
    assert main(argv) == 0
    assert "reusing the outputs saved in" in capsys.readouterr().err
    second = json.loads((out / "draft.json").read_text())
    assert second["acceptance"] == first["acceptance"]
    assert second["data"]["output_tokens"] == first["data"]["output_tokens"]
    # --ngram_table_only: the draft's table rebuilt from the same saved outputs; the adapters stay as they were.
    table, weights = (out / "ngrams.safetensors").read_bytes(), (out / "draft.safetensors").read_bytes()
    (out / "ngrams.safetensors").unlink()
    assert main(argv + ["--ngram_table_only"]) == 0
    printed = capsys.readouterr()
    assert "n-gram table:" in printed.out and "reusing the outputs" in printed.err
    assert (out / "ngrams.safetensors").read_bytes() == table
    assert (out / "draft.safetensors").read_bytes() == weights
    again = json.loads((out / "draft.json").read_text())
    assert again["ngram_table"]["command"].startswith("skiplayer calibrate")
    assert again["ngram_table"]["entries"] == first["ngram_table"]["entries"] > 0
    assert again["acceptance"] == first["acceptance"]
    empty = argv[:argv.index("--output") + 1] + [str(root / "no-draft-here"), "--ngram_table_only"]
    assert main(empty) == 2
    err = capsys.readouterr().err
    assert "has no draft.json" in err and len(err.strip().splitlines()) == 1
    # The MLP form trains on fewer prompt rows than these attention-form rows hold: it reuses them, unchanged.
    mlp = argv[:-1] + [str(root / "reused-mlp"), "--adapter_form", "mlp", "--calibration_data",
                       str(out / "calibration-data")]
    parts = sorted(p.name for p in (out / "calibration-data").iterdir())
    assert main(mlp) == 0
    assert "reusing the outputs saved in" in capsys.readouterr().err
    third = json.loads((root / "reused-mlp" / "draft.json").read_text())
    assert third["adapter_form"] == "mlp" and third["data"]["output_tokens"] == first["data"]["output_tokens"]
    assert sorted(p.name for p in (out / "calibration-data").iterdir()) == parts
    other = list(argv)
    other[other.index("--exit_layers") + 1] = "2"
    assert main(other) == 2  # other capture layers: refused, one line
    err = capsys.readouterr().err
    assert "other settings" in err and len(err.strip().splitlines()) == 1


def test_attention_adapter_kv_deferred_over_rounds_is_written_when_a_draft_reads_it(model):
    """Verification hands the adapter the exact states of the positions it keeps; their K/V are written in one call
    when a draft next reads the slot, over what drafting wrote there meanwhile, and equal K/V written at once."""
    from skiplayer.decoding.draft import DraftHead
    torch.manual_seed(0)
    adapter = attention_adapter_from_layer(model, 2, 8)
    torch.nn.init.normal_(adapter.mlp.up.weight, std=0.1)
    tokens = torch.randint(0, model.args.vocab_size, (13,))
    exact = {}
    ref_cache = model.new_cache(16, extra_layers=1)
    ref = DraftHead(model, None, {2: adapter})
    model.prefill(tokens[:12], ref_cache, {2: lambda h: (exact.setdefault(2, h), ref.write_kv(2, h, 0, ref_cache))})
    states, slot = exact[2], model.n_layers

    cache = model.new_cache(16, extra_layers=1)
    head = DraftHead(model, None, {2: adapter})
    model.prefill(tokens[:5], cache, head.taps(0, cache))
    assert cache.lengths[slot] == 0  # the prompt's states wait too
    head.flush_kv(2, cache)  # a draft reads the slot: the prompt's K/V, then its own approximate entries at 5, 6
    assert cache.lengths[slot] == 5
    head.write_kv(2, torch.randn(2, model.args.dim), 5, cache)
    for start, end in ((5, 8), (8, 9), (9, 12)):  # three rounds keep 3, 1 and 3 positions
        head.defer_kv({2: states[start:end]}, start, cache)
    assert cache.lengths[slot] == 5  # nothing written while no draft reads the slot
    h = torch.randn(1, model.args.dim)
    torch.testing.assert_close(head(h, 2, 12, cache, {}), ref(h, 2, 12, ref_cache, {}))
    assert cache.lengths[slot] == 13
    torch.testing.assert_close(cache.k[slot, :, :13], ref_cache.k[slot, :, :13])
    torch.testing.assert_close(cache.v[slot, :, :13], ref_cache.v[slot, :, :13])
