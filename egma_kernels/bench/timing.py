"""Timing and memory measurement.

Time: on CUDA, CUDA events around each call (the L2 cache flushed before each, like ``triton.testing``);
on the CPU, ``time.perf_counter`` around each call with the garbage collector off and all of torch's
intra-op threads -- what ``torch.utils.benchmark.Timer`` does for one call, without the two warm-up calls
it adds to every sample (a backward can only run once per forward, so an untimed preparation must run
before each timed call). Each measurement repeats until ``repeats`` runs or
``max_time_s`` seconds (with at least ``min_repeats`` runs), after ``warmup`` untimed runs; the median and
the 20th/80th percentiles are reported.

Memory: the peak of bytes allocated *during* the measured call above what was allocated when it started
(``new_peak``), i.e. the call's scratch memory; the harness adds the input bytes for the peak.

* CUDA: the caching allocator's statistics (``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``), exact.
* CPU: a measured proxy. The torch profiler with ``profile_memory=True`` receives an event from c10's
  CPU allocator for every allocation and free of a tensor buffer (including buffers allocated inside C++
  extensions and compiled kernels); the running sum of those events over the call, in time order, gives
  its peak. Not counted: memory that does not come from the torch CPU allocator (numpy arrays, malloc
  inside a kernel, the Python heap) and the allocator's own fragmentation. ``tracemalloc`` or RSS would
  not see torch buffers or would see the malloc pool instead.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from typing import Callable, List, Optional, Tuple

import torch

CPU_MEMORY_METHOD = "torch.profiler(profile_memory=True): c10 CPU allocator events, peak of the running sum"
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated (caching allocator statistics)"


def _quantiles(values: List[float]) -> Tuple[float, float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


class BudgetExceeded(RuntimeError):
    pass


def _noop():
    pass


class Timing:
    def __init__(self, times_s: List[float], warmup_s: float):
        self.times_s = times_s
        self.warmup_s = warmup_s
        self.median_s, self.p20_s, self.p80_s = _quantiles(times_s)

    def as_ms(self) -> dict:
        return dict(
            median_ms=self.median_s * 1e3,
            p20_ms=self.p20_s * 1e3,
            p80_ms=self.p80_s * 1e3,
            runs=len(self.times_s),
            warmup_s=self.warmup_s,
        )


_L2_FLUSH = None


def _flush_l2():
    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device="cuda")  # 256 MiB > any L2
    _L2_FLUSH.zero_()


def measure_time(
    fn: Callable[[], object],
    device: torch.device,
    pre: Optional[Callable[[], object]] = None,
    repeats: int = 10,
    warmup: int = 2,
    max_time_s: float = 2.0,
    min_repeats: int = 3,
    budget_left_s: Optional[float] = None,
) -> Timing:
    """Time ``fn()`` (``pre()`` runs untimed before each call).

    A call slower than ``max_time_s`` gets one warm-up and one timed run; ``BudgetExceeded`` is raised
    after the first warm-up call when ``min_repeats`` calls would not fit in ``budget_left_s``.
    """
    pre = pre or _noop
    start = time.perf_counter()
    for i in range(max(1, warmup)):
        pre()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        call_s = time.perf_counter() - t0
        if i == 0:
            if budget_left_s is not None and call_s * min_repeats > budget_left_s:
                raise BudgetExceeded(f"one call takes {call_s:.1f} s; {budget_left_s:.0f} s of the time budget left")
            if call_s > max_time_s:  # a slow call: one warm-up is enough, and one timed run
                min_repeats = 1
                break
    warmup_s = time.perf_counter() - start
    times: List[float] = []
    begin = time.perf_counter()
    if device.type == "cuda":
        events = []
        while len(events) < repeats and (len(events) < min_repeats or time.perf_counter() - begin < max_time_s):
            pre()
            _flush_l2()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            events.append((s, e))
            e.synchronize()
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
    else:
        # What torch.utils.benchmark.Timer does for one call (perf_counter, garbage collector off, all of
        # torch's threads), without its two warm-up calls per sample: the untimed pre() must precede each call.
        gc_was_enabled = gc.isenabled()
        gc.disable()  # (no gc.collect() first: with torch.compile loaded one takes ~0.3 s)
        try:
            while len(times) < repeats and (len(times) < min_repeats or time.perf_counter() - begin < max_time_s):
                pre()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        finally:
            if gc_was_enabled:
                gc.enable()
    return Timing(times, warmup_s)


def _cpu_new_peak(prof) -> int:
    events = []
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU:
            events.append((e.start_ns(), e.nbytes()))
    events.sort(key=lambda x: x[0])
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def measure_memory(fn: Callable[[], object], device: torch.device, pre: Optional[Callable[[], object]] = None) -> Tuple[int, str]:
    """``(new_peak_bytes, method)`` of one call of ``fn()`` after ``pre()``."""
    if pre is not None:
        pre()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base), CUDA_MEMORY_METHOD
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced():  # kineto prints a start and a stop line each time
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            fn()
    return int(_cpu_new_peak(prof)), CPU_MEMORY_METHOD


@contextlib.contextmanager
def _stderr_silenced():
    try:
        sys.stderr.flush()
        fd = sys.stderr.fileno()
        saved = os.dup(fd)
    except (AttributeError, OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def quiet_profiler_logs() -> None:
    """Kineto prints start/stop lines to stderr each time the profiler runs; keep the progress display readable."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
