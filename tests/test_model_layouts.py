"""The readers and egma-prepare against the datasets as their owners publish them (issue 26): one test per place
where the data and our readers disagreed, the readers' rule for usable fixations, compressed CSVs, splits,
published CheXpert 5x200 lists, and DICOM conversion checked against pydicom's own test files."""

import gzip
import json
import os

import numpy as np
import pytest

from egma_model import gaze as gz
from egma_model.prepare import main as prepare
from model_fakes import (EGD_FIX_HEADER, MIMIC_ITEMS, REFLACX_OFF_IMAGE, REPORT, make_chexpert, make_egd_cxr,
                         make_mimic_cxr_jpg, make_mimic_eye, make_reflacx, write_csv)

GRID = (7, 7)
SIZE = (128, 160)  # the fakes' DICOM size (width, height)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("layouts"))
    d = {k: os.path.join(root, k) for k in ("mimic-cxr-jpg", "reflacx", "egd-cxr", "mimic-eye")}
    make_mimic_cxr_jpg(d["mimic-cxr-jpg"], MIMIC_ITEMS)
    make_reflacx(d["reflacx"], MIMIC_ITEMS)
    make_egd_cxr(d["egd-cxr"], MIMIC_ITEMS)
    make_mimic_eye(d["mimic-eye"])
    d["out"] = os.path.join(root, "manifests")
    return d


def _prepare(out_dir, name, *args):
    out = os.path.join(out_dir, f"{name}.csv")
    assert prepare([name, "--out", out, *args]) == 0
    with open(out + ".summary.json") as f:
        return out, json.load(f)


