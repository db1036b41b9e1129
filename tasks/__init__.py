"""Prefect tasks: thin wrappers over ptflow's stage functions (cache key, retries, artifacts).

Importing this package routes the `ptflow` logger into Prefect's run logs (UI and console),
and keeps Prefect from printing a traceback for ptflow's own errors (PtflowError): their
message already names what is wrong and how to fix it, as the CLI prints it.
"""

import logging
import os

from ptflow.errors import PtflowError

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "ptflow")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
logging.getLogger("ptflow").setLevel(logging.INFO)


class NoTracebackForUserErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PtflowError):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(NoTracebackForUserErrors())
