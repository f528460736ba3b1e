"""OPSD divergences: pull the student's next-token distribution toward a teacher's, over the vocabulary.

Pure functions over tensors and masks, like `rl.algorithms.losses`. Per-position results are [...] (the
logits' leading dims, e.g. [B, T]); aggregate them with `rl.algorithms.losses.aggregate`:
  paper (arXiv 2601.18734): mean over each sequence's tokens, then over sequences
      -> AGGREGATION["paper"] = "seq_mean_token_mean"
  released code: mean over all valid completion tokens -> AGGREGATION["code"] = "token_mean"
      (the code takes that mean per micro-batch; `aggregate` takes it over the whole step).

The teacher is always detached. Both logit sets are divided by `temperature` before log_softmax,
and are upcast to at least float32.

Clipping caps each (position, vocabulary entry) term at `clip` BEFORE the vocabulary sum; a capped
entry has zero gradient and the per-position sum can go negative. The per-entry terms are
  forward_kl  KL(p_T || p_S):  p_T(v) * (log p_T(v) - log p_S(v))          (the paper's term)
  reverse_kl  KL(p_S || p_T):  p_S(v) * (log p_S(v) - log p_T(v))
  jsd (beta): beta * p_T(v) * (log p_T(v) - log m(v)) + (1 - beta) * p_S(v) * (log p_S(v) - log m(v)),
              m = beta * p_T + (1 - beta) * p_S
              (the released code clips the same combined per-entry JSD term).
Each term sums over v to exactly its divergence, so clipping with a large `clip` changes nothing.
"""
from __future__ import annotations

import torch

from rl.core.kernels import chunk_logits, log_softmax_, upcast

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
AGGREGATION = {"paper": "seq_mean_token_mean", "code": "token_mean"}


def check_divergence(kind: str, beta: float) -> None:
    """Raise ValueError for an unknown divergence or a JSD beta outside (0, 1)."""
    if kind not in DIVERGENCES:
        raise ValueError(f"Unknown divergence {kind!r}; choose one of {DIVERGENCES}.")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        # At beta 0 or 1 the generalized JSD is identically zero; the released code swaps in
        # forward KL (beta=0) and reverse KL (beta=1) there, which are the other two kinds here.
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}; use forward_kl or reverse_kl for the endpoints.")


def _scaled(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, top_k: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Both logit sets / T (new tensors), restricted to the teacher's top k entries if asked."""
    student, teacher = upcast(student_logits) / temperature, upcast(teacher_logits) / temperature
    if top_k is None:
        return student, teacher, None
    top = teacher.topk(top_k, dim=-1).indices
    return student.gather(-1, top), teacher.gather(-1, top), top


def _log_mixture(student_p: torch.Tensor, teacher_p: torch.Tensor, beta: float) -> torch.Tensor:
    # Where both probabilities underflow to 0 their terms are 0 anyway; the floor keeps log finite there.
    m = beta * teacher_p + (1 - beta) * student_p
    return m.clamp_min(torch.finfo(m.dtype).tiny).log()


def _entry_terms(student_logp, student_p, teacher_logp, teacher_p, kind: str, beta: float) -> torch.Tensor:
    """The per-(position, entry) terms whose sum over the last dim is the divergence (module doc)."""
    if kind == "forward_kl":
        return teacher_p * (teacher_logp - student_logp)
    if kind == "reverse_kl":
        return student_p * (student_logp - teacher_logp)
    log_m = _log_mixture(student_p, teacher_p, beta)
    return beta * teacher_p * (teacher_logp - log_m) + (1 - beta) * student_p * (student_logp - log_m)


def _entry_grads(student_logp, student_p, teacher_logp, teacher_p, kind: str, beta: float) -> torch.Tensor:
    """d(term v) / d(log p_S(v)); each term depends on the student only through its own entry v."""
    if kind == "forward_kl":
        return -teacher_p
    if kind == "reverse_kl":
        return student_p * (student_logp - teacher_logp + 1.0)
    # The d log m parts cancel: d/ds [beta p_T (log p_T - log m) + (1-beta) q (s - log m)] = (1-beta) q (s - log m).
    return (1 - beta) * student_p * (student_logp - _log_mixture(student_p, teacher_p, beta))


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    clip: float | None = None,
    top_k: int | None = None,
) -> torch.Tensor:
    """Per-position divergence from full logits [..., V] -> [...], through plain autograd.

    Materialises several [..., V] tensors: for small cases; use `chunked_divergence` at scale.
    `top_k`: renormalise both distributions over the teacher's top k entries first.
    """
    check_divergence(kind, beta)
    student, teacher, _ = _scaled(student_logits, teacher_logits.detach(), temperature, top_k)
    student_logp, teacher_logp = torch.log_softmax(student, dim=-1), torch.log_softmax(teacher, dim=-1)
    terms = _entry_terms(student_logp, student_logp.exp(), teacher_logp, teacher_logp.exp(), kind, beta)
    if clip is not None:
        terms = terms.clamp(max=clip)
    return terms.sum(dim=-1)


