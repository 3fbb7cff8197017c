"""Shot targets, global thresholds, N:M removal and structured unit selection."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surgeon_fx.passes.threshold import global_masks, nm_removed, select_units, shot_targets


def test_linear_schedule():
    assert shot_targets(0.5, 4) == pytest.approx([0.875, 0.75, 0.625, 0.5])
    assert shot_targets(0.3, 1) == [0.3]
    with pytest.raises(ValueError):
        shot_targets(0.5, 3, "cubic")


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n_remove=st.integers(0, 50))
def test_global_masks_remove_exactly_the_cheapest(seed, n_remove):
    gen = torch.Generator().manual_seed(seed)
    costs = {"a": torch.rand(3, 8, generator=gen), "b": torch.rand(4, 5, generator=gen).round(decimals=1)}
    before = {"a": torch.rand(3, 8, generator=gen) < 0.2, "b": torch.zeros(4, 5, dtype=torch.bool)}
    after = global_masks(costs, before, n_remove)
    n_before = int(sum(m.sum() for m in before.values()))
    assert int(sum(m.sum() for m in after.values())) == min(max(n_remove, n_before), 44)
    for k in costs:
        assert after[k][before[k]].all()  # earlier removals stay
    fresh = lambda sel: torch.cat([costs[k][sel[k] & ~before[k]] for k in costs])
    not_sel = {k: ~after[k] for k in costs}
    if fresh(after).numel() and torch.cat([costs[k][not_sel[k]] for k in costs]).numel():
        assert fresh(after).max() <= torch.cat([costs[k][not_sel[k]] for k in costs]).min()


@pytest.mark.parametrize("n_keep,m", [(2, 4), (4, 8), (3, 4)])
def test_nm_removed_counts_and_keeps_earlier(n_keep, m):
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(6, 4 * m, generator=gen)
    before = torch.zeros_like(cost, dtype=torch.bool)
    before[:, ::m] = True  # one earlier removal per block, even where it is the most expensive
    cost[:, ::m] += 10
    after = nm_removed(cost, before, n_keep, m)
    assert (after.reshape(6, 4, m).sum(-1) == m - n_keep).all()
    assert after[before].all()


def _groups(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = {"heads": torch.rand(4, generator=gen), "mlp0": torch.rand(12, generator=gen),
              "mlp1": torch.rand(12, generator=gen)}
    sizes = {"heads": [40] * 4, "mlp0": [3] * 12, "mlp1": [3] * 12}
    return scores, sizes


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_params=st.integers(0, 200))
def test_select_units_lands_closest_to_target(seed, n_params):
    scores, sizes = _groups(seed)
    removed = {"heads": set(), "mlp0": {0}, "mlp1": set()}
    min_keep = {"heads": 1, "mlp0": 2, "mlp1": 2}
    new = select_units(scores, sizes, removed, n_params, min_keep, {})
    got = sum(sizes[g][u] for g, us in new.items() for u in us)
    capacity = 3 * 40 + 9 * 3 + 10 * 3
    if n_params <= capacity:
        assert abs(got - n_params) <= 40 / 2  # within half the largest unit (a head of 40)
    else:
        assert got == capacity
    assert 0 not in new["mlp0"]
    for g, us in new.items():
        assert len(scores[g]) - len(us) - len(removed[g]) >= min_keep[g]
        # within a group, the cheapest alive units go first
        alive = [u for u in torch.argsort(scores[g]).tolist() if u not in removed[g]]
        assert sorted(us) == sorted(alive[: len(us)])


def test_select_units_respects_multiple():
    scores, sizes = _groups(1)
    removed = {g: set() for g in scores}
    new = select_units(scores, sizes, removed, 10_000, {"heads": 1, "mlp0": 1, "mlp1": 1},
                       {"mlp0": 8, "mlp1": 5})
    assert len(new["heads"]) == 3
    assert 12 - len(new["mlp0"]) == 8  # kept a multiple of 8, at least min_keep
    assert (12 - len(new["mlp1"])) % 5 == 0 and 12 - len(new["mlp1"]) >= 1


def test_select_units_global_order_is_by_score():
    scores = {"a": torch.tensor([0.1, 0.5, 0.9]), "b": torch.tensor([0.2, 0.3])}
    sizes = {"a": [1, 1, 1], "b": [1, 1]}
    new = select_units(scores, sizes, {"a": set(), "b": set()}, 3, {"a": 1, "b": 1}, {})
    assert new == {"a": [0, 1], "b": [0]}


def test_select_units_skips_a_head_that_overshoots_more_than_it_helps():
    """Issue 14 item 5: a cheap head (100 parameters) must not be taken for a 30-parameter request when
    ten neurons (3 each) land on it exactly."""
    scores = {"heads": torch.tensor([0.0, 0.1]), "mlp": torch.full((20,), 0.5)}
    sizes = {"heads": [100, 100], "mlp": [3] * 20}
    new = select_units(scores, sizes, {"heads": set(), "mlp": set()}, 30, {"heads": 1, "mlp": 1}, {})
    assert new == {"heads": [], "mlp": sorted(new["mlp"])} and len(new["mlp"]) == 10
    # and when the head is the closer landing, it is taken
    new = select_units(scores, sizes, {"heads": set(), "mlp": set()}, 90, {"heads": 1, "mlp": 1}, {})
    assert new["heads"] == [0] and new["mlp"] == []
