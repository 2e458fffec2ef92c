"""Set-up tells the truth: the core pulls no extra, ``./dev --help`` only prints help, the torch
build fits the machine (every branch of the decision, without installing anything), and a
missing extra is one line naming the install."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("install_torch", REPO / "scripts" / "install_torch.py")
install_torch = importlib.util.module_from_spec(spec)
sys.modules["install_torch"] = install_torch
spec.loader.exec_module(install_torch)


def test_the_core_pulls_no_extra_and_dev_installs_them_all():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    for heavy in ("deepspeed", "jupyterlab", "nbval", "pytest", "playwright"):
        assert heavy not in core
    extras = project["optional-dependencies"]
    assert extras["deepspeed"] == ["deepspeed>=0.17.1"]
    assert any(d.startswith("jupyterlab") for d in extras["lab"])
    assert "torchckpt[deepspeed,lab]" in extras["test"] and "torchckpt[test]" in extras["dev"]
    assert '-e ".[dev]"' in (REPO / "dev").read_text()


def test_dev_help_prints_help_and_touches_nothing(tmp_path):
    shutil.copy(REPO / "dev", tmp_path / "dev")
    for arg in ("--help", "-h", "help"):
        proc = subprocess.run(["bash", str(tmp_path / "dev"), arg], capture_output=True, text=True, check=False,
                              env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
        assert proc.returncode == 0 and "./dev test" in proc.stdout and "set -euo" not in proc.stdout
    proc = subprocess.run(["bash", str(tmp_path / "dev"), "bogus"], capture_output=True, text=True, check=False,
                          env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert proc.returncode == 2 and "unknown command: bogus" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev"]  # no .venv, no stamp


def plan(**facts):
    base = {"installed": None, "offered": ("2.13.0", False), "gpu": False, "choice": "auto",
            "cpu_index_reachable": None, "python": "py", "version": "2.13.0",
            "index": "https://download.pytorch.org/whl/cpu"}
    return install_torch.decide(**{**base, **facts})


def test_torch_decision_every_branch():
    pip = ["py", "-m", "pip", "install", "-q", "torch==2.13.0"]
    cpu = [*pip, "--index-url", "https://download.pytorch.org/whl/cpu"]
    assert plan(installed="2.5.1+cu121").command is None  # an installed torch is kept, whatever it is
    assert plan(offered=("2.13.0+cpu", False)).command == pip  # pip offers a CPU build (local wheel, macOS)
    assert plan(offered=("2.13.0", True), gpu=True).command == pip  # CUDA build on a CUDA machine
    p = plan(offered=("2.13.0", True), cpu_index_reachable=True)
    assert p.command == cpu and "no NVIDIA GPU" in p.reason  # public PyPI, no GPU: the CPU index
    p = plan(offered=("2.13.0", True), cpu_index_reachable=False)
    assert p.command is None and not p.ok and "TORCHCKPT_TORCH=pip" in p.reason  # never a CUDA download by default
    assert plan(offered=None, cpu_index_reachable=True).command == cpu
    assert not plan(offered=None, cpu_index_reachable=False).ok
    assert plan(choice="cpu", cpu_index_reachable=True).command == cpu
    assert not plan(choice="cpu", cpu_index_reachable=False).ok
    assert plan(choice="pip", offered=("2.13.0", True)).command == pip


def test_cuda_requirements_are_read_with_their_markers():
    linux = 'nvidia-cublas-cu12==12.8.4.1; platform_system == "Linux" and platform_machine == "x86_64"'
    never = 'nvidia-cublas-cu12==12.8.4.1; platform_system == "Plan9"'
    assert install_torch.pulls_cuda([linux]) == (sys.platform == "linux" and __import__("platform").machine() == "x86_64")
    assert not install_torch.pulls_cuda([never, "filelock", "sympy>=1.13.3"])


def test_the_dry_run_here_keeps_the_installed_torch():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "install_torch.py"), "--dry-run"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "keeping the installed torch" in proc.stderr and proc.stdout == ""


def test_a_missing_extra_is_one_line_naming_the_install():
    code = ("import sys; sys.modules['deepspeed'] = None\n"
            "import torchckpt\n"
            "try:\n    torchckpt.install\n"
            "except torchckpt.TorchckptError as e:\n    print(type(e).__name__, e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.stdout.strip() == ("MissingExtraError torchckpt.install needs deepspeed, which is not installed here: "
                                   "pip install 'torchckpt[deepspeed]'"), proc.stdout + proc.stderr


@pytest.mark.parametrize("extra", ["lab", "deepspeed"])
def test_readme_names_each_extra(extra):
    assert f"[{extra}]" in (REPO / "README.md").read_text()
