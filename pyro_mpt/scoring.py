"""Old home of the scoring engine; the names now live in :mod:`pyro_mpt.engine` and are
re-exported here so that existing imports keep working."""

from .engine import MPTEstimate, MPTOptions, prepare, score, score_masks, summarize

__all__ = ["MPTEstimate", "MPTOptions", "prepare", "score", "score_masks", "summarize"]
