"""Draft policies: lossless in every mode and with layer skipping; each policy's own rule; bad parameters."""
from collections import Counter

import random

import pytest

from skiplayer.decoding.generate import GenerationConfig, generate_ids
from skiplayer.decoding.sampling import SamplingConfig, probabilities
from skiplayer.errors import UserError
from skiplayer.policies import MODES, CostModel, PolicyConfig, build_policy
from skiplayer.policies.adaptive import Adaptive
from skiplayer.policies.base import DraftStep, RoundResult
from tests.helpers import chi_square_pvalue, exact_sequence_distribution, predictable_model

LENIENT = dict(consistent_tokens_count=2, confidence_threshold=0.5, min_exit_layer=1)


@pytest.fixture(scope="module")
def model():
    return predictable_model(seed=4, n_layers=7)


def ss_config(mode, p, E, k, seed=0, max_steps=24, **kw):
    return GenerationConfig(max_steps=max_steps, generation_strategy="self_speculative", seed=seed,
                            policy=PolicyConfig(exit_layer=E, num_speculations=k, dynamic_early_exit_mode=mode,
                                                layer_skip_proportion=p, seed=seed, **(LENIENT | kw)))


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_identity_every_mode_and_skip_proportion(model, mode):
    for prompt in ([1, 5, 7, 9], [30, 31]):
        ar, _, _ = generate_ids(model, prompt, GenerationConfig(max_steps=24))
        for p in (0.0, 0.25, 0.5):
            for E, k in ((2, 3), (4, 4), (6, 2)):
                for seed in (0, 1):
                    ss, _, stats = generate_ids(model, prompt, ss_config(mode, p, E, k, seed))
                    assert ss == ar, (mode, p, E, k, seed)
                    assert all(1 <= d <= E for d in stats.exit_layers)
                    if p == 0:
                        assert not any(stats.skipped_layers)
                    assert all(0 not in s for s in stats.skipped_layers)


def test_probe_heads_only_for_modes_that_need_them(model):
    for mode, needs in (("none", False), ("random", False), ("adaptive", False), ("consistent_tokens", True),
                        ("logits_current", True), ("logits_future", True)):
        _, _, stats = generate_ids(model, [1, 2, 3], ss_config(mode, 0.0, 5, 3))
        assert (stats.probe_heads > 0) == needs, mode


@pytest.mark.parametrize("mode,p", [("random", 0.25), ("adaptive", 0.0)])
def test_sampling_distribution_random_skip_and_adaptive(mode, p):
    model = predictable_model(seed=5, n_layers=4, vocab_size=8, deep_scale=0.5)
    sampling = SamplingConfig(True, 1.0)
    exact = exact_sequence_distribution(model, [1, 2], 3, lambda logits: probabilities(logits, sampling))
    draws, counts = 2500, Counter()
    for seed in range(draws):
        config = ss_config(mode, p, 3, 2, seed=seed, max_steps=3)
        config.sampling = sampling
        counts[tuple(generate_ids(model, [1, 2], config)[0])] += 1
    assert chi_square_pvalue(counts, exact, draws) > 1e-3


def policy(mode, **kw):
    return build_policy(PolicyConfig(exit_layer=kw.pop("exit_layer", 8), num_speculations=4,
                                     dynamic_early_exit_mode=mode, **kw), n_layers=12)


def test_consistent_tokens_exits_when_streak_reaches_count():
    pol = policy("consistent_tokens", consistent_tokens_count=3, min_exit_layer=2)
    plan = pol.plan(0)
    assert plan.probe_layers == frozenset(range(2, 8))
    answers = [pol.exit_here(0, d, tok, 0.1) for d, tok in zip(range(2, 8), [5, 6, 6, 9, 9, 9])]
    assert answers == [False, False, False, False, False, True]
    pol.plan(1)  # a new token starts a new streak
    assert [pol.exit_here(1, d, 4, 0.1) for d in (2, 3, 4)] == [False, False, True]


def test_logits_current_exits_at_first_confident_layer_and_stops_round():
    pol = policy("logits_current", confidence_threshold=0.8, stop_threshold=0.3)
    assert [pol.exit_here(0, d, 1, c) for d, c in ((1, 0.2), (2, 0.79), (3, 0.8))] == [False, False, True]
    assert pol.keep_drafting(DraftStep(1, 3, confidence=0.5))
    assert not pol.keep_drafting(DraftStep(1, 3, confidence=0.2))


def test_random_exit_is_seeded_and_within_range():
    pa, pb = policy("random", seed=3), policy("random", seed=3)
    a = [pa.plan(i).exit_layer for i in range(50)]
    b = [pb.plan(i).exit_layer for i in range(50)]
    assert a == b and min(a) >= 2 and max(a) <= 6  # quartiles of 1..8
    assert set(a) == set(range(2, 7))


