"""Small DataFrame helpers the daily steps share."""

from __future__ import annotations

import numpy as np
import pandas as pd


def member(values: pd.Series, of) -> np.ndarray:
    """``values.isin(of)`` as a boolean array, by one hash lookup. pandas' ``isin`` on Arrow-backed
    strings converts every element of ``of`` to a Python scalar first: seconds for a million ids."""
    of = pd.Index(pd.unique(np.asarray(list(of) if isinstance(of, (set, frozenset)) else of, dtype=object)))
    if not len(of) or not len(values):
        return np.zeros(len(values), dtype=bool)
    return of.get_indexer(values.astype(object)) >= 0
