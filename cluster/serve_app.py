"""The Ray Serve application: OpenAIServer (ingress) over one EngineServer per replica group.

`build_app` is what the CLI runs; `app_builder` is the import path a Serve config file names
(deploy/serve_config.yaml), with its `args` checked by ServeArgs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application

from cluster.coordinator_actor import EngineOptions
from cluster.engine_server import EngineServer
from cluster.openai_server import OpenAIServer
from cluster.placement import PlacementOptions, bundles, wants_gpus
from mixtral.config import load_args
from mixtral.synthetic import resolve_checkpoint
from workers.device import HUGE_PAGES_ENV

GRPC_SERVICER = "protos.moe_pb2_grpc.add_MoEServiceServicer_to_server"


class ServeArgs(BaseModel):
    """Arguments of the application, from the CLI or a Serve config file."""

    checkpoint: str = Field("tiny", description="Checkpoint directory, or a preset name (tiny, mini) made on first use.")
    model_name: str | None = Field(None, description="Name clients use in 'model'; default: the checkpoint's directory name.")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="Default: the checkpoint's dtype.")
    max_num_seqs: int = Field(64, ge=1, description="Running sequences per replica; more requests wait in a queue.")
    max_num_batched_tokens: int = Field(2048, ge=16, description="Token budget of one engine step.")
    max_model_len: int | None = Field(None, ge=2, description="Context length; default: max_position_embeddings.")
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field("PACK", description="Placement strategy.")
    guardrail: bool = Field(False, description="Prepend the Mistral 7B paper's guardrail system prompt to chats.")
    trace_path: str | None = Field(None, description="Record each token's chosen experts to this msgpack file.")


def build_app(args: ServeArgs) -> Application:
    checkpoint = str(resolve_checkpoint(args.checkpoint))
    model_args = load_args(checkpoint)
    engine = EngineOptions(
        dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, trace_path=args.trace_path,
    )
    placement = PlacementOptions(strategy=args.strategy)
    gpus, coordinator_gpu = wants_gpus(model_args, placement)
    engine_server = serve.deployment(EngineServer).options(
        placement_group_bundles=bundles(model_args, placement, gpus=gpus, coordinator_gpu=coordinator_gpu),
        placement_group_strategy=args.strategy,
        ray_actor_options={
            "num_cpus": placement.coordinator_cpus, "num_gpus": 1 if coordinator_gpu else 0,
            "runtime_env": {"env_vars": HUGE_PAGES_ENV},
        },
        max_ongoing_requests=1024,
        health_check_period_s=10,
    )
    return OpenAIServer.bind(
        engine_server.bind(checkpoint, engine, placement, gpus), checkpoint, args.model_name or Path(checkpoint).name,
        args.guardrail,
    )


def app_builder(args: dict) -> Application:
    """For `serve run` / `serve deploy` with a config file's `args`."""
    return build_app(ServeArgs.model_validate(args))
