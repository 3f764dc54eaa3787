"""egma_model.gaze: fixation detection, sentence spans, heatmaps on the patch grid, dataset readers."""

import json
import os

import numpy as np
import pytest
import torch

from egma_model import gaze as gz
from egma_model.datasets._fakes import write_csv


# ------------------------------------------------------------------ fixation detection


def test_ivt_finds_fixations_drops_saccades_blinks_and_short_ones():
    dt = 0.01  # 100 Hz
    t, x, y = [], [], []
    k = 0

    def add(n, fx, fy, jitter=0.5):
        nonlocal k
        for i in range(n):
            t.append(k * dt)
            x.append(fx + jitter * ((-1) ** i))
            y.append(fy)
            k += 1

    add(30, 100, 100)  # 0.29 s fixation at (100, 100)
    for i in range(3):  # saccade: fast samples
        t.append(k * dt); x.append(100 + 150 * (i + 1)); y.append(100 + 100 * (i + 1)); k += 1
    add(20, 600, 400)  # 0.19 s fixation at (600, 400)
    for i in range(5):  # blink: missing samples
        t.append(k * dt); x.append(float("nan")); y.append(float("nan")); k += 1
    add(5, 300, 300)  # 0.04 s: too short, dropped
    for i in range(2):
        t.append(k * dt); x.append(900 + 200 * i); y.append(900); k += 1
    add(15, 800, 200)  # 0.14 s fixation
    fix = gz.detect_fixations(t, x, y, velocity_threshold=1000.0, min_duration=0.1)
    assert fix.shape == (3, 4)
    np.testing.assert_allclose(fix[:, 2:], [[100, 100], [600, 400], [800, 200]], atol=0.5)
    np.testing.assert_allclose(fix[0, :2], [0.0, 0.29], atol=1e-9)
    assert fix[1, 1] - fix[1, 0] == pytest.approx(0.19)
    assert fix[2, 1] - fix[2, 0] == pytest.approx(0.14)


def test_ivt_pixels_per_degree_scales_the_threshold():
    t = np.arange(50) * 0.01
    x = np.arange(50) * 2.0  # 200 px/s drift
    y = np.zeros(50)
    assert gz.detect_fixations(t, x, y, velocity_threshold=30, pixels_per_degree=1.0).shape[0] == 0
    fix = gz.detect_fixations(t, x, y, velocity_threshold=30, pixels_per_degree=10.0)  # 20 deg/s
    assert fix.shape[0] == 1


# ------------------------------------------------------------------ spans


def test_sentence_spans_from_word_timestamps():
    words = [("The", 1.0, 1.2), ("heart", 1.2, 1.5), ("is", 1.5, 1.6), ("enlarged.", 1.6, 2.0),
             ("um", 2.1, 2.3), ("Small", 3.0, 3.2), ("left", 3.2, 3.4), ("effusion", 3.4, 4.0)]
    spans = gz.sentence_spans(["The heart is enlarged.", "Small left effusion.", "No pneumothorax."], words)
    assert spans == [(1.0, 2.0), (3.0, 4.0), None]


def test_sentence_spans_from_phrases():
    phrases = [("the heart is", 0.5, 1.0), ("enlarged.", 1.0, 1.4), ("small left effusion.", 2.0, 3.0)]
    spans = gz.sentence_spans(["The heart is enlarged.", "Small left effusion."], phrases)
    assert spans == [(0.5, 1.4), (2.0, 3.0)]


# ------------------------------------------------------------------ heatmaps


def _patch(row, col, g=7):
    return row * g + col


def test_heat_only_in_the_fixated_patch():
    # 700 x 700 image, 7x7 grid: each patch is 100x100 px; sigma 20 px truncated at 2 sigma stays in one patch
    fix = np.array([[0.0, 0.4, 250.0, 150.0]])
    rec = gz.GazeRecord(fix, [("heart", 0.0, 1.0)], (700, 700))
    g = gz.gaze_for_sentences(rec, ["heart"], (7, 7), sigma=20.0)
    expect = torch.zeros(1, 49)
    expect[0, _patch(1, 2)] = 1.0
    torch.testing.assert_close(g, expect)


