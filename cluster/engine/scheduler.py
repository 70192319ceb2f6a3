"""The engine loop: continuous batching over the coordinator, admitted by free KV blocks.

Every step the scheduler builds one batch: each running sequence that is decoding feeds its last
token; sequences still prefilling feed their next chunk (as much of it as free blocks allow);
waiting requests join, oldest first, while there is token budget, a free place among max_num_seqs
and room in the KV pool, taking what the prefix cache already holds of their prompt. When a running
sequence cannot get the one block it needs, the most recently admitted sequence is preempted: its
blocks go back and it waits at the head of the queue, to be recomputed from its tokens (no request
fails for lack of memory). After the step, each sequence whose tokens are all cached samples its
next token. Finished sequences leave and free their blocks at once.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import torch

from cluster.engine.kv_manager import BlockTable, KVManager
from cluster.engine.sampling import FAILED, SamplingParams, make_generator, sample_batch
from cluster.errors import UserError


class StepModel(Protocol):
    """What the engine needs from the coordinator."""

    max_model_len: int
    vocab_size: int

    def forward(
        self, tokens: list[list[int]], *, starts: list[int], blocks: list[list[int]], first_block: list[int]
    ) -> torch.Tensor: ...


ModelT = TypeVar("ModelT", bound=StepModel)


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # when params.logprobs
    table: BlockTable = field(default_factory=BlockTable)
    num_cached: int = 0  # tokens whose keys and values are in the cache
    admitted: bool = False  # once running (a preempted sequence waits again, admitted)
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
        kv: KVManager,
        *,
        eos_token_ids: tuple[int, ...],
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
    ) -> None:
        self.model = model
        self.vocab_size = model.vocab_size
        self.kv = kv
        self.eos_token_ids = eos_token_ids
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Blocks kept free when admitting beside running sequences, so that their next decodes do
        # not at once preempt what was just admitted (vLLM's watermark).
        self.watermark = max(1, kv.num_blocks // 100)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.steps = 0
        self.preemptions = 0
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

    def stats(self) -> dict[str, float]:
        """The engine's state for operators and autoscalers: sequences, KV blocks, preemptions, prefix cache."""
        kv = self.kv
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "steps": self.steps,
            "preemptions": self.preemptions,
            "kv_blocks": kv.num_blocks,
            "kv_blocks_free": kv.num_free,
            "kv_cache_usage": kv.usage,
            "prefix_cache_queried_tokens": kv.prefix.queried_tokens,
            "prefix_cache_hit_tokens": kv.prefix.hit_tokens,
            "prefix_cache_hit_rate": kv.prefix.hit_rate,
        }

    def _schedule(self) -> list[tuple[Sequence, int]]:
        batch: dict[Sequence, int] = {}
        preemptions = self.preemptions
        # Decodes first (one token each), so a long prompt never stalls streaming sequences.
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_cached > 1):
            budget = self.max_num_batched_tokens - sum(batch.values())
            if seq not in self.running or budget == 0:  # preempted for an older sequence's block
                continue
            want = min(seq.num_tokens - seq.num_cached, budget)
            while (n := min(want, self.kv.room(seq.table, seq.num_cached))) == 0:
                victim = self.running[-1]
                self._preempt(victim)
                batch.pop(victim, None)
                if victim is seq:
                    break
            if n:
                self.kv.allocate(seq.table, seq.num_cached, n)
                batch[seq] = n
        if self.preemptions == preemptions:  # else the pool is short: admitting now would only preempt again
            self._admit(batch)
        return list(batch.items())

    def _admit(self, batch: dict[Sequence, int]) -> None:
        """Waiting requests join, oldest first, while they fit; one that does not fit stops the rest."""
        while self.waiting and len(self.running) < self.max_num_seqs:
            budget = self.max_num_batched_tokens - sum(batch.values())
            if budget == 0:
                return
            seq = self.waiting[0]
            hit = self.kv.match_prefix(seq.table, seq.tokens)
            reserve = self.watermark if self.running else 0
            n = min(seq.num_tokens - hit, budget, self.kv.room(seq.table, hit, reserve=reserve))
            if n == 0:
                self.kv.release(seq.table)
                return
            self.waiting.popleft()
            if not seq.admitted:  # a preempted sequence finding its own blocks again is no prompt hit
                self.kv.count_lookup(len(seq.prompt_ids), hit)
                seq.admitted = True
            seq.num_cached = hit
            self.kv.allocate(seq.table, hit, n)
            self.running.append(seq)
            batch[seq] = n

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it waits first in line and is recomputed from its tokens."""
        self.running.remove(seq)
        self.kv.release(seq.table)
        seq.num_cached = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def step(self) -> list[Sequence]:
        """Run one engine step; return the sequences that got a token (or finished) in it."""
        batch = self._schedule()
        if not batch:
            return []
        histories = [seq.tokens for seq, _ in batch]  # each sequence's prompt + outputs, joined once a step
        logits = self.model.forward(
            [h[seq.num_cached : seq.num_cached + n] for h, (seq, n) in zip(histories, batch)],
            starts=[seq.num_cached for seq, _ in batch],
            blocks=[seq.table.blocks for seq, _ in batch],
            first_block=[seq.table.first_block for seq, _ in batch],
        )
        self.steps += 1
        for history, (seq, n) in zip(histories, batch):
            seq.num_cached += n
            self.kv.after_step(seq.table, history, seq.num_cached)
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
            self.kv.release(seq.table)
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
