"""Token trees and n-gram drafting: lookup, tree attention against brute force, the KV cache after acceptance,
greedy identity and the sampling distribution of multi-candidate acceptance."""
from collections import Counter

import pytest
import torch
from hypothesis import given, settings, strategies as st

from skiplayer.decoding.generate import GenerationConfig, generate_ids
from skiplayer.draft_artifact import Draft
from skiplayer.decoding.sampling import SamplingConfig, probabilities
from skiplayer.decoding.self_speculative import tree_mask
from skiplayer.drafts.ngram import NGramLookup, NGramTable
from skiplayer.drafts.tree import (NGRAM, SELF, SIBLING, TokenTree, accept_tree_greedy, accept_tree_sampling,
                                   rank_siblings)
from skiplayer.errors import UserError
from skiplayer.model.llama import Transformer
from skiplayer.policies import PolicyConfig
from tests.helpers import FakeTokenizer, chi_square_pvalue, exact_sequence_distribution, predictable_model

# Prompts with repeated spans, so that lookup finds matches (the tiny models also fall into loops of their own).
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7], [3, 4, 3, 4, 3], [11, 12, 13, 14, 15, 16, 17, 18]]


def test_ngram_lookup_prefers_longest_and_most_recent_match():
    lookup = NGramLookup(max_ngram=3, num_tokens=3)
    lookup.extend([1, 2, 3, 9, 2, 3, 8, 7, 1, 2, 3])
    assert lookup.propose() == [9, 2, 3]        # 3-gram "1 2 3" matched at the start, not "2 3" (more recent)
    lookup.extend([4])
    assert lookup.propose() == []                # "3 4", "4" never seen before
    lookup.extend([2, 3])
    assert lookup.propose() == [4, 2, 3]         # "4 2 3"? no; "2 3" most recently ended before the 4
    assert lookup.propose(max_tokens=1) == [4]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=2, max_size=40), st.integers(1, 4), st.integers(1, 5))
def test_ngram_lookup_matches_brute_force(tokens, max_ngram, num_tokens):
    lookup = NGramLookup(max_ngram=max_ngram, num_tokens=num_tokens)
    expected = []
    for i in range(len(tokens)):  # incremental updates give the same answers as a fresh scan at every length
        lookup.extend(tokens[i:i + 1])
        ctx, expected = tokens[:i + 1], []
        for n in range(min(max_ngram, len(ctx) - 1), 0, -1):
            ends = [e for e in range(n - 1, len(ctx) - 1) if ctx[e + 1 - n:e + 1] == ctx[len(ctx) - n:]]
            if ends:
                expected = ctx[ends[-1] + 1:ends[-1] + 1 + num_tokens]
                break
        assert lookup.propose() == expected


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 4), max_size=4), st.lists(st.integers(0, 4), max_size=12)),
                min_size=1, max_size=6),
       st.lists(st.integers(0, 4), min_size=1, max_size=5), st.integers(1, 3), st.integers(1, 3))
def test_ngram_table_matches_brute_force(pairs, context, max_ngram, min_count):
    """The table names, for the longest suffix of the context seen at least min_count times before an output token,
    the token that followed it most often (ties: the smallest id); run() chains such lookups."""
    table = NGramTable.build(pairs, max_ngram, min_count)
    for n in range(min(max_ngram, len(context)), 0, -1):
        key, seen = context[-n:], Counter()
        for prompt, output in pairs:
            seq = prompt + output
            for i in range(len(prompt), len(seq)):
                if i >= n and seq[i - n:i] == key:
                    seen[seq[i]] += 1
        best = min(seen.items(), key=lambda kv: (-kv[1], kv[0])) if seen else None
        if best and best[1] >= min_count:
            assert table.lookup(context) == (best[0], n)
            break
    else:
        assert table.lookup(context) == (None, 0)
    run, order = table.run(context, 3)
    chained = list(context)
    for token in run:
        assert table.lookup(chained)[0] == token
        chained.append(token)
    assert len(run) == 3 or table.lookup(chained)[0] is None
    assert order == (table.lookup(context)[1] if run else 0)
    again = NGramTable.from_tensors(table.to_tensors())
    assert again.next_token == table.next_token


