"""Progress bars and the package's logger, in one place.

A bar is shown when ``progress`` is True, or when it is ``None`` (the default everywhere)
and there is more than one step of work and stderr is a terminal: piped output and CI logs
get no bar. What the package decides (the backend chosen, chunk sizes) goes to the
``logging`` logger ``"pyro_mpt"``.
"""

from __future__ import annotations

import logging
import sys

from .options import check_bool

__all__ = ["logger", "progress_bar", "show_progress"]

#: The package's logger; silent unless the application configures logging.
logger = logging.getLogger("pyro_mpt")


def show_progress(progress, total: int = 2) -> bool:
    """Whether to draw a bar: ``progress`` if it is a bool, else (``None``) only for more
    than one step of work on a terminal."""
    progress = check_bool("progress", progress, allow_none=True)
    if progress is not None:
        return progress
    stream = sys.stderr
    return total > 1 and bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def progress_bar(total: int, progress, desc: str, unit: str = "it"):
    """A ``tqdm`` bar over ``total`` steps, disabled as :func:`show_progress` says.

    The bar is always a real object (``update``, ``set_postfix``, ``close`` work either
    way), so callers need no branches."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, disable=not show_progress(progress, total), leave=False
    )
