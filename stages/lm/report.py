"""Reports a reviewer opens without Python: Markdown tables, and a self-contained HTML page made from the Markdown.

The HTML comes from the `markdown` library (tables extension); images the page names are inlined as data URIs so
the page still shows them when it travels alone in a release bundle.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import markdown

STYLE = (
    "body{font-family:sans-serif;max-width:60rem;margin:2rem auto}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:.3rem .6rem}"
)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A pipe table, one line per row; cells are used as given (format numbers before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def html_page(markdown_text: str, title: str, images: dict[str, Path] | None = None) -> str:
    """The Markdown as one HTML page; `images` maps each image source the text names to the file to inline."""
    # Escaped first: model generations are text, never markup (`markdown` passes raw HTML through).
    body = markdown.markdown(html.escape(markdown_text, quote=False), extensions=["tables"], output_format="html")
    for src, path in (images or {}).items():
        if path.exists():
            data = base64.b64encode(path.read_bytes()).decode()
            body = body.replace(f'src="{src}"', f'src="data:image/png;base64,{data}"')
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>\n"
    )


def plot_losses(log: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    steps, losses = [e["step"] for e in log], [e["loss"] for e in log]
    ax.plot(steps, losses, lw=0.8, alpha=0.45, label="per step")
    window = 5
    if len(losses) >= window:
        smooth = [sum(losses[i - window + 1 : i + 1]) / window for i in range(window - 1, len(losses))]
        ax.plot(steps[window - 1 :], smooth, lw=1.8, label=f"{window}-step mean")
        ax.legend(frameon=False)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (reply tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
