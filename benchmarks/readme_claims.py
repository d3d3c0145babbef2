"""Every time the README quotes, measured now, and a failure when one drifts by more than 2x.

Run:  python benchmarks/readme_claims.py [--skip-tests]

The README promises a quick start in 10-25 s, the default test command in about a minute, and ``sepify plan``
re-planning a saved audit in under a second, all on 2 CPU cores. This script runs each as a user would (a fresh
process, the README's own command) and prints what it took next to the quoted figure. It exits 1 when a measured
time is outside half to twice the quoted range: then either the code got slower or the README must change. Times
depend on the machine and its load; run it on quiet cores, and say what else was running when you quote it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(command: list[str], cwd: Path) -> float:
    """Wall seconds of one command, which must succeed."""
    t0 = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def saved_audit(folder: Path) -> Path:
    """A saved audit of resnet18 at 64x64, as ``sepify audit --audit-out`` writes it."""
    path = folder / "audit.json"
    model = ["torchvision.models:resnet18", "--input-shape", "1,3,64,64"]
    subprocess.run(
        [sys.executable, "-m", "sepify", "audit", *model, "--audit-out", str(path), "-q"],
        check=True,
        capture_output=True,
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true", help="do not time the default test command")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPU cores visible; load average {os.getloadavg()[0]:.1f}")
    claims: list[tuple[str, float, float, float]] = []  # (what, quoted low, quoted high, measured)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        claims.append(
            (
                "quick start (examples/quickstart.py)",
                10,
                25,
                timed([sys.executable, str(ROOT / "examples" / "quickstart.py")], folder),
            )
        )
        audit = saved_audit(folder)
        plan = [
            sys.executable,
            "-m",
            "sepify",
            "plan",
            str(audit),
            "--max-mac-ratio",
            "0.6",
            "-o",
            str(folder / "p.json"),
        ]
        claims.append(("sepify plan audit.json (re-plan)", 0.1, 1, timed(plan, folder)))
    if not args.skip_tests:
        claims.append(("python -m pytest (default suite)", 45, 90, timed([sys.executable, "-m", "pytest", "-q"], ROOT)))
    print(f"{'claim':<38} {'quoted':>11} {'measured':>9}  verdict")
    drifted = False
    for what, low, high, measured in claims:
        within = low / 2 <= measured <= high * 2
        drifted |= not within
        print(
            f"{what:<38} {low:>4g}-{high:<4g} s {measured:>8.1f}s  {'ok' if within else 'DRIFTED: fix the code or the README'}"
        )
    sys.exit(1 if drifted else 0)


if __name__ == "__main__":
    main()
