"""The benchmark harness behind ``egma-bench`` (see ``cli.py`` and ``benchmarks/README.md``).

Providers: ``loop`` (the original EGMA code's structure), ``reference``, ``reference-compiled`` and every
fused backend available at run time. Import-light: nothing heavy runs on import.
"""

from .sweeps import SIZES, SWEEPS, Size, Sweep

__all__ = ["SIZES", "SWEEPS", "Size", "Sweep"]
