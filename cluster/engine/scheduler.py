"""The engine loop: continuous batching over the coordinator.

Every step the scheduler builds one batch: each running sequence that is decoding feeds its last
token; sequences still prefilling feed their next chunk; waiting requests join while there are
free sequence slots and token budget left. After the step, each sequence whose tokens are all
cached samples its next token. Finished sequences leave and free their KV slot at once.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import torch

from cluster.engine.sampling import FAILED, SamplingParams, make_generator, sample_batch
from cluster.errors import UserError


class StepModel(Protocol):
    """What the engine needs from the coordinator."""

    max_model_len: int
    vocab_size: int

    def forward(self, tokens: list[list[int]], *, slots: list[int], starts: list[int]) -> torch.Tensor: ...


ModelT = TypeVar("ModelT", bound=StepModel)


class SlotAllocator(Protocol):
    @property
    def free_slots(self) -> int: ...

    def allocate(self) -> int: ...

    def release(self, slot: int) -> None: ...


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # when params.logprobs
    slot: int = -1
    num_cached: int = 0  # tokens whose keys and values are in the cache
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def check_request(prompt_ids: list[int], params: SamplingParams, *, max_model_len: int, vocab_size: int) -> None:
    """Raise UserError, saying how to fix it, for a request the engine cannot run."""
    params.validate()
    if not prompt_ids:
        raise UserError("the prompt is empty; give at least one token")
    if len(prompt_ids) + params.max_tokens > max_model_len:
        raise UserError(
            f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
            f"model's context of {max_model_len} tokens; shorten the prompt or lower max_tokens"
        )
    if any(not 0 <= t < vocab_size for t in prompt_ids):
        raise UserError(f"prompt token ids must be in [0, {vocab_size}); the model's vocabulary has {vocab_size} tokens")
    if any(not 0 <= t < vocab_size for t in params.stop_token_ids):
        raise UserError(f"stop_token_ids must be in [0, {vocab_size}); the model's vocabulary has {vocab_size} tokens")


class Engine(Generic[ModelT]):
    def __init__(
        self,
        model: ModelT,
        slots: SlotAllocator,
        *,
        eos_token_ids: tuple[int, ...],
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
    ) -> None:
        self.model = model
        self.vocab_size = model.vocab_size
        self.slots = slots
        self.eos_token_ids = eos_token_ids
        self.max_num_seqs = min(max_num_seqs, slots.free_slots)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.steps = 0
        self._ids = itertools.count()

    def add_request(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str | None = None) -> Sequence:
        self.check_request(prompt_ids, params)
        seq = Sequence(request_id or f"req-{next(self._ids)}", list(prompt_ids), params, make_generator(params))
        self.waiting.append(seq)
        return seq

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_request(prompt_ids, params, max_model_len=self.model.max_model_len, vocab_size=self.vocab_size)

    def abort(self, request_id: str) -> None:
        for seq in [*self.waiting, *self.running]:
            if seq.request_id == request_id:
                self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _schedule(self) -> list[tuple[Sequence, int]]:
        budget, batch = self.max_num_batched_tokens, []
        # Decodes first (one token each), so a long prompt never stalls streaming sequences.
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_cached):
            n = min(seq.num_tokens - seq.num_cached, budget)
            if n > 0:
                batch.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            seq.slot = self.slots.allocate()
            self.running.append(seq)
            n = min(seq.num_tokens, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    def step(self) -> list[Sequence]:
        """Run one engine step; return the sequences that got a token (or finished) in it."""
        batch = self._schedule()
        if not batch:
            return []
        logits = self.model.forward(
            [seq.tokens[seq.num_cached : seq.num_cached + n] for seq, n in batch],
            slots=[seq.slot for seq, _ in batch],
            starts=[seq.num_cached for seq, _ in batch],
        )
        self.steps += 1
        for seq, n in batch:
            seq.num_cached += n
        # Sequences whose tokens are all cached sample their next one; prompts still prefilling don't.
        rows = [row for row, (seq, _) in enumerate(batch) if seq.num_cached == seq.num_tokens]
        if not rows:
            return []
        seqs = [batch[row][0] for row in rows]
        logits = logits[rows]  # [B', V]
        tokens = sample_batch(logits, [seq.params for seq in seqs], [seq.generator for seq in seqs])
        logprobs = torch.log_softmax(logits, dim=-1)  # of the model's own distribution
        chosen = logprobs.gather(1, torch.tensor(tokens).clamp_min(0)[:, None]).squeeze(1).tolist()
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            if token == FAILED:
                self._finish(seq, "error")
                continue
            seq.output_ids.append(token)
            seq.logprobs.append(chosen[i])
            if seq.params.logprobs:
                top = torch.topk(logprobs[i], seq.params.logprobs)
                seq.top_logprobs.append(list(zip(top.indices.tolist(), top.values.tolist())))
            self._check_finish(seq, token)
        return seqs

    def _check_finish(self, seq: Sequence, token: int) -> None:
        params = seq.params
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            self._finish(seq, "stop")
        elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.model.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
            self.slots.release(seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Sequence]:
        """Run a fixed set of requests to completion, all batched together."""
        for p, sp in zip(prompts, params, strict=True):
            self.check_request(p, sp)  # all or nothing: no request is queued if one is bad
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        while self.has_unfinished():
            self.step()
        return seqs
