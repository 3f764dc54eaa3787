"""The datasets ``egma-prepare`` knows: one module per dataset family, in the order its help lists them.

Each module declares ``COMMANDS = {subcommand: Command(...)}`` (``egma_model.datasets._common.Command``); adding a
dataset is one new module and one line here. The modules are imported by name when the command line is built,
so this list is the only place that names them.
"""

from __future__ import annotations

import importlib
from typing import Dict, List

from ._common import Command

MODULES: List[str] = [
    "egma_model.datasets.mimic_eye",
    "egma_model.datasets.reflacx",
    "egma_model.datasets.egd_cxr",
    "egma_model.datasets.chexpert",
    "egma_model.datasets.rsna",
    "egma_model.datasets.siim",
]

RESERVED = ("cache",)  # egma-prepare's own subcommand (egma_model.prepared_build)


def commands() -> Dict[str, Command]:
    """Every registered subcommand, ``{name: Command}``; two modules claiming one name is an error."""
    found: Dict[str, Command] = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, command in module.COMMANDS.items():
            if name in found or name in RESERVED:
                raise ValueError(f"{module_name}: egma-prepare subcommand {name!r} is already taken")
            found[name] = command
    return found
