"""ptflow: pretraining of causal language models as cached, resumable stages.

The package is the Prefect-free core: every stage is a plain function here; `tasks/` and
`flows/` wrap them for Prefect. Run a config with `ptflow run configs/quickstart.yaml`.
"""

__version__ = "0.1.0"