def sampled_token_loss(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """OPSD's sampled-token variant, per token: -a_t * log p_S(y_t), a_t = log p_T(y_t) - log p_S(y_t).

    a_t is detached, so this is a policy-gradient loss with the teacher's log-ratio as reward.
    Inputs are the sampled tokens' log-probabilities, e.g. `rl.core.kernels.token_logprobs(logits / T, tokens)`.
    """
    advantage = (teacher_logprobs - student_logprobs).detach()
    return -advantage * student_logprobs


def _chunk_distributions(student_rows, teacher_rows, weight, teacher_weight, temperature, top_k):
    """(log p_S, p_S, log p_T, p_T, top-k indices or None) for one chunk of rows, without autograd."""
    student = chunk_logits(student_rows, weight, temperature)
    teacher = chunk_logits(teacher_rows, teacher_weight, temperature)
    top = None
    if top_k is not None:
        top = teacher.topk(top_k, dim=-1).indices
        student, teacher = student.gather(-1, top), teacher.gather(-1, top)
    return (*log_softmax_(student), *log_softmax_(teacher), top)


def _chunk_logit_grad(student_rows, teacher_rows, weight, teacher_weight, grad_out, options) -> torch.Tensor:
    """d(sum_n grad_out[n] * divergence[n]) / d(student logits) for one chunk of rows."""
    kind, beta, temperature, clip, top_k, _ = options
    *dists, top = _chunk_distributions(student_rows, teacher_rows, weight, teacher_weight, temperature, top_k)
    # Same convention as torch.clamp's backward: an entry at exactly `clip` still passes gradient.
    uncapped = None if clip is None else _entry_terms(*dists, kind, beta) <= clip
    grad = _entry_grads(*dists, kind, beta)
    if uncapped is not None:
        grad *= uncapped
    grad *= grad_out.unsqueeze(-1)
    # Back through log_softmax(z / T): dz = (g - p_S * sum(g)) / T.
    grad.addcmul_(dists[1], grad.sum(dim=-1, keepdim=True), value=-1.0).div_(temperature)
    if top is None:
        return grad
    vocab = student_rows.shape[-1] if weight is None else weight.shape[0]
    return grad.new_zeros(grad.shape[0], vocab).scatter_(-1, top, grad)


class _ChunkedDivergence(torch.autograd.Function):
    """Per-row divergence over rows of hidden states (or logits), one chunk of rows at a time.

    Saves only its inputs; the backward recomputes each chunk's logits and applies the analytic
    gradient, so no tensor of size rows x vocab ever exists beyond one chunk.
    """

    @staticmethod
    def forward(ctx, student, teacher, weight, teacher_weight, kind, beta, temperature, clip, top_k, chunk_size):
        ctx.save_for_backward(student, teacher, weight, teacher_weight)
        ctx.options = (kind, beta, temperature, clip, top_k, chunk_size)
        out = student.new_empty(student.shape[0], dtype=torch.promote_types(student.dtype, torch.float32))
        for start in range(0, student.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            *dists, _ = _chunk_distributions(student[rows], teacher[rows], weight, teacher_weight, temperature, top_k)
            terms = _entry_terms(*dists, kind, beta)
            out[rows] = (terms if clip is None else terms.clamp_(max=clip)).sum(dim=-1)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher, weight, teacher_weight = ctx.saved_tensors
        chunk_size = ctx.options[-1]
        want_student, _, want_weight = ctx.needs_input_grad[:3]
        grad_student = torch.zeros_like(student) if want_student else None
        # float32 accumulator: summing a bf16 [V, H] gradient over many chunks would lose precision.
        grad_weight = None
        if want_weight:
            grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        for start in range(0, student.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            grad_logits = _chunk_logit_grad(
                student[rows], teacher[rows], weight, teacher_weight, grad_out[rows], ctx.options
            ).to(student.dtype)
            if want_student:
                grad_student[rows] = grad_logits if weight is None else grad_logits @ weight
            if want_weight:
                grad_weight += grad_logits.T @ student[rows]
        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_student, None, grad_weight, None, None, None, None, None, None, None


def chunked_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    clip: float | None = None,
    top_k: int | None = None,
    chunk_size: int = 512,
    teacher_lm_head_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position divergence [...] from hidden states [..., H], chunk by chunk of positions.

    Logits (hidden @ lm_head_weight^T) exist for `chunk_size` positions at a time, in the forward
    and again in the backward, so peak memory is O(chunk_size x V) rather than O(positions x V):
    about nine fp32 [chunk_size, V] tensors (2.8 GB at chunk 512, V 150k; scripts/bench_divergence.py).
    The price is the logits computed twice: six lm_head-sized matmuls instead of four.
    Gradients reach `student_hidden` and `lm_head_weight` (if it requires grad), never the teacher.
    `teacher_lm_head_weight`: the teacher's own head (a frozen copy); defaults to `lm_head_weight`.
    With `lm_head_weight=None` the inputs are logits [..., V] themselves (chunking then only bounds
    the intermediates). Positions where `mask` is 0 are skipped and give 0.
    Same options and values as `divergence`.
    """
    check_divergence(kind, beta)
    if teacher_lm_head_weight is None:
        teacher_lm_head_weight = lm_head_weight
    if teacher_lm_head_weight is not None:
        teacher_lm_head_weight = teacher_lm_head_weight.detach()
    leading = student_hidden.shape[:-1]
    student = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    valid = None if mask is None else mask.reshape(-1).nonzero().squeeze(-1)
    if valid is not None:
        student, teacher = student[valid], teacher[valid]
    per_row = _ChunkedDivergence.apply(
        student, teacher, lm_head_weight, teacher_lm_head_weight, kind, beta, temperature, clip, top_k, chunk_size
    )
    if valid is None:
        return per_row.view(leading)
    return per_row.new_zeros(leading.numel()).index_copy(0, valid, per_row).view(leading)


def top_k_divergence_from_ids(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor | None,
    top_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    clip: float | None = None,
    chunk_size: int = 512,
) -> torch.Tensor:
    """Per-position divergence [...] over a teacher's top-k entries given as ids [..., k] and their
    log-probs [..., k] (what a teacher engine returns), both distributions renormalised over them, as
    `divergence(..., top_k=k)` does with full teacher logits. The student's logits exist only at those
    ids (hidden [..., H] @ the k rows of `lm_head_weight`; with `lm_head_weight=None` the hidden states
    are logits), chunk by chunk of positions, recomputed in the backward (checkpoint)."""
    from torch.utils.checkpoint import checkpoint

    check_divergence(kind, beta)
    k = top_ids.shape[-1]
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    ids, teacher = top_ids.reshape(-1, k).long(), teacher_logprobs.reshape(-1, k).detach()
    parts = [
        checkpoint(_top_k_chunk, hidden[rows], lm_head_weight, ids[rows], teacher[rows], kind, beta, clip, use_reentrant=False)
        for rows in (slice(start, start + chunk_size) for start in range(0, hidden.shape[0], chunk_size))
    ]
    return torch.cat(parts).view(top_ids.shape[:-1])


def _top_k_chunk(hidden, weight, ids, teacher_logprobs, kind, beta, clip):
    student = hidden.gather(-1, ids) if weight is None else torch.einsum("ckh,ch->ck", weight[ids], hidden)
    return divergence(student, teacher_logprobs, kind=kind, beta=beta, clip=clip)


def rlsd_token_advantages(
    advantages: torch.Tensor, log_ratio: torch.Tensor, mix: float = 1.0, clip: float = 0.2
) -> torch.Tensor:
    """RLSD (arXiv 2604.03128): the verifiable reward's group advantage A sets each sequence's
    direction, the teacher's per-token log-ratio sets each token's size:

        w_t = clip(exp(sign(A) * Δ_t), 1 - clip, 1 + clip),   Δ_t = sg[log p_T(y_t) - log p_S(y_t)]
        Â_t = A * ((1 - mix) + mix * w_t)

    so a token the teacher prefers more than the student gets more credit in a right answer (A > 0)
    and less blame in a wrong one (A < 0), and w_t > 0 never flips A's sign. The equation could not
    be checked against the paper here (no access to it); this is the form two independent
    implementations of the paper state (w_t as above; Â_t with the mix λ).
    `advantages` and `log_ratio` are [...] per token (A repeated over a sequence's tokens).
    """
    weight = torch.exp(torch.sign(advantages) * log_ratio.detach()).clamp(1.0 - clip, 1.0 + clip)
    return advantages * ((1.0 - mix) + mix * weight)
