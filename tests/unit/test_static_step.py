"""The static-shape decode step (model/cuda_graphs.py): same logits as the eager forward, compilable as one graph,
and the CUDA graph runner gives the same greedy tokens as eager decoding (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

from skiplayer.decoding.generate import GenerationConfig, generate_ids
from skiplayer.model import cuda_graphs
from skiplayer.model.cuda_graphs import decode_step, static_block_step, static_decode_step
from skiplayer.model.llama import Transformer
from tests.conftest import tiny_hf_model
from tests.helpers import predictable_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _prefill(model: Transformer, prompt: list[int], size: int):
    cache = model.new_cache(size)
    logits = model(torch.tensor(prompt), 0, cache)[-1]
    return cache, int(logits.argmax())


def _garbage_past(cache, start: int):
    """Fill every position from `start` on with large values: the static step must mask them out."""
    with torch.no_grad():
        cache.k[:, :, start:].normal_(0, 50)
        cache.v[:, :, start:].normal_(0, 50)


def _compare(step_fn, model: Transformer, prompt: list[int], steps: int, size: int = 40):
    """Feed the same varied tokens to the eager forward and to step_fn(k, v, token, pos) on a copy of its cache
    (garbage past the prompt); return the largest logit difference and both argmax lists."""
    eager_cache, _ = _prefill(model, prompt, size)
    static_cache, _ = _prefill(model, prompt, size)
    _garbage_past(static_cache, len(prompt))
    eager_tokens, static_tokens, worst = [], [], 0.0
    for i in range(steps):
        pos, token = len(prompt) + i, (7 * i + 4) % model.args.vocab_size
        expected = model(torch.tensor([token]), pos, eager_cache)[-1]
        got = step_fn(static_cache.k, static_cache.v, torch.tensor([token]), torch.tensor([pos]))[0]
        worst = max(worst, float((expected - got).abs().max()))
        eager_tokens.append(int(expected.argmax()))
        static_tokens.append(int(got.argmax()))
    return worst, eager_tokens, static_tokens


@pytest.mark.parametrize("tie,n_kv_heads", [(False, 2), (True, 4)])
def test_static_step_matches_eager_forward(tie, n_kv_heads):
    model = Transformer.from_hf(tiny_hf_model("llama", seed=3, n_layers=3, tie=tie, n_kv_heads=n_kv_heads))
    with torch.inference_mode():
        worst, eager, static = _compare(lambda k, v, t, p: static_decode_step(model, k, v, t, p), model,
                                        [5, 9, 11, 7, 5, 9], steps=8)
    assert worst < 1e-4, worst
    assert eager == static
    assert len(set(eager)) > 1  # the logits differed from step to step


def test_static_step_matches_eager_forward_on_gemma():
    """Gemma 3's variations in the static step: q/k norms, sandwich norms, and sliding-window layers (5 positions, so
    the window cuts off most of this prompt) with their own RoPE tables."""
    model = Transformer.from_hf(tiny_hf_model("gemma3", seed=3, n_layers=3))
    with torch.inference_mode():
        worst, eager, static = _compare(lambda k, v, t, p: static_decode_step(model, k, v, t, p), model,
                                        [5, 9, 11, 7, 5, 9, 3, 8], steps=6)
    assert worst < 1e-4, worst
    assert eager == static


def test_static_step_writes_cache_at_position():
    model = Transformer.from_hf(tiny_hf_model("llama", seed=1, n_layers=2))
    with torch.inference_mode():
        eager_cache, token = _prefill(model, [4, 5, 6], 16)
        static_cache, _ = _prefill(model, [4, 5, 6], 16)
        model(torch.tensor([token]), 3, eager_cache)
        static_decode_step(model, static_cache.k, static_cache.v, torch.tensor([token]), torch.tensor([3]))
    torch.testing.assert_close(static_cache.k[:, :, :4], eager_cache.k[:, :, :4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(static_cache.v[:, :, :4], eager_cache.v[:, :, :4], rtol=1e-5, atol=1e-6)
    assert float(static_cache.k[:, :, 4:].abs().max()) == 0.0  # nothing written past the position


def test_static_step_compiles_without_graph_breaks():
    """One graph (fullgraph=True) with static shapes: what CUDA graph capture and inductor need. aot_eager traces
    and functionalizes it (the in-place cache writes included) like inductor does, without inductor's code
    generation (~57 s for this tiny model on the 2-core machine)."""
    torch._dynamo.reset()
    model = Transformer.from_hf(tiny_hf_model("llama", seed=2, n_layers=2))

    def step(k, v, token, pos):
        return static_decode_step(model, k, v, token, pos)

    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch.no_grad():
        worst, eager, static = _compare(compiled, model, [8, 3, 8, 3], steps=4, size=24)
    assert worst < 1e-4, worst
    assert eager == static


def test_decode_step_is_eager_forward_off_cuda():
    model = predictable_model(seed=1)
    step, cache = decode_step(model, 20)
    assert cache.max_len == 20 and not isinstance(step, cuda_graphs._Fallback)
    with torch.inference_mode():
        cache_ref, token = _prefill(model, [4, 5], 20)
        model(torch.tensor([4, 5]), 0, cache)
        torch.testing.assert_close(step(token, 2), model(torch.tensor([token]), 2, cache_ref)[-1])
    assert cache.lengths == [3] * model.n_layers


def test_fallback_decodes_eagerly_when_capture_fails():
    model = predictable_model(seed=1)
    cache = model.new_cache(16)

    class Broken(cuda_graphs.GraphStep):
        def capture(self):
            raise RuntimeError("no graphs here")

    fallback = cuda_graphs._Fallback(Broken(model, cache))
    with torch.inference_mode():
        model(torch.tensor([4, 5, 6]), 0, cache)
        ref_cache, _ = _prefill(model, [4, 5, 6], 16)
        with pytest.warns(UserWarning, match="capture failed"):
            got = fallback(7, 3)
        torch.testing.assert_close(got, model(torch.tensor([7]), 3, ref_cache)[-1])
        torch.testing.assert_close(fallback(8, 4), model(torch.tensor([8]), 4, ref_cache)[-1])


def test_graph_step_bookkeeping_with_a_stand_in_graph():
    """GraphStep's host side (inputs filled per call, cache lengths, capture once, one output buffer) on the CPU: the
    stand-in 'graph' reruns the static step into the captured output, as a replay would."""
    model = predictable_model(seed=2)

    class Replay:
        def __init__(self, step):
            self.step, self.captures = step, 0

        def replay(self):
            self.step.logits.copy_(self.step._run())

    class CPUGraphStep(cuda_graphs.GraphStep):
        def capture(self):
            self.logits = self._run()
            self.graph = Replay(self)
            self.captures = getattr(self, "captures", 0) + 1

    prompt = [5, 9, 11, 5, 9]
    with torch.inference_mode():
        step = CPUGraphStep(model, model.new_cache(64))
        for _ in range(2):  # the second generation reuses the captured step on the reset cache
            step.cache.reset()
            ref_cache, token = _prefill(model, prompt, 64)
            model(torch.tensor(prompt), 0, step.cache)
            out = None
            for pos in range(len(prompt), len(prompt) + 6):
                expected = model(torch.tensor([token]), pos, ref_cache)[-1]
                got = step(token, pos)
                assert out is None or got is out  # always the same buffer
                out = got
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
                assert step.cache.lengths == [pos + 1] * model.n_layers
                token = int(expected.argmax())
    assert step.captures == 1
    with pytest.raises(RuntimeError, match="KV cache full"):
        step(token, 64)


@needs_cuda
def test_cuda_graph_decoding_matches_eager():
    torch.manual_seed(0)
    model = predictable_model(seed=4).cuda()
    config = GenerationConfig(max_steps=24)
    prompt = [5, 9, 11, 5, 9, 11, 5]
    saved = cuda_graphs.ENABLED
    try:
        cuda_graphs.ENABLED = False
        eager, _, _ = generate_ids(model, prompt, config)
        cuda_graphs.ENABLED = True
        graphed, _, _ = generate_ids(model, prompt, config)
        again, _, _ = generate_ids(model, prompt[:4], config)  # the same graph, another prompt
        cuda_graphs.ENABLED = False
        eager_again, _, _ = generate_ids(model, prompt[:4], config)
    finally:
        cuda_graphs.ENABLED = saved
    assert graphed == eager
    assert again == eager_again
    step = next(iter(model._decode_graphs.values()))
    assert step.failed is None and step.step.graph is not None


def _eager_block(model: Transformer, prompt: list[int], tokens: list[int], tree=None, size: int = 48):
    """Logits of a block after a prefilled prompt, through the eager forward (a causal chain, or a TreeMask)."""
    cache, _ = _prefill(model, prompt, size)
    h = model.forward_layers(model.embed(torch.tensor(tokens)), len(prompt), cache, 0, model.n_layers, tree=tree)
    return model.logits(h), cache


def _static_block(model: Transformer, prompt: list[int], tokens: list[int], positions, masks, size: int = 48):
    cache, _ = _prefill(model, prompt, size)
    _garbage_past(cache, len(prompt))
    start = len(prompt)
    slots = torch.arange(start, start + len(tokens))
    return static_block_step(model, cache.k, cache.v, torch.tensor(tokens), slots, positions, masks), cache


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_static_block_matches_eager_chain_and_tree(arch):
    """A verification block through static_block_step (slots, positions and masks as inputs) gives the eager forward's
    logits and K/V, as a causal chain and as a token tree; gemma3: q/k norms, sandwich norms, sliding windows (5
    positions, shorter than the prompt) and their own RoPE tables."""
    from skiplayer.drafts.tree import TokenTree
    from skiplayer.decoding.self_speculative import tree_mask
    model = Transformer.from_hf(tiny_hf_model(arch, seed=4, n_layers=3))
    prompt, tokens = [5, 9, 11, 7, 5, 9, 3, 8], [4, 6, 2, 9, 1]
    start, S, window = len(prompt), 48, model.args.sliding_window
    keys = torch.arange(S)[None, :]
    with torch.inference_mode():
        rows = start + torch.arange(len(tokens))[:, None]
        causal = keys <= rows
        masks = torch.stack([causal, causal & (keys > rows - window)])
        expected, eager_cache = _eager_block(model, prompt, tokens)
        got, static_cache = _static_block(model, prompt, tokens, rows[:, 0], masks)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        end = start + len(tokens)
        torch.testing.assert_close(static_cache.k[:, :, :end], eager_cache.k[:, :, :end], atol=1e-5, rtol=1e-5)

        tree = TokenTree.chain(tokens[0], tokens[1:3], [None, None])  # root 4 -> 6 -> 2, plus 9 -> 1 under the root
        tree.add_path(0, tokens[3:], "ngram")
        assert not tree.is_chain()
        mask = tree_mask(tree, start)
        expected, _ = _eager_block(model, prompt, tree.tokens, tree=mask)
        masks = torch.stack([mask.allowed(S), mask.allowed(S, window)])
        got, _ = _static_block(model, prompt, tree.tokens, mask.positions, masks)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert len({int(t) for t in got.argmax(-1)}) > 1


def test_static_block_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = Transformer.from_hf(tiny_hf_model("llama", seed=2, n_layers=2))
    prompt, tokens, S = [8, 3, 8, 3], [5, 6, 7], 24
    start = len(prompt)
    rows = start + torch.arange(len(tokens))
    causal = torch.arange(S)[None, :] <= rows[:, None]
    masks = torch.stack([causal, causal])

    def block(k, v, t, slots, positions, m):
        return static_block_step(model, k, v, t, slots, positions, m)

    compiled = torch.compile(block, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch.no_grad():
        expected, _ = _eager_block(model, prompt, tokens, size=S)
        cache, _ = _prefill(model, prompt, S)
        got = compiled(cache.k, cache.v, torch.tensor(tokens), rows, rows, masks)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["none", "adaptive"])
def test_ngram_rounds_through_the_block_runner_stay_lossless(monkeypatch, mode):
    """Where blocks_apply (CUDA; forced here, the blocks then run eagerly instead of captured), n-gram rounds verify
    through BlockGraphs: padded to the block lengths, the cache kept with the model and reused by the next
    generation; greedy output equals autoregressive decoding."""
    from skiplayer.policies import PolicyConfig
    model = predictable_model(seed=5)
    monkeypatch.setattr(cuda_graphs, "blocks_apply", lambda m: True)
    calls = []
    real = cuda_graphs.BlockGraphs.__call__

    def counted(self, tokens, start, tree):
        out = real(self, tokens, start, tree)
        calls.append((len(tokens), out is not None))
        return out

    monkeypatch.setattr(cuda_graphs.BlockGraphs, "__call__", counted)
    policy = PolicyConfig(exit_layer=2, draft_source="ngram", ngram_tokens=6, dynamic_early_exit_mode=mode)
    for prompt in ([5, 9, 11, 5, 9, 11, 5, 9], [3, 4, 5, 6, 3, 4, 5, 6, 3]):
        def run(strategy):
            config = GenerationConfig(max_steps=40, generation_strategy=strategy, policy=policy)
            return generate_ids(model, prompt, config)[0]
        assert run("self_speculative") == run("autoregressive"), prompt
    assert calls and all(ok for _, ok in calls) and max(n for n, _ in calls) > 1
    assert len(model.__dict__["_block_graphs"]) == 1  # one kept cache for both generations


def test_block_runner_declines_long_blocks_and_stays_off_the_cpu_path():
    model = predictable_model(seed=6)
    runner, cache = cuda_graphs.block_runner(model, 30)
    assert runner is None and cache.max_len == 30  # CPU: plain cache, eager passes
    blocks = cuda_graphs.BlockGraphs(model, model.new_cache(200), capture=False)
    with torch.inference_mode():
        blocks.cache.claim(0, 0, 0)
        assert blocks(list(range(65)), 0, None) is None  # longer than the largest block length
        assert blocks([1, 2, 3], 198, None) is None     # the padded block (4) would not fit the cache