def test_heat_follows_square_padding_of_non_square_images():
    # 700 wide x 350 high -> padded to 700 x 700 with 175 px on top: (250, 100) -> square (250, 275): row 2, col 2
    fix = np.array([[0.0, 0.4, 250.0, 100.0]])
    rec = gz.GazeRecord(fix, [("heart", 0.0, 1.0)], (700, 350))
    g = gz.gaze_for_sentences(rec, ["heart"], (7, 7), sigma=20.0)
    assert g[0].nonzero().flatten().tolist() == [_patch(2, 2)]


def test_sentences_take_their_own_span_and_fall_back_to_whole_report():
    fix = np.array([[0.1, 0.5, 150.0, 150.0],  # during sentence 1 -> patch (1, 1)
                    [2.1, 2.9, 550.0, 450.0],  # during sentence 2, long -> patch (4, 5)
                    [5.0, 5.2, 650.0, 50.0]])  # between sentences, short -> patch (0, 6)
    words = [("heart", 0.0, 1.0), ("enlarged", 1.0, 1.5), ("left", 2.0, 2.5), ("effusion", 2.5, 3.0),
             ("no", 6.0, 6.2), ("pneumothorax", 6.2, 7.0)]
    rec = gz.GazeRecord(fix, words, (700, 700))
    g = gz.gaze_for_sentences(rec, ["Heart enlarged.", "Left effusion.", "No pneumothorax."], (7, 7), sigma=20.0,
                              min_heat=0.0)
    assert g[0].nonzero().flatten().tolist() == [_patch(1, 1)]
    assert g[1].nonzero().flatten().tolist() == [_patch(4, 5)]
    # no fixation during "No pneumothorax": whole-report heatmap, weighted by duration and scaled to max 1
    assert sorted(g[2].nonzero().flatten().tolist()) == sorted([_patch(1, 1), _patch(4, 5), _patch(0, 6)])
    assert g[2, _patch(4, 5)] == pytest.approx(1.0)
    assert g[2, _patch(1, 1)] == pytest.approx(0.4 / 0.8, rel=1e-5)
    assert g[2, _patch(0, 6)] == pytest.approx(0.2 / 0.8, rel=1e-5)
    # min_heat drops the faint one
    g2 = gz.gaze_for_sentences(rec, ["Heart enlarged.", "Left effusion.", "No pneumothorax."], (7, 7), sigma=20.0,
                               min_heat=0.3)
    assert g2[2, _patch(0, 6)] == 0 and g2[2, _patch(1, 1)] > 0


def test_fell_back_flags_and_no_fixations():
    maps, fb = gz.sentence_heatmaps(np.array([[0, 1, 10, 10]]), [(0.0, 2.0), None, (5.0, 6.0)], (100, 100),
                                    sigma=5, resolution=20)
    assert fb.tolist() == [False, True, True]
    maps, fb = gz.sentence_heatmaps(np.zeros((0, 4)), [(0.0, 1.0)], (100, 100), resolution=20)
    assert fb.tolist() == [True] and maps.sum() == 0


def test_to_patch_grid_is_area_average_then_max_scaled():
    m = torch.zeros(1, 4, 4)
    m[0, 0, 0] = 4.0  # top-left 2x2 block mean 1
    m[0, 3, 3] = 2.0
    m[0, 2, 3] = 2.0  # bottom-right block mean 1
    m[0, 0, 3] = 2.0  # top-right block mean 0.5
    g = gz.to_patch_grid(m, (2, 2), min_heat=0.0)
    torch.testing.assert_close(g, torch.tensor([[1.0, 0.5, 0.0, 1.0]]))
    assert gz.to_patch_grid(torch.zeros(2, 4, 4), (2, 2)).abs().sum() == 0


# ------------------------------------------------------------------ readers


