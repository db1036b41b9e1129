"""The content-addressed store: entries and keys, the folder layout, what a stage will do (verdicts), lineages, output folders."""
