"""Gemma 3 (sliding-window and global layers, q/k norms, sandwich norms, GeGLU, scaled embeddings, tied head) through
the whole engine: greedy identity for every exit layer, every policy mode and the draft sources, on the torch path
and the native kernels, with prompts longer than the sliding window; sampling keeps the distribution."""
from collections import Counter

import pytest
import torch

from skiplayer.decoding.generate import GenerationConfig, generate_ids
from skiplayer.decoding.sampling import SamplingConfig, probabilities
from skiplayer.model.llama import Transformer
from skiplayer.model.optimize import native_kernels_available, optimize_model
from skiplayer.policies import MODES, PolicyConfig
from tests.conftest import tiny_hf_model
from tests.helpers import FakeTokenizer, chi_square_pvalue, exact_sequence_distribution

PROMPTS = [[1, 5, 7, 9, 11, 13, 17, 19], [30, 31]]  # 8 tokens: past the window of 5 from the start


def gemma_model(seed: int = 0, n_layers: int = 6, vocab_size: int = 97, deep_scale: float = 0.3,
                head_dim: int = 8) -> Transformer:
    """Layers after the first two add little (their output norms scaled down), so early exits often agree."""
    model = Transformer.from_hf(tiny_hf_model("gemma3", seed=seed, n_layers=n_layers, vocab_size=vocab_size,
                                              hidden_size=4 * head_dim))
    with torch.no_grad():
        for block in model.layers[2:]:
            block.post_attention_norm.weight.mul_(deep_scale)
            block.post_ffn_norm.weight.mul_(deep_scale)
    return model


@pytest.fixture(scope="module", params=["torch", "native", "native-d64"])
def model(request):
    """native-d64: head_dim 64, where the AVX-512 decoding attention runs (sliding windows, trees) if the CPU has it."""
    m = gemma_model(head_dim=64 if request.param == "native-d64" else 8)
    if request.param != "torch":
        if not native_kernels_available():
            pytest.skip("native kernels unavailable here (no compiler)")
        optimize_model(m)
    return m


def run(model, prompt, strategy="autoregressive", max_steps=24, **policy):
    config = GenerationConfig(max_steps=max_steps, generation_strategy=strategy, policy=PolicyConfig(**policy))
    ids, _, stats = generate_ids(model, prompt, config, tokenizer=FakeTokenizer())
    return ids, stats


def test_greedy_identity_every_exit_layer_and_draft_source(model):
    accepted = 0
    for prompt in PROMPTS:
        ar, _ = run(model, prompt)
        for E in range(1, model.n_layers):
            for k in (1, 3):
                ss, stats = run(model, prompt, "self_speculative", exit_layer=E, num_speculations=k)
                assert ss == ar, (prompt, E, k)
                accepted += stats.accepted
        for source, width in (("ngram", 1), ("both", 1), ("self", 3), ("both", 3)):
            assert run(model, prompt, "self_speculative", exit_layer=2, num_speculations=3, draft_source=source,
                       tree_width=width)[0] == ar, (source, width)
    assert accepted > 0  # drafts were accepted too: the verifier's accept path ran, not only rejections


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_identity_every_mode(model, mode):
    lenient = dict(consistent_tokens_count=2, confidence_threshold=0.5, min_exit_layer=1)
    for prompt in PROMPTS:
        ar, _ = run(model, prompt)
        for p in (0.0, 0.5):
            ss, _ = run(model, prompt, "self_speculative", exit_layer=4, num_speculations=3,
                        dynamic_early_exit_mode=mode, layer_skip_proportion=p, **lenient)
            assert ss == ar, (mode, p)


def test_sampling_distribution_matches_autoregressive():
    model = gemma_model(seed=2, n_layers=4, vocab_size=8, deep_scale=0.5)
    prompt = [1, 2, 3, 4, 5]  # the last sampled token sits past the window of 5
    sampling = SamplingConfig(True, 1.0)
    exact = exact_sequence_distribution(model, prompt, 3, lambda logits: probabilities(logits, sampling))
    draws = 3000
    counts = Counter()
    for seed in range(draws):
        config = GenerationConfig(max_steps=3, generation_strategy="self_speculative", sampling=sampling, seed=seed,
                                  policy=PolicyConfig(exit_layer=1 + seed % 3, num_speculations=1 + seed % 3))
        counts[tuple(generate_ids(model, prompt, config)[0])] += 1
    assert chi_square_pvalue(counts, exact, draws) > 1e-3


