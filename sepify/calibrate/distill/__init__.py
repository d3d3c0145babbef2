"""Knowledge distillation of a converted model (student) against the original (teacher): the one engine.

``sepify.convert(..., distill=...)`` runs it on the calibration data (its held-out share judges it);
``sepify.distill`` and ``sepify distill`` run it on a user's data, streamed and sharded across torchrun
processes. Both are configured by one :class:`~sepify.options.Distill`.

* :mod:`~.data`: a user's samples, as this process's share of each global batch (never materialised);
* :mod:`~.losses`: what is matched, one meaning per name;
* :mod:`~.loop`: the training loop (finite steps only, best held-out weights kept, early stop);
* :mod:`~.checkpoint`: checkpoints written atomically, validated field by field before a resume;
* :mod:`~.log`: the JSON-lines / CSV log and TensorBoard;
* :mod:`~.distributed`: the torchrun process group.
"""

from __future__ import annotations

from sepify.calibrate.distill.data import Samples
from sepify.calibrate.distill.loop import DistillOutcome, DistillStep, train, trainable_parameters

__all__ = ["Samples", "DistillOutcome", "DistillStep", "train", "trainable_parameters"]
