"""Plumbing shared by every console script of both packages (``egma-bench``, ``egma-prepare``, ``egma-train``,
``egma-eval``, ``egma-demo``): the help formatter, the CPU thread chooser and the progress bar.

It lives in ``egma_kernels`` (not in the benchmark) because ``egma_model`` depends on ``egma_kernels`` and not
the reverse; the benchmark imports it like every other script. It imports nothing from either package.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Iterable, Optional


class HelpFormatter(argparse.HelpFormatter):
    """Help with each option's default said once: " (default: X)" is appended unless the help already says
    its default in words, or there is none to show (a flag, or None)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" in text.lower()
            or not action.option_strings
            or action.default is None
            or action.default is argparse.SUPPRESS
            or isinstance(action.default, bool)
        ):
            return text
        return text + " (default: %(default)s)"


def idle_cores(sample_s: float = 0.5) -> Optional[float]:
    """Cores left idle by the rest of the machine, from two reads of /proc/stat ``sample_s`` apart (None
    where there is no /proc/stat). This process sleeps meanwhile, so all the busy time is other work."""
    def read():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    try:
        idle0, total0 = read()
        time.sleep(sample_s)
        idle1, total1 = read()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (idle1 - idle0) / (total1 - total0) * (os.cpu_count() or 1)


def choose_threads(torch_default: int):
    """The default CPU thread count: torch's own, but no more than the cores other work leaves idle (at least
    1). Torch's threads wait for each other at every op: on an oversubscribed CPU the reference's many small
    ops then run many times slower, while one thread per idle core stays close to the quiet machine's time.
    Returns ``(threads, why)``."""
    idle = idle_cores()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    if idle is None:
        if load is None:
            return torch_default, f"torch's default ({torch_default})"
        idle = max(0.0, (os.cpu_count() or 1) - load)
    threads = max(1, min(torch_default, int(idle + 0.25)))
    load_text = "" if load is None else f", load average {load:.1f}"
    return threads, (f"{threads} of torch's {torch_default}: about {idle:.1f} of {os.cpu_count()} cores idle in a "
                     f"0.5 s sample{load_text} (--threads N to choose)")


def progress_bar(it: Optional[Iterable] = None, *, total=None, desc: str = "", enabled: bool = True, **kwargs):
    """A tqdm bar over ``it`` (or a manual one where ``it`` is None), or None/``it`` itself where progress is
    off or tqdm is missing: a progress bar is never a reason to fail."""
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, total=total, desc=desc, dynamic_ncols=True, **kwargs)
