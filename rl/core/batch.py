"""The training side's data: a step's sequences and the micro-batches the learner runs.

A micro-batch is laid out one of two ways. Padded: one right-padded row per sequence, a 2D
attention mask (what masked-diffusion models and the plain path use). Packed (`MicroBatch.packed`):
sequences end to end in rows with a 4D attention mask and explicit position ids, where a group's
completions that share a prompt follow ONE copy of it (each completion attends to the prompt and
to itself only, its positions continue from the prompt's end), and a row holds several units
without attending across them. Both give the same log-probs; packed costs fewer tokens. The
packed mask also travels as spans (`AttentionPieces`), for the learner's piece attention
(rl.learner.attention).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rl.core.kernels import chunked_token_logprobs_and_entropy


@dataclass
class PieceGroup:
    """Pieces of one kind, padded to Q queries and K keys.

    query_index [N, Q] / key_index [N, K]: flat positions (row * width + column) of each piece's
    queries and keys, 0 where padded. mask [N, 1, Q, K] bool: which keys each query sees (a padded
    query sees key 0 only, so that no softmax row is empty; its output is dropped). valid_rows: the
    real queries' indices into the N * Q flattened queries.
    """

    query_index: torch.Tensor
    key_index: torch.Tensor
    mask: torch.Tensor
    valid_rows: torch.Tensor

    def to(self, device) -> "PieceGroup":
        return PieceGroup(*(t.to(device) for t in (self.query_index, self.key_index, self.mask, self.valid_rows)))


@dataclass
class AttentionPieces:
    """A packed micro-batch's pieces: its groups, and every real position's flat index in the order
    the groups' valid outputs come (where they are scattered back)."""

    groups: list[PieceGroup]
    positions: torch.Tensor

    @staticmethod
    def build(pieces: list[tuple[int, int, int, int]]) -> "AttentionPieces":
        """From (prefix start, prefix length, own start, own length) per piece, in flat positions:
        the piece's queries are its own span; its keys the whole prefix, then its own span causally."""
        kinds = [[p for p in pieces if p[1] == 0], [p for p in pieces if p[1] > 0]]
        groups = [_group(torch.tensor(kind, dtype=torch.long)) for kind in kinds if kind]
        return AttentionPieces(groups, torch.cat([g.query_index.reshape(-1)[g.valid_rows] for g in groups]))

    def to(self, device) -> "AttentionPieces":
        return AttentionPieces([g.to(device) for g in self.groups], self.positions.to(device))


def _group(pieces: torch.Tensor) -> PieceGroup:
    prefix_start, prefix_len, own_start, own_len = (pieces[:, i, None, None] for i in range(4))
    q = torch.arange(int(own_len.max()))[None, :, None]
    k = torch.arange(int((prefix_len + own_len).max()))[None, None, :]
    real_query = q < own_len
    in_prefix = k < prefix_len
    in_own = (k >= prefix_len) & (k - prefix_len <= q)  # q < own_len keeps it inside the span
    mask = real_query & (in_prefix | in_own)
    mask |= ~real_query & (k == 0)
    key_in_span = in_prefix | ((k >= prefix_len) & (k < prefix_len + own_len))
    key_index = torch.where(in_prefix, prefix_start + k, own_start + k - prefix_len)
    key_index = torch.where(key_in_span, key_index, 0)[:, 0, :]
    query_index = torch.where(real_query, own_start + q, 0)[:, :, 0]
    return PieceGroup(query_index, key_index, mask[:, None], real_query.reshape(-1).nonzero()[:, 0])


@dataclass
class SequenceBatch:
    """One optimizer step's data, one row per completion.

    `token_fields` hold one value per completion token (advantages, old logprobs, ...), or one list
    of k values per token (a teacher engine's top-k), aligned with `input_ids[i][prompt_lens[i]:]`.
    `loss_normalizer` is the global denominator the loss divides by (tokens, sequences or a
    constant, decided by the algorithm over the WHOLE step, so that micro-batching and data
    parallelism do not change the loss).
    """

    input_ids: list[list[int]]
    prompt_lens: list[int]
    token_fields: dict[str, list[list[float]]] = field(default_factory=dict)
    seq_fields: dict[str, list[float]] = field(default_factory=dict)
    loss_normalizer: float = 1.0
    # A second context for the same completions (OPSD's teacher sees the reference solution):
    # teacher_input_ids[i] = teacher prompt + the SAME completion tokens as input_ids[i].
    teacher_input_ids: list[list[int]] | None = None
    teacher_prompt_lens: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def completion_lens(self) -> list[int]:
        return [len(ids) - p for ids, p in zip(self.input_ids, self.prompt_lens)]

    def select(self, indices: list[int]) -> "SequenceBatch":
        return SequenceBatch(
            input_ids=[self.input_ids[i] for i in indices],
            prompt_lens=[self.prompt_lens[i] for i in indices],
            token_fields={k: [v[i] for i in indices] for k, v in self.token_fields.items()},
            seq_fields={k: [v[i] for i in indices] for k, v in self.seq_fields.items()},
            loss_normalizer=self.loss_normalizer,
            teacher_input_ids=None if self.teacher_input_ids is None else [self.teacher_input_ids[i] for i in indices],
            teacher_prompt_lens=None if self.teacher_prompt_lens is None else [self.teacher_prompt_lens[i] for i in indices],
        )

    def teacher_view(self) -> "SequenceBatch | None":
        """The teacher-context sequences as a batch of their own (same completions, same fields)."""
        if self.teacher_input_ids is None:
            return None
        return SequenceBatch(self.teacher_input_ids, self.teacher_prompt_lens, self.token_fields, self.seq_fields,
                             self.loss_normalizer)


