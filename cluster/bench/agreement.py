"""How far int8 experts move a model's greedy output: the same prompts, float experts against int8.

Both engines run in this process (local_engine), one after the other, over the same random
prompts. Reported per prompt: the tokens generated before the first one that differs, and over
all: the share of prompts whose whole output is identical and the share of positions before the
first difference (a difference changes everything after it, so later positions are not compared).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from tqdm import tqdm

from cluster.engine.build import EngineOptions, local_engine
from cluster.engine.sampling import SamplingParams
from mixtral.checkpoint import Checkpoint
from mixtral.config import DType, ExpertDType


@dataclass(frozen=True)
class Agreement:
    prompts: int
    max_tokens: int
    identical: int  # prompts whose outputs are the same token for token
    agreeing_prefix: list[int]  # per prompt: tokens before the first difference

    @property
    def prefix_share(self) -> float:
        return sum(self.agreeing_prefix) / (self.prompts * self.max_tokens)

    def summary(self, name: str, expert_dtype: str) -> str:
        return (
            f"{name}: {expert_dtype} experts against float, greedy, {self.prompts} prompts x {self.max_tokens} tokens: "
            f"{self.identical}/{self.prompts} outputs identical; {self.prefix_share:.1%} of tokens before the first "
            f"difference (median {statistics.median(self.agreeing_prefix):g})"
        )


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def greedy_agreement(
    checkpoint: Checkpoint,
    *,
    expert_dtype: ExpertDType,
    dtype: DType = "float32",
    prompts: int = 16,
    prompt_len: int = 32,
    max_tokens: int = 64,
    seed: int = 0,
) -> Agreement:
    g = torch.Generator().manual_seed(seed)
    batch = [torch.randint(3, checkpoint.args.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(prompts)]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)] * prompts
    outputs = []
    for quantized in tqdm([None, expert_dtype], desc="float, then int8 experts", unit="engine"):
        engine = local_engine(checkpoint, EngineOptions(dtype=dtype, expert_dtype=quantized, max_num_seqs=prompts))
        outputs.append([seq.output_ids for seq in engine.generate(batch, params)])
        del engine
    prefixes = [agreeing_prefix(a, b) for a, b in zip(*outputs)]
    return Agreement(prompts, max_tokens, sum(p == max_tokens for p in prefixes), prefixes)
