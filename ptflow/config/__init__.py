"""The run config: typed sections (schema), reading files and overrides (loading), the LLaMA-Factory mapping."""
