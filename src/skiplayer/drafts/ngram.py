"""N-gram drafting, no model work at all.

`NGramLookup` is prompt-lookup decoding: the tokens that followed the most recent earlier occurrence of the context's
last n tokens (longest n first), in prompt + output so far; summaries and code copy whole spans. An index from each
n-gram to the last position it ended at is kept up to date as tokens arrive, so a lookup costs O(max_ngram)
dictionary probes whatever the context length.

`NGramTable` is what the model tends to write anywhere (as llama.cpp's static lookup cache): for each n-gram of its
own calibration outputs, the token that most often followed. It drafts where the context has no match (or a shorter
one than the table's: one token of context names the next token far less often than three of the table): on gsm8k
prompts the context had none at 19% of output positions, and there a table from 200 other prompts' outputs named
the model's next token 55% of the time (teacher-forced, SmolLM2-135M; the self-draft's top-1 holds it about as
often, at the cost of E layers and the draft head).
"""
from __future__ import annotations

from collections import Counter, defaultdict

import torch


class NGramTable:
    """n-gram (n = 1..max_ngram) -> the token that most often followed it, kept when seen at least `min_count`
    times. `run(context, k)` chains lookups (longest suffix first) into up to k tokens."""

    def __init__(self, next_token: dict[tuple, int], max_ngram: int):
        self.next_token, self.max_ngram = next_token, max_ngram

    @classmethod
    def build(cls, pairs: list[tuple[list[int], list[int]]], max_ngram: int = 3, min_count: int = 2) -> "NGramTable":
        """From (prompt, output) token lists: the n-grams before every output token (the last prompt tokens
        included, so the first token of an answer is in the table too)."""
        counts: dict[tuple, Counter] = defaultdict(Counter)
        for prompt, output in pairs:
            seq = list(prompt[-max_ngram:]) + list(output)
            for i in range(len(seq) - len(output), len(seq)):
                for n in range(1, min(max_ngram, i) + 1):
                    counts[tuple(seq[i - n:i])][seq[i]] += 1
        table = {}
        for key, c in counts.items():
            token, count = min(c.items(), key=lambda kv: (-kv[1], kv[0]))  # ties: the smallest id, deterministic
            if count >= min_count:
                table[key] = token
        return cls(table, max_ngram)

    def __len__(self) -> int:
        return len(self.next_token)

    def lookup(self, context: list[int]) -> tuple[int | None, int]:
        """(next token, length of the suffix it matched), or (None, 0)."""
        for n in range(min(self.max_ngram, len(context)), 0, -1):
            token = self.next_token.get(tuple(context[-n:]))
            if token is not None:
                return token, n
        return None, 0

    def run(self, context: list[int], max_tokens: int) -> tuple[list[int], int]:
        """Up to max_tokens tokens, each the table's next token after the context extended by the ones before it;
        and the suffix length the first one matched (0: no match)."""
        tail, out, order = list(context[-self.max_ngram:]), [], 0
        for _ in range(max_tokens):
            token, n = self.lookup(tail)
            if token is None:
                break
            order = order or n
            out.append(token)
            tail = (tail + [token])[-self.max_ngram:]
        return out, order

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Per n: `ngrams.<n>.keys` (m, n) and `ngrams.<n>.next` (m,), int64, in a fixed order."""
        out = {}
        for n in range(1, self.max_ngram + 1):
            keys = sorted(k for k in self.next_token if len(k) == n)
            out[f"ngrams.{n}.keys"] = torch.tensor(keys, dtype=torch.int64).reshape(len(keys), n)
            out[f"ngrams.{n}.next"] = torch.tensor([self.next_token[k] for k in keys], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "NGramTable":
        table, max_ngram = {}, 0
        for name, keys in tensors.items():
            if name.startswith("ngrams.") and name.endswith(".keys"):
                n = int(name.split(".")[1])
                nxt = tensors.get(f"ngrams.{n}.next")
                if nxt is None or keys.dim() != 2 or keys.shape[1] != n or nxt.shape != (keys.shape[0],):
                    raise ValueError(f"n-gram table: {name} and its next tokens do not match")
                table.update(zip(map(tuple, keys.tolist()), nxt.tolist()))
                max_ngram = max(max_ngram, n)
        return cls(table, max_ngram)

    def held_out_report(self, pairs: list[tuple[list[int], list[int]]], max_ngram: int = 3) -> dict:
        """Teacher-forced on (prompt, output) pairs, at the output positions where prompt lookup (max_ngram) finds
        no match in the context, i.e. where the table drafts: how many there are, the share the table names a
        token at, and the share of those where it is the model's next token."""
        unmatched = named = right = 0
        for prompt, output in pairs:
            lookup = NGramLookup(max_ngram, 1, 1)
            lookup.extend(list(prompt))
            for token in output:
                if not lookup.propose(1):
                    unmatched += 1
                    guess, _ = self.lookup(lookup.tokens)
                    named += guess is not None
                    right += guess == token
                lookup.extend([token])
        return {"positions": sum(len(o) for _, o in pairs), "unmatched_positions": unmatched,
                "named": round(named / unmatched, 4) if unmatched else 0.0,
                "next_token_right": round(right / named, 4) if named else 0.0}


class NGramLookup:
    """Candidate source: `propose(max_tokens)` returns up to max_tokens continuation tokens (possibly none). With a
    `table`, a context without a match, or with a shorter one than the table's, takes the table's run instead.
    `order`: the suffix length the last proposal matched: n > 0 in the context, -n in the table, 0 none (the
    adaptive policy learns each one's acceptance)."""

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, num_tokens: int = 4, table: NGramTable | None = None):
        self.max_ngram, self.min_ngram, self.num_tokens, self.table = max_ngram, min_ngram, num_tokens, table
        self.tokens: list[int] = []
        self.last_end: list[dict[tuple, int]] = [{} for _ in range(max_ngram + 1)]  # n -> n-gram -> end index
        self.indexed = 0  # n-grams ending before this index are in last_end
        self.order = 0

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def _index(self, upto: int) -> None:
        for end in range(self.indexed, upto):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end + 1 >= n:
                    self.last_end[n][tuple(self.tokens[end + 1 - n:end + 1])] = end
        self.indexed = max(self.indexed, upto)

    def propose(self, max_tokens: int | None = None) -> list[int]:
        """Continuation of the longest suffix (max_ngram down to min_ngram tokens) seen earlier in the context, unless
        the table matches a longer suffix: then, as without a context match, the table's run. (Teacher-forced on the
        model's outputs, a 1-token context match named the next token 14-34% of the time where the table's 3-token
        match named it ~60%; measured in decoding: HumanEval 1.44 -> 1.50x, mbpp 1.32 -> 1.40x, docs/trees.md.)"""
        max_tokens = self.num_tokens if max_tokens is None else min(max_tokens, self.num_tokens)
        L, self.order, run = len(self.tokens), 0, []
        if max_tokens <= 0 or L < 1:
            return []
        if L >= 2:
            self._index(L - 1)  # occurrences ending before the last token: the suffix itself is not a match
            for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
                end = self.last_end[n].get(tuple(self.tokens[L - n:]))
                if end is not None:
                    self.order, run = n, self.tokens[end + 1:end + 1 + max_tokens]
                    break
        if self.table is not None and self.order < self.table.max_ngram:
            table_run, n = self.table.run(self.tokens, max_tokens)
            if n > self.order:  # the table matched a longer suffix than the context did
                self.order, run = -n, table_run
        return run
