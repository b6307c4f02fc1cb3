"""A token tree verified in one pass: the pending token is the root, every other node a candidate next token after
its parent. Candidates of several sources (the self-draft chain, n-gram runs) share common prefixes once.

Nodes are numbered in insertion order and a parent always precedes its children, so node i sits at cache slot
start + i during verification, at RoPE position start + depth(i), and attends to the cached prefix and its own
ancestors (`paths`). After acceptance the accepted path's K/V are moved to slots start, start + 1, ... (compact).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from skiplayer.decoding.sampling import greedy_tokens

# the self-draft chain, n-gram runs from the context, from the draft's n-gram table, the draft head's next ranks
SELF, NGRAM, TABLE, SIBLING = "self", "ngram", "table", "sibling"
SOURCES = (SELF, NGRAM, TABLE, SIBLING)


@dataclass(frozen=True)
class Sibling:
    """The draft head's rank-`rank` candidate after drafted step `step` (a child of node `step`, beside the chain's
    token); `score`: its draft path probability (the chain's draft probabilities up to it, times its own)."""
    step: int
    rank: int
    token: int
    score: float


def rank_siblings(steps: list) -> list[Sibling]:
    """Every alternative candidate of the drafted steps, highest draft path probability first (EAGLE-2's reranking,
    here over a chain's side branches: no extra draft forward)."""
    out, reach = [], 1.0
    for i, step in enumerate(steps):
        out += [Sibling(i, r, token, reach * p) for r, (token, p) in enumerate(step.alternatives, start=2)]
        reach *= step.confidence
    return sorted(out, key=lambda c: -c.score)


@dataclass
class TokenTree:
    tokens: list[int]                                   # tokens[0] = the pending token (root)
    parents: list[int] = field(default_factory=lambda: [-1])
    sources: list[str] = field(default_factory=lambda: ["root"])
    probs: list = field(default_factory=lambda: [None])  # the draft distribution a sampled node was drawn from
    ranks: list = field(default_factory=lambda: [0])     # 1: a source's first choice; r: the draft head's rank r

    @classmethod
    def chain(cls, root: int, drafts: list[int], probs: list | None = None, source: str = SELF) -> "TokenTree":
        tree = cls([root])
        tree.add_path(0, drafts, source, probs)
        return tree

    def __len__(self) -> int:
        return len(self.tokens)

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == node]

    def depth(self, node: int) -> int:
        d = 0
        while self.parents[node] >= 0:
            node, d = self.parents[node], d + 1
        return d

    def add_path(self, node: int, tokens: list[int], source: str, probs: list | None = None,
                 rank: int = 1) -> list[int]:
        """Add `tokens` as a path below `node`, reusing existing children with the same token; returns the nodes."""
        nodes = []
        for j, t in enumerate(tokens):
            child = next((c for c in self.children(node) if self.tokens[c] == t), None)
            if child is None:
                self.tokens.append(t)
                self.parents.append(node)
                self.sources.append(source)
                self.probs.append(probs[j] if probs else None)
                self.ranks.append(rank)
                child = len(self.tokens) - 1
            nodes.append(child)
            node = child
        return nodes

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def path(self, node: int) -> list[int]:
        """Nodes from the root to `node`, inclusive."""
        out = [node]
        while self.parents[out[-1]] >= 0:
            out.append(self.parents[out[-1]])
        return out[::-1]

    def attention_paths(self, start: int, first: int = 0) -> torch.Tensor:
        """(len - first, max depth + 1) int64: for nodes first.., the cache slots of their ancestors and themselves
        (root first), -1 padded. A node attends to slots [0, start) and these."""
        paths = [[start + i for i in self.path(n)] for n in range(first, len(self))]
        width = max(len(p) for p in paths)
        return torch.tensor([p + [-1] * (width - len(p)) for p in paths], dtype=torch.int64)

    def positions(self, start: int) -> list[int]:
        return [start + self.depth(n) for n in range(len(self))]


def accept_tree_greedy(tree: TokenTree, target_logits: torch.Tensor) -> tuple[list[int], int]:
    """Walk from the root along the child equal to the target's argmax. target_logits: (len(tree), vocab).
    Returns (accepted path of nodes, root included; the target's next token after it)."""
    targets = greedy_tokens(target_logits)
    path = [0]
    while True:
        child = next((c for c in tree.children(path[-1]) if tree.tokens[c] == targets[path[-1]]), None)
        if child is None:
            return path, targets[path[-1]]
        path.append(child)


def accept_tree_sampling(tree: TokenTree, target_probs: torch.Tensor, generator) -> tuple[list[int], int]:
    """Multi-candidate speculative sampling (recursive rejection over siblings, as in SpecInfer): at a node with
    target distribution p, try its children in order; a child x drawn from a draft distribution q is accepted with
    probability min(1, p(x)/q(x)), a deterministic candidate (n-gram; q = one-hot) with probability p(x). On
    rejection p becomes normalize(max(0, p - q)) and the next sibling is tried; if none is accepted, the next token
    is sampled from what is left of p. Each step yields a token distributed exactly as p, so the output is
    distributed as sampling from the target. target_probs: (len(tree), vocab)."""
    path = [0]
    while True:
        p = target_probs[path[-1]]
        accepted = None
        for c in tree.children(path[-1]):
            x, q = tree.tokens[c], tree.probs[c]
            qx = 1.0 if q is None else float(q[x])
            if float(torch.rand((), generator=generator)) * qx < float(p[x]):
                accepted = c
                break
            residual = (p - q).clamp_min(0) if q is not None else p.clone().index_fill_(0, torch.tensor([x], device=p.device), 0.0)
            total = residual.sum()
            if total <= 0:  # p was q (or one-hot on x): the rejection had probability zero; keep p
                continue
            p = residual / total
        if accepted is None:
            return path, int(torch.multinomial(p, 1, generator=generator))
        path.append(accepted)
