"""Slim, int8, or both: the four ways to ship a trained model, timed side by side in onnxruntime and OpenVINO.

Run:  python benchmarks/int8.py [--tasks digits crepe-tiny crepe-full resnet50 mtcnn] [--draws 3] [--batches 1 8]
      [--threads 1]

For each trained model: the original in float32 (ONNX: the faster of torch.onnx's two exports; OpenVINO: its own
conversion), the original in int8, sepify's slim model in float32 and in int8. The slim model is made by the
documented shipping recipe (docs/guide/speed.md): audited on the draw's calibration data with every option timed in
onnxruntime (1 thread, at the timed batch ``--plan-batch``), planned at the budget in ``PLANS`` (the fastest found
to keep the task within 1 point on every draw), converted and refined on the same data. crepe-full is planned by
MACs alone: timing every option of it adds about 10 minutes per draw. int8 is what
``sepify convert --int8`` writes (:func:`sepify.save`: onnxruntime's ``quantize_static``, QDQ, per-channel weights;
NNCF for OpenVINO), with ranges from the same calibration data. The task metric is the worst over ``--draws``
independent draws of test and calibration data; times (draw 0) are :func:`sepify.compare_deployments`'s (what
``sepify convert --int8`` prints): interleaved medians, relative to the original float32 in the same runtime at the
same batch. resnet50 has random weights: latency only (slim: ``Budget(max_mac_ratio=0.6)`` without data; int8
ranges from random images).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from tasks import crepe_task, digits_task
from torch import Tensor, nn

import sepify
from sepify.runtime.check import runtime_runner

PLANS = {  # the shipping recipe's budget per model: sepify convert --max-mac-ratio / --max-latency-ratio
    "digits": {"max_mac_ratio": 0.2},
    "crepe-tiny": {"max_latency_ratio": 0.6},
    "crepe-full": {"max_mac_ratio": 0.35},
}
UNTIMED = {"crepe-full"}  # planned by MACs: a timed audit of every option takes ~10 minutes
RUNTIMES = {"onnxruntime": ".onnx", "OpenVINO": ".xml"}
ROWS = ("original fp32", "original int8", "slim fp32", "slim int8")


class FileModel(nn.Module):
    """A written file run by its runtime, callable like the model (for the task metric)."""

    def __init__(self, path: Path, fmt: str, threads: int) -> None:
        super().__init__()
        self.run = runtime_runner(path, fmt, exact=False, threads=threads)[0]

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        outputs = self.run([x.detach().float()])
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def task_for(name: str, draw: int):  # noqa: ANN201 - benchmarks/tasks.Task
    return digits_task(draw) if name == "digits" else crepe_task(name.removeprefix("crepe-"), draw=draw)


def files(model: nn.Module, slim: nn.Module, example: Tensor, data: Tensor, folder: Path, ext: str) -> dict[str, Path]:
    """The four files of one runtime."""
    written = {}
    folder.mkdir(exist_ok=True)
    for row in ROWS:
        source = model if row.startswith("original") else slim
        path = folder / f"{row.replace(' ', '-')}{ext}"
        written[row] = sepify.save(source, path, example, int8=data if row.endswith("int8") else None)[-1]
    return written


LATENCY_ONLY = {"resnet50": (0.6, (3, 224, 224))}  # random weights: MAC budget (no data), input shape


def latency_only(name: str, batches: list[int], threads: int, reps: int) -> None:
    """A model with random weights: the four ways timed, no metric (int8 ranges from random images)."""
    import torchvision

    budget, shape = LATENCY_ONLY[name]
    model = getattr(torchvision.models, name)().eval()
    example = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    slim = sepify.convert(model, example, plan=sepify.Budget(max_mac_ratio=budget))
    data = torch.randn(32, *shape, generator=torch.Generator().manual_seed(1))
    for runtime in RUNTIMES:
        cells: dict[str, str] = {}
        for batch in batches:
            found = sepify.compare_deployments(model, slim.model, example, int8=data, runtime=runtime.lower(),
                                               threads=threads, timed_inputs=example.expand(batch, *shape), reps=reps)  # fmt: skip
            for option in found.options:
                cells[option.name] = cells.get(option.name, "") + f" {option.time_ratio:>8.3f}x"
        for option_name, row in cells.items():
            macs = slim.report.mac_ratio if option_name.startswith("slim") else 1.0
            label = option_name.replace("float32", "fp32")
            print(f"{name:<11} {runtime:<12} {label:<14} {macs:>5.3f} {'-':>7}{row}", flush=True)


MTCNN_NETS = {"rnet": 0.4, "onet": 0.3}  # mtcnn.py's all-faces combination (P-Net kept): closed form, no refinement


def mtcnn(batches: list[int], threads: int, reps: int) -> None:
    """MTCNN's R-Net and O-Net (trained weights): each way of shipping them run inside the detector (P-Net stays the
    original PyTorch net: it runs on every pyramid size) on mtcnn.py's 52 test faces; time per net at its crop size."""
    import copy

    from facenet_pytorch import MTCNN
    from mtcnn import CAPTURE_THRESHOLDS, capture_inputs, detections, mirrored, rgb, score
    from skimage import data

    lfw = data.lfw_subset()
    test = [rgb(im) for im in lfw[:50]] + [rgb(data.astronaut()), rgb(data.camera())]
    photos = [rgb(im) for im in lfw[50:100]] + [rgb(data.chelsea()), rgb(data.coffee())]
    detector = MTCNN(keep_all=True, device="cpu")
    reference = detections(detector, test)
    capture = MTCNN(keep_all=True, device="cpu", thresholds=CAPTURE_THRESHOLDS)
    captured = capture_inputs(capture, photos + mirrored(photos))
    crops = {name: torch.cat([t for t in captured[name] if len(t)]) for name in MTCNN_NETS}
    slims, macs = {}, {}
    for name, ratio in MTCNN_NETS.items():
        net, cal = getattr(detector, name), crops[name]
        audit = sepify.audit(net, cal[:2], calibration=cal)
        result = sepify.convert(net, cal[:2], plan=audit.plan(max_mac_ratio=ratio))
        slims[name], macs[name] = result.model, result.report.mac_ratio
    for runtime, ext in RUNTIMES.items():
        fmt = "onnx" if ext == ".onnx" else "openvino"
        with tempfile.TemporaryDirectory() as d:
            written = {
                name: files(getattr(detector, name), slims[name], crops[name][:1], crops[name], Path(d) / name, ext)
                for name in MTCNN_NETS
            }
            found = {}
            for row in ROWS:
                deployed = copy.deepcopy(detector)
                for name in MTCNN_NETS:
                    setattr(deployed, name, FileModel(written[name][row], fmt, threads))
                total, hits, _, _ = score(reference, detections(deployed, test))
                found[row] = f"{hits}/{total}"
            for name in MTCNN_NETS:
                cells: dict[str, str] = {}
                for batch in batches:
                    x = crops[name][:batch]
                    compared = sepify.compare_deployments(
                        getattr(detector, name), slims[name], crops[name][:1], int8=crops[name],
                        runtime=runtime.lower(), threads=threads, timed_inputs=x, reps=reps,
                    )  # fmt: skip
                    for option in compared.options:
                        label = option.name.replace("float32", "fp32")
                        cells[label] = cells.get(label, "") + f" {option.time_ratio:>8.3f}x"
                for row in ROWS:
                    mac = macs[name] if row.startswith("slim") else 1.0
                    print(
                        f"{'mtcnn-' + name:<11} {runtime:<12} {row:<14} {mac:>5.3f} {found[row]:>7}{cells[row]}",
                        flush=True,
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["digits", "crepe-tiny"])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--plan-batch", type=int, default=8, help="the batch the audit times options at")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s); metric: worst of {args.draws} draws; time: slim or int8 / original fp32")
    plans = [f"{k} {v}" for k, v in PLANS.items() if k in args.tasks]
    plans += [f"mtcnn-{k} {{'max_mac_ratio': {v}}}" for k, v in MTCNN_NETS.items() if "mtcnn" in args.tasks]
    print("slim plans: " + ", ".join(plans))
    header = f"{'model':<11} {'runtime':<12} {'file':<14} {'MACs':>5} {'metric':>7}"
    print(header + "".join(f" {'batch ' + str(b):>9}" for b in args.batches))
    for name in args.tasks:
        if name in LATENCY_ONLY:
            latency_only(name, args.batches, args.threads, args.reps)
            continue
        if name == "mtcnn":
            mtcnn(args.batches, args.threads, args.reps)
            continue
        metrics: dict[tuple[str, str], float] = {}
        times: dict[tuple[str, str, int], float] = {}
        mac_ratio = 1.0
        for draw in range(args.draws):
            task = task_for(name, draw)
            model = task.build()
            data = task.calibration if name == "digits" else task.recordings
            assert data is not None
            served = torch.cat([task.example] * args.plan_batch)[: args.plan_batch]
            timing = None if name in UNTIMED else sepify.Timing(backend="onnxruntime", threads=args.threads)
            audit = sepify.audit(model, served, calibration=data, timing=timing)
            result = sepify.convert(model, task.example, plan=audit.plan(**PLANS[name]), calibration=data)
            mac_ratio = result.report.mac_ratio
            with tempfile.TemporaryDirectory() as d:
                for runtime, ext in RUNTIMES.items():
                    fmt = "onnx" if ext == ".onnx" else "openvino"
                    written = files(model, result.model, task.example[:1], data, Path(d), ext)
                    for row, path in written.items():
                        value = task.metric(FileModel(path, fmt, args.threads))
                        metrics[runtime, row] = min(metrics.get((runtime, row), 1.0), value)
                    if draw:
                        continue
                    for batch in args.batches:  # the comparison `sepify convert --int8` prints, on the written file
                        x = torch.cat([task.example] * batch)[:batch]
                        found = sepify.compare_deployments(
                            model, result.model, task.example, int8=data, runtime=runtime.lower(),
                            threads=args.threads, timed_inputs=x, written=written["slim int8"], reps=args.reps,
                        )  # fmt: skip
                        for option in found.options:
                            times[runtime, option.name.replace("float32", "fp32"), batch] = option.time_ratio
        for runtime in RUNTIMES:
            for row in ROWS:
                macs = mac_ratio if row.startswith("slim") else 1.0
                cells = "".join(f" {times[runtime, row, b]:>8.3f}x" for b in args.batches)
                print(f"{name:<11} {runtime:<12} {row:<14} {macs:>5.3f} {metrics[runtime, row]:>7.4f}{cells}",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