def _manifest_rows(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ finding 1: EGD-CXR's off-image placeholder


def _top_left_heat(rec):
    g = gz.gaze_for_sentences(rec, REPORT, GRID, sigma=10.0)
    return float(g[0, 0])  # first sentence, top-left patch


def test_egd_off_image_placeholder_is_dropped_not_gaze(trees):
    d = MIMIC_ITEMS[3][2]
    rec = gz.read_egd_cxr(os.path.join(trees["egd-cxr"], "fixations.csv"), d,
                          os.path.join(trees["egd-cxr"], "audio_segmentation_transcripts", d, "transcript.json"),
                          image_size=SIZE)
    # the placeholder (-2, -2) fixations would make the top-left patch a positive label of the first sentence
    assert _top_left_heat(rec) == 0.0
    assert (rec.fixations[:, 2:] >= 0).all()
    assert rec.fixations.shape == (6, 4) and rec.dropped_off_image == 2 and rec.dropped_non_finite == 0


def test_mimic_eye_eyegaze_off_image_placeholder_is_dropped(trees):
    rec = gz.read_mimic_eye_egd(os.path.join(trees["mimic-eye"], "patient_10000001"), "d0b", image_size=SIZE)
    assert _top_left_heat(rec) == 0.0
    assert rec.fixations.shape == (6, 4) and rec.dropped_off_image == 2


# ------------------------------------------------------------------ finding 2: MIMIC-CXR-JPG's CSVs are gzipped


def test_gzipped_mimic_cxr_csvs_give_dicom_size_and_official_split(trees):
    assert not os.path.exists(os.path.join(trees["mimic-cxr-jpg"], "mimic-cxr-2.0.0-split.csv"))
    out, s = _prepare(trees["out"], "egd-cxr", "--root", trees["egd-cxr"], "--mimic-cxr-jpg", trees["mimic-cxr-jpg"])
    rows = {r["dicom_id"]: r for r in _manifest_rows(out)}
    # the official split (validate -> valid); nothing from validate/test leaks into train
    assert {k: r["split"] for k, r in rows.items()} == {"dicom-3": "test", "dicom-4": "valid", "dicom-6": "train"}
    # the DICOM size from the gzipped metadata, not the JPG's 64x80
    assert all((r["image_width"], r["image_height"]) == ("128", "160") for r in rows.values())
    assert not any("no mimic-cxr-2.0.0-metadata" in n for n in s["notes"])


def test_missing_split_file_is_said_not_replaced_by_train(tmp_path):
    make_mimic_cxr_jpg(str(tmp_path / "jpg"), MIMIC_ITEMS, split_file=False)
    make_egd_cxr(str(tmp_path / "egd"), MIMIC_ITEMS)
    out, s = _prepare(str(tmp_path / "out"), "egd-cxr", "--root", str(tmp_path / "egd"),
                      "--mimic-cxr-jpg", str(tmp_path / "jpg"))
    assert s["splits"] == {"": 3}
    assert any("3 rows have no split" in n and "split.csv" in n for n in s["notes"])


# ------------------------------------------------------------------ finding 3: REFLACX fixations off the image


def test_reflacx_off_image_fixations_are_dropped_and_counted(trees):
    case = os.path.join(trees["reflacx"], "main_data", "P100R000")
    rec = gz.read_reflacx(case, image_size=SIZE)
    x, y = rec.fixations[:, 2], rec.fixations[:, 3]
    assert ((x >= 0) & (x < SIZE[0]) & (y >= 0) & (y < SIZE[1])).all()
    assert rec.fixations.shape == (6, 4) and rec.dropped_off_image == len(REFLACX_OFF_IMAGE)
    # punctuation rows carry no token: the sentence spans come out as without them
    assert gz.sentence_spans(REPORT, rec.words)[0] == (0.0, 1.9)


# ------------------------------------------------------------------ finding 4: CheXpert 5x200 as published


def _selection_files(root, chexpert_base):
    """A MedCLIP-style chexpert-5x200-meta.csv (imgpath, a lateral view included) and a GLoRIA-style
    chexpert_5x200.csv (Path) over the fake CheXpert images."""
    import csv

    with open(os.path.join(chexpert_base, "train.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    labels = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
              "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
              "Fracture", "Support Devices"]
    picked = [rows[0], rows[3], rows[15]]  # Atelectasis, Cardiomegaly, the lateral Edema view

    def onehot(r):
        return [1.0 if (r[c] or "").strip() == "1.0" and c != "No Finding" else 0.0 for c in labels]

    medclip = os.path.join(root, "chexpert-5x200-meta.csv")
    write_csv(medclip, ["", "imgpath", "subject_id"] + labels,
              [[i, "./data/CheXpert/data/CheXpert-v1.0-small/" + r["Path"].split("/", 1)[1],
                "-".join(r["Path"].split("/")[2:4])] + onehot(r) for i, r in enumerate(picked)])
    gloria = os.path.join(root, "chexpert_5x200.csv")
    write_csv(gloria, ["Path", "Frontal/Lateral"] + labels + ["Report Impression"],
              [[r["Path"], r["Frontal/Lateral"]] + onehot(r) + ["impression"] for r in picked[:2]])
    return medclip, gloria, picked


def test_chexpert_5x200_published_selections_are_read_as_released(tmp_path):
    base = make_chexpert(str(tmp_path / "chexpert"))
    medclip, gloria, picked = _selection_files(str(tmp_path), base)
    out, s = _prepare(str(tmp_path / "out"), "chexpert-5x200", "--root", base, "--selection", medclip)
    rows = _manifest_rows(out)
    assert [r["labels"] for r in rows] == ["Atelectasis", "Cardiomegaly", "Edema"]
    assert [r["source_id"] for r in rows] == [p["Path"].split("/", 1)[1] for p in picked]
    assert "lateral" in rows[2]["image"]  # MedCLIP's list has lateral views; kept as released
    assert any("medclip" in n and "1 lateral" in n for n in s["notes"])
    out, s = _prepare(str(tmp_path / "out"), "chexpert-5x200", "--root", base, "--selection", gloria)
    assert [r["labels"] for r in _manifest_rows(out)] == ["Atelectasis", "Cardiomegaly"]
    # the probe leaves the published selection out of its training rows
    out, s = _prepare(str(tmp_path / "out"), "chexpert", "--root", base, "--selection", medclip)
    train = {r["source_id"] for r in _manifest_rows(out) if r["split"] == "train"}
    assert not train & {p["Path"] for p in picked} and any("3 CheXpert 5x200" in n for n in s["notes"])


# ------------------------------------------------------------------ finding 5: MIMIC-EYE's official split


def test_mimic_eye_readings_take_the_official_split(trees):
    out, s = _prepare(trees["out"], "mimic-eye", "--root", trees["mimic-eye"])
    rows = _manifest_rows(out)
    by = {(r["gaze_format"], r["dicom_id"]): r["split"] for r in rows}
    # patient 0's CXR-JPG/cxr_split.csv: the REFLACX reading's image is "test" (REFLACX/metadata.csv said "train"),
    # the EyeGaze reading's "validate"; patient 1 has no cxr_split.csv: no split, said in the summary
    assert by == {("reflacx", "d0a"): "test", ("mimic_eye", "d0b"): "valid", ("mimic_eye", "d1b"): ""}
    assert any("1 rows have no split" in n and "cxr_split.csv" in n for n in s["notes"])
    # REFLACX readings are found where MIMIC-EYE publishes them, REFLACX/main_data/<id>/
    assert [r["gaze"] for r in rows if r["gaze_format"] == "reflacx"][0].endswith(
        os.path.join("REFLACX", "main_data", "P200R000"))


# ------------------------------------------------------------------ finding 6: REFLACX raw gaze in gaze_data/


def test_reflacx_raw_gaze_is_read_from_gaze_data(trees):
    case = os.path.join(trees["reflacx"], "main_data", "P100R000")
    assert not os.path.exists(os.path.join(case, "gaze.csv"))
    raw = gz.read_reflacx(case, image_size=SIZE, use_raw_gaze=True)
    fix = gz.read_reflacx(case, image_size=SIZE)
    assert raw.fixations.shape == (6, 4)
    np.testing.assert_allclose(raw.fixations[:, 2:], fix.fixations[:, 2:])
    # the same in MIMIC-EYE's REFLACX/gaze_data/<id>/
    me = os.path.join(trees["mimic-eye"], "patient_10000001", "REFLACX", "main_data", "P200R000")
    assert gz.read_reflacx(me, image_size=SIZE, use_raw_gaze=True).fixations.shape == (6, 4)


# ------------------------------------------------------------------ the readers' rule


def test_reader_rule_non_finite_and_empty_files(tmp_path):
    case = str(tmp_path / "main_data" / "R1")
    cols = ["timestamp_start_fixation", "timestamp_end_fixation", "x_position", "y_position"]
    write_csv(os.path.join(case, "fixations.csv"), cols,
              [[0.1, 0.5, 10, 10], [0.6, 0.9, "", 20], [1.0, "nan", 30, 30], [1.0, 1.2, "inf", 5], [1.3, 1.4, 64, 5]])
    rec = gz.read_reflacx(case, image_size=(64, 64))
    # NaN/empty/inf cells: dropped and counted; x == width is outside [0, width)
    assert rec.fixations.tolist() == [[0.1, 0.5, 10, 10]]
    assert (rec.dropped_non_finite, rec.dropped_off_image) == (3, 1)
    # a header-only fixations file: a record with no fixation (no error); its gaze is all zero
    write_csv(os.path.join(case, "fixations.csv"), cols, [])
    rec = gz.read_reflacx(case, image_size=(64, 64))
    assert rec.fixations.shape == (0, 4)
    assert float(gz.gaze_for_sentences(rec, ["a b."], GRID).abs().sum()) == 0.0
    # text that is not a number is refused, naming file, row and column
    write_csv(os.path.join(case, "fixations.csv"), cols, [[0.1, 0.5, "abc", 1]])
    with pytest.raises(gz.GazeFormatError, match=r"fixations.csv: row 2: column 'x_position'"):
        gz.read_reflacx(case, image_size=(64, 64))
    assert gz.READER_RULES_VERSION


def test_reader_rule_is_one_function():
    fix = np.array([[0, 1, 0, 0], [0, 1, 63.9, 63.9], [0, 1, -0.1, 5], [0, 1, 5, 64], [np.nan, 1, 5, 5]])
    kept, off, non_finite = gz.apply_reader_rules(fix, (64, 64))
    assert kept.tolist() == fix[:2].tolist() and (off, non_finite) == (2, 1)


def test_gzipped_reader_files(tmp_path):
    case = str(tmp_path / "main_data" / "R1")
    write_csv(os.path.join(case, "fixations.csv.gz"),
              ["timestamp_start_fixation", "timestamp_end_fixation", "x_position", "y_position"], [[0.1, 0.5, 10, 10]])
    write_csv(os.path.join(case, "timestamps_transcription.csv.gz"),
              ["word", "timestamp_start_word", "timestamp_end_word"], [["clear", 0.0, 0.4], [".", 0.4, 0.5]])
    rec = gz.read_reflacx(case, image_size=(64, 64))
    assert rec.fixations.shape == (1, 4) and rec.words[1] == (".", 0.4, 0.5)
    egd = str(tmp_path / "egd")
    write_csv(os.path.join(egd, "fixations.csv.gz"), EGD_FIX_HEADER, [["d1", 1.0, 0.5, 3, 4]])
    rec = gz.read_egd_cxr(os.path.join(egd, "fixations.csv"), "d1", image_size=(8, 8))
    assert rec.fixations.tolist() == [[0.5, 1.0, 3.0, 4.0]]


def test_not_utf8_is_a_one_line_prepare_error(tmp_path, capsys):
    root = tmp_path / "rsna"
    root.mkdir()
    (root / "stage_2_train_labels.csv").write_bytes(b"patientId,Target\nr\xe9sum\xe9,1\n")
    assert prepare(["rsna", "--root", str(root), "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "stage_2_train_labels.csv: not valid UTF-8 at byte" in err


# ------------------------------------------------------------------ DICOM conversion against pydicom's own files


def _convert_and_reference(name, tmp_path):
    """pydicom's test file ``name`` converted as egma-prepare converts an RSNA/SIIM DICOM (the PNG read back),
    with the dataset and pydicom's rescaled (modality LUT) values."""
    pydicom = pytest.importorskip("pydicom")
    import shutil

    from pydicom.data import get_testdata_file
    from PIL import Image

    try:
        from pydicom.pixels import apply_modality_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut
    from egma_model.prepare import DicomImages

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not shipped with this pydicom")
    dcm = str(tmp_path / "x.dcm")
    shutil.copy(path, dcm)
    png, err = DicomImages(str(tmp_path / "png")).image_for(dcm)
    assert err is None
    with Image.open(png) as im:
        assert im.mode == "L"
        out = np.asarray(im)
    ds = pydicom.dcmread(path)
    return ds, out, np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)


def test_dicom_monochrome1_rescale_and_window_match_pydicom(tmp_path):
    # a CR image: MONOCHROME1, 12 bits stored, RescaleSlope 0.684 / RescaleIntercept 200, window 1600/2800
    ds, out, modality = _convert_and_reference("6154", tmp_path)
    assert str(ds.PhotometricInterpretation) == "MONOCHROME1" and float(ds.RescaleSlope) != 1.0
    assert out.dtype == np.uint8 and out.shape == ds.pixel_array.shape
    # the DICOM linear window (PS3.3 C.11.2.1.2) over pydicom's rescaled values, inverted for MONOCHROME1
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    ref = 255 * (1 - np.clip((modality - (c - 0.5)) / (w - 1) + 0.5, 0, 1))
    assert np.abs(out.astype(float) - ref).max() <= 0.5 + 1e-9
    # inversion: the brightest stored pixel is the darkest output pixel
    raw = ds.pixel_array
    assert out.ravel()[raw.argmax()] == out.min() and out.ravel()[raw.argmin()] == out.max()


def test_dicom_more_than_8_bits_without_window_uses_the_full_range(tmp_path):
    # CT: 16 bits stored, values 128..2191, RescaleIntercept -1024, no window: min-max over the image
    ds, out, modality = _convert_and_reference("CT_small.dcm", tmp_path)
    assert int(ds.BitsStored) > 8 and "WindowCenter" not in ds and ds.pixel_array.max() > 255
    ref = np.rint((modality - modality.min()) / (modality.max() - modality.min()) * 255)
    np.testing.assert_array_equal(out, ref.astype(np.uint8))
    assert out.min() == 0 and out.max() == 255


def test_dicom_window_of_a_16_bit_mr(tmp_path):
    # MR: 16 bits, window 600/1600: the window, not the image's min/max, sets black and white
    ds, out, modality = _convert_and_reference("MR_small.dcm", tmp_path)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    ref = np.rint(np.clip((modality - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255)
    np.testing.assert_array_equal(out, ref.astype(np.uint8))
    assert out.max() == 255 and out.min() > 0  # the darkest pixel (127) is above the window's floor (-200)


def test_rsna_dicom_rows_are_converted(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    import shutil

    from pydicom.data import get_testdata_file
    from PIL import Image

    root = tmp_path / "rsna"
    (root / "stage_2_train_images").mkdir(parents=True)
    ids = [f"p{i}" for i in range(4)]
    for i, k in enumerate(ids):
        shutil.copy(get_testdata_file("CT_small.dcm" if i % 2 else "6154"), root / "stage_2_train_images" / f"{k}.dcm")
    write_csv(str(root / "stage_2_train_labels.csv"), ["patientId", "x", "y", "width", "height", "Target"],
              [(k, "", "", "", "", i % 2) for i, k in enumerate(ids)])
    out, s = _prepare(str(tmp_path / "out"), "rsna", "--root", str(root))
    assert s["rows"] == 4 and s["skipped"] == {}
    for r in _manifest_rows(out):
        with Image.open(r["image"]) as im:
            assert im.mode == "L"
    assert pydicom


def test_reading_without_usable_fixations_is_written_without_gaze(tmp_path):
    make_mimic_cxr_jpg(str(tmp_path / "jpg"), MIMIC_ITEMS)
    make_reflacx(str(tmp_path / "reflacx"), MIMIC_ITEMS)
    # a header-only fixations.csv: the reading has no usable gaze, but its image and report are still good
    write_csv(str(tmp_path / "reflacx" / "main_data" / "P100R000" / "fixations.csv"),
              ["timestamp_start_fixation", "timestamp_end_fixation", "x_position", "y_position"], [])
    out, s = _prepare(str(tmp_path / "out"), "reflacx", "--root", str(tmp_path / "reflacx"),
                      "--mimic-cxr-jpg", str(tmp_path / "jpg"))
    rows = {r["source_id"]: r for r in _manifest_rows(out)}
    assert rows["P100R000"]["gaze_format"] == "" and rows["P100R000"]["gaze"] == ""
    assert rows["P100R000"]["report"] == " ".join(REPORT)
    assert rows["P101R001"]["gaze_format"] == "reflacx"
    assert s["images_with_gaze"] == 1 and s["gaze_rules"]["readings_without_usable_fixations"] == 1


# ------------------------------------------------------------------ review fixes: one check per file, one text rule


def test_egd_prepare_checks_transcripts_as_training_reads_them(tmp_path):
    make_mimic_cxr_jpg(str(tmp_path / "jpg"), MIMIC_ITEMS)
    make_egd_cxr(str(tmp_path / "egd"), MIMIC_ITEMS)
    d = MIMIC_ITEMS[3][2]
    # a phrase without begin/end times: training's reader refuses it, so egma-prepare must not write the row
    with open(tmp_path / "egd" / "audio_segmentation_transcripts" / d / "transcript.json", "w") as f:
        json.dump({"full_text": " ".join(REPORT), "time_stamped_text": [{"phrase": REPORT[0]}]}, f)
    out, s = _prepare(str(tmp_path / "out"), "egd-cxr", "--root", str(tmp_path / "egd"),
                      "--mimic-cxr-jpg", str(tmp_path / "jpg"))
    # this one (listed twice in master_sheet.csv) and the fakes' broken JSON
    assert s["skipped"] == {"transcript.json malformed": 3}
    assert d not in {r["dicom_id"] for r in _manifest_rows(out)}


def test_not_utf8_gaze_file_skips_the_reading_not_the_run(tmp_path):
    make_mimic_cxr_jpg(str(tmp_path / "jpg"), MIMIC_ITEMS)
    make_reflacx(str(tmp_path / "reflacx"), MIMIC_ITEMS)
    case = tmp_path / "reflacx" / "main_data" / "P100R000"
    (case / "timestamps_transcription.csv").write_bytes(
        b"word,timestamp_start_word,timestamp_end_word\nr\xe9sum\xe9,0.0,0.4\n")
    out, s = _prepare(str(tmp_path / "out"), "reflacx", "--root", str(tmp_path / "reflacx"),
                      "--mimic-cxr-jpg", str(tmp_path / "jpg"))
    assert s["skipped"]["REFLACX gaze files malformed"] == 1
    assert [r["source_id"] for r in _manifest_rows(out)] == ["P101R001"]
    with pytest.raises(gz.GazeFormatError, match="not valid UTF-8"):
        gz.read_reflacx(str(case), image_size=SIZE)
    (case / "timestamps_transcription.csv").unlink()
    (case / "transcription.txt").write_bytes(b"r\xe9sum\xe9.")
    with pytest.raises(gz.GazeFormatError, match="transcription.txt: not valid UTF-8"):
        gz.read_reflacx(str(case), image_size=SIZE)
    egd = tmp_path / "egd"
    write_csv(str(egd / "fixations.csv"), EGD_FIX_HEADER, [["d1", 1.0, 0.5, 3, 4]])
    (egd / "transcript.json").write_bytes(b'{"full_text": "r\xe9sum\xe9", "time_stamped_text": []}')
    with pytest.raises(gz.GazeFormatError, match="transcript.json: not valid UTF-8"):
        gz.read_egd_cxr(str(egd / "fixations.csv"), "d1", str(egd / "transcript.json"), image_size=(8, 8))


def test_gz_with_a_corrupt_body_is_a_text_decode_error(tmp_path):
    from egma_model.textio import TextDecodeError, read_text

    data = bytearray(gzip.compress(b"a,b\n1,2\n" * 100))
    data[10] = 0x07  # the first deflate block's type: 11 (reserved), zlib's "invalid block type"
    (tmp_path / "x.csv.gz").write_bytes(bytes(data))
    with pytest.raises(TextDecodeError, match="x.csv.gz: not a readable gzip file"):
        read_text(str(tmp_path / "x.csv.gz"))


def test_reflacx_dicom_id_with_spaces_is_one_id(tmp_path):
    make_mimic_cxr_jpg(str(tmp_path / "jpg"), MIMIC_ITEMS)
    make_reflacx(str(tmp_path / "reflacx"), MIMIC_ITEMS)
    sub, _, d = MIMIC_ITEMS[0]
    # no image path hint and no image size: the JPG, the DICOM size and the split all come from the padded id
    write_csv(str(tmp_path / "reflacx" / "main_data" / "metadata_phase_1.csv"),
              ["id", "split", "eye_tracking_data_discarded", "image", "dicom_id", "subject_id", "image_size_x",
               "image_size_y"], [("P100R000", "train", "False", "x.dcm", f" {d} ", sub, "", "")])
    out, s = _prepare(str(tmp_path / "out"), "reflacx", "--root", str(tmp_path / "reflacx"),
                      "--mimic-cxr-jpg", str(tmp_path / "jpg"))
    rows = _manifest_rows(out)
    assert s["skipped"] == {} and len(rows) == 1
    assert (rows[0]["dicom_id"], rows[0]["split"]) == (d, "test")
    assert (rows[0]["image_width"], rows[0]["image_height"]) == ("128", "160")
