"""Log lines and progress bars on one terminal: a log line never lands on the end of a bar.

The training and tokenizing bars (tqdm) redraw their line in place; Prefect's console handler
prints log lines to the same terminal, so without care a line starts where the bar stopped.
`keep_bars_apart()` wraps every console handler so that each line is printed with the bars
cleared first and redrawn after (tqdm's `external_write_mode`).
"""

from __future__ import annotations

import logging

from prefect.logging.handlers import PrefectConsoleHandler
from tqdm import tqdm


class _ClearBars(logging.Handler):
    """Hands each record to `inner` with every progress bar cleared from the terminal meanwhile."""

    def __init__(self, inner: logging.Handler):
        super().__init__(inner.level)
        self.inner = inner

    def emit(self, record: logging.LogRecord) -> None:
        with tqdm.external_write_mode(file=getattr(self.inner, "stream", None)):
            self.inner.handle(record)


def keep_bars_apart() -> None:
    """Wrap the console handlers of every logger (Prefect's, and ptflow's that Prefect attaches)."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for logger in loggers:
        logger.handlers = [_ClearBars(h) if isinstance(h, PrefectConsoleHandler) else h for h in logger.handlers]
