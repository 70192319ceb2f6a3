"""`moe-cluster serve`: the Serve application (ServeArgs) plus where this process listens."""

from __future__ import annotations

import ipaddress
import signal
import sys
import threading

from pydantic import Field, model_validator

from cluster.api_key import API_KEY_ENV, resolve_api_key
from cluster.cli.options import command, start_ray
from cluster.cli.root import app
from cluster.errors import UserError
from cluster.serve.args import ServeArgs


class ServeCommandArgs(ServeArgs):
    """ServeArgs, which a Serve config file gives too, and the listening addresses, which only the CLI gives.
    Several checkpoints become one `models` entry each; the other options apply to every model."""

    checkpoint: list[str] = Field(  # type: ignore[assignment]  # one or more, where ServeArgs takes one
        ["tiny"],
        description="Checkpoint directories, preset names (tiny, mini, mistral-tiny) made on first use, or Hugging Face "
        "repo ids; each is served as its own model.",
        json_schema_extra={"repeatable": True},
    )

    host: str = Field("127.0.0.1", description="HTTP address to bind; 0.0.0.0 to serve other machines (needs an API key).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port (OpenAI-compatible API under /v1).")
    grpc_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="gRPC port (moe.MoEService), e.g. 9000; it listens on every interface, so it needs an API key. 0: off.",
    )

    @model_validator(mode="after")
    def _listening(self) -> ServeCommandArgs:
        if self.api_key is not None and self.api_key_env is not None:
            return self  # ServeArgs says so
        keyed = resolve_api_key(self.api_key, self.api_key_env) is not None
        if not keyed and not is_loopback(self.host):
            raise UserError(
                f"--host {self.host} serves other machines: set --api-key, or MOE_API_KEY in the environment "
                "(clients send 'Authorization: Bearer KEY')"
            )
        if not keyed and self.grpc_port:
            raise UserError(
                "gRPC (Ray Serve's proxy) listens on every interface, whatever --host says: set --api-key "
                "(or MOE_API_KEY) to turn it on"
            )
        return self

    def app_args(self) -> ServeArgs:
        """The application's settings: one model's, or one `models` entry per checkpoint."""
        common = self.model_dump(exclude={"host", "port", "grpc_port", "checkpoint", "served_model_name"}, exclude_unset=True)
        checkpoints, names = self.checkpoint, self.names
        if len(checkpoints) == 1:
            name = names[0] if len(names) == 1 else names or None
            return ServeArgs.model_validate(common | {"checkpoint": checkpoints[0], "served_model_name": name})
        if names and len(names) != len(checkpoints):
            raise UserError(
                f"--served-model-name: with several checkpoints, give one name per checkpoint, in order "
                f"({len(checkpoints)} checkpoints, {len(names)} names)"
            )
        models = [
            {"checkpoint": c} | ({"served_model_name": n} if names else {}) for c, n in zip(checkpoints, names or checkpoints)
        ]
        return ServeArgs.model_validate(common | {"models": models})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@command(app, ServeCommandArgs, arguments=("checkpoint",))
def serve(args: ServeCommandArgs) -> None:
    """Serve one or more models over OpenAI-compatible HTTP and gRPC with Ray Serve, until Ctrl-C."""
    from ray import serve as ray_serve

    from cluster.serve.app import GRPC_SERVICER, build_app, model_settings

    app_args = args.app_args()
    if args.api_key is None and args.api_key_env is None and resolve_api_key(None, None) is not None:
        print(f"the API key is ${API_KEY_ENV}'s: clients send 'Authorization: Bearer KEY'", file=sys.stderr)
    models = model_settings(app_args)  # what cannot serve fails here, before Ray starts
    for model in models:
        model.replica.checkpoint.reader().verify()
    start_ray()
    grpc_options = {"port": args.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]} if args.grpc_port else None
    ray_serve.start(http_options={"host": args.host, "port": args.port}, grpc_options=grpc_options)
    ray_serve.run(build_app(app_args, models), name="moe", route_prefix="/")
    grpc_note = f" and gRPC on port {args.grpc_port}" if args.grpc_port else ""
    names = ", ".join(m.names[0] for m in models)
    print(f"serving {names} at http://{args.host}:{args.port}/v1{grpc_note}; Ctrl-C stops", flush=True)
    wait_for_a_stop_signal()
    print("stopping", file=sys.stderr)
    ray_serve.shutdown()


def wait_for_a_stop_signal() -> None:
    # Explicit handlers: a shell that starts us in the background sets SIGINT to ignored, and
    # SIGTERM (systemd, Kubernetes) should stop us as cleanly as Ctrl-C.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
