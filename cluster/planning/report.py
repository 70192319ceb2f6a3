"""Plans for people: a table and a cost plot."""

from __future__ import annotations

import math
from pathlib import Path

from cluster.planning.hardware import HEAD
from cluster.planning.planner import TierPlan
from mixtral.kv_spec import BLOCK_SIZE

# memory_gb's keys as a reader names the GPUs (a dense model's one GPU holds everything).
ROLES = {"coordinator": "coordinator GPU", "expert": "each expert GPU", "gpu": "the GPU"}


def plan_table(plans: list[TierPlan]) -> str:
    lines = []
    for p in plans:
        lines.append(
            f"{p.tier} on {p.gpu}: {'fits' if p.fits else 'does NOT fit: ' + p.reason}"
            f"{'' if p.meets_targets else '  (misses the TTFT/TPOT targets)'}"
        )
        for role, split in p.memory_gb.items():
            parts = ", ".join(f"{k} {v:.1f} GB" for k, v in split.items() if k != "total")
            lines.append(f"  {ROLES.get(role, role)} ({split['total']:.0f} GB): {parts}")
        cpu = f" + {p.cpu_workers} CPU worker" if p.cpu_workers else ""
        lines.append(
            f"  {p.gpus_per_replica} GPUs{cpu} per replica, batch {p.batch}: TPOT {p.tpot_ms:.1f} ms, TTFT {p.ttft_ms:.0f} ms, "
            f"{p.replica_tok_s:.0f} output tok/s per replica"
        )
        if p.expert_map is not None:
            held = "; ".join(f"{w['kind']} {w['experts']}" for w in p.expert_map["workers"])
            lines.append(f"  expert map ({p.expert_dtype} experts): {held}")
        budget = math.ceil(p.kv_cache_memory * 1e4) / 1e4  # rounded up: never fewer blocks than planned
        lines.append(
            f"  KV cache: {p.kv_blocks} blocks of {BLOCK_SIZE} tokens per replica, {budget} GiB "
            f"(serve --kv-cache-memory {budget})"
        )
        nodes = f"{p.nodes} {p.node_type} nodes of " if p.node_type else ""
        cpu_nodes = f" + {p.replicas * p.cpu_workers} CPU nodes" if p.cpu_workers else ""
        lines.append(
            f"  for this load: {p.replicas} replicas on {nodes}{p.gpus} {p.gpu} GPUs{cpu_nodes} + a {HEAD.name} head, "
            f"${p.usd_per_hour:.2f}/h, ${p.usd_per_million_tokens:.2f} per million output tokens"
        )
        lines.append(
            "  per month: "
            + "; ".join(
                f"{m['tokens'] / 1e6:.0f}M tokens: {m['gpus']:.0f} GPUs ${m['usd']:,.0f} "
                f"(${m['usd_per_million']:,.2f} per million)"
                for m in p.monthly
            )
        )
    return "\n".join(lines)


def plot_costs(plans: list[TierPlan], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in plans:
        volumes = [m["tokens"] for m in p.monthly]
        ax.plot(volumes, [m["usd_per_million"] for m in p.monthly], "o-", label=f"{p.tier} on {p.gpu}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens per month")
    ax.set_ylabel("$ per million tokens")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
