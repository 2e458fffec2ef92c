"""Install the PyTorch build that fits this machine, before ``pip install -e .`` (used by ``./dev``).

An installed torch is always kept (a CUDA build stays a CUDA build). Otherwise pip is asked,
without installing anything, which wheel its configuration would pick for ``torch==VERSION``:

- that wheel does not pull NVIDIA's CUDA libraries (macOS, Windows, a CPU wheel a local index
  or ``find-links`` offers): it is installed as pip offers it;
- it does, and the machine has an NVIDIA GPU: installed as pip offers it (the CUDA build);
- it does, and there is no NVIDIA GPU: the CPU build from PyTorch's CPU wheel index
  (https://download.pytorch.org/whl/cpu) when that index is reachable; if it is not, nothing is
  installed and the message says how to choose (a multi-GB CUDA download is never made by default).

Choose yourself with TORCHCKPT_TORCH=cpu (always the CPU index), TORCHCKPT_TORCH=pip (whatever
pip's configuration offers, e.g. CUDA), TORCHCKPT_TORCH_VERSION=X.Y.Z, TORCHCKPT_TORCH_INDEX=URL
(the CPU index to use). ``--dry-run`` prints the decision and the pip command without running it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VERSION = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@dataclass
class Plan:
    """What to run (None: nothing), and why, in one line."""

    command: list[str] | None
    reason: str
    ok: bool = True


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver is loaded (its /proc entry) or ``nvidia-smi -L`` lists a GPU."""
    if Path("/proc/driver/nvidia/version").exists():
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def reachable(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=timeout) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 - any failure means "not reachable from here"
        return False


def offered_wheel(python: str, version: str) -> tuple[str, bool] | None:
    """``(version, pulls_cuda)`` of the wheel pip's configuration would install for torch==version,
    asked with ``pip install --dry-run`` (nothing is installed; only metadata is fetched where the
    index serves it). None when pip finds no such wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        proc = subprocess.run(
            [python, "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps", "--ignore-installed",
             "--report", str(report), f"torch=={version}"],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0 or not report.exists():
            return None
        items = json.loads(report.read_text()).get("install") or []
    if not items:
        return None
    meta = items[0].get("metadata", {})
    return meta.get("version", version), pulls_cuda(meta.get("requires_dist") or [])


def pulls_cuda(requires: list[str]) -> bool:
    """Whether these Requires-Dist lines install NVIDIA's CUDA libraries on this machine."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip always has it
        from pip._vendor.packaging.requirements import Requirement
    for line in requires:
        req = Requirement(line)
        if not req.name.startswith("nvidia-"):
            continue
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            return True
    return False


def decide(*, installed: str | None, offered: tuple[str, bool] | None, gpu: bool, choice: str,
           cpu_index_reachable: bool | None, python: str, version: str, index: str) -> Plan:
    """The set-up's decision, from the facts (pure, so every branch is tested)."""
    pip = [python, "-m", "pip", "install", "-q", f"torch=={version}"]
    if installed is not None:
        return Plan(None, f"keeping the installed torch {installed}")
    if choice == "cpu":
        if not cpu_index_reachable:
            return Plan(None, f"TORCHCKPT_TORCH=cpu, but PyTorch's CPU index {index} is not reachable; "
                              "install torch yourself, or unset TORCHCKPT_TORCH to use pip's configuration", ok=False)
        return Plan([*pip, "--index-url", index], f"the CPU build of torch {version} from {index} (TORCHCKPT_TORCH=cpu)")
    if choice == "pip":
        return Plan(pip, f"torch {version} as pip's configuration offers it (TORCHCKPT_TORCH=pip)")
    if offered is None:
        if cpu_index_reachable:
            return Plan([*pip, "--index-url", index], f"pip's configuration offers no torch {version}; the CPU build "
                                                      f"from {index}")
        return Plan(None, f"pip finds no torch=={version} (is an index reachable?); install torch yourself, "
                          "then run this again", ok=False)
    found, cuda = offered
    if not cuda:
        return Plan(pip, f"torch {found} as pip's configuration offers it (a build without CUDA libraries)")
    if gpu:
        return Plan(pip, f"torch {found} with CUDA, as pip's configuration offers it: this machine has an NVIDIA GPU")
    if cpu_index_reachable:
        return Plan([*pip, "--index-url", index], f"the CPU build of torch {version} from {index}: no NVIDIA GPU here, "
                                                  "and pip's configuration offers the CUDA build (GBs of CUDA libraries)")
    return Plan(None, f"no NVIDIA GPU here, pip's configuration offers only the CUDA build of torch {found} (GBs of "
                      f"CUDA libraries), and PyTorch's CPU index {index} is not reachable: install a CPU torch yourself, "
                      "or set TORCHCKPT_TORCH=pip to accept the CUDA build", ok=False)


def installed_torch(python: str) -> str | None:
    proc = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the decision and the command; install nothing")
    parser.add_argument("--python", default=sys.executable, help="the environment's python (default: this one)")
    args = parser.parse_args(argv)
    version = os.environ.get("TORCHCKPT_TORCH_VERSION", DEFAULT_VERSION)
    index = os.environ.get("TORCHCKPT_TORCH_INDEX", CPU_INDEX)
    choice = os.environ.get("TORCHCKPT_TORCH", "auto")
    if choice not in ("auto", "cpu", "pip"):
        print(f"set-up: TORCHCKPT_TORCH={choice!r} is not one of auto, cpu, pip", file=sys.stderr)
        return 2
    installed = installed_torch(args.python)
    offered = gpu = None
    if installed is None and choice == "auto":
        offered = offered_wheel(args.python, version)
        gpu = has_nvidia_gpu() if offered is not None and offered[1] else False
    needs_index = installed is None and (choice == "cpu" or (choice == "auto" and (offered is None or (offered[1] and not gpu))))
    plan = decide(installed=installed, offered=offered, gpu=bool(gpu), choice=choice,
                  cpu_index_reachable=reachable(index) if needs_index else None,
                  python=args.python, version=version, index=index)
    print(f"set-up: {plan.reason}", file=sys.stderr)
    if plan.command is None or args.dry_run:
        if args.dry_run and plan.command:
            print(" ".join(plan.command))
        return 0 if plan.ok else 1
    return subprocess.run(plan.command, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
