"""Method registry. A method is a :class:`kdforge.methods.base.Method` subclass in its own module.

Registered lazily by ``name -> "module:Class"`` so that importing kdforge stays cheap and a method
module is only imported when used. ``register_method`` adds third-party methods at run time.
"""
from __future__ import annotations

import importlib
from typing import Any

from kdforge.config import ConfigError, from_dict

_REGISTRY: dict[str, str | type] = {
    "supervised": "kdforge.methods.supervised:Supervised",
    "kd": "kdforge.methods.kd:KD",
    "vkd": "kdforge.methods.vkd:VkD",
    "kdep": "kdforge.methods.kdep:KDEP",
    "moco": "kdforge.methods.moco:MoCo",
    "seed": "kdforge.methods.seed:SEED",
    "ibot": "kdforge.methods.ibot:IBOT",
    "smkd": "kdforge.methods.smkd:SMKD",
    "attnprobe": "kdforge.methods.attnprobe:AttnProbe",
    "detect": "kdforge.methods.detect:Detect",
    "vkd_dense": "kdforge.methods.vkd_dense:VkDDense",
    "segment": "kdforge.methods.segment:Segment",
}


def register_method(name: str, cls: type) -> None:
    _REGISTRY[name] = cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type:
    if name not in _REGISTRY:
        raise ConfigError(f"method.name: unknown method {name!r}; available: {', '.join(available_methods())}")
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        module, cls = entry.split(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                raise ConfigError(f"method.name: method {name!r} is not implemented in this version "
                                  f"(module {module} missing)") from None
            raise
        entry = getattr(mod, cls)
        _REGISTRY[name] = entry
    return entry


def method_config(method: dict) -> Any:
    """Validate ``{name: ..., **hyper}`` against the method's ``Config`` dataclass."""
    if not isinstance(method, dict) or "name" not in method:
        raise ConfigError("method.name: expected a mapping with a name, e.g. method: {name: kd}")
    cls = get_method(method["name"])
    args = {k: v for k, v in method.items() if k != "name"}
    return from_dict(cls.Config, args, prefix="method")
