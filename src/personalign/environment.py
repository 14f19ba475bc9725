"""An environment record embedded in every output: library versions, device, commit, date."""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
import transformers

__all__ = ["environment_record", "git_commit", "cpu_name", "__version__"]

__version__ = "0.1.0"  # the package's version (pyproject.toml's)


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; what ``platform`` says elsewhere), read once a process."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]  # the checkout holding src/personalign
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_record(model: Any | None = None) -> dict[str, Any]:
    device = "cpu"
    if model is not None:
        dev = next(model.parameters()).device
        device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    return {
        "personalign": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "threads": torch.get_num_threads(),
        "commit": git_commit(),
        "date": _dt.date.today().isoformat(),
    }
