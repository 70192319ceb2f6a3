"""The engine loop on its own thread, with an asyncio stream per request.

Only the loop thread touches the EngineCore: requests and aborts reach it through an inbox, and its
tokens go back to each request's asyncio queue with call_soon_threadsafe. The thread sleeps on
an event while there is no work, so an idle server costs no CPU.

Failures stay with their request: a request the engine cannot take, or whose sampling fails, ends
alone with an "error" event. A step whose model call fails costs its requests a recompute, not
their streams (EngineCore.step); only a request that fails step after step, alone, gets an error.
Either way the loop goes on with the work that remains, healthy. Should the loop itself die, every
open stream gets an error and `is_alive` turns false at once, so health checks fail.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from cluster.engine.core import EngineCore
from cluster.engine.protocol import EngineOverloaded, EngineUnavailable, TokenEvent
from cluster.engine.sampling import SamplingParams
from cluster.engine.scheduler import SequenceState
from workers.telemetry import Telemetry

log = logging.getLogger(__name__)


Sink = Callable[[TokenEvent], None]
COUNTERS = {  # Prometheus counter: the engine stat it follows
    "moe_num_preemptions": "preemptions",
    "moe_prefix_cache_queries": "prefix_cache_queried_tokens",
    "moe_prefix_cache_hits": "prefix_cache_hit_tokens",
}
ERROR = TokenEvent(-1, 0.0, [], "error")


def _send(sink: Sink, event: TokenEvent) -> None:
    """Hand an event to a request's stream; a stream whose event loop is gone must not end the engine loop."""
    try:
        sink(event)
    except Exception:
        log.exception("could not deliver an event to a request's stream")