def test_ngram_lookup_falls_back_to_the_table_without_a_match():
    table = NGramTable.build([([1], [7, 8, 9, 7, 8, 9])], max_ngram=2, min_count=1)
    lookup = NGramLookup(max_ngram=3, num_tokens=3, table=table)
    lookup.extend([1, 2, 3, 1, 2])
    assert lookup.propose() == [3, 1, 2] and lookup.order == 2    # the context's own match comes first
    lookup.extend([7])
    assert lookup.propose() == [8, 9, 7] and lookup.order == -1   # no "7" earlier in the context: the table's run
    lookup.extend([5])
    assert lookup.propose() == [] and lookup.order == 0           # "5" is in neither
    assert NGramLookup(num_tokens=3).propose() == []


def test_ngram_lookup_takes_the_table_where_it_matches_a_longer_suffix():
    table = NGramTable.build([([0], [4, 5, 6])], max_ngram=3, min_count=1)   # "4 5" -> 6
    lookup = NGramLookup(max_ngram=3, num_tokens=3, table=table)
    lookup.extend([5, 9, 4, 5])
    assert lookup.propose() == [6] and lookup.order == -2        # the context matched only "5" (-> 9)
    lookup = NGramLookup(max_ngram=3, num_tokens=3, table=table)
    lookup.extend([7, 4, 5, 1, 4, 5])
    assert lookup.propose() == [1, 4, 5] and lookup.order == 2   # "4 5" in both: the context's own comes first


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=30), st.lists(st.integers(0, 4), max_size=12),
       st.integers(1, 3))
def test_ngram_lookup_with_a_table_takes_the_longer_match(tokens, calibration_output, num_tokens):
    """With a table, the proposal is the context's (brute force, as above) unless the table matched a longer
    suffix, whose run it then is; `order` says which (n > 0 context, -n table, 0 neither)."""
    table = NGramTable.build([([0], calibration_output)], max_ngram=3, min_count=1)
    lookup = NGramLookup(max_ngram=3, num_tokens=num_tokens, table=table)
    lookup.extend(tokens)
    context, order = [], 0
    for n in range(min(3, len(tokens) - 1), 0, -1):
        ends = [e for e in range(n - 1, len(tokens) - 1) if tokens[e + 1 - n:e + 1] == tokens[len(tokens) - n:]]
        if ends:
            context, order = tokens[ends[-1] + 1:ends[-1] + 1 + num_tokens], n
            break
    table_run, table_order = table.run(tokens, num_tokens)
    expected = (table_run, -table_order) if table_order > order else (context, order)
    assert (lookup.propose(), lookup.order) == expected


def test_greedy_identity_with_an_ngram_table(model):
    """Table drafts are verified like any other: output identical to autoregressive, and some got accepted."""
    ar = {tuple(p): run(model, p, "autoregressive", max_steps=24)[0] for p in PROMPTS}
    pairs = [(p, ar[tuple(p)]) for p in PROMPTS] + [([1], list(range(20, 40)))]
    draft = Draft(None, {}, {}, [], ngrams=NGramTable.build(pairs, 3, 1))  # a table and no adapters
    accepted = changed = 0
    for prompt in PROMPTS:
        for source in ("ngram", "both"):
            config = GenerationConfig(max_steps=24, generation_strategy="self_speculative",
                                      policy=PolicyConfig(exit_layer=2, num_speculations=2, draft_source=source))
            ids, _, stats = generate_ids(model, prompt, config, tokenizer=FakeTokenizer(), draft=draft)
            assert ids == ar[tuple(prompt)], (prompt, source)
            accepted += stats.accepted
            config.policy.ngram_table = False
            ids_off, _, off = generate_ids(model, prompt, config, tokenizer=FakeTokenizer(), draft=draft)
            assert ids_off == ids
            changed += off.drafted != stats.drafted
    assert accepted > 0 and changed > 0  # the table did draft where the context had no match


