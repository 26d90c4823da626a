"""Pure losses. Each is a function of tensors with a docstring giving its formula and shapes."""
from kdforge.losses.kd import kd_kl, soft_cross_entropy

__all__ = ["kd_kl", "soft_cross_entropy"]
