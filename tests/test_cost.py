"""Cost formulas against numbers derived by hand in each test."""

from __future__ import annotations

import pytest

from sepify.core.cost import conv_macs, conv_params, exact_rank, separable_macs, separable_params


def test_dense_conv_counts_by_hand() -> None:
    # 3x3, 64 -> 128, 56x56 output: 3*3*64*128 = 73728 weights, + 128 bias
    assert conv_params(64, 128, (3, 3), groups=1, bias=True) == 73728 + 128
    assert conv_macs(64, 128, (3, 3), groups=1, output_size=(56, 56)) == 73728 * 56 * 56
    # batch multiplies MACs (fvcore counts the whole batch)
    assert conv_macs(64, 128, (3, 3), groups=1, output_size=(56, 56), batch=4) == 4 * 73728 * 56 * 56


def test_grouped_conv_counts_by_hand() -> None:
    # groups=4: each output sees 16 of the 64 inputs
    assert conv_params(64, 128, (3, 3), groups=4, bias=False) == 128 * 16 * 9
    assert conv_macs(64, 128, (3, 5), groups=4, output_size=(7, 9)) == 7 * 9 * 128 * 16 * 15


def test_separable_dw_pw_matches_spec_formula() -> None:
    # SPEC: K^2 Cin + Cin Cout params, H'W'(K^2 Cin + Cin Cout) MACs at rank 1
    k2, cin, cout = 9, 64, 128
    assert separable_params(cin, cout, (3, 3), 1, 1, "dw-pw", bias=False) == k2 * cin + cin * cout
    assert separable_macs(cin, cout, (3, 3), 1, 1, "dw-pw", (56, 56), (56, 56)) == 56 * 56 * (k2 * cin + cin * cout)
    # rank r multiplies both terms; groups divide the pointwise one
    assert separable_params(cin, cout, (3, 3), 4, 3, "dw-pw", bias=True) == 3 * k2 * cin + cout * (cin * 3 // 4) + cout


def test_separable_pw_dw_runs_pointwise_at_input_resolution() -> None:
    # pw: 32 -> 16*2 channels on the 10x10 input; dw: 16 outputs x 2 x 9 taps on the 5x5 output
    macs = separable_macs(32, 16, (3, 3), 1, 2, "pw-dw", input_size=(10, 10), output_size=(5, 5))
    assert macs == 100 * 32 * 32 + 25 * 16 * 2 * 9
    assert separable_params(32, 16, (3, 3), 1, 2, "pw-dw", bias=True) == 32 * 32 + 16 * 2 * 9 + 16


@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "groups", "order", "expected"),
    [
        (64, 128, (3, 3), 1, "dw-pw", 9),
        (64, 4, (3, 3), 1, "dw-pw", 4),
        (3, 64, (7, 7), 1, "pw-dw", 3),
        (64, 64, (3, 3), 32, "dw-pw", 2),
        (64, 64, (1, 5), 1, "pw-dw", 5),
    ],
)
def test_exact_rank(cin: int, cout: int, kernel: tuple[int, int], groups: int, order: str, expected: int) -> None:
    assert exact_rank(cin, cout, kernel, groups, order) == expected


def test_unknown_order_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown order 'pw-pw'"):
        separable_params(4, 4, (3, 3), 1, 1, "pw-pw", bias=False)