def test_tree_merges_shared_prefixes_and_lays_out_paths():
    tree = TokenTree.chain(10, [11, 12, 13])
    nodes = tree.add_path(0, [11, 12, 20, 21], NGRAM)
    assert nodes == [1, 2, 4, 5] and len(tree) == 6
    assert tree.sources == ["root", SELF, SELF, SELF, NGRAM, NGRAM]
    assert tree.add_path(0, [30], NGRAM) == [6]
    assert [tree.depth(n) for n in range(len(tree))] == [0, 1, 2, 3, 3, 4, 1]
    paths = tree.attention_paths(100).tolist()
    assert paths[5] == [100, 101, 102, 104, 105] and paths[6] == [100, 106, -1, -1, -1]
    assert tree.positions(100) == [100, 101, 102, 103, 103, 104, 101]
    assert not tree.is_chain() and TokenTree.chain(1, [2, 3]).is_chain()
    logits = torch.full((len(tree), 50), -1.0)
    for node, target in enumerate([11, 12, 20, 0, 21, 7, 0]):
        logits[node, target] = 1.0
    assert accept_tree_greedy(tree, logits) == ([0, 1, 2, 4, 5], 7)


def random_tree(seed: int, vocab: int) -> TokenTree:
    g = torch.Generator().manual_seed(seed)
    tree = TokenTree.chain(int(torch.randint(vocab, (1,), generator=g)),
                           torch.randint(vocab, (3,), generator=g).tolist())
    for _ in range(3):
        below = int(torch.randint(len(tree), (1,), generator=g))
        tree.add_path(below, torch.randint(vocab, (2,), generator=g).tolist(), NGRAM)
    return tree


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_attention_equals_each_path_run_alone(seed):
    model = predictable_model(seed=seed)
    prompt = [5, 6, 7, 8, 9, 10]
    tree = random_tree(seed, model.args.vocab_size)
    start = len(prompt)
    cache = model.new_cache(64)
    model(torch.tensor(prompt), 0, cache)
    logits = model(torch.tensor(tree.tokens), start, cache) if tree.is_chain() else model.logits(
        model.forward_layers(model.embed(torch.tensor(tree.tokens)), start, cache, 0, model.n_layers, None,
                             tree_mask(tree, start)))
    for node in range(len(tree)):
        path = [tree.tokens[n] for n in tree.path(node)]
        alone = model(torch.tensor(prompt + path), 0, model.new_cache(64))[-1]
        torch.testing.assert_close(logits[node], alone, atol=1e-4, rtol=1e-4)


def test_kv_after_acceptance_equals_plain_decoding_of_the_path():
    model = predictable_model(seed=3)
    prompt, start = [5, 6, 7, 8, 9, 10], 6
    tree = random_tree(7, model.args.vocab_size)
    cache = model.new_cache(64)
    model(torch.tensor(prompt), 0, cache)
    model.forward_layers(model.embed(torch.tensor(tree.tokens)), start, cache, 0, model.n_layers, None,
                         tree_mask(tree, start))
    path = max((tree.path(n) for n in range(len(tree))), key=len)
    assert path != list(range(len(path))), "the longest path should leave the chain: copies are exercised"
    cache.keep(start, [start + n for n in path])
    plain = model.new_cache(64)
    model(torch.tensor(prompt + [tree.tokens[n] for n in path]), 0, plain)
    end = start + len(path)
    assert cache.lengths == [end] * model.n_layers == plain.lengths
    torch.testing.assert_close(cache.k[:, :, :end], plain.k[:, :, :end], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v[:, :, :end], plain.v[:, :, :end], atol=1e-5, rtol=1e-5)


def run(model, prompt, strategy="autoregressive", max_steps=30, **policy):
    config = GenerationConfig(max_steps=max_steps, generation_strategy=strategy, policy=PolicyConfig(**policy))
    ids, _, stats = generate_ids(model, prompt, config, tokenizer=FakeTokenizer())
    return ids, stats


@pytest.fixture(scope="module", params=[0, 1])
def model(request):
    return predictable_model(seed=request.param)


