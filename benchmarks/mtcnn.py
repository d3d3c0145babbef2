"""MTCNN (facenet-pytorch, trained weights from its wheel): detections kept after conversion.

Run:  python benchmarks/mtcnn.py [--threads 2]
(facenet-pytorch must be installed with --no-deps: it pins an old torch.)

Each of MTCNN's three subnets (P-, R-, O-Net) is audited on the inputs it
really receives during detection (captured on calibration photos), planned
at the same MAC ratio, converted with refinement, and swapped back into the
detector. Test set: scikit-image's lfw_subset faces 0-49 and non-faces
100-149, plus the astronaut and camera photos; calibration: the other half of
lfw_subset and two other photos. Reported: reference detections recovered
(IoU >= 0.5 with the original's boxes), mean IoU and probability change on
them, and false positives on the non-faces.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from facenet_pytorch import MTCNN
from skimage import data

import sepify


def rgb(image: np.ndarray) -> np.ndarray:
    image = (image * 255).astype(np.uint8) if image.dtype != np.uint8 else image
    return np.stack([image] * 3, -1) if image.ndim == 2 else image


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detections(detector: MTCNN, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for image in images:
        boxes, probs = detector.detect(image)
        out.append((np.zeros((0, 4)), np.zeros(0)) if boxes is None else (boxes, probs))
    return out


def capture_inputs(detector: MTCNN, images: list[np.ndarray]) -> dict[str, list[torch.Tensor]]:
    seen: dict[str, list[torch.Tensor]] = {"pnet": [], "rnet": [], "onet": []}
    hooks = [getattr(detector, name).register_forward_pre_hook(
        lambda _m, args, name=name: seen[name].append(args[0].detach().clone())) for name in seen]  # fmt: skip
    try:
        detections(detector, images)
    finally:
        for h in hooks:
            h.remove()
    return seen


def score(reference: list, got: list) -> tuple[int, int, float, float]:
    """(reference boxes, recovered with IoU >= 0.5, mean IoU of recovered, mean |prob change|)."""
    total = found = 0
    ious, dprob = [], []
    for (rb, rp), (gb, gp) in zip(reference, got):
        for box, prob in zip(rb, rp):
            total += 1
            best = max(((iou(box, g), p) for g, p in zip(gb, gp)), default=(0.0, 0.0))
            if best[0] >= 0.5:
                found += 1
                ious.append(best[0])
                dprob.append(abs(best[1] - prob))
    return total, found, float(np.mean(ious)) if ious else 0.0, float(np.mean(dprob)) if dprob else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.75, 0.6, 0.45])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lfw = data.lfw_subset()
    test_faces = [rgb(im) for im in lfw[:50]] + [rgb(data.astronaut()), rgb(data.camera())]
    test_nonfaces = [rgb(im) for im in lfw[100:150]]
    calibration = (
        [rgb(im) for im in lfw[50:100]] + [rgb(im) for im in lfw[150:200]] + [rgb(data.chelsea()), rgb(data.coffee())]
    )
    detector = MTCNN(keep_all=True, device="cpu")
    reference = detections(detector, test_faces)
    ref_fp = sum(len(b) for b, _ in detections(detector, test_nonfaces))
    inputs = capture_inputs(detector, calibration)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); reference: "
          f"{sum(len(b) for b, _ in reference)} detections on {len(test_faces)} face images, {ref_fp} on non-faces")  # fmt: skip
    examples = {"pnet": torch.randn(1, 3, 64, 64), "rnet": torch.randn(2, 3, 24, 24), "onet": torch.randn(2, 3, 48, 48)}
    audits = {}
    for name in examples:
        net = getattr(detector, name)
        cal = [(t,) for t in inputs[name] if t.shape[0] > 0]
        audits[name] = (sepify.audit(net, examples[name], calibration=cal), cal)
    print(f"{'MAC ratio':>9} {'stage':<8} {'found':>9} {'mean IoU':>8} {'|dprob|':>8} {'false pos':>9} {'time':>6}")
    for ratio in args.ratios:
        for stage in ("init", "refined"):
            t0 = time.perf_counter()
            converted = copy.deepcopy(detector)
            macs_before = macs_after = 0
            for name, (audit, cal) in audits.items():
                try:
                    plan = audit.plan(max_mac_ratio=ratio)
                except sepify.BudgetError:
                    plan = audit.plan(max_mac_ratio=1.0)
                result = sepify.convert(getattr(detector, name), examples[name], plan=plan,
                                        calibration=cal if stage == "refined" else None)  # fmt: skip
                setattr(converted, name, result.model)
                macs_before += result.report.macs_before
                macs_after += result.report.macs_after
            elapsed = time.perf_counter() - t0
            total, found, mean_iou, dprob = score(reference, detections(converted, test_faces))
            fp = sum(len(b) for b, _ in detections(converted, test_nonfaces))
            print(f"{macs_after / macs_before:>9.3f} {stage:<8} {found:>4}/{total:<4} {mean_iou:>8.3f} {dprob:>8.4f} "
                  f"{fp:>9} {elapsed:>5.1f}s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