def test_layerskip_training_runs_on_gemma_and_the_result_loads(tmp_path):
    from skiplayer.model.load import load_model
    from skiplayer.train.trainer import TrainConfig, train
    from tests.conftest import tiny_tokenizer
    model_dir = tmp_path / "model"
    tiny_hf_model("gemma3", n_layers=4).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "data.txt"
    data.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 90 + 4}" for j in range(40)) for i in range(50)))
    result = train(TrainConfig(model=str(model_dir), data_path=str(data), output_dir=str(tmp_path / "run"),
                               max_steps=3, batch_size=2, seq_len=16, early_exit_loss_layers="0::2",
                               layer_dropout_prob_max=0.2, progress=False))
    assert set(result["exit_losses"]) == {"0", "2", "3"}
    assert all(0 < loss < 20 for loss in result["exit_losses"].values())
    loaded = load_model(result["final_path"])
    assert loaded.model.args.sliding_layers == (0, 1, 3)  # still Gemma: the trained checkpoint loads as one
    prompt = [1, 5, 6, 7, 8, 9, 10]
    ar = generate_ids(loaded.model, prompt, GenerationConfig(max_steps=10))[0]
    config = GenerationConfig(max_steps=10, generation_strategy="self_speculative",
                              policy=PolicyConfig(exit_layer=2, num_speculations=2))
    assert generate_ids(loaded.model, prompt, config)[0] == ar


def test_commands_end_to_end_on_a_gemma_directory(tmp_path, capsys):
    """calibrate (reduced-vocabulary draft) -> benchmark with the draft and trees -> correctness -> sweep -> report,
    as a user runs them, on a tiny Gemma 3 checkpoint."""
    import json
    import random

    from skiplayer.cli import main
    from tests.conftest import tiny_tokenizer
    model_dir = tmp_path / "gemma"
    tiny_hf_model("gemma3", n_layers=4).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    rng = random.Random(0)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": " ".join(f"w{rng.randrange(4, 97)}" for _ in range(9)),
                                        "response": "w5 w6"}) + "\n" for _ in range(16)))
    common = ["--model", str(model_dir), "--dataset", "custom_jsonl", "--data_path", str(data), "--max_steps", "8"]
    draft = tmp_path / "draft"
    assert main(["calibrate", "--model", str(model_dir), "--exit_layers", "2", "--data", "custom_jsonl",
                 "--data_path", str(data), "--num_prompts", "12", "--max_steps", "8", "--draft_vocab_size", "40",
                 "--epochs", "2", "--exclude_first", "4", "--no_progress", "--output", str(draft)]) == 0
    run = tmp_path / "run"
    assert main(["benchmark", *common, "--num_samples", "4", "--exit_layer", "2", "--num_speculations", "2",
                 "--draft", str(draft), "--draft_source", "both", "--dynamic_early_exit_mode", "adaptive",
                 "--threads", "1", "--warmup", "0", "--no_progress", "--output_dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["equality"]["identical"] == 4 and summary["environment"]["dtype"] == "float32"
    assert main(["correctness", *common, "--num_samples", "3", "--exit_layer", "3", "--num_speculations", "3",
                 "--threads", "1", "--output", str(tmp_path / "ok.json")]) == 0
    assert main(["sweep", *common, "--num_samples", "2", "--exit_layers", "1:3", "--num_speculations_list", "2",
                 "--threads", "1", "--no_progress", "--output_dir", str(tmp_path / "sweep")]) == 0
    assert main(["report", str(run), "--output", str(tmp_path / "report.md")]) == 0
    assert "custom_jsonl" in (tmp_path / "report.md").read_text()
    capsys.readouterr()
