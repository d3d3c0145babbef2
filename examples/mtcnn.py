"""Tutorial: slim a trained face detector (facenet-pytorch's MTCNN) and check it still finds the same faces.

MTCNN is three small CNNs (P-, R- and O-Net) run in a cascade; their trained
weights ship inside the facenet-pytorch wheel. R-Net and O-Net are audited on
the inputs they really receive during detection (captured on calibration
photos and their mirror images, with the cascade's thresholds lowered so that
they also see borderline candidates), planned to ``MAC_BUDGET`` of their MACs,
converted with calibration, and put back into the detector. P-Net is kept: it
gates the cascade, and a P-Net that passes more candidates makes the later
nets work more. The score: of the faces the original detector finds on 52 test
photos (scikit-image's lfw_subset faces 0-49, the astronaut and the camera
man), how many the slim one finds again (box IoU >= 0.5), at what share of the
MACs the whole detector does while it finds them, and its false detections on
50 non-face patches.

Run:  pip install scikit-image && pip install --no-deps facenet-pytorch && python examples/mtcnn.py
(--no-deps: facenet-pytorch pins an old torch.) About 20 s; one torch thread, which MTCNN's many small
calls run fastest with.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from facenet_pytorch import MTCNN
from skimage import data
from torch.utils.flop_counter import FlopCounterMode

import sepify

MAC_BUDGET = 0.4
CAPTURE_THRESHOLDS = [0.2, 0.3, 0.3]  # MTCNN's own: 0.6, 0.7, 0.7
NETS = ("rnet", "onet")


def rgb(image: np.ndarray) -> np.ndarray:
    image = (image * 255).astype(np.uint8) if image.dtype != np.uint8 else image
    return np.stack([image] * 3, -1) if image.ndim == 2 else image


def boxes(detector: MTCNN, images: list[np.ndarray]) -> list[np.ndarray]:
    found = [detector.detect(image)[0] for image in images]
    return [np.zeros((0, 4)) if b is None else b for b in found]


def detector_macs(detector: MTCNN, images: list[np.ndarray]) -> int:
    """The MACs the whole cascade does on ``images`` (a cascade's work depends on what each net passes on)."""
    with FlopCounterMode(display=False) as counter:
        boxes(detector, images)
    return counter.get_total_flops() // 2


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def inputs_seen(detector: MTCNN, images: list[np.ndarray]) -> dict[str, list[tuple[torch.Tensor]]]:
    """What each net receives while the detector runs on ``images``: realistic calibration batches."""
    seen: dict[str, list[tuple[torch.Tensor]]] = {name: [] for name in NETS}
    hooks = [
        getattr(detector, name).register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append((args[0].detach().clone(),)) if len(args[0]) else None
        )
        for name in seen
    ]
    try:
        boxes(detector, images)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lfw = data.lfw_subset()
    faces = [rgb(im) for im in lfw[:50]] + [rgb(data.astronaut()), rgb(data.camera())]
    non_faces = [rgb(im) for im in lfw[100:150]]
    calibration_photos = [rgb(im) for im in lfw[50:100]] + [rgb(data.chelsea()), rgb(data.coffee())]

    detector = MTCNN(keep_all=True, device="cpu")
    reference = boxes(detector, faces)
    # More of what the later nets will see, from the same photos: their mirror images, and the cascade's
    # thresholds lowered while capturing (8x the crops of a plain capture here).
    mirrored = [np.ascontiguousarray(photo[:, ::-1]) for photo in calibration_photos]
    capture = MTCNN(keep_all=True, device="cpu", thresholds=CAPTURE_THRESHOLDS)
    calibration = inputs_seen(capture, calibration_photos + mirrored)

    slim = copy.deepcopy(detector)
    for name in NETS:
        net, example = getattr(detector, name), calibration[name][0]  # a real batch of crops as the example
        plan = sepify.audit(net, example, calibration=calibration[name]).plan(max_mac_ratio=MAC_BUDGET)
        result = sepify.convert(net, example, plan=plan, calibration=calibration[name])
        setattr(slim, name, result.model)
        print(f"{name}: {result.report.summary_line()}")

    got = boxes(slim, faces)
    pairs = [(box, max((iou(box, g) for g in found), default=0.0)) for ref, found in zip(reference, got) for box in ref]
    kept = [overlap for _, overlap in pairs if overlap >= 0.5]
    false_positives = sum(len(b) for b in boxes(slim, non_faces))
    print(
        f"\nfaces found again: {len(kept)} of {len(pairs)} (mean IoU {np.mean(kept):.3f}) at "
        f"{detector_macs(slim, faces) / detector_macs(detector, faces):.3f}x the detector's MACs; "
        f"false detections on 50 non-faces: {false_positives} "
        f"(original: {sum(len(b) for b in boxes(detector, non_faces))})"
    )


if __name__ == "__main__":
    main()
