"""Prefect tasks: thin wrappers over ptflow's stage functions (cache key, retries, artifacts).

Importing this package routes the `ptflow` logger into Prefect's run logs (UI and console).
"""

import logging
import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "ptflow")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
logging.getLogger("ptflow").setLevel(logging.INFO)
