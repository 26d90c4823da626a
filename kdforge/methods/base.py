"""The method contract: what the one trainer needs from every method.

A method is an ``nn.Module`` that owns the student and every trainable extra (heads, projectors,
momentum encoders, queues as buffers). The frozen teacher is *not* a submodule: it is kept aside
(never in the method's ``state_dict``, never wrapped in DDP), moved to the device by the trainer,
kept in ``eval()`` mode and run under ``torch.no_grad()``.

Subclasses define:

* ``Config`` — a dataclass of the method's hyper-parameters (the YAML ``method:`` section);
* ``training_step(batch, step) -> {"loss": total, "<term>": value, ...}``;

and optionally override ``on_after_optimizer_step``, ``param_groups``, ``export_backbone``,
``evaluate``, ``train_transform``, ``build_batch_sampler``, ``on_train_start``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import Tensor, nn


@dataclass
class EmptyConfig:
    """A method without hyper-parameters."""


def param_groups_weight_decay(named_params, weight_decay: float, no_decay_names: set[str] = frozenset(),
                              lr_scale: float = 1.0) -> list[dict]:
    """Split parameters into decayed / not decayed groups.

    No weight decay on 1-D tensors (norm weights, biases), on tokens/embeddings named in
    ``no_decay_names`` (e.g. ``cls_token``, ``pos_embed``) and on parameters whose attribute
    ``_no_weight_decay`` is true (set by modules such as the orthogonal projector).
    """
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        leaf = name.split(".")[-1]
        if (p.ndim <= 1 or leaf in no_decay_names or name in no_decay_names
                or getattr(p, "_no_weight_decay", False) or leaf.endswith("_token") or "pos_embed" in leaf):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale, "no_decay": True})
    return groups


class Method(nn.Module):
    """Base class of every training method. See the module docstring for the contract."""

    Config: ClassVar[type] = EmptyConfig
    needs_teacher: ClassVar[bool] = False
    #: False for self-supervised methods: the student is built without a classifier head.
    student_head: ClassVar[bool] = True
    #: True when the training split may be an unlabeled image folder.
    unlabeled_ok: ClassVar[bool] = False
    #: True when the student is not the plain backbone (a detector, a segmenter): ``kdforge export``
    #: then rebuilds the method from the run and takes :meth:`export_backbone`.
    export_via_method: ClassVar[bool] = False
    #: the validation metric used to keep the ``best`` checkpoint (higher is better).
    best_metric: ClassVar[str] = "val/acc1"

    def __init__(self, cfg, student: nn.Module, teacher: Optional[nn.Module] = None):
        super().__init__()
        self.cfg = cfg
        self.args = cfg.method_args() if cfg is not None else self.Config()
        self.student = student
        self.set_teacher(teacher)
        self.epoch = 0
        self.steps_per_epoch = 1
        self.total_steps = 1

    # -- teacher kept outside the module tree ------------------------------------------------
    def set_teacher(self, teacher: Optional[nn.Module]) -> None:
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        object.__setattr__(self, "_teacher", teacher)

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self._teacher

    def train(self, mode: bool = True):
        super().train(mode)
        if self._teacher is not None:
            self._teacher.eval()  # a frozen teacher never leaves eval mode
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self._teacher is not None:
            self._teacher._apply(fn)
        return self

    # -- contract ----------------------------------------------------------------------------
    def forward(self, batch: Any, step: int) -> dict[str, Tensor]:
        """DDP calls ``forward``; it is the training step."""
        return self.training_step(batch, step)

    def training_step(self, batch: Any, step: int) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def on_train_start(self, steps_per_epoch: int, epochs: int) -> None:
        """Called once before the first step (and after resume) with the schedule length."""
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * epochs

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def on_after_optimizer_step(self, step: int) -> None:
        """EMA / momentum encoders, queues. ``step`` is the step just taken (0-based)."""

    def no_weight_decay_names(self) -> set[str]:
        fn = getattr(self.student, "no_weight_decay", None)
        names = set(fn()) if callable(fn) else set()
        return {"student." + n for n in names} | names

    def param_groups(self) -> list[dict]:
        """Trainable parameter groups. Default: every trainable parameter of the method, with no
        weight decay on norms, biases, tokens and parameters marked ``_no_weight_decay``."""
        wd = self.cfg.optim.weight_decay if self.cfg is not None else 0.0
        return param_groups_weight_decay(self.named_parameters(), wd, self.no_weight_decay_names())

    def export_backbone(self) -> dict[str, Tensor]:
        """Student weights with timm/torchvision keys, without the classifier head."""
        from kdforge.models import backbone_state_dict
        return backbone_state_dict(self.student)

    # -- evaluation --------------------------------------------------------------------------
    def predict(self, images: Tensor) -> Tensor:
        """Class logits for evaluation (default: the student)."""
        return self.student(images)

    @torch.no_grad()
    def evaluate(self, loader, device: torch.device, amp_ctx: Callable = None) -> dict[str, float]:
        """Top-1 accuracy (%) of :meth:`predict` over ``loader`` (labelled)."""
        if not self.student_head:
            return {}
        was_training = self.training
        self.eval()
        correct, total = torch.zeros((), device=device), torch.zeros((), device=device)
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if amp_ctx is not None:
                with amp_ctx():
                    logits = self.predict(images)
            else:
                logits = self.predict(images)
            correct += (logits.argmax(-1) == labels).sum()
            total += labels.numel()
        from kdforge.engine.distributed import all_reduce_sum
        correct, total = all_reduce_sum(correct), all_reduce_sum(total)
        self.train(was_training)
        return {"val/acc1": 100.0 * correct.item() / max(total.item(), 1)}

    # -- data hooks ---------------------------------------------------------------------------
    @classmethod
    def train_transform(cls, cfg) -> Callable:
        """Transform applied to each training image (PIL -> whatever ``training_step`` expects)."""
        from kdforge.data.transforms import build_train_transform
        return build_train_transform(cfg.data)

    @classmethod
    def build_batch_sampler(cls, cfg, dataset, seed: int, rank: int, world: int):
        """Return a custom batch sampler (with ``set_epoch``) or None for the default shuffled one."""
        return None

    @classmethod
    def build_dataset(cls, cfg, split: str, train: bool):
        """The method's own dataset for ``split`` (detection, segmentation...), or None for the default
        ImageFolder reader. Called for the train split first; when that is not None, it is called for
        the val/test splits too, and None there means "no such split". The dataset needs ``classes``,
        ``set_seed(seed, epoch)`` and ``corrupt_count``."""
        return None

    @classmethod
    def collate_fn(cls, cfg) -> Optional[Callable]:
        """The DataLoader collate function (train and eval loaders); None = torch's default."""
        return None

    @classmethod
    def build_teacher(cls, cfg, num_classes: int) -> Optional[nn.Module]:
        """The frozen teacher (default: ``cfg.teacher`` built by the trainer's ``build_teacher``)."""
        from kdforge.engine.trainer import build_teacher
        return build_teacher(cfg, num_classes)