def test_logits_future_moves_toward_matching_layers():
    pol = policy("logits_future", min_exit_layer=1, future_ema=0.5)
    assert pol.current_exit == 8
    for _ in range(6):  # verified tokens were already predicted correctly at depth 2
        steps = [DraftStep(7, pol.current_exit, probe_tokens={1: 3, 2: 7, 3: 7}) for _ in range(3)]
        pol.update(RoundResult(steps, 3, [7, 7, 7, 7]))
    assert pol.current_exit == 2
    for _ in range(6):  # nothing matches any more: back toward E
        steps = [DraftStep(5, pol.current_exit, probe_tokens={1: 3}) for _ in range(2)]
        pol.update(RoundResult(steps, 0, [9]))
    assert pol.current_exit == 8


def test_layer_skipping_wraps_any_mode():
    pol = policy("consistent_tokens", layer_skip_proportion=0.5, seed=1)
    plans = [pol.plan(i) for i in range(40)]
    skipped = Counter(l for p in plans for l in p.skip_layers)
    assert 0 not in skipped and set(skipped) <= set(range(1, 8)) and len(skipped) == 7
    assert all(p.probe_layers for p in plans)


def adaptive(alpha_successes: int, alpha_failures: int) -> Adaptive:
    costs = CostModel.nominal(12, max_n=5, head=0.2, slope=0.1)  # injected costs
    pol = Adaptive(PolicyConfig(exit_layer=8, num_speculations=4, dynamic_early_exit_mode="adaptive"), 12, costs)
    for e in pol.posterior:
        pol.posterior[e] = [1.0 + alpha_successes, 1.0 + alpha_failures]
    return pol


def test_adaptive_drafts_nothing_when_acceptance_is_near_zero():
    pol = adaptive(0, 500)
    assert pol.best_setting({e: 0.01 for e in pol.candidates})[1] == 0
    lengths = [pol.round_length() for _ in range(40)]
    assert lengths.count(0) >= 30  # mostly autoregressive, with occasional one-token probes
    assert max(lengths) <= 1


def test_adaptive_probes_less_often_when_rare_acceptances_do_not_pay():
    """Acceptance 0.25 never pays with these costs: an acceptance now and then must not bring back frequent probing
    (the back-off resets only when the posterior means say drafting pays)."""
    probes = 0
    for seed in (2, 3, 4):
        pol, rng, lengths = adaptive(0, 0), random.Random(seed), []
        for _ in range(600):
            k = pol.round_length()
            lengths.append(k)
            if k:
                steps = [DraftStep(5, pol.exit, confidence=0.5) for _ in range(k)]
                accepted = next((i for i in range(k) if rng.random() >= 0.25), k)
                pol.update(RoundResult(steps[:accepted + 1], accepted, [9] * (accepted + 1)))
        assert pol.best_setting({e: 0.25 for e in pol.candidates})[1] == 0
        probes += sum(1 for k in lengths[-300:] if k)
    assert probes <= 24  # 40 when every acceptance reset the back-off


def test_adaptive_grows_k_with_acceptance():
    pol = adaptive(0, 0)
    ks = [pol.best_setting({e: a for e in pol.candidates})[1] for a in (0.05, 0.5, 0.8, 0.97)]
    assert ks[0] == 0 and ks == sorted(ks) and ks[-1] == 4
    high = adaptive(500, 5)
    assert all(high.round_length() >= 3 for _ in range(10))


def test_adaptive_prefers_cheap_layers_when_equally_good():
    pol = adaptive(0, 0)
    e, k, _ = pol.best_setting({e: 0.8 for e in pol.candidates})
    assert e == min(pol.candidates) and k > 0


def test_adaptive_learns_what_drafts_cost_inside_decoding():
    """Drafts that take twice their profiled time (weights evicted between rounds) must stop being chosen where
    they only paid at the profiled cost."""
    pol = adaptive(0, 0)
    pol.costs.step_seconds = 0.01
    alphas = {e: 0.7 for e in pol.candidates}
    assert pol.best_setting(alphas)[1] > 0
    e = pol.exit
    for _ in range(60):  # one draft at exit e per round, measured at twice the profile's prediction
        profiled = (e * pol.costs.layer + pol.costs.head) * pol.costs.step_seconds
        pol.update(RoundResult([DraftStep(5, e, confidence=0.5)], 0, [9], draft_seconds=2 * profiled))
    assert 1.9 < pol.costs.draft_scale < 2.01
    assert pol.best_setting(alphas)[1] == 0


