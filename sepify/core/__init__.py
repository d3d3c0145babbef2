"""The mathematics and the module: cost arithmetic, per-channel SVD factorisation, ``SeparableConv``, timing.

Plain tensors and modules only: nothing here knows about graphs, models or data.
"""
