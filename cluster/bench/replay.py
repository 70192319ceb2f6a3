"""Replay a request trace against a running server, open loop: each request is sent at its trace time,
whether or not the earlier ones have been answered, as users send them.

Each request is a streamed `/v1/completions` call of the trace's prompt length (token ids, so that no
tokenizer is needed on either side) for exactly its output tokens (`ignore_eos`). Its TTFT is the time
to the first streamed choice, its TPOT the time from there to the last over the tokens after the first,
its latency the whole request. The report gives each at p50, p90 and p99, the throughput, and the
goodput: the requests per second that met both targets.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

from cluster.planning.request_trace import TracedRequest
from cluster.planning.trace_report import Outcome

# Prompt token ids: byte tokens of Mistral's and Mixtral's vocabularies (<0x00>..<0xFF>), in every
# vocabulary of 259 or more, and never BOS or EOS.
PROMPT_IDS = range(3, 259)


def prompt_ids(length: int, rng: random.Random) -> list[int]:
    return [rng.choice(PROMPT_IDS) for _ in range(length)]


async def send(session: Any, url: str, headers: dict[str, str], body: dict[str, Any], sent_at: float) -> Outcome:
    """One streamed completion, timed; an HTTP error or a stream that ends in an error event is its error."""
    start = time.perf_counter()
    first = last = None
    tokens, finished = 0, False
    try:
        async with session.post(f"{url}/v1/completions", json=body, headers=headers) as response:
            if response.status != 200:
                text = await response.text()
                return Outcome(sent_at, None, None, None, 0, f"HTTP {response.status}: {text[:200]}")
            async for raw in response.content:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    finished = True
                    continue
                if not line.startswith("data: "):
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    return Outcome(sent_at, None, None, None, tokens, f"stream error: {event['error']}")
                now = time.perf_counter()
                if event.get("choices"):
                    first = first if first is not None else now
                    last = now
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except Exception as e:  # connection refused or reset: this request failed, the others go on
        return Outcome(sent_at, None, None, None, tokens, f"{type(e).__name__}: {e}")
    if not finished or first is None or last is None:  # cut off: a request that failed, not a short answer
        return Outcome(sent_at, None, None, None, tokens, "the stream ended before [DONE]" if not finished else "no token")
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return Outcome(sent_at, first - start, tpot, last - start, tokens)


async def replay(
    requests: list[TracedRequest], url: str, *, api_key: str | None, model: str, seed: int = 0
) -> tuple[list[Outcome], float]:
    """Every request sent at its trace time; (outcomes in trace order, seconds from the first send to the last answer)."""
    import aiohttp

    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def body(request: TracedRequest) -> dict[str, Any]:
        # Made when the request is due, not all up front: a public trace has millions of prompt tokens.
        return {
            "model": model,
            "prompt": prompt_ids(request.prompt_tokens, rng),
            "max_tokens": request.output_tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()

        async def at_its_time(request: TracedRequest) -> Outcome:
            await asyncio.sleep(max(0.0, request.timestamp - (time.perf_counter() - start)))
            return await send(session, url.rstrip("/"), headers, body(request), time.perf_counter() - start)

        outcomes = await asyncio.gather(*(at_its_time(r) for r in requests))
    return list(outcomes), time.perf_counter() - start
