"""The preparation cache (egma_model.prepared): what it feeds equals the originals' path, a cache built with
other settings is refused naming them, an interrupted build resumes, and the EGMADataset reads it."""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import data_path  # noqa: E402  (the benchmark's generator writes files in the published layouts)
from egma_model import prepared, prepared_build  # noqa: E402
from egma_model.data import EGMADataset, GazeOptions, load_image, load_manifest, preprocess_image  # noqa: E402


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dp"))
    manifest = data_path.generate(root, images=2, width=230, height=300, reflacx_readings=3, fixations_per_reading=40,
                                  sentences_per_reading=3, egd_readings=4, egd_rows=200)
    return root, manifest


def test_cache_equals_originals(tree):
    _, manifest = tree
    s = prepared_build.build_cache(manifest, progress=False, rebuild=True)
    cache = prepared.PreparedCache(s["cache"])
    recs = load_manifest(manifest)
    ds = EGMADataset(recs, max_sentences=0)
    assert s["rows"] == len(recs) and s["bytes"] > 0
    for i, rec in enumerate(recs):
        assert torch.equal(cache.image(i), preprocess_image(load_image(rec.image), 224))
        s1, g1 = ds.sentences_and_gaze(i)
        s2, g2 = cache.sentences_and_gaze(i)
        assert s1 == s2
        assert (g1 is None) == (g2 is None)
        if g1 is not None:
            assert torch.equal(g1, g2)
    rows = load_manifest(s["manifest"])
    assert [r.extra["cache_row"] for r in rows] == [str(i) for i in range(len(recs))]


def test_cache_refuses_other_settings(tree):
    _, manifest = tree
    s = prepared_build.build_cache(manifest, progress=False)
    cache = prepared.PreparedCache(s["cache"])
    ok = prepared.cache_settings(image_size=224, grid=(7, 7), gaze_options=GazeOptions(), use_gaze=True,
                                 split_rule="ours")
    cache.check(ok)
    other = prepared.cache_settings(image_size=256, grid=(7, 7), gaze_options=GazeOptions(sigma=100.0),
                                    use_gaze=True, split_rule="ours")
    with pytest.raises(prepared.CacheMismatchError) as e:
        cache.check(other)
    assert "image_size: cache 224, this run 256" in str(e.value)
    assert "gaze_options.sigma: cache 150.0, this run 100.0" in str(e.value)


def test_interrupted_build_resumes(tree, monkeypatch, tmp_path):
    _, manifest = tree
    folder = str(tmp_path / "c")
    monkeypatch.setattr(prepared, "CHUNK_ROWS", 2)
    import egma_model.data as data

    real, calls = data.load_image, []

    def failing(path):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt  # a kill in the second chunk
        return real(path)

    monkeypatch.setattr(data, "load_image", failing)
    with pytest.raises(KeyboardInterrupt):
        prepared_build.build_cache(manifest, folder, progress=False)
    assert not os.path.isfile(os.path.join(folder, "cache.json"))
    with pytest.raises(prepared.CacheMismatchError, match="not a finished"):
        prepared.PreparedCache(folder)
    calls.clear()
    monkeypatch.setattr(data, "load_image", lambda p: (calls.append(p), real(p))[1])
    s = prepared_build.build_cache(manifest, folder, progress=False)
    n = len(load_manifest(manifest))
    assert len(calls) == n - 2  # the first chunk (2 rows) was not redone
    fresh = prepared_build.build_cache(manifest, str(tmp_path / "fresh"), progress=False)
    a, b = prepared.PreparedCache(s["cache"]), prepared.PreparedCache(fresh["cache"])
    assert torch.equal(torch.from_numpy(np.array(a.images)), torch.from_numpy(np.array(b.images)))
    assert torch.equal(torch.from_numpy(np.array(a.gaze)), torch.from_numpy(np.array(b.gaze)))


