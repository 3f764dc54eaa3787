"""Start an ``EGMAModel`` from a MedCLIP-ViT checkpoint, as the EGMA paper does.

The key layout is MedCLIP's own (the ``medclip`` package, ``medclip/modeling_medclip.py``, v0.0.3):
``MedCLIPModel(vision_cls=MedCLIPVisionModelViT)`` holds

===========================================  ======================================================================
``vision_model.model.*``                     ``transformers`` ``AutoModel`` of ``microsoft/swin-tiny-patch4-window7-224``
                                             (``SwinModel``; its ``pooler_output`` is the image embedding)
``vision_model.projection_head.weight``      ``nn.Linear(768, 512, bias=False)``
``text_model.model.*``                       ``AutoModel`` of ``emilyalsentzer/Bio_ClinicalBERT`` (``BertModel`` with
                                             its pooler)
``text_model.projection_head.weight``        ``nn.Linear(768, 512, bias=False)``
``logit_scale``                              scalar, ``log(1 / 0.07)`` at initialisation
===========================================  ======================================================================

saved as ``pytorch_model.bin`` (``MedCLIPModel.from_pretrained`` reads ``<dir>/pytorch_model.bin``).

Mapping onto ``EGMAModel`` (``image_library="transformers"``): ``vision_model.model.*`` -> ``image_encoder.*``,
``text_model.model.*`` -> ``text_encoder.*``, the vision projection -> the projection of the last stage (the
main scale; other scales' projections stay as initialised and are listed as missing), the text projection
-> ``text_proj``, ``logit_scale`` -> ``logit_scale``. The encoders' tensors are loaded through
``from_pretrained`` of the installed transformers (so checkpoints written by older versions, with
renamed keys or buffers that are now recomputed, load as that version loads them). Every checkpoint key
ends up in ``loaded`` or in ``unused`` with the reason; every model tensor not set from the checkpoint is
listed in ``missing``.

What differs from MedCLIP beyond the keys is a question of settings, not of weights, and is not changed
here: MedCLIP 0.0.3's text model averages ``hidden_states[1]``, ``[2]`` and the last layer over all token
positions (padding included) before its projection, where ``EGMAModel`` takes the masked mean of the last
layer; MedCLIP normalises images with mean 0.5863 / std 0.2795 (``medclip/constants.py``), ``egma_model.data``
with 0.449 / 0.226. The image side matches: MedCLIP's image embedding, the projection of Swin's
``pooler_output`` (the mean of the final-LayerNorm tokens), equals ``EGMAModel.encode_image_global`` with the
bias-free projection (checked in ``tests/test_model_medclip.py``).
"""

from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Tuple

import torch

__all__ = ["MEDCLIP_VISION_MODEL", "MEDCLIP_TEXT_MODEL", "MEDCLIP_WEIGHTS_NAME", "load_medclip_state_dict",
           "init_from_medclip", "MedCLIPInitError"]

# medclip/constants.py: VIT_TYPE, BERT_TYPE, WEIGHTS_NAME
MEDCLIP_VISION_MODEL = "microsoft/swin-tiny-patch4-window7-224"
MEDCLIP_TEXT_MODEL = "emilyalsentzer/Bio_ClinicalBERT"
MEDCLIP_WEIGHTS_NAME = "pytorch_model.bin"

_VISION = "vision_model.model."
_TEXT = "text_model.model."
_VISION_PROJ = "vision_model.projection_head.weight"
_TEXT_PROJ = "text_model.projection_head.weight"


class MedCLIPInitError(ValueError):
    """The checkpoint is not in MedCLIP's layout or does not fit the model (the message names the tensors)."""


def load_medclip_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The state dict of a MedCLIP checkpoint: a ``pytorch_model.bin`` (or ``.pt``/``.pth``/``.safetensors``) or
    the folder that holds ``pytorch_model.bin``. A ``"state_dict"``/``"model"`` wrapper is unwrapped."""
    if os.path.isdir(path):
        path = os.path.join(path, MEDCLIP_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MedCLIP checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for k in ("state_dict", "model"):
        if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
            sd = sd[k]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MedCLIPInitError(f"{path}: not a state dict of tensors")
    # checkpoints saved from DataParallel/DDP wrappers
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _load_tower(encoder: torch.nn.Module, sub: Dict[str, torch.Tensor], prefix: str, target: str,
                report: Dict) -> None:
    """Load ``sub`` (keys without ``prefix``) into ``encoder`` through transformers' ``from_pretrained``."""
    from transformers import AutoModel

    with tempfile.TemporaryDirectory(prefix="egma_medclip_") as d:
        encoder.config.save_pretrained(d)
        torch.save(sub, os.path.join(d, "pytorch_model.bin"))
        try:
            # mismatched shapes are collected (and raised below with their names), not loaded
            loaded, info = AutoModel.from_pretrained(d, output_loading_info=True, ignore_mismatched_sizes=True)
        except (RuntimeError, ValueError, OSError) as e:
            raise MedCLIPInitError(f"the checkpoint's {prefix}* tensors do not fit the model's {target} "
                                   f"({type(encoder).__name__}, {encoder.config.model_type}): {e}") from e
    mism = info.get("mismatched_keys") or []
    if mism:
        raise MedCLIPInitError(f"{prefix}*: tensors of the wrong shape for {target} (key, checkpoint shape, model "
                               f"shape): {sorted(map(str, mism))}")
    unexpected = set(info.get("unexpected_keys") or [])
    own = encoder.state_dict()
    src = loaded.state_dict()
    not_loaded = set(info.get("missing_keys") or [])
    # buffers the installed library recomputes (older versions saved them): it neither loads nor reports them
    recomputed = {n.split(".")[-1] for n, _ in loaded.named_buffers() if n not in src}
    extra = {k for k in src if k not in own}  # e.g. BERT's pooler: EGMA pools the hidden states itself
    for k in sub:
        if k in unexpected:
            report["unused"][prefix + k] = f"not a tensor of {target} in the installed transformers"
        elif k in extra:
            report["unused"][prefix + k] = f"{target} has no {k} (EGMA pools the hidden states itself)"
        elif k.split(".")[-1] in recomputed:
            report["unused"][prefix + k] = "a buffer the installed transformers recomputes (no longer saved)"
        else:
            report["mapped"][prefix + k] = target
    to_copy = {k: v for k, v in src.items() if k in own and k not in not_loaded}
    # every tensor counted as mapped must have arrived (the library may rename keys, never merge them)
    n_mapped = sum(sub[k[len(prefix):]].numel() for k in report["mapped"] if k.startswith(prefix))
    n_loaded = sum(v.numel() for v in to_copy.values())
    if n_mapped != n_loaded:
        raise MedCLIPInitError(f"{prefix}*: {n_mapped} checkpoint values map to {target} but {n_loaded} were "
                               f"loaded; the installed transformers dropped tensors it did not report")
    encoder.load_state_dict(to_copy, strict=False)
    report["loaded"] += [f"{target}.{k}" for k in to_copy]
    report["missing"] += [f"{target}.{k}" for k in own if k not in to_copy]


