"""``ibot``: iBOT self-distillation, SMKD's phase 1 (self-supervised pre-training of a few-shot ViT).

Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer" (ICLR 2022), as run by Lin et al.,
SMKD (CVPR 2023) phase 1; spec ``shared/methods/smkd.md`` §1.

* student = the timm ViT built by the trainer (no classifier) + a learnable ``mask_token`` + an
  :class:`~kdforge.models.dino_head.IBOTHead`; teacher = an EMA copy of backbone and head (a submodule
  trained by EMA, never by the optimizer; no drop-path, always in eval mode). The teacher starts as a
  copy of the student; EMA uses a cosine momentum ``momentum_teacher → momentum_teacher_end`` over the
  run, per optimizer step, over every parameter both have (the mask token is the student's alone);
* inputs: 2 global + L local DINO crops (:class:`~kdforge.data.multicrop.MultiCrop`); the student's
  global crops get iBOT block masks (:class:`~kdforge.data.masking.BlockMaskGenerator`), its local
  crops are unmasked; the teacher sees the clean global crops;
* loss = :class:`~kdforge.losses.dino.IBOTLoss`: λ1 · DINO [CLS] over every (teacher global, student
  crop ≠ it) pair + λ3 · iBOT MIM on masked patches, centred teacher targets (momentum 0.9) and
  teacher temperatures warmed up by epoch;
* the prototype layer(s) (``last_layer*``) get zero gradients during the first ``freeze_last_layer``
  epochs; per-tensor clipping (``train.clip_mode: per_tensor``) and the weight-decay cosine
  (``optim.weight_decay_end``) are the trainer's;
* validation (``evaluate``): few-shot episodes on the val split (novel classes) with the teacher's
  (or student's) SMKD feature ``concat(norm(CLS), norm(attention-weighted patch mean))``; the
  best checkpoint is kept by ``val/fewshot`` = the mean accuracy over the configured shots.

Batch (from :meth:`train_transform` + default collation): ``((crops, masks), labels)`` with ``crops``
a list of 2 + L tensors (B, C, S, S) and ``masks`` a list of 2 bool tensors (B, h, w).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from kdforge.config import ConfigError, require
from kdforge.engine import distributed as D
from kdforge.engine.schedules import cosine_value
from kdforge.losses.dino import IBOTLoss
from kdforge.methods.base import Method
from kdforge.models.dino_head import IBOTHead
from kdforge.models.masked_vit import cls_weighted_patch_feature, enable_dynamic_img_size, masked_vit_forward


@dataclass
class IBOTConfig:
    # head (SMKD: K = 8192, shared [CLS]/patch prototypes, g trainable)
    out_dim: int = 8192
    patch_out_dim: int = 8192                 # ignored when shared_head
    shared_head: bool = True
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    norm_last_layer: bool = False
    # crops (global_size None: data.img_size)
    global_size: Optional[int] = None
    local_size: int = 96
    n_local: int = 10
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)   # brightness, contrast, saturation, hue
    blur_sigma: tuple[float, float] = (0.1, 2.0)                              # PIL blur radius range (px)
    patch_size: Optional[int] = None          # None: from model.kwargs.patch_size or the name (…patch16…)
    # masks
    mask_ratio: list[float] = field(default_factory=lambda: [0.0, 0.3])
    mask_ratio_var: list[float] = field(default_factory=lambda: [0.0, 0.2])
    mask_shape: Literal["block", "rand"] = "block"
    mask_start_epoch: int = 0
    # loss
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_patch_temp: float = 0.04
    teacher_patch_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    student_temp: float = 0.1
    center_momentum: float = 0.9
    center_momentum2: float = 0.9
    lambda1: float = 1.0                      # [CLS]
    lambda3: float = 1.0                      # MIM
    mim_average: Literal["all_images", "masked_images"] = "all_images"
    # teacher EMA and last layer
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    freeze_last_layer: int = 1                # epochs with zero gradient on the prototype layer(s)
    # few-shot validation on the val split (novel classes)
    eval_model: Literal["teacher", "student"] = "teacher"
    eval_feature: Literal["cls_wpatch", "cls"] = "cls_wpatch"
    fewshot_ways: int = 5
    fewshot_shots: list[int] = field(default_factory=lambda: [1, 5])
    fewshot_queries: int = 15                 # 0: every remaining image of each class (SMKD's test protocol)
    fewshot_episodes: int = 600
    fewshot_classifier: Literal["prototype", "logistic", "cosine_classifier"] = "prototype"
    fewshot_seed: int = 0

    def validate(self, prefix: str = "method") -> None:
        require(self.fewshot_queries >= 0, f"{prefix}.fewshot_queries", "an integer >= 0", self.fewshot_queries)
        for key in ("out_dim", "patch_out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_nlayers",
                    "local_size", "fewshot_ways", "fewshot_episodes"):
            require(getattr(self, key) > 0, f"{prefix}.{key}", "a positive integer", getattr(self, key))
        require(self.n_local >= 0, f"{prefix}.n_local", "an integer >= 0", self.n_local)
        for key in ("global_scale", "local_scale"):
            lo, hi = getattr(self, key)
            require(0 < lo <= hi <= 1, f"{prefix}.{key}", "(lo, hi) with 0 < lo <= hi <= 1", list(getattr(self, key)))
        require(len(self.mask_ratio) == len(self.mask_ratio_var) and len(self.mask_ratio) > 0,
                f"{prefix}.mask_ratio_var", f"{len(self.mask_ratio)} values like mask_ratio", self.mask_ratio_var)
        for m, v in zip(self.mask_ratio, self.mask_ratio_var):
            require(0 <= m - v and m + v <= 1 and v >= 0, f"{prefix}.mask_ratio", "mean ± var within [0, 1]",
                    [m, v])
        for key in ("warmup_teacher_temp", "teacher_temp", "warmup_teacher_patch_temp", "teacher_patch_temp",
                    "student_temp"):
            require(getattr(self, key) > 0, f"{prefix}.{key}", "a positive number", getattr(self, key))
        for key in ("center_momentum", "center_momentum2"):
            require(0 <= getattr(self, key) < 1, f"{prefix}.{key}", "a number in [0, 1)", getattr(self, key))
        require(0 <= self.momentum_teacher <= self.momentum_teacher_end <= 1, f"{prefix}.momentum_teacher",
                "0 <= momentum_teacher <= momentum_teacher_end <= 1", [self.momentum_teacher, self.momentum_teacher_end])
        require(self.warmup_teacher_temp_epochs >= 0, f"{prefix}.warmup_teacher_temp_epochs", "an integer >= 0",
                self.warmup_teacher_temp_epochs)
        require(self.freeze_last_layer >= 0, f"{prefix}.freeze_last_layer", "an integer >= 0", self.freeze_last_layer)
        require(all(s > 0 for s in self.fewshot_shots) and len(self.fewshot_shots) > 0, f"{prefix}.fewshot_shots",
                "positive shot counts", self.fewshot_shots)
        require(self.lambda1 >= 0 and self.lambda3 >= 0, f"{prefix}.lambda1", "weights >= 0",
                [self.lambda1, self.lambda3])


def infer_patch_size(cfg) -> int:
    """``method.patch_size``, else ``model.kwargs.patch_size`` (or a tiny model's), else ``patch<N>`` in
    the model name."""
    args = cfg.method_args()
    if getattr(args, "patch_size", None):
        return int(args.patch_size)
    from kdforge.models.factory import model_spec
    try:
        _, arch, kw = model_spec(cfg.model.name, cfg.model.kwargs)
    except ValueError:
        arch, kw = cfg.model.name, dict(cfg.model.kwargs or {})
    if kw.get("patch_size"):
        return int(kw["patch_size"])
    m = re.search(r"patch(\d+)", arch)
    if m:
        return int(m.group(1))
    raise ConfigError(f"method.patch_size: cannot tell the patch size of model {cfg.model.name!r}; set it")


def _strip_stochastic(module: nn.Module) -> nn.Module:
    """Teacher copy: DropPath -> Identity, Dropout p -> 0 (the EMA teacher is deterministic)."""
    for name, child in list(module.named_children()):
        if type(child).__name__ == "DropPath":
            setattr(module, name, nn.Identity())
        elif isinstance(child, nn.Dropout):
            child.p = 0.0
        else:
            _strip_stochastic(child)
    return module


class IBOT(Method):
    """iBOT / SMKD phase 1 (see the module docstring)."""

    Config = IBOTConfig
    student_head = False
    unlabeled_ok = True
    best_metric = "val/fewshot"
    #: few-shot validation: the val split holds its own (novel) classes, not the training classes
    #: (read by :meth:`build_dataset`)
    val_same_classes = False
    #: the sub-module evaluated and exported (SMKD evaluates the EMA teacher), for ``load_model_from_run``
    export_module = "teacher_backbone"
    loss_cls = IBOTLoss

    def __init__(self, cfg, student: nn.Module, teacher: Optional[nn.Module] = None):
        super().__init__(cfg, student, None)
        a = self.args
        for attr in ("patch_embed", "_pos_embed", "blocks", "norm"):
            if not hasattr(student, attr):
                raise ConfigError(f"model.name: method {self.__class__.__name__.lower()} needs a timm "
                                  f"VisionTransformer; {type(student).__name__} has no {attr!r}")
        enable_dynamic_img_size(student)             # 224 px global and 96 px local crops in one model
        dim = int(student.embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.head = IBOTHead(dim, a.out_dim, a.patch_out_dim, a.head_nlayers, a.head_hidden_dim,
                             a.head_bottleneck_dim, a.norm_last_layer, a.shared_head)
        self.teacher_backbone = _strip_stochastic(copy.deepcopy(student)).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.loss = self.build_loss()
        self.n_global = 2
        self._ema_pairs = None
        for name, p in self.head.named_parameters():
            if name.startswith("last_layer") and p.requires_grad:
                p.register_hook(self._freeze_hook)

    # -- construction -----------------------------------------------------------------------
    def build_loss(self) -> nn.Module:
        a = self.args
        return self.loss_cls(a.out_dim, a.patch_out_dim if not a.shared_head else a.out_dim, 2,
                             a.warmup_teacher_temp, a.teacher_temp, a.warmup_teacher_patch_temp,
                             a.teacher_patch_temp, a.warmup_teacher_temp_epochs, a.student_temp, a.center_momentum,
                             a.center_momentum2, lambda1=a.lambda1, lambda3=a.lambda3,
                             mim_start_epoch=a.mask_start_epoch, mim_average=a.mim_average)

    def _freeze_hook(self, grad: Tensor) -> Tensor:
        # the prototype layer stays at its init during the first epoch(s) (DINO's freeze_last_layer);
        # a zero gradient leaves Adam's moments at 0, so the update is exactly 0
        return torch.zeros_like(grad) if self.epoch < self.args.freeze_last_layer else grad

    @classmethod
    def train_transform(cls, cfg):
        from kdforge.data.masking import BlockMaskGenerator
        from kdforge.data.multicrop import MaskedMultiCrop, MultiCrop
        a = cfg.method_args()
        gsize = a.global_size or cfg.data.img_size
        mc = MultiCrop(gsize, a.local_size, a.n_local, a.global_scale, a.local_scale, cfg.data.mean, cfg.data.std,
                       a.color_jitter, a.blur_sigma)
        patch = infer_patch_size(cfg)
        if a.local_size % patch:
            raise ConfigError(f"method.local_size: {a.local_size} is not a multiple of the patch size {patch}")
        gen = BlockMaskGenerator(a.mask_ratio, a.mask_ratio_var, a.mask_shape)
        return MaskedMultiCrop(mc, gen, patch)

    @classmethod
    def build_dataset(cls, cfg, split: str, train: bool):
        """Few-shot splits hold disjoint classes (base classes train, novel classes val/test), so the
        val/test splits are read with their own class list, never the training classes' (which the
        default reader enforces). Train: the ImageFolder (or unlabeled folder) with the multi-crop
        transform; val/test: the ImageFolder with the eval transform, or None when the folder is absent."""
        from pathlib import Path

        from kdforge.data.datasets import ImageFolderDataset, UnlabeledFolder
        from kdforge.data.transforms import build_eval_transform
        folder = Path(cfg.data.root) / split
        mode = "RGB" if cfg.data.in_chans == 3 else "L"
        if not train:
            return ImageFolderDataset(folder, build_eval_transform(cfg.data), cfg.data.on_corrupt, mode) \
                if folder.is_dir() else None
        if not folder.is_dir():
            raise ConfigError(f"data.train_split: {str(folder)!r} is not a folder")
        tf = cls.train_transform(cfg)
        if any(p.is_dir() for p in folder.iterdir()):
            return ImageFolderDataset(folder, tf, cfg.data.on_corrupt, mode)
        return UnlabeledFolder(folder, tf, cfg.data.on_corrupt, mode)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_backbone.eval()   # deterministic EMA teacher, whatever the trainer asks
        self.teacher_head.eval()
        return self

    # -- forward pieces ---------------------------------------------------------------------
    def student_tokens(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return masked_vit_forward(self.student, x, self.mask_token, mask)[0]

    @torch.no_grad()
    def teacher_tokens(self, x: Tensor, return_attention: bool = False):
        return masked_vit_forward(self.teacher_backbone, x, None, None, return_attention)

    def forward_views(self, batch):
        """Run teacher and student on one batch -> dict of the tensors the losses need."""
        (crops, masks), labels = batch
        G = self.n_global
        if len(crops) < G or len(masks) != G:
            raise ValueError(f"{self.__class__.__name__}: expected >= {G} crops and {G} masks per sample, got "
                             f"{len(crops)} and {len(masks)} (is data.train_transform the method's multi-crop?)")
        B = crops[0].shape[0]
        globals_ = torch.cat(list(crops[:G]))
        m = torch.cat(list(masks)).flatten(1)
        if self.epoch < self.args.mask_start_epoch:
            m = torch.zeros_like(m)
        with torch.no_grad():
            t_tok, _ = self.teacher_tokens(globals_)
            t_cls, t_patch = self.teacher_head(t_tok)
        s_tok = self.student_tokens(globals_, m)
        s_cls, s_patch = self.head(s_tok)
        cls_all = [s_cls]
        if len(crops) > G:
            l_tok = self.student_tokens(torch.cat(list(crops[G:])))
            cls_all.append(self.head(l_tok[:, 0]))
        npre = int(getattr(self.student, "num_prefix_tokens", 1))
        return {"B": B, "s_cls": torch.cat(cls_all), "s_patch": s_patch, "t_cls": t_cls, "t_patch": t_patch,
                "masks": m, "labels": labels, "s_patch_tok": s_tok[:, npre:].detach(), "t_patch_tok": t_tok[:, npre:]}

    def training_step(self, batch, step):
        v = self.forward_views(batch)
        out = self.loss(v["s_cls"], v["s_patch"], v["t_cls"], v["t_patch"], v["masks"], self.epoch)
        out["mask_ratio"] = v["masks"].float().mean().detach()
        return out

    # -- EMA teacher --------------------------------------------------------------------------
    def _pairs(self):
        if self._ema_pairs is None:
            t = dict(self.teacher_backbone.named_parameters())
            s = dict(self.student.named_parameters())
            th, sh = dict(self.teacher_head.named_parameters()), dict(self.head.named_parameters())
            pairs = [(t[k], s[k]) for k in t if k in s] + [(th[k], sh[k]) for k in th if k in sh]
            if len(pairs) != len(t) + len(th):
                raise RuntimeError("EMA teacher and student parameters do not match by name")
            self._ema_pairs = pairs
        return self._ema_pairs

    def teacher_momentum(self, step: int) -> float:
        """Cosine from ``momentum_teacher`` (step 0) to ``momentum_teacher_end`` (the last step)."""
        return cosine_value(self.args.momentum_teacher, self.args.momentum_teacher_end, step, self.total_steps)

    @torch.no_grad()
    def on_after_optimizer_step(self, step: int) -> None:
        m = self.teacher_momentum(step)
        tp, sp = zip(*self._pairs())
        torch._foreach_mul_(list(tp), m)
        torch._foreach_add_(list(tp), [p.detach() for p in sp], alpha=1.0 - m)

    def _apply(self, fn, recurse=True):
        self._ema_pairs = None   # parameters may be new tensors after .to()
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._ema_pairs = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- export and evaluation -----------------------------------------------------------------
    def export_backbone(self) -> dict[str, Tensor]:
        """The EMA teacher's backbone (the model SMKD evaluates), with timm keys."""
        from kdforge.models import backbone_state_dict
        return backbone_state_dict(self.teacher_backbone if self.args.eval_model == "teacher" else self.student)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Few-shot feature of ``images`` (B, C, H, W) -> (B, 2D) ``cls_wpatch`` or (B, D) ``cls``."""
        vit = self.teacher_backbone if self.args.eval_model == "teacher" else self.student
        tok, attn = masked_vit_forward(vit, images, None, None, return_attention=self.args.eval_feature != "cls")
        if self.args.eval_feature == "cls":
            return tok[:, 0].float()
        return cls_weighted_patch_feature(tok, attn, int(getattr(vit, "num_prefix_tokens", 1)))

    @torch.no_grad()
    def extract(self, loader, device: torch.device, amp_ctx=None) -> tuple[Tensor, Tensor]:
        """Features and labels of every image of ``loader`` (gathered over ranks, in rank order)."""
        was = self.training
        self.eval()
        feats, labels = [], []
        for images, y in loader:
            images = images.to(device, non_blocking=True)
            if amp_ctx is not None:
                with amp_ctx():
                    f = self.features(images)
            else:
                f = self.features(images)
            feats.append(f.float())
            labels.append(y.to(device))
        self.train(was)
        f = torch.cat(feats) if feats else torch.zeros(0, 1, device=device)
        y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
        if D.is_dist():
            n = D.all_gather_cat(torch.tensor([f.shape[0]], device=device))
            top = int(n.max())
            pad_f = torch.zeros(top, f.shape[1], device=device)
            pad_f[:f.shape[0]] = f
            pad_y = torch.full((top,), -1, dtype=torch.long, device=device)
            pad_y[:y.shape[0]] = y
            gf, gy = D.all_gather_cat(pad_f), D.all_gather_cat(pad_y)
            keep = torch.cat([torch.arange(int(k), device=device) + r * top for r, k in enumerate(n.tolist())])
            f, y = gf[keep], gy[keep]
        return f, y

    @torch.no_grad()
    def fewshot_metrics(self, feats: Tensor, labels: Tensor, prefix: str = "val") -> dict[str, float]:
        """``{prefix}/{W}way_{K}shot`` (mean accuracy %), ``..._ci95`` per shot and ``{prefix}/fewshot``
        (mean over shots) from ``sample_episodes`` / ``evaluate_episodes`` (seeded, same on every rank)."""
        from kdforge.eval import evaluate_episodes, sample_episodes
        a = self.args
        y = labels.cpu()
        n_cls = int(y.unique().numel())
        ways = min(a.fewshot_ways, n_cls)
        out, accs = {}, []
        for shot in a.fewshot_shots:
            smallest = int(y.unique(return_counts=True)[1].min())
            q = smallest - shot if a.fewshot_queries == 0 else min(a.fewshot_queries, smallest - shot)
            if ways < 2 or q < 1:
                continue
            ep = sample_episodes(y, ways, shot, q, a.fewshot_episodes, seed=a.fewshot_seed)
            res = evaluate_episodes(feats, y, ep, shot, a.fewshot_classifier, seed=a.fewshot_seed)
            out[f"{prefix}/{ways}way_{shot}shot"] = float(res.mean)
            out[f"{prefix}/{ways}way_{shot}shot_ci95"] = float(res.ci95)
            accs.append(float(res.mean))
        if accs:
            out[f"{prefix}/fewshot"] = sum(accs) / len(accs)
        return out

    @torch.no_grad()
    def evaluate(self, loader, device: torch.device, amp_ctx=None) -> dict[str, float]:
        """Few-shot episodes on ``loader``'s images (the val split's novel classes); see the module doc."""
        feats, labels = self.extract(loader, device, amp_ctx)
        if feats.shape[0] == 0:
            return {}
        return self.fewshot_metrics(feats, labels)


@torch.no_grad()
def evaluate_fewshot_run(run, split: str = "test", which: str = "best", data_root: Optional[str] = None,
                         device: str = "auto", img_size: Optional[int] = None, crop_pct: Optional[float] = None,
                         **overrides) -> dict[str, float]:
    """Few-shot episodes of a saved ``ibot`` / ``smkd`` run on ``ROOT/<split>`` (the split's own, novel
    classes), with the run's feature (teacher CLS ⊕ attention-weighted patch mean by default).

    ``overrides`` replace the method's few-shot settings for this evaluation: ``fewshot_ways``,
    ``fewshot_shots``, ``fewshot_queries``, ``fewshot_episodes``, ``fewshot_classifier``, ``fewshot_seed``,
    ``eval_model`` (teacher | student), ``eval_feature`` (cls_wpatch | cls). ``img_size`` / ``crop_pct``
    replace the run's evaluation transform (resize the short side to img_size / crop_pct, centre-crop
    img_size; SMKD's miniImageNet/tieredImageNet test protocol is 320 / 0.8889, i.e. 360 -> 320). Falls
    back to ``last.pt`` when the run has no ``best.pt``. Returns ``{"<split>/<W>way_<K>shot": acc, ..._ci95, "<split>/fewshot"}``.
    """
    import dataclasses
    from pathlib import Path

    from torch.utils.data import DataLoader

    from kdforge.data.datasets import ImageFolderDataset
    from kdforge.data.transforms import build_eval_transform
    from kdforge.engine.trainer import amp_context, rebuild_method, resolve_device
    method, cfg, ck = rebuild_method(run, which)
    dev = resolve_device(device)
    if not isinstance(method, IBOT):
        raise ConfigError(f"run {run}: method {cfg.method_name!r} is not ibot/smkd")
    method.load_state_dict(ck["model"])
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(method.args)})
    if unknown:
        raise ConfigError(f"few-shot evaluation: unknown option(s) {unknown}")
    method.args = dataclasses.replace(method.args, **overrides)
    method.to(dev)
    root = Path(data_root or cfg.data.root)
    mode = "RGB" if cfg.data.in_chans == 3 else "L"
    data_cfg = dataclasses.replace(cfg.data, img_size=img_size or cfg.data.img_size,
                                   eval_crop_pct=crop_pct or cfg.data.eval_crop_pct)
    ds = ImageFolderDataset(root / split, build_eval_transform(data_cfg), "skip", mode)
    loader = DataLoader(ds, batch_size=cfg.data.batch_size, shuffle=False, num_workers=cfg.data.num_workers)
    feats, labels = method.extract(loader, dev, amp_context(dev, cfg.train.amp))
    return method.fewshot_metrics(feats, labels, prefix=split)
