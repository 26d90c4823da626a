"""Feature alignment between teacher and student spaces.

* :class:`SVDAligner` (KDEP): non-parametric projection of teacher features onto their top-k
  right singular vectors, fitted once (streaming) and frozen.
* :class:`OrthogonalProjector` (VkD): a learned semi-orthogonal map student → teacher width.
* :func:`normalize_features`: the task-specific feature normalisations (layernorm, standardise, none).
"""
from kdforge.align.norms import normalize_features
from kdforge.align.orthogonal import OrthogonalProjector, make_projector
from kdforge.align.svd import StreamingPCA, SVDAligner

__all__ = ["SVDAligner", "StreamingPCA", "OrthogonalProjector", "make_projector", "normalize_features"]
