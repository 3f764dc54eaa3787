"""The data path at the real datasets' sizes: images (and gaze) per second per core, stage by stage.

Generates files of the published shapes in a scratch folder (nothing credentialed is needed):
  * MIMIC-CXR-JPG-sized JPEGs (default 2500 x 3000, quality 95, smooth structure plus noise, so that
    decoding costs what a radiograph costs);
  * REFLACX readings (``main_data/<id>/``): about 150 fixations and 10 sentences of dictation with word
    timestamps each;
  * one EGD-CXR ``fixations.csv`` of about 200,000 rows over 1,083 readings, with a transcript per reading;
and a manifest over them. Then it times, on one thread (``torch.set_num_threads(1)``), each stage of
``EGMADataset.__getitem__``: image decode + resize, the REFLACX reader + heatmaps, the EGD-CXR reader, and the
whole item from the originals, plus the whole item from the preparation cache when the package has one.

    python benchmarks/data_path.py                    # real sizes; about 2 minutes on one core
    python benchmarks/data_path.py --quick            # small sizes: checks the script runs (seconds)

It writes ``data_path.json`` and ``README.md`` (a table) into ``--out``. Times are medians over repeats;
images per second per core = 1 / (median seconds per item). State the machine's load with the numbers.
"""

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from egma_model import gaze as gz  # noqa: E402
from egma_model.data import EGMADataset, GazeOptions, load_image, load_manifest, preprocess_image, split_sentences  # noqa: E402

REFLACX_FIX_COLS = ["timestamp_start_fixation", "timestamp_end_fixation", "x_position", "y_position",
                    "pupil_area_normalized", "angular_resolution_x_pixels_per_degree",
                    "angular_resolution_y_pixels_per_degree", "window_width", "window_level",
                    "xmin_shown_from_image", "ymin_shown_from_image", "xmax_shown_from_image",
                    "ymax_shown_from_image"]
EGD_COLS = ["DICOM_ID", "CXR-JPG", "Time (in secs)", "FPOGX", "FPOGY", "FPOGS", "FPOGD", "FPOGID", "FPOGV",
            "X_ORIGINAL", "Y_ORIGINAL"]
WORDS = ("the heart size is normal there is mild opacity at the right lung base no pleural effusion or "
         "pneumothorax is seen the mediastinal contours are within normal limits").split()


