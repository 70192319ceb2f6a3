"""The Ray Serve application: OpenAIIngress over the engine deployment (EngineServer).

`build_app` is what the CLI runs; `app_builder` is the import path a Serve config file names
(deploy/serve_config.yaml), with its `args` checked by ServeArgs.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from cluster.engine.build import EngineOptions, check_kv_budget
from cluster.placement import bundles, check_placeable, fitted, wants_gpus
from cluster.placement_options import PlacementOptions
from cluster.serve.args import ServeArgs
from cluster.serve.engine_deployment import EngineServer
from cluster.serve.ingress import OpenAIIngress
from mixtral.checkpoint import Checkpoint
from mixtral.synthetic import resolve_checkpoint
from workers.device import HUGE_PAGES_ENV

GRPC_SERVICER = "protos.moe_pb2_grpc.add_MoEServiceServicer_to_server"


def engine_options(args: ServeArgs) -> EngineOptions:
    return EngineOptions(
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_waiting=args.max_waiting,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        kv_cache_memory_gb=args.kv_cache_memory,
        prefix_caching=args.prefix_caching,
        trace_path=args.trace_path,
    )


def build_app(args: ServeArgs) -> Application:
    checkpoint = Checkpoint.open(resolve_checkpoint(args.checkpoint))
    model_args = checkpoint.args
    engine = engine_options(args)
    check_kv_budget(model_args, engine)  # a budget too small for one sequence fails here, not in a replica
    placement = fitted(model_args, PlacementOptions(strategy=args.strategy))
    gpus, coordinator_gpu = wants_gpus(model_args, placement)
    check_placeable(bundles(model_args, placement, gpus=gpus, coordinator_gpu=coordinator_gpu), args.strategy)
    engine_server = serve.deployment(EngineServer).options(
        placement_group_bundles=bundles(model_args, placement, gpus=gpus, coordinator_gpu=coordinator_gpu),
        placement_group_strategy=args.strategy,
        ray_actor_options={
            "num_cpus": placement.coordinator_cpus,
            "num_gpus": 1 if coordinator_gpu else 0,
            "runtime_env": {"env_vars": HUGE_PAGES_ENV},
        },
        max_ongoing_requests=1024,
        health_check_period_s=10,
        health_check_timeout_s=engine.expert_timeout_s + 15,  # above check_health's own ping timeout
    )
    return OpenAIIngress.bind(  # type: ignore[attr-defined]  # serve.deployment made the class a Deployment
        engine_server.bind(checkpoint, engine, placement, gpus),
        str(checkpoint.path),
        args.model_name or checkpoint.name,
        args.guardrail,
        args.api_key,
    )


def app_builder(args: dict) -> Application:
    """For `serve run` / `serve deploy` with a config file's `args`."""
    return build_app(ServeArgs.model_validate(args))
