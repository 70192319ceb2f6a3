"""The Ray Serve application: OpenAIIngress over one engine deployment (EngineServer) per served model.

`build_app` is what the CLI runs; `app_builder` is the import path a Serve config file names
(deploy/serve_config.yaml), with its `args` checked by ServeArgs. One model's deployment is
called EngineServer; with several, the others are EngineServer-<name>, each its own replicas and autoscaling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import ray
from ray import serve
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, DeploymentActorConfig

from cluster.api_key import resolve_api_key
from cluster.engine.build import EngineOptions, check_dense_options, check_kv_budget
from cluster.errors import UserError
from cluster.placement import bundles, check_placeable, check_placeable_together, fitted, layout_here
from cluster.placement_options import PlacementOptions, resolve_expert_map
from cluster.serve.args import ServeArgs
from cluster.serve.autoscaling import EngineLoadPolicy
from cluster.serve.engine_deployment import EngineServer
from cluster.serve.ingress import ON_HEAD, ModelEntry, OpenAIIngress
from cluster.serve.moderation import ModerationSettings
from cluster.serve.replica_registry import REGISTRY_ACTOR, ReplicaRegistry
from cluster.serve.routes import RouteTable, Split
from mixtral.checkpoint import Checkpoint
from mixtral.config import ModelArgs, chosen_dtype
from mixtral.synthetic import open_checkpoint
from router.expert_map import ExpertMap
from workers.device import ACTOR_ENV

GRPC_SERVICER = "protos.moe_pb2_grpc.add_MoEServiceServicer_to_server"
# How often a replica hands Serve its record_autoscaling_stats (Serve's default is 10 s): an LLM
# engine's queue fills in seconds, and the policy's decisions are only as fresh as this.
AUTOSCALING_METRICS_PUSH_S = "2"
ACCELERATOR = {"auto": None, "gpu": True, "cpu": False}


def engine_options(args: ServeArgs) -> EngineOptions:
    return EngineOptions(
        dtype=chosen_dtype(args.dtype),
        max_num_seqs=args.max_num_seqs,
        max_waiting=args.max_waiting,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        kv_cache_memory_gb=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        prefix_caching=args.enable_prefix_caching,
        trace_path=args.trace_path,
        expert_dtype=args.expert_dtype,
        stuck_step_s=args.stuck_step_s,
    )


def expert_map(args: ServeArgs, model_args: ModelArgs) -> ExpertMap | None:
    return resolve_expert_map(
        model_args.num_local_experts,
        experts_per_worker=args.experts_per_worker,
        replicate_hot=args.replicate_hot,
        map_path=args.expert_map,
        dense=None if model_args.is_moe else (args.names or [args.checkpoint])[0],
    )


@dataclass(frozen=True)
class ReplicaSettings:
    """What every engine replica of one served model is, resolved once from the settings and checked
    before any actor starts: its checkpoint (named as served), its engine's options and its expert
    map (None: cluster.placement.default_map, or a dense model's none)."""

    checkpoint: Checkpoint
    engine: EngineOptions
    expert_map: ExpertMap | None


@dataclass(frozen=True)
class ModelSettings:
    """One served model: its settings (ServeArgs.per_model), its names, its replicas' settings."""

    args: ServeArgs
    names: tuple[str, ...]
    replica: ReplicaSettings


def replica_settings(args: ServeArgs) -> ReplicaSettings:
    """UserError (or CheckpointError) for settings no replica could serve: a KV budget too small for one
    sequence, a map that cannot serve, an MoE option for a dense model, a checkpoint that cannot be opened."""
    opened = open_checkpoint(args.checkpoint)
    checkpoint = replace(opened, served_name=(args.names or [opened.name])[0])
    engine = engine_options(args)
    check_kv_budget(checkpoint.args, engine)
    check_dense_options(checkpoint.args, engine, name=checkpoint.name)
    return ReplicaSettings(checkpoint, engine, expert_map(args, checkpoint.args))


def model_settings(args: ServeArgs) -> list[ModelSettings]:
    """Every served model's settings, checked: each model's (replica_settings), names that clash, routes
    to models not served."""
    models = []
    for model_args in args.per_model():
        replica = replica_settings(model_args)
        models.append(ModelSettings(model_args, tuple(model_args.names or [replica.checkpoint.name]), replica))
    names = [n for m in models for n in m.names]
    if clash := sorted({n for n in names if names.count(n) > 1}):
        raise UserError(f"several served models are called {', '.join(map(repr, clash))}; give each its own served_model_name")
    RouteTable(map(Split.parse, args.routes), names)  # raises for a route to a model not served
    deployment_names(models)  # raises for names that Serve would spell alike
    if args.moderation_model is not None and args.moderation_model not in names:
        raise UserError(f"--moderation-model {args.moderation_model!r} is not a served model; name one of {', '.join(names)}")
    return models


def deployment_names(models: list[ModelSettings]) -> list[str]:
    """EngineServer for the first model, EngineServer-<name> for each other: a model's deployment keeps
    its name when models are added after it, so `serve deploy` does not restart its replicas."""
    names = ["EngineServer"] + [f"EngineServer-{re.sub(r'[^A-Za-z0-9_.-]', '_', m.names[0])}" for m in models[1:]]
    if len(set(names)) < len(names):
        raise UserError(
            f"the served names {', '.join(m.names[0] for m in models)} give two deployments one name once "
            "spelled for Serve (letters, digits, _ . -); rename one"
        )
    return names


def engine_deployment(model: ModelSettings, name: str) -> tuple[Application, list[dict[str, float]] | None]:
    """One served model's engine deployment (its replicas' placement groups, health checks, scaling), and
    a replica's bundles where they were checked against the cluster (None: GPUs an autoscaler may bring)."""
    args, settings = model.args, model.replica
    checkpoint, engine, model_args = settings.checkpoint, settings.engine, settings.checkpoint.args
    placement = fitted(
        model_args,
        PlacementOptions(strategy=args.strategy, use_gpus=ACCELERATOR[args.accelerator], expert_map=settings.expert_map),
    )
    layout = layout_here(model_args, placement)
    replica_bundles = bundles(layout, placement)
    if args.accelerator != "gpu":  # asked-for GPUs may be on nodes an autoscaler has yet to start
        check_placeable(replica_bundles, args.strategy)
    engine_server = serve.deployment(EngineServer).options(
        name=name,
        placement_group_bundles=replica_bundles,
        placement_group_strategy=args.strategy,
        ray_actor_options={
            "num_cpus": placement.coordinator_cpus,
            "num_gpus": 1 if layout.coordinator_gpu else 0,
            "runtime_env": {
                "env_vars": ACTOR_ENV | {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": AUTOSCALING_METRICS_PUSH_S}
            },
        },
        max_ongoing_requests=1024,
        health_check_period_s=10,
        health_check_timeout_s=engine.expert_timeout_s + 15,  # above check_health's own ping timeout
        # Scale-down drains: Serve stops routing to the replica and waits for its running requests.
        graceful_shutdown_timeout_s=args.drain_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
        deployment_actors=[
            DeploymentActorConfig(
                name=REGISTRY_ACTOR, actor_class=ray.remote(ReplicaRegistry), actor_options={"num_cpus": 0, "resources": ON_HEAD}
            )
        ],
        **replicas(args),
    )
    checked = replica_bundles if args.accelerator != "gpu" else None
    return engine_server.bind(checkpoint, engine, placement, layout), checked


def build_app(args: ServeArgs, models: list[ModelSettings] | None = None) -> Application:
    """The application; `models`: model_settings(args), where the caller resolved them already."""
    models = models or model_settings(args)
    deployments = [engine_deployment(m, name) for m, name in zip(models, deployment_names(models))]
    if len(models) > 1:  # each model's replica fits alone; one of each must fit together
        check_placeable_together(
            [(m.names[0], bundles, m.args.strategy) for m, (_, bundles) in zip(models, deployments) if bundles is not None]
        )
    engines = {m.names[0]: app for m, (app, _) in zip(models, deployments)}
    entries = [ModelEntry(m.names, m.replica.checkpoint, m.args.guardrail) for m in models]
    moderation = ModerationSettings.of(
        args.moderate,
        model=args.moderation_model,
        threshold=args.moderation_threshold,
        interval=args.moderation_interval,
    )
    return OpenAIIngress.bind(  # type: ignore[attr-defined]  # serve.deployment made the class a Deployment
        engines,
        entries,
        api_key(args),
        routes=tuple(args.routes),
        replica_wait_s=args.replica_wait_s,
        moderation=moderation,
        record_requests=args.record_requests,
    )


def replicas(args: ServeArgs) -> dict[str, object]:
    """num_replicas, or an autoscaling_config on the engine's load (cluster.serve.autoscaling)."""
    if not args.autoscaling:
        return {"num_replicas": args.min_replicas}
    return {
        "autoscaling_config": AutoscalingConfig(
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            upscale_delay_s=args.upscale_delay_s,
            downscale_delay_s=args.downscale_delay_s,
            metrics_interval_s=float(AUTOSCALING_METRICS_PUSH_S),
            look_back_period_s=max(2 * float(AUTOSCALING_METRICS_PUSH_S), 5.0),
            policy=AutoscalingPolicy(
                policy_function=EngineLoadPolicy,
                policy_kwargs={"target_load": args.target_load, "startup_s": args.replica_startup_s},
            ),
        )
    }


def api_key(args: ServeArgs) -> str | None:
    """The key clients must send: the setting, else the environment where the app is built (cluster.api_key)."""
    return resolve_api_key(args.api_key, args.api_key_env)


def app_builder(args: dict) -> Application:
    """For `serve run` / `serve deploy` with a config file's `args`."""
    return build_app(ServeArgs.model_validate(args))
