"""Stopping: max new tokens, EOS / stop token ids, and stop words matched on the decoded text."""
from __future__ import annotations


class StopCriteria:
    """Feed generated tokens one at a time; `done` turns true at exactly the token where plain autoregressive
    decoding would stop, so every decoding strategy stops at the same place."""

    def __init__(self, max_steps: int, stop_token_ids=(), stop_words=(), tokenizer=None):
        self.max_steps = max_steps
        self.stop_token_ids = set(stop_token_ids)
        self.stop_words = [w for w in stop_words if w]
        if self.stop_words and tokenizer is None:
            raise ValueError("stop words need a tokenizer")
        self.tokenizer = tokenizer
        # A stop word completed by the newest token lies within the last few tokens: decode only that tail.
        self.tail = max((len(w) for w in self.stop_words), default=0) + 8
        self.tokens: list[int] = []
        self.done = False

    def extend(self, tokens: list[int]) -> list[int]:
        """Append tokens until a stop condition hits; return the ones kept."""
        kept = []
        for t in tokens:
            if self.done:
                break
            self.tokens.append(t)
            kept.append(t)
            self.done = (len(self.tokens) >= self.max_steps or t in self.stop_token_ids
                         or self._stop_word_completed())
        return kept

    def _stop_word_completed(self) -> bool:
        if not self.stop_words:
            return False
        text = self.tokenizer.decode(self.tokens[-self.tail:], skip_special_tokens=True)
        return any(w in text for w in self.stop_words)

    def cut_text(self, text: str) -> str:
        """The output text ends before the first stop word."""
        cut = min((i for i in (text.find(w) for w in self.stop_words) if i >= 0), default=len(text))
        return text[:cut]
