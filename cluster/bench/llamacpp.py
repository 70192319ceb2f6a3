"""llama.cpp as a benchmark baseline (`bench --baseline llamacpp`), through llama-cpp-python: the same
checkpoint converted to GGUF in the same precision (cluster.bench.gguf_export), the same prompts, greedy.

Its greedy tokens are checked equal to the cluster's before anything is timed: a conversion that
changed the model would otherwise be measured as a speed. llama.cpp runs one sequence at a time here
(its high-level API has no batched decoding of several sequences), so it is measured at concurrency 1.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cluster.bench.gguf_export import write_gguf
from cluster.bench.runs import RunResult, per_request
from cluster.errors import UserError
from mixtral.checkpoint import Checkpoint

MISSING = (
    "llama-cpp-python is not installed: pip install -e '.[llamacpp]' (it builds llama.cpp from source, "
    "about five minutes on two cores)"
)


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def load_llamacpp(checkpoint: Checkpoint, dtype: str, out: Path, *, context: int, threads: int) -> Any:
    """The checkpoint as GGUF in `dtype`, loaded by llama.cpp on `threads` threads; UserError without the extra."""
    if not available():
        raise UserError(MISSING)
    window = checkpoint.args.sliding_window
    if window is not None and window < context:
        raise UserError(
            f"llama.cpp runs {checkpoint.name} without its sliding window of {window} tokens; keep prompt + output "
            f"within it ({context} asked) for a comparison of the same model"
        )
    from llama_cpp import Llama

    out.mkdir(parents=True, exist_ok=True)
    path = write_gguf(checkpoint, out / f"{checkpoint.path.name}-{dtype}.gguf", dtype=dtype)
    return Llama(model_path=str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)


def greedy(llm: Any, prompt: list[int], output_len: int) -> tuple[list[int], list[float]]:
    """`output_len` greedy tokens after `prompt` (EOS ignored, from an empty cache), and when each came."""
    llm.reset()
    tokens: list[int] = []
    times: list[float] = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        times.append(time.time())
        if len(tokens) == output_len:
            break
    return tokens, times


def check_tokens(llm: Any, prompt: list[int], expected: list[int]) -> None:
    """UserError where llama.cpp's greedy tokens differ from the cluster's: nothing to compare speeds of."""
    got, _ = greedy(llm, prompt, len(expected))
    if got != expected:
        at = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
        raise UserError(
            f"llama.cpp's greedy tokens differ from moe-cluster's from token {at} ({got[at]} against {expected[at]}): "
            "the GGUF is not the same model, so its speed would not compare; not timing it"
        )


def run_llamacpp(llm: Any, prompts: list[list[int]], output_len: int) -> RunResult:
    """The prompts one after another (llama.cpp decodes one sequence here): each request's TTFT and TPOT."""
    start = time.time()
    ttft, tpot, done = [], [], []
    for prompt in prompts:
        request_start = time.time()
        _, times = greedy(llm, prompt, output_len)
        first, per_token = per_request(request_start, times)
        ttft.append(first)
        tpot.append(per_token)
        done.append(times[-1] - start)
    wall = time.time() - start
    return RunResult(len(prompts), wall, len(prompts) * output_len, ttft, tpot, done)
