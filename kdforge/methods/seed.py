"""``seed``: SEED self-supervised distillation (the warm start of the SSL-small recipe).

Fang et al., "SEED: Self-supervised Distillation For Visual Representation" (ICLR 2021). The
student (backbone + projection head) learns to match the frozen teacher's similarity distribution
over a queue of teacher embeddings (:func:`kdforge.losses.seed.seed_loss`, student temperature
τ_S = 0.2, teacher temperature τ_T = 1e-4 as in the reference code); the queue then receives the
teacher embeddings of the batch. One MoCo-v2-augmented view per image.

Teacher embedding (``method.teacher_embedding``):

* ``head`` — pooled backbone feature → the teacher run's own projection head (a kdforge ``moco``
  or ``seed`` run given as ``teacher.checkpoint``), as SEED uses MoCo/SimCLR/SwAV outputs;
* ``features`` — the pooled backbone feature (any teacher, e.g. a supervised run or a weights file);
* ``auto`` — ``head`` when the teacher run holds one, else ``features``.

The student head maps the student feature to the teacher embedding's width. Warm-starting
``moco`` from a SEED run: ``init_from=RUN`` (see :mod:`kdforge.methods.moco`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.config import ConfigError, require
from kdforge.engine import distributed as D
from kdforge.losses.moco import KeyQueue
from kdforge.losses.seed import seed_loss
from kdforge.methods.base import Method
from kdforge.methods.moco import backbone_out_dim, moco_view_from_config
from kdforge.methods.moco_knn import KNNMonitor
from kdforge.models.projectors import MOCO_HEADS, MoCoHead

log = logging.getLogger("kdforge")


class TeacherEmbedder(nn.Module):
    """Frozen teacher embedding: pooled feature of ``backbone`` (classifier skipped), then ``head``
    if given. (N, C, H, W) -> (N, D_T)."""

    def __init__(self, backbone: nn.Module, head: Optional[nn.Module] = None):
        super().__init__()
        self.backbone = backbone
        self.head = head if head is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        from kdforge.models.taps import pooled_features
        return self.head(pooled_features(self.backbone, x))


def load_run_head(run: str, in_dim: int) -> Optional[MoCoHead]:
    """The projection head (``head.*``) of a kdforge ``moco``/``seed`` run, or None if it has none."""
    from kdforge.engine.checkpoint import available, load_checkpoint
    from kdforge.models.checkpoint import load_state_dict_checked
    ck = load_checkpoint(run, available(run, "best"))
    state = {k[len("head."):]: v for k, v in ck["model"].items() if k.startswith("head.")}
    if not state:
        return None
    m = ck["config"]["method"]
    kind = m.get("head", "wide" if m.get("name") == "moco" else "simple")
    last = max(int(k.split(".")[0]) for k in state if k.endswith("weight"))
    head = MoCoHead(in_dim, state[f"{last}.weight"].shape[0], kind)
    load_state_dict_checked(head, state, strict=True, source=f"teacher head of {run}")
    return head


@dataclass
class SEEDConfig:
    queue_size: int = 65536              # K, a multiple of the global batch
    student_temperature: float = 0.2     # τ_S
    teacher_temperature: float = 1e-4    # τ_T
    head: str = "simple"                 # student head (SEED's --student_mlp: d→d→D)
    teacher_embedding: Literal["auto", "head", "features"] = "auto"
    aug: Literal["improved", "mocov2"] = "mocov2"
    cj: Optional[float] = None
    grey_p: Optional[float] = None
    blur_p: Optional[float] = None
    crop_scale: tuple[float, float] = (0.2, 1.0)
    flip_p: float = 0.5
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_gallery: Literal["train", "val"] = "train"
    knn_max_gallery: int = 50000

    def validate(self, prefix: str = "method") -> None:
        require(self.queue_size > 0, f"{prefix}.queue_size", "a positive integer", self.queue_size)
        require(self.student_temperature > 0, f"{prefix}.student_temperature", "a positive number",
                self.student_temperature)
        require(self.teacher_temperature > 0, f"{prefix}.teacher_temperature", "a positive number",
                self.teacher_temperature)
        require(self.head in MOCO_HEADS, f"{prefix}.head", " | ".join(MOCO_HEADS), self.head)
        for key in ("grey_p", "blur_p", "flip_p"):
            v = getattr(self, key)
            if v is not None:
                require(0 <= v <= 1, f"{prefix}.{key}", "a probability in [0, 1]", v)
        lo, hi = self.crop_scale
        require(0 < lo <= hi <= 1, f"{prefix}.crop_scale", "(lo, hi) with 0 < lo <= hi <= 1", list(self.crop_scale))
        require(self.knn_k > 0, f"{prefix}.knn_k", "a positive integer", self.knn_k)


class SEED(Method):
    """SEED distillation: student backbone + head vs a frozen teacher embedding over a queue.

    State: ``student`` (backbone), ``head``, ``queue`` (teacher embeddings). Batches are
    ``(images, labels)``, labels unused."""

    Config = SEEDConfig
    needs_teacher = True
    student_head = False
    unlabeled_ok = True
    best_metric = "val/knn_acc1"

    def __init__(self, cfg, student: nn.Module, teacher: Optional[nn.Module] = None):
        super().__init__(cfg, student, teacher)
        a = self.args
        if cfg is not None and not cfg.data.drop_last:
            raise ConfigError("data.drop_last: seed needs drop_last=true (every global batch must fill a "
                              "whole block of the queue)")
        in_chans = cfg.data.in_chans if cfg is not None else 3
        img_size = cfg.data.img_size if cfg is not None else 224
        self.feat_dim = backbone_out_dim(self.student, in_chans, img_size)
        if teacher is not None:
            self.set_teacher(self._teacher_embedder(teacher, in_chans, img_size))
            t_dim = backbone_out_dim(self.teacher, in_chans, img_size)
        else:  # rebuilt without teacher (evaluation): load_state_dict adopts the checkpoint's width
            t_dim = 128
        self._build_head(t_dim)
        self._pending: list[Tensor] = []
        self.knn = KNNMonitor(cfg, a.knn_k, a.knn_temperature, a.knn_gallery, a.knn_max_gallery)

    def _build_head(self, t_dim: int) -> None:
        self.head = MoCoHead(self.feat_dim, t_dim, self.args.head)
        self.queue = KeyQueue(t_dim, self.args.queue_size)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Without a teacher (a run rebuilt for evaluation) the head and queue take the width of
        the checkpoint's queue before loading."""
        qk = state_dict.get("queue.keys")
        if self.teacher is None and qk is not None and tuple(qk.shape) != tuple(self.queue.keys.shape):
            self.queue = KeyQueue(qk.shape[1], qk.shape[0])
            self.head = MoCoHead(self.feat_dim, qk.shape[1], self.args.head)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _teacher_embedder(self, teacher: nn.Module, in_chans: int, img_size: int) -> TeacherEmbedder:
        mode = self.args.teacher_embedding
        run = self.cfg.teacher.checkpoint if self.cfg is not None and self.cfg.teacher is not None else None
        head = None
        if mode in ("auto", "head") and run:
            in_dim = backbone_out_dim(TeacherEmbedder(teacher), in_chans, img_size)
            head = load_run_head(run, in_dim)
        if mode == "head" and head is None:
            raise ConfigError("method.teacher_embedding: 'head' needs teacher.checkpoint to be a kdforge moco/seed "
                              "run with a projection head; use 'features' for other teachers")
        log.info("seed: teacher embedding = %s", "pooled feature + the run's projection head" if head is not None
                 else "pooled backbone feature")
        return TeacherEmbedder(teacher, head)

    @classmethod
    def train_transform(cls, cfg):
        """One MoCo-style view per image (``method.aug`` preset, MoCo-v2 by default)."""
        return moco_view_from_config(cfg.method_args(), cfg.data)

    def training_step(self, batch, step: int) -> dict[str, Tensor]:
        images, _ = batch
        s = F.normalize(self.head(self.student(images)), dim=1)
        with torch.no_grad():
            t = F.normalize(self.teacher(images).float(), dim=1)
        loss, s_logits, t_probs = seed_loss(s, t, self.queue.keys, self.args.student_temperature,
                                            self.args.teacher_temperature)
        self._pending.append(D.all_gather_cat(t))
        with torch.no_grad():
            agree = (s_logits.argmax(1) == t_probs.argmax(1)).float().mean() * 100.0
        return {"loss": loss, "top1_agree": agree}

    def on_after_optimizer_step(self, step: int) -> None:
        for keys in self._pending:
            self.queue.enqueue(keys)
        self._pending.clear()

    def on_train_start(self, steps_per_epoch: int, epochs: int) -> None:
        super().on_train_start(steps_per_epoch, epochs)
        if self.cfg is not None:
            self.queue.check_batch(self.cfg.data.batch_size * D.get_world_size())

    def embed(self, images: Tensor) -> Tensor:
        """The representation: the student backbone's pre-projection feature (N, d)."""
        return self.student(images)

    def predict(self, images: Tensor) -> Tensor:
        return self.embed(images)

    @torch.no_grad()
    def evaluate(self, loader, device: torch.device, amp_ctx=None) -> dict[str, float]:
        """Weighted kNN accuracy (%) of the student's pre-projection feature on the labelled val split."""
        was = self.training
        self.eval()
        try:
            return self.knn(self.embed, loader, device, amp_ctx)
        finally:
            self.train(was)
