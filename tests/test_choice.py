"""Per-layer choices without a model: convert's decision, rank="auto" and the audit's options agree (hypothesis)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from sepify.planning.choice import Geometry, Option, Request, decide, pays, useful_options
from sepify.vocab import ORDERS, SVD_ORDERS, SkipReason


@st.composite
def geometries(draw: st.DrawFn) -> Geometry:
    dims = draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 1, 2]))
    cin, cout = groups * draw(st.integers(1, 12)), groups * draw(st.integers(1, 12))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    size = tuple(draw(st.integers(2, 9)) for _ in range(dims))
    out = tuple(s * t if transposed else max(1, s // t) for s, t in zip(size, stride))
    calls = draw(st.integers(1, 2))
    kind = f"conv_transpose{dims}d" if transposed else f"conv{dims}d"
    return Geometry(kind, cin, cout, kernel, stride, (0,) * dims, (1,) * dims, groups, "zeros", draw(st.booleans()),
                    (((2, cin, *size), (2, cout, *out)),) * calls)  # fmt: skip


def error_model(decay: float):  # type: ignore[no-untyped-def]
    """A weight error falling with rank, as singular-value tails do (0 at the exact rank)."""

    def weight_error(order: str, rank: int) -> float:
        return max(0.0, decay**rank - decay**64) / (1 - decay**64) if decay < 1 else 1.0 / rank

    return weight_error


decays = st.floats(0.2, 0.95)


@settings(max_examples=150, deadline=None)
@given(geometries(), st.sampled_from([*ORDERS, "auto"]), st.floats(0.0, 0.9), decays)
def test_auto_picks_the_cheapest_order_at_its_smallest_rank_within_tolerance(
    g: Geometry, order: str, tolerance: float, decay: float
) -> None:
    err = error_model(decay)
    decision = decide(g, Request("auto", order, tolerance), err)
    if decision is SkipReason.NO_SAVING:
        return
    assert isinstance(decision, Option) and pays(g, decision)
    orders = ORDERS if order == "auto" else (order,)
    assert decision.order in orders
    if decision.order != "pw-dw-pw" and decision.weight_error <= tolerance:
        # the smallest rank within tolerance: one less would miss it
        assert decision.rank == 1 or err(decision.order, decision.rank - 1) > tolerance
    # the audit lists it wherever it pays (the bottleneck's widths: on a grid)
    if decision.order != "pw-dw-pw":
        assert (decision.order, decision.rank) in useful_options(g, orders)


@settings(max_examples=150, deadline=None)
@given(geometries(), st.sampled_from([*SVD_ORDERS, "pw-dw-pw", "auto"]), st.integers(1, 40), decays, st.booleans())
def test_a_fixed_rank_is_capped_and_built_only_where_it_pays(
    g: Geometry, order: str, rank: int, decay: float, allow_larger: bool
) -> None:
    decision = decide(g, Request(rank, order, allow_larger=allow_larger), error_model(decay))
    if decision is SkipReason.NO_SAVING:
        assert not allow_larger
        forced = decide(g, Request(rank, order, allow_larger=True), error_model(decay))
        assert isinstance(forced, Option) and not pays(g, forced)  # the same pick, which does not pay
        return
    assert isinstance(decision, Option)
    assert decision.rank == min(rank, g.exact_rank(decision.order))
    assert allow_larger or pays(g, decision)
    # the audit's options for that order are exactly the ranks that pay, from 1 up
    if decision.order != "pw-dw-pw":
        listed = [r for o, r in useful_options(g, (decision.order,))]
        assert listed == list(range(1, len(listed) + 1))
        assert (decision.rank in listed) == pays(g, decision)


@settings(max_examples=100, deadline=None)
@given(geometries(), st.sampled_from(ORDERS), decays)
def test_full_rank_and_plans_always_build(g: Geometry, order: str, decay: float) -> None:
    full = decide(g, Request("full", order), error_model(decay))
    assert isinstance(full, Option) and full.rank == g.exact_rank(order)
    planned = decide(g, Request(1, order, planned=True), error_model(decay))
    assert isinstance(planned, Option) and planned.rank == 1


@settings(max_examples=100, deadline=None)
@given(geometries())
def test_costs_follow_the_formulas_and_grow_with_rank(g: Geometry) -> None:
    for order in ORDERS:
        costs = [g.cost(order, r) for r in range(1, g.exact_rank(order) + 1)]
        assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(costs, costs[1:]))
    assert g.params == g.out_channels * g.in_channels // g.groups * math.prod(g.kernel_size) + g.out_channels * g.bias
    assert g.calls == len(g.shapes) and g.macs % g.calls == 0  # every call costs the same here


def test_a_strided_pw_dw_that_saves_params_but_not_macs_does_not_pay() -> None:
    g = Geometry("conv2d", 16, 32, (3, 3), (2, 2), (1, 1), (1, 1), 1, "zeros", True,
                 (((2, 16, 16, 16), (2, 32, 8, 8)),))  # fmt: skip
    option = g.option("pw-dw", 2, 0.1)
    assert option.params_after < g.params and option.macs_after > g.macs  # its 1x1 runs before the stride
    assert not pays(g, option)
    assert decide(g, Request(2, "pw-dw"), lambda o, r: 0.1) is SkipReason.NO_SAVING
    assert ("pw-dw", 2) not in useful_options(g, ("pw-dw",))
