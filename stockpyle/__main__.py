"""``python -m stockpyle``: the command line (``demo``, ``bench``); also the ``stockpyle`` console script."""

from __future__ import annotations

from ._cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
