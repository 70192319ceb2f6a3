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
    """ServeArgs, which a Serve config file gives too, and the listening addresses, which only the CLI gives."""

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
        return ServeArgs.model_validate(self.model_dump(exclude={"host", "port", "grpc_port"}))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@command(app, ServeCommandArgs, arguments=("checkpoint",))
def serve(args: ServeCommandArgs) -> None:
    """Serve the model over OpenAI-compatible HTTP and gRPC with Ray Serve, until Ctrl-C."""
    from ray import serve as ray_serve

    from cluster.serve.app import GRPC_SERVICER, build_app, replica_settings

    app_args = args.app_args()
    if args.api_key is None and args.api_key_env is None and resolve_api_key(None, None) is not None:
        print(f"the API key is ${API_KEY_ENV}'s: clients send 'Authorization: Bearer KEY'", file=sys.stderr)
    settings = replica_settings(app_args)  # what cannot serve fails here, before Ray starts
    settings.checkpoint.reader().verify()
    start_ray()
    grpc_options = {"port": args.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]} if args.grpc_port else None
    ray_serve.start(http_options={"host": args.host, "port": args.port}, grpc_options=grpc_options)
    ray_serve.run(build_app(app_args, settings), name="moe", route_prefix="/")
    grpc_note = f" and gRPC on port {args.grpc_port}" if args.grpc_port else ""
    name = args.served_model_name or settings.checkpoint.name
    print(f"serving {name} at http://{args.host}:{args.port}/v1{grpc_note}; Ctrl-C stops", flush=True)
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
