"""A running server's reports for people: the expert-load table and heat map, the engine's state and
usage, and the routes; and the calls that read or change them."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from cluster.errors import UserError
from cluster.serve.replica_registry import RETIRED


def model_query(model: str | None) -> str:
    """?model=NAME for a server of several models; nothing: the server's default (its only MoE model)."""
    return f"?{urllib.parse.urlencode({'model': model})}" if model else ""


def fetch_load(url: str, api_key: str | None = None, *, model: str | None = None) -> dict[str, Any]:
    return fetch_json(url, "/v1/experts/load" + model_query(model), api_key)


def fetch_engine_stats(url: str, api_key: str | None = None, *, model: str | None = None) -> dict[str, Any]:
    return fetch_json(url, "/v1/engine/stats" + model_query(model), api_key)


def post_rebalance(url: str, api_key: str | None = None, *, model: str | None = None) -> dict[str, Any]:
    return fetch_json(url, "/v1/experts/rebalance" + model_query(model), api_key, body={})


def put_route(url: str, alias: str, targets: str, api_key: str | None = None) -> dict[str, Any]:
    """Set a route's weights live (PUT /v1/routes/ALIAS)."""
    return fetch_json(url, f"/v1/routes/{urllib.parse.quote(alias, safe='')}", api_key, body={"targets": targets}, method="PUT")


def post_moderations(url: str, texts: list[str], api_key: str | None = None, *, model: str | None = None) -> dict[str, Any]:
    """POST /v1/moderations for these texts."""
    return fetch_json(url, "/v1/moderations", api_key, body={"input": texts} | ({"model": model} if model else {}))


def route_summary(split: dict[str, Any]) -> str:
    total = sum(t["weight"] for t in split["targets"]) or 1.0
    return f"{split['alias']} -> " + ", ".join(f"{t['model']} {t['weight'] / total:.0%}" for t in split["targets"])


def rebalance_summary(result: dict[str, Any]) -> str:
    if not result["changed"]:
        return f"balancedness {result['balancedness_before']:.3f} over {result['window_tokens']} routed tokens; the map stays"
    moved = "; ".join(f"worker {w} +{e}" for w, e in result["loaded"].items())
    return (
        f"balancedness {result['balancedness_before']:.3f} -> {result['balancedness_predicted']:.3f} (predicted from "
        f"{result['window_tokens']} routed tokens); {moved}; in {result['seconds']:.1f} s"
    )


def fetch_json(
    url: str, path: str, api_key: str | None, *, body: dict[str, Any] | None = None, method: str | None = None
) -> dict[str, Any]:
    endpoint = url.rstrip("/") + path
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        endpoint, data=data, headers=headers | ({"Content-Type": "application/json"} if data else {}), method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=600 if data else 30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise UserError(f"{endpoint} answered {e.code}: {e.read().decode(errors='replace')[:300]}") from None
    except OSError as e:
        raise UserError(f"cannot read {endpoint} ({e}); is `moe-cluster serve` running there?") from None


def load_table(report: dict[str, Any]) -> str:
    experts = report["experts"]
    head = ["layer", *[f"e{e}" for e in range(experts)], "tokens", "balanced", "entropy", "dispatch_ms"]
    rows = [head]
    for layer, counts in enumerate(report["tokens"]):
        rows.append(
            [
                str(layer),
                *[str(c) for c in counts],
                str(sum(counts)),
                f"{report['balancedness'][layer]:.3f}",
                f"{report['router_entropy'][layer]:.3f}",
                f"{report['dispatch_ms'][layer]:.2f}",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"model {report.get('model', '?')}: {report['layers']} layers, {experts} experts, top-{report['top_k']}"]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    if report.get("workers"):
        lines.append("")
        lines.append("worker  experts       tokens  calls  forward_ms  MB_in  MB_out")
        for w in report["workers"]:
            mb_in, mb_out = w["bytes_in"] / 1e6, w["bytes_out"] / 1e6
            experts = ",".join(str(e) for e in w["experts"])
            lines.append(
                f"{w['worker']:>6}  {experts:<12}  {w['tokens']:>6}  {w['calls']:>5}  {w['forward_ms']:>10.1f}  "
                f"{mb_in:>5.1f}  {mb_out:>6.1f}"
            )
    return "\n".join(lines)


def engine_summary(stats: dict[str, Any]) -> str:
    """Two lines: the sequences, and the KV cache; then, over several replicas, a line for each."""
    lines = [
        f"sequences: {stats['running']} running, {stats['waiting']} waiting, {stats['steps']} steps, "
        f"{stats['preemptions']} preempted",
        f"KV cache: {stats['kv_cache_usage']:.1%} of {stats['kv_blocks']} blocks used ({stats['kv_blocks_free']} free), "
        f"prefix cache hit rate {stats['prefix_cache_hit_rate']:.1%} "
        f"({stats['prefix_cache_hit_tokens']} of {stats['prefix_cache_queried_tokens']} prompt tokens)",
    ]
    replicas = [r for r in stats.get("replicas", []) if r["replica"] != RETIRED]
    retired = [r for r in stats.get("replicas", []) if r["replica"] == RETIRED]
    if len(replicas) > 1 or retired:
        lines.append(f"replicas: {stats['num_replicas']} serving of {len(replicas)}")
        lines += [
            f"  {r['replica']} {'serving' if r['serving'] else 'stopped'}: {r['running']} running, {r['waiting']} waiting, "
            f"{r['steps']} steps, KV {r['kv_cache_usage']:.1%}"
            for r in replicas
        ]
        lines += [f"  and {r['replicas']} gone for over an hour: {r['steps']} steps" for r in retired]
    if usage := stats.get("usage"):
        lines.append(f"usage over {usage['window_s'] / 3600:.2f} h, by model:")
        lines += [
            f"  {name}: {u['requests']} requests, {u['prompt_tokens']} prompt and {u['completion_tokens']} completion tokens"
            for name, u in usage["models"].items()
        ]
    return "\n".join(lines)


def plot_heatmap(report: dict[str, Any], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = report["share"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * report["experts"], 1.0 + 0.4 * report["layers"]))
    image = ax.imshow(share, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(report["experts"]))
    ax.set_yticks(range(report["layers"]))
    ax.set_title(f"{report.get('model', '')}: share of routed tokens")
    fig.colorbar(image, ax=ax, label="share")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
