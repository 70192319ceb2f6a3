"""The application's settings: one model for the CLI's `serve` options and a Serve config file's `args`.

One served model takes its settings at the top level. Several take one entry each under `models`,
each entry the same settings as the top level (its checkpoint, name, replicas, engine options),
the top level's giving the defaults of every entry; what the endpoint has once (the API key, the
routes, how long a stream waits for a replica) stays at the top level only.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.errors import UserError
from cluster.placement_options import Strategy
from cluster.serve.routes import Split
from mixtral.config import DTypeChoice, ExpertDType

log = logging.getLogger(__name__)

# Keys of earlier releases, still read from config files (and flags, through each field's aliases).
DEPRECATED_KEYS = {"model_name": "served_model_name", "prefix_caching": "enable_prefix_caching"}
# Settings of the endpoint, given once at the top level; every other setting is a model's.
ENDPOINT_KEYS = (
    "models",
    "routes",
    "api_key",
    "api_key_env",
    "replica_wait_s",
    "moderate",
    "moderation_model",
    "moderation_threshold",
    "moderation_interval",
    "record_requests",
)


def renamed(data: dict[str, Any]) -> dict[str, Any]:
    """Settings with the keys of earlier releases in their current names (and dtype null as auto)."""
    if "dtype" in data and data["dtype"] is None:  # the way earlier releases wrote "the checkpoint's"
        data = data | {"dtype": "auto"}
    for old, new in DEPRECATED_KEYS.items():
        if old in data:
            if new in data:
                raise ValueError(f"{old} is the old name of {new}; give {new} only")
            log.warning("the setting %s is deprecated; call it %s", old, new)
            data = {k: v for k, v in data.items() if k != old} | {new: data[old]}
    return data


class ServeArgs(BaseModel):
    """Arguments of the application, from the CLI (`moe-cluster serve` has an option per field) or a Serve config file."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key in a config file is an error, not a silent default

    checkpoint: str = Field(
        "tiny",
        description="Checkpoint directory, a preset name (tiny, mini) made on first use, or a Hugging Face repo id.",
    )
    served_model_name: str | list[str] | None = Field(
        None,
        description="Name clients use in 'model'; several names for one checkpoint are aliases, the first the one "
        "answers carry (vLLM's meaning). With several checkpoints, give it once per checkpoint, in order. "
        "Default: the checkpoint's directory name or repo id. (--model-name: deprecated alias.)",
        json_schema_extra={"flags": ["--served-model-name", "--model-name"], "repeatable": True},
    )
    dtype: DTypeChoice = Field(
        "auto", description="Compute dtype; auto: the checkpoint's (workers may compute it in float32 where that is faster)."
    )
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
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="On a GPU, the fraction of the coordinator's device memory for its weights and KV cache (vLLM's "
        "meaning); default: the KV cache takes 90% of what the weights leave free. --kv-cache-memory, when given, wins.",
    )
    enable_prefix_caching: bool = Field(
        True,
        description="Share the KV blocks of common prompt prefixes between requests. (--prefix-caching: deprecated alias.)",
        json_schema_extra={
            "flags": ["--enable-prefix-caching/--no-enable-prefix-caching", "--prefix-caching/--no-prefix-caching"]
        },
    )
    strategy: Strategy = Field("PACK", description="Placement strategy of a replica's placement group.")
    experts_per_worker: int | None = Field(
        None,
        ge=1,
        description="Experts each worker holds (one call per worker and layer carries all their tokens); default: one "
        "each where every worker gets a GPU, else all in one CPU worker.",
    )
    replicate_hot: int = Field(
        0,
        ge=0,
        description="Extra expert copies spread over the workers; tokens split between copies. Rebalancing "
        "(moe-cluster experts rebalance) moves them to the experts that measured load says are hot.",
    )
    expert_map: str | None = Field(
        None,
        description="A JSON expert map's path, or the map itself: which worker holds which experts, and its kind "
        "(gpu, cpu, auto); plan --emit writes one.",
    )
    expert_dtype: ExpertDType | None = Field(
        None, description="int8: weight-only int8 experts (per-channel scales), half the bytes of bf16; default: dtype."
    )
    accelerator: Literal["auto", "gpu", "cpu"] = Field(
        "auto",
        description="gpu: the coordinator and every expert worker take a GPU (set it where an autoscaler brings "
        "the GPU nodes, so the cluster has none at start); cpu: no GPU; auto: GPUs if the cluster has one per expert.",
    )
    min_replicas: int = Field(1, ge=1, description="Engine replicas (each a coordinator and its expert workers) kept up.")
    max_replicas: int | None = Field(
        None, ge=1, description="Most engine replicas under load; above min-replicas turns autoscaling on. Default: min."
    )
    target_load: float = Field(
        0.75,
        gt=0,
        le=1,
        description="Autoscaling: replicas are added while the mean replica load exceeds this. A replica's load is "
        "the larger of (running + waiting) / max-num-seqs and its KV cache usage.",
    )
    upscale_delay_s: float = Field(5.0, ge=0, description="Autoscaling: seconds of load above target before adding a replica.")
    downscale_delay_s: float = Field(
        120.0, ge=0, description="Autoscaling: seconds of load below target before removing a replica."
    )
    replica_startup_s: float = Field(
        600.0,
        gt=0,
        description="Autoscaling: while a new replica starts (its node, its experts' weights), for at most this long, "
        "a dip in load does not cancel it.",
    )
    drain_timeout_s: float = Field(
        600.0, gt=0, description="A replica being removed takes no new requests and waits this long for its running ones."
    )
    stuck_step_s: float = Field(
        30.0,
        gt=0,
        description="GET /health answers 503 while an engine step has waited this long on its expert workers (one "
        "stopped, or being replaced); Serve's own replica health check keeps the replica, whose worker is healing.",
    )
    replica_wait_s: float = Field(
        120.0,
        gt=0,
        description="A stream whose engine replica dies goes on on another replica (or the one Serve brings back) "
        "from the tokens already sent; it waits this long for one, then ends with a 503.",
    )
    guardrail: bool = Field(False, description="Prepend the Mistral 7B paper's guardrail system prompt to chats.")
    api_key: str | None = Field(
        None,
        min_length=8,
        description="Require 'Authorization: Bearer KEY' over HTTP and gRPC; needed to bind a non-loopback --host.",
    )
    api_key_env: str | None = Field(
        None,
        min_length=1,
        description="Read the API key from this environment variable (keeps it out of config files); not with api-key.",
    )
    trace_path: str | None = Field(
        None, description="Record each token's chosen experts, one msgpack file per replica: PATH's stem + '.<replica>'."
    )
    record_requests: str | None = Field(
        None,
        min_length=1,
        description="Append each finished request's arrival, prompt and output tokens to this JSONL request trace "
        "(on the head node), for `moe-cluster replay`.",
    )
    models: list[dict[str, Any]] | None = Field(
        None,
        description="Several models behind one endpoint (a Serve config file; the CLI makes it from several "
        "checkpoints): one entry per model, each the settings above for that model (checkpoint required), "
        "the top level's as defaults. Each model is an engine deployment of its own.",
        json_schema_extra={"cli": False},
    )
    routes: list[str] = Field(
        [],
        description="Traffic splits, ALIAS=NAME:WEIGHT,NAME:WEIGHT (repeatable): requests for ALIAS go to the named "
        "models by weight, sticky per the request's 'user'. Weights change live: PUT /v1/routes/ALIAS, "
        "moe-cluster route set.",
        json_schema_extra={"flags": ["--route"], "repeatable": True},
    )

    moderate: Literal["input", "output", "both"] | None = Field(
        None,
        description="Self-moderation (the Mistral 7B paper's self-reflection): input refuses a flagged prompt with a "
        "400 (code content_filter); output ends a flagged answer with finish_reason content_filter, judged before it "
        "is sent; both. Default: off (POST /v1/moderations answers either way).",
    )
    moderation_model: str | None = Field(
        None,
        description="The served model that judges; default: for /v1/moderations the first served model, for a "
        "moderated answer the model that serves it.",
    )
    moderation_threshold: float = Field(
        0.5, ge=0, le=1, description="A text is flagged when the judge's probability of 'acceptable' is below this."
    )
    moderation_interval: int = Field(
        32, ge=1, description="--moderate output: a streamed answer is judged every this many tokens, before they are sent."
    )

    @model_validator(mode="before")
    @classmethod
    def _deprecated_keys(cls, data: Any) -> Any:
        return renamed(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _routes_and_models(self) -> ServeArgs:
        for route in self.routes:
            try:
                Split.parse(route)
            except UserError as e:
                raise ValueError(str(e)) from None
        if self.models is None:
            return self
        if not self.models:
            raise ValueError("models is empty: give one entry per model, each with its checkpoint")
        if "checkpoint" in self.model_fields_set or "served_model_name" in self.model_fields_set:
            raise ValueError("with models, give checkpoint and served_model_name in each entry, not at the top level")
        for i, entry in enumerate(self.models):
            if "checkpoint" not in entry:
                raise ValueError(f"models entry {i} has no checkpoint; each model needs one")
            if endpoint := sorted(set(entry) & set(ENDPOINT_KEYS)):
                raise ValueError(f"models entry {i} sets {', '.join(endpoint)}: the endpoint's settings go at the top level")
            try:  # each entry is checked here, so a mistake in one is reported where the file is read
                self._entry(entry)
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(map(str, first["loc"]))
                raise ValueError(
                    f"models entry {i}{f' {where}' if where else ''}: {first['msg'].removeprefix('Value error, ')}"
                ) from None
        return self

    def _entry(self, entry: dict[str, Any]) -> ServeArgs:
        """A models entry over the top level's settings: the entry's keys in their current names, and an
        entry that says where its experts go (a map, or experts per worker) not mixed with the top level's other way."""
        entry = renamed(entry)
        defaults = self.model_dump(exclude={*ENDPOINT_KEYS, "checkpoint", "served_model_name"}, exclude_unset=True)
        if {"expert_map", "experts_per_worker"} & set(entry):
            defaults = {k: v for k, v in defaults.items() if k not in ("expert_map", "experts_per_worker")}
        return ServeArgs.model_validate(defaults | entry)

    def per_model(self) -> list[ServeArgs]:
        """Each served model's settings: this one alone, or each `models` entry over the top level's."""
        if self.models is None:
            return [self]
        return [self._entry(entry) for entry in self.models]

    @property
    def names(self) -> list[str]:
        """The names given for this model (the first the one its answers carry); empty: its default."""
        name = self.served_model_name
        return [name] if isinstance(name, str) else list(name or [])

    @model_validator(mode="after")
    def _replica_bounds(self) -> ServeArgs:
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give api_key or api_key_env, not both")
        if self.expert_map is not None and self.experts_per_worker is not None:
            raise ValueError("expert_map and experts_per_worker both say where the experts go; give one of them")
        return self

    @field_validator("record_requests")
    @classmethod
    def _writable_trace(cls, path: str | None) -> str | None:
        """Absolute (the ingress actor's working directory is not the caller's), in a directory one can write."""
        if path is None:
            return None
        full = os.path.abspath(os.path.expanduser(path))
        folder = os.path.dirname(full)
        if os.path.isdir(full) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ValueError(f"{path}: give a file in a directory that exists and can be written")
        return full

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None and self.max_replicas > self.min_replicas
