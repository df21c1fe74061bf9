"""asyncio debug mode's slow-callback warnings, collected (the "no callback blocks the loop" tests)."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
from collections.abc import Callable
from typing import Any

__all__ = ["SlowCallbacks", "slow_callbacks"]


class SlowCallbacks(logging.Handler):
    """Collects asyncio debug mode's "Executing ... took N seconds" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if re.search(r"took \d+(\.\d+)? seconds", message):
            self.found.append(message)


def slow_callbacks(workload: Callable[[], Any]) -> list[str]:
    """The slow-callback warnings of asyncio debug mode while ``workload()`` runs in a new loop.

    The loop starts with a threshold of 10 s; the workload lowers it once it is warm.
    """
    handler = SlowCallbacks()
    logging.getLogger("asyncio").addHandler(handler)
    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 10.0
    gc.collect()
    gc.disable()  # a collection could stall any callback
    try:
        loop.run_until_complete(workload())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        gc.enable()
        loop.close()
        logging.getLogger("asyncio").removeHandler(handler)
    return handler.found
