"""What the Prefect UI gets: the plots embedded as data-URI PNGs, the card with its plot links embedded."""

from __future__ import annotations

import base64
import json
import re

from ptflow.publish.plot import plot_loss
from ptflow.publish.report import card_markdown, plots_markdown
from ptflow.store.entries import Artifact

DATA_URI = re.compile(r"!\[([^\]]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def logged_model(tmp_path, with_eval: bool = True) -> Artifact:
    folder = tmp_path / "model"
    folder.mkdir()
    records = [{"current_steps": s, "loss": 8.0 - 0.1 * s, "lr": 1e-3, "tokens_per_s_per_device": 900.0 + s}
               for s in range(1, 11)]
    if with_eval:
        records += [{"current_steps": 5, "eval_loss": 7.4}, {"current_steps": 10, "eval_loss": 7.0}]
    (folder / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return Artifact("train", "k" * 32, str(folder), "d" * 64, {"finetuning_type": "full"})


def test_plots_markdown_embeds_every_png_byte_for_byte(tmp_path, layout):
    plots = plot_loss(logged_model(tmp_path), layout)
    text = plots_markdown(plots)
    embedded = {alt: base64.b64decode(data) for alt, data in DATA_URI.findall(text)}
    assert list(embedded) == ["training_loss.png", "training_eval_loss.png", "training_lr.png",
                              "training_throughput.png"]
    for name, data in embedded.items():
        assert data == (plots.dir / name).read_bytes()
    assert "## Training loss" in text and "## Eval loss" in text and "## Tokens/s per device" in text


def test_plots_markdown_without_plots_says_why(tmp_path):
    empty = Artifact("plot_loss", "k" * 32, str(tmp_path), "d" * 64, {"plots": []})
    assert "nothing was plotted" in plots_markdown(empty)


def test_card_markdown_fences_the_metadata_and_embeds_plot_links(tmp_path, layout):
    plots = plot_loss(logged_model(tmp_path, with_eval=False), layout)
    card_dir = tmp_path / "card"
    card_dir.mkdir()
    (card_dir / "README.md").write_text("---\nlicense: mit\ntags:\n- ptflow\n---\n\n# tiny\n\n"
                                        "![training loss](training_loss.png)\n\n![eval loss](training_eval_loss.png)\n")
    card = Artifact("write_model_card", "c" * 32, str(card_dir), "e" * 64)
    text = card_markdown(card, plots)
    assert text.startswith("```yaml\nlicense: mit\ntags:\n- ptflow\n```\n")
    [(alt, data)] = DATA_URI.findall(text)
    assert alt == "training loss" and base64.b64decode(data) == (plots.dir / "training_loss.png").read_bytes()
    assert "![eval loss](training_eval_loss.png)" in text  # no such plot: the link is left alone
    assert card_markdown(card, None).count("](training_loss.png)") == 1
