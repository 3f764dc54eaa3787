"""CheXpert: the ``egma-prepare chexpert-5x200`` (zero-shot) and ``chexpert`` (linear probe) subcommands.

CheXpert 5x200: ``--selection FILE`` reads a published list as released: MedCLIP's
``chexpert-5x200-meta.csv`` (``imgpath``, the 14 label columns; it includes lateral views) or GLoRIA's
``chexpert_5x200.csv`` (``Path``, the label columns). Without it, our seeded selection from CheXpert-v1.0
``train.csv`` (``Path``, ``Frontal/Lateral`` and the 14 label columns) by the rule of GLoRIA's
``gloria/datasets/preprocess_datasets.py`` (GLoRIA samples unseeded, so its images are not reproducible):
frontal images, blank labels read as 0, and for each of Atelectasis, Cardiomegaly, Consolidation, Edema,
Pleural Effusion, 200 images sampled (seeded) that are positive (1) for it and 0 for every other label except
``No Finding``. ``--loose`` only asks the other four competition labels not to be positive. Which set a
paper's numbers come from matters: see docs/datasets.md.
``chexpert`` (for the linear probe): the other frontal ``train.csv`` images as ``train`` and the frontal
``valid.csv`` images as ``test``, the five findings as labels with GLoRIA's uncertain-label mapping.
"""

from __future__ import annotations

import os
import random
from typing import Dict, List, Optional, Tuple

from ._common import Command, PrepareError, Summary, _read_csv
from ._fakes import write_csv, write_image

CHEXPERT_COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


CHEXPERT_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity", "Edema",
                   "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                   "Fracture", "Support Devices"]


def _chexpert_image(root: str, rel: str) -> Optional[str]:
    """A CheXpert ``Path`` (``CheXpert-v1.0/train/...``, relative to the folder above the dataset's) on disk."""
    parent = os.path.dirname(os.path.abspath(root.rstrip("/")))
    cands = [os.path.join(parent, rel), os.path.join(root, rel),
             os.path.join(root, rel.split("/", 1)[1]) if "/" in rel else rel]
    return next((c for c in cands if os.path.isfile(c)), None)


def _chexpert_key(path: str) -> Optional[str]:
    """``train/patient<N>/study<M>/<view>.jpg`` (or ``valid/...``) of any spelling of a CheXpert image path:
    ``CheXpert-v1.0/train/...`` (train.csv, GLoRIA), ``./data/CheXpert/data/CheXpert-v1.0-small/train/...``
    (MedCLIP's ``imgpath``)."""
    p = path.strip().replace("\\", "/")
    cut = max(p.rfind("/train/"), p.rfind("/valid/"))
    if cut >= 0:
        return p[cut + 1:]
    return p if p.startswith(("train/", "valid/")) else None


def read_chexpert_selection(path: str) -> Tuple[str, List[Tuple[str, str, str]]]:
    """A published CheXpert 5x200 list: ``(kind, [(where, key, label)])`` with ``kind`` ``"gloria"`` (a
    ``Path`` column: GLoRIA's ``chexpert_5x200.csv``, written by ``preprocess_chexpert_5x200_data`` in
    marshuang80/gloria ``gloria/datasets/preprocess_datasets.py``; some forks name it ``chexpert_8x200.csv``) or
    ``"medclip"`` (an ``imgpath`` column: MedCLIP's ``chexpert-5x200-meta.csv``, RyanWangZf/MedCLIP
    ``local_data/``). Each row's label is the one competition column equal to 1. Rows are kept as listed,
    lateral views included (MedCLIP's list has them)."""
    header, rows = _read_csv(path, CHEXPERT_COMPETITION)
    col = "imgpath" if "imgpath" in header else "Path" if "Path" in header else None
    if col is None:
        raise PrepareError(f"{path}: neither an 'imgpath' (MedCLIP) nor a 'Path' (GLoRIA) column; found {header}")
    out = []
    for i, r in enumerate(rows):
        where = f"{os.path.basename(path)}: row {i + 2}"
        try:
            pos = [t for t in CHEXPERT_COMPETITION if float((r.get(t) or "0").strip() or 0) == 1.0]
        except ValueError:
            pos = []
        out.append((where, _chexpert_key(r[col] or "") or "", pos[0] if len(pos) == 1 else ""))
    return ("medclip" if col == "imgpath" else "gloria"), out


