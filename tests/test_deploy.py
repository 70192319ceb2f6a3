"""The repository's Serve config file is one that `serve run` and `serve deploy` accept."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.serve.args import ServeArgs

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "serve_config.yaml"


def test_the_serve_config_passes_serves_schema_and_its_args_pass_serve_args() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(config)
    [application] = schema.applications
    assert application.import_path == "cluster.serve.app:app_builder"
    args = ServeArgs.model_validate(application.args)
    assert args.checkpoint == "tiny" and args.api_key is None
    assert "grpc_options" not in config  # gRPC listens on every interface: off unless a key is set