def write_reflacx_case(root, case_id="P102R108387", image_size=(2000, 1600)):
    """A REFLACX v1.0.0 reading folder main_data/<id>/ and the metadata file, in the dataset's layout."""
    main = os.path.join(root, "main_data")
    d = os.path.join(main, case_id)
    fx_cols = ["timestamp_start_fixation", "timestamp_end_fixation", "x_position", "y_position",
               "pupil_area_normalized", "angular_resolution_x_pixels_per_degree",
               "angular_resolution_y_pixels_per_degree", "window_width", "window_level", "xmin_shown_from_image",
               "ymin_shown_from_image", "xmax_shown_from_image", "ymax_shown_from_image",
               "xmin_in_screen_coordinates", "ymin_in_screen_coordinates", "xmax_in_screen_coordinates",
               "ymax_in_screen_coordinates"]
    W, H = image_size
    extra = [1.1, 94.0, 94.0, 1.0, 0.5, 0, 0, W, H, 0, 0, 1920, 1080]
    write_csv(os.path.join(d, "fixations.csv"), fx_cols, [
        [0.50, 0.90, 500.0, 600.0] + extra,  # "cardiomegaly" sentence
        [2.20, 2.80, 1500.0, 1300.0] + extra,  # "right effusion"
    ])
    gz_cols = ["timestamp_sample", "x_position", "y_position", "pupil_area_normalized",
               "angular_resolution_x_pixels_per_degree", "angular_resolution_y_pixels_per_degree"]
    rows = []
    for i in range(40):
        rows.append([0.5 + 0.01 * i, 500.0, 600.0, 1.0, 94.0, 94.0])
    rows.append([0.91, "", "", "", 94.0, 94.0])  # blink / track loss
    for i in range(60):
        rows.append([2.2 + 0.01 * i, 1500.0, 1300.0, 1.0, 94.0, 94.0])
    write_csv(os.path.join(d, "gaze.csv"), gz_cols, rows)
    write_csv(os.path.join(d, "timestamps_transcription.csv"),
               ["word", "timestamp_start_word", "timestamp_end_word"],
               [["mild", 0.4, 0.6], ["cardiomegaly.", 0.6, 1.2], ["right", 2.1, 2.4], ["pleural", 2.4, 2.6],
                ["effusion.", 2.6, 3.0]])
    with open(os.path.join(d, "transcription.txt"), "w") as f:
        f.write("Mild cardiomegaly. Right pleural effusion.")
    write_csv(os.path.join(main, "metadata_phase_3.csv"),
               ["id", "split", "eye_tracking_data_discarded", "image", "dicom_id", "subject_id", "image_size_x",
                "image_size_y", "Enlarged cardiac silhouette", "Pleural abnormality"],
               [[case_id, "train", "False", "physionet.org/files/mimic-cxr/2.0.0/files/p10/x.dcm", "dcm1", "10",
                 W, H, 4, 3],
                ["P102R999999", "train", "True", "y.dcm", "dcm2", "11", W, H, 0, 0]])
    return d