@dataclass
class MicroBatch:
    """Right-padded tensors for one forward pass.

    input_ids/attention_mask: [B, L]. Completion-aligned tensors are [B, T] with T the longest
    completion: position t of row i is the completion's t-th token, predicted by the logits at
    input position prompt_len_i - 1 + t. `completion_mask` is 1 on real completion tokens.

    Packed layout (`packed`): input_ids [R, L] are R packed rows, not one per sequence;
    attention_mask is a bool [R, 1, L, L] (True: the query may attend the key), `position_ids`
    [R, L], and `predict_index` [B, T] the flat index (row * L + position) of the input position
    predicting each completion token. The completion-aligned tensors stay [B, T], in sequence order.
    `attention_pieces` is the same mask as spans (rl.learner.attention), for piece attention.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_lens: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    token_fields: dict[str, torch.Tensor]
    seq_fields: dict[str, torch.Tensor]
    loss_normalizer: float
    position_ids: torch.Tensor | None = None
    predict_index: torch.Tensor | None = None
    attention_pieces: AttentionPieces | None = None

    @property
    def is_packed(self) -> bool:
        return self.predict_index is not None

    @staticmethod
    def from_sequences(batch: SequenceBatch, pad_id: int = 0) -> "MicroBatch":
        n = len(batch)
        width = max(len(x) for x in batch.input_ids)
        comp_lens = batch.completion_lens()
        t_max = max(max(comp_lens), 1)
        input_ids = torch.full((n, width), pad_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        completion_ids = torch.full((n, t_max), pad_id, dtype=torch.long)
        completion_mask = torch.zeros((n, t_max), dtype=torch.float32)
        fields = {k: torch.zeros((n, t_max, *_per_token_shape(v)), dtype=torch.float32) for k, v in batch.token_fields.items()}
        for i, (ids, p) in enumerate(zip(batch.input_ids, batch.prompt_lens)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            c = len(ids) - p
            completion_ids[i, :c] = torch.tensor(ids[p:])
            completion_mask[i, :c] = 1.0
            for k, v in batch.token_fields.items():
                fields[k][i, :c] = torch.tensor(v[i], dtype=torch.float32)
        return MicroBatch(
            input_ids=input_ids,
            attention_mask=attention,
            prompt_lens=torch.tensor(batch.prompt_lens, dtype=torch.long),
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            token_fields=fields,
            seq_fields={k: torch.tensor(v, dtype=torch.float32) for k, v in batch.seq_fields.items()},
            loss_normalizer=batch.loss_normalizer,
        )

    @staticmethod
    def packed(batch: SequenceBatch, pad_id: int = 0, share_prompt: bool = True) -> "MicroBatch":
        """The packed layout of `batch` (see the class): consecutive sequences with the same prompt
        form one unit [prompt ; completion_1 ; ... ; completion_k] when `share_prompt`, else every
        sequence is its own unit; units go end to end into rows (first fit, in order) no longer
        than the longest unit, so that rows pad little and attention stays as local as unpacked."""
        plain = MicroBatch.from_sequences(batch, pad_id)
        units = prompt_units(batch, share_prompt)
        unit_lens = [batch.prompt_lens[u[0]] + sum(batch.completion_lens()[i] for i in u) for u in units]
        width = max(unit_lens)
        rows: list[list[int]] = []  # unit indices per row
        free: list[int] = []
        for k, n in enumerate(unit_lens):
            row = next((r for r, room in enumerate(free) if room >= n), None)
            if row is None:
                rows.append([]), free.append(width)
                row = len(rows) - 1
            rows[row].append(k)
            free[row] -= n
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        # Per token: its unit (pads get one of their own) and segment (0 prompt, j+1 completion j).
        unit_of = -1 - torch.arange(len(rows) * width).view(len(rows), width)
        segment = torch.zeros((len(rows), width), dtype=torch.long)
        predict = torch.zeros_like(plain.completion_ids)
        pieces = []  # (prefix start, prefix length, own start, own length), flat
        for r, members in enumerate(rows):
            at = 0
            for k in members:
                first = units[k][0]
                p = batch.prompt_lens[first]
                prompt_start = r * width + at
                pieces.append((0, 0, prompt_start, p))
                ids[r, at : at + p] = torch.tensor(batch.input_ids[first][:p])
                positions[r, at : at + p] = torch.arange(p)
                unit_of[r, at : at + p] = k
                last_prompt = r * width + at + p - 1
                at += p
                for j, i in enumerate(units[k]):
                    completion = batch.input_ids[i][p:]
                    c = len(completion)
                    ids[r, at : at + c] = torch.tensor(completion, dtype=torch.long)
                    positions[r, at : at + c] = torch.arange(p, p + c)
                    unit_of[r, at : at + c] = k
                    segment[r, at : at + c] = j + 1
                    # Token 0 is predicted by the prompt's last position, token t by token t-1's.
                    predict[i, 0] = last_prompt
                    predict[i, 1:c] = r * width + torch.arange(at, at + c - 1)
                    pieces.append((prompt_start, p, r * width + at, c))
                    at += c
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same_unit = unit_of[:, :, None] == unit_of[:, None, :]
        visible = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
        mask = (same_unit & visible & causal)[:, None]
        return MicroBatch(
            input_ids=ids, attention_mask=mask, prompt_lens=plain.prompt_lens, completion_ids=plain.completion_ids,
            completion_mask=plain.completion_mask, token_fields=plain.token_fields, seq_fields=plain.seq_fields,
            loss_normalizer=plain.loss_normalizer, position_ids=positions, predict_index=predict,
            attention_pieces=AttentionPieces.build(pieces),
        )

    def completion_aligned(self, per_position: torch.Tensor) -> torch.Tensor:
        """[B, L, D] values of the input positions that predict each completion token -> [B, T, D]
        (logits, or hidden states before the output layer). Packed: [R, L, D] -> [B, T, D]."""
        if self.predict_index is not None:
            flat = per_position.reshape(-1, per_position.shape[-1])
            return flat[self.predict_index.to(per_position.device)]
        t = self.completion_ids.shape[1]
        positions = torch.arange(t, device=per_position.device)
        offsets = (self.prompt_lens.to(per_position.device) - 1)[:, None] + positions[None, :]
        offsets = offsets.clamp(max=per_position.shape[1] - 1)
        return torch.gather(per_position, 1, offsets[..., None].expand(-1, -1, per_position.shape[-1]))


def _per_token_shape(rows: list[list]) -> tuple[int, ...]:
    """The shape of one token's value in a token field: () for a number, (k,) for a list of k (a
    teacher engine's top-k ids or log-probs)."""
    first = next((row[0] for row in rows if len(row)), 0.0)
    return (len(first),) if isinstance(first, (list, tuple)) else ()


