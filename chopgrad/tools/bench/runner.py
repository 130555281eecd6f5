"""Runs one benchmark configuration in a fresh Python subprocess and watches its memory.

The child runs `python -m chopgrad.tools.bench.worker '<json config>'` and prints one
JSON line. The parent polls the child's resident memory and kills it when it
exceeds `memory_budget_bytes`, reporting the configuration as OOM instead of
letting the machine swap or the kernel's OOM killer pick a victim.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Measurement:
    config: dict
    status: str  # "ok", "oom", "error", "timeout"
    result: dict = field(default_factory=dict)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


#: seconds a child has to exit after SIGTERM before it is killed
STOP_GRACE_S = 3.0


def stop_child(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """Terminates `proc` (SIGTERM, then SIGKILL after `grace_s`) and reaps it.

    SIGINT and SIGTERM to this process wait until it is done, so a second Ctrl-C cannot leave the child behind.
    """
    stops = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def run_isolated(config: dict, *, memory_budget_bytes: Optional[int] = None, timeout_s: float = 1800,
                 module: str = "chopgrad.tools.bench.worker", rss_follows_live_memory: bool = True) -> Measurement:
    """Runs `config` in a fresh interpreter; returns its JSON result or the failure mode.

    With `rss_follows_live_memory` (for peak-RSS measurements), large CPU allocations go straight to mmap
    and back to the OS when freed, so resident memory follows live tensors instead of glibc's free lists;
    without it the child keeps the allocator settings of this environment (for timings).
    """
    env = dict(os.environ)
    if rss_follows_live_memory:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    if memory_budget_bytes is not None:
        env["CHOPGRAD_MEMORY_BUDGET"] = str(int(memory_budget_bytes))  # CUDA workers cap themselves
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", module, json.dumps(config)], stdout=out, stderr=err, env=env)
        start, killed_for = time.monotonic(), None
        try:
            while proc.poll() is None:
                if memory_budget_bytes is not None and _rss_bytes(proc.pid) > memory_budget_bytes:
                    killed_for = "oom"
                elif time.monotonic() - start > timeout_s:
                    killed_for = "timeout"
                if killed_for:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(0.02)
        except BaseException:
            # This process is being stopped (Ctrl-C, or SIGTERM, which the CLI turns into KeyboardInterrupt): the
            # child would otherwise run on alone until its configuration ends, minutes of CPU or GPU for nobody.
            stop_child(proc)
            raise
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if killed_for == "oom":
        return Measurement(config, "oom", detail=f"resident memory exceeded the budget of {memory_budget_bytes / 2**30:.2f} GiB")
    if killed_for == "timeout":
        return Measurement(config, "timeout", detail=f"ran longer than {timeout_s:.0f} s")
    if proc.returncode == -signal.SIGKILL:
        return Measurement(config, "oom", detail="killed by the operating system (out of memory)")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = stderr.strip().splitlines()[-5:]
        return Measurement(config, "error", detail=" | ".join(tail) or f"exit code {proc.returncode}")
    result: dict[str, Any] = json.loads(lines[-1])
    status = result.pop("status", "ok")
    return Measurement(config, status, result=result, detail=result.pop("detail", ""))