def init_from_medclip(model, path: str, *, strict: bool = False) -> Dict:
    """Load a MedCLIP-ViT checkpoint into ``model`` (an ``EGMAModel``); returns the report
    ``{"loaded": [model tensors set], "missing": [model tensors not in the checkpoint], "unused":
    {checkpoint key: why}, "zeroed": [projection biases set to 0], "mapped": {checkpoint key: model part}}``.

    ``strict``: raise ``MedCLIPInitError`` when anything is missing or unused.
    """
    sd = load_medclip_state_dict(path)
    report: Dict = {"checkpoint": os.path.abspath(path), "loaded": [], "missing": [], "unused": {}, "zeroed": [],
                    "mapped": {}}
    vision = {k[len(_VISION):]: v for k, v in sd.items() if k.startswith(_VISION)}
    text = {k[len(_TEXT):]: v for k, v in sd.items() if k.startswith(_TEXT)}
    if not vision and not text:
        raise MedCLIPInitError(f"{path}: no {_VISION}* or {_TEXT}* tensors: not a MedCLIP checkpoint "
                               f"(found e.g. {sorted(sd)[:5]})")
    cfg = model.config
    if vision:
        if cfg.image_library != "transformers":
            raise MedCLIPInitError(f"{path}: MedCLIP's image encoder is a transformers Swin; build the model with "
                                   f"image_library='transformers' (egma-train --image-library transformers)")
        _load_tower(model.image_encoder, vision, _VISION, "image_encoder", report)
    else:
        report["missing"] += [f"image_encoder.{k}" for k in model.image_encoder.state_dict()]
    if text:
        _load_tower(model.text_encoder, text, _TEXT, "text_encoder", report)
    else:
        report["missing"] += [f"text_encoder.{k}" for k in model.text_encoder.state_dict()]
    # projections: MedCLIP's vision head acts on the pooled last stage, i.e. EGMA's last-stage scale
    n_stages = len(getattr(model.image_encoder.config, "depths", [])) or None
    main = None
    for i, s in enumerate(cfg.scales):
        if s == -1 or (n_stages is not None and s == n_stages - 1):
            main = i
    projs: List[Tuple[str, str, torch.nn.Linear]] = []
    if main is not None:
        projs.append((_VISION_PROJ, f"image_proj.{main}", model.image_proj[main]))
    projs.append((_TEXT_PROJ, "text_proj", model.text_proj))
    for ck, name, lin in projs:
        if ck not in sd:
            continue
        w = sd[ck]
        if tuple(w.shape) != tuple(lin.weight.shape):
            raise MedCLIPInitError(f"{ck} has shape {tuple(w.shape)} but {name}.weight is {tuple(lin.weight.shape)}"
                                   f" (embed_dim must be {w.shape[0]} to start from this checkpoint)")
        with torch.no_grad():
            lin.weight.copy_(w)
            if lin.bias is not None:
                lin.bias.zero_()
                report["zeroed"].append(f"{name}.bias")
        report["loaded"].append(f"{name}.weight")
        report["mapped"][ck] = name
    for i, lin in enumerate(model.image_proj):
        if f"image_proj.{i}.weight" not in report["loaded"]:
            report["missing"] += [f"image_proj.{i}.{k}" for k, _ in lin.named_parameters()]
    if "text_proj.weight" not in report["loaded"]:
        report["missing"] += [f"text_proj.{k}" for k, _ in model.text_proj.named_parameters()]
    if "logit_scale" in sd:
        with torch.no_grad():
            model.logit_scale.copy_(sd["logit_scale"].reshape(()))
        report["loaded"].append("logit_scale")
        report["mapped"]["logit_scale"] = "logit_scale"
    else:
        report["missing"].append("logit_scale")
    for k in sd:
        if k not in report["mapped"] and k not in report["unused"]:
            if k == _VISION_PROJ:
                report["unused"][k] = "no scale of the model is the last stage (scales must include -1)"
            else:
                report["unused"][k] = "not part of MedCLIP-ViT's layout"
    if strict and (report["missing"] or report["unused"]):
        raise MedCLIPInitError(f"{path}: missing {report['missing']}, unused {report['unused']}")
    return report
