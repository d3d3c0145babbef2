"""The pw-dw-pw bottleneck's CP factors: exact, never worse than the per-channel pairs it starts from, deterministic."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sepify.core.cost import cp_ranks, exact_rank
from sepify.core.cp import CPByRank, CPFactorization, CPStarts, _als, _relative_error
from sepify.core.decompose import Factorization


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("kernel", [(3, 3), (5, 1)])
def test_exact_at_the_exact_rank(groups: int, kernel: tuple[int, int]) -> None:
    weight = torch.randn(8, 6 // groups, *kernel, dtype=torch.float64)
    rank = exact_rank(6, 8, kernel, groups, "pw-dw-pw")
    f = CPFactorization.of(weight, groups, rank)
    assert f.relative_error < 1e-10
    pw, dw, pwl = f.weights()
    last, first, taps = (
        pwl.reshape(groups, 8 // groups, rank),
        pw.reshape(groups, rank, -1),
        dw.reshape(groups, rank, -1),
    )
    merged = torch.einsum("gor,gri,grk->goik", last, first, taps)
    torch.testing.assert_close(merged.reshape(weight.shape), weight, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("r", [1, 2])
def test_never_worse_than_the_per_channel_pair_of_the_same_structure(r: int) -> None:
    # dw-pw at depth multiplier r is a bottleneck of width Cin*r; pw-dw of width Cout*r
    torch.manual_seed(0)
    weight = torch.randn(12, 5, 3, 3)
    dw_pw = Factorization.of(weight, 1, "dw-pw").relative_error(r)
    pw_dw = Factorization.of(weight, 1, "pw-dw").relative_error(r)
    assert CPFactorization.of(weight, 1, 5 * r).relative_error <= dw_pw + 1e-9
    assert CPFactorization.of(weight, 1, 12 * r).relative_error <= pw_dw + 1e-9
    start = CPFactorization.of(weight, 1, 5 * r, work=0).relative_error
    assert start <= dw_pw + 1e-9  # the start is the strongest terms, at least as good as dw-pw's
    assert CPFactorization.of(weight, 1, 5 * r).relative_error < start  # and the sweeps improve on it


def test_errors_fall_with_rank_and_factors_are_deterministic() -> None:
    torch.manual_seed(1)
    weight = torch.randn(16, 8, 3, 3)
    family = CPByRank(weight, 1)
    errors = [family.relative_error(r) for r in cp_ranks(family.max_rank, 6)]
    assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-6
    a, b = CPFactorization.of(weight, 1, 7), CPFactorization.of(weight, 1, 7)
    assert all(torch.equal(x, y) for x, y in zip(a.weights(), b.weights()))


def test_rank_out_of_range_is_a_sentence() -> None:
    import sepify

    with pytest.raises(sepify.ConfigError, match=r"a pw-dw-pw rank must be in \[1, 32\] for this weight, got 33"):
        CPFactorization.of(torch.randn(8, 4, 3, 3), 1, 33)


def test_factors_are_balanced_for_low_precision() -> None:
    weight = torch.randn(16, 16, 3, 3) * 1e3
    pw, dw, pwl = CPFactorization.of(weight, 1, 8).weights()
    norms = [t.reshape(8, -1).norm(dim=1) if t is not pwl else t.reshape(16, 8).norm(dim=0) for t in (pw, dw, pwl)]
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(norms[1], norms[2], rtol=1e-4, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(
    out_channels=st.integers(2, 12),
    in_channels=st.integers(1, 8),
    taps=st.integers(1, 9),
    rank_share=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**16),
)
def test_sweeps_with_line_search_never_raise_the_error_and_report_it_exactly(
    out_channels: int, in_channels: int, taps: int, rank_share: float, seed: int
) -> None:
    # The line search keeps an extrapolated step only when it lowers the error, so one more sweep never hurts;
    # and the error a factorisation reports is the error of the factors it returns.
    torch.manual_seed(seed)
    weight = torch.randn(out_channels, in_channels, taps, 1, dtype=torch.float64)
    starts = CPStarts(weight, 1)
    rank = max(1, round(rank_share * starts.limit))
    start, _ = starts.strongest_terms(rank)
    errors = [_relative_error(starts.w, *_als(starts.w, *start, sweeps)) for sweeps in range(1, 12)]
    assert all(later <= earlier + 1e-9 for earlier, later in zip(errors, errors[1:]))
    f = CPFactorization.of(weight, 1, rank)
    pw, dw, pwl = f.weights()
    merged = torch.einsum("or,ri,rk->oik", pwl.reshape(out_channels, rank), pw.reshape(rank, -1), dw.reshape(rank, -1))
    measured = float((merged.reshape(weight.shape) - weight).norm() / weight.norm())
    assert f.relative_error == pytest.approx(measured, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("shape", [(12, 1, 7, 1), (1, 9, 3, 3), (10, 6, 1, 1)])
def test_a_weight_that_is_a_matrix_gets_its_svd_tail(shape: tuple[int, ...]) -> None:
    # One input channel, one output channel or one tap: W is a matrix, and no R terms beat its truncated SVD.
    # With one input or output channel the answer is that SVD at once; with one tap ALS has to find it.
    torch.manual_seed(3)
    weight = torch.randn(*shape, dtype=torch.float64)
    matrix = weight.reshape(shape[0], shape[1], -1)
    matrix = matrix[:, 0] if shape[1] == 1 else matrix[0] if shape[0] == 1 else matrix[..., 0]
    s = torch.linalg.svdvals(matrix)
    exact = 1 in shape[:2]
    for rank in range(1, len(s)):
        tail = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
        error = CPFactorization.of(weight, 1, rank).relative_error
        assert error == pytest.approx(tail, rel=1e-9 if exact else 2e-3, abs=1e-12)
