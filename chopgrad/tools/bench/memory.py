"""Peak memory of a block of code: CUDA's allocator peak, or on CPU either the
process's peak RSS (VmHWM, after resetting it through /proc/self/clear_refs) or
the peak of the live tensor storages that the block's ops allocate."""
from __future__ import annotations

import gc
import resource

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: What PeakMemory measures on the CPU.
CPU_MEASURES = ("rss", "live_tensors")


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


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages allocated by ops run inside the mode (forward and backward).

    With `snapshot=True`, `at_peak` lists the storages live at the peak as (bytes, shape of the tensor that
    allocated it, the op that did).
    """

    def __init__(self, snapshot: bool = False):
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int, tuple]] = {}
        self.peak = 0
        self.snapshot = snapshot
        self.at_peak: list[tuple[int, tuple[int, ...], str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _, _) in self.refs.items() if ref.expired()]:
            del self.refs[key]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.refs:
                    self.refs[key] = (StorageWeakRef(st), st.nbytes(), (tuple(t.shape), str(func)))
        total = sum(n for _, n, _ in self.refs.values())
        if total > self.peak:
            self.peak = total
            if self.snapshot:
                self.at_peak = [(n, *origin) for _, n, origin in self.refs.values()]
        return out


class PeakMemory:
    """Context manager: `.peak_bytes` is the peak above the level at entry.

    On CUDA that is the allocator's peak. On the CPU, `cpu="rss"` measures the
    process's resident memory (what a training run pays, allocator caches
    included) and `cpu="live_tensors"` the tensor storages that ops inside the
    block allocate (independent of the allocator, for comparing two
    implementations of one op).
    """

    def __init__(self, device: torch.device, *, cpu: str = "rss"):
        if cpu not in CPU_MEASURES:
            raise ValueError(f"cpu must be one of {CPU_MEASURES}, got {cpu!r}")
        self.device = torch.device(device)
        self.cpu = cpu
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self._live = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
        elif self.cpu == "live_tensors":
            self._live = PeakLiveBytes().__enter__()
        else:
            self._precise = _reset_rss_peak()
            self.baseline_bytes = _status_kib("VmRSS") * 1024
            self._maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._live is not None:
            self._live.__exit__(*exc)
            peak = self._live.peak
        elif self._precise:
            peak = _status_kib("VmHWM") * 1024
        else:  # no clear_refs: the lifetime peak is the best available bound
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_bytes = max(0, peak - self.baseline_bytes)
        return False
