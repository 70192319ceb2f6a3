"""Commands that talk to a running `moe-cluster serve`: `stats`, `experts rebalance`, `route set` and `replay`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.api_key import resolve_api_key
from cluster.cli.options import command, finite
from cluster.cli.root import app
from cluster.errors import UserError

DEFAULT_URL = "http://127.0.0.1:8000"


class ServerArgs(BaseModel):
    """Where the server is and the key it wants (from the option, else the environment)."""

    model_config = ConfigDict(extra="forbid")

    server: str | None = Field(None, description=f"Base URL of a running `moe-cluster serve` (as --url); default {DEFAULT_URL}.")
    url: str | None = Field(None, description=f"Base URL of a running `moe-cluster serve`; default {DEFAULT_URL}.")
    as_json: bool = Field(False, description="Print the raw JSON.", json_schema_extra={"flags": ["--json"]})
    api_key: str | None = Field(
        None, min_length=1, description="The server's API key; default: $MOE_API_KEY (keeps it off the command line)."
    )
    api_key_env: str | None = Field(None, min_length=1, description="Read the API key from this environment variable.")

    @model_validator(mode="after")
    def _one_url(self) -> ServerArgs:
        if self.server is not None and self.url is not None and self.server != self.url:
            raise ValueError("give the server's URL once: as the argument or as --url")
        return self

    @property
    def base_url(self) -> str:
        return self.url or self.server or DEFAULT_URL

    def key(self) -> str | None:
        return resolve_api_key(self.api_key, self.api_key_env)


class ModelServerArgs(ServerArgs):
    model: str | None = Field(
        None, description="Which served model (a server of several); default: the only one, else the only MoE one."
    )


class StatsArgs(ModelServerArgs):
    plot: Path | None = Field(None, description="Write a layer x expert heat map PNG here (an MoE model's).")


@command(app, StatsArgs, arguments=("server",))
def stats(args: StatsArgs) -> None:
    """Show the engine's state and usage by model, and for an MoE model how tokens spread over the experts."""
    from cluster.serve.stats_view import engine_summary, fetch_engine_stats, fetch_load, load_table, plot_heatmap

    key = args.key()
    engine = fetch_engine_stats(args.base_url, key, model=args.model)
    report = fetch_load(args.base_url, key, model=engine["model"]) if engine.get("moe", True) else None
    if args.as_json:
        print(json.dumps((report or {}) | {"engine": engine}))
    else:
        print(f"{load_table(report)}\n\n{engine_summary(engine)}" if report else engine_summary(engine))
    if args.plot and report:
        print(f"heat map: {plot_heatmap(report, args.plot)}", file=sys.stderr)


experts_app = typer.Typer(help="The expert map of a running server.", no_args_is_help=True)
app.add_typer(experts_app, name="experts")


@command(experts_app, ModelServerArgs, name="rebalance", arguments=("server",))
def rebalance(args: ModelServerArgs) -> None:
    """Recompute the expert map from the load measured since the last rebalance, and apply it live.

    Within the workers' slots: serve's --replicate-hot gives them room for copies of hot experts."""
    from cluster.serve.stats_view import post_rebalance, rebalance_summary

    result = post_rebalance(args.base_url, args.key(), model=args.model)
    print(json.dumps(result) if args.as_json else rebalance_summary(result))


route_app = typer.Typer(help="The traffic splits of a running server (serve --route).", no_args_is_help=True)
app.add_typer(route_app, name="route")


class RouteSetArgs(ServerArgs):
    alias: str = Field(description="The route's alias, as clients name it in 'model'.")
    targets: str = Field(description="NAME:WEIGHT,NAME:WEIGHT: the served models and their weights.")


@command(route_app, RouteSetArgs, name="set", arguments=("alias", "targets"))
def set_route(args: RouteSetArgs) -> None:
    """Change a route's weights live: new requests follow them; started ones stay on their model.

    Users stay where they are unless the weights move them (staged moves: 100:0, then 75:25, ...)."""
    from cluster.serve.routes import Split
    from cluster.serve.stats_view import put_route, route_summary

    Split.of(args.alias, args.targets)  # a malformed split is one line here, before any request
    result = put_route(args.base_url, args.alias, args.targets, args.key())
    print(json.dumps(result) if args.as_json else route_summary(result))


class ReplayArgs(ServerArgs):
    model: str | None = Field(None, description="Which served model; default: the only one the server lists.")
    trace: Path = Field(
        description="Requests to send: JSONL of timestamp, prompt_tokens, output_tokens; or an Azure LLM inference trace CSV."
    )
    ttft_ms: float = Field(2000.0, gt=0, description="Goodput's time-to-first-token target.")
    tpot_ms: float = Field(100.0, gt=0, description="Goodput's time-per-output-token target.")
    seed: int | None = Field(
        None,
        description="Seed of the prompts' token ids; default: a new one each run, so that a server's prefix cache "
        "does not answer a replay from the last one's prompts.",
    )

    _finite = field_validator("ttft_ms", "tpot_ms")(finite)


@command(app, ReplayArgs, arguments=("trace",))
def replay(args: ReplayArgs) -> None:
    """Send a request trace to a running server open loop, at its times, and report TTFT, TPOT, latency and goodput."""
    import asyncio
    import random

    from cluster.bench.replay import replay as send_trace
    from cluster.planning.request_trace import read_request_trace
    from cluster.planning.trace_report import report, report_text
    from cluster.serve.stats_view import fetch_json

    requests = read_request_trace(args.trace)
    served = [m["id"] for m in fetch_json(args.base_url, "/v1/models", args.key())["data"]]  # up, and the key works
    if args.model is not None and args.model not in served:
        raise UserError(f"the server serves {', '.join(served)}, not {args.model!r}; give one of them as --model")
    if args.model is None and len(served) > 1:
        raise UserError(f"the server serves {', '.join(served)}: say which with --model")
    model = args.model or served[0]
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    print(f"prompts from seed {seed} (--seed {seed} sends the same ones again)", file=sys.stderr)
    outcomes, duration = asyncio.run(send_trace(requests, args.base_url, api_key=args.key(), model=model, seed=seed))
    summary = report(outcomes, duration, ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms)
    print(json.dumps(summary) if args.as_json else report_text(summary))
