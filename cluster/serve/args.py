"""The application's settings: one model for the CLI's `serve` options and a Serve config file's `args`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from cluster.placement_options import Strategy
from mixtral.config import DType


class ServeArgs(BaseModel):
    """Arguments of the application, from the CLI (`moe-cluster serve` has an option per field) or a Serve config file."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key in a config file is an error, not a silent default

    checkpoint: str = Field("tiny", description="Checkpoint directory, or a preset name (tiny, mini) made on first use.")
    model_name: str | None = Field(None, description="Name clients use in 'model'; default: the checkpoint's directory name.")
    dtype: DType | None = Field(None, description="Compute dtype; default: the checkpoint's dtype.")
    max_num_seqs: int = Field(64, ge=1, description="Running sequences per replica; more requests wait in a queue.")
    max_waiting: int = Field(
        256, ge=1, description="Requests queued per replica beyond the running ones; more get 503 and Retry-After."
    )
    max_num_batched_tokens: int = Field(2048, ge=16, description="Token budget of one engine step.")
    max_model_len: int | None = Field(None, ge=2, description="Context length; default: max_position_embeddings.")
    kv_cache_memory: float | None = Field(
        None,
        gt=0,
        description="KV cache memory per replica in GiB, allocated at start as blocks; default: enough for "
        "max-num-seqs sequences of max-model-len, at most 90% of free GPU memory or 4 GiB on a CPU.",
    )
    prefix_caching: bool = Field(True, description="Share the KV blocks of common prompt prefixes between requests.")
    strategy: Strategy = Field("PACK", description="Placement strategy of a replica's placement group.")
    guardrail: bool = Field(False, description="Prepend the Mistral 7B paper's guardrail system prompt to chats.")
    api_key: str | None = Field(
        None,
        min_length=8,
        description="Require 'Authorization: Bearer KEY' over HTTP and gRPC; needed to bind a non-loopback --host.",
    )
    trace_path: str | None = Field(None, description="Record each token's chosen experts to this msgpack file.")
