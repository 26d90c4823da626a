"""Non-parametric dimension alignment by PCA (KDEP, He et al., CVPR 2022, §3.2).

The teacher's pooled features ``F`` (N, D) are centred, ``X = F - 1·muᵀ``, and decomposed,
``X = U · diag(S) · Vᵀ``. The columns of ``V`` (D, r) are the principal directions (eigenvectors of
``XᵀX = (N-1)·Cov(F)``) in descending order of the singular values ``S`` (so ``S_i² / (N-1)`` is the
variance along column i). Alignment to a k-wide student keeps the top k directions::

    transform(f) = (f - mu) @ V[:, :k]          (B, D) -> (B, k)

Two ways to get the statistics, which agree:

* :meth:`SVDAligner.fit` — in memory, ``torch.linalg.svd`` of the centred float64 matrix;
* :class:`StreamingPCA` — one pass over batches, float64 running mean and scatter matrix
  (Chan et al. pairwise update), never holding the N×D matrix, then ``eigh``.

Singular vectors are defined up to the sign of each column; both paths apply the same canonical sign
(the largest-magnitude entry of every column is made positive), so results do not depend on the
LAPACK build or device. The statistics are saved as safetensors (``mean``, ``V``,
``singular_values``) with their metadata (N, teacher id, transform, sign convention, ...) both in the
safetensors header and in a JSON sidecar. :meth:`SVDAligner.from_reference_npy` reads the reference
code's ``model_v.npy`` / ``model_feat_mean.npy`` / ``model_eigen_values.npy``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

FORMAT = "kdforge-svd/1"
SIGN_CONVENTION = "largest_abs_positive"


def canonical_signs(v: Tensor) -> Tensor:
    """Flip columns of ``v`` (D, r) so that the largest-magnitude entry of each column is positive.

    Ties go to the first such entry (``argmax``). Returns a new tensor of the same shape.
    """
    idx = v.abs().argmax(dim=0)                         # (r,)
    signs = torch.sign(v.gather(0, idx[None, :]))[0]    # (r,)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return v * signs[None, :]


def _as_2d(features: Tensor, dim: Optional[int] = None) -> Tensor:
    if features.ndim != 2:
        raise ValueError(f"expected features of shape (N, D), got {tuple(features.shape)}")
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"expected feature width {dim}, got {features.shape[1]}")
    return features


class SVDAligner(nn.Module):
    """PCA statistics of teacher features and the KDEP alignment ``(f - mu) @ V[:, :k]``.

    Buffers (saved in ``state_dict`` and moved by ``.to()``):

    * ``mean`` (D,) — feature mean mu;
    * ``V`` (D, r) — principal directions as columns, descending, canonical signs;
    * ``singular_values`` (r_s,) — singular values of the centred matrix, descending (r_s >= r);
    * ``channel_var`` (D,) — per-channel variance of the features (NaN when unknown), for the
      "top-k channels by variance" ablation.

    ``k`` is the default number of kept directions for :meth:`transform`; ``n_samples`` (N) and
    ``meta`` (teacher id, transform, ...) describe where the statistics come from.
    """

    def __init__(self, mean: Tensor, v: Tensor, singular_values: Optional[Tensor] = None,
                 n_samples: Optional[int] = None, k: Optional[int] = None, meta: Optional[dict] = None,
                 channel_var: Optional[Tensor] = None):
        super().__init__()
        if mean.ndim != 1 or v.ndim != 2 or v.shape[0] != mean.shape[0]:
            raise ValueError(f"SVDAligner: expected mean (D,) and V (D, r); got {tuple(mean.shape)} and "
                             f"{tuple(v.shape)}")
        if singular_values is None:
            singular_values = torch.full((v.shape[1],), float("nan"), dtype=v.dtype)
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("V", v.detach().clone())
        self.register_buffer("singular_values", singular_values.detach().clone())
        if channel_var is None:
            channel_var = torch.full_like(mean, float("nan"))
        self.register_buffer("channel_var", channel_var.detach().clone().to(mean.dtype))
        self.n_samples = n_samples
        self.k = v.shape[1] if k is None else int(k)
        if not 0 < self.k <= v.shape[1]:
            raise ValueError(f"SVDAligner: k={self.k} but only {v.shape[1]} principal directions are stored")
        self.meta = dict(meta or {})

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def fit(cls, features: Tensor, k: Optional[int] = None, sign_convention: bool = True,
            **meta: Any) -> "SVDAligner":
        """In-memory PCA of ``features`` (N, D): float64 reduced SVD of the centred matrix.

        Keeps the top ``k`` directions (default all ``min(N, D)``); the singular values are kept in
        full. ``meta`` keyword arguments (e.g. ``teacher="resnet50"``) are stored with the result.
        """
        f = _as_2d(features).detach().to(torch.float64)
        n = f.shape[0]
        if n < 2:
            raise ValueError(f"SVDAligner.fit: need at least 2 samples, got {n}")
        mean = f.mean(0)
        _, s, vh = torch.linalg.svd(f - mean, full_matrices=False)   # vh (r, D): rows are directions
        r = vh.shape[0]
        keep = r if k is None else int(k)
        if not 0 < keep <= r:
            raise ValueError(f"SVDAligner.fit: k={keep} but {n} samples of width {f.shape[1]} give {r} "
                             f"principal directions")
        v = vh[:keep].T
        if sign_convention:
            v = canonical_signs(v)
        meta = {"method": "svd", "sign_convention": SIGN_CONVENTION if sign_convention else "none", **meta}
        return cls(mean, v, s, n_samples=n, k=keep, meta=meta, channel_var=f.var(0))

    @classmethod
    def empty(cls, dim: int = 1, k: int = 1) -> "SVDAligner":
        """A placeholder of the right kind whose buffers take their shapes from ``load_state_dict``
        (rebuilding a trained method from its checkpoint without the statistics file)."""
        return cls(torch.zeros(dim), torch.zeros(dim, k), torch.zeros(k), k=k, meta={"method": "placeholder"})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # buffers adopt the checkpoint's shapes: the statistics define them, not the constructor
        for name in ("mean", "V", "singular_values", "channel_var"):
            t = state_dict.get(prefix + name)
            if t is not None and t.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(t, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.k = min(self.k, self.num_components) if self.meta.get("method") != "placeholder" \
            else self.num_components

    @classmethod
    def from_reference_npy(cls, v_path: str | Path, mean_path: Optional[str | Path] = None,
                           singular_values_path: Optional[str | Path] = None, k: Optional[int] = None,
                           sign_convention: bool = False) -> "SVDAligner":
        """Read the KDEP reference code's ``np.save`` files.

        ``v_path`` is ``model_v.npy`` (float32 (D, D): ``torch.svd``'s V, principal directions as
        columns, descending) or a folder holding ``model_v.npy`` + ``model_feat_mean.npy`` (+ optional
        ``model_eigen_values.npy``, which despite the name holds singular values), or the renamed
        ``Microsoft-ResNet50_{v,feat_mean}.npy`` pair the reference's teacher loads. ``mean_path`` is
        ``model_feat_mean.npy`` (D,). Signs are kept as saved unless ``sign_convention``.
        """
        import numpy as np
        p = Path(v_path)
        if p.is_dir():
            folder = p
            for stem in ("model", "Microsoft-ResNet50", "StandardSP-ImageNet1K-ResNet50"):
                if (folder / f"{stem}_v.npy").is_file():
                    p = folder / f"{stem}_v.npy"
                    mean_path = mean_path or folder / f"{stem}_feat_mean.npy"
                    sv = folder / f"{stem}_eigen_values.npy"
                    if singular_values_path is None and sv.is_file():
                        singular_values_path = sv
                    break
            else:
                raise FileNotFoundError(f"{str(folder)!r} holds no model_v.npy (nor Microsoft-ResNet50_v.npy)")
        if mean_path is None:
            raise ValueError("from_reference_npy: give mean_path (model_feat_mean.npy) with a V file")
        v = torch.from_numpy(np.asarray(np.load(p), dtype=np.float32))
        mean = torch.from_numpy(np.asarray(np.load(mean_path), dtype=np.float32)).reshape(-1)
        if v.ndim != 2 or v.shape[0] != mean.shape[0]:
            raise ValueError(f"reference statistics do not fit: V {tuple(v.shape)} from {p}, mean "
                             f"{tuple(mean.shape)} from {mean_path}; expected V (D, D) and mean (D,)")
        s = None
        if singular_values_path is not None:
            s = torch.from_numpy(np.asarray(np.load(singular_values_path), dtype=np.float32)).reshape(-1)
        if sign_convention:
            v = canonical_signs(v)
        keep = v.shape[1] if k is None else int(k)
        meta = {"method": "reference_npy", "source": str(p),
                "sign_convention": SIGN_CONVENTION if sign_convention else "as_saved"}
        return cls(mean, v[:, :keep].contiguous(), s, n_samples=None, k=keep, meta=meta)

    # -- use ------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Teacher feature width D."""
        return int(self.mean.shape[0])

    @property
    def num_components(self) -> int:
        """Number r of stored principal directions (columns of V)."""
        return int(self.V.shape[1])

    def top_variance_channels(self, k: Optional[int] = None) -> Tensor:
        """Indices (k,) of the k channels with the largest variance, descending (ties: lower index)."""
        k = self.k if k is None else int(k)
        if torch.isnan(self.channel_var).any():
            raise ValueError("the per-channel variances are unknown for these statistics (reference .npy "
                             "files hold none); recompute them with 'kdforge kdep-svd'")
        if not 0 < k <= self.dim:
            raise ValueError(f"top_variance_channels: k={k} for a {self.dim}-d feature")
        order = torch.sort(self.channel_var.double(), descending=True, stable=True).indices
        return order[:k]

    def explained_variance(self) -> Tensor:
        """Per-direction variance ``S_i² / (N - 1)`` (r_s,); needs ``n_samples``."""
        if not self.n_samples or self.n_samples < 2:
            raise ValueError("explained_variance: the number of samples N is unknown")
        return self.singular_values.double() ** 2 / (self.n_samples - 1)

    def transform(self, f: Tensor, k: Optional[int] = None) -> Tensor:
        """``(f - mu) @ V[:, :k]``: (B, D) -> (B, k), in float32 (float64 for float64 input)."""
        from kdforge.losses.kdep import kdep_project
        return kdep_project(f, self.mean, self.V, self.k if k is None else k)

    def forward(self, f: Tensor) -> Tensor:
        return self.transform(f)

    def truncated(self, k: int) -> "SVDAligner":
        """A copy keeping only the top ``k`` directions (clear error when fewer are stored)."""
        if not 0 < k <= self.num_components:
            raise ValueError(f"SVD statistics hold {self.num_components} principal directions of a "
                             f"{self.dim}-d teacher feature; k={k} requested (the student's feature width)")
        return SVDAligner(self.mean, self.V[:, :k].contiguous(), self.singular_values, self.n_samples, k,
                          self.meta, self.channel_var)

    # -- I/O ------------------------------------------------------------------------------------
    def metadata(self) -> dict:
        """JSON-able description: format, D, r, k, N, sign convention and the ``meta`` fields."""
        return {"format": FORMAT, "dim": self.dim, "num_components": self.num_components, "k": self.k,
                "n_samples": self.n_samples, **self.meta}

    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write ``PATH`` (.safetensors: mean, V, singular_values, channel_var + metadata) and ``PATH`` .json.

        Returns the safetensors path. Tensors are stored as ``dtype`` (float32 by default).
        """
        from safetensors.torch import save_file
        p = Path(path)
        if p.suffix != ".safetensors":
            p = p.with_suffix(p.suffix + ".safetensors") if p.suffix else p.with_suffix(".safetensors")
        p.parent.mkdir(parents=True, exist_ok=True)
        meta = self.metadata()
        tensors = {name: getattr(self, name).detach().to("cpu", dtype).contiguous()
                   for name in ("mean", "V", "singular_values", "channel_var")}
        save_file(tensors, str(p), metadata={"kdforge_svd": json.dumps(meta, default=str)})
        p.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        return p

    @staticmethod
    def _reference_npy_source(p: Path) -> Optional[tuple]:
        """``(v_path, mean_path[, singular_values_path])`` when ``p`` names reference ``.npy`` statistics."""
        if p.is_dir():
            if (p / "svd.safetensors").is_file():
                return None
            if any((p / f"{stem}_v.npy").is_file()
                   for stem in ("model", "Microsoft-ResNet50", "StandardSP-ImageNet1K-ResNet50")):
                return (p, None)
            return None
        if p.suffix == ".npy":
            if not p.name.endswith("_v.npy"):
                raise ValueError(f"{str(p)!r}: give the reference's V file (model_v.npy) or its folder; its "
                                 "mean (model_feat_mean.npy) is read from the same folder")
            mean = p.with_name(p.name[: -len("_v.npy")] + "_feat_mean.npy")
            if not mean.is_file():
                raise FileNotFoundError(f"reference statistics: {str(mean)!r} (the mean that goes with "
                                        f"{p.name}) not found")
            sv = p.with_name(p.name[: -len("_v.npy")] + "_eigen_values.npy")
            return (p, mean, sv if sv.is_file() else None)
        return None

    @classmethod
    def load(cls, path: str | Path, k: Optional[int] = None) -> "SVDAligner":
        """Read a file written by :meth:`save` (or a folder holding ``svd.safetensors``).

        The reference code's statistics are accepted too: a ``*_v.npy`` file (its ``*_feat_mean.npy``
        next to it) or a folder holding ``model_v.npy`` / ``Microsoft-ResNet50_v.npy`` and the mean, read
        by :meth:`from_reference_npy` (signs as saved, no per-channel variances, N unknown).
        """
        from safetensors import safe_open
        p = Path(path)
        ref = cls._reference_npy_source(p)
        if ref is not None:
            obj = cls.from_reference_npy(*ref)
            return obj.truncated(k) if k is not None else obj
        if p.is_dir():
            p = p / "svd.safetensors"
        if not p.is_file() and p.with_suffix(".safetensors").is_file():
            p = p.with_suffix(".safetensors")
        if not p.is_file():
            raise FileNotFoundError(f"SVD statistics {str(p)!r} not found; make them with "
                                    "'kdforge kdep-svd TEACHER DATA OUT'")
        with safe_open(str(p), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        missing = {"mean", "V", "singular_values"} - set(tensors)
        if missing or "kdforge_svd" not in header:
            raise ValueError(f"{str(p)!r} is not a kdforge SVD file (missing {sorted(missing) or 'metadata'})")
        meta = json.loads(header["kdforge_svd"])
        if meta.get("format") != FORMAT:
            raise ValueError(f"{str(p)!r}: unsupported format {meta.get('format')!r} (expected {FORMAT})")
        n = meta.pop("n_samples", None)
        saved_k = meta.pop("k", None)
        for key in ("format", "dim", "num_components"):
            meta.pop(key, None)
        obj = cls(tensors["mean"], tensors["V"], tensors["singular_values"], n_samples=n,
                  k=min(saved_k or tensors["V"].shape[1], tensors["V"].shape[1]), meta=meta,
                  channel_var=tensors.get("channel_var"))
        return obj.truncated(k) if k is not None else obj


class StreamingPCA:
    """One-pass float64 mean and scatter matrix of (B, D) batches, then PCA.

    Pairwise update (Chan, Golub & LeVeque 1979) of ``n``, ``mean`` (D,) and ``M2 = Σ (x-mean)(x-mean)ᵀ``
    (D, D); memory is O(D²), independent of N. ``merge`` combines accumulators (e.g. from several
    ranks). :meth:`finalize` returns an :class:`SVDAligner` whose ``V`` are the eigenvectors of ``M2``
    (= right singular vectors of the centred data) and ``singular_values = sqrt(eigenvalues)``.

    Accumulates on the batches' device (CPU for MPS, which has no float64).
    """

    def __init__(self, dim: Optional[int] = None, device: Optional[torch.device | str] = None):
        self.dim = dim
        self.device = torch.device(device) if device is not None else None
        self.n = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None

    def _init(self, dim: int, device: torch.device) -> None:
        if device.type == "mps":
            device = torch.device("cpu")
        self.dim = dim
        self.device = self.device or device
        self.mean = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, batch: Tensor) -> "StreamingPCA":
        """Add a batch of features (B, D) (any float dtype / device)."""
        b = _as_2d(batch, self.dim if self.mean is not None else None)
        if self.mean is None:
            self._init(b.shape[1], b.device)
        x = b.detach().to(self.device, torch.float64)
        nb = x.shape[0]
        if nb == 0:
            return self
        mb = x.mean(0)
        xc = x - mb
        self._combine(nb, mb, xc.T @ xc)
        return self

    def _combine(self, nb: int, mb: Tensor, m2b: Tensor) -> None:
        na = self.n
        n = na + nb
        delta = mb - self.mean
        self.mean += delta * (nb / n)
        self.m2 += m2b + torch.outer(delta, delta) * (na * nb / n)
        self.n = n

    def merge(self, other: "StreamingPCA") -> "StreamingPCA":
        """Fold another accumulator (same D) into this one."""
        if other.n == 0:
            return self
        if self.mean is None:
            self._init(other.dim, other.mean.device)
        if other.dim != self.dim:
            raise ValueError(f"StreamingPCA.merge: width {other.dim} vs {self.dim}")
        self._combine(other.n, other.mean.to(self.device), other.m2.to(self.device))
        return self

    def covariance(self) -> Tensor:
        """Unbiased covariance ``M2 / (N - 1)`` (D, D), float64."""
        if self.n < 2:
            raise ValueError(f"StreamingPCA: need at least 2 samples, got {self.n}")
        return self.m2 / (self.n - 1)

    def state(self) -> dict:
        """``{"n", "mean", "m2"}`` (for checkpoints and cross-rank reduction)."""
        return {"n": self.n, "mean": self.mean, "m2": self.m2}

    @torch.no_grad()
    def finalize(self, k: Optional[int] = None, sign_convention: bool = True, **meta: Any) -> SVDAligner:
        """Principal directions of the accumulated data: ``eigh(M2)`` in float64, descending.

        Keeps the top ``k`` directions (default: ``min(N - 1, D)``, the non-trivial ones) and all
        ``D`` singular values (clamped at 0 before the square root).
        """
        if self.n < 2:
            raise ValueError(f"StreamingPCA: need at least 2 samples, got {self.n}")
        m2 = (self.m2 + self.m2.T) / 2
        evals, evecs = torch.linalg.eigh(m2.cpu())      # ascending
        evals, evecs = evals.flip(0), evecs.flip(1)
        s = evals.clamp_min(0).sqrt()
        rank = min(self.n - 1, self.dim)
        keep = rank if k is None else int(k)
        if not 0 < keep <= self.dim:
            raise ValueError(f"StreamingPCA.finalize: k={keep} for width {self.dim}")
        v = evecs[:, :keep]
        if sign_convention:
            v = canonical_signs(v)
        meta = {"method": "streaming_eigh", "sign_convention": SIGN_CONVENTION if sign_convention else "none",
                **meta}
        return SVDAligner(self.mean.cpu(), v, s, n_samples=self.n, k=keep, meta=meta,
                          channel_var=torch.diagonal(self.m2).cpu() / (self.n - 1))


def subspace_distance(a: Tensor, b: Tensor) -> float:
    """``||A Aᵀ - B Bᵀ||_F`` for (D, k) matrices with orthonormal columns: 0 iff same subspace.

    Sign- and rotation-invariant comparison of principal subspaces (useful for degenerate spectra).
    """
    a, b = a.double(), b.double()
    return float(torch.linalg.matrix_norm(a @ a.T - b @ b.T))