def _radiograph(rng, width, height):
    """A grey image with smooth structure and fine noise (JPEG decode time depends on the content)."""
    from PIL import Image

    small = rng.random((height // 64 + 1, width // 64 + 1)).astype(np.float32)
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    a = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (height, width)).astype(np.float32)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _dictation(rng, n_sentences, words_per_sentence):
    t, words, sentences = 0.5, [], []
    for _ in range(n_sentences):
        ws = list(rng.choice(WORDS, words_per_sentence))
        sentences.append(" ".join(ws).capitalize() + ".")
        for j, w in enumerate(ws):
            d = 0.2 + 0.2 * rng.random()
            words.append((w + ("." if j == len(ws) - 1 else ""), round(t, 3), round(t + d, 3)))
            t += d + 0.05
        t += 0.8
    return sentences, words, t


def _fixations(rng, n, duration, width, height):
    starts = np.sort(rng.uniform(0, duration, n))
    ends = starts + rng.uniform(0.1, 0.4, n)
    xs, ys = rng.uniform(0, width, n), rng.uniform(0, height, n)
    return starts, ends, xs, ys


def generate(root, *, images, width, height, reflacx_readings, fixations_per_reading, sentences_per_reading,
             egd_readings, egd_rows, seed=0):
    """Write the files and a manifest (``manifest.csv``) into ``root``; returns the manifest's path."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    image_paths = []
    for i in range(images):
        p = os.path.join("images", f"img{i:03d}.jpg")
        _radiograph(rng, width, height).save(os.path.join(root, p), quality=95)
        image_paths.append(p)
    rows = []
    for r in range(reflacx_readings):
        rid = f"P{r:03d}R001"
        d = os.path.join(root, "reflacx", "main_data", rid)
        os.makedirs(d, exist_ok=True)
        sentences, words, duration = _dictation(rng, sentences_per_reading, 12)
        s, e, x, y = _fixations(rng, fixations_per_reading, duration, width, height)
        with open(os.path.join(d, "fixations.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(REFLACX_FIX_COLS)
            for k in range(len(s)):
                w.writerow([round(s[k], 4), round(e[k], 4), round(x[k], 2), round(y[k], 2), 1.0, 40.0, 40.0,
                            1.0, 0.5, 0, 0, width, height])
        with open(os.path.join(d, "timestamps_transcription.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["word", "timestamp_start_word", "timestamp_end_word"])
            w.writerows(words)
        with open(os.path.join(d, "transcription.txt"), "w") as f:
            f.write(" ".join(sentences))
        rows.append([image_paths[r % images], "reflacx", f"reflacx/main_data/{rid}", "", "", width, height])
    egd = os.path.join(root, "egd-cxr")
    per = max(1, egd_rows // max(1, egd_readings))
    fx_rows = []
    for r in range(egd_readings):
        dicom = f"{r:08x}-egd"
        sentences, words, duration = _dictation(rng, sentences_per_reading, 12)
        s, e, x, y = _fixations(rng, per, duration, width, height)
        for k in range(per):
            fx_rows.append([dicom, f"files/p10/{dicom}.jpg", round(e[k], 4), round(x[k] / width, 5),
                            round(y[k] / height, 5), round(s[k], 4), round(e[k] - s[k], 4), k + 1, 1,
                            round(x[k], 2), round(y[k], 2)])
        tdir = os.path.join(egd, "audio_segmentation_transcripts", dicom)
        os.makedirs(tdir, exist_ok=True)
        with open(os.path.join(tdir, "transcript.json"), "w") as f:
            json.dump({"full_text": " ".join(sentences),
                       "time_stamped_text": [{"phrase": w, "begin_time": a, "end_time": b} for w, a, b in words]}, f)
        rows.append([image_paths[r % images], "egd", "egd-cxr/fixations.csv",
                         f"egd-cxr/audio_segmentation_transcripts/{dicom}/transcript.json", dicom, width, height])
    with open(os.path.join(egd, "fixations.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(EGD_COLS)
        w.writerows(fx_rows)
    manifest = os.path.join(root, "manifest.csv")
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "gaze_format", "gaze", "gaze_transcript", "dicom_id", "image_width", "image_height"])
        w.writerows(rows)
    return manifest


def _forget_parsed_gaze_files():
    """Empty the per-process cache of parsed EGD-CXR fixations files (where this version of the package has one)."""
    import importlib

    for name in ("egma_model.datasets.egd_cxr", "egma_model.gaze"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        parsed = module.__dict__.get("_EGD_PARSED")
        if parsed is not None:
            parsed.clear()


def _median_seconds(fn, items, repeats):
    times = []
    for _ in range(repeats):
        for it in items:
            t0 = time.perf_counter()
            fn(it)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def measure(manifest, *, image_size=224, grid=(7, 7), repeats=1, egd_sample=5, egd_pass_readings=None,
            cache_stage=True):
    records = load_manifest(manifest)
    opts = GazeOptions()
    refl = [r for r in records if r.gaze_format == "reflacx"]
    egd_all = [r for r in records if r.gaze_format == "egd"]
    egd = egd_all[:egd_sample]
    records = refl + egd  # the items timed below: every REFLACX reading and a few EGD-CXR ones
    out = {}

    def image(rec):
        preprocess_image(load_image(rec.image), image_size)

    def reflacx(rec):
        g = gz.read_reflacx(rec.gaze, image_size=rec.gaze_size)
        gz.gaze_for_sentences(g, split_sentences(g.transcript), grid, sigma=opts.sigma, min_heat=opts.min_heat)

    def egd_read(rec):
        gz.read_egd_cxr(rec.gaze, rec.dicom_id, rec.gaze_transcript, image_size=rec.gaze_size)

    def item_from_originals(i):
        # a fresh dataset each call: nothing cached from an earlier item (a new worker's first epoch)
        ds = EGMADataset(records, image_size=image_size, grid=grid, train=True, gaze_options=opts)
        ds[i]

    s, n = _median_seconds(image, records[: len(set(r.image for r in records))], repeats)
    out["image decode + resize"] = {"seconds": s, "n": n}
    s, n = _median_seconds(reflacx, refl, repeats)
    out["REFLACX reading: read + heatmaps"] = {"seconds": s, "n": n}
    if egd:
        _forget_parsed_gaze_files()  # a new worker: fixations.csv not parsed yet
        timed = egd_all[:egd_pass_readings] if egd_pass_readings else egd_all
        t0 = time.perf_counter()
        for rec in timed:
            egd_read(rec)
        seconds = time.perf_counter() - t0
        # with --egd-pass-readings (for code that parses the whole file per reading) the rest is extrapolated
        out["EGD-CXR reading: read (first pass over every reading, per reading)"] = {
            "seconds": seconds / len(timed), "n": len(timed),
            "first_pass_seconds": seconds / len(timed) * len(egd_all), "extrapolated": len(timed) < len(egd_all)}
    s, n = _median_seconds(item_from_originals, range(min(len(records), len(refl) + len(egd))), 1)
    out["item from the originals (image + sentences + gaze)"] = {"seconds": s, "n": n}
    if not cache_stage:
        return _per_second(out)
    from egma_model.prepared_build import build_cache

    t0 = time.perf_counter()
    sub = os.path.join(os.path.dirname(manifest), "timed.csv")  # the timed rows only
    with open(manifest, newline="") as f:
        rows = list(csv.reader(f))
    keep = {r.where.rsplit("row ", 1)[1] for r in records}
    with open(sub, "w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + [r for n, r in enumerate(rows[1:], start=2) if str(n) in keep])
    built = build_cache(sub, image_size=image_size, grid=grid, gaze_options=opts, progress=False, rebuild=True)
    out["build the preparation cache, per row"] = {"seconds": (time.perf_counter() - t0) / built["rows"],
                                                   "n": built["rows"], "bytes_per_row": built["bytes"] / built["rows"]}
    cached_records = load_manifest(built["manifest"])
    cached = EGMADataset(cached_records, image_size=image_size, grid=grid, train=True, gaze_options=opts)

    def item_from_cache(i):
        cached._cache.clear()  # nothing kept from an earlier read: every item reads the cache's files
        cached[(i, 0)]

    s, n = _median_seconds(item_from_cache, range(len(cached_records)), max(3, repeats))
    out["item from the cache (image + sentences + gaze, augmented)"] = {"seconds": s, "n": n}
    return _per_second(out)


def _per_second(out):
    for v in out.values():
        v["per_second_per_core"] = 1.0 / v["seconds"] if v["seconds"] > 0 else float("inf")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "data-path"), help="results folder")
    p.add_argument("--data", default=None, help="scratch folder for the generated files (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="small sizes: checks that the script runs")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--egd-pass-readings", type=int, default=None,
                   help="time the EGD-CXR first pass on this many readings and extrapolate (default: all)")
    p.add_argument("--no-cache-stage", action="store_true",
                   help="skip the preparation cache's stages (to time a version of the package without it)")
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    sizes = dict(images=6, width=2500, height=3000, reflacx_readings=12, fixations_per_reading=150,
                 sentences_per_reading=10, egd_readings=1083, egd_rows=200_000)
    if ns.quick:
        sizes.update(images=2, width=300, height=360, reflacx_readings=2, egd_readings=20, egd_rows=2000)
    with tempfile.TemporaryDirectory() as tmp:
        root = ns.data or tmp
        t0 = time.perf_counter()
        manifest = generate(root, **sizes)
        gen_s = time.perf_counter() - t0
        stages = measure(manifest, repeats=ns.repeats, egd_pass_readings=ns.egd_pass_readings,
                         cache_stage=not ns.no_cache_stage)
    egd = next((v for v in stages.values() if "first_pass_seconds" in v), {})
    egd_pass = egd.get("first_pass_seconds", 0.0)
    result = {"sizes": sizes, "generate_seconds": gen_s, "stages": stages,
              "egd_first_pass_seconds_estimate": egd_pass,
              "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                          "load_average": os.getloadavg(), "torch": torch.__version__, "threads": 1}}
    os.makedirs(ns.out, exist_ok=True)
    with open(os.path.join(ns.out, "data_path.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = ["| stage | ms per item | items/s per core |", "|---|---:|---:|"]
    for k, v in stages.items():
        lines.append(f"| {k} | {v['seconds'] * 1e3:.1f} | {v['per_second_per_core']:.1f} |")
    lines.append(f"\nEGD-CXR first pass over {sizes['egd_readings']} readings: {egd_pass:.1f} s per worker"
                 + (" (extrapolated)" if egd.get("extrapolated") else ""))
    text = "\n".join(lines)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
