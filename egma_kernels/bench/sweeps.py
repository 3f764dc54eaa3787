"""Named problem sizes and sweeps (the sweep definitions; ``benchmarks/README.md`` documents them).

A *size* is one problem: ``B`` images of ``P`` patches against ``B`` reports of 1 to ``max_sent`` sentences
(drawn once from a fixed seed) in ``D`` dimensions, for the loss; or ``M`` images against ``R`` reports
for the retrieval similarity (``filip_similarity``, forward only, no autograd).

A *sweep* is a list of sizes plus the providers, modes and dtypes to run on them; the command-line
options of ``egma-bench`` override any of its fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

MODES = ("forward", "backward", "full")  # full = forward + backward
MODE_LABEL = {"forward": "fwd", "backward": "bwd", "full": "fwd+bwd"}


@dataclass(frozen=True)
class Size:
    name: str
    kind: str  # "loss" (fine_grained_loss) or "similarity" (filip_similarity, forward only)
    B: int  # images (M for a similarity size)
    P: int
    D: int = 512
    reports: Optional[int] = None  # number of reports R; None = B (the loss always has R = B)
    min_sent: int = 1
    max_sent: int = 10
    gaze_fraction: float = 1.0  # fraction of reports that carry gaze (loss only)
    gaze_density: float = 0.4  # fraction of (sentence, patch) pairs with gaze heat > 0
    seed: int = 0

    @property
    def R(self) -> int:
        return self.B if self.reports is None else self.reports

    def describe(self) -> str:
        if self.kind == "similarity":
            return f"{self.B} images x {self.R} reports, P={self.P}, D={self.D}"
        return f"B={self.B}, P={self.P}, D={self.D}, {self.min_sent}-{self.max_sent} sent/report"

    def scaled(self, **changes) -> "Size":
        return replace(self, **changes)


SIZES: Dict[str, Size] = {
    s.name: s
    for s in [
        # The EGMA paper's setting: batch 40, a 7x7 patch grid, 512-d projections, 1-10 sentences a report.
        Size("egma", "loss", B=40, P=49),
        Size("p196", "loss", B=40, P=196),  # 14x14 grid
        Size("p784", "loss", B=40, P=784),  # 28x28 grid
        Size("b256-p196", "loss", B=256, P=196),
        Size("b1024-p196", "loss", B=1024, P=196),
        # Zero-shot retrieval / classification: 1600 test images against 40 reports (CheXpert 5x200-like).
        Size("retrieval", "similarity", B=1600, P=49, reports=40),
        # Tiny problems for the CI smoke sweep.
        Size("tiny", "loss", B=4, P=9, D=32, max_sent=4),
        Size("tiny-retrieval", "similarity", B=6, P=9, D=32, reports=3, max_sent=4),
    ]
}


@dataclass(frozen=True)
class Sweep:
    name: str
    sizes: Tuple[str, ...]
    modes: Tuple[str, ...] = MODES
    dtypes: Tuple[str, ...] = ("float32",)
    providers: Optional[Tuple[str, ...]] = None  # None = every provider available on the device
    repeats: int = 10
    warmup: int = 2
    max_time_s: float = 2.0  # stop repeating one measurement after this long (at least min_repeats runs)
    min_repeats: int = 3
    # reference-compiled compiles once per (size, dtype, mode); only on these sizes (None = every size)
    compile_sizes: Optional[Tuple[str, ...]] = None
    egma_compat: bool = True
    threads: Optional[int] = None  # torch CPU threads for the run (None = torch's default)
    note: str = ""
    extra: dict = field(default_factory=dict, hash=False, compare=False)


SWEEPS: Dict[str, Sweep] = {
    s.name: s
    for s in [
        Sweep(
            "cpu",
            sizes=("egma", "retrieval"),
            repeats=10,
            warmup=1,
            max_time_s=1.5,
            compile_sizes=("egma",),
            note="default on a machine without a GPU: the EGMA size in every mode and retrieval, "
            "about 2 minutes on 2 idle cores (most of it compiling reference-compiled; --no-compile halves it)",
        ),
        Sweep(
            "gpu",
            sizes=("egma", "retrieval", "p196", "b256-p196", "b1024-p196", "p784"),
            dtypes=("float32", "bfloat16"),
            repeats=20,
            warmup=2,
            max_time_s=0.5,
            compile_sizes=("egma",),  # each (size, dtype) is a fresh compile of 30-60 s
            note="default on a CUDA machine: every size of the issue, float32 and bfloat16",
        ),
        Sweep(
            "smoke",
            sizes=("tiny", "tiny-retrieval"),
            dtypes=("float32", "float64"),
            repeats=2,
            warmup=1,
            min_repeats=1,
            max_time_s=0.2,
            compile_sizes=(),
            threads=1,  # tiny ops: one thread is fastest and steadiest on a busy CI runner
            note="seconds: CI checks that the harness runs and its outputs are well formed",
        ),
    ]
}


def default_sweep_name(device: str) -> str:
    return "gpu" if device == "cuda" else "cpu"


def parse_size(text: str) -> Size:
    """A named size, or an ad-hoc one: ``loss:B=40,P=49[,D=512,max_sent=10]`` / ``similarity:B=1600,P=49,reports=40``."""
    if text in SIZES:
        return SIZES[text]
    if ":" not in text:
        raise ValueError(f"unknown size {text!r}; named sizes: {', '.join(SIZES)} (or kind:B=..,P=..)")
    kind, spec = text.split(":", 1)
    if kind not in ("loss", "similarity"):
        raise ValueError(f"size kind must be 'loss' or 'similarity', got {kind!r}")
    values = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key in ("gaze_fraction", "gaze_density"):
            values[key] = float(value)
        elif key in ("B", "P", "D", "reports", "min_sent", "max_sent", "seed"):
            values[key] = int(value)
        else:
            raise ValueError(f"unknown size field {key!r} in {text!r}")
    if "B" not in values or "P" not in values:
        raise ValueError(f"an ad-hoc size needs B and P: {text!r}")
    return Size(name=text, kind=kind, **values)


def sizes_of(names) -> List[Size]:
    return [parse_size(n) for n in names]
