"""Attention over a packed row's pieces instead of the whole row.

A packed row ([prompt ; completion_1 ; ... ; completion_G], rl.core.batch) under a 4D mask costs
a full L x L attention, although each completion sees only the prompt and itself: with a 100-token
prompt and four 140-token completions, two thirds of the score matrix is masked out. Here the row is
cut into pieces, each a span of queries with the keys it may see:

- a prompt: its own span, causally;
- a completion: its prompt's span, all of it, then its own span, causally.

Pieces of one kind are padded to a common size and go through one `scaled_dot_product_attention`
call with a small bool mask; the outputs are scattered back to their row positions. The result is
the masked full-row attention's, up to float rounding (tested against it); on the default task it
computes about a third of the scores.

It runs as a transformers attention implementation ("rl_pieces", registered on import) that the
learner gives the HF models it wraps in place of "sdpa" (`use_piece_attention`). A forward that
passes no `attention_pieces` (padded micro-batches, any other caller) gets plain SDPA, with the same
masks, so the switch changes nothing else.
"""
from __future__ import annotations

import torch

from rl.core.batch import AttentionPieces

NAME = "rl_pieces"


def _heads_first(x: torch.Tensor, index: torch.Tensor, repeats: int) -> torch.Tensor:
    """[R*W, H, D] flat states -> [N, H*repeats, S, D] gathered at index [N, S]."""
    n, s = index.shape
    picked = x.index_select(0, index.reshape(-1)).view(n, s, x.shape[1], x.shape[2]).transpose(1, 2)
    return picked.repeat_interleave(repeats, dim=1) if repeats > 1 else picked


def piece_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                    attention_pieces: AttentionPieces | None = None, **kwargs):
    """The attention implementation: query [R, Hq, W, D], key/value [R, Hkv, W, D] ->
    ([R, W, Hq, D], None), as transformers' attention functions return."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_pieces is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("sliding_window") or kwargs.get("s_aux") is not None or kwargs.get("softcap"):
        raise ValueError("piece attention supports plain causal attention only (no sliding window, sinks or softcapping)")
    rows, heads, width, dim = query.shape
    repeats = heads // key.shape[1]
    flat_q, flat_k, flat_v = (t.transpose(1, 2).reshape(rows * width, t.shape[1], dim) for t in (query, key, value))
    outputs = []
    for g in attention_pieces.groups:
        out = torch.nn.functional.scaled_dot_product_attention(
            _heads_first(flat_q, g.query_index, 1), _heads_first(flat_k, g.key_index, repeats),
            _heads_first(flat_v, g.key_index, repeats), attn_mask=g.mask, dropout_p=dropout, scale=scaling,
        )
        valid = out.transpose(1, 2).reshape(-1, heads, dim).index_select(0, g.valid_rows)
        outputs.append(valid)  # [valid queries, Hq, D]
    # index_select/index_copy rather than indexing: their backwards are a plain index_add/select.
    scattered = query.new_zeros(rows * width, heads, dim).index_copy(0, attention_pieces.positions, torch.cat(outputs))
    return scattered.view(rows, width, heads, dim), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, piece_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # unpacked forwards get SDPA's masks


_register()


def use_piece_attention(causal_lm: torch.nn.Module) -> bool:
    """Switch an HF causal LM running SDPA to piece attention; whether it runs piece attention now.
    Other implementations (eager, flash) are left alone: the learner then uses the 4D mask."""
    if causal_lm.config._attn_implementation == "sdpa":
        causal_lm.set_attn_implementation(NAME)
    return causal_lm.config._attn_implementation == NAME
