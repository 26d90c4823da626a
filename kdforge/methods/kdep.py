"""KDEP — knowledge distillation as efficient pre-training (He et al., CVPR 2022).

The student regresses the frozen teacher's pooled *pre-activation* feature after non-parametric
alignment; no labels and no logits are used::

    f_T = GAP(pre-act map of the teacher's last block)            (B, D_T), no gradient, eval mode
    f_S = GAP(pre-act map of the student's last block)            (B, k),   k = student feature width
    t   = PTS((f_T - mu) @ V[:, :k])                              SVD (PCA) alignment + PTS
    loss = w * mean_{b,j} (f_S[b,j] - t[b,j])^2                   w = 3 (MS teacher), 20 (supervised)

``mu`` and ``V`` come from ``kdforge kdep-svd`` (:class:`kdforge.align.svd.SVDAligner` file, given as
``method.svd``) and live in the method as buffers (checkpointed, moved with the device).

Ablations (``method.alignment`` × ``method.pts``):

* ``svd`` + PTS — KDEP (default); ``svd`` without PTS — "SVD only";
* ``channels`` — the k teacher channels of largest variance, centred (non-parametric, no rotation);
  with PTS and ``alignment: none`` (equal widths) these are the "PTS only" variants;
* ``regressor`` — the parametric baseline of Fig. 2(a): a learnable ``Linear(k, D_T)`` on the student
  feature regresses the (optionally PTS-scaled) raw teacher feature. A 1×1 conv on the map followed by
  GAP equals a linear layer on the pooled feature (both are linear), so one module covers both.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from torch import Tensor, nn

from kdforge.config import ConfigError, require
from kdforge.losses.kdep import PTS_POWER, PTS_TEMPERATURE, kdep_feature_loss, pts
from kdforge.methods.base import Method, param_groups_weight_decay

log = logging.getLogger("kdforge")

# AlexNet-style PCA lighting noise (Krizhevsky et al. 2012), the ImageNet RGB eigen-decomposition
# used by fb.resnet.torch and robustness' TRAIN_TRANSFORMS_IMAGENET.
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                       (-0.5808, -0.0045, -0.8140),
                       (-0.5836, -0.6948, 0.4203))


class Lighting:
    """PCA lighting noise on a (3, H, W) tensor in [0, 1]: ``img + eigvec @ (alpha * eigval)``,
    ``alpha ~ N(0, alpha_std)`` per image (torch RNG, so per-sample seeding applies)."""

    def __init__(self, alpha_std: float = 0.05):
        self.alpha_std = alpha_std
        self.eigval = torch.tensor(IMAGENET_PCA_EIGVAL)
        self.eigvec = torch.tensor(IMAGENET_PCA_EIGVEC)

    def __call__(self, img: Tensor) -> Tensor:
        if self.alpha_std == 0 or img.shape[0] != 3:
            return img
        alpha = torch.randn(3) * self.alpha_std
        rgb = (self.eigvec * alpha[None, :] * self.eigval[None, :]).sum(1)
        return img + rgb[:, None, None]

    def __repr__(self) -> str:
        return f"Lighting(alpha_std={self.alpha_std})"


def kdep_reference_transform(img_size: int, mean, std) -> Callable:
    """KDEP's pre-training augmentation: RandomResizedCrop, flip, ColorJitter(0.1, 0.1, 0.1),
    ToTensor, Lighting(0.05), clamp to [0, 1], normalise."""
    from torchvision import transforms as T
    return T.Compose([
        T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BILINEAR),
        T.RandomHorizontalFlip(),
        T.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1),
        T.ToTensor(),
        Lighting(0.05),
        T.Lambda(lambda x: x.clamp(0.0, 1.0)),
        T.Normalize(mean=list(mean), std=list(std)),
    ])


@dataclass
class KDEPConfig:
    svd: Optional[str] = None              # SVD statistics from `kdforge kdep-svd` (svd / channels alignment)
    alignment: Literal["svd", "channels", "none", "regressor"] = "svd"
    pts: bool = True                       # power temperature scaling of the aligned target
    pts_temperature: float = PTS_TEMPERATURE
    pts_power: float = PTS_POWER
    loss_weight: float = 3.0               # w: 3 for the MS (multi-task) R50 teacher, 20 for a supervised one
    k: Optional[int] = None                # aligned width; default (and only legal value): the student's width
    augment: Literal["data", "reference"] = "data"   # reference: RRC + flip + jitter 0.1 + lighting 0.05
    decay_all: bool = True                 # weight decay on every parameter (BN, bias too), as KDEP

    def validate(self, prefix: str = "method") -> None:
        require(self.pts_temperature > 0, f"{prefix}.pts_temperature", "a positive number", self.pts_temperature)
        require(self.pts_power > 0, f"{prefix}.pts_power", "a positive number", self.pts_power)
        require(self.loss_weight > 0, f"{prefix}.loss_weight", "a positive number", self.loss_weight)
        if self.k is not None:
            require(self.k > 0, f"{prefix}.k", "a positive integer", self.k)
        if self.alignment in ("svd", "channels"):
            require(bool(self.svd), f"{prefix}.svd", "the SVD statistics file made by 'kdforge kdep-svd TEACHER "
                    "DATA OUT' (needed by alignment svd/channels)", self.svd)


class KDEP(Method):
    """Feature distillation of pooled pre-activation features with SVD (PCA) alignment + PTS."""

    Config = KDEPConfig
    needs_teacher = True
    student_head = False
    unlabeled_ok = True
    best_metric = "val/cos"

    def __init__(self, cfg, student: nn.Module, teacher: Optional[nn.Module] = None):
        super().__init__(cfg, student, teacher)
        from kdforge.align.svd import SVDAligner
        from kdforge.models.preact import PreActTap, preact_dim
        a = self.args
        self.k = preact_dim(student)
        if a.k is not None and a.k != self.k:
            raise ConfigError(f"method.k: {a.k} but the student {getattr(student, 'kdforge_name', '')} has "
                              f"{self.k}-d pooled features; KDEP aligns the teacher to the student's width "
                              "(leave method.k unset)")
        self._student_tap = PreActTap(student)
        self.aligner: Optional[SVDAligner] = None
        self.regressor: Optional[nn.Linear] = None
        self.svd_meta: dict = {}
        t_dim = preact_dim(teacher) if teacher is not None else None
        if a.alignment in ("svd", "channels"):
            path = Path(a.svd)
            if path.exists():
                full = SVDAligner.load(path)
                self.svd_meta = dict(full.meta)
                if t_dim is not None and full.dim != t_dim:
                    raise ConfigError(f"method.svd: statistics of {full.dim}-d features but the teacher has "
                                      f"{t_dim}-d pooled features; recompute them with this teacher")
                if a.alignment == "svd":
                    self.aligner = full.truncated(self.k).float()
                else:
                    idx = full.top_variance_channels(self.k)
                    eye = torch.eye(full.dim, dtype=full.V.dtype)[:, idx]   # selection as a (D, k) matrix
                    self.aligner = SVDAligner(full.mean, eye, None, full.n_samples, self.k,
                                              {**full.meta, "alignment": "channels"}, full.channel_var).float()
                self._check_teacher_id(full.meta)
            elif teacher is None:   # rebuilt from a checkpoint (evaluation / warm start): buffers come from it
                self.aligner = SVDAligner.empty(k=self.k)
            else:
                raise ConfigError(f"method.svd: {str(path)!r} not found; make the statistics first with "
                                  "'kdforge kdep-svd TEACHER DATA OUT'")
        elif a.alignment == "none":
            if t_dim is not None and t_dim != self.k:
                raise ConfigError(f"method.alignment: none needs equal widths, but the teacher has {t_dim}-d and "
                                  f"the student {self.k}-d features; use svd, channels or regressor")
        else:   # regressor; rebuilt without teacher: the checkpoint gives its shape (_load_from_state_dict)
            self.regressor = nn.Linear(self.k, t_dim or 1)

    # -- helpers --------------------------------------------------------------------------------
    def set_teacher(self, teacher: Optional[nn.Module]) -> None:
        """Freeze the teacher (base class) and tap its pooled pre-activation feature."""
        from kdforge.models.preact import PreActTap
        super().set_teacher(teacher)
        old = getattr(self, "_teacher_tap", None)
        if old is not None:
            old.remove()
        object.__setattr__(self, "_teacher_tap", PreActTap(teacher) if teacher is not None else None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        w = state_dict.get(prefix + "regressor.weight")
        if self.regressor is not None and w is not None and w.shape != self.regressor.weight.shape:
            self.regressor = nn.Linear(w.shape[1], w.shape[0]).to(self.regressor.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_teacher_id(self, meta: dict) -> None:
        t = self.cfg.teacher if self.cfg is not None else None
        want = meta.get("teacher")
        if t is None or not want:
            return
        have = {str(Path(t.checkpoint).resolve()) if t.checkpoint else None, t.name,
                str(Path(t.weights).resolve()) if t.weights else None}
        if not any(h and h in str(want) for h in have if h):
            log.warning(f"method.svd: statistics were computed for teacher {want!r}, but this run's teacher is "
                        f"{t.name} ({t.checkpoint or t.weights or 'random init'}); check that they match")

    def teacher_features(self, images: Tensor) -> Tensor:
        """(B, D_T) pooled pre-activation teacher features, no gradient."""
        with torch.no_grad():
            return self._teacher_tap(images).float()

    def target(self, f_t: Tensor) -> Tensor:
        """The regression target from raw teacher features (B, D_T): (B, k) or (B, D_T) (regressor)."""
        a = self.args
        with torch.no_grad():
            z = self.aligner.transform(f_t) if self.aligner is not None else f_t.float()
            return pts(z, a.pts_temperature, a.pts_power) if a.pts else z

    def student_features(self, images: Tensor) -> Tensor:
        """(B, k) pooled pre-activation student features (with gradient)."""
        return self._student_tap(images)

    # -- contract -------------------------------------------------------------------------------
    def training_step(self, batch, step):
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        t = self.target(self.teacher_features(images))
        f_s = self.student_features(images)
        pred = self.regressor(f_s.float()) if self.regressor is not None else f_s
        loss = kdep_feature_loss(pred, t, self.args.loss_weight)
        with torch.no_grad():
            mse = loss / self.args.loss_weight
            cos = nn.functional.cosine_similarity(pred.float(), t.float(), dim=1).mean()
        return {"loss": loss, "feat_mse": mse.detach(), "cos": cos}

    def param_groups(self) -> list[dict]:
        wd = self.cfg.optim.weight_decay if self.cfg is not None else 0.0
        if self.args.decay_all:
            return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": wd}]
        return param_groups_weight_decay(self.named_parameters(), wd, self.no_weight_decay_names())

    @torch.no_grad()
    def evaluate(self, loader, device: torch.device, amp_ctx: Callable = None) -> dict[str, float]:
        """Validation feature MSE (unweighted) and mean cosine between prediction and target."""
        if self._teacher_tap is None:
            return {}
        import contextlib
        was_training = self.training
        self.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)   # sum sq err, sum cos, count
        for batch in loader:
            images = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device, non_blocking=True)
            with (amp_ctx() if amp_ctx is not None else contextlib.nullcontext()):
                t = self.target(self.teacher_features(images))
                f_s = self.student_features(images)
                pred = self.regressor(f_s.float()) if self.regressor is not None else f_s
            pred, t = pred.float(), t.float()
            sums[0] += ((pred - t) ** 2).mean(1).sum().double()
            sums[1] += nn.functional.cosine_similarity(pred, t, dim=1).sum().double()
            sums[2] += images.shape[0]
        from kdforge.engine.distributed import all_reduce_sum
        sums = all_reduce_sum(sums)
        self.train(was_training)
        n = max(float(sums[2]), 1.0)
        return {"val/feat_mse": float(sums[0]) / n, "val/cos": float(sums[1]) / n}

    @classmethod
    def train_transform(cls, cfg) -> Callable:
        args = cfg.method_args()
        if args.augment == "reference":
            if cfg.data.in_chans != 3:
                raise ConfigError("method.augment: reference (colour jitter + PCA lighting) needs RGB input "
                                  "(data.in_chans=3)")
            return kdep_reference_transform(cfg.data.img_size, cfg.data.mean, cfg.data.std)
        return super().train_transform(cfg)

    def describe(self) -> str:
        """One line: alignment, k, PTS constants and where the statistics come from."""
        a = self.args
        src = json.dumps({k: self.svd_meta.get(k) for k in ("teacher", "n_samples", "transform")
                          if k in self.svd_meta}) if self.svd_meta else ""
        pts_txt = f"PTS(T={a.pts_temperature}, n={a.pts_power})" if a.pts else "no PTS"
        return f"KDEP: alignment={a.alignment}, k={self.k}, {pts_txt}, w={a.loss_weight} {src}".strip()


#: KDEP's classification transfer protocol (spec §5.1): full fine-tuning, SGD (momentum 0.9) lr 1e-3,
#: wd 5e-4, batch 64, 150 epochs, ×0.1 at epochs 50 and 100. Unlike the reference, which reports the
#: best epoch on the *test* split, the checkpoint is selected on ``val`` and ``test`` is scored once.
TRANSFER_PROTOCOL = {"mode": "finetune", "epochs": 150, "lr": 1e-3, "batch_size": 64, "weight_decay": 5e-4,
                     "milestones": [50, 100], "gamma": 0.1}


def kdep_transfer(ckpt, data_root, out, **overrides) -> dict:
    """Fine-tune a (KDEP-pretrained) backbone with :data:`TRANSFER_PROTOCOL` through the evaluation suite
    (:func:`kdforge.eval.transfer.transfer`: the one trainer, val-based selection, test once).

    ``data_root`` is an ImageFolder with ``train``/``val``/``test`` (``kdforge data cifar ...`` writes
    CIFAR-10/100 in that layout). ``overrides`` replace protocol values or pass other ``transfer``
    options (``img_size``, ``device``, ``seed``, ...). The CLI equivalent::

        kdforge eval transfer RUN DATA OUT --mode finetune --epochs 150 --lr 1e-3 --batch-size 64 \\
            --weight-decay 5e-4 --milestones 50 100 --gamma 0.1
    """
    from kdforge.eval.transfer import transfer
    kw = {**TRANSFER_PROTOCOL, **overrides}
    mode = kw.pop("mode")
    return transfer(ckpt, data_root, out, mode, **kw)
