"""Prefect tasks: thin wrappers over ptflow's stage functions (retries, artifacts).

Importing this package keeps Prefect from printing a traceback for ptflow's own errors
(PtflowError): their message already names what is wrong and how to fix it, as the CLI prints
it. ptflow's log lines reach Prefect's run logs through Prefect's own setting
`PREFECT_LOGGING_EXTRA_LOGGERS=ptflow`, configured where Prefect is configured: the CLI's
environment for local runs, the deployments' job variables (prefect.yaml) and the worker image
for runs a worker launches — Prefect reads it when its engine starts, before this module loads.
"""

import logging

from ptflow.errors import PtflowError

logging.getLogger("ptflow").setLevel(logging.INFO)


class NoTracebackForUserErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PtflowError):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(NoTracebackForUserErrors())
