"""Providers: the implementations the benchmark compares, discovered at run time.

* ``loop``: the original EGMA code's structure (``loop.py``), egma_compat semantics only.
* ``reference``: the vectorised eager reference (``egma_kernels.reference``), always available.
* ``reference-compiled``: ``torch.compile`` of the same reference functions (compiled during warm-up,
  outside the timings; the compile time is recorded). Not the compiled C++/CUDA extension
  (``egma_kernels.compiled``): that one is the ``cpu`` and ``cuda`` backends below.
* every other backend ``egma_kernels.available_backends(device)`` reports (``triton``, ``cuda``, ``cpu``
  as they land), called through the public functions with ``backend=<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

import egma_kernels as ek

from .. import reference
from .loop import loop_filip_similarity, loop_fine_grained_loss
from .problems import Problem

BASELINES = ("loop", "reference", "reference-compiled")


@dataclass
class LossOptions:
    egma_compat: bool = True
    alpha: Optional[float] = None  # None = the default for egma_compat (0.8 with compat, else 0.5)
    map_threshold: float = 2.0 / 7.0
    weights: Tuple[float, float, float] = (1.0, 1.0, 1.0)

    def as_kwargs(self) -> dict:
        """The options as ``fine_grained_loss`` keywords (``alpha=None``: its default for ``egma_compat``)."""
        return dict(alpha=self.alpha, map_threshold=self.map_threshold, weights=self.weights,
                    egma_compat=self.egma_compat)

    def resolved_alpha(self) -> float:
        if self.alpha is not None:
            return self.alpha
        return 0.8 if self.egma_compat else 0.5


class Provider:
    name: str = ""
    description: str = ""

    def skip_reason(self, problem: Problem, options: LossOptions) -> Optional[str]:
        return None

    def loss(self, problem: Problem, options: LossOptions):
        """``LossTerms`` of the problem (autograd through the problem's leaves)."""
        raise NotImplementedError

    def similarity(self, problem: Problem):
        """``(i2t, t2i)`` of the problem's images against its reports."""
        raise NotImplementedError

    def similarity_compat(self) -> bool:
        """Whether this provider's ``similarity`` zero-pads reports (``egma_compat`` semantics of I2T)."""
        return False


class LoopProvider(Provider):
    name = "loop"
    description = "original EGMA code structure: zero-padded (B,S_max,D) buffer, Python loops per image"

    def skip_reason(self, problem, options):
        if problem.size.kind == "loss" and not options.egma_compat:
            return "loop implements only egma_compat=True (the original code)"
        return None

    def loss(self, problem, options):
        return loop_fine_grained_loss(
            **problem.loss_args(),
            alpha=options.resolved_alpha(),
            map_threshold=options.map_threshold,
            weights=options.weights,
        )

    def similarity(self, problem):
        return loop_filip_similarity(problem.patch_emb, problem.sent_emb, problem.cu_seqlens, problem.logit_scale)

    def similarity_compat(self):
        return True


class BackendProvider(Provider):
    """A registered backend, called through the public functions as in a training loop: value checks off,
    and ``max_seqlen`` given (a collator knows its reports' lengths), so no call reads the device."""

    def __init__(self, name: str):
        self.name = name
        self.description = f"egma_kernels backend {name!r}"

    def loss(self, problem, options):
        return ek.fine_grained_loss(
            **problem.loss_args(), **options.as_kwargs(), backend=self.name, return_details=True, validate=False,
            max_seqlen=problem.S_max,
        )

    def similarity(self, problem):
        return ek.filip_similarity(
            problem.patch_emb, problem.sent_emb, problem.cu_seqlens, problem.logit_scale, backend=self.name,
            validate=False, max_seqlen=problem.S_max,
        )


class CompiledReferenceProvider(Provider):
    name = "reference-compiled"
    description = ("torch.compile of the vectorised reference (compile time outside the timings; the C++/CUDA "
                   "extension is the cpu/cuda providers)")

    def __init__(self):
        self._loss = None
        self._similarity = None

    @staticmethod
    def _configure_dynamo():
        import torch._dynamo

        cfg = torch._dynamo.config
        for key in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, key):
                setattr(cfg, key, max(64, getattr(cfg, key)))

    def loss(self, problem, options):
        if self._loss is None:
            self._configure_dynamo()
            self._loss = torch.compile(reference.fine_grained_loss_ref, dynamic=False)
        args = problem.loss_args()
        if args["gaze"] is not None and args["gaze_mask"] is None:
            args["gaze_mask"] = torch.ones(problem.size.B, dtype=torch.bool, device=problem.device)
        return self._loss(
            **args,
            alpha=options.resolved_alpha(),
            map_threshold=options.map_threshold,
            weights=tuple(options.weights),
            egma_compat=options.egma_compat,
        )

    def similarity(self, problem):
        if self._similarity is None:
            self._configure_dynamo()
            self._similarity = torch.compile(reference.filip_similarity_ref, dynamic=False)
        return self._similarity(problem.patch_emb, problem.sent_emb, problem.cu_seqlens, problem.logit_scale)


def discover(device: torch.device, requested: Optional[List[str]] = None, include_compiled: bool = True) -> Tuple[List[Provider], List[str]]:
    """The providers to run on ``device``: ``(providers, notes)``; notes say what was left out and why.

    Default: ``loop``, ``reference``, ``reference-compiled`` and every available fused backend (the Triton
    interpreter, selected by ``TRITON_INTERPRET=1`` on a machine without a GPU, is left out unless named).
    Names are case-sensitive; an unknown or unavailable requested name raises ``ValueError``.
    """
    fused = [b for b in ek.available_backends(device.type) if b != "reference"]
    notes = []
    # A fused backend missing here (the extension not built, say) is said, with the fix, not silently left out.
    for name, why in ek.backends.unavailable_backends().items():
        if device.type in ek.backends._REGISTRY[name].devices:
            notes.append(f"{name} left out: {why}")
    if requested is None:
        names = ["loop", "reference"] + (["reference-compiled"] if include_compiled else []) + fused
        if device.type != "cuda" and "triton" in names:
            names.remove("triton")
            notes.append("triton left out: on the CPU it runs in the interpreter (name it with --providers to run it)")
        if not include_compiled:
            notes.append("reference-compiled left out (--no-compile)")
    else:
        names = list(requested)
        known = set(BASELINES) | set(ek.known_backends())
        for n in names:
            if n not in known:
                raise ValueError(f"unknown provider {n!r}; known: {', '.join(sorted(known))}")
            if n not in BASELINES and n not in fused:
                raise ValueError(
                    f"provider {n!r} is not available on {device.type} here; available: "
                    f"{', '.join(list(BASELINES) + fused)}"
                )
    providers: List[Provider] = []
    for n in names:
        if n == "loop":
            providers.append(LoopProvider())
        elif n == "reference-compiled":
            providers.append(CompiledReferenceProvider())
        else:
            providers.append(BackendProvider(n))
    return providers, notes
