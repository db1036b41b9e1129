"""The stage protocol: what the orchestrator knows of a stage, as one typed record per stage.

A stage is a plain function over its config section and input entries that returns a store
entry. Its `Stage` record names it, gives its format version, the function that computes its
key components and the function that builds it. The key is content, never code: editing a
module does not change it (a hotfix deployed mid-run keeps finished and in-flight work);
bumping `version` does, for a code change that must invalidate stored results. Library
versions that change a stage's results are part of its components.

    planned = TOKENIZER.plan(cfg.model, layout)   # key components, computed once per run
    entry = planned.build()                       # the stage function, handed those components
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ptflow.store.entries import Artifact, stage_key


@dataclass(frozen=True)
class Stage:
    name: str
    version: int
    components: Callable[..., dict]  # the stage-specific key components, from the stage function's arguments
    build: Callable[..., Artifact]  # the stage function; accepts `parts=` to reuse components computed once
    libraries: tuple[str, ...] = ()  # distributions whose version changes this stage's results

    def key_parts(self, *args: Any, **kwargs: Any) -> dict:
        """Every key component: stage, format version, library versions, config and input digests."""
        parts = {"stage": self.name, "format": self.version, **self.components(*args, **kwargs)}
        if self.libraries:
            parts["libraries"] = {name: library_version(name) for name in self.libraries}
        return parts

    def plan(self, *args: Any, **kwargs: Any) -> Planned:
        return Planned(self, args, kwargs, self.key_parts(*args, **kwargs))


@dataclass(frozen=True)
class Planned:
    """A stage bound to this run's inputs, with its key components computed once."""

    stage: Stage
    args: tuple
    kwargs: dict
    parts: dict = field(repr=False)

    @property
    def key(self) -> str:
        return stage_key(self.parts)

    def build(self, **extra: Any) -> Artifact:
        return self.stage.build(*self.args, **self.kwargs, parts=self.parts, **extra)


def library_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"
