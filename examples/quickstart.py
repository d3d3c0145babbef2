"""Quick start: slim a trained CNN to a quarter of its MACs and keep its accuracy.

The model is sepify's digits CNN, trained here in a few seconds on
scikit-learn's bundled handwritten digits (no download). The script

1. converts it exactly (rank "full": every pair reproduces its conv),
2. audits it and plans a conversion under a MAC budget,
3. converts it with that plan, calibrated on 256 training images,
4. prints test accuracy before and after, and the per-layer report,

and writes ``digits_calibration.npy`` so that the README's command-line
examples have a calibration file to read. Seeded: the numbers printed are
the ones the README quotes.

Run:  python examples/quickstart.py
"""

from __future__ import annotations

import numpy as np
import torch

import sepify
from sepify.zoo import accuracy, digits_cnn, digits_data

MAC_BUDGET = 0.25


def main() -> None:
    torch.manual_seed(0)
    model = digits_cnn()  # trained here: about 99% test accuracy
    x_train, _, x_test, y_test = digits_data()
    example = x_test[:1]
    calibration = x_train[:256]  # unlabelled inputs are all sepify needs
    np.save("digits_calibration.npy", calibration.numpy())

    exact = sepify.convert(model, example, rank="full")
    print(f"rank 'full': output error {exact.report.output_error:.1e} (float32 round-off), as it must be")

    report = sepify.audit(model, example, calibration=calibration)
    plan = report.plan(max_mac_ratio=MAC_BUDGET)
    print(f"audit: {len(plan)} convs planned for MACs <= {MAC_BUDGET:.2f}x")

    slim = sepify.convert(model, example, plan=plan, calibration=calibration)
    print(slim.report)
    before, after = accuracy(model, x_test, y_test), accuracy(slim.model, x_test, y_test)
    print(
        f"\ntest accuracy: {before:.4f} -> {after:.4f} at {slim.report.mac_ratio:.3f}x the MACs "
        f"and {slim.report.param_ratio:.3f}x the parameters"
    )
    print("wrote digits_calibration.npy (for the README's command-line examples)")


if __name__ == "__main__":
    main()
