"""What prepare made of the data, for people: a token-length histogram per split and a markdown section with the
counts (read, unreadable by reason, kept after deduplication, dropped, truncated) and the share of tokens the loss
sees. Prepare writes both next to its data; evaluation's report repeats the section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlora_pipeline.stages.lm.report import markdown_table


def loss_token_share(split: dict[str, Any]) -> float:
    """Labelled tokens / all tokens of a split (prepare's per-split stats)."""
    return round(split["target_tokens"]["total"] / max(1, split["tokens"]["total"]), 4)


def data_section(metrics: dict[str, Any]) -> list[str]:
    """Markdown lines from prepare's metrics (older manifests without the newer keys still render)."""
    bad = metrics.get("bad_rows") or {}
    lines = [
        "## Data",
        "",
        f"Format `{metrics.get('data_format', 'pairs')}`: {metrics['records_read']} rows read, "
        f"{sum(bad.values())} unreadable, {metrics['records_after_dedupe']} kept after deduplication "
        f"({metrics.get('multi_turn_records', 0)} multi-turn).",
        "",
    ]
    if bad:
        lines += [*markdown_table(("unreadable rows", "count"), sorted(bad.items(), key=lambda kv: -kv[1])), ""]
    rows = [
        (
            name,
            s["examples"],
            s["dropped_prompt_too_long"],
            s["truncated"],
            f"{s['tokens']['mean']:.1f}",
            s["tokens"]["max"],
            f"{loss_token_share(s):.1%}",
        )
        for name, s in metrics["splits"].items()
    ]
    header = ("split", "examples", "dropped (prompt too long)", "truncated", "mean tokens", "max tokens", "loss tokens")
    return [*lines, *markdown_table(header, rows), "", "![token lengths](token_lengths.png)", ""]


def plot_token_lengths(lengths: dict[str, list[int]], max_length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    bins = min(50, max(5, max_length // 8))
    for name, values in lengths.items():
        if values:
            ax.hist(values, bins=bins, range=(0, max_length), alpha=0.55, label=f"{name} ({len(values)})")
    ax.axvline(max_length, color="k", lw=0.8, ls="--")
    ax.set_xlabel("tokens per example (data.max_length dashed)")
    ax.set_ylabel("examples")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["data_section", "loss_token_share", "plot_token_lengths"]
