"""Prompt-lookup drafting: the tokens that followed the most recent earlier occurrence of the context's last n
tokens (longest n first), in prompt + output so far. No model work at all; summaries and code copy whole spans.

An index from each n-gram to the last position it ended at is kept up to date as tokens arrive, so a lookup costs
O(max_ngram) dictionary probes whatever the context length.
"""
from __future__ import annotations


class NGramLookup:
    """Candidate source: `propose(max_tokens)` returns up to max_tokens continuation tokens (possibly none)."""

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, num_tokens: int = 4):
        self.max_ngram, self.min_ngram, self.num_tokens = max_ngram, min_ngram, num_tokens
        self.tokens: list[int] = []
        self.last_end: list[dict[tuple, int]] = [{} for _ in range(max_ngram + 1)]  # n -> n-gram -> end index
        self.indexed = 0  # n-grams ending before this index are in last_end
        self.order = 0    # length of the suffix the last proposal matched (0: none)

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def _index(self, upto: int) -> None:
        for end in range(self.indexed, upto):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end + 1 >= n:
                    self.last_end[n][tuple(self.tokens[end + 1 - n:end + 1])] = end
        self.indexed = max(self.indexed, upto)

    def propose(self, max_tokens: int | None = None) -> list[int]:
        """Continuation of the longest suffix (max_ngram down to min_ngram tokens) seen earlier in the context."""
        max_tokens = self.num_tokens if max_tokens is None else min(max_tokens, self.num_tokens)
        L, self.order = len(self.tokens), 0
        if max_tokens <= 0 or L < 2:
            return []
        self._index(L - 1)  # occurrences ending before the last token: the suffix itself is not a match
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            end = self.last_end[n].get(tuple(self.tokens[L - n:]))
            if end is not None:
                self.order = n
                return self.tokens[end + 1:end + 1 + max_tokens]
        return []
