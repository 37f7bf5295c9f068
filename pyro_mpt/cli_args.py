"""What the ``pyro-mpt`` command line checks before any work starts, how it logs, and how
it reports progress when its output is piped.

- Argument types for :mod:`argparse` (:func:`positive_float`, :func:`figure_path`,
  :func:`output_dir`): a bad value is a usage error (exit code 2, a message naming the
  option) at parse time, not a traceback after minutes of work.
- :func:`logging_to_stderr`: the command line, being an application, configures the
  package's :data:`~pyro_mpt.progress.logger` (library code never does).
- :class:`StepReporter`: a tqdm bar on a terminal; periodic log lines otherwise (piped
  output, CI logs), so a long run is never silent.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterator

from .progress import logger, progress_bar, show_progress

__all__ = ["StepReporter", "figure_path", "logging_to_stderr", "output_dir", "positive_float"]

#: Formats matplotlib's Agg/PDF/SVG/PS backends write (``Figure.savefig``), by suffix.
FIGURE_FORMATS = ("png", "pdf", "svg", "svgz", "eps", "ps", "jpg", "jpeg", "webp", "tif", "tiff")


def positive_float(text: str) -> float:
    """An argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _writable_dir(path: str) -> str | None:
    """Why files cannot be created in directory ``path``, or ``None`` if they can."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path!r} is a file, not a directory"
    if not os.path.isdir(path):
        return f"directory {path!r} does not exist"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"directory {path!r} is not writable"
    return None


def figure_path(text: str) -> str:
    """An argparse type: a file a figure can be saved to (its directory exists and is
    writable, its suffix is a format matplotlib writes, matplotlib is installed)."""
    suffix = os.path.splitext(text)[1].lstrip(".").lower()
    if suffix not in FIGURE_FORMATS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the file name must end in one of "
            f"{', '.join('.' + f for f in FIGURE_FORMATS)} (e.g. curve.png)"
        )
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name")
    problem = _writable_dir(os.path.dirname(os.path.abspath(text)))
    if problem:
        raise argparse.ArgumentTypeError(f"cannot save {text!r}: {problem}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise argparse.ArgumentTypeError(
            "saving a figure needs matplotlib: pip install pyro-mpt[plots]"
        ) from None
    return text


def output_dir(text: str) -> str:
    """An argparse type: a directory that exists and is writable, or one that can be
    created (its nearest existing ancestor is a writable directory)."""
    path = os.path.abspath(text)
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    ancestor = path
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    problem = _writable_dir(ancestor)
    if problem:
        raise argparse.ArgumentTypeError(f"cannot write into {text!r}: {problem}")
    return text


class _OnceBelowWarning(logging.Filter):
    """Passes a message below WARNING only the first time: the package logs per call (e.g.
    the backend chosen by ``conditionals="auto"``), which a training loop repeats every
    step."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@contextlib.contextmanager
def logging_to_stderr(verbosity: int = 0) -> Iterator[logging.Handler]:
    """Send the package's log records to ``sys.stderr`` while the block runs: INFO and above
    by default, DEBUG with ``verbosity >= 1``, WARNING only with ``verbosity < 0``. The
    handler is removed afterwards, so repeated calls (tests, notebooks) do not stack.

    :param int verbosity: ``-1`` quiet, ``0`` normal, ``1`` verbose.
    """
    level = logging.DEBUG if verbosity > 0 else logging.INFO if verbosity == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_OnceBelowWarning())
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    # the command line owns stderr: no second copy through a root handler
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


class StepReporter:
    """Progress over ``total`` steps: a tqdm bar where :func:`~pyro_mpt.progress.show_progress`
    says so (a terminal); else, unless ``progress`` is False, an INFO log line on the first
    step, the last, and whenever ``every_seconds`` have passed since the previous line.

    :param int total: steps.
    :param progress: True, False or ``None`` (a bar on a terminal, log lines otherwise).
    :param str desc: what the steps are, e.g. ``"SVI"``.
    :param float every_seconds: the least time between two log lines.
    """

    def __init__(self, total: int, progress: bool | None, desc: str, every_seconds: float = 5.0):
        self.total, self.desc, self.every = total, desc, every_seconds
        self.bar = progress_bar(total, progress, desc, unit="step")
        self.log = progress is not False and not show_progress(progress, total)
        self.done, self.start, self.last = 0, time.perf_counter(), -math.inf

    def update(self, **postfix: float) -> None:
        """One step done; ``postfix`` (e.g. ``loss=1.5``) goes on the bar or the log line."""
        self.done += 1
        self.bar.update()
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        now = time.perf_counter()
        if self.log and (self.done in (1, self.total) or now - self.last >= self.every):
            self.last = now
            extra = "".join(f", {k} {v:.4g}" for k, v in postfix.items())
            logger.info(
                "%s step %d/%d%s (%.1f s)",
                self.desc,
                self.done,
                self.total,
                extra,
                now - self.start,
            )

    def close(self) -> None:
        self.bar.close()
