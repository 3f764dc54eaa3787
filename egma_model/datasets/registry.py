"""The datasets ``egma-prepare`` knows: one module per dataset family, in the order its help lists them.

Each module declares ``COMMANDS = {subcommand: Command(...)}`` (``egma_model.datasets._common.Command``); adding a
dataset is one new module and one line here. The modules are imported by name when the command line is built,
so this list is the only place that names them.

A module may also define ``write_fake_tree(root)``: a tiny tree in its published layout, for tests and demos
(no real data). It is optional: ``write_fake_trees`` writes the tree of each module that has one and passes
over the others.
"""

from __future__ import annotations

import importlib
import os
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


def write_fake_trees(root: str) -> Dict[str, str]:
    """Every dataset's fake tree under ``root`` (tiny trees in the published layouts, for tests and demos; no
    real data); returns ``{folder name: the folder egma-prepare's --root takes}``.

    MIMIC-CXR-JPG's tree (``mimic_cxr.FAKE_ITEMS``) goes to ``mimic-cxr-jpg``: the gaze sets' fake trees refer
    to its images by default. Then each registered module's ``write_fake_tree(folder)``, in the folder named
    after the module (``egd_cxr`` -> ``egd-cxr``); a writer that returns a folder (CheXpert's
    ``CheXpert-v1.0``) names the ``--root`` to use. A module without ``write_fake_tree`` is passed over."""
    from . import mimic_cxr

    trees = {"mimic-cxr-jpg": os.path.join(root, "mimic-cxr-jpg")}
    mimic_cxr.write_fake_tree(trees["mimic-cxr-jpg"], mimic_cxr.FAKE_ITEMS)
    for module_name in MODULES:
        write = getattr(importlib.import_module(module_name), "write_fake_tree", None)
        if write is None:
            continue
        name = module_name.rpartition(".")[2].replace("_", "-")
        folder = os.path.join(root, name)
        trees[name] = write(folder) or folder
    return trees