def _chexpert_from_selection(root: str, selection: str, s: Summary) -> Summary:
    kind, rows = read_chexpert_selection(selection)
    for where, key, label in rows:
        if not label:
            s.skip(where, "selection row without exactly one competition label equal to 1")
            continue
        image = _chexpert_image(root, "CheXpert-v1.0/" + key) if key else None
        if image is None:
            s.skip(where, "image file not found")
            continue
        s.add({"image": os.path.abspath(image), "labels": label, "split": "test", "source_id": key}, where=where,
              keys=[("chexpert", key)])
    lateral = sum(1 for r in s.rows if "lateral" in r["source_id"])
    s.notes.append(f"selection read from {os.path.basename(selection)} ({kind}'s published list); "
                   f"{lateral} lateral images in it")
    return s


def prepare_chexpert_5x200(root: str, *, n: int = 200, seed: int = 0, loose: bool = False,
                           selection: Optional[str] = None) -> Summary:
    """CheXpert 5x200: the published list ``selection`` as released (see ``read_chexpert_selection``), else our
    seeded selection from CheXpert-v1.0 ``train.csv`` (GLoRIA's rule; see the module doc)."""
    s = Summary("chexpert-5x200")
    if selection:
        return _chexpert_from_selection(root, selection, s)
    s.notes.append(f"seeded selection (seed {seed}) by GLoRIA's rule: not the images of a published list, so "
                   "zero-shot numbers are not directly comparable with papers that used one (see docs/datasets.md)")
    csv_path = os.path.join(root, "train.csv")
    header, rows = _read_csv(csv_path, ["Path", "Frontal/Lateral"] + CHEXPERT_COMPETITION)
    others = [c for c in CHEXPERT_LABELS if c in header and c != "No Finding"]

    def val(r, c):
        v = (r.get(c) or "").strip()
        return 0.0 if v == "" else float(v)  # blank = not mentioned, read as 0 (GLoRIA's fillna(0))

    pools: Dict[str, List[Tuple[str, Dict]]] = {t: [] for t in CHEXPERT_COMPETITION}
    for i, r in enumerate(rows):
        where = f"train.csv: row {i + 2}"
        if r.get("Frontal/Lateral") != "Frontal":
            continue  # not a candidate (GLoRIA keeps frontal views only); not counted as skipped
        try:
            v = {c: val(r, c) for c in others}
        except ValueError:
            s.skip(where, "a label cell is not a number")
            continue
        pos = [t for t in CHEXPERT_COMPETITION if v[t] == 1.0]
        if len(pos) != 1:
            continue
        t = pos[0]
        if loose or all(v[c] == 0.0 for c in others if c != t):
            pools[t].append((where, r))
    rng = random.Random(seed)
    for t in CHEXPERT_COMPETITION:
        pool = pools[t]
        if len(pool) < n:
            s.notes.append(f"{t}: only {len(pool)} candidates for {n}")
        for where, r in rng.sample(pool, min(n, len(pool))):
            rel = r["Path"]
            image = _chexpert_image(root, rel)
            if image is None:
                s.skip(where, "image file not found")
                continue
            s.add({"image": os.path.abspath(image), "labels": t, "split": "test", "source_id": rel})
    return s


# GLoRIA's CHEXPERT_UNCERTAIN_MAPPINGS (after the CheXpert paper): an uncertain (-1) label counts as positive
# for these and as negative for Cardiomegaly and Consolidation
CHEXPERT_UNCERTAIN_AS = {"Atelectasis": 1, "Cardiomegaly": 0, "Consolidation": 0, "Edema": 1, "Pleural Effusion": 1}


def prepare_chexpert(root: str, *, n_5x200: int = 200, seed: int = 0, selection: Optional[str] = None) -> Summary:
    """CheXpert for the linear probe: frontal ``train.csv`` images not in the 5x200 selection (same seed) as
    ``train``, frontal ``valid.csv`` images as ``test`` (GLoRIA uses the official validation set as its test
    set); labels = the competition findings present, uncertain ones mapped as GLoRIA does; none present =
    ``No Finding`` (not a probe class)."""
    s = Summary("chexpert")
    five = prepare_chexpert_5x200(root, n=n_5x200, seed=seed, selection=selection)
    taken = {_chexpert_key(r["source_id"]) for r in five.rows}
    for fn, split in (("train.csv", "train"), ("valid.csv", "test")):
        _, rows = _read_csv(os.path.join(root, fn), ["Path", "Frontal/Lateral"] + CHEXPERT_COMPETITION)
        for i, r in enumerate(rows):
            where = f"{fn}: row {i + 2}"
            if r.get("Frontal/Lateral") != "Frontal" or _chexpert_key(r["Path"]) in taken:
                continue
            labels = []
            try:
                for c in CHEXPERT_COMPETITION:
                    v = (r.get(c) or "").strip()
                    x = 0.0 if v == "" else float(v)
                    if x == 1.0 or (x == -1.0 and CHEXPERT_UNCERTAIN_AS[c] == 1):
                        labels.append(c)
            except ValueError:
                s.skip(where, "a label cell is not a number")
                continue
            image = _chexpert_image(root, r["Path"])
            if image is None:
                s.skip(where, "image file not found")
                continue
            s.add({"image": os.path.abspath(image), "labels": ";".join(labels) or "No Finding", "split": split,
                   "source_id": r["Path"]})
    what = os.path.basename(selection) if selection else f"seed {seed}"
    s.notes.append(f"{len(taken)} CheXpert 5x200 images ({what}) left out of the probe's training rows")
    return s


