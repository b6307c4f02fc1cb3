"""Statistics of one generation: counts, acceptance, timing split and per-token exit telemetry."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class GenerationStats:
    strategy: str = "autoregressive"
    prompt_tokens: int = 0
    new_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    wall_time: float = 0.0
    prefill_time: float = 0.0
    # Time split of the decode phase (seconds): draft layers, LM heads (draft exits and probes), verification.
    time_draft_layers: float = 0.0
    time_draft_heads: float = 0.0
    time_verify: float = 0.0
    probe_heads: int = 0  # intermediate predictions computed by policies (one LM head each)
    # Per drafted token / per round telemetry.
    exit_layers: list[int] = field(default_factory=list)
    skipped_layers: list[list[int]] = field(default_factory=list)
    exit_confidences: list[float] = field(default_factory=list)
    draft_lengths: list[int] = field(default_factory=list)
    accepted_per_round: list[int] = field(default_factory=list)
    verify_start_layers: list[int] = field(default_factory=list)
    accepted_flags: list[bool] = field(default_factory=list)  # per drafted token: was it accepted
    # Token trees: candidate nodes and accepted ones per source ("self": the self-draft chain, "ngram": lookup).
    # drafted / accepted / draft_lengths / accepted_per_round count tree nodes of every source.
    candidates: dict = field(default_factory=dict)
    accepted_from: dict = field(default_factory=dict)
    # Self-draft candidates by the draft head's rank (1: the chain's token, 2..: siblings), and the accepted ones.
    rank_candidates: dict = field(default_factory=dict)
    rank_accepted: dict = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.new_tokens / self.rounds if self.rounds else 0.0

    @property
    def self_candidates(self) -> int:
        return self.candidates.get("self", 0)

    @property
    def self_accepted(self) -> int:
        return self.accepted_from.get("self", 0)

    @property
    def ngram_candidates(self) -> int:
        return self.candidates.get("ngram", 0)

    @property
    def ngram_accepted(self) -> int:
        return self.accepted_from.get("ngram", 0)

    @property
    def table_candidates(self) -> int:
        return self.candidates.get("table", 0)

    @property
    def table_accepted(self) -> int:
        return self.accepted_from.get("table", 0)

    @property
    def sibling_candidates(self) -> int:
        return self.candidates.get("sibling", 0)

    @property
    def sibling_accepted(self) -> int:
        return self.accepted_from.get("sibling", 0)

    def acceptance_by_rank(self) -> dict[int, float]:
        """Share of the self-draft's rank-r candidates that were accepted."""
        return {r: self.rank_accepted.get(r, 0) / n for r, n in sorted(self.rank_candidates.items()) if n}

    @property
    def tokens_per_pass(self) -> float:
        """Tokens per verification pass: accepted candidates + the verified token (as bench/runner.derive)."""
        return 1 + self.accepted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_time if self.wall_time else 0.0

    @property
    def time_per_token(self) -> float:
        return self.wall_time / self.new_tokens if self.new_tokens else 0.0

    @property
    def time_overhead(self) -> float:
        decode = self.wall_time - self.prefill_time
        return max(0.0, decode - self.time_draft_layers - self.time_draft_heads - self.time_verify)

    def exit_layer_histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.exit_layers).items()))

    def acceptance_by_exit_layer(self) -> dict[int, float]:
        seen, ok = Counter(), Counter()
        for layer, flag in zip(self.exit_layers, self.accepted_flags):
            seen[layer] += 1
            ok[layer] += flag
        return {layer: ok[layer] / seen[layer] for layer in sorted(seen)}

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("acceptance_rate", "tokens_per_round", "tokens_per_pass", "tokens_per_second", "time_per_token",
                     "time_overhead"):
            d[name] = getattr(self, name)
        d["exit_layer_histogram"] = {str(k): v for k, v in self.exit_layer_histogram().items()}
        d["acceptance_by_exit_layer"] = {str(k): v for k, v in self.acceptance_by_exit_layer().items()}
        d["acceptance_by_rank"] = {str(k): v for k, v in self.acceptance_by_rank().items()}
        for name in ("rank_candidates", "rank_accepted"):
            d[name] = {str(k): v for k, v in d[name].items()}
        d["mean_exit_layer"] = sum(self.exit_layers) / len(self.exit_layers) if self.exit_layers else None
        return d

    def summary_line(self) -> str:
        s = (f"{self.new_tokens} tokens in {self.wall_time:.2f}s ({self.tokens_per_second:.1f} tok/s, "
             f"{1000 * self.time_per_token:.1f} ms/token)")
        if self.strategy != "autoregressive":
            s += (f" | drafted {self.drafted}, accepted {self.accepted} (acceptance rate {self.acceptance_rate:.2f}),"
                  f" {self.rounds} rounds, {self.tokens_per_round:.2f} tokens/round")
            if self.exit_layers:
                s += f", mean exit layer {sum(self.exit_layers) / len(self.exit_layers):.1f}"
        return s


def memory_mb(device: str = "cpu") -> dict:
    """Memory of this process: peak resident set size (Linux/macOS), the current one (Linux) and, on CUDA, the peak
    allocated GPU memory."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_rss_mb": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    try:  # Linux: the resident size now, after loading (the peak includes the load's transient copies)
        with open("/proc/self/status") as f:
            out["rss_mb"] = round(next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 2**10, 1)
    except (OSError, StopIteration, ValueError):
        pass
    if str(device).startswith("cuda"):
        import torch

        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


class Clock:
    """Accumulates wall time into a stats field; synchronises CUDA so GPU work is charged where it happens."""

    def __init__(self, stats: GenerationStats, cuda: bool = False):
        self.stats, self.cuda = stats, cuda

    def now(self) -> float:
        if self.cuda:
            import torch
            torch.cuda.synchronize()
        return time.perf_counter()

    def charge(self, name: str, since: float) -> float:
        t = self.now()
        setattr(self.stats, name, getattr(self.stats, name) + t - since)
        return t
