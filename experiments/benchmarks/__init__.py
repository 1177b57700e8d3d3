"""Benchmarks (not tests): scripts that print tables for RESULTS.md.

What the scripts share lives here: a description of the machine, and the way one measurement
runs in a fresh subprocess so its peak memory is its own. On the CPU, torch's memory is invisible
to ``tracemalloc``, so peak memory is the process's resident-set high-water mark (``VmHWM`` in
``/proc/self/status``), reset just before the measured work; on CUDA it is
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

RESULT_TAG = "BENCH-RESULT "
# The "mid" configuration of the training, privacy and federation benchmarks: the tiny network at
# 96x96 slices, window 16 (config overrides).
MID = {"data.image_size": 96, "data.window": 16}


# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets, by a
# substring of ``torch.cuda.get_device_name()``; the first match wins, so longer names come first.
BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 SXM", 989.0),
    ("H100 80GB HBM3", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def positive_int(text: str) -> int:
    """An argparse type: one integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    """An argparse type: one or more comma-separated positive integers ("10,50,200")."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer, got none")
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def bf16_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s: ``override_tflops``, else the data-sheet table, else None."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS if key in name), None)


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int) -> dict[str, Any]:
    """Date, CPU, cores, load average and library versions, for the header of a results table."""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "torch_threads": threads,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _status_kib(field: str, pid: str = "self") -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def reset_peak(device: torch.device) -> int:
    """Start a peak-memory measurement; returns the baseline in bytes.

    CPU: writing 5 to ``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_bytes(device: torch.device) -> int:
    """The peak since ``reset_peak``: max allocated (CUDA) or the RSS high-water mark (CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _status_kib("VmHWM") * 1024


def emit(result: dict[str, Any]) -> None:
    """Print a worker's result as one tagged JSON line on stdout."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_worker(script: Path, spec: dict[str, Any], timeout_s: float, rss_cap_bytes: int | None) -> dict[str, Any]:
    """Run ``script --worker SPEC`` in a fresh Python process and return its result.

    The parent polls the child's RSS and kills it above ``rss_cap_bytes`` (so a full-3D baseline
    cannot take a shared machine down) or after ``timeout_s``.

    Returns:
        the worker's JSON result, or ``{"error": "..."}`` when it was killed or failed.
    """
    # A fixed mmap threshold hands large freed buffers back to the OS at once (glibc otherwise
    # raises the threshold and keeps them), so the RSS high-water mark tracks live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    child = subprocess.Popen(
        [sys.executable, str(script), "--worker", json.dumps(spec)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started, killed, max_rss = time.monotonic(), None, 0
    while child.poll() is None:
        with contextlib.suppress(OSError):  # the child may exit between poll() and the read
            max_rss = max(max_rss, _status_kib("VmRSS", str(child.pid)) * 1024)
        if rss_cap_bytes is not None and max_rss > rss_cap_bytes:
            killed = f"over the {rss_cap_bytes / 2**30:.1f} GiB memory cap"
        elif time.monotonic() - started > timeout_s:
            killed = f"over the {timeout_s:.0f} s time limit"
        if killed:
            child.kill()
            child.communicate()
            return {"error": killed}
        time.sleep(0.05)
    stdout, stderr = child.communicate()
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"worker failed (exit {child.returncode}): {tail}"}


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
