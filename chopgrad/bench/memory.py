"""Peak memory of a block of code: CUDA's allocator peak, or on CPU the
process's peak RSS (VmHWM) after resetting it through /proc/self/clear_refs."""
from __future__ import annotations

import gc
import resource

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: `.peak_bytes` is the peak above the level at entry."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.baseline_bytes = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self._precise = _reset_rss_peak()
            self.baseline_bytes = _status_kib("VmRSS") * 1024
            self._maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._precise:
            peak = _status_kib("VmHWM") * 1024
        else:  # no clear_refs: the lifetime peak is the best available bound
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_bytes = max(0, peak - self.baseline_bytes)
        return False
