"""A stop the user asked for (Ctrl-C, SIGTERM), remembered until the run has unwound.

Python raises KeyboardInterrupt wherever the main thread happens to be when the signal lands.
Raised inside a finalizer (`__del__`, a weakref callback: "Exception ignored in ...") or under
code that catches it, it is lost and the run carries on to the end as if nobody had asked (seen
once in CI: a Ctrl-C at step 6 of 40, and the run finished with exit 0). The handlers installed
here also record the request; the training loop and the stage runner call `check()` at each step
and stage, so a stop that was swallowed is raised again there, within one step.

The `ptflow` CLI installs them; code run elsewhere (a Prefect worker, a torchrun rank) never
sees a request and `check()` costs one comparison.
"""

from __future__ import annotations

import signal


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised where the run is so that it unwinds as a Ctrl-C does (final states, children ended)."""


_requested: type[KeyboardInterrupt] | None = None


def install() -> None:
    """Our own handlers for SIGINT and SIGTERM (which also keeps asyncio.run from swapping in its own)."""
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def _on_signal(signum: int, frame) -> None:
    global _requested
    _requested = Stopped if signum == signal.SIGTERM else KeyboardInterrupt
    raise _requested()


def check() -> None:
    """Raise the stop that was asked for, if any (again, when the first raise was swallowed)."""
    if _requested is not None:
        raise _requested()


def ignore_more() -> None:
    """While the run unwinds: a second Ctrl-C must not break the shutdown that follows."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