def _add_5x200_arguments(q) -> None:
    q.add_argument("--per-class", type=int, default=200)
    q.add_argument("--loose", action="store_true", help="only the other competition labels must not be positive")
    q.add_argument("--selection", default=None, help="a published 5x200 list read as released: MedCLIP's "
                   "chexpert-5x200-meta.csv (imgpath) or GLoRIA's chexpert_5x200.csv (Path); default: the seeded rule")


def _run_5x200(ns, out_dir: str) -> Summary:
    return prepare_chexpert_5x200(ns.root, n=ns.per_class, seed=ns.seed, loose=ns.loose, selection=ns.selection)


def _add_probe_arguments(q) -> None:
    q.add_argument("--per-class", type=int, default=200, help="the 5x200 selection to leave out")
    q.add_argument("--selection", default=None, help="the published 5x200 list to leave out (as chexpert-5x200)")


def _run_probe(ns, out_dir: str) -> Summary:
    return prepare_chexpert(ns.root, n_5x200=ns.per_class, seed=ns.seed, selection=ns.selection)


COMMANDS = {
    "chexpert-5x200": Command("CheXpert 5x200 from CheXpert-v1.0 train.csv", _run_5x200, _add_5x200_arguments,
                              seed=True),
    "chexpert": Command("CheXpert for the linear probe: train.csv minus the 5x200 images, valid.csv as test",
                        _run_probe, _add_probe_arguments, seed=True),
}


# ----------------------------------------------------------------------------------- the fake tree


# train.csv's and valid.csv's header as CheXpert-v1.0 publishes it (Lung Opacity before Lung Lesion)
FAKE_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
               "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
               "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]


def write_fake_tree(root: str, per_class: int = 3) -> str:
    """A tiny CheXpert tree in the published layout under ``root``, for tests and demos; no real data; returns
    its ``CheXpert-v1.0`` folder.

    CheXpert-v1.0/train.csv: per competition class ``per_class`` clean candidates, plus rows that the
    selection must not take (lateral, two findings, an uncertain other label) and one bad label cell."""
    comp = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    base = os.path.join(root, "CheXpert-v1.0")
    rows, n = [], 0

    def row(labels, view="Frontal", bad=False):
        nonlocal n
        n += 1
        rel = f"CheXpert-v1.0/train/patient{n:05d}/study1/view1_{view.lower()}.jpg"
        write_image(os.path.join(root, rel), seed=n)
        r = [rel, "Female", 60, view, "AP"] + [""] * (len(FAKE_HEADER) - 5)
        for k, v in labels.items():
            r[FAKE_HEADER.index(k)] = v
        if bad:
            r[FAKE_HEADER.index("Fracture")] = "abc"
        rows.append(r)

    for c in comp:
        for _ in range(per_class):
            row({c: "1.0", "No Finding": ""})
    row({"Edema": "1.0"}, view="Lateral")
    row({"Edema": "1.0", "Cardiomegaly": "1.0"})
    row({"Edema": "1.0", "Pneumonia": "-1.0"})
    row({"Edema": "1.0"}, bad=True)
    for _ in range(4):
        row({"No Finding": "1.0"})
    write_csv(os.path.join(base, "train.csv"), FAKE_HEADER, rows)
    # valid.csv (the probe's test side): uncertain Edema counts as positive, uncertain Cardiomegaly as negative
    rows = []
    for labels in ({"Edema": "-1.0"}, {"Cardiomegaly": "-1.0", "Atelectasis": "1.0"}, {"No Finding": "1.0"},
                   {"Pleural Effusion": "1.0", "Consolidation": "1.0"}, {"Cardiomegaly": "1.0"}):
        row(labels)
    row({"Edema": "1.0"}, view="Lateral")
    for r in rows:
        r[0] = r[0].replace("/train/", "/valid/")
        src = os.path.join(root, r[0].replace("/valid/", "/train/"))
        os.makedirs(os.path.dirname(os.path.join(root, r[0])), exist_ok=True)
        os.replace(src, os.path.join(root, r[0]))
    write_csv(os.path.join(base, "valid.csv"), FAKE_HEADER, rows)
    return base