def test_reflacx_reader(tmp_path):
    d = write_reflacx_case(str(tmp_path))
    meta = gz.read_reflacx_metadata(os.path.join(str(tmp_path), "main_data", "metadata_phase_3.csv"))
    assert [m["id"] for m in meta] == ["P102R108387"]  # the discarded reading is dropped
    rec = gz.read_reflacx(d, image_size=(int(meta[0]["image_size_x"]), int(meta[0]["image_size_y"])))
    assert rec.image_size == (2000, 1600)
    np.testing.assert_allclose(rec.fixations, [[0.5, 0.9, 500, 600], [2.2, 2.8, 1500, 1300]])
    assert rec.words[1] == ("cardiomegaly.", 0.6, 1.2)
    assert rec.transcript.startswith("Mild cardiomegaly")
    # image size from the fixations' shown extent
    assert gz.read_reflacx(d).image_size == (2000, 1600)
    g = gz.gaze_for_sentences(rec, ["Mild cardiomegaly.", "Right pleural effusion."], (7, 7), sigma=50.0)
    # square frame 2000 px (200 px top padding), patch = 2000/7 px
    p = 2000 / 7
    assert g[0].nonzero().flatten().tolist() == [int((600 + 200) // p) * 7 + int(500 // p)]
    assert g[1].nonzero().flatten().tolist() == [int((1300 + 200) // p) * 7 + int(1500 // p)]
    # raw gaze through the I-VT detector gives the same two fixations
    raw = gz.read_reflacx(d, image_size=(2000, 1600), use_raw_gaze=True, velocity_threshold=30.0)
    np.testing.assert_allclose(raw.fixations[:, 2:], [[500, 600], [1500, 1300]])


def test_reflacx_reader_errors(tmp_path):
    d = write_reflacx_case(str(tmp_path))
    with open(os.path.join(d, "fixations.csv")) as f:
        lines = f.read().splitlines()
    lines[2] = lines[2].replace("2.2", "abc", 1)
    with open(os.path.join(d, "fixations.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(gz.GazeFormatError, match=r"fixations.csv: row 3: column 'timestamp_start_fixation'"):
        gz.read_reflacx(d, image_size=(10, 10))
    with pytest.raises(gz.GazeFormatError, match="file not found"):
        gz.read_reflacx(os.path.join(str(tmp_path), "nope"), image_size=(10, 10))


def write_egd_files(root, dicom_id="1a2b3c", other="zzz"):
    """EGD-CXR layout: fixations.csv (all readings) and audio_segmentation_transcripts/<dicom_id>/transcript.json."""
    cols = ["DICOM_ID", "CXR-JPG", "Time (in secs)", "FPOGX", "FPOGY", "FPOGS", "FPOGD", "FPOGID", "FPOGV",
            "BPOGX", "BPOGY", "BPOGV", "X_ORIGINAL", "Y_ORIGINAL"]
    write_csv(os.path.join(root, "fixations.csv"), cols, [
        [other, "x.jpg", 0.3, 0.5, 0.5, 1.0, 0.3, 1, 1, 0.5, 0.5, 1, 100, 100],
        [dicom_id, "p.jpg", 1.2, 0.2, 0.3, 5.0, 0.4, 1, 1, 0.2, 0.3, 1, 700, 900],
        [dicom_id, "p.jpg", 3.0, 0.7, 0.8, 6.0, 0.6, 2, 1, 0.7, 0.8, 1, 2100, 2500],
    ])
    t = os.path.join(root, "audio_segmentation_transcripts", dicom_id, "transcript.json")
    os.makedirs(os.path.dirname(t))
    with open(t, "w") as f:
        json.dump({"full_text": "Heart size is normal. There is a right lower lobe opacity.",
                   "time_stamped_text": [{"phrase": "heart size is normal.", "begin_time": 0.7, "end_time": 1.5},
                                         {"phrase": "there is a right lower lobe", "begin_time": 2.3, "end_time": 2.9},
                                         {"phrase": "opacity.", "begin_time": 2.9, "end_time": 3.3}]}, f)
    return os.path.join(root, "fixations.csv"), t


def test_egd_cxr_reader(tmp_path):
    fx, tj = write_egd_files(str(tmp_path))
    rec = gz.read_egd_cxr(fx, "1a2b3c", tj, image_size=(2800, 2800))
    np.testing.assert_allclose(rec.fixations, [[0.8, 1.2, 700, 900], [2.4, 3.0, 2100, 2500]])
    assert rec.words[1] == ("there is a right lower lobe", 2.3, 2.9)
    sents = ["Heart size is normal.", "There is a right lower lobe opacity."]
    assert gz.sentence_spans(sents, rec.words) == [(0.7, 1.5), (2.3, 3.3)]
    g = gz.gaze_for_sentences(rec, sents, (7, 7), sigma=50.0)
    assert g[0].nonzero().flatten().tolist() == [_patch(2, 1)]  # 400 px patches: (700, 900) -> row 2, col 1
    assert g[1].nonzero().flatten().tolist() == [_patch(6, 5)]
    with pytest.raises(gz.GazeFormatError, match="no rows with DICOM_ID 'missing'"):
        gz.read_egd_cxr(fx, "missing")


def test_mimic_eye_layout(tmp_path):
    pdir = os.path.join(str(tmp_path), "patient_10000032")
    write_egd_files(os.path.join(pdir, "EyeGaze"))
    rec = gz.read_mimic_eye_egd(pdir, "1a2b3c", image_size=(2800, 2800))
    assert rec.fixations.shape == (2, 4) and len(rec.words) == 3
    assert rec.transcript.startswith("Heart size")
