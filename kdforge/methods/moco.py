"""``moco``: MoCo-v2 and the improved recipe for small backbones (SSL-small).

Shi et al., "On the Efficacy of Small Self-Supervised Contrastive Models without Distillation
Signals" (AAAI 2022), built on He et al., MoCo (CVPR 2020) and Chen et al., MoCo-v2 (2020);
``shared/methods/sslsmall.md`` §1.

* query encoder = the student backbone (built without classifier; its pooled feature is the
  representation) + a projection head (``wide`` d→2d→D, ``simple`` d→d→D, ``deep``, ``none``);
* key encoder = a copy of both, updated by EMA over parameters only, θ_k ← m·θ_k + (1−m)·θ_q,
  after every optimizer step (equivalent to the reference's update at the start of each forward);
* a queue of K normalised keys (K a multiple of the global batch, checked before the first step);
* loss = :func:`kdforge.losses.moco.moco_infonce` with temperature T on two augmented views;
* BatchNorm: ``shuffle`` (Shuffle-BN across ranks; in one process the key batch is shuffled and
  encoded in ``bn_splits`` groups), ``sync`` (SyncBatchNorm in both encoders, no shuffle; needs a
  distributed CUDA run to matter) or ``none``.

Warm start (``init_from=RUN``, e.g. a SEED run): the trainer loads every matching key; then, before
the first step, this method copies the query encoder into the key encoder and resets the queue
(``method.keep_queue=true`` keeps what was loaded), logs what it did and writes
``RUN/init_from.json``. Resuming a run (``resume=true``) never does this.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.config import ConfigError, require
from kdforge.engine import distributed as D
from kdforge.engine.ema import ema_update_
from kdforge.losses.moco import KeyQueue, moco_infonce, positive_rank_accuracy
from kdforge.methods.base import Method
from kdforge.methods.moco_knn import KNNMonitor
from kdforge.models.projectors import MOCO_HEADS, MoCoHead
from kdforge.models.shuffle_bn import chunked_forward, shuffled_forward

log = logging.getLogger("kdforge")


@torch.no_grad()
def backbone_out_dim(backbone: nn.Module, in_chans: int, img_size: int) -> int:
    """Width of what ``backbone(x)`` returns, measured with one dummy forward in eval mode (timm's
    ``num_features`` is not the pooled output width for e.g. MobileNetV3, whose conv head widens it)."""
    was = backbone.training
    backbone.eval()
    try:
        p = next(backbone.parameters(), None)
        x = torch.zeros(1, in_chans, img_size, img_size, device=p.device if p is not None else "cpu")
        out = backbone(x)
    finally:
        backbone.train(was)
    if out.ndim != 2:
        raise ValueError(f"the backbone returns {tuple(out.shape)}; expected pooled features (N, d) — build it "
                         "with num_classes=0")
    return int(out.shape[1])


def freeze_patch_embed_(model: nn.Module) -> int:
    """Freeze a ViT's patch embedding at its random init (MoCo-v3 trick used for vit_tiny in the
    reference). Returns the number of frozen tensors (0 for CNNs)."""
    n = 0
    for name, p in model.named_parameters():
        if name.startswith("patch_embed."):
            p.requires_grad_(False)
            n += 1
    return n


@dataclass
class MoCoConfig:
    dim: int = 128                       # D, the embedding (projection output) dimension
    queue_size: int = 65536              # K, a multiple of the global batch
    momentum: float = 0.999              # key-encoder EMA momentum m
    temperature: float = 0.1             # T (0.2 in MoCo-v2)
    head: str = "wide"                   # wide | simple | deep | dropout | none | identity
    bn: Literal["shuffle", "sync", "none"] = "shuffle"
    bn_splits: int = 1                   # per-process BN groups (emulates several GPUs in one process)
    aug: Literal["improved", "mocov2"] = "improved"
    cj: Optional[float] = None           # colour-jitter strength (None: the aug preset's)
    grey_p: Optional[float] = None       # RandomGrayscale p (None: the preset's; improved 0.5, mocov2 0.2)
    blur_p: Optional[float] = None       # Gaussian blur p (None: the preset's, 0.5)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    flip_p: float = 0.5
    freeze_patch_embed: bool = False     # ViTs: keep the patch embedding at its random init
    keep_queue: bool = False             # init_from: keep the loaded queue instead of resetting it
    knn_k: int = 20                      # online weighted kNN monitor (every train.val_every epochs)
    knn_temperature: float = 0.07
    knn_gallery: Literal["train", "val"] = "train"
    knn_max_gallery: int = 50000

    def validate(self, prefix: str = "method") -> None:
        require(self.dim > 0, f"{prefix}.dim", "a positive integer", self.dim)
        require(self.queue_size > 0, f"{prefix}.queue_size", "a positive integer", self.queue_size)
        require(0 <= self.momentum < 1, f"{prefix}.momentum", "a number in [0, 1)", self.momentum)
        require(self.temperature > 0, f"{prefix}.temperature", "a positive number", self.temperature)
        require(self.head in MOCO_HEADS, f"{prefix}.head", " | ".join(MOCO_HEADS), self.head)
        require(self.bn_splits >= 1, f"{prefix}.bn_splits", "an integer >= 1", self.bn_splits)
        for key in ("grey_p", "blur_p", "flip_p"):
            v = getattr(self, key)
            if v is not None:
                require(0 <= v <= 1, f"{prefix}.{key}", "a probability in [0, 1]", v)
        if self.cj is not None:
            require(self.cj >= 0, f"{prefix}.cj", "a number >= 0", self.cj)
        lo, hi = self.crop_scale
        require(0 < lo <= hi <= 1, f"{prefix}.crop_scale", "(lo, hi) with 0 < lo <= hi <= 1", list(self.crop_scale))
        require(self.knn_k > 0, f"{prefix}.knn_k", "a positive integer", self.knn_k)
        require(self.knn_temperature > 0, f"{prefix}.knn_temperature", "a positive number", self.knn_temperature)


def moco_view_from_config(args, data_cfg, preset: Optional[str] = None):
    """One MoCo view transform from a method config (``aug``, ``cj``, ``grey_p``, ``blur_p``,
    ``crop_scale``, ``flip_p``) and the data config (``img_size``, ``mean``, ``std``)."""
    from kdforge.data.ssl_transforms import moco_preset_transform
    over = dict(img_size=data_cfg.img_size, mean=data_cfg.mean, std=data_cfg.std,
                scale=tuple(args.crop_scale), flip_p=args.flip_p)
    if args.cj is not None:
        over.update(cj=args.cj, jitter=None)
    if args.grey_p is not None:
        over["grey_p"] = args.grey_p
    if args.blur_p is not None:
        over["blur_p"] = args.blur_p
    return moco_preset_transform(preset or args.aug, **over)


def _init_from_file(init_from: str) -> Path:
    """The checkpoint file the trainer reads for ``init_from`` (best.pt if present, else last.pt)."""
    from kdforge.engine.checkpoint import available, find_checkpoint
    return find_checkpoint(init_from, available(init_from, "best"))


class MoCo(Method):
    """MoCo with momentum key encoder, key queue and Shuffle-BN (see the module docstring).

    State: ``student`` (query backbone), ``head``, ``key_backbone``, ``key_head`` (no gradients) and
    ``queue`` (:class:`KeyQueue`). Batches are ``([view_q, view_k], labels)``, labels unused."""

    Config = MoCoConfig
    student_head = False
    unlabeled_ok = True
    best_metric = "val/knn_acc1"

    def __init__(self, cfg, student: nn.Module, teacher: Optional[nn.Module] = None):
        super().__init__(cfg, student, teacher)
        a = self.args
        if cfg is not None and not cfg.data.drop_last:
            raise ConfigError("data.drop_last: moco needs drop_last=true (every global batch must fill a "
                              "whole block of the queue)")
        if a.freeze_patch_embed:
            freeze_patch_embed_(self.student)
        in_chans = cfg.data.in_chans if cfg is not None else 3
        img_size = cfg.data.img_size if cfg is not None else 224
        self.feat_dim = backbone_out_dim(self.student, in_chans, img_size)
        self.head = MoCoHead(self.feat_dim, a.dim, a.head)
        if a.bn == "sync" and D.is_dist() and D.get_world_size() > 1:
            dev = cfg.train.device if cfg is not None else "auto"
            if dev in ("cpu", "mps") or (dev == "auto" and not torch.cuda.is_available()):
                raise ConfigError("method.bn: 'sync' (SyncBatchNorm) needs CUDA devices in a distributed run; "
                                  "use method.bn=shuffle on CPU")
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
        self.key_backbone = copy.deepcopy(self.student)
        self.key_head = copy.deepcopy(self.head)
        for p in list(self.key_backbone.parameters()) + list(self.key_head.parameters()):
            p.requires_grad_(False)
        self.queue = KeyQueue(self.head.out_dim, a.queue_size)
        self._pending: list[Tensor] = []
        self.knn = KNNMonitor(cfg, a.knn_k, a.knn_temperature, a.knn_gallery, a.knn_max_gallery)

    # -- data -----------------------------------------------------------------------------------
    @classmethod
    def train_transform(cls, cfg):
        """Two independent MoCo views per image (``method.aug`` preset + knobs)."""
        from kdforge.data.ssl_transforms import two_views
        return two_views(moco_view_from_config(cfg.method_args(), cfg.data))

    # -- encoders -------------------------------------------------------------------------------
    def _query(self, images: Tensor) -> Tensor:
        return self.head(self.student(images))

    def _key(self, images: Tensor) -> Tensor:
        return self.key_head(self.key_backbone(images))

    def _splits(self) -> int:
        return self.args.bn_splits if self.args.bn == "shuffle" else 1

    def embed(self, images: Tensor) -> Tensor:
        """The representation: the query backbone's pre-projection feature (N, d)."""
        return self.student(images)

    # -- training -------------------------------------------------------------------------------
    def training_step(self, batch, step: int) -> dict[str, Tensor]:
        views, _ = batch
        im_q, im_k = views[0], views[1]
        q = F.normalize(chunked_forward(self._query, im_q, self._splits()), dim=1)
        with torch.no_grad():
            if self.args.bn == "shuffle":
                k = shuffled_forward(self._key, im_k, self._splits())
            else:
                k = self._key(im_k)
            k = F.normalize(k.float(), dim=1)
        loss, logits = moco_infonce(q, k, self.queue.keys, self.args.temperature)
        self._pending.append(D.all_gather_cat(k))
        acc1, acc5 = positive_rank_accuracy(logits, (1, 5))
        return {"loss": loss, "inst_acc1": acc1, "inst_acc5": acc5}

    @torch.no_grad()
    def momentum_update(self) -> None:
        """θ_k ← m·θ_k + (1−m)·θ_q over the parameters of backbone and head (BN statistics of the
        key encoder come from its own forward passes)."""
        m = self.args.momentum
        ema_update_(self.key_backbone, self.student, m, buffers=False)
        ema_update_(self.key_head, self.head, m, buffers=False)

    def on_after_optimizer_step(self, step: int) -> None:
        self.momentum_update()
        for keys in self._pending:
            self.queue.enqueue(keys)
        self._pending.clear()

    def on_train_start(self, steps_per_epoch: int, epochs: int) -> None:
        super().on_train_start(steps_per_epoch, epochs)
        if self.cfg is None:
            return
        self.queue.check_batch(self.cfg.data.batch_size * D.get_world_size())
        resuming = bool(self.cfg.resume) and (Path(self.cfg.out) / "last.pt").exists()
        if self.cfg.init_from and not resuming:
            self.warm_start(self.cfg.init_from)

    @torch.no_grad()
    def warm_start(self, source: str) -> dict:
        """Finish an ``init_from`` warm start (after the trainer loaded the matching keys): key
        encoder ← query encoder, queue reset unless ``keep_queue``. Logs and returns a report, and
        writes it to ``RUN/init_from.json`` on the main process."""
        self.key_backbone.load_state_dict(self.student.state_dict())
        self.key_head.load_state_dict(self.head.state_dict())
        try:
            f = _init_from_file(source)
            src = torch.load(f, map_location="cpu", weights_only=False, mmap=True)
            keys = set(src.get("model", {}))
            src_method = src.get("method")
        except (FileNotFoundError, RuntimeError, OSError):
            f, keys, src_method = Path(source), set(), None
        own = self.state_dict()
        loaded = lambda prefix: sorted(k for k in own if k.startswith(prefix) and k in keys)  # noqa: E731
        if self.args.keep_queue:
            queue = "kept as loaded" if "queue.keys" in keys else "kept (the source has no queue: random init)"
        else:
            g = torch.Generator().manual_seed(self.cfg.train.seed if self.cfg is not None else 0)
            self.queue.keys.copy_(F.normalize(torch.randn(self.queue.keys.shape, generator=g), dim=1))
            self.queue.ptr.zero_()
            queue = "reset to random keys" + (" (the source's queue was discarded)" if "queue.keys" in keys else "")
        report = {"init_from": str(source), "checkpoint": str(f), "source_method": src_method,
                  "query_backbone_tensors_loaded": len(loaded("student.")),
                  "query_backbone_tensors": sum(1 for k in own if k.startswith("student.")),
                  "head_tensors_loaded": len(loaded("head.")),
                  "head_tensors": sum(1 for k in own if k.startswith("head.")),
                  "key_encoder": "copied from the query encoder", "queue": queue}
        log.info("moco warm start from %s: query backbone %d/%d tensors, head %d/%d; key encoder copied "
                 "from query; queue %s", source, report["query_backbone_tensors_loaded"],
                 report["query_backbone_tensors"], report["head_tensors_loaded"], report["head_tensors"], queue)
        if self.cfg is not None and D.is_main():
            out = Path(self.cfg.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "init_from.json").write_text(json.dumps(report, indent=2))
        return report

    # -- evaluation -----------------------------------------------------------------------------
    def predict(self, images: Tensor) -> Tensor:
        return self.embed(images)

    @torch.no_grad()
    def evaluate(self, loader, device: torch.device, amp_ctx=None) -> dict[str, float]:
        """Weighted kNN accuracy (%) of the pre-projection feature on the labelled val split."""
        was = self.training
        self.eval()
        try:
            return self.knn(self.embed, loader, device, amp_ctx)
        finally:
            self.train(was)
