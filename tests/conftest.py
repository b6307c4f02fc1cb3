"""Shared fixtures: tiny random Llama-family models built in memory (no network, no ../shared)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _keep_gguf_activations():
    """A test that sets the process-wide GGUF activations (gguf_blocks.set_gguf_activations, or load_model) leaves
    them as it found them: those of the module's models (module fixtures are set up first), else the kernels' own
    default, two int8 parts."""
    ops = getattr(torch.ops, "skiplayer", None)
    before = ops.activation_int8_parts(0) if ops is not None and hasattr(ops, "activation_int8_parts") else 2
    yield
    ops = getattr(torch.ops, "skiplayer", None)
    if ops is not None and hasattr(ops, "activation_int8_parts"):
        ops.activation_int8_parts(before)


def tiny_hf_model(arch: str = "llama", seed: int = 0, vocab_size: int = 97, n_layers: int = 4, tie: bool = False,
                  hidden_size: int = 32, n_heads: int = 4, n_kv_heads: int = 2, max_positions: int = 256):
    """A tiny random HF causal LM of the given architecture (llama, mistral, qwen2, gemma3). gemma3: sliding window
    of 5 positions on every layer but each third (global), an attention scale unlike 1/sqrt(head_dim), tied head
    (Gemma's own choice; `tie` is ignored) and non-trivial norm weights."""
    import transformers

    extra = {}
    if arch == "gemma3":
        extra = dict(head_dim=hidden_size // n_heads, sliding_window=5, query_pre_attn_scalar=12,
                     layer_types=["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(n_layers)],
                     hidden_activation="gelu_pytorch_tanh")
        tie = True
    cls_config = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config, "gemma3": transformers.Gemma3TextConfig}[arch]
    config = cls_config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size + 8,
                        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                        max_position_embeddings=max_positions, tie_word_embeddings=tie, rms_norm_eps=1e-5,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Larger-than-default init so tiny models make confident, varied predictions (drafts then get accepted
    # sometimes and rejected sometimes: both paths of the verifier run).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif arch == "gemma3":
                p.normal_(0, 0.2)  # Gemma norms scale by 1 + weight: test the offset
    return model


def tiny_tokenizer(vocab_size: int = 97):
    """A word-level tokenizer over 'w0'..'wN' plus specials (ids 0-3), saved alongside tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def save_tiny_model(directory: Path, arch: str = "llama", seed: int = 0, n_layers: int = 4) -> Path:
    """A tiny random HF model + tokenizer saved as an HF directory (loadable with --model DIR)."""
    tiny_hf_model(arch, seed=seed, n_layers=n_layers).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model():
    from skiplayer.model.llama import Transformer
    return Transformer.from_hf(tiny_hf_model("llama", n_layers=6))


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Unit tests never touch the user's conversion cache unless SKIPLAYER_CACHE is set by the caller.
    if "SKIPLAYER_CACHE" not in os.environ:
        monkeypatch.setenv("SKIPLAYER_CACHE", str(tmp_path_factory.getbasetemp() / "skiplayer-cache"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tiny models gain nothing from threads, and CI machines have two shared cores.
    torch.set_num_threads(1)