def test_greedy_identity_with_ngram_and_trees(model):
    accepted = Counter()
    for prompt in PROMPTS:
        ar, _ = run(model, prompt)
        for source in ("ngram", "both"):
            for E in range(1, model.n_layers, 2):
                for k, n in ((1, 4), (3, 2), (2, 6)):
                    ss, stats = run(model, prompt, "self_speculative", exit_layer=E, num_speculations=k,
                                    draft_source=source, ngram_tokens=n)
                    assert ss == ar, (prompt, source, E, k, n)
                    assert stats.accepted <= stats.drafted
                    accepted.update(stats.accepted_from)
    assert accepted[NGRAM] > 0 and accepted[SELF] > 0, accepted


def test_greedy_identity_with_draft_siblings(model):
    """The draft head's ranks 2..W as siblings of the chain: every E, several shapes and budgets, n-grams on and off,
    static and adaptive; the siblings are verified, sometimes accepted, and counted by rank."""
    accepted, by_rank = Counter(), Counter()
    for prompt in PROMPTS:
        ar, _ = run(model, prompt)
        for source in ("self", "both"):
            for E in range(1, model.n_layers, 2):
                for k, width, budget in ((1, 3, None), (3, 2, None), (2, 4, 5), (3, 3, 2)):
                    for mode in ("none", "adaptive"):
                        ss, stats = run(model, prompt, "self_speculative", exit_layer=E, num_speculations=k,
                                        draft_source=source, tree_width=width, tree_budget=budget,
                                        dynamic_early_exit_mode=mode)
                        assert ss == ar, (prompt, source, E, k, width, budget, mode)
                        if budget is not None:
                            assert max(stats.draft_lengths) <= budget
                        accepted.update(stats.accepted_from)
                        by_rank.update(stats.rank_accepted)
                        assert sum(stats.rank_accepted.values()) == stats.self_accepted + stats.sibling_accepted
    assert accepted[SIBLING] > 0 and accepted[SELF] > 0 and by_rank[2] > 0, (accepted, by_rank)


def test_siblings_are_ranked_by_draft_path_probability():
    from skiplayer.policies.base import DraftStep
    steps = [DraftStep(7, 2, confidence=0.5, alternatives=[(8, 0.3), (9, 0.1)]),
             DraftStep(4, 2, confidence=0.9, alternatives=[(5, 0.05)])]
    ranked = rank_siblings(steps)
    assert [(c.step, c.rank, c.token) for c in ranked] == [(0, 2, 8), (0, 3, 9), (1, 2, 5)]
    assert ranked[2].score == pytest.approx(0.5 * 0.05)


def test_greedy_identity_trees_with_dynamic_modes(model):
    prompt = PROMPTS[0]
    ar, _ = run(model, prompt)
    for mode in ("adaptive", "logits_current", "consistent_tokens"):
        ss, _ = run(model, prompt, "self_speculative", exit_layer=4, num_speculations=3, draft_source="both",
                    dynamic_early_exit_mode=mode, min_exit_layer=1, confidence_threshold=0.5)
        assert ss == ar, mode
    ss, _ = run(model, prompt, "self_speculative", exit_layer=4, num_speculations=3, draft_source="both",
                layer_skip_proportion=0.5)
    assert ss == ar


def sampled_outcomes(draws: int, rule=accept_tree_sampling) -> tuple[Counter, dict]:
    """First two tokens emitted by one tree round (+ one plain draw when the round emits one), over `draws` trials,
    against their exact distribution. The tree: a sampled self-draft child of the root (its own child sampled too)
    beside two deterministic n-gram children, each with a deterministic child of its own."""
    V = 6
    g = torch.Generator().manual_seed(0)
    target = {(): torch.softmax(torch.randn(V, generator=g) * 1.5, -1)}
    for a in range(V):
        target[(a,)] = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    q_root, q_child = torch.softmax(torch.randn(V, generator=g), -1), torch.softmax(torch.randn(V, generator=g), -1)
    exact = {(a, b): float(target[()][a] * target[(a,)][b]) for a in range(V) for b in range(V)}
    counts, rng = Counter(), torch.Generator().manual_seed(1)
    for _ in range(draws):
        x = int(torch.multinomial(q_root, 1, generator=rng))
        y = int(torch.multinomial(q_child, 1, generator=rng))
        tree = TokenTree.chain(0, [x, y], [q_root, q_child])
        tree.add_path(0, [1, 2], NGRAM)
        tree.add_path(0, [3, 4], NGRAM)
        probs = torch.stack([target[tuple(tree.tokens[n] for n in tree.path(node)[1:])[:1]]
                             for node in range(len(tree))])
        path, nxt = rule(tree, probs, rng)
        out = [tree.tokens[n] for n in path[1:]] + [nxt]
        if len(out) == 1:
            out.append(int(torch.multinomial(target[(out[0],)], 1, generator=rng)))
        counts[tuple(out[:2])] += 1
    return counts, exact


