"""Transfer evaluation (SSL-small §2(f), KDEP's transfer): fine-tune or linear-transfer a backbone on a
labelled ImageFolder with model selection on ``val`` and a final ``test`` score — through the one
trainer (:func:`kdforge.engine.trainer.train`), never a second training loop.

* ``mode="finetune"``: the ``supervised`` method on a student initialised from the backbone weights
  (classifier re-initialised); every parameter trains, in train mode (the reference's finetune mode
  got stuck in eval mode after the first validation; here the trainer sets modes).
* ``mode="linear"``: the ``linear_transfer`` method below — backbone frozen and kept in eval mode
  (frozen BN, no dropout), features L2-normalised before the linear layer as in the reference's
  ``Sequential(L2-normalise, fc)``, fc initialised N(0, 0.01) with zero bias (MoCo protocol).
* ``protocol="moco_lincls"``: MoCo's linear evaluation on images, for parity with the paper
  (SSL-small §2(e)): linear mode, no L2 normalisation, SGD lr 30 (momentum 0.9, wd 0), 100 epochs,
  ×0.1 at epochs 60 and 80 (scaled to 60% / 80% of other lengths), RandomResizedCrop(scale 0.08–1)
  + flip. Explicit ``epochs``, ``lr``, ``milestones``, ``gamma`` and ``train_transform`` win over the
  protocol's values.

Both use SGD (momentum 0.9) with a step schedule (×0.1 at 2/3 of training for linear; ×0.2 at 40%
and 70% for finetune, the reference's settings). ``best.pt`` is chosen by val accuracy; the report
gives val-best, test at the val-best checkpoint and test at the last epoch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.config import require
from kdforge.methods import register_method
from kdforge.methods.supervised import Supervised


def classifier_module(model: nn.Module) -> nn.Linear:
    """The final Linear classifier of a timm or torchvision model."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if head is None:
        from kdforge.models.factory import _torchvision_classifier
        head = _torchvision_classifier(model)[1]
    lin = head if isinstance(head, nn.Linear) else [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    return lin


@dataclass
class LinearTransferConfig:
    l2_normalize: bool = True
    label_smoothing: float = 0.0

    def validate(self, prefix: str = "method") -> None:
        require(0 <= self.label_smoothing < 1, f"{prefix}.label_smoothing", "a number in [0, 1)",
                self.label_smoothing)


class LinearTransfer(Supervised):
    """Linear classifier on a frozen backbone kept in eval mode.

    ``logits = fc(normalise(f(x)))`` (or ``fc(f(x))`` without ``l2_normalize``), f = the pooled
    backbone feature (:func:`kdforge.models.taps.pooled_features`), fc ~ N(0, 0.01), bias 0.
    Only fc is trainable, so the default parameter groups hold fc alone.
    """

    Config = LinearTransferConfig

    def __init__(self, cfg, student, teacher=None):
        super().__init__(cfg, student, teacher)
        fc = classifier_module(student)
        for p in student.parameters():
            p.requires_grad_(False)
        for p in fc.parameters():
            p.requires_grad_(True)
        with torch.no_grad():
            fc.weight.normal_(0.0, 0.01)
            if fc.bias is not None:
                fc.bias.zero_()
        object.__setattr__(self, "_fc", fc)

    def train(self, mode: bool = True):
        super().train(mode)
        self.student.eval()                       # frozen BN statistics, dropout off, always
        return self

    def _logits(self, images):
        from kdforge.models.taps import pooled_features
        with torch.no_grad():
            f = pooled_features(self.student, images)
        f = f.float()
        if self.args.l2_normalize:
            f = F.normalize(f, dim=1)
        return self._fc(f.to(self._fc.weight.dtype))

    def training_step(self, batch, step):
        images, labels = batch
        logits = self._logits(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.args.label_smoothing)
        return {"loss": loss, "ce": loss.detach()}

    def predict(self, images):
        return self._logits(images)


register_method("linear_transfer", LinearTransfer)


def transfer(ckpt: str | Path, data_root: str | Path, out: str | Path, mode: str = "linear", *,
             epochs: Optional[int] = None, lr: Optional[float] = None, batch_size: int = 256,
             weight_decay: float = 0.0, milestones: Optional[list] = None, gamma: Optional[float] = None,
             l2_normalize: bool = True, which: str = "best", module: str = "student",
             img_size: Optional[int] = None, train_transform: Optional[str] = None, device: str = "auto",
             seed: int = 0, num_workers: int = 0, progress: bool = True, overrides: Optional[dict] = None,
             protocol: Optional[str] = None) -> dict:
    """Fine-tune (``mode="finetune"``) or linear-transfer (``"linear"``) a backbone; see the module doc.

    Args:
        ckpt, which, module: the source backbone (:func:`kdforge.eval.features.load_backbone`).
        data_root: ImageFolder root with ``train``, ``val`` (model selection) and ``test`` splits.
        out: the transfer run's folder (a kdforge run: config.yaml, metrics.jsonl, best/last.pt).
        epochs, lr, milestones, gamma: defaults — linear: 60 epochs, lr 1.5, ×0.1 at 2/3;
            finetune: 100 epochs, lr 0.01, ×0.2 at 40% and 70%.
        batch_size, weight_decay: SGD settings (momentum 0.9).
        l2_normalize: linear mode's normalisation of the features.
        img_size, train_transform: override the source run's data settings.
        device, seed, num_workers, progress: trainer settings.
        overrides: extra dotted config overrides (``{"train.amp": "bf16"}``).
        protocol: ``None`` (the defaults above) or ``"moco_lincls"`` (see the module doc; linear mode only).

    Returns:
        dict: ``val_best`` (val top-1 % of the selected checkpoint), ``test_at_val_best``,
        ``test_last``, ``epochs``, ``run`` and the ``protocol``; also written to ``OUT/transfer.json``.
    """
    from kdforge.config import Config, from_dict
    from kdforge.engine.trainer import evaluate_run, train
    from kdforge.eval.features import load_backbone
    from kdforge.models import backbone_state_dict
    if mode not in ("linear", "finetune"):
        raise ValueError(f"transfer mode must be 'linear' or 'finetune', got {mode!r}")
    if protocol not in (None, "moco_lincls"):
        raise ValueError(f"transfer protocol must be None or 'moco_lincls', got {protocol!r}")
    if protocol == "moco_lincls":
        if mode != "linear":
            raise ValueError("protocol 'moco_lincls' is a linear evaluation (frozen backbone); use mode='linear'")
        epochs = int(epochs or 100)
        lr = 30.0 if lr is None else lr
        if milestones is None:
            milestones = [max(1, round(epochs * 0.6)), max(2, round(epochs * 0.8))]
        gamma = 0.1 if gamma is None else gamma
        l2_normalize = False
        train_transform = train_transform or "standard"
    root = Path(data_root)
    for split in ("train", "val", "test"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"transfer needs {root}/{split} (ImageFolder); val selects the checkpoint, "
                                    "test is scored once at the end")
    model, data, _ = load_backbone(ckpt, which, module)
    out = Path(out)
    init = out / "init_backbone.safetensors"
    init.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in backbone_state_dict(model).items()}, str(init))
    lib, arch, kw = model.kdforge_spec
    kwargs = {k: v for k, v in kw.items() if k != "img_size"}
    linear = mode == "linear"
    epochs = int(epochs or (60 if linear else 100))
    lr = float(lr if lr is not None else (1.5 if linear else 0.01))
    if milestones is None:
        milestones = [max(1, round(epochs * 2 / 3))] if linear else [max(1, round(epochs * 0.4)),
                                                                      max(2, round(epochs * 0.7))]
    gamma = float(gamma if gamma is not None else (0.1 if linear else 0.2))
    raw = {
        "method": {"name": "linear_transfer", "l2_normalize": l2_normalize} if linear else {"name": "supervised"},
        "data": {"root": str(root), "img_size": int(img_size or data.get("img_size", 224)),
                 "in_chans": int(data.get("in_chans", 3)), "mean": list(data.get("mean", (0.485, 0.456, 0.406))),
                 "std": list(data.get("std", (0.229, 0.224, 0.225))),
                 "eval_crop_pct": float(data.get("eval_crop_pct", 0.875)), "batch_size": batch_size,
                 "train_transform": train_transform or data.get("train_transform", "standard"),
                 "num_workers": num_workers, "val_split": "val", "drop_last": False},
        "model": {"name": model.kdforge_name, "weights": str(init), "kwargs": kwargs},
        "optim": {"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": weight_decay},
        "sched": {"name": "step", "milestones": sorted(int(m) for m in milestones), "gamma": gamma},
        "train": {"epochs": epochs, "seed": seed, "device": device, "val_every": 1, "progress": progress},
        "out": str(out),
    }
    for k, v in (overrides or {}).items():
        node = raw
        *path, leaf = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    cfg = from_dict(Config, raw)
    res = train(cfg)
    test_best = evaluate_run(out, "test", which="best", device=device).get("test/acc1")
    test_last = evaluate_run(out, "test", which="last", device=device).get("test/acc1")
    report = {"mode": mode, "protocol_name": protocol or "default", "ckpt": str(ckpt), "module": module, "data_root": str(root), "run": str(out),
              "val_best": res.best, "test_at_val_best": test_best, "test_last": test_last, "epochs": epochs,
              "protocol": {"optimizer": "SGD momentum 0.9", "lr": lr, "weight_decay": weight_decay,
                           "batch_size": batch_size, "milestones": list(milestones), "gamma": gamma,
                           "l2_normalize": l2_normalize if linear else None,
                           "frozen_backbone_eval_mode": linear, "selection": "val top-1 (best.pt)",
                           "train_transform": raw["data"]["train_transform"]}}
    (out / "transfer.json").write_text(json.dumps(report, indent=2))
    return report
