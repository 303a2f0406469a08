"""iqa_env.metrics: the rank-based AUROC, and None where it is undefined."""

from __future__ import annotations

import numpy as np
import pytest

from iqa_env.metrics import auroc, auroc_or_none


def test_auroc_counts_ties_as_one_half_and_orders_by_rank():
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auroc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5
    assert auroc(np.array([3.0, 2.0, 1.0]), np.array([0, 1, 1])) == 0.0


def test_auroc_or_none_is_none_where_one_class_is_absent_and_auroc_otherwise():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    assert auroc_or_none(scores, np.array([0, 0, 1, 1])) == auroc(scores, np.array([0, 0, 1, 1]))
    assert auroc_or_none(scores, np.ones(4)) is None
    assert auroc_or_none(scores, np.zeros(4, dtype=bool)) is None
    with pytest.raises(ValueError, match="AUROC needs both classes"):
        auroc(scores, np.ones(4))
