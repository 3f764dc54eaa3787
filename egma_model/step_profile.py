"""Where a training step's time and memory go: ``egma-train --profile-steps N``.

A ``StepProfiler`` is attached to the model (``model.part_timer``); the model's ``embed_images``,
``embed_sentences`` and ``loss_from_embeddings`` time themselves through it, and the training loop times
the data wait, the backward pass and the optimiser. One warm-up step is measured and dropped; for the next
``N`` steps each part's time is summed within the step (gradient caching runs the encoders twice and the
backward in two phases: each part is the sum of its phases), and the report gives the median over the
steps, the peak memory of each part, the step's median and the images per second.

Time: ``time.perf_counter`` around the part; on CUDA the device is synchronised at each boundary (so a
profiled step is a little slower than an unprofiled one). Memory: on CUDA the peak of
``torch.cuda.max_memory_allocated`` within the part (reset at the part's start); on the CPU the peak
resident set size sampled every ``interval_s`` by a thread (``/proc/self/statm``), and its growth over the
part's start. The CPU allocator keeps freed memory for reuse, so a part's RSS growth understates what it
allocates when an earlier part's memory is reused; the absolute peak is the process's.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
from typing import Dict, List, Optional

import torch

__all__ = ["StepProfiler", "PARTS", "format_table"]

PARTS = ("data", "image_encoder", "text_encoder", "loss_forward", "backward", "optimizer")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: the peak RSS so far (monotone, so growth reads 0 after the first peak)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StepProfiler:
    """Times and peak memory per part of ``steps`` training steps after ``warmup`` steps.

    Use: ``begin_step()``; ``with prof.part(name): ...`` for each part (the model calls it for its own
    parts when ``model.part_timer = prof``); ``end_step(images)``; ``done`` is true once every step is
    recorded; ``summary()`` and ``format_table(summary)`` give the report.
    """

    def __init__(self, steps: int, device: torch.device, *, warmup: int = 1, interval_s: float = 0.002):
        if steps < 1:
            raise ValueError(f"profile steps must be >= 1, got {steps}")
        self.steps, self.warmup, self.device, self.interval_s = steps, warmup, torch.device(device), interval_s
        self.cuda = self.device.type == "cuda"
        self.records: List[Dict] = []
        self._seen = 0
        self._cur: Optional[Dict] = None
        self._peak = 0
        self._stop = threading.Event()
        self._thread = None
        if not self.cuda:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------- sampling
    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            r = _rss_bytes()
            if r > self._peak:
                self._peak = r

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @property
    def active(self) -> bool:
        return self._cur is not None

    @property
    def done(self) -> bool:
        return len(self.records) >= self.steps

    def begin_step(self) -> None:
        self._sync()
        self._cur = {"time": {}, "peak": {}, "growth": {}, "t0": time.perf_counter()}

    @contextlib.contextmanager
    def part(self, name: str):
        if self._cur is None:
            yield
            return
        self._sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            start_mem = torch.cuda.memory_allocated(self.device)
        else:
            start_mem = _rss_bytes()
            self._peak = start_mem
        t = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            dt = time.perf_counter() - t
            if self.cuda:
                peak = torch.cuda.max_memory_allocated(self.device)
            else:
                peak = max(self._peak, _rss_bytes())
            c = self._cur
            c["time"][name] = c["time"].get(name, 0.0) + dt
            c["peak"][name] = max(c["peak"].get(name, 0), peak)
            c["growth"][name] = max(c["growth"].get(name, 0), peak - start_mem)

    def add_time(self, name: str, seconds: float) -> None:
        """A part timed by the caller (the data wait, measured before ``begin_step``)."""
        if self._cur is not None:
            self._cur["time"][name] = self._cur["time"].get(name, 0.0) + seconds

    def end_step(self, images: int) -> None:
        self._sync()
        c, self._cur = self._cur, None
        if c is None:
            return
        c["step"] = time.perf_counter() - c.pop("t0")
        c["images"] = images
        self._seen += 1
        if self._seen > self.warmup and not self.done:
            self.records.append(c)
        if self.done:
            self.close()

    def close(self) -> None:
        self._stop.set()

    # ---------------------------------------------------------------- report
    def summary(self, **context) -> Dict:
        """Median time (ms) and peak memory (MiB) of each part over the recorded steps, the median step
        (without the data wait, which happens before the step; the parts' medians come from different
        steps and need not add up to it), images per second without and with the data wait."""
        recs = self.records
        if not recs:
            raise RuntimeError("no profiled step was recorded")
        mib = 1 / 2 ** 20
        parts = {}
        for name in PARTS:
            if not any(name in r["time"] for r in recs):
                continue
            parts[name] = {
                "median_ms": 1e3 * statistics.median(r["time"].get(name, 0.0) for r in recs),
                "peak_mib": mib * max(r["peak"].get(name, 0) for r in recs),
                "growth_mib": mib * max(r["growth"].get(name, 0) for r in recs),
            }
        step = statistics.median(r["step"] for r in recs)
        with_data = statistics.median(r["step"] + r["time"].get("data", 0.0) for r in recs)
        # what no part covers (moving the batch to the device, the scheduler), per step, then the median
        other = statistics.median(r["step"] - sum(v for k, v in r["time"].items() if k != "data") for r in recs)
        images = recs[0]["images"]
        return {"steps": len(recs), "warmup_steps": self.warmup, "device": str(self.device),
                "memory": "cuda max_memory_allocated" if self.cuda else "cpu resident set size (sampled)",
                "threads": torch.get_num_threads(), "parts": parts, "step_median_ms": 1e3 * step,
                "other_ms": 1e3 * other, "images_per_step": images, "images_per_s": images / step,
                "images_per_s_with_data": images / with_data, **context}

    def write(self, path: str, **context) -> Dict:
        s = self.summary(**context)
        with open(path, "w") as f:
            json.dump(s, f, indent=2)
        return s


def format_table(s: Dict) -> str:
    """The summary as a text table: one row per part, then the step and the images per second."""
    peak_name = "peak alloc MiB" if s["memory"].startswith("cuda") else "peak RSS MiB"
    rows = [f"step profile: {s['steps']} steps after {s['warmup_steps']} warm-up, {s['device']}, "
            f"{s['threads']} threads, {s['images_per_step']} images/step",
            f"{'part':<15} {'median ms':>10} {'% of step':>10} {peak_name:>15} {'growth MiB':>11}"]
    step = s["step_median_ms"]
    for name, v in s["parts"].items():
        if name == "data":  # waited for before the step: outside the step's time, no memory measured
            rows.append(f"{name:<15} {v['median_ms']:>10.1f}")
            continue
        rows.append(f"{name:<15} {v['median_ms']:>10.1f} {100 * v['median_ms'] / step:>10.1f} "
                    f"{v['peak_mib']:>15.1f} {v['growth_mib']:>11.1f}")
    rows.append(f"{'other':<15} {s['other_ms']:>10.1f} {100 * s['other_ms'] / step:>10.1f}")
    rows.append(f"{'step (no data)':<15} {step:>10.1f} {100.0:>10.1f}")
    rows.append(f"images/s: {s['images_per_s']:.2f} (with the data wait: {s['images_per_s_with_data']:.2f})")
    return "\n".join(rows)
