"""The factorisation's contract: exact at full rank, error equal to the SVD tail."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sepify.core.cost import exact_rank
from sepify.core.decompose import (
    Factorization,
    merge_separable_weight,
    relative_error_from_singular_values,
    singular_values,
    split_conv_weight,
)


@st.composite
def weights(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 5))
    cout = groups * draw(st.integers(1, 6))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(cout, cin // groups, kh, kw, generator=g), groups


@settings(max_examples=60, deadline=None)
@given(weights(), st.sampled_from(["dw-pw", "pw-dw"]))
def test_full_rank_reconstructs_weight(wg: tuple[torch.Tensor, int], order: str) -> None:
    w, groups = wg
    cout, cin_g = w.shape[:2]
    q = exact_rank(cin_g * groups, cout, tuple(w.shape[2:]), groups, order)
    dw, pw = split_conv_weight(w, groups, q, order)
    merged = merge_separable_weight(dw, pw, groups=groups, rank=q, order=order)
    torch.testing.assert_close(merged, w, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(weights(), st.sampled_from(["dw-pw", "pw-dw"]), st.integers(1, 25))
def test_rank_r_error_equals_svd_tail(wg: tuple[torch.Tensor, int], order: str, rank: int) -> None:
    w, groups = wg
    f = Factorization.of(w.double(), groups, order)
    r = min(rank, f.max_rank)
    dw, pw = f.factors(r)
    measured = float(
        (merge_separable_weight(dw, pw, groups=groups, rank=r, order=order) - w.double()).norm() / w.double().norm()
    )
    sv = singular_values(w, groups, order)
    energy = sv.square()
    formula = math.sqrt(float(energy[:, r:].sum() / energy.sum()))
    assert math.isclose(measured, formula, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(f.relative_error(r), formula, rel_tol=1e-9, abs_tol=1e-12)


def test_error_never_increases_with_rank() -> None:
    f = Factorization.of(torch.randn(32, 16, 3, 3), 1, "dw-pw")
    errors = [f.relative_error(r) for r in range(1, f.max_rank + 1)]
    assert all(a >= b for a, b in zip(errors, errors[1:]))
    assert errors[-1] == 0.0
    assert errors[0] > 0.5  # a random 32x9 matrix is far from rank 1


def test_exactly_separable_weight_is_exact_at_rank_one() -> None:
    # W[o, i] = a[o, i] * k[i]: every per-input-channel slice has rank 1
    a, k = torch.randn(8, 4), torch.randn(4, 3, 3)
    w = a[:, :, None, None] * k[None]
    dw, pw = split_conv_weight(w, 1, 1, "dw-pw")
    torch.testing.assert_close(merge_separable_weight(dw, pw, groups=1, rank=1, order="dw-pw"), w)
    assert relative_error_from_singular_values(singular_values(w, 1, "dw-pw"), 1) < 1e-7


def test_factors_keep_dtype_and_are_deterministic() -> None:
    w = torch.randn(8, 4, 3, 3, dtype=torch.bfloat16)
    dw1, pw1 = split_conv_weight(w, 1, 2, "pw-dw")
    dw2, pw2 = split_conv_weight(w.clone(), 1, 2, "pw-dw")
    assert dw1.dtype == pw1.dtype == torch.bfloat16
    assert torch.equal(dw1, dw2) and torch.equal(pw1, pw2)


def test_zero_weight_has_zero_error() -> None:
    assert relative_error_from_singular_values(singular_values(torch.zeros(4, 4, 3, 3), 1, "dw-pw"), 1) == 0.0
