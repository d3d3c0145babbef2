"""Data-aware stages: calibration batches, activation capture, refinement, BatchNorm refresh, distillation, fidelity."""
