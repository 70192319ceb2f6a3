"""The engine step: continuous batching over the model runner, one scheduled batch a step.

Every step the scheduler (cluster.engine.scheduler) picks the batch and what each sequence feeds;
the model runs one forward over it; then each sequence whose tokens are all cached samples its next
token. Finished sequences leave and free their blocks at once.

A step whose model call fails (an expert lost, a timeout) changes no sequence's tokens: its
sequences are preempted, to be recomputed from their tokens, and only one that keeps failing ends
with an error (Scheduler.step_failed). What a step does to its sequences' outputs comes after
everything in it that can fail, so a failed step has streamed nothing.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Generic, Protocol, TypeVar

import torch

from cluster.engine.kv_manager import KVManager
from cluster.engine.sampling import FAILED, SamplingParams, draws_for, sample_batch
from cluster.engine.scheduler import Scheduler, SequenceState, check_request
from mixtral.step_clock import StepClock

log = logging.getLogger(__name__)


class StepModel(Protocol):
    """What the engine needs from the model runner."""

    max_model_len: int
    vocab_size: int

    def forward(
        self, tokens: list[list[int]], *, starts: list[int], blocks: list[list[int]], first_block: list[int]
    ) -> torch.Tensor: ...


ModelT = TypeVar("ModelT", bound=StepModel)
Sampled = tuple[SequenceState, int, float, list[tuple[int, float]]]  # a sequence, its token, logprob, top logprobs


class EngineCore(Generic[ModelT]):
    """The step loop: admission (by the scheduler), KV blocks, the model's forward, sampling, finishing."""

    def __init__(
        self,
        model: ModelT,
        kv: KVManager,
        *,
        eos_token_ids: tuple[int, ...],
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        clock: StepClock | None = None,
    ) -> None:
        """`clock`: where the step's parts are timed, the model runner's own (mixtral.step_clock)."""
        self.model = model
        self.clock = clock or StepClock()
        self.vocab_size = model.vocab_size
        self.kv = kv
        self.eos_token_ids = eos_token_ids
        self.scheduler = Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        self.steps = 0
        self.failed_steps = 0
        self._ids = itertools.count()

    def add_request(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str | None = None) -> SequenceState:
        self.check_request(prompt_ids, params)
        seq = SequenceState(request_id or f"req-{next(self._ids)}", list(prompt_ids), params, draws_for(params))
        self.scheduler.waiting.append(seq)
        return seq

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_request(prompt_ids, params, max_model_len=self.model.max_model_len, vocab_size=self.vocab_size)

    def abort(self, request_id: str) -> None:
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            if seq.request_id == request_id:
                self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def breakdown(self, *, reset: bool = False) -> dict[str, float]:
        """Milliseconds per step of each part since the last reset (mixtral.step_clock); `reset`: start again."""
        report = self.clock.report()
        if reset:
            self.clock.reset()
        return report

    def stats(self) -> dict[str, float]:
        """The engine's state for operators and autoscalers: sequences, KV blocks, preemptions, prefix cache."""
        kv = self.kv
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "steps": self.steps,
            "failed_steps": self.failed_steps,  # their sequences recomputed, or failed after MAX_STEP_FAILURES
            "preemptions": self.scheduler.preemptions,
            "kv_blocks": kv.num_blocks,
            "kv_blocks_free": kv.num_free,
            "kv_cache_usage": kv.usage,
            "prefix_cache_queried_tokens": kv.prefix.queried_tokens,
            "prefix_cache_hit_tokens": kv.prefix.hit_tokens,
            "prefix_cache_hit_rate": kv.prefix.hit_rate,
        }

    def step(self) -> list[SequenceState]:
        """Run one engine step; return the sequences that got a token (or finished) in it.

        When the step fails, its sequences are preempted instead, and those that failed too often
        in a row are returned, finished with "error".
        """
        clock, start = self.clock, time.perf_counter()
        with clock.timing("schedule"):
            batch = self.scheduler.schedule()
        if not batch:
            return []
        seqs = [seq for seq, _ in batch]
        try:
            sampled = self._run(batch)
        except Exception:
            self.failed_steps += 1
            log.exception("engine step failed; its %d sequences are preempted, to be recomputed", len(batch))
            return self.scheduler.step_failed(seqs)
        with clock.timing("finish"):
            self.steps += 1
            self.scheduler.step_succeeded(seqs)
            for seq, token, logprob, top in sampled:
                if token == FAILED:
                    self.scheduler.finish(seq, "error")
                    continue
                seq.output_ids.append(token)
                seq.logprobs.append(logprob)
                if seq.params.logprobs or seq.params.score_token_ids:
                    seq.top_logprobs.append(top)
                self._check_finish(seq, token)
        clock.add("step", time.perf_counter() - start)
        clock.steps += 1
        return [seq for seq, *_ in sampled]

    def _run(self, batch: list[tuple[SequenceState, int]]) -> list[Sampled]:
        """The model's forward over the batch, and the next token of each sequence whose tokens are now all cached."""
        histories = [seq.tokens for seq, _ in batch]  # each sequence's prompt + outputs, joined once a step
        logits = self.model.forward(
            [h[seq.num_cached : seq.num_cached + n] for h, (seq, n) in zip(histories, batch)],
            starts=[seq.num_cached for seq, _ in batch],
            blocks=[seq.table.blocks for seq, _ in batch],
            first_block=[seq.table.first_block for seq, _ in batch],
        )
        with self.clock.timing("sample"):
            return self._sample(batch, histories, logits)

    def _sample(self, batch: list[tuple[SequenceState, int]], histories: list[list[int]], logits: torch.Tensor) -> list[Sampled]:
        """The KV cache's bookkeeping of the step, and the next token of each sequence whose tokens are now all cached."""
        for history, (seq, n) in zip(histories, batch):
            seq.num_cached += n
            self.kv.after_step(seq.table, history, seq.num_cached)
        # Sequences whose tokens are all cached sample their next one; prompts still prefilling don't.
        rows = [row for row, (seq, _) in enumerate(batch) if seq.num_cached == seq.num_tokens]
        if not rows:
            return []
        seqs = [batch[row][0] for row in rows]
        logits = logits[rows]  # [B', V]
        generators = [seq.draws.at(seq.num_tokens) if seq.draws else None for seq in seqs]  # the next token's position
        tokens = sample_batch(logits, [seq.params for seq in seqs], generators)
        logprobs = torch.log_softmax(logits, dim=-1)  # of the model's own distribution
        chosen = logprobs.gather(1, torch.tensor(tokens).clamp_min(0)[:, None]).squeeze(1).tolist()
        tops: list[list[tuple[int, float]]] = []
        for i, seq in enumerate(seqs):
            if seq.params.score_token_ids:  # the labels asked for, in their order
                ids = list(seq.params.score_token_ids)
                tops.append(list(zip(ids, logprobs[i, ids].tolist())))
                continue
            top = torch.topk(logprobs[i], seq.params.logprobs) if seq.params.logprobs else None
            tops.append([] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))
        return list(zip(seqs, tokens, chosen, tops))

    def _check_finish(self, seq: SequenceState, token: int) -> None:
        params = seq.params
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            self.scheduler.finish(seq, "stop")
        elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.model.max_model_len:
            self.scheduler.finish(seq, "length")

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[SequenceState]:
        """Run a fixed set of requests to completion, all batched together."""
        for p, sp in zip(prompts, params, strict=True):
            self.check_request(p, sp)  # all or nothing: no request is queued if one is bad
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        while self.has_unfinished():
            self.step()
        return seqs
