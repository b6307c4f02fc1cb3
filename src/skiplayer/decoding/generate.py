"""Top-level generation: autoregressive or self-speculative, greedy or sampling, with stopping and stats."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from skiplayer.decoding.costs import profile_costs
from skiplayer.decoding.draft import DraftHead
from skiplayer.decoding.sampling import SamplingConfig, greedy_token, probabilities, sample
from skiplayer.decoding.self_speculative import RoundState, speculative_round
from skiplayer.drafts.ngram import NGramLookup
from skiplayer.decoding.stats import Clock, GenerationStats
from skiplayer.decoding.stopping import StopCriteria
from skiplayer.errors import check
from skiplayer.model.cuda_graphs import block_runner, decode_step
from skiplayer.model.llama import Transformer
from skiplayer.policies import PolicyConfig, build_policy, unset_policy_defaults

STRATEGIES = ("autoregressive", "self_speculative")


@dataclass
class GenerationConfig:
    max_steps: int = 128
    generation_strategy: str = "autoregressive"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    seed: int = 0
    stop_words: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)

    def set(self, **fields) -> "GenerationConfig":
        """Set fields of this config, its SamplingConfig or its PolicyConfig by name (in that order)."""
        for key, value in fields.items():
            for target in (self, self.sampling, self.policy):
                if hasattr(target, key):
                    setattr(target, key, value)
                    break
            else:
                raise TypeError(f"unknown generation option '{key}'")
        return self

    def validate(self, n_layers: int) -> "GenerationConfig":
        check(self.generation_strategy in STRATEGIES,
              f"unknown --generation_strategy '{self.generation_strategy}': use one of {', '.join(STRATEGIES)}")
        check(self.max_steps >= 1, f"--max_steps must be >= 1 (got {self.max_steps})")
        self.sampling.validate()
        if self.generation_strategy == "self_speculative":
            self.policy.validate(n_layers)
        return self


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str | None
    stats: GenerationStats

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "stats": self.stats.to_dict()}


def _select(logits: torch.Tensor, sampling: SamplingConfig, generator) -> int:
    return sample(probabilities(logits, sampling), generator) if sampling.sample else greedy_token(logits)


def positions_needed(model: Transformer, n_prompt: int, max_steps: int, extra: int) -> int:
    """Cache positions for a prompt, up to max_steps new tokens and `extra` more (drafts beyond the budget, the
    pending token); a one-line error when the prompt is empty or they exceed the model's positions."""
    check(n_prompt > 0, "empty prompt: pass some text with --prompt")
    total = n_prompt + max_steps + extra
    check(total <= model.max_seq_len, f"prompt ({n_prompt} tokens) + --max_steps {max_steps} exceeds the model's "
          f"{model.max_seq_len} positions: shorten the prompt or lower --max_steps")
    return total


