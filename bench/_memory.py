"""Resident-memory readings for the benchmarks (Linux /proc), shared by the scripts in bench/."""

from __future__ import annotations

import gc


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Reset the kernel's resident high-water mark to the current RSS (Linux >= 4.0); returns that RSS in KiB."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS")


def reset_peak_on(device) -> int:
    """Start a peak-memory measurement on `device` (a torch.device); returns the bytes held now.

    On a GPU the measure is torch's allocated memory (``max_memory_allocated``), elsewhere the process's
    resident memory (:func:`reset_peak`)."""
    if device.type == "cuda":
        import torch

        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return reset_peak() * 1024


def peak_on(device) -> int:
    """The peak bytes on `device` since :func:`reset_peak_on`."""
    if device.type == "cuda":
        import torch

        sync(device)
        return torch.cuda.max_memory_allocated(device)
    return status_kib("VmHWM") * 1024


def sync(device) -> None:
    """Wait for `device`'s queued work (a GPU's kernels run asynchronously; a CPU's do not)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