def test_egd_fixations_file_parsed_once_per_process(tree, monkeypatch):
    import egma_model.datasets.egd_cxr as gz  # the EGD-CXR reader and its parse cache

    root, manifest = tree
    egd = [r for r in load_manifest(manifest) if r.gaze_format == "egd"]
    assert len(egd) >= 2
    gz._EGD_PARSED.clear()
    parses = []
    real = gz._parse_egd_fixations
    monkeypatch.setattr(gz, "_parse_egd_fixations", lambda p: (parses.append(p), real(p))[1])
    first = [gz.read_egd_cxr(r.gaze, r.dicom_id, r.gaze_transcript, image_size=r.gaze_size) for r in egd]
    again = [gz.read_egd_cxr(r.gaze, r.dicom_id, r.gaze_transcript, image_size=r.gaze_size) for r in egd]
    assert len(parses) == 1
    for a, b in zip(first, again):
        assert (a.fixations == b.fixations).all()
    # an edited file (new size and time) is parsed again, and its new rows are seen
    path = egd[0].gaze
    with open(path, "a") as f:
        f.write(f"{egd[0].dicom_id},x.jpg,99.0,0.5,0.5,98.9,0.1,999,1,10.0,10.0\n")
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    rec = gz.read_egd_cxr(path, egd[0].dicom_id, egd[0].gaze_transcript, image_size=egd[0].gaze_size)
    assert len(parses) == 2
    assert len(rec.fixations) == len(first[0].fixations) + 1


def test_egma_prepare_cache_cli(tree, tmp_path, capsys):
    from egma_model.prepare import main

    _, manifest = tree
    out = str(tmp_path / "cli-cache")
    assert main(["cache", "--manifest", manifest, "--out", out, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "prepared" in printed and "manifest.cached-cli-cache.csv" in printed
    assert os.path.isfile(os.path.join(os.path.dirname(manifest), "manifest.cached-cli-cache.csv"))
    assert prepared.PreparedCache(out).meta["settings"]["grid"] == [7, 7]
    assert main(["cache", "--manifest", manifest, "--out", out, "--grid", "7"]) == 2
    assert "expected HxW" in capsys.readouterr().err


def _items_equal(a, b):
    assert a["sentences"] == b["sentences"] and a["index"] == b["index"]
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert (a["gaze"] is None) == (b["gaze"] is None)
    if a["gaze"] is not None:
        assert torch.equal(a["gaze"], b["gaze"])


@pytest.mark.parametrize("max_sentences", [16, 2])
def test_dataset_reads_the_cache_and_feeds_what_the_originals_feed(tree, max_sentences):
    _, manifest = tree
    s = prepared_build.build_cache(manifest, progress=False)
    original = EGMADataset(load_manifest(manifest), train=True, max_sentences=max_sentences, seed=3)
    cached = EGMADataset(load_manifest(s["manifest"]), train=True, max_sentences=max_sentences, seed=3)
    assert cached._prepared is not None and original._prepared is None
    for i in range(len(original)):
        for epoch in (0, 1):
            _items_equal(original[(i, epoch)], cached[(i, epoch)])
    # a split of the cached manifest keeps each row's place in the cache
    rows = load_manifest(s["manifest"])
    sub = EGMADataset(rows[1:], train=False)
    _items_equal(EGMADataset(load_manifest(manifest)[1:], train=False)[0], sub[0])
    # a run without gaze reads a cache with gaze, and gets none
    assert all(EGMADataset(rows, use_gaze=False)[i]["gaze"] is None for i in range(len(rows)))


def test_dataset_refuses_a_cache_built_with_other_settings(tree):
    from egma_model.data import ManifestError

    _, manifest = tree
    s = prepared_build.build_cache(manifest, progress=False)
    rows = load_manifest(s["manifest"])
    with pytest.raises(ManifestError, match=r"grid: cache \[7, 7\], this run \[14, 14\]"):
        EGMADataset(rows, grid=(14, 14))
    with pytest.raises(ManifestError, match="min_heat"):
        EGMADataset(rows, gaze_options=GazeOptions(min_heat=0.2))
    with pytest.raises(ManifestError, match="split_rule"):
        EGMADataset(rows, split_rule="egma")
    assert EGMADataset(rows, grid=(14, 14), prepared=False)._prepared is None  # the originals stay usable


def test_a_rebuilt_cache_is_read_anew_in_the_same_process(tree, tmp_path):
    _, manifest = tree
    folder = str(tmp_path / "rebuilt")
    prepared_build.build_cache(manifest, folder, progress=False)
    assert prepared.open_cache(folder).meta["settings"]["grid"] == [7, 7]
    prepared_build.build_cache(manifest, folder, grid=(4, 4), progress=False, rebuild=True)
    assert prepared.open_cache(folder).meta["settings"]["grid"] == [4, 4]
