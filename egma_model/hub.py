"""Encoders and tokenizers by model-hub name or local path, the way transformers and timm load them.

``load_text_encoder("emilyalsentzer/Bio_ClinicalBERT")``, ``load_image_encoder_hf("microsoft/swin-tiny-...")``
and ``create_timm("swin_tiny_patch4_window7_224", pretrained=True)`` download through the Hugging Face hub
when the machine is online and read the local hub cache (``HF_HOME``/``HF_HUB_CACHE``) or a local directory
when it is not. The libraries' own switches are honoured, not re-implemented: ``HF_HUB_OFFLINE=1`` (and
``TRANSFORMERS_OFFLINE=1``) make them read the cache only. When neither works, ``EncoderLoadError`` names
the model and says which switch was in effect and how to fill the cache.
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["EncoderLoadError", "hub_offline", "load_text_encoder", "load_image_encoder_hf", "create_timm",
           "load_tokenizer_any"]


class EncoderLoadError(FileNotFoundError):
    """An encoder (or tokenizer) could be found neither as a local directory nor on the hub / in its cache."""


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set to a true value (as the libraries read it)."""
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except Exception:  # pragma: no cover - huggingface_hub always comes with transformers
        pass
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    return False


def _cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover
        return os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface/hub"


def _explain(kind: str, name: str, err: BaseException) -> EncoderLoadError:
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.path.sep != "/" and os.path.sep in name)
    if looks_local and not os.path.exists(name):
        return EncoderLoadError(f"{kind} directory not found: {name} (a local path; hub ids look like 'org/name')")
    elif os.path.isdir(name):
        where = f"the local directory {name!r} could not be read as one"
    elif hub_offline():
        where = (f"HF_HUB_OFFLINE=1 is set, so only the local hub cache ({_cache_dir()}) was "
                 f"searched and {name!r} is not in it; download it once online (`hf download {name}`) or unset "
                 f"HF_HUB_OFFLINE, or pass a local directory")
    else:
        where = (f"it is not a local directory and the hub download failed; on a machine without internet, "
                 f"cache it elsewhere (`hf download {name}`), copy the cache, and set HF_HUB_OFFLINE=1, or pass a "
                 f"local directory")
    return EncoderLoadError(f"cannot load the {kind} {name!r}: {where} ({type(err).__name__}: {err})")


def load_text_encoder(name_or_path: str, **kwargs):
    """``transformers.AutoModel.from_pretrained`` of a hub id or a local directory (no forced local_files_only)."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise _explain("text encoder", name_or_path, e) from e


def load_image_encoder_hf(name_or_path: str, **kwargs):
    """A transformers vision backbone (e.g. ``microsoft/swin-tiny-patch4-window7-224``) by hub id or directory."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise _explain("image encoder", name_or_path, e) from e


def create_timm(name: str, *, pretrained: bool = False, weights_file: Optional[str] = None, **kwargs):
    """``timm.create_model``: random weights, a local weights file, or the hub's pretrained weights by name
    (``pretrained=True``; e.g. ``swin_tiny_patch4_window7_224.ms_in1k``), read from the hub cache when offline."""
    import timm

    if weights_file:
        if not os.path.isfile(weights_file):
            raise FileNotFoundError(f"image encoder weights not found: {weights_file}")
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=weights_file), **kwargs)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, ValueError) as e:
        raise _explain("timm image encoder", name, e) from e


def load_tokenizer_any(name_or_path: str):
    """``AutoTokenizer.from_pretrained`` of a hub id or a local directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise _explain("tokenizer", name_or_path, e) from e