def test_tree_sampling_keeps_the_target_distribution():
    counts, exact = sampled_outcomes(20000)
    assert chi_square_pvalue(counts, exact, 20000) > 1e-3


def test_tree_sampling_test_catches_a_broken_rule():
    # Forget the residual update after a rejection: rejected candidates stay likely, so the test must fail.
    def broken(tree, target_probs, generator):
        path = [0]
        while True:
            p = target_probs[path[-1]]
            for c in tree.children(path[-1]):
                x, q = tree.tokens[c], tree.probs[c]
                if float(torch.rand((), generator=generator)) * (1.0 if q is None else float(q[x])) < float(p[x]):
                    path.append(c)
                    break
            else:
                return path, int(torch.multinomial(p, 1, generator=generator))

    counts, exact = sampled_outcomes(20000, broken)
    assert chi_square_pvalue(counts, exact, 20000) < 1e-6


@pytest.mark.parametrize("source, width", [("ngram", 1), ("both", 1), ("both", 3)])
def test_sampling_with_trees_matches_autoregressive(source, width):
    model = predictable_model(seed=2, n_layers=4, vocab_size=8, deep_scale=0.5)
    prompt = [1, 2, 3, 1, 2]
    sampling = SamplingConfig(True, 1.0)
    exact = exact_sequence_distribution(model, prompt, 3, lambda logits: probabilities(logits, sampling))
    draws, counts = 3000, Counter()
    for seed in range(draws):
        config = GenerationConfig(max_steps=3, generation_strategy="self_speculative", sampling=sampling, seed=seed,
                                  policy=PolicyConfig(exit_layer=1 + seed % 3, num_speculations=1 + seed % 2,
                                                      draft_source=source, ngram_tokens=2, tree_width=width))
        ids, _, _ = generate_ids(model, prompt, config)
        counts[tuple(ids)] += 1
    assert chi_square_pvalue(counts, exact, draws) > 1e-3


def test_bad_tree_flags_are_user_errors(model):
    for bad, match in (({"draft_source": "tree"}, "--draft_source"), ({"ngram_tokens": 0}, "--ngram_tokens"),
                       ({"ngram_max": 0}, "--ngram_max"), ({"tree_width": 0}, "--tree_width"),
                       ({"tree_budget": 0}, "--tree_budget"),
                       ({"tree_width": 2, "draft_source": "ngram"}, "--tree_width 2 ranks the self-draft")):
        with pytest.raises(UserError, match=match):
            run(model, [1, 2], "self_speculative", exit_layer=2, **bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [8, 64])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 3)])
def test_native_tree_attention_is_bit_identical_to_decoding_each_path(dtype, head_dim, heads, kv_heads):
    """head_dim 64: the AVX-512 decoding attention where the CPU has it (8: the one-row loops everywhere); 3 KV heads
    on 2 threads: the tree's nodes in two parts per KV head."""
    from skiplayer.model.optimize import native_kernels_available, optimize_model
    from tests.conftest import tiny_hf_model
    if not native_kernels_available():
        pytest.skip("native CPU kernels cannot be built here")
    hf = tiny_hf_model("llama", seed=4, n_layers=4, hidden_size=heads * head_dim, n_heads=heads, n_kv_heads=kv_heads)
    model = optimize_model(Transformer.from_hf(hf, dtype=dtype), kernels="native")
    prompt, start = [5, 6, 7, 8, 9, 10, 11], 7
    for seed in range(3):
        tree = random_tree(seed, model.args.vocab_size)
        with torch.inference_mode():
            cache = model.new_cache(64)
            model(torch.tensor(prompt), 0, cache)
            logits = model.logits(model.forward_layers(model.embed(torch.tensor(tree.tokens)), start, cache, 0,
                                                       model.n_layers, None, tree_mask(tree, start)))
            for node in range(len(tree)):
                plain = model.new_cache(64)
                model(torch.tensor(prompt), 0, plain)
                path = [tree.tokens[n] for n in tree.path(node)]
                for i, token in enumerate(path):  # one token per step, as autoregressive decoding runs
                    step = model(torch.tensor([token]), start + i, plain)[-1]
                assert torch.equal(logits[node], step), (dtype, seed, node)