def test_adaptive_keeps_its_plan_when_passes_run_slower_than_the_profile():
    """At a long context every pass, plain steps included, runs slower than the start-up profile at 64 tokens; v(n)
    must keep its profiled shape (learning it in units of the profiled step made every pass look dearer than plain
    decoding, and n-gram runs shrink below what pays)."""
    fresh, slow = adaptive(0, 0), adaptive(0, 0)
    for pol in (fresh, slow):
        pol.costs.step_seconds = 0.01
        pol.ngram_posterior[(2, 1)] = [30.0, 10.0]
        pol.ngram_posterior[(2, 2)] = [20.0, 10.0]
    e, c = slow.exit, slow.costs
    for _ in range(80):  # a round of 2 drafts at their profiled cost, its pass over 3 positions and a plain step: 1.4x
        drafts = 2 * (e * c.layer + c.head) * c.step_seconds
        slow.update(RoundResult([DraftStep(5, e, confidence=0.5), DraftStep(6, e, confidence=0.5)], 1, [5, 6],
                                verify_seconds=1.4 * c.verify_from(e, 3) * c.step_seconds, draft_seconds=drafts))
        slow.update(RoundResult([], 0, [9], verify_seconds=1.4 * c.verify[1] * c.step_seconds))
    assert slow.costs.verify == fresh.costs.verify and abs(slow.costs.draft_scale - 1) < 1e-6
    assert slow.ngram_tokens(0, 2, 2) == fresh.ngram_tokens(0, 2, 2) == 2
    alphas = {x: 0.6 for x in slow.candidates}
    assert slow.best_setting(alphas)[:2] == fresh.best_setting(alphas)[:2]


def test_adaptive_verifies_less_at_a_long_context_where_passes_cost_more():
    """v(n) profiled at 64 and at 576 tokens: the policy plans with the profile nearest its current context."""
    pol = adaptive(0, 0)
    pol.costs.verify = [0.0] + [1 + 0.05 * (n - 1) for n in range(1, 6)]
    pol.costs.verify_long, pol.costs.long_context = [0.0] + [1 + 0.6 * (n - 1) for n in range(1, 6)], 576
    pol.ngram_posterior[(2, 1)], pol.ngram_posterior[(2, 2)] = [30.0, 20.0], [20.0, 20.0]
    plans = []
    for context in (64, 320, 576, 2000):
        pol.update(RoundResult([], 0, [9], context=context))
        plans.append(pol.ngram_tokens(0, 2, 2))
    assert pol.costs.context == 2000 and abs(pol.costs.verify_at(2) - (1 + 0.05 + 1.5 * 0.55)) < 1e-9
    assert plans[0] == 2 and plans[-1] == 0 and plans == sorted(plans, reverse=True)


def test_profile_times_verification_at_two_contexts():
    from skiplayer.decoding.costs import profile_costs
    from skiplayer.model.llama import Transformer
    from tests.conftest import tiny_hf_model
    model = Transformer.from_hf(tiny_hf_model("llama", seed=1))  # 256 positions: the long profile at 256 - 8 - 1
    costs = profile_costs(model, 4)  # passes up to 8 positions at least
    assert costs.long_context == 247 and len(costs.verify_long) == len(costs.verify) == 9
    assert costs.verify_long[1] == pytest.approx(1.0, rel=0.5) and all(v > 0 for v in costs.verify_long[1:])
    # Another draft head, fewer positions: the same v(n) (every configuration of a process plans with one profile),
    # the head timed on its own; more positions than profiled: measured again.
    head = model.head_weight[:16].contiguous()
    other = profile_costs(model, 6, head)
    assert other.verify == costs.verify and other.verify_long == costs.verify_long and other.head != costs.head
    assert len(profile_costs(model, 12).verify) == 13


@pytest.mark.parametrize("kw,flag", [
    (dict(confidence_threshold=0.0), "--confidence_threshold"), (dict(confidence_threshold=1.5), "--confidence_threshold"),
    (dict(layer_skip_proportion=-0.1), "--layer_skip_proportion"), (dict(layer_skip_proportion=1.1), "--layer_skip_proportion"),
    (dict(dynamic_early_exit_mode="random", random_exit_low=5, random_exit_high=3), "--random_exit_low"),
    (dict(dynamic_early_exit_mode="bogus"), "--dynamic_early_exit_mode"), (dict(stop_threshold=2.0), "--stop_threshold"),
    (dict(min_exit_layer=9), "--min_exit_layer"), (dict(consistent_tokens_count=0), "--consistent_tokens_count"),
])
def test_bad_parameters_are_one_line_errors(kw, flag):
    with pytest.raises(UserError, match=flag) as e:
        build_policy(PolicyConfig(**({"exit_layer": 8} | kw)), n_layers=12)
    assert "\n" not in str(e.value)
