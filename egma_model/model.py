"""``EGMAModel``: a timm image encoder and a transformers sentence encoder, trained with the EGMA loss.

The model is thin: patch tokens from ``timm`` (``forward_intermediates``, any stage) or from a transformers
vision backbone such as MedCLIP's Swin (``image_library="transformers"``), sentence embeddings by masked mean
pooling of a BERT-family encoder, linear projections to ``embed_dim`` (512), a learnable temperature, and
``egma_kernels.fine_grained_loss`` for the loss. Encoders load by hub name or local path
(``egma_model.hub``; ``HF_HUB_OFFLINE=1`` reads the local cache only); without names they are built from
their configurations with random weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import egma_kernels

from . import checkpoint

__all__ = ["EGMAConfig", "EGMAModel", "TINY_SWIN", "TINY_HF_SWIN", "TINY_VIT", "TINY_BERT", "BIO_CLINICAL_BERT_CONFIG"]

CONFIG_NAME = "egma_config.json"
WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "egma_model.pt"  # before checkpoints had a manifest: a pickle, read with weights_only

# Bio_ClinicalBERT has the bert-base-cased architecture (vocabulary 28996); used when no local weights are given.
BIO_CLINICAL_BERT_CONFIG = dict(vocab_size=28996, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=3072, max_position_embeddings=512)
# Small configurations for tests and CPU demos.
TINY_SWIN = dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))
TINY_VIT = dict(embed_dim=48, depth=2, num_heads=2)
TINY_HF_SWIN = dict(model_type="swin", embed_dim=24, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4])
TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                 max_position_embeddings=128)


@dataclass
class EGMAConfig:
    """Everything needed to rebuild an ``EGMAModel`` (saved as ``egma_config.json`` with checkpoints).

    image_library: ``"timm"`` (default) or ``"transformers"`` (a transformers vision backbone loaded as is,
        e.g. MedCLIP's ``microsoft/swin-tiny-patch4-window7-224``; its partial-window behaviour at 256 px
        differs from timm's Swin).
    image_model: timm: a model name (``swin_tiny_patch4_window7_224``: 7x7 grid at 224 px, the paper's
        default; ``vit_base_patch16_224``: 14x14). transformers: a hub id or local directory, or None to
        build one from ``image_config`` with random weights.
    image_kwargs: extra ``timm.create_model`` arguments (e.g. ``TINY_SWIN`` for a small model).
    image_weights: a local weights file for the timm image encoder (timm's ``pretrained_cfg_overlay``).
    image_pretrained: timm: load the hub's pretrained weights for ``image_model`` (e.g.
        ``swin_tiny_patch4_window7_224.ms_in1k``), from the hub cache when ``HF_HUB_OFFLINE=1``.
    image_config: transformers: config arguments (with ``model_type``, e.g. ``"swin"``) when ``image_model``
        is None.
    proj_bias: the projections to ``embed_dim`` have a bias (MedCLIP's have none).
    scales: which encoder stages give patch tokens for the loss (``-1`` = the last; Swin's earlier stages
        ``1``, ``2`` give 28x28 and 14x14 at 224 px). The first scale listed is the main one (gaze grid,
        global embedding, zero-shot scoring).
    text_model: a hub id (``emilyalsentzer/Bio_ClinicalBERT``) or local directory of a BERT-family model
        (``from_pretrained``); ``None`` builds one from ``text_config`` with random weights.
    text_config: ``transformers.BertConfig`` arguments when ``text_model`` is None
        (default: the Bio_ClinicalBERT architecture).
    vocab_size: overrides ``text_config['vocab_size']`` (set it to the tokenizer's size).
    loss_weights: ``(w_con, w_mlce, w_map)`` of ``fine_grained_loss``; ``global_weight``: the optional global
        CLIP term on the pooled embeddings (0 = off); ``scale_weights``: per scale (default all 1).
    use_gaze: False drops the gaze terms (MLCE and the gaze part of the mapping): gaze_mask all false.
    patch_norm: ``"post"`` (default): last-stage patch tokens after the encoder's final LayerNorm;
        ``"pre"``: before it (the authors' code takes ``hidden_states[-1]``). Earlier stages are never normed.
    image_global: ``"mean"`` (default): the global image embedding is the mean of the main scale's projected
        patches; ``"pooler"``: the projection of the pooled token (mean of the last stage after the final
        LayerNorm), through the same projection as the patches (the authors' code).
    image_mean, image_std: the grey-level normalisation of the images (ours: ImageNet's grey 0.449/0.226;
        MedCLIP's 0.5863/0.2795).
    text_pooling: ``"masked_mean"`` (default): mean of the last layer over the sentence's tokens;
        ``"last4_all"``: mean of the last 4 hidden layers, then mean over every position including padding
        (sentences are then padded to ``max_length`` so an embedding does not depend on its batch).
    text_groups: sentences are encoded in this many groups of similar length (sorted by length, equal
        counts), each padded only to its own longest, then put back in order (1, the default: one padded
        batch). The embeddings are those of one batch to float rounding (with dropout the masks drawn
        differ). Not with ``text_pooling="last4_all"``, whose mean runs over the padding positions too (the
        setting is ignored there). On the CPU with short sentences it saved positions but not time (README).
    loss_dtype: the dtype of the normalised embeddings handed to the loss kernels: ``"float32"`` (default),
        ``"bfloat16"``, ``"float16"``, or ``"auto"``: the autocast dtype when autocast is on, else float32. The
        embeddings are normalised in float32 first; float64 embeddings stay float64; the gaze stays float32
        and the global CLIP term runs in float32 whatever this says.
    temperature_clamp: ``"at_use"`` (default): ``exp(clamp(logit_scale, 0, max))`` each time, the parameter
        itself untouched (no gradient outside the range); ``"in_place"``: the parameter is clamped in place
        before each training forward, as the authors' code does.
    """

    image_model: Optional[str] = "swin_tiny_patch4_window7_224"
    image_size: int = 224
    image_kwargs: Dict = field(default_factory=dict)
    image_weights: Optional[str] = None
    image_library: str = "timm"
    image_pretrained: bool = False
    image_config: Optional[Dict] = None
    proj_bias: bool = True
    scales: Tuple[int, ...] = (-1,)
    text_model: Optional[str] = None
    text_config: Dict = field(default_factory=lambda: dict(BIO_CLINICAL_BERT_CONFIG))
    vocab_size: Optional[int] = None
    max_length: int = 64
    embed_dim: int = 512
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    loss_weights: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    alpha: Optional[float] = None
    map_threshold: float = 2.0 / 7.0
    egma_compat: bool = False
    global_weight: float = 0.0
    scale_weights: Optional[Tuple[float, ...]] = None
    use_gaze: bool = True
    backend: Optional[str] = None
    patch_norm: str = "post"
    image_global: str = "mean"
    image_mean: float = 0.449
    image_std: float = 0.226
    text_pooling: str = "masked_mean"
    temperature_clamp: str = "at_use"
    text_groups: int = 1
    loss_dtype: str = "float32"

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"EGMAConfig.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if not self.image_std > 0:
            raise ValueError(f"EGMAConfig.image_std must be positive, got {self.image_std}")
        if not (isinstance(self.text_groups, int) and self.text_groups >= 1):
            raise ValueError(f"EGMAConfig.text_groups must be an integer >= 1, got {self.text_groups!r}")

    def to_dict(self) -> Dict:
        d = dataclasses.asdict(self)
        for k in ("scales", "loss_weights", "scale_weights"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Dict) -> "EGMAConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown EGMAConfig field(s): {sorted(unknown)}")
        d = dict(d)
        for k in ("scales", "loss_weights", "scale_weights"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def tiny(cls, image_model: Optional[str] = None, **kw) -> "EGMAConfig":
        """A small CPU-friendly configuration (tests and demos); with ``image_library="transformers"`` and no
        ``image_model``, a small transformers Swin (``TINY_HF_SWIN``)."""
        if kw.get("image_library") == "transformers":
            if not image_model and not kw.get("image_config"):
                kw["image_config"] = dict(TINY_HF_SWIN, image_size=kw.get("image_size", 224))
        else:
            image_model = image_model or "swin_tiny_patch4_window7_224"
        image_kwargs = dict(TINY_VIT if "vit" in (image_model or "") else TINY_SWIN)
        image_kwargs.update(kw.pop("image_kwargs", {}))
        text_config = dict(TINY_BERT)
        if kw.get("text_pooling") == "last4_all":
            text_config["num_hidden_layers"] = 4  # the pooling reads the last 4 layers
        text_config.update(kw.pop("text_config", {}))
        kw.setdefault("embed_dim", 64)
        kw.setdefault("max_length", 32)
        return cls(image_model=image_model, image_kwargs=image_kwargs, text_config=text_config, **kw)


_CHOICES = {"patch_norm": ("post", "pre"), "image_global": ("mean", "pooler"),
            "loss_dtype": ("float32", "bfloat16", "float16", "auto"),
            "text_pooling": ("masked_mean", "last4_all"), "temperature_clamp": ("at_use", "in_place")}


def _clip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale * a @ b.t()
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class EGMAModel(nn.Module):
    """The EGMA dual encoder.

    ``encode_image(pixel_values)`` -> patch embeddings per scale; ``encode_sentences(input_ids, attention_mask)``
    -> ``(N, D)``; ``forward(batch)`` -> dict of loss terms (see ``forward``).
    """

    def __init__(self, config: Optional[EGMAConfig] = None):
        super().__init__()
        from transformers import BertConfig, BertModel

        from . import hub

        self.config = config = config or EGMAConfig()
        if config.image_library == "timm":
            if not config.image_model:
                raise ValueError("image_library 'timm' needs an image_model name")
            kwargs = dict(config.image_kwargs)
            kwargs.setdefault("img_size", config.image_size)
            self.image_encoder = hub.create_timm(config.image_model, pretrained=config.image_pretrained,
                                                 weights_file=config.image_weights, num_classes=0, **kwargs)
        elif config.image_library == "transformers":
            self.image_encoder = _build_hf_image_encoder(config)
        else:
            raise ValueError(f"image_library must be 'timm' or 'transformers', got {config.image_library!r}")
        if config.text_model:
            self.text_encoder = hub.load_text_encoder(config.text_model)
            # sentence embeddings pool the hidden states; BERT's pooler would be unused parameters (which
            # DDP rejects) and is absent when the checkpoint is rebuilt from its config
            if getattr(self.text_encoder, "pooler", None) is not None:
                self.text_encoder.pooler = None
        else:
            tc = dict(config.text_config)
            if config.vocab_size is not None:
                tc["vocab_size"] = config.vocab_size
            self.text_encoder = BertModel(BertConfig(**tc), add_pooling_layer=False)
        # probe the encoder once for the grids and widths of the chosen stages
        with torch.no_grad():
            was = self.image_encoder.training
            self.image_encoder.eval()
            feats = self._image_features(torch.zeros(1, 3, config.image_size, config.image_size))
            self.image_encoder.train(was)
        self.grids: List[Tuple[int, int]] = [tuple(f.shape[-2:]) for f in feats]
        widths = [f.shape[1] for f in feats]
        D = config.embed_dim
        self.image_proj = nn.ModuleList([nn.Linear(w, D, bias=config.proj_bias) for w in widths])
        self.text_proj = nn.Linear(self.text_encoder.config.hidden_size, D, bias=config.proj_bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))

    # ------------------------------------------------------------------ encoders
    def _image_features(self, pixel_values: torch.Tensor, *, with_pooled: bool = False):
        """Patch tokens ``(B, C, gh, gw)`` per scale (the last stage before or after the final LayerNorm as
        ``patch_norm`` says); with ``with_pooled`` also the pooled token ``(B, C)``: the mean of the last
        stage after the final LayerNorm (what the backbones' poolers give)."""
        cfg = self.config
        if cfg.image_library == "transformers":
            feats, last_pre, last_post = _hf_image_features(self.image_encoder, pixel_values, cfg.scales,
                                                            pre_norm=cfg.patch_norm == "pre")
        else:
            feats, last_pre, last_post = self._timm_features(pixel_values)
        if not with_pooled:
            return feats
        if last_pre is None and last_post is None:
            raise ValueError("the pooled token needs the last stage among the scales")
        if last_post is None:
            last_post = self._final_norm(last_pre)
        return feats, last_post.flatten(2).mean(2)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The image encoder's final LayerNorm applied to ``(B, C, gh, gw)`` tokens."""
        enc = self.image_encoder
        name = "layernorm" if self.config.image_library == "transformers" else "norm"
        norm = getattr(enc, name, None)
        if norm is None:
            raise ValueError(f"{type(enc).__name__} has no final norm to pool after")
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def _timm_features(self, pixel_values: torch.Tensor):
        enc = self.image_encoder
        n = None
        for name in ("layers", "stages", "blocks"):
            if isinstance(getattr(enc, name, None), nn.Sequential) or isinstance(getattr(enc, name, None), nn.ModuleList):
                n = len(getattr(enc, name))
                break
        scales = list(self.config.scales)
        resolved = [s if s >= 0 or n is None else n + s for s in scales]
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"scales {scales} name the same stage twice")
        # timm applies its final norm to the last stage only when norm=True
        post = self.config.patch_norm == "post"
        feats = enc.forward_intermediates(pixel_values, indices=sorted(resolved), norm=post, output_fmt="NCHW",
                                          intermediates_only=True)
        by_stage = dict(zip(sorted(resolved), feats))  # timm returns them in stage order
        out = [by_stage[r] for r in resolved]
        last = (n - 1) if n is not None else max(resolved)
        lt = by_stage.get(last)
        return out, (None if post else lt), (lt if post else None)

    @property
    def grid(self) -> Tuple[int, int]:
        """The main scale's patch grid ``(gh, gw)``."""
        return self.grids[0]

    @property
    def gaze_grid(self) -> Tuple[int, int]:
        """The finest grid over the scales: build gaze on it (coarser scales area-pool it)."""
        return max(self.grids, key=lambda g: g[0] * g[1])

    def scale(self) -> torch.Tensor:
        """``t = exp(clamp(log_scale, 0, ln 100))`` (``temperature_clamp="in_place"``: the parameter is
        clamped in place first, during training, so the gradient is that of ``exp``)."""
        if self.config.temperature_clamp == "in_place":
            if self.training:
                with torch.no_grad():
                    self.logit_scale.clamp_(0.0, self.config.max_logit_scale)
                return self.logit_scale.exp()
        return self.logit_scale.clamp(0.0, self.config.max_logit_scale).exp()

    def encode_image(self, pixel_values: torch.Tensor, *, all_scales: bool = False, normalize: bool = True):
        """Patch embeddings ``(B, P, D)`` of the main scale (or a list over scales with ``all_scales``)."""
        out = []
        for proj, f in zip(self.image_proj, self._image_features(pixel_values)):
            tok = proj(f.flatten(2).transpose(1, 2))
            out.append(F.normalize(tok.float(), dim=-1) if normalize else tok)
        return out if all_scales else out[0]

    def encode_image_global(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Global image embedding ``(B, D)``: the normalised mean of the main scale's projected patches, or
        (``image_global="pooler"``) the projected pooled token."""
        if self.config.image_global == "pooler":
            _, pooled = self._image_features(pixel_values, with_pooled=True)
            return F.normalize(self.image_proj[0](pooled).float(), dim=-1)
        return F.normalize(self.encode_image(pixel_values, normalize=False).float().mean(1), dim=-1)

    def encode_sentences(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, normalize: bool = True):
        """Sentence embeddings ``(N, D)``: masked mean of the encoder's last hidden states, projected
        (``text_pooling="last4_all"``: mean of the last 4 layers, then over all positions, padding included)."""
        if self.config.text_pooling == "last4_all":
            hs = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                   output_hidden_states=True).hidden_states
            if len(hs) < 5:
                raise ValueError(f"text_pooling 'last4_all' needs at least 4 encoder layers, the text encoder has "
                                 f"{len(hs) - 1}")
            pooled = torch.stack(hs[-4:]).mean(0).mean(1)
        else:
            pooled = _grouped(self._masked_mean, input_ids, attention_mask, self.config.text_groups)
        emb = self.text_proj(pooled)
        return F.normalize(emb.float(), dim=-1) if normalize else emb

    def _masked_mean(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def encode_reports(self, input_ids, attention_mask, cu_seqlens) -> torch.Tensor:
        """Global report embeddings ``(R, D)``: the normalised mean of each report's projected sentences."""
        emb = self.encode_sentences(input_ids, attention_mask, normalize=False).float()
        return F.normalize(_segment_mean(emb, cu_seqlens), dim=-1)

    # ------------------------------------------------------------------ loss
    def _gaze_for_grid(self, gaze: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        P = grid[0] * grid[1]
        if gaze.shape[1] == P:
            return gaze
        side = int(round(math.sqrt(gaze.shape[1])))
        if side * side != gaze.shape[1] or side % grid[0] or side % grid[1]:
            raise ValueError(f"gaze has {gaze.shape[1]} columns, which is not the image encoder's {grid[0]}x{grid[1]} "
                             f"grid ({P} patches) nor a square grid that is a multiple of it; build the gaze for grid {grid}")
        pooled = F.adaptive_avg_pool2d(gaze.reshape(-1, 1, side, side).float(), grid).reshape(-1, P)
        peak = pooled.amax(1, keepdim=True)
        return torch.where(peak > 0, pooled / peak.clamp_min(1e-30), pooled)

    def embed_images(self, pixel_values: torch.Tensor) -> Dict[str, object]:
        """The image side of ``embed``: ``{"patch": [(B, P_s, D)] per scale, "pooled": (B, D) or None}``,
        projected, not normalised, in the encoder's dtype (``pooled`` is the projected pooled token when
        ``image_global="pooler"``)."""
        with self._part("image_encoder"):
            if self.config.image_global == "pooler":
                feats, pooled = self._image_features(pixel_values, with_pooled=True)
                patch = [proj(f.flatten(2).transpose(1, 2)) for proj, f in zip(self.image_proj, feats)]
                return {"patch": patch, "pooled": self.image_proj[0](pooled)}
            return {"patch": self.encode_image(pixel_values, all_scales=True, normalize=False), "pooled": None}

    def embed_sentences(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text side of ``embed``: projected, not normalised sentence embeddings ``(N, D)``."""
        with self._part("text_encoder"):
            return self.encode_sentences(input_ids, attention_mask, normalize=False)

    def embed(self, batch: Dict[str, torch.Tensor]) -> Dict[str, object]:
        """Everything the encoders compute for a batch, before the loss: ``{"patch": [(B, P_s, D)] per scale,
        "pooled": (B, D) or None, "sent": (N, D)}`` (projected, not normalised). Every parameter but
        ``logit_scale`` is used here; ``loss_from_embeddings`` uses only ``logit_scale``."""
        emb = self.embed_images(batch["pixel_values"])
        emb["sent"] = self.embed_sentences(batch["input_ids"], batch["attention_mask"])
        return emb

    def _part(self, name: str):
        """The step profiler's timing context for a part of the step (``egma_model.step_profile``), or a
        no-op context when no profiler is attached."""
        timer = self.__dict__.get("part_timer")
        return contextlib.nullcontext() if timer is None else timer.part(name)

    def _loss_input(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings normalised in float32 (float64 stays float64), then in the dtype of ``loss_dtype``."""
        if x.dtype == torch.float64:
            return F.normalize(x, dim=-1)
        return F.normalize(x.float(), dim=-1).to(_loss_dtype(self.config.loss_dtype, x.device))

    def forward(self, batch: Dict[str, torch.Tensor], *, return_details: bool = False) -> Dict[str, torch.Tensor]:
        """Loss terms for a collated batch (``egma_model.data.Collator``): ``loss_from_embeddings(embed(batch))``.

        ``batch``: ``pixel_values (B,3,H,W)``, ``input_ids``/``attention_mask (N,L)``, ``cu_seqlens (B+1,)`` int32,
        optional ``gaze (N,P)`` and ``gaze_mask (B,)``.
        Returns ``{"loss", "contrastive", "gaze_mlce", "mapping", "global", "logit_scale"}`` (terms summed over
        scales with ``scale_weights``; per-scale terms as ``"<term>@<gh>x<gw>"`` when several scales).
        """
        return self.loss_from_embeddings(self.embed(batch), batch, return_details=return_details)

    def loss_from_embeddings(self, emb: Dict[str, object], batch: Dict[str, torch.Tensor], *,
                             return_details: bool = False) -> Dict[str, torch.Tensor]:
        """The loss terms of ``forward`` from ``embed``'s output (``batch`` gives ``cu_seqlens`` and the gaze)."""
        with self._part("loss_forward"):
            return self._loss(emb, batch, return_details)

    def _loss(self, emb, batch, return_details):
        cfg = self.config
        patch, pooled = emb["patch"], emb["pooled"]
        sent = self._loss_input(emb["sent"])
        cu = batch["cu_seqlens"].to(device=sent.device, dtype=torch.int32)
        t = self.scale()
        gaze, mask = batch.get("gaze"), batch.get("gaze_mask")
        if not cfg.use_gaze:
            gaze, mask = None, None
        if gaze is not None and gaze.shape[0] != sent.shape[0]:
            raise ValueError(f"gaze has {gaze.shape[0]} rows but the batch has {sent.shape[0]} sentences")
        sw = cfg.scale_weights or (1.0,) * len(patch)
        out: Dict[str, torch.Tensor] = {}
        total = sent.new_zeros((), dtype=torch.promote_types(sent.dtype, torch.float32))
        sums = {k: total.new_zeros(()) for k in ("contrastive", "gaze_mlce", "mapping")}
        for s, (p, grid) in enumerate(zip(patch, self.grids)):
            pe = self._loss_input(p)
            g = None if gaze is None else self._gaze_for_grid(gaze.to(pe.device), grid).to(total.dtype)
            terms = egma_kernels.fine_grained_loss(
                pe, sent, cu, t, g, None if g is None else mask, alpha=cfg.alpha, map_threshold=cfg.map_threshold,
                weights=cfg.loss_weights, egma_compat=cfg.egma_compat, backend=cfg.backend, return_details=True)
            total = total + sw[s] * terms.loss
            for k in sums:
                v = getattr(terms, k)
                sums[k] = sums[k] + sw[s] * v
                if len(patch) > 1:
                    out[f"{k}@{grid[0]}x{grid[1]}"] = v.detach()
            if s == 0 and return_details:
                out["i2t"], out["t2i"] = terms.i2t, terms.t2i
        glob = total.new_zeros(())
        if cfg.global_weight > 0:
            # the global CLIP term is computed in float32 (float64 for float64 embeddings) whatever loss_dtype
            up = torch.promote_types(patch[0].dtype, torch.float32)
            img_g = patch[0].to(up).mean(1) if pooled is None else pooled.to(up)
            img_g = F.normalize(img_g, dim=-1)
            rep_g = F.normalize(_segment_mean(emb["sent"].to(up), cu), dim=-1)
            glob = _clip_loss(img_g, rep_g, t)
            total = total + cfg.global_weight * glob
        out.update(loss=total, **sums)
        out["global"] = glob
        out["logit_scale"] = t.detach()
        return out

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str, tokenizer=None, *, step: Optional[int] = None,
                        extra: Optional[Callable[[str], None]] = None, kind: Optional[str] = None) -> None:
        """Write the checkpoint folder ``path`` atomically (``egma_model.checkpoint``): ``egma_config.json``,
        the weights as ``model.safetensors``, the tokenizer under ``tokenizer/``, whatever ``extra(folder)``
        writes (the trainer's state), and the manifest. A failed or killed save leaves the previous folder.
        ``kind`` (default: "training" with ``extra``, else "model") is recorded in the manifest."""

        def fill(folder: str) -> None:
            self._write_files(folder, tokenizer)
            if extra is not None:
                extra(folder)

        checkpoint.write(path, fill, step=step, kind=kind or ("model" if extra is None else "training"))

    def _write_files(self, folder: str, tokenizer=None) -> None:
        with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self._saved_config(), f, indent=2)
        # tensors that share memory would be refused by safetensors: each is saved as its own copy
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        checkpoint.save_tensors(_unshared(state), os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
        checkpoint.fault_point("after_weights")
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))

    def _saved_config(self) -> Dict:
        cfg = self.config.to_dict()
        # a checkpoint is self-contained: the encoders are rebuilt from their configs, then loaded
        cfg["image_weights"] = None
        cfg["image_pretrained"] = False
        if self.config.image_library == "transformers":
            cfg["image_model"] = None
            cfg["image_config"] = _hf_config_dict(self.image_encoder.config)
        cfg["text_model"] = None
        cfg["text_config"] = {k: v for k, v in self.text_encoder.config.to_dict().items()
                              if k in _BERT_KEYS}
        cfg["text_config"]["model_type"] = self.text_encoder.config.model_type
        cfg["vocab_size"] = self.text_encoder.config.vocab_size
        return cfg

    @classmethod
    def from_pretrained(cls, path: str, map_location="cpu", *, verify: bool = True, **overrides) -> "EGMAModel":
        """Load a checkpoint written by ``save_pretrained`` (local directory; ``overrides`` change config fields).

        The folder is checked against its manifest first (``egma_model.checkpoint.verify``): a torn, altered
        or foreign checkpoint raises ``checkpoint.CheckpointError`` naming what is wrong. ``verify=False``
        skips that check, for a caller that has just made it (``--resume`` reads a folder
        ``checkpoint.resolve`` verified; hashing the weights again doubles its start-up reads). Weights load from
        safetensors (no pickled code runs); a folder written before checkpoints had a manifest
        (``egma_model.pt``) loads through ``torch.load(weights_only=True)``."""
        cfg_path = os.path.join(path, CONFIG_NAME)
        legacy = not os.path.isfile(os.path.join(path, checkpoint.MANIFEST_NAME))
        if legacy and not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path}: not an EGMA checkpoint (no {CONFIG_NAME}); for encoder weights use "
                                    f"EGMAConfig(text_model=<dir>, image_weights=<file>)")
        if not legacy and verify:
            checkpoint.verify(path)
        try:
            with open(cfg_path, encoding="utf-8") as f:
                d = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise checkpoint.CheckpointError(f"{cfg_path}: unreadable model configuration ({e})") from None
        d.update(overrides)
        tc = dict(d.get("text_config") or {})
        mt = tc.pop("model_type", "bert")
        if mt != "bert":
            raise ValueError(f"{cfg_path}: text encoder type {mt!r} is rebuilt as BERT only; load it via text_model=<dir>")
        d["text_config"] = tc
        model = cls(EGMAConfig.from_dict(d))
        model.load_state_dict(_read_weights(path, legacy, map_location))
        return model


def _unshared(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` with a private copy of every tensor whose memory another one already uses."""
    seen, out = set(), {}
    for k, v in state.items():
        key = v.untyped_storage().data_ptr() if v.numel() else None  # any overlap, not only equal views
        out[k] = v.clone() if key is not None and key in seen else v
        seen.add(key)
    return out


def _read_weights(path: str, legacy: bool, map_location) -> Dict[str, torch.Tensor]:
    if not legacy:
        from safetensors.torch import load_file

        device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
        return load_file(os.path.join(path, WEIGHTS_NAME), device=device)
    weights = os.path.join(path, LEGACY_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise checkpoint.CheckpointError(f"{path}: torn checkpoint: no {WEIGHTS_NAME} (nor the older "
                                         f"{LEGACY_WEIGHTS_NAME})")
    try:
        return torch.load(weights, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch's unpickler errors vary
        raise checkpoint.CheckpointError(f"{weights}: unreadable weights (truncated or not a state dict: "
                                         f"{type(e).__name__})") from None


def _hf_config_dict(config) -> Dict:
    """A transformers config as JSON-able arguments (with ``model_type``) that ``_build_hf_image_encoder`` rebuilds."""
    d = config.to_dict()
    for k in ("transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype", "id2label",
              "label2id", "auto_map"):
        d.pop(k, None)
    d["model_type"] = config.model_type
    return d


def _build_hf_image_encoder(config: "EGMAConfig") -> nn.Module:
    """A transformers vision backbone: by hub id / local directory, or from ``image_config`` with random weights."""
    from transformers import AutoConfig, AutoModel

    from . import hub

    if config.image_model:
        return hub.load_image_encoder_hf(config.image_model)
    if not config.image_config:
        raise ValueError("image_library 'transformers' needs image_model (a hub id or directory) or image_config")
    d = dict(config.image_config)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise ValueError("image_config needs 'model_type' (e.g. 'swin')")
    return AutoModel.from_config(AutoConfig.for_model(model_type, **d))


def _hf_image_features(enc: nn.Module, pixel_values: torch.Tensor, scales, *, pre_norm: bool = False):
    """Patch tokens ``(B, C, gh, gw)`` per requested stage of a transformers hierarchical backbone (Swin),
    and the last stage before and after the final LayerNorm.

    Stage ``-1`` (the last) is ``last_hidden_state``, i.e. after the model's final LayerNorm, as timm's
    ``norm=True`` gives it, or with ``pre_norm`` the last stage's output before it (``hidden_states[-1]``);
    earlier stages are their outputs before patch merging (``reshaped_hidden_states`` with
    ``output_hidden_states_before_downsampling``).
    """
    out = enc(pixel_values=pixel_values, output_hidden_states=True, output_hidden_states_before_downsampling=True)
    stages = out.reshaped_hidden_states[1:]  # [0] is the patch embedding
    if stages is None or len(stages) == 0:
        raise ValueError(f"{type(enc).__name__} returns no per-stage hidden states; use a hierarchical backbone "
                         f"such as Swin")
    n = len(stages)
    resolved = [s if s >= 0 else n + s for s in scales]
    if len(set(resolved)) != len(resolved) or any(not 0 <= r < n for r in resolved):
        raise ValueError(f"scales {list(scales)} must name distinct stages of the {n}-stage image encoder")
    B, C, gh, gw = stages[-1].shape
    post = out.last_hidden_state.transpose(1, 2).reshape(B, C, gh, gw)
    pre = stages[-1]
    feats = [(pre if pre_norm else post) if r == n - 1 else stages[r] for r in resolved]
    return feats, pre, post


_BERT_KEYS = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
              "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id"}


def _loss_dtype(name: str, device: torch.device) -> torch.dtype:
    """``loss_dtype`` as a torch dtype; ``"auto"``: the autocast dtype of ``device`` when autocast is on."""
    if name == "auto":
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return torch.float32
    return getattr(torch, name)


def text_groups(attention_mask: torch.Tensor, groups: int) -> List[Tuple[torch.Tensor, int]]:
    """The sentences in ``groups`` groups of similar length: ``[(rows, width), ...]``, the rows of each group
    (sorted by length, equal counts) and the columns it needs: up to its last attended position (trailing
    padding columns are dropped; nothing else, so a sentence keeps its positions)."""
    n, L = attention_mask.shape
    pos = torch.arange(1, L + 1, device=attention_mask.device)
    last = (attention_mask.ne(0) * pos).amax(1) if n else pos[:0]  # 1 + the last attended position, per row
    order = torch.argsort(last, stable=True)
    parts = [idx for idx in torch.tensor_split(order, min(groups, max(n, 1))) if idx.numel()]
    if not parts:
        return []
    widths = torch.stack([last[idx].max() for idx in parts]).tolist()  # one host read for every group
    return [(idx, max(1, int(w))) for idx, w in zip(parts, widths)]


def padding_saved(attention_mask: torch.Tensor, groups: int) -> Tuple[int, int]:
    """Token positions the text encoder computes for ``attention_mask`` as one padded batch and in
    ``groups`` groups: ``(positions ungrouped, positions grouped)``."""
    return attention_mask.numel(), sum(idx.numel() * w for idx, w in text_groups(attention_mask, groups))


def _grouped(fn, input_ids: torch.Tensor, attention_mask: torch.Tensor, groups: int) -> torch.Tensor:
    """``fn(input_ids, attention_mask)`` -> ``(N, H)`` computed group by group (``text_groups``), rows put
    back in the input's order."""
    if groups <= 1 or input_ids.shape[0] <= 1:
        return fn(input_ids, attention_mask)
    plan = text_groups(attention_mask, groups)
    if len(plan) == 1 and plan[0][1] == input_ids.shape[1]:
        return fn(input_ids, attention_mask)
    outs = [fn(input_ids[idx, :w], attention_mask[idx, :w]) for idx, w in plan]
    rows = torch.cat([idx for idx, _ in plan])
    inverse = torch.empty_like(rows)
    inverse[rows] = torch.arange(rows.numel(), device=rows.device)
    return torch.cat(outs)[inverse]


def _segment_mean(x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    lengths = (cu[1:] - cu[:-1]).long()
    idx = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths.to(x.device))
    out = x.new_zeros(lengths.numel(), x.shape[1]).index_add_(0, idx, x)
    return out / lengths.to(x.device, x.dtype).unsqueeze(1)