class AsyncEngine:
    def __init__(self, engine: EngineCore, telemetry: Telemetry | None = None, *, max_waiting: int | None = None) -> None:
        self.engine = engine
        self.telemetry = telemetry or Telemetry("")
        self.max_waiting = max_waiting  # None: unbounded; else requests beyond it are refused (EngineOverloaded)
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._published: dict[str, float] = {}  # counters' values when last sent to Prometheus
        self._wake = threading.Event()
        self._stopped = False
        # Held while adding to the inbox and while the dying loop drains it for the last time, so
        # no request can slip in after that drain and wait forever.
        self._inbox_lock = threading.Lock()
        self._adds_in_inbox = 0
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    async def stream(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[TokenEvent]:
        """Tokens of one request as they are made. Leaving early (a client gone) aborts it.

        Raises UserError for a request the engine cannot run, EngineOverloaded when the waiting
        queue is full, EngineUnavailable when the loop has died; all before anything is queued.
        """
        self.engine.check_request(prompt_ids, params)  # a bad request fails here, before queueing
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        with self._inbox_lock:
            if self._stopped:
                raise EngineUnavailable("the engine loop has stopped; this replica is being replaced")
            if self.max_waiting is not None and self.queued() >= self.max_waiting:
                raise EngineOverloaded(f"{self.queued()} requests are waiting, the most this replica queues; retry shortly")
            self._adds_in_inbox += 1
            self._inbox.put(("add", request_id, prompt_ids, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)))
        self._wake.set()
        finished, arrival, previous = False, time.perf_counter(), None
        try:
            while not finished:
                event = await events.get()
                finished = event.finish_reason is not None
                previous = self._observe_token(arrival, previous, len(prompt_ids) if finished else None)
                yield event
        finally:
            if not finished:
                self.abort(request_id)

    def _observe_token(self, arrival: float, previous: float | None, prompt_tokens: int | None) -> float:
        """Latency metrics of one request's token; prompt_tokens is given on its last token."""
        now, t = time.perf_counter(), self.telemetry
        if previous is None:
            t.observe("moe_time_to_first_token_seconds", now - arrival)
        else:
            t.observe("moe_inter_token_latency_seconds", now - previous)
        t.inc("moe_generation_tokens")
        if prompt_tokens is not None:
            t.observe("moe_e2e_request_latency_seconds", now - arrival)
            t.inc("moe_prompt_tokens", prompt_tokens)
        return now

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def queued(self) -> int:
        """Requests not yet running: in the inbox or the engine's waiting queue."""
        return self._adds_in_inbox + len(self.engine.scheduler.waiting)

    def stats(self) -> dict[str, float]:
        return self.engine.stats() | {"waiting": self.queued()}

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()

    def _inbox_messages(self) -> Iterator[tuple[Any, ...]]:
        """What has arrived in the inbox, until it is empty."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drain_inbox(self) -> None:
        for message in self._inbox_messages():
            if message[0] == "add":
                _, request_id, prompt_ids, params, sink = message
                with self._inbox_lock:
                    self._adds_in_inbox -= 1
                try:
                    self.engine.add_request(prompt_ids, params, request_id=request_id)
                except Exception:
                    log.exception("request %s could not be queued; it alone ends with an error", request_id)
                    _send(sink, ERROR)
                    continue
                self._sinks[request_id] = sink
            else:
                self._sinks.pop(message[1], None)
                self.engine.abort(message[1])

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException:  # the thread ends here either way; what matters is what follows
            log.exception("the engine loop died; failing every open request")
        finally:
            with self._inbox_lock:
                self._stopped = True  # is_alive() is false from here on: health fails at once
                self._fail(self.engine.scheduler.running + list(self.engine.scheduler.waiting))
                self._drain_inbox_as_errors()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait()
            self._wake.clear()  # before draining: a request that arrives later sets it again
            self._drain_inbox()
            while self.engine.has_unfinished() and not self._stopped:
                try:
                    updated = self.engine.step()
                except Exception:
                    # Not the model's failure (EngineCore.step recovers from those) but the engine's
                    # own, in the midst of its bookkeeping: the requests it was running end, and
                    # should none be running, those waiting, so that the loop cannot spin on them.
                    log.exception("engine step failed outside the model; failing the requests it held")
                    scheduler = self.engine.scheduler
                    self._fail(list(scheduler.running) or list(scheduler.waiting))
                    updated = []
                for seq in updated:
                    self._emit(seq)
                self._drain_inbox()
                self._publish()

    def _publish(self) -> None:
        """The engine's gauges, and its counters' growth since the last step, to Prometheus."""
        stats, t = self.engine.stats(), self.telemetry
        t.set("moe_num_requests_running", stats["running"])
        t.set("moe_num_requests_waiting", stats["waiting"])
        t.set("moe_kv_cache_usage_perc", stats["kv_cache_usage"])
        t.set("moe_kv_cache_free_blocks", stats["kv_blocks_free"])
        for metric, key in COUNTERS.items():
            t.inc(metric, stats[key] - self._published.get(key, 0))
            self._published[key] = stats[key]

    def _emit(self, seq: SequenceState) -> None:
        sink = self._sinks.get(seq.request_id)
        if sink is None:
            return
        if seq.finish_reason == "error":
            _send(sink, ERROR)
        else:
            top = seq.top_logprobs[-1] if seq.params.logprobs or seq.params.score_token_ids else []
            _send(sink, TokenEvent(seq.output_ids[-1], seq.logprobs[-1], top, seq.finish_reason))
        if seq.finished:
            del self._sinks[seq.request_id]

    def _fail(self, seqs: list[SequenceState]) -> None:
        """End these sequences with an error event each."""
        for seq in seqs:
            self.engine.abort(seq.request_id)
            sink = self._sinks.pop(seq.request_id, None)
            if sink is not None:
                _send(sink, ERROR)

    def _drain_inbox_as_errors(self) -> None:
        for message in self._inbox_messages():
            if message[0] == "add":
                self._adds_in_inbox -= 1
                _send(message[-1], ERROR)