def test_adaptive_sizes_the_ngram_run_from_learned_acceptance_and_cost():
    from skiplayer.policies.adaptive import Adaptive, CostModel
    from skiplayer.policies.base import RoundResult
    costs = CostModel.nominal(8, max_n=12, slope=0.15)
    good, bad = Adaptive(PolicyConfig(exit_layer=4), 8, costs), Adaptive(PolicyConfig(exit_layer=4), 8, costs)
    for _ in range(30):  # order-3 runs: right all the way; order-1 runs: wrong at once
        good.update(RoundResult([], 0, [9], 0.0, [1, 2, 3, 4], 3, [1, 2, 3, 4, 9], 5))
        bad.update(RoundResult([], 0, [9], 0.0, [1, 2, 3, 4], 1, [7], 5))
    assert good.ngram_tokens(0, 3, 4) == 4
    assert bad.ngram_tokens(0, 1, 4) == 0
    assert good.ngram_tokens(0, 1, 4) in (1, 2, 3, 4)  # an unseen order keeps the prior's guess
    assert good.ngram_posterior[(3, 4)][0] > 30 and bad.ngram_posterior[(1, 1)][1] > 30


def test_adaptive_drops_self_drafts_beside_a_reliable_ngram_run():
    from skiplayer.policies.adaptive import Adaptive, CostModel
    from skiplayer.policies.base import RoundResult
    def trained(acceptance: float) -> Adaptive:
        costs = CostModel(30, 0.03, 0.02, [0.0] + [1 + 0.05 * (n - 1) for n in range(1, 13)])  # cheap draft, v(n)
        policy = Adaptive(PolicyConfig(exit_layer=4, num_speculations=2), 30, costs, calibrated={4: acceptance})
        for _ in range(30):
            policy.update(RoundResult([], 0, [9], 0.0, [1, 2, 3, 4], 3, [1, 2, 3, 4, 9], 5))
        policy.k = 2
        return policy
    good, fair = trained(0.9), trained(0.6)
    assert good.drafts_beside(3, 4) == 0            # the run alone: more tokens per unit cost than run + drafts
    assert good.drafts_beside(1, 4) >= 1            # an unseen order keeps the prior: a good draft still helps
    assert good.ngram_tokens(0, 3, 4) == 4
    # a draft predicted to add ~1% beside the run is not drafted: drafting must promise AR_MARGIN
    assert fair.tree_plan(1, 1, 4)[1] > fair.tree_plan(0, 1, 4)[1] and fair.drafts_beside(1, 4) == 0


def test_adaptive_adds_the_siblings_its_learned_rank_acceptance_pays_for():
    from skiplayer.policies.adaptive import Adaptive, CostModel
    from skiplayer.policies.base import DraftStep, RoundResult
    costs = CostModel(30, 0.03, 0.02, [0.0] + [1 + 0.03 * (n - 1) for n in range(1, 13)])
    steps = [DraftStep(7, 4, confidence=0.95, alternatives=[(8, 0.03), (9, 0.01)])]
    policies = {}
    for name, right in (("good", True), ("bad", False)):
        policy = Adaptive(PolicyConfig(exit_layer=4, num_speculations=1, tree_width=3), 30, costs,
                          calibrated={4: 0.5})
        for _ in range(40):  # the chain's draft rejected; the rank-2 sibling was (or was never) the target
            policy.update(RoundResult(steps, 0, [8 if right else 3], 0.0, output=[8 if right else 3], nodes=4,
                                      siblings=[(0, 2, 8), (0, 3, 9)]))
        policy.round_length()
        policies[name] = policy.siblings(rank_siblings(steps), steps, 2)
    assert policies["good"] >= 1 and policies["bad"] == 0, policies
