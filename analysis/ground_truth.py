"""Ground truth of the synthetic data: which parts were planted to tell each species from its look-alikes.

Read by the scoring steps only (``analysis.localization``, the report);
nothing that finds or ranks traits looks at it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def _names(parts: Any) -> set[str]:
    """A ``differing_parts`` cell (list, numpy array, None or NaN) as a set of part names."""
    if parts is None or (isinstance(parts, float) and np.isnan(parts)):
        return set()
    return {str(p) for p in np.asarray(parts).tolist()}


def planted_parts_by_class(pairs: pd.DataFrame | None) -> dict[int, set[str]]:
    """Per class, the parts that tell it from at least one look-alike (the union over its pairs).

    Args:
        pairs: ``lookalike_pairs.parquet`` rows (class_a, class_b, differing_parts). None, or a
            table without ``differing_parts`` (data without planted traits, e.g. real CUB),
            gives an empty dict.
    """
    planted: dict[int, set[str]] = {}
    if pairs is None or "differing_parts" not in pairs:
        return planted
    for a, b, parts in zip(pairs["class_a"], pairs["class_b"], pairs["differing_parts"]):
        for cls in (int(a), int(b)):
            planted.setdefault(cls, set()).update(_names(parts))
    return planted
