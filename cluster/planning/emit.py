"""Deploy files from a plan: what `plan --emit DIR` writes, for a user to apply unchanged.

- serve_config.yaml: `serve run` / `serve deploy`; replica bounds and autoscaling, the plan's batch and KV budget.
- cluster.yaml: Ray's cluster launcher (AWS), a GPU worker node type sized from the plan (`ray up`).
- rayservice.yaml: a KubeRay RayService with the same Serve config, GPU requests and limits (`kubectl apply`).
- expert_map.json: the plan's expert map (which GPU or CPU worker holds which experts), for `--expert-map`;
  the Serve config carries the same map inline.

A replica is the coordinator on a GPU of its own and the map's workers: a GPU each for its GPU
workers, CPU only for its CPU worker (on a GPU node's cores).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from cluster.errors import UserError
from cluster.planning.hardware import HEAD, INSTANCES, Instance, nodes_for
from cluster.planning.planner import TierPlan
from router.expert_map import ExpertMap

API_KEY_ENV = "MOE_API_KEY"
API_KEY_SECRET = "moe-api-key"  # the Kubernetes Secret holding it (key: api-key)
HTTP_PORT = 8000
MODELS_DIR = "/home/ray/models"  # on every node: the launcher downloads here, KubeRay mounts a volume here
REPOSITORY_ON_NODES = "/home/ray/moe-cluster"
HF_TOKEN_ON_NODES = "/home/ray/hf_token"
HF_REPOS = {"mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1"}


@dataclass(frozen=True)
class DeploySpec:
    model: str  # the plan's model name: a named shape or a checkpoint directory's name
    experts: int
    plan: TierPlan
    min_replicas: int
    max_replicas: int
    checkpoint_path: str  # the checkpoint's directory on every node
    max_model_len: int | None  # None: the model's own
    image: str  # the container image KubeRay runs: Ray with this repository installed (deploy/Dockerfile)

    @property
    def gpus_per_replica(self) -> int:
        return self.plan.gpus_per_replica

    @property
    def expert_map(self) -> ExpertMap:
        assert self.plan.expert_map is not None  # deploy_spec refuses a plan without one
        return ExpertMap.from_json(self.plan.expert_map, num_experts=self.experts)

    @property
    def instance(self) -> Instance:
        if self.plan.gpu not in INSTANCES:
            raise UserError(f"no cloud node type is known for {self.plan.gpu}; --emit takes one of {', '.join(INSTANCES)}")
        return INSTANCES[self.plan.gpu]

    def nodes(self, replicas: int) -> int:
        """GPU nodes that hold `replicas` replicas (as the planner prices them: hardware.nodes_for)."""
        return nodes_for(replicas * self.gpus_per_replica, self.instance)

    @property
    def name(self) -> str:
        return "moe-" + "".join(c if c.isalnum() else "-" for c in self.model.lower()).strip("-")


def deploy_spec(
    plan: TierPlan,
    *,
    model: str,
    experts: int,
    context_length: int,
    plan_context: int,
    max_replicas: int | None,
    checkpoint_path: str | None,
    image: str,
) -> DeploySpec:
    """The files' settings from a plan. The KV budget holds the plan's batch of prompt + output tokens;
    where it cannot hold one sequence of the model's full context, max_model_len is the plan's context."""
    if not plan.fits:
        raise UserError(f"the plan does not fit ({plan.reason}); nothing to emit")
    if plan.dense:
        raise UserError(
            "--emit writes the deploy files of an expert-parallel (MoE) plan; serve a dense model with "
            "`moe-cluster serve` or as a models entry of a Serve config (docs/serving.md)"
        )
    assert plan.expert_map is not None, "an MoE plan that fits has a map (a split expert does not fit)"
    replicas = max(1, plan.replicas)
    if max_replicas is not None and max_replicas < replicas:
        raise UserError(f"--max-replicas {max_replicas} is below the {replicas} replicas the plan needs for this load")
    return DeploySpec(
        model=model,
        experts=experts,
        plan=plan,
        min_replicas=replicas,
        max_replicas=max_replicas or 2 * replicas,
        checkpoint_path=checkpoint_path or f"{MODELS_DIR}/{model}",
        max_model_len=None if plan.kv_blocks * 16 >= context_length else plan_context,
        image=image,
    )


def serve_config(spec: DeploySpec) -> dict[str, Any]:
    args: dict[str, Any] = {
        "checkpoint": spec.checkpoint_path,
        "served_model_name": spec.model,
        "accelerator": "gpu",
        "expert_map": spec.expert_map.dumps(),
        "dtype": spec.plan.dtype,  # as planned: a T4's float16, never the checkpoint's bf16 by default
        "max_num_seqs": spec.plan.batch,
        "kv_cache_memory": round(spec.plan.kv_cache_memory, 4),
        "min_replicas": spec.min_replicas,
        "max_replicas": spec.max_replicas,
        "api_key_env": API_KEY_ENV,
    }
    if spec.max_model_len is not None:
        args["max_model_len"] = spec.max_model_len
    if spec.plan.expert_dtype == "int8":
        args["expert_dtype"] = "int8"
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": HTTP_PORT},
        "applications": [{"name": "moe", "route_prefix": "/", "import_path": "cluster.serve.app:app_builder", "args": args}],
    }


def cluster_config(spec: DeploySpec) -> dict[str, Any]:
    instance, ray_version = spec.instance, version("ray")
    # Every node, the head too: the app is built there (Serve reads the checkpoint's config), and a
    # worker reads only its expert's shards. The Hugging Face token comes from ./hf_token (gated repository).
    download = (
        [
            f"test -d {spec.checkpoint_path} || hf download {HF_REPOS[spec.model]} --local-dir {spec.checkpoint_path} "
            f"--token $(cat {HF_TOKEN_ON_NODES})"
        ]
        if spec.model in HF_REPOS
        else []
    )
    return {
        "cluster_name": spec.name,
        "max_workers": spec.nodes(spec.max_replicas),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "docker": {
            "image": f"rayproject/ray:{ray_version}-py311-gpu",
            "container_name": "ray_container",
            "pull_before_run": True,
            "run_options": ["--ulimit nofile=65536:65536"],
        },
        "provider": {"type": "aws", "region": "us-west-2", "cache_stopped_nodes": False},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "head": {
                "node_config": {"InstanceType": HEAD.name},
                "resources": {"CPU": HEAD.vcpus},
                "min_workers": 0,
                "max_workers": 0,
            },
            "gpu_workers": {
                "node_config": {"InstanceType": instance.name},
                "resources": {"CPU": instance.vcpus, "GPU": instance.gpus},
                "min_workers": spec.nodes(spec.min_replicas),
                "max_workers": spec.nodes(spec.max_replicas),
            },
        },
        "head_node_type": "head",
        # The repository, from where `ray up` runs (its root), on every node; and the API key file.
        "file_mounts": {REPOSITORY_ON_NODES: ".", "/home/ray/moe_api_key": "./moe_api_key"}
        | ({HF_TOKEN_ON_NODES: "./hf_token"} if download else {}),
        # Not the key and token: their own file mounts above copy them, and an exclude would skip those.
        "rsync_exclude": [".venv", ".git", "**/__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"],
        "setup_commands": [f"pip install -e {REPOSITORY_ON_NODES}", *download],
        "head_start_ray_commands": [
            "ray stop",
            f"{API_KEY_ENV}=$(cat /home/ray/moe_api_key) ray start --head --port=6379 --dashboard-host=0.0.0.0 "
            "--object-manager-port=8076 --autoscaling-config=~/ray_bootstrap_config.yaml",
        ],
        "worker_start_ray_commands": ["ray stop", "ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076"],
    }


def rayservice(spec: DeploySpec) -> dict[str, Any]:
    instance, ray_version = spec.instance, version("ray")
    models = {"name": "models", "mountPath": MODELS_DIR, "readOnly": True}
    volumes = [{"name": "models", "persistentVolumeClaim": {"claimName": "moe-models"}}]
    gpu_resources = {
        "cpu": str(instance.vcpus - 4),  # room for the node's own daemons
        "memory": f"{instance.memory_gib - 24}Gi",
        "nvidia.com/gpu": str(instance.gpus),
    }
    api_key = {"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": API_KEY_SECRET, "key": "api-key"}}}
    head = {
        "name": "ray-head",
        "image": spec.image,
        "env": [api_key],  # the app is built on the head: ServeArgs.api_key_env reads it there
        "ports": [
            {"containerPort": 6379, "name": "gcs"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": HTTP_PORT, "name": "serve"},
        ],
        "resources": {"limits": {"cpu": "6", "memory": "24Gi"}, "requests": {"cpu": "6", "memory": "24Gi"}},
        "volumeMounts": [models],
    }
    worker = {
        "name": "ray-worker",
        "image": spec.image,
        "resources": {"limits": gpu_resources, "requests": dict(gpu_resources)},
        "volumeMounts": [models],
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": spec.name},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(spec), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": ray_version,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"idleTimeoutSeconds": 300},
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
                    "template": {"spec": {"containers": [head], "volumes": volumes}},
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "gpu-workers",
                        "replicas": spec.nodes(spec.min_replicas),
                        "minReplicas": spec.nodes(spec.min_replicas),
                        "maxReplicas": spec.nodes(spec.max_replicas),
                        "rayStartParams": {},
                        "template": {"spec": {"containers": [worker], "volumes": volumes}},
                    }
                ],
            },
        },
    }


def header(spec: DeploySpec, how: str) -> str:
    plan, expert_map = spec.plan, spec.expert_map
    gpu_workers = sum(k != "cpu" for k in expert_map.kinds)
    cpu = f" and {plan.cpu_workers} CPU worker" if plan.cpu_workers else ""
    return (
        f"# moe-cluster plan --emit: {spec.model} on {plan.gpu}, {spec.gpus_per_replica} GPUs a replica "
        f"(1 coordinator + {gpu_workers} expert workers{cpu}; {plan.expert_dtype} experts), "
        f"{spec.min_replicas}-{spec.max_replicas} replicas,\n"
        f"# batch {plan.batch} ({plan.kv_blocks} KV blocks, {plan.kv_cache_memory:.2f} GiB) per replica; "
        f"planned TPOT {plan.tpot_ms:.0f} ms, TTFT {plan.ttft_ms:.0f} ms (for the plan's --interconnect).\n"
        f"# Expert map: {expert_map.describe()}\n# {how}\n"
    )


def launch_steps(out: Path) -> str:
    """How to start the cluster and deploy: file_mounts copy the repository (the working directory) to every node."""
    try:
        here = out.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return (
            "From the repository's root, with the API key in ./moe_api_key (and a Hugging Face token in ./hf_token "
            "for a gated model): ray up cluster.yaml, "
            "then serve deploy serve_config.yaml on the head"
        )
    return (
        f"From the repository's root, with the API key in ./moe_api_key (and a Hugging Face token in ./hf_token "
        f"for a gated model): ray up {here}/cluster.yaml, then "
        f"ray exec {here}/cluster.yaml 'serve deploy {REPOSITORY_ON_NODES}/{here}/serve_config.yaml'"
    )


def write_files(spec: DeploySpec, out: Path) -> list[Path]:
    """The three files in `out`, each with a header saying what it holds and how to apply it."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "serve_config.yaml": (
            serve_config(spec),
            "serve deploy serve_config.yaml (on the cluster), or serve run serve_config.yaml",
        ),
        "cluster.yaml": (cluster_config(spec), launch_steps(out)),
        "rayservice.yaml": (
            rayservice(spec),
            f"kubectl create secret generic {API_KEY_SECRET} --from-literal=api-key=KEY; a ReadOnlyMany PVC moe-models "
            f"holding the checkpoint; {spec.image} pushed where the cluster pulls from; kubectl apply -f rayservice.yaml",
        ),
    }
    written = []
    for name, (content, how) in files.items():
        path = out / name
        path.write_text(header(spec, how) + yaml.safe_dump(content, sort_keys=False))
        written.append(path)
    spec.expert_map.write(out / "expert_map.json")
    return [*written, out / "expert_map.json"]
