"""What the Prefect UI shows of a run's plots and model card, built as plain markdown (tasks/ui.py posts it).

Prefect's UI (both the default V2 React UI and the V1 Vue UI of Prefect 3.9) renders a markdown
artifact's `![alt](data:image/png;base64,...)` as an image: the V2 markdown renderer explicitly
allows `data:image/` sources. An image artifact instead needs a URL the browser can fetch (the
store is usually not served over HTTP) and, given a data URI, prints the whole base64 text
under the picture. So plots go to the UI as one markdown artifact with embedded PNGs: they
render offline, with no file server, and the artifact is self-contained in the Prefect database.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

from ptflow.store.entries import Artifact

PLOT_TITLES = {"training_loss.png": "Training loss", "training_eval_loss.png": "Eval loss",
               "training_lr.png": "Learning rate", "training_throughput.png": "Tokens/s per device"}
IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def plots_markdown(plots: Artifact) -> str:
    """Every plot of the plot_loss artifact, embedded, with a heading each."""
    names = plots.stats.get("plots", [])
    lines = ["# Training curves", ""]
    if not names:
        lines.append("No metric was logged, so nothing was plotted (see the plot_loss warnings in the log).")
    for name in names:
        lines += [f"## {PLOT_TITLES.get(name, name)}", "", f"![{name}]({data_uri(plots.dir / name)})", ""]
    return "\n".join(lines)


def card_markdown(card: Artifact, plots: Artifact | None) -> str:
    """README.md for the UI: the YAML header as a code block, plot links embedded (relative links break there)."""
    text = (card.dir / "README.md").read_text(encoding="utf-8")
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        header, body = text[4:].split("\n---\n", 1)
        text = f"```yaml\n{header}\n```\n{body}"

    def embed(match: re.Match) -> str:
        png = plots.dir / match[2] if plots else None
        return f"![{match[1]}]({data_uri(png)})" if png and png.is_file() else match[0]

    return IMAGE_LINK.sub(embed, text)