@torch.inference_mode()
def generate_ids(model: Transformer, prompt_ids: list[int], config: GenerationConfig, eos_token_ids=(),
                 tokenizer=None, on_tokens: Callable[[list[int]], None] | None = None,
                 draft=None, policy=None) -> tuple[list[int], StopCriteria, GenerationStats]:
    """Generate from token ids. Both strategies prefill the whole prompt the same way, then either decode one token
    per full pass or run speculative rounds; `on_tokens` receives tokens as they are accepted. `draft` is a
    calibrated draft (`skiplayer calibrate`): adapters per exit layer, a reduced vocabulary, measured acceptance."""
    config.validate(model.n_layers)
    speculative = config.generation_strategy == "self_speculative"
    p = config.policy
    nodes = p.max_nodes if speculative else 0
    total = positions_needed(model, len(prompt_ids), config.max_steps, nodes + 1)
    stop_ids = set(eos_token_ids) | set(config.stop_token_ids)
    stop = StopCriteria(config.max_steps, stop_ids, config.stop_words, tokenizer)
    stats = GenerationStats(strategy=config.generation_strategy, prompt_tokens=len(prompt_ids))
    device = model.tok_embeddings.weight.device
    clock = Clock(stats, cuda=device.type == "cuda")
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    emit = on_tokens or (lambda tokens: None)

    if speculative:  # set up outside the timed region (the adaptive policy's cost profile is measured once)
        # n-gram drafts alone never run the draft head: its attention adapters' K/V need not be kept up to date
        head = DraftHead(model, *((draft.vocab_ids, draft.adapters) if draft and p.self_draft else ()))
        if policy is None:
            costs = None
            if config.policy.dynamic_early_exit_mode == "adaptive":
                costs = profile_costs(model, nodes + 1, head.weight, head_packed=head.packed)
            policy = build_policy(config.policy, model.n_layers, costs, draft.acceptance if draft else None)

    t0 = clock.now()
    if speculative:  # on CUDA, n-gram rounds' verification blocks replay CUDA graphs (model/cuda_graphs.py)
        blocks, cache = block_runner(model, total, head.extra_layers)
    else:  # one token per step: on CUDA a replayed CUDA graph (model/cuda_graphs.py), else model.forward
        step, cache = decode_step(model, total)
    taps = head.taps(0, cache) if speculative else None  # attention adapters read the prompt's states
    h = model.prefill(torch.tensor(prompt_ids, device=device), cache, taps)
    logits = model.logits(h[-1:])[-1]
    token, pos = _select(logits, config.sampling, generator), len(prompt_ids)
    stats.prefill_time = clock.now() - t0
    emit(stop.extend([token]))
    if speculative:
        table = getattr(draft, "ngrams", None) if p.ngram_table else None
        ngram = NGramLookup(p.ngram_max, 1, p.ngram_tokens, table) if p.ngram else None
        if ngram:
            ngram.extend(prompt_ids + [token])
        state = RoundState(model, cache, head, policy, config.sampling, generator, clock, stop_ids, ngram,
                           p.self_draft, p.tree_width, p.tree_budget, blocks)
    while not stop.done:
        if speculative:
            room = config.max_steps - len(stop.tokens) - 1  # tokens a round may accept besides its verified one
            budget = min(policy.round_length(), room) if p.self_draft else 0
            new = speculative_round(state, token, pos, budget, room)
        else:
            logits = step(token, pos)
            new = [_select(logits, config.sampling, generator)]
        pos += len(new)
        token = new[-1]
        emit(stop.extend(new))
    stats.wall_time = clock.now() - t0
    stats.new_tokens = len(stop.tokens)
    if not speculative:
        stats.rounds = stats.new_tokens
    return stop.tokens, stop, stats


def generate(loaded, prompt, config: GenerationConfig | None = None, chat_template: bool = True,
             on_text: Callable[[str], None] | None = None, draft=None, **overrides) -> GenerationResult:
    """Generate text for a prompt (string or chat messages) with a `LoadedModel` from `skiplayer.load_model`.

    `overrides` set GenerationConfig fields (max_steps, generation_strategy, seed, stop_words, ...), SamplingConfig
    fields (sample, temperature, top_k, top_p) or PolicyConfig fields (exit_layer, num_speculations,
    dynamic_early_exit_mode, ...). Without `config` and with none of exit_layer, num_speculations, draft_source,
    dynamic_early_exit_mode given, self-speculation drafts as the CLI does with those flags unset (BEST_POLICY); with
    a `draft` and no exit_layer, at the draft's exit layer (as the CLI). `on_text` receives the decoded text as it
    grows (for streaming)."""
    if config is None:
        config = GenerationConfig().set(**unset_policy_defaults(overrides))
        if draft is not None and "exit_layer" not in overrides:  # as the CLI: the draft's exit layer unless given
            config.set(exit_layer=draft.exit_layers[0])
    config = config.set(**overrides)
    prompt_ids = loaded.encode(prompt, chat_template=chat_template)
    stream = _TextStream(loaded, on_text, config.stop_words) if on_text else None
    ids, stop, stats = generate_ids(loaded.model, prompt_ids, config, loaded.eos_token_ids, loaded.tokenizer,
                                    on_tokens=stream, draft=draft)
    text = stop.cut_text(loaded.decode(ids))
    if stream:
        stream.finish(text)
    return GenerationResult(ids, text, stats)


class _TextStream:
    """Turns accepted token ids into text deltas. Decoding the whole output keeps multi-byte characters intact;
    the last few characters wait until they cannot start a stop word, so a stop word is never printed."""

    def __init__(self, loaded, on_text, stop_words):
        self.loaded, self.on_text, self.ids, self.sent = loaded, on_text, [], ""
        self.hold = max((len(w) for w in stop_words), default=1) - 1

    def __call__(self, tokens):
        self.ids.extend(tokens)
        text = self.loaded.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self._send(text[:len(text) - self.hold] if self.hold else text)

    def _send(self, text):
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text

    def finish(self, final_text):
        self._send(final_text)
