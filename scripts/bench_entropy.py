"""Peak memory and time of per-token policy entropy (no grad): chunked versus naive full logits.

    PYTHONPATH=. python scripts/bench_entropy.py [--tokens 1024 4096 16384] [--vocab 150000] [--hidden 256]

Writes bench_results/entropy.json and bench_results/entropy.png and prints a table. The 1k run
calibrates the projection of the naive peak for the sizes that would not fit (method: see
scripts/bench_divergence.py, whose helpers this reuses).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bench_divergence import Phases, benchmark


def entropy_phases(impl: str, tokens: int, args: argparse.Namespace) -> Phases:
    import torch

    from rl.algorithms.entropy import chunked_entropy

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(args.vocab, args.hidden, generator=g) * args.hidden**-0.5
    hidden = torch.randn(1, tokens, args.hidden, generator=g)
    mask = torch.ones(1, tokens)

    @torch.no_grad()
    def forward():
        if impl == "chunked":
            entropy = chunked_entropy(hidden, weight, mask, chunk_size=args.chunk_size)
        else:
            # The naive way: the whole [1, tokens, V] log-softmax at once.
            logp = torch.log_softmax(hidden @ weight.T, dim=-1)
            entropy = -(logp.exp() * logp).sum(-1)
        return entropy.mean().item()

    return [("forward", forward)]


if __name__ == "__main__":
    benchmark("entropy", Path(__file__).resolve(), entropy_phases, [1024, 4096, 16384], "Per-token entropy, no grad")
