"""The scheduling: which sequences run in a step, and how many tokens each feeds, admitted by free KV blocks.

Every step the scheduler builds one batch: each running sequence that is decoding feeds its last
token; sequences still prefilling feed their next chunk (as much of it as free blocks allow);
waiting requests join, oldest first, while there is token budget, a free place among max_num_seqs
and room in the KV pool, taking what the prefix cache already holds of their prompt. When a running
sequence cannot get the one block it needs, the most recently admitted sequence is preempted: its
blocks go back and it waits at the head of the queue, to be recomputed from its tokens (no request
fails for lack of memory). The step itself (the model's forward and the sampling) is
cluster.engine.core.EngineCore's.

A step that fails (an expert lost, a timeout) is not its sequences' fault until shown: each is
preempted the same way, to be recomputed from its tokens, and then runs in a step alone. One that
succeeds goes back to batching; one that fails MAX_STEP_FAILURES steps in a row (its last ones
alone, so no other sequence was to blame) ends with an error, and only it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cluster.engine.kv_manager import BlockTable, KVManager
from cluster.engine.sampling import Draws, SamplingParams
from cluster.errors import FieldError

MAX_STEP_FAILURES = 3  # failed steps in a row after which a sequence ends with an error


@dataclass(eq=False)
class SequenceState:
    """A request as the engine carries it: its tokens so far, its KV blocks, how it finished."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    draws: Draws | None  # None for greedy requests
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # when params.logprobs (or score_token_ids)
    table: BlockTable = field(default_factory=BlockTable)
    num_cached: int = 0  # tokens whose keys and values are in the cache
    admitted: bool = False  # once running (a preempted sequence waits again, admitted)
    failures: int = 0  # failed steps in a row with this sequence in them; while > 0 it runs alone
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
    """Raise FieldError, naming the field and saying how to fix it, for a request the engine cannot run.

    The one check of a request against the model, for the engine and the serving edges alike: the
    sampling rules, a prompt that leaves room for at least one token, prompt + max_tokens within the
    context, token ids within the vocabulary.
    """
    params.validate()
    prompt = len(prompt_ids)
    if not prompt_ids:
        raise FieldError("prompt", "the prompt is empty; give at least one token")
    if prompt >= max_model_len:
        raise FieldError(
            "prompt",
            f"this model's maximum context length is {max_model_len} tokens; the prompt has {prompt}",
            code="context_length_exceeded",
        )
    if prompt + params.max_tokens > max_model_len:
        raise FieldError(
            "max_tokens",
            f"the prompt ({prompt} tokens) plus max_tokens ({params.max_tokens}) exceeds the model's context of "
            f"{max_model_len} tokens; shorten the prompt or lower max_tokens",
        )
    if any(not 0 <= t < vocab_size for t in prompt_ids):
        raise FieldError(
            "prompt", f"prompt token ids must be in [0, {vocab_size}); the model's vocabulary has {vocab_size} tokens"
        )
    if any(not 0 <= t < vocab_size for t in params.score_token_ids):
        raise FieldError(
            "score_token_ids", f"score_token_ids must be in [0, {vocab_size}); the vocabulary has {vocab_size} tokens"
        )
    if any(not 0 <= t < vocab_size for t in params.stop_token_ids):
        raise FieldError(
            "stop_token_ids",
            f"stop_token_ids must be in [0, {vocab_size}); the model's vocabulary has {vocab_size} tokens",
        )


class Scheduler:
    """The waiting queue and the running batch over a KV pool; EngineCore asks it for each step's batch."""

    def __init__(self, kv: KVManager, *, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Blocks kept free when admitting beside running sequences, so that their next decodes do
        # not at once preempt what was just admitted (vLLM's watermark).
        self.watermark = max(1, kv.num_blocks // 100)
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []  # in admission order: the last is preempted first
        self.preemptions = 0

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[SequenceState, int]]:
        """This step's batch: each sequence to run and how many of its tokens it feeds."""
        batch: dict[SequenceState, int] = {}
        if self.waiting and self.waiting[0].failures:  # in a step alone, if it fits; else the others go on
            self._admit(batch)
            if batch:
                return list(batch.items())
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

    def _admit(self, batch: dict[SequenceState, int]) -> None:
        """Waiting requests join, oldest first, while they fit; one that does not fit stops the rest."""
        while self.waiting and len(self.running) < self.max_num_seqs:
            budget = self.max_num_batched_tokens - sum(batch.values())
            if budget == 0:
                return
            seq = self.waiting[0]
            if seq.failures and batch:  # it runs alone, so that a step failing again is its own
                return
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
            if seq.failures:
                return

    def step_failed(self, seqs: list[SequenceState]) -> list[SequenceState]:
        """The sequences of a step that failed go back to wait, first in line in their order, to be
        recomputed from their tokens; those that have now failed MAX_STEP_FAILURES steps in a row end
        with an error instead. Return these."""
        in_step, failed = set(seqs), []
        for seq in reversed(self.running[:]):  # the newest first, so that the oldest ends up first in line
            if seq not in in_step:
                continue
            seq.failures += 1
            if seq.failures >= MAX_STEP_FAILURES:
                self.finish(seq, "error")
                failed.append(seq)
            else:
                self._requeue(seq)
        return failed[::-1]

    def step_succeeded(self, seqs: list[SequenceState]) -> None:
        for seq in seqs:
            seq.failures = 0

    def _preempt(self, seq: SequenceState) -> None:
        """Requeue a running sequence for lack of blocks (a preemption, as the stats count them)."""
        self._requeue(seq)
        self.preemptions += 1

    def _requeue(self, seq: SequenceState) -> None:
        """Free a running sequence's blocks; it waits first in line and is recomputed from its tokens."""
        self.running.remove(seq)
        self.kv.release(seq.table)
        seq.num_cached = 0
        self.waiting.appendleft(seq)

    def finish(self, seq: SequenceState, reason: str) -> None:
        """The sequence leaves the queue or the batch; its blocks go back at once."""
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
            self.kv.release(seq.table)
        elif seq in self.waiting:
            self.waiting.remove(seq)
