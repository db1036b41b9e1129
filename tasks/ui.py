"""Results in the Prefect UI: the training curves, the model card and the Hub commit, as flow-run artifacts.

Created by the flow after each stage returns (not inside the task), so a run whose stages all
hit the cache still shows them. Plots are embedded as data-URI PNGs in markdown, the one form
both Prefect UIs render without a file server (see ptflow/publish/report.py).
"""

from __future__ import annotations

from prefect.artifacts import create_link_artifact, create_markdown_artifact

from ptflow.publish import report
from ptflow.publish.hub import PublishResult
from ptflow.store.entries import Artifact


def show_plots(plots: Artifact | None) -> None:
    if plots is not None:
        create_markdown_artifact(report.plots_markdown(plots), key="loss-plots",
                                 description="Training curves (raw and smoothed), as in the output folder's PNGs")


def show_card(card: Artifact, plots: Artifact | None) -> None:
    create_markdown_artifact(report.card_markdown(card, plots), key="model-card", description="Model card (README.md)")


def show_publish(result: PublishResult) -> None:
    create_link_artifact(result.commit_url, link_text=f"{result.repo_id} @ {result.commit_oid[:12]}",
                         key="hub-commit", description=result.commit_message)
