"""Tutorial: a torchvision model from your own training checkpoint, through the command line, back into Python.

Your checkpoint is usually a dict with the weights under "state_dict" (or
"model") beside the epoch and the optimizer; sepify reads it without pickle.
Here a resnet18 with 10 classes and random weights stands in for your
fine-tuned model. The script runs, in a temporary folder:

    sepify audit   torchvision.models:resnet18 --kwargs '{"num_classes": 10}' --weights ckpt.pt \\
                   --input-shape 1,3,64,64 --max-mac-ratio 0.6 --plan-out plan.json -q
    sepify convert torchvision.models:resnet18 --kwargs '{"num_classes": 10}' --weights ckpt.pt \\
                   --input-shape 1,3,64,64 --plan plan.json --format safetensors -o slim.safetensors -q

and loads the result with ``sepify.load_converted`` (no pickle either), then
checks that it computes what ``sepify.convert`` computes in Python.

Run:  pip install torchvision && python examples/checkpoint.py   (about 20 s)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torchvision.models import resnet18

import sepify

MODEL = ["torchvision.models:resnet18", "--kwargs", '{"num_classes": 10}', "--input-shape", "1,3,64,64"]


def sepify_cli(*args: str, cwd: Path) -> str:
    command = [sys.executable, "-m", "sepify", *args]
    print("$ sepify " + " ".join(f"'{a}'" if "{" in a else a for a in args))
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True)
    print(done.stdout, end="")
    return done.stdout


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    trained = resnet18(num_classes=10).eval()  # stands in for your fine-tuned model
    torch.save({"epoch": 12, "state_dict": trained.state_dict()}, folder / "ckpt.pt")

    sepify_cli("audit", *MODEL, "--weights", "ckpt.pt", "--max-mac-ratio", "0.6", "--plan-out", "plan.json", "-q",
               cwd=folder)  # fmt: skip
    sepify_cli("convert", *MODEL, "--weights", "ckpt.pt", "--plan", "plan.json", "--format", "safetensors",
               "-o", "slim.safetensors", "-q", cwd=folder)  # fmt: skip

    slim = sepify.load_converted(resnet18(num_classes=10), folder / "slim.safetensors")  # the plan is in the file
    plan = sepify.Plan.from_json(folder / "plan.json")
    x = torch.randn(4, 3, 64, 64)
    expected = sepify.convert(trained, x[:1], plan=plan).model
    with torch.no_grad():
        same = torch.allclose(slim.eval()(x), expected(x), atol=1e-5)
        error = float((slim(x) - trained(x)).norm() / trained(x).norm())
    print(f"\nloaded slim.safetensors: {len(plan)} convs converted; matches sepify.convert in Python: {same}; "
          f"output error vs the checkpoint's model: {error:.3f} (random weights: no calibration data here)")  # fmt: skip


if __name__ == "__main__":
    main()
