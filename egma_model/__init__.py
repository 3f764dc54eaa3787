"""egma_model: the thin EGMA model layer (encoders, gaze preprocessing, data, training, evaluation).

Composes ``timm`` or ``transformers`` (image encoder), ``transformers`` (sentence encoder) and ``egma_kernels``
(the loss). Encoders load by hub name or local path (``egma_model.hub``), or are built from configs with
random weights; ``egma_model.medclip`` starts from a MedCLIP-ViT checkpoint; ``egma_model.prepare``
(``egma-prepare``) turns the public datasets (one module each in ``egma_model.datasets``) into manifests;
``egma_model.paper_table`` runs the paper's evaluation table. docs/architecture.md maps the modules.
"""

from .data import (Collator, EGMADataset, GazeOptions, ManifestError, ManifestRecord, load_image, load_manifest,
                   preprocess_image, split_sentences)
from .datasets.egd_cxr import read_egd_cxr
from .datasets.mimic_eye import read_mimic_eye_egd
from .datasets.reflacx import read_reflacx, read_reflacx_metadata
from .gaze import (GazeFormatError, GazeRecord, detect_fixations, gaze_for_sentences, sentence_heatmaps, sentence_spans,
                   to_patch_grid)
from .model import EGMAConfig, EGMAModel
from .tokenizer import build_word_tokenizer, load_tokenizer

__all__ = [
    "EGMAConfig", "EGMAModel", "EGMADataset", "Collator", "GazeOptions", "ManifestError", "ManifestRecord",
    "load_manifest", "load_image", "preprocess_image", "split_sentences", "GazeRecord", "GazeFormatError",
    "detect_fixations", "sentence_spans", "sentence_heatmaps", "to_patch_grid", "gaze_for_sentences",
    "read_reflacx", "read_reflacx_metadata", "read_egd_cxr", "read_mimic_eye_egd", "build_word_tokenizer",
    "load_tokenizer",
]
