"""Attention Probe (ICASSP 2022): distil a ViT teacher into a ViT student trained from scratch on
images selected from an unlabeled wild pool (``kdforge select``), with

``loss = L_KD + w_NA · L_NA + λ · L_probe``

* ``L_KD``    — ``T² · mean_b KL(softmax(z_t/T) ‖ softmax(z_s/T))`` (T = 4), or its class-weighted
  ("robust") form with ``robust: true``: per-sample weights ``w[argmax z_t]``, ``w_c ∝ 1/S_c`` where
  ``S_c`` is the teacher's soft class mass accumulated over the training images seen so far;
* ``L_NA``    — DFND's noise adaptation (:class:`kdforge.losses.probe.NoiseAdaptation`): the
  student's softmax through a learned K×K noise matrix must explain the teacher's hard labels;
  ``θ`` (K, K−1) is trained by its **own Adam** (lr ``noise_lr``, no weight decay, no schedule),
  stepped after the trainer's optimizer on the same backward; its state travels in checkpoints
  through ``get_extra_state`` / ``set_extra_state``. ``teacher_acc`` is a required config value;
* ``L_probe`` — :func:`kdforge.losses.probe.probe_loss` between teacher and student block outputs
  (raw residual stream, before the final norm) at ``probe_blocks`` (3, 7, 11) /
  ``student_probe_blocks``; ``normalize: channel`` (cosine, default) or ``token`` (reference).

The training split is the selection: point ``data.train_split`` at the folder that ``kdforge select
... --n N`` writes next to each selection (``OUT/<mode>_<n>/``, links to the pool images), or at
the pool itself to distil on everything. Labels are never read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import Tensor

from kdforge.config import require
from kdforge.losses.kd import kd_kl
from kdforge.losses.probe import NoiseAdaptation, class_weights_from_mass, probe_loss, robust_kd_kl
from kdforge.methods.base import Method, param_groups_weight_decay
from kdforge.models.taps import FeatureTaps


@dataclass
class AttnProbeConfig:
    temperature: float = 4.0
    teacher_acc: Optional[float] = None           # the teacher's test accuracy in (0, 1]; needed by L_NA
    noise_weight: float = 1.0                     # weight of L_NA; 0 disables noise adaptation
    noise_lr: float = 1.0e-3                      # θ's own Adam
    probe_weight: float = 0.8                     # λ (reference --patchattn 0.8); 0 disables the probe loss
    probe_blocks: list[int] = field(default_factory=lambda: [3, 7, 11])   # teacher blocks (0-based)
    student_probe_blocks: Optional[list[int]] = None                      # default: probe_blocks
    normalize: Literal["channel", "token"] = "channel"
    robust: bool = False                          # class-weighted KD
    weight_decay_all: bool = False                # true: decay norms/biases/tokens too (reference AdamW)

    def validate(self, prefix: str = "method") -> None:
        require(self.temperature > 0, f"{prefix}.temperature", "a positive number", self.temperature)
        require(self.noise_weight >= 0, f"{prefix}.noise_weight", "a number >= 0", self.noise_weight)
        require(self.noise_lr > 0, f"{prefix}.noise_lr", "a positive number", self.noise_lr)
        require(self.probe_weight >= 0, f"{prefix}.probe_weight", "a number >= 0", self.probe_weight)
        if self.noise_weight > 0:
            require(self.teacher_acc is not None and 0 < self.teacher_acc <= 1, f"{prefix}.teacher_acc",
                    "the teacher's accuracy in (0, 1] (e.g. 0.9665), or noise_weight: 0", self.teacher_acc)
        if self.probe_weight > 0:
            require(len(self.probe_blocks) > 0, f"{prefix}.probe_blocks", "at least one block", self.probe_blocks)
            sb = self.student_probe_blocks
            if sb is not None:
                require(len(sb) == len(self.probe_blocks), f"{prefix}.student_probe_blocks",
                        f"{len(self.probe_blocks)} blocks (one per teacher block)", sb)


def _num_classes(module) -> int:
    n = getattr(module, "num_classes", None)
    if not n:
        raise ValueError(f"attnprobe: cannot tell the number of classes of {type(module).__name__}; "
                         "set model.num_classes")
    return int(n)


class AttnProbe(Method):
    """Student ViT distilled on wild data: KD + noise adaptation + probe distillation."""

    Config = AttnProbeConfig
    needs_teacher = True
    unlabeled_ok = True

    def __init__(self, cfg, student, teacher=None):
        super().__init__(cfg, student, teacher)
        a = self.args
        k = _num_classes(student)
        if teacher is not None and getattr(teacher, "num_classes", k) != k:
            raise ValueError(f"attnprobe: the student predicts {k} classes but the teacher "
                             f"{teacher.num_classes}; set model.num_classes={teacher.num_classes}")
        self.num_classes = k
        self.noise = NoiseAdaptation(k, a.teacher_acc) if a.noise_weight > 0 else None
        self.noise_opt = torch.optim.Adam([self.noise.theta], lr=a.noise_lr, weight_decay=0.0) \
            if self.noise is not None else None
        self.t_blocks = list(a.probe_blocks) if a.probe_weight > 0 else []
        self.s_blocks = list(a.student_probe_blocks or a.probe_blocks) if a.probe_weight > 0 else []
        # the teacher's soft class mass over the training images seen so far (robust KD)
        self.register_buffer("class_mass", torch.zeros(k))

    # -- the loss -----------------------------------------------------------------------------------
    def training_step(self, batch, step):
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        a = self.args
        with torch.no_grad():
            if self.t_blocks:
                with FeatureTaps(self.teacher, blocks=self.t_blocks, detach=True) as tt:
                    t_logits = self.teacher(images)
            else:
                t_logits = self.teacher(images)
        if self.s_blocks:
            with FeatureTaps(self.student, blocks=self.s_blocks) as st:
                s_logits = self.student(images)
        else:
            s_logits = self.student(images)
        out: dict[str, Tensor] = {}
        if a.robust:
            from kdforge.engine.distributed import all_reduce_sum
            with torch.no_grad():
                self.class_mass += all_reduce_sum(torch.softmax(t_logits.float(), -1).sum(0))
            kd = robust_kd_kl(s_logits, t_logits, class_weights_from_mass(self.class_mass), a.temperature)
        else:
            kd = kd_kl(s_logits, t_logits, a.temperature)
        loss = kd
        out["kd"] = kd.detach()
        if self.noise is not None:
            na = self.noise(s_logits, t_logits.argmax(-1))
            loss = loss + a.noise_weight * na
            out["noise"] = na.detach()
        if self.s_blocks:
            f_t = [tt.blocks[b] for b in self.t_blocks]
            f_s = [st.blocks[b] for b in self.s_blocks]
            if f_t[0].shape[1] != f_s[0].shape[1]:
                raise ValueError(f"attnprobe: the probe loss needs the same number of tokens in teacher "
                                 f"({f_t[0].shape[1]}) and student ({f_s[0].shape[1]}); use the same image and "
                                 "patch size, or probe_weight: 0")
            probe = probe_loss(f_t, f_s, a.normalize)
            loss = loss + a.probe_weight * probe
            out["probe"] = probe.detach()
        out["loss"] = loss
        return out

    def on_after_optimizer_step(self, step: int) -> None:
        """Step θ's own Adam on the gradient of the backward just taken, then clear it."""
        if self.noise_opt is None:
            return
        g = self.noise.theta.grad
        if g is not None and bool(torch.isfinite(g).all()):  # an fp16 overflow step is skipped, like the scaler
            self.noise_opt.step()
        self.noise_opt.zero_grad(set_to_none=True)

    # -- what the trainer's optimizer sees -----------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """The student's parameters (θ has its own Adam). ``weight_decay_all`` decays every tensor
        like the reference AdamW; by default norms, biases and tokens are not decayed."""
        wd = self.cfg.optim.weight_decay if self.cfg is not None else 0.0
        named = [(n, p) for n, p in self.named_parameters() if not n.startswith("noise.")]
        if self.args.weight_decay_all:
            return [{"params": [p for _, p in named if p.requires_grad], "weight_decay": wd}]
        return param_groups_weight_decay(named, wd, self.no_weight_decay_names())

    # -- θ's Adam in checkpoints -------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"noise_opt": self.noise_opt.state_dict() if self.noise_opt is not None else None}

    def set_extra_state(self, state: dict) -> None:
        saved = (state or {}).get("noise_opt")
        if saved is not None and self.noise_opt is not None:
            self.noise_opt.load_state_dict(saved)

    def noise_matrix(self) -> Optional[Tensor]:
        """The learned (K, K) noise-transition matrix (None without noise adaptation)."""
        return self.noise.matrix().detach() if self.noise is not None else None
