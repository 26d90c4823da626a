"""Weight I/O that never loads silently.

``load_state_dict_checked`` compares keys and shapes and, when ``strict``, refuses any missing,
unexpected or mis-shaped key with a message that lists them; with ``strict=False`` it loads what
matches and returns (and logs) the report.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

log = logging.getLogger("kdforge")


class CheckpointMismatchError(RuntimeError):
    pass


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: ckpt (a, b) vs model (c, d)"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 8) -> str:
        parts = []
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                           ("shape mismatch", self.mismatched)):
            if keys:
                more = f" ... (+{len(keys) - limit})" if len(keys) > limit else ""
                parts.append(f"{len(keys)} {name}: {', '.join(keys[:limit])}{more}")
        return "; ".join(parts) or "all keys match"


def load_state_dict_checked(model: nn.Module, state: dict[str, Tensor], strict: bool = True,
                            source: str = "checkpoint", ignore_prefixes: tuple[str, ...] = ()) -> LoadReport:
    own = model.state_dict()
    rep = LoadReport()
    usable = {}
    ignored = lambda k: any(k == p or k.startswith(p + ".") for p in ignore_prefixes)  # noqa: E731
    for k, v in state.items():
        if k not in own:
            if not ignored(k):
                rep.unexpected.append(k)
        elif tuple(own[k].shape) != tuple(v.shape):
            rep.mismatched.append(f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}")
        else:
            usable[k] = v
    rep.missing = [k for k in own if k not in state and not ignored(k)]
    if strict and not rep.ok:
        raise CheckpointMismatchError(
            f"{source} does not match {type(model).__name__}: {rep.summary()}. Check the model name and "
            "kwargs, or load partially with strict=false (model.strict=false) to accept this.")
    model.load_state_dict(usable, strict=False)
    if not rep.ok:
        log.warning(f"partial load from {source}: {rep.summary()}")
    return rep


def read_weights_file(path: str | Path) -> dict[str, Tensor]:
    """A ``.safetensors`` file, or a ``.pth/.pt`` holding a state dict (possibly nested under
    ``state_dict`` / ``model`` / ``module``, with an optional ``module.`` prefix)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {str(p)!r} not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(p))
    obj = torch.load(p, map_location="cpu", weights_only=False)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"weights file {str(p)!r} does not hold a state dict")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def load_weights_file(model: nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    """Load a local weights file. A backbone-only file (no classifier keys) loads into a model
    with a classifier when ``strict``: the classifier stays freshly initialised and is reported."""
    from kdforge.models.factory import classifier_prefixes
    state = read_weights_file(path)
    heads = classifier_prefixes(model)
    has_head = any(k.startswith(h + ".") for k in state for h in heads)
    ignore = () if has_head else heads
    rep = load_state_dict_checked(model, state, strict=strict, source=f"weights file {path}", ignore_prefixes=ignore)
    if ignore:
        log.info(f"loaded backbone weights from {path}; classifier {', '.join(heads)} left at initialisation")
    return rep


def backbone_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict without classifier keys (loads into ``create_model(name, num_classes=0)``)."""
    from kdforge.models.factory import classifier_prefixes
    heads = classifier_prefixes(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not any(k == h or k.startswith(h + ".") for h in heads)}


def load_model_from_run(path: str | Path, which: str = "best", module: str = "student",
                        num_classes: Optional[int] = None) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by a kdforge run: ``RUN`` folder (``best.pt``, falling back to
    ``last.pt``) or a checkpoint file. Returns ``(model, checkpoint_meta)``; ``module`` selects the
    sub-module of the method whose weights are loaded (``student`` by default)."""
    from kdforge.engine.checkpoint import available, load_checkpoint
    from kdforge.models.factory import create_model
    p = Path(path)
    ckpt = load_checkpoint(p, available(p, which))
    cfg = ckpt["config"]
    mcfg = cfg["model"]
    if num_classes is not None:
        n_cls = num_classes
    elif mcfg.get("num_classes") is not None:  # as build_method: model.num_classes wins (unlabeled training data)
        n_cls = mcfg["num_classes"]
    else:
        n_cls = ckpt.get("num_classes", 0)
    head = ckpt.get("student_head", True)
    model = create_model(mcfg["name"], num_classes=n_cls if head else 0, in_chans=cfg["data"]["in_chans"],
                         img_size=cfg["data"]["img_size"], **(mcfg.get("kwargs") or {}))
    prefix = module + "."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointMismatchError(f"checkpoint {path} holds no '{module}' weights "
                                      f"(modules: {sorted({k.split('.')[0] for k in ckpt['model']})})")
    load_state_dict_checked(model, state, strict=True, source=f"run {path} ({which})")
    return model, {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scaler")}
