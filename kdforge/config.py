"""Typed experiment configs: dataclasses loaded from YAML presets plus dotted overrides.

One YAML file describes one run::

    method: {name: kd, temperature: 4.0, alpha: 0.9}
    data: {root: runs/digits, img_size: 32, batch_size: 64}
    model: {name: kdf_vit_micro}
    teacher: {name: kdf_resnet_wide, checkpoint: runs/teacher}
    optim: {name: adamw, lr: 1.0e-3}
    train: {epochs: 10}

``kdforge train preset.yaml optim.lr=0.01 train.epochs=3`` applies dotted overrides (values are
parsed as YAML scalars). Every key is checked against the dataclasses below before any work starts:
an unknown key, a wrong type or an impossible value raises :class:`ConfigError` with one line that
names the key and what was expected. Method hyper-parameters live under ``method`` and are checked
against the method's own ``Config`` dataclass (see :mod:`kdforge.methods`).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or an impossible value."""


# ----------------------------------------------------------------------------------------------
# Generic dataclass <-> dict machinery
# ----------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:                     # Optional[X]: X's own message names the real problem
            raise errors[0]
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and typing.get_args(tp):
            value = [value]  # a scalar where a list is expected: a list of one
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types, then validate."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{key}: unknown key{hint}")
        kwargs[k] = _coerce(v, hints[k], key)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain dict of YAML-safe values."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def require(cond: bool, key: str, expected: str, got: Any) -> None:
    """Raise ``ConfigError('key: expected ..., got ...')`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def _k(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ----------------------------------------------------------------------------------------------
# Config sections
# ----------------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    """Where the images are and how they are batched.

    ``root`` holds ``train/``, ``val/``, ``test/`` ImageFolder splits (``val``/``test`` optional).
    """
    root: str = ""
    train_split: str = "train"
    val_split: Optional[str] = "val"
    img_size: int = 224
    batch_size: int = 64
    num_workers: int = 0
    in_chans: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    train_transform: Literal["standard", "cifar", "pad_crop", "none"] = "standard"
    eval_crop_pct: float = 0.875
    on_corrupt: Literal["skip", "fail"] = "skip"
    drop_last: bool = True
    require_root: bool = True
    #: > 0: ignore ``root`` and train/validate on this many random, already-normalised images of
    #: ``synthetic_classes`` classes (benchmarks and hardware smoke tests; nothing is read from disk)
    synthetic: int = 0
    synthetic_classes: int = 10

    def validate(self, prefix: str = "data") -> None:
        require(self.batch_size > 0, _k(prefix, "batch_size"), "a positive integer", self.batch_size)
        require(self.img_size > 0, _k(prefix, "img_size"), "a positive integer", self.img_size)
        require(self.num_workers >= 0, _k(prefix, "num_workers"), "an integer >= 0", self.num_workers)
        require(len(self.mean) == len(self.std), _k(prefix, "std"), f"{len(self.mean)} values like mean",
                list(self.std))
        require(all(s > 0 for s in self.std), _k(prefix, "std"), "positive values", list(self.std))
        require(len(self.mean) == self.in_chans, _k(prefix, "mean"), f"{self.in_chans} values (one per channel)",
                list(self.mean))
        require(0 < self.eval_crop_pct <= 1, _k(prefix, "eval_crop_pct"), "a number in (0, 1]", self.eval_crop_pct)
        require(self.synthetic >= 0, _k(prefix, "synthetic"), "an integer >= 0 (0: real data)", self.synthetic)
        require(self.synthetic_classes > 0, _k(prefix, "synthetic_classes"), "a positive integer",
                self.synthetic_classes)


@dataclass
class ModelConfig:
    """A backbone by timm/torchvision name (see :func:`kdforge.models.create_model`)."""
    name: str = "resnet18"
    num_classes: Optional[int] = None          # None: the number of classes of the training data
    weights: Optional[str] = None              # local .safetensors/.pth with backbone weights
    checkpoint: Optional[str] = None           # a kdforge run dir or checkpoint file (teachers)
    strict: bool = True
    kwargs: dict = field(default_factory=dict)  # passed to the model constructor

    def validate(self, prefix: str = "model") -> None:
        require(bool(self.name), _k(prefix, "name"), "a model name", self.name)
        if self.num_classes is not None:
            require(self.num_classes >= 0, _k(prefix, "num_classes"), "an integer >= 0", self.num_classes)
        for key in ("weights", "checkpoint"):
            p = getattr(self, key)
            if p is not None:
                require(os.path.exists(p), _k(prefix, key), "an existing file or run folder", p)
        for k in self.kwargs:
            if not (isinstance(k, str) and k.isidentifier()):
                hint = (f"; in a YAML flow mapping put a space after the colon: {{{k.replace(':', ': ', 1)}}}"
                        if isinstance(k, str) and ":" in k else "")
                raise ConfigError(f"{_k(prefix, 'kwargs')}: {k!r} is not a constructor argument name{hint}")
            if k in _SET_ELSEWHERE:
                raise ConfigError(f"{_k(prefix, 'kwargs')}: {k!r} is set by {_SET_ELSEWHERE[k]}; remove it from "
                                  f"{_k(prefix, 'kwargs')} and set {_SET_ELSEWHERE[k]} instead")


# model constructor arguments the trainer fills from other keys (a duplicate in model.kwargs would crash)
_SET_ELSEWHERE = {"img_size": "data.img_size", "in_chans": "data.in_chans", "num_classes": "model.num_classes",
                  "weights": "model.weights", "strict": "model.strict"}


@dataclass
class OptimConfig:
    """Optimizer. ``lr`` is for ``ref_batch`` images per step and scaled linearly with the global
    batch when ``ref_batch`` is set (lr_eff = lr · global_batch / ref_batch)."""
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = 0.1
    weight_decay: float = 1e-4
    weight_decay_end: Optional[float] = None    # cosine schedule of weight decay (iBOT/DINO)
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    ref_batch: Optional[int] = None

    def validate(self, prefix: str = "optim") -> None:
        require(self.lr > 0, _k(prefix, "lr"), "a positive number", self.lr)
        require(self.weight_decay >= 0, _k(prefix, "weight_decay"), "a number >= 0", self.weight_decay)
        require(0 <= self.momentum < 1, _k(prefix, "momentum"), "a number in [0, 1)", self.momentum)
        if self.ref_batch is not None:
            require(self.ref_batch > 0, _k(prefix, "ref_batch"), "a positive integer", self.ref_batch)


@dataclass
class SchedConfig:
    """Learning-rate schedule, evaluated every iteration: linear warmup then cosine / step / constant."""
    name: Literal["cosine", "step", "constant", "poly"] = "cosine"
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.0
    min_lr: float = 0.0
    milestones: list[int] = field(default_factory=list)  # epochs (step schedule)
    gamma: float = 0.1
    power: float = 0.9                          # poly schedule: (1 - t) ** power (DeepLab / PSPNet)

    def validate(self, prefix: str = "sched") -> None:
        require(self.warmup_epochs >= 0, _k(prefix, "warmup_epochs"), "a number >= 0", self.warmup_epochs)
        require(self.min_lr >= 0, _k(prefix, "min_lr"), "a number >= 0", self.min_lr)
        require(0 < self.gamma <= 1, _k(prefix, "gamma"), "a number in (0, 1]", self.gamma)
        require(list(self.milestones) == sorted(self.milestones), _k(prefix, "milestones"),
                "increasing epochs", self.milestones)


@dataclass
class TrainConfig:
    """The training loop."""
    epochs: int = 10
    seed: int = 0
    device: str = "auto"                       # auto | cpu | cuda | cuda:1
    amp: Literal["none", "bf16", "fp16"] = "none"
    clip_grad: float = 0.0                     # 0: off
    clip_mode: Literal["norm", "per_tensor"] = "norm"
    log_every: int = 10
    val_every: int = 1                         # epochs; 0: never
    save_every: int = 1                        # epochs
    best_metric: Optional[str] = None          # default: the method's own
    channels_last: bool = False
    compile: bool = False
    cpu_linear: Literal["torch", "onednn"] = "torch"   # onednn: nn.Linear GEMMs on oneDNN on CPU (float32)
    find_unused_parameters: bool = False
    deterministic: bool = False
    max_steps: Optional[int] = None            # stop (and save) after this many optimizer steps
    progress: bool = True

    def validate(self, prefix: str = "train") -> None:
        require(self.epochs > 0, _k(prefix, "epochs"), "a positive integer", self.epochs)
        require(self.clip_grad >= 0, _k(prefix, "clip_grad"), "a number >= 0", self.clip_grad)
        require(self.log_every > 0, _k(prefix, "log_every"), "a positive integer", self.log_every)
        require(self.val_every >= 0, _k(prefix, "val_every"), "an integer >= 0", self.val_every)
        require(self.save_every > 0, _k(prefix, "save_every"), "a positive integer", self.save_every)
        ok = self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")
        require(ok, _k(prefix, "device"), "auto | cpu | cuda | cuda:N", self.device)
        if self.max_steps is not None:
            require(self.max_steps > 0, _k(prefix, "max_steps"), "a positive integer", self.max_steps)


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "kdforge"


@dataclass
class Config:
    """A whole run. ``method`` is a mapping ``{name: ..., <hyper-parameters>}``."""
    method: dict = field(default_factory=lambda: {"name": "supervised"})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: Optional[ModelConfig] = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    out: str = "runs/run"
    resume: bool = False
    init_from: Optional[str] = None            # warm start from a run/checkpoint (weights only)

    def validate(self, prefix: str = "") -> None:
        if not isinstance(self.method, dict) or "name" not in self.method:
            raise ConfigError("method.name: expected a method name, e.g. method: {name: kd}")
        from kdforge.methods import method_config  # late import: methods import config
        method_config(self.method)  # raises ConfigError on bad method keys
        if self.data.require_root and not self.data.synthetic:
            root = Path(self.data.root)
            require(bool(self.data.root), "data.root", "a dataset folder", self.data.root)
            if not root.is_dir():
                raise ConfigError(f"data.root: folder {str(root)!r} does not exist; create it (e.g. "
                                  f"'kdforge data digits {root}') or point data.root at your dataset")
            split = root / self.data.train_split
            if not split.is_dir():
                raise ConfigError(f"data.train_split: {str(split)!r} is not a folder; expected "
                                  f"ROOT/{self.data.train_split}/<class>/<image> (ImageFolder layout)")
        if self.init_from is not None:
            require(os.path.exists(self.init_from), "init_from", "an existing run folder or file",
                    self.init_from)

    @property
    def method_name(self) -> str:
        return self.method["name"]

    def method_args(self) -> Any:
        """The method's own typed config (its ``Config`` dataclass)."""
        from kdforge.methods import method_config
        return method_config(self.method)


# ----------------------------------------------------------------------------------------------
# YAML + overrides
# ----------------------------------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=0.01'`` -> (['optim', 'lr'], 0.01). Values are YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. optim.lr=0.01")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested dict (creating sections as needed)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(path[:i + 1])}: is a value, not a section; cannot set "
                                  f"{'.'.join(path)}")
            node = nxt
        node[path[-1]] = value
    return data


def load_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; presets live in configs/<method>/")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: expected a mapping at the top level")
    base = data.pop("_base_", None)  # simple inheritance: _base_: ../other.yaml
    if base:
        merged = load_yaml(p.parent / base)
        data = deep_merge(merged, data)
    return data


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> Config:
    """YAML preset (and/or dict) + dotted overrides -> validated :class:`Config`."""
    raw = load_yaml(path) if path is not None else {}
    if data:
        raw = deep_merge(raw, data)
    raw = apply_overrides(raw, list(overrides or []))
    return from_dict(Config, raw)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
