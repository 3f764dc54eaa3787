"""egma-prepare reads its subcommands from egma_model.datasets.registry: a dataset is one module (its files,
columns, reader and COMMANDS) plus one registry line, and no other file changes."""

import csv
import os

import pytest

from egma_model.datasets import registry
from egma_model.prepare import build_parser, main as prepare

FAKE_MODULE = '''
"""A made-up dataset: ``reports.csv`` (``file``, ``text``) beside its images."""
import os

from egma_model.datasets._common import Command, PrepareError, Summary, _read_csv, _split_sentences


def prepare_fake(root, split):
    header, rows = _read_csv(os.path.join(root, "reports.csv"), ["file", "text"])
    s = Summary("fake-set")
    for i, r in enumerate(rows):
        image = os.path.join(root, r["file"])
        if not os.path.isfile(image):
            s.skip(f"reports.csv: row {i + 2}", "image not found")
            continue
        s.add({"image": image, "report": r["text"], "split": split}, _split_sentences(r["text"]))
    return s


def _add_arguments(q):
    q.add_argument("--split", default="train", help="the split every row gets")


COMMANDS = {"fake-set": Command("a made-up dataset for the registry test",
                                lambda ns, out_dir: prepare_fake(ns.root, ns.split), _add_arguments)}
'''


@pytest.fixture
def fake_dataset(tmp_path, monkeypatch):
    """The fake module written into tmp_path and its one registry line added (at runtime)."""
    (tmp_path / "fake_family.py").write_text(FAKE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "MODULES", registry.MODULES + ["fake_family"])
    root = tmp_path / "fake"
    root.mkdir()
    from PIL import Image

    Image.new("L", (8, 8), 128).save(root / "a.png")
    (root / "reports.csv").write_text("file,text\na.png,Heart is normal. No effusion.\nmissing.png,Clear.\n")
    return str(root)


def test_a_registered_module_is_listed_and_runs(fake_dataset, tmp_path, capsys):
    assert "fake-set" in build_parser().format_help()
    out = str(tmp_path / "out" / "fake.csv")
    os.makedirs(os.path.dirname(out))
    assert prepare(["fake-set", "--root", fake_dataset, "--out", out, "--split", "test"]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(os.path.basename(r["image"]), r["split"]) for r in rows] == [("a.png", "test")]
    printed = capsys.readouterr().out
    assert "image not found" in printed


def test_the_builtin_subcommands_are_the_registry_s():
    names = list(registry.commands())
    assert names == ["mimic-eye", "reflacx", "egd-cxr", "chexpert-5x200", "chexpert", "rsna", "siim"]


def test_two_modules_claiming_one_subcommand_is_an_error(monkeypatch):
    monkeypatch.setattr(registry, "MODULES", registry.MODULES + ["egma_model.datasets.rsna"])
    with pytest.raises(ValueError, match="'rsna' is already taken"):
        registry.commands()


# A fake tree for the made-up dataset: ``write_fake_tree`` is optional, and a module that has it gets its tree
# written by registry.write_fake_trees into a folder named after the module
FAKE_TREE_WRITER = '''

def write_fake_tree(root):
    """A tiny tree of the made-up dataset (one image and reports.csv), for tests; no real data."""
    from PIL import Image

    os.makedirs(root)
    Image.new("L", (8, 8), 128).save(os.path.join(root, "a.png"))
    with open(os.path.join(root, "reports.csv"), "w") as f:
        f.write("file,text\\na.png,Heart is normal.\\n")
'''

BUILTIN_TREES = ["mimic-cxr-jpg", "mimic-eye", "reflacx", "egd-cxr", "chexpert", "rsna", "siim"]


def test_write_fake_trees_passes_over_a_module_without_one(fake_dataset, tmp_path):
    trees = registry.write_fake_trees(str(tmp_path / "trees"))
    assert list(trees) == BUILTIN_TREES
    assert trees["chexpert"] == str(tmp_path / "trees" / "chexpert" / "CheXpert-v1.0")
    assert sorted(os.listdir(tmp_path / "trees")) == sorted(BUILTIN_TREES)


def test_a_registered_module_s_fake_tree_is_written_and_prepares(tmp_path, monkeypatch):
    (tmp_path / "fake_family_with_tree.py").write_text(FAKE_MODULE + FAKE_TREE_WRITER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "MODULES", registry.MODULES + ["fake_family_with_tree"])
    trees = registry.write_fake_trees(str(tmp_path / "trees"))
    assert list(trees) == BUILTIN_TREES + ["fake-family-with-tree"]
    out = str(tmp_path / "fake.csv")
    assert prepare(["fake-set", "--root", trees["fake-family-with-tree"], "--out", out]) == 0
    with open(out, newline="") as f:
        assert [os.path.basename(r["image"]) for r in csv.DictReader(f)] == ["a.png"]
