"""MTCNN (facenet-pytorch, trained weights from its wheel): detections kept after conversion, at real MACs.

Run:  python benchmarks/mtcnn.py [--threads 1] [--budgets 0.6 0.5 0.45 0.4] [--latency] [--plain-calibration]
(facenet-pytorch must be installed with --no-deps: it pins an old torch.)

MTCNN is a cascade: P-Net runs on an image pyramid, R-Net and O-Net on the
candidates the previous stage passed, so converting one net changes how much
work the next ones do. MACs are therefore counted on the whole detector while
it detects (torch's FlopCounterMode over ``detect()``), not on example inputs:
on these photos O-Net is 53% of the MACs, P-Net 27%, R-Net 20%.

Each net is audited on the inputs it really receives during detection,
captured on the calibration photos (the other half of lfw_subset and two
other photos) and their mirror images, with the cascade's thresholds lowered
while capturing so that R-Net and O-Net also see borderline candidates (about
8x the crops of a plain capture; ``--plain-calibration`` for the plain one).
Each net is then converted at a grid of per-net MAC ratios with ("refined")
and without ("init") calibration. For each detector-level budget, the
combination is chosen on the calibration photos and their mirror images alone,
as a user without labels would: most of the original detector's boxes found
again (IoU >= 0.5), then the highest face probability of the weakest one
found (a face that barely passes on the calibration photos is the one lost
on new photos), then the highest summed IoU, within the budget of real MACs.
Test set: lfw_subset faces 0-49 plus the astronaut and camera photos (52
reference faces), and non-faces 100-149 for false positives.

"no data" keeps P-Net (it gates the cascade: a data-free P-Net that passes
more candidates makes the later nets work more) and plans R-Net and O-Net
from audits on example inputs alone at one predicted-error tolerance
(``--tolerances``), since without images no MAC budget of the cascade can be
measured.

``--latency`` adds, for each row, the cascade's latency relative to the
original detector's in eager PyTorch, onnxruntime and OpenVINO: the three
nets summed over exactly the inputs each detector feeds them on the test
face photos (each net exported once with dynamic batch and, for P-Net, image
size; 1 thread; interleaved medians).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from collections.abc import Callable

import numpy as np
import torch
from facenet_pytorch import MTCNN
from skimage import data
from torch.utils.flop_counter import FlopCounterMode

import sepify
from sepify.runtime.timing import interleaved_medians


def rgb(image: np.ndarray) -> np.ndarray:
    image = (image * 255).astype(np.uint8) if image.dtype != np.uint8 else image
    return np.stack([image] * 3, -1) if image.ndim == 2 else image


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


CAPTURE_THRESHOLDS = [0.2, 0.3, 0.3]  # MTCNN's own: 0.6, 0.7, 0.7


def mirrored(images: list[np.ndarray]) -> list[np.ndarray]:
    return [np.ascontiguousarray(image[:, ::-1]) for image in images]


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


LATENCY_BACKENDS = ("eager", "onnxruntime", "openvino")


def net_runner(net: torch.nn.Module, inputs: list[torch.Tensor], backend: str, name: str) -> Callable[[], None]:
    """Run ``net`` on every tensor of ``inputs`` in ``backend`` (exported once, dynamic shapes)."""
    inputs = [x for x in inputs if x.shape[0] > 0]
    if backend == "eager":

        def run_eager() -> None:
            with torch.no_grad():
                for x in inputs:
                    net(x)

        return run_eager
    example = torch.cat([inputs[0], inputs[0]]) if inputs[0].shape[0] == 1 else inputs[0]
    if backend == "onnxruntime":
        import onnxruntime as ort

        dims = {0: torch.export.Dim("batch")}
        if name == "pnet":  # P-Net runs on every pyramid level's size
            dims |= {2: torch.export.Dim("height", min=12), 3: torch.export.Dim("width", min=12)}
        with torch.no_grad():
            program = torch.onnx.export(net, (example,), dynamo=True, verbose=False, dynamic_shapes=(dims,))
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        session = ort.InferenceSession(program.model_proto.SerializeToString(), options)
        name = session.get_inputs()[0].name
        arrays = [x.numpy() for x in inputs]
        return lambda: [session.run(None, {name: a}) for a in arrays] and None
    import openvino as ov

    with torch.no_grad():
        converted = ov.convert_model(net, example_input=(example,))
    compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    arrays = [x.numpy() for x in inputs]
    return lambda: [request.infer([a]) for a in arrays] and None


def cascade_latencies(original: MTCNN, slim: MTCNN, images: list[np.ndarray], reps: int = 5) -> list[float]:
    """Slim / original time of the three nets on the inputs each detector feeds them, per backend."""
    feeds = capture_inputs(original, images), capture_inputs(slim, images)
    ratios = []
    for backend in LATENCY_BACKENDS:
        runners = []
        for detector, fed in zip((original, slim), feeds):
            parts = [
                net_runner(getattr(detector, n), fed[n], backend, n) for n in fed if any(x.shape[0] for x in fed[n])
            ]
            runners.append(lambda parts=parts: [run() for run in parts] and None)
        before, after = interleaved_medians(runners, reps, warmup=1)
        ratios.append(after / before)
    return ratios


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


EXAMPLES = {"pnet": (1, 3, 64, 64), "rnet": (2, 3, 24, 24), "onet": (2, 3, 48, 48)}
GRID = {"pnet": (0.5, 0.6, 0.75, 1.0), "rnet": (0.2, 0.3, 0.4, 0.6), "onet": (0.2, 0.25, 0.3, 0.4)}
FINE_GRID = {"pnet": (0.6, 0.75, 1.0), "rnet": (0.2, 0.3, 0.4, 1.0), "onet": (0.2, 0.25, 0.3, 0.4, 0.6, 1.0)}


def counted(detector: MTCNN, images: list[np.ndarray]) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """The detections on ``images`` and the whole detector's MACs while it found them (2 FLOPs per MAC)."""
    with FlopCounterMode(display=False) as counter:
        found = detections(detector, images)
    return found, counter.get_total_flops() // 2


