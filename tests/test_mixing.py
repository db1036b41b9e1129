"""num_samples, max_samples and mix strategies: exact document orders, and parity with datasets.interleave_datasets."""

from __future__ import annotations

import numpy as np
import pytest

from ptflow.data.mixing import interleave, mix, select


def test_select_without_options_is_identity():
    assert select(5, "a", None, None, seed=1).tolist() == [0, 1, 2, 3, 4]
    assert select(5, "a", None, 3, seed=1).tolist() == [0, 1, 2]


def test_num_samples_below_the_size_is_a_seeded_subset():
    picked = select(10, "a", 4, None, seed=7)
    assert len(picked) == 4 == len(set(picked.tolist()))
    assert picked.tolist() == select(10, "a", 4, None, seed=7).tolist()
    assert picked.tolist() != select(10, "a", 4, None, seed=8).tolist()
    assert picked.tolist() != select(10, "b", 4, None, seed=7).tolist()  # each dataset its own stream


def test_num_samples_above_the_size_keeps_every_document_and_adds_with_replacement():
    picked = select(3, "a", 8, None, seed=0)
    assert len(picked) == 8
    assert sorted(set(picked[:3].tolist())) == [0, 1, 2]  # all of them once first
    assert set(picked.tolist()) <= {0, 1, 2}
    assert select(3, "a", 8, 5, seed=0).tolist() == picked[:5].tolist()  # then max_samples cuts


def test_concat_keeps_dataset_order():
    source, doc = mix([np.array([0, 1]), np.array([2, 0, 1])], "concat", None, seed=0)
    assert list(zip(source.tolist(), doc.tolist())) == [(0, 0), (0, 1), (1, 2), (1, 0), (1, 1)]


def test_round_robin_under_and_over():
    s, p = interleave(np.array([2, 3]), None, seed=0, oversample=False)
    assert list(zip(s.tolist(), p.tolist())) == [(0, 0), (1, 0), (0, 1), (1, 1)]
    s, p = interleave(np.array([2, 3]), None, seed=0, oversample=True)
    assert list(zip(s.tolist(), p.tolist())) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 0), (1, 2)]


@pytest.mark.parametrize("strategy", ["first_exhausted", "all_exhausted"])
@pytest.mark.parametrize("probs", [None, [0.7, 0.2, 0.1], [0.5, 0.0, 0.5]])
def test_parity_with_datasets_interleave(strategy, probs):
    from datasets import Dataset, interleave_datasets

    if probs and 0.0 in probs and strategy == "all_exhausted":
        pytest.skip("datasets refuses to exhaust a never-sampled dataset (so does the config)")
    sizes = [7, 3, 12]
    parts = [Dataset.from_dict({"id": [f"{k}-{i}" for i in range(n)]}) for k, n in enumerate(sizes)]
    expected = interleave_datasets(parts, probabilities=probs, seed=123, stopping_strategy=strategy)["id"]
    selections = [np.arange(n) for n in sizes]
    source, doc = mix(selections, "interleave_over" if strategy == "all_exhausted" else "interleave_under", probs,
                      seed=123)
    assert [f"{s}-{d}" for s, d in zip(source.tolist(), doc.tolist())] == expected