def prompt_units(batch: SequenceBatch, share_prompt: bool) -> list[list[int]]:
    """Sequence indices grouped into units: runs of consecutive sequences with the same prompt
    (a GRPO group) when `share_prompt`, else one sequence each."""
    units: list[list[int]] = []
    for i, (ids, p) in enumerate(zip(batch.input_ids, batch.prompt_lens)):
        if share_prompt and units:
            j = units[-1][0]
            if batch.prompt_lens[j] == p and batch.input_ids[j][:p] == ids[:p]:
                units[-1].append(i)
                continue
        units.append([i])
    return units


def packed_tokens(batch: SequenceBatch, share_prompt: bool) -> int:
    """Tokens the packed layout of `batch` holds (before padding rows to a common width)."""
    lens = batch.completion_lens()
    return sum(batch.prompt_lens[u[0]] + sum(lens[i] for i in u) for u in prompt_units(batch, share_prompt))


def plan_micro_batches(batch: SequenceBatch, micro_batch_size: int, max_tokens: int | None,
                       share_prompt: bool, count: int | None = None) -> list[list[int]]:
    """Which sequences (indices, in order) each micro-batch takes.

    Without a token budget: `count` contiguous runs of near-equal size (count defaults to
    ceil(n / micro_batch_size)); some may be empty when count is larger. With `max_tokens`:
    contiguous runs cut greedily so that each one's packed tokens (a shared prompt counted once)
    stay within the budget (a single longer sequence goes alone), then empty runs up to `count`.
    """
    n = len(batch)
    if max_tokens is None:
        if count is None:
            count = max(1, -(-n // micro_batch_size))
        size = max(1, -(-n // count))
        return [list(range(i * size, min(n, (i + 1) * size))) for i in range(count)]
    plan: list[list[int]] = []
    used = 0
    for i in range(n):
        run = plan[-1] if plan else None
        shares = (share_prompt and run and batch.prompt_lens[run[-1]] == batch.prompt_lens[i]
                  and batch.input_ids[run[-1]][: batch.prompt_lens[i]] == batch.input_ids[i][: batch.prompt_lens[i]])
        cost = len(batch.input_ids[i]) - (batch.prompt_lens[i] if shares else 0)
        if run is None or used + cost > max_tokens:
            plan.append([i])
            used = len(batch.input_ids[i])
        else:
            run.append(i)
            used += cost
    count = max(count or 1, len(plan))
    return plan + [[] for _ in range(count - len(plan))]


@dataclass
class PolicyOutputs:
    """What a loss function sees of one micro-batch: `loss_fn(out, mb) -> (scalar, metrics)`.

    All [B, T, ...] tensors are completion-aligned like `MicroBatch.completion_ids`: position t of
    row i belongs to the input position that predicts the row's t-th completion token.
    hidden: [B, T, H] final hidden states (after the final norm), with grad.
    lm_head_weight: [V, H] output layer (logits = hidden @ W^T), with grad. Pass it with `hidden`
        to `rl.algorithms.divergences.chunked_divergence` / `rl.algorithms.entropy.chunked_entropy` so that [B, T, V]
        logits never exist at once. None for masked-diffusion models, whose forward is the whole
        model's: `hidden` then holds the [B, T, V] logits at the answer positions (one-step
        estimator: every answer position masked), which those functions accept as such.
    temperature: the learner's logit divisor (the sampling temperature, or 1).
    teacher_hidden: [B, T, H] without grad: the teacher's hidden states at the SAME completion
        tokens, from its forward on the batch's teacher view; None when the batch has none.
    teacher_lm_head_weight: the teacher's own output layer when it is another copy (frozen or EMA
        teacher of a fully trained model); None when it is `lm_head_weight` itself.
    kept_logprobs: [B, T] per-token log-probs of the sampled tokens that the loss computed anyway,
        handed back with `keep_logprobs` (detached), so that a caller of
        `train_step(return_logprobs=True)` gets the current policy's scores without another forward.
    estimator_passes: a masked-diffusion likelihood estimator of several forwards (mc_elbo, coupled:
        rollouts.estimators): each pass's answer logits [B, T, V] with its weights [B, T]; `hidden`
        is then the first pass's logits. None for one forward (causal models, d1's one-step).
    teacher_estimator_passes: the teacher's passes over the same masks (no grad); `teacher_hidden`
        is then its first pass's logits.
    """

    hidden: torch.Tensor
    lm_head_weight: torch.Tensor
    temperature: float = 1.0
    teacher_hidden: torch.Tensor | None = None
    teacher_lm_head_weight: torch.Tensor | None = None
    kept_logprobs: torch.Tensor | None = None
    estimator_passes: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
    teacher_estimator_passes: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None

    def token_logprobs_and_entropy(self, tokens: torch.Tensor, mask: torch.Tensor, chunk_size: int = 512):
        """([B, T] log-probs of `tokens`, [B, T] entropies) under logits / temperature, chunked.

        With estimator passes, a token's log-prob is the estimator's term, the weighted sum of its
        log-probs over the passes that score it, and its entropy the mean over those passes (a
        metric: the entropy where the model cannot see the token; 0 where no pass scores it).
        """
        if self.estimator_passes is None:
            return chunked_token_logprobs_and_entropy(self.hidden, self.lm_head_weight, tokens, mask, self.temperature, chunk_size)
        logp = entropy = scored = 0
        for logits, weight in self.estimator_passes:
            lp, ent = chunked_token_logprobs_and_entropy(logits, None, tokens, mask, self.temperature, chunk_size)
            scores = weight != 0
            logp = logp + torch.where(scores, weight.to(lp.dtype) * lp, torch.zeros_like(lp))
            entropy = entropy + ent * scores
            scored = scored + scores
        return logp, entropy / torch.clamp(scored, min=1)

    def teacher_outputs(self) -> "PolicyOutputs":
        """The teacher's side as outputs of its own (detached), e.g. for its token_logprobs_and_entropy."""
        weight = self.teacher_lm_head_weight if self.teacher_lm_head_weight is not None else self.lm_head_weight
        return PolicyOutputs(self.teacher_hidden, None if weight is None else weight.detach(), self.temperature,
                             estimator_passes=self.teacher_estimator_passes)

    def keep_logprobs(self, logprobs: torch.Tensor) -> None:
        """Record this forward's [B, T] sampled-token log-probs (a loss calls it on what it computed)."""
        self.kept_logprobs = logprobs.detach()

    def logits(self) -> torch.Tensor:
        """[B, T, V] float32 logits / temperature, materialised: for small vocabularies and simple losses."""
        logits = self.hidden if self.lm_head_weight is None else torch.nn.functional.linear(self.hidden, self.lm_head_weight)
        return logits.float() / self.temperature