def agreement(reference: list, got: list) -> tuple[int, float, float]:
    """The label-free selection score, best first when compared as a tuple.

    (reference boxes found again with IoU >= 0.5, the face probability of the
    weakest of them, their summed IoU).
    """
    matches = [
        max(((iou(b, g), p) for g, p in zip(gb, gp)), default=(0.0, 0.0))
        for (rb, _), (gb, gp) in zip(reference, got)
        for b in rb
    ]
    kept = [(o, p) for o, p in matches if o >= 0.5]
    return len(kept), min((float(p) for _, p in kept), default=0.0), float(sum(o for o, _ in kept))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.6, 0.5, 0.45, 0.4])
    parser.add_argument("--tolerances", nargs="+", type=float, default=[0.2, 0.3, 0.4, 0.5, 0.6],
                        help="no data: R-Net and O-Net planned at each predicted output error")  # fmt: skip
    parser.add_argument("--latency", action="store_true", help="time each row's cascade in every backend")
    parser.add_argument("--fine", action="store_true", help="a finer grid of per-net ratios (72 combinations)")
    parser.add_argument(
        "--plain-calibration",
        action="store_true",
        help="capture the nets' inputs on the calibration photos alone, at MTCNN's thresholds",
    )
    args = parser.parse_args()
    grid = FINE_GRID if args.fine else GRID
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lfw = data.lfw_subset()
    test_faces = [rgb(im) for im in lfw[:50]] + [rgb(data.astronaut()), rgb(data.camera())]
    test_nonfaces = [rgb(im) for im in lfw[100:150]]
    photos = [rgb(im) for im in lfw[50:100]] + [rgb(data.chelsea()), rgb(data.coffee())]
    detector = MTCNN(keep_all=True, device="cpu")
    if args.plain_calibration:
        calibration, capture = photos, detector
    else:
        calibration = photos + mirrored(photos)
        capture = MTCNN(keep_all=True, device="cpu", thresholds=CAPTURE_THRESHOLDS)
    (reference, macs_test), (ref_cal, macs_cal) = counted(detector, test_faces), counted(detector, calibration)
    ref_fp = sum(len(b) for b, _ in detections(detector, test_nonfaces))
    inputs = capture_inputs(capture, calibration)
    cal = {name: [(t,) for t in inputs[name] if t.shape[0] > 0] for name in EXAMPLES}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); reference: "
          f"{sum(len(b) for b, _ in reference)} detections on {len(test_faces)} face images, {ref_fp} on non-faces; "
          f"calibration: {len(calibration)} photos, {sum(len(b) for b, _ in ref_cal)} boxes; crops captured: "
          + ", ".join(f"{name} {sum(len(t) for t, in cal[name])}" for name in EXAMPLES))  # fmt: skip
    t0 = time.perf_counter()
    examples = {name: torch.randn(shape) for name, shape in EXAMPLES.items()}
    audits = {name: sepify.audit(getattr(detector, name), examples[name], calibration=cal[name]) for name in EXAMPLES}
    nets: dict[tuple[str, float, str], torch.nn.Module] = {}
    for name, stage in itertools.product(EXAMPLES, ("init", "refined")):
        for ratio in grid[name]:
            if ratio == 1.0:
                nets[name, ratio, stage] = getattr(detector, name)
                continue
            plan = audits[name].plan(max_mac_ratio=ratio)
            data_ = cal[name] if stage == "refined" else None
            nets[name, ratio, stage] = sepify.convert(getattr(detector, name), examples[name], plan=plan,
                                                      calibration=data_).model  # fmt: skip
    print(f"audits and {len(nets)} conversions: {time.perf_counter() - t0:.0f} s")
    scored = []  # (stage, ratios, calibration score, real MAC ratio on the calibration photos)
    for stage in ("init", "refined"):
        for ratios in itertools.product(*grid.values()):
            slim = copy.deepcopy(detector)
            for name, ratio in zip(EXAMPLES, ratios):
                setattr(slim, name, nets[name, ratio, stage])
            found, macs = counted(slim, calibration)
            scored.append((stage, ratios, agreement(ref_cal, found), macs / macs_cal, slim))
    timed = (detector, test_faces[-12:]) if args.latency else None  # the astronaut, the camera, 10 faces
    print(f"{'budget':>6} {'calibration':<11} {'P/R/O ratios':<15} {'cal found':>9} {'weakest':>7} {'MACs':>6} "
          f"{'test found':>10} {'mean IoU':>8} {'false pos':>9}"
          + ("".join(f" {b:>11}" for b in LATENCY_BACKENDS) if timed else ""))  # fmt: skip
    row = {"reference": reference, "faces": test_faces, "nonfaces": test_nonfaces, "macs": macs_test, "timed": timed}
    for budget in args.budgets:
        for stage in ("init", "refined"):
            fits = [x for x in scored if x[0] == stage and x[3] <= budget]
            if not fits:
                print(f"{budget:>6.2f} {stage:<11} nothing within the budget on the calibration photos")
                continue
            _, ratios, cal_score, _, slim = max(fits, key=lambda x: x[2])
            report_row(f"{budget:.2f}", stage, "/".join(f"{r:g}" for r in ratios), cal_score, slim, **row)
    blind = {name: sepify.audit(getattr(detector, name), examples[name]) for name in ("rnet", "onet")}
    for tolerance in args.tolerances:
        slim = copy.deepcopy(detector)
        ratios = ["1"]
        for name in ("rnet", "onet"):
            plan = blind[name].plan(max_error=tolerance)
            ratios.append(f"{plan.meta['mac_ratio']:.2f}")
            setattr(slim, name, sepify.convert(getattr(detector, name), examples[name], plan=plan).model)
        cal_score = agreement(ref_cal, detections(slim, calibration))
        report_row(f"e<={tolerance:g}", "no data", "/".join(ratios), cal_score, slim, **row)


def report_row(budget: str, label: str, ratios: str, cal_score: tuple[int, float, float], slim: MTCNN,
               reference: list, faces: list, nonfaces: list, macs: int,
               timed: tuple[MTCNN, list[np.ndarray]] | None = None) -> None:  # fmt: skip
    got, slim_macs = counted(slim, faces)
    total, found, mean_iou, _ = score(reference, got)
    fp = sum(len(b) for b, _ in detections(slim, nonfaces))
    latency = "".join(f" {r:>10.3f}x" for r in cascade_latencies(timed[0], slim, timed[1])) if timed else ""
    print(f"{budget:>6} {label:<11} {ratios:<15} {cal_score[0]:>9} {cal_score[1]:>7.3f} {slim_macs / macs:>6.3f} "
          f"{found:>4}/{total:<5} {mean_iou:>8.3f} {fp:>9}{latency}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
