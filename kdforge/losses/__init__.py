"""Pure losses. Each is a function of tensors (or a small module) whose docstring gives its formula
and shapes. Importing this package imports only torch.

* logit KD: :func:`kd_kl`, :func:`soft_cross_entropy`
* KDEP: :func:`pts`, :func:`kdep_target`, :func:`kdep_feature_loss`
* VkD: :func:`vkd_feature_loss`
* SSL-small: :func:`moco_infonce`, :class:`KeyQueue`, :func:`seed_loss`
* iBOT / SMKD: :func:`dino_cls_loss`, :func:`ibot_mim_loss`, :class:`IBOTLoss`, :func:`smkd_cls_loss`,
  :func:`smkd_patch_loss`, :class:`SMKDLoss`
* Attention Probe / DFND: :func:`probe_loss`, :func:`robust_kd_kl`, :class:`NoiseAdaptation`
"""
from kdforge.losses.dino import IBOTLoss, dino_cls_loss, ibot_mim_loss
from kdforge.losses.kd import kd_kl, soft_cross_entropy
from kdforge.losses.kdep import kdep_feature_loss, kdep_target, pts
from kdforge.losses.moco import KeyQueue, moco_infonce
from kdforge.losses.probe import NoiseAdaptation, noise_adaptation_matrix, probe_loss, robust_kd_kl
from kdforge.losses.seed import seed_loss
from kdforge.losses.smkd import SMKDLoss, smkd_cls_loss, smkd_patch_loss
from kdforge.losses.vkd import vkd_feature_loss

__all__ = ["kd_kl", "soft_cross_entropy", "pts", "kdep_target", "kdep_feature_loss", "vkd_feature_loss",
           "moco_infonce", "KeyQueue", "seed_loss", "dino_cls_loss", "ibot_mim_loss", "IBOTLoss",
           "smkd_cls_loss", "smkd_patch_loss", "SMKDLoss", "probe_loss", "robust_kd_kl", "NoiseAdaptation",
           "noise_adaptation_matrix"]
