"""``kdforge export RUN --format safetensors``: backbone-only student weights with timm/torchvision keys."""
from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("export", help="export a run's student backbone (safetensors, timm/torchvision keys)",
                       description="Write the student's backbone weights (no classifier) so that "
                                   "create_model(NAME, num_classes=0) loads them with strict=True.")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--format", choices=["safetensors", "pth", "torchvision", "detectron2"], default="safetensors",
                   help="safetensors/pth: the model's own keys; torchvision: torchvision key names, no classifier "
                        "(ResNet, MobileNetV2); detectron2: a Detectron2 .pkl (KDEP transfer)")
    p.add_argument("--which", choices=["best", "last"], default="best")
    p.add_argument("--with-head", action="store_true", help="keep the classifier weights")
    p.add_argument("-o", "--output", help="output file (default RUN/export/backbone.<format>; torchvision: "
                   "backbone_torchvision.safetensors, detectron2: backbone_detectron2.pkl)")
    return p


def _backbone_via_method(run: str, which: str):
    """(backbone model, meta) of a run whose student is not the plain backbone (detector, segmenter),
    via the method's ``export_backbone``; None for every other run."""
    from kdforge.engine.checkpoint import available, load_checkpoint
    from kdforge.engine.trainer import build_method, config_of_checkpoint
    from kdforge.methods import get_method
    from kdforge.models import create_model, load_state_dict_checked
    p = Path(run)
    ckpt = load_checkpoint(p, available(p, which))
    if not getattr(get_method(ckpt["method"]), "export_via_method", False):
        return None
    cfg = config_of_checkpoint(ckpt)
    method = build_method(cfg, ckpt["num_classes"], with_teacher=False)
    student = {k[len("student."):]: v for k, v in ckpt["model"].items() if k.startswith("student.")}
    load_state_dict_checked(method.student, student, strict=True, source=f"run {run} ({which})")
    backbone = create_model(cfg.model.name, num_classes=0, in_chans=cfg.data.in_chans, img_size=cfg.data.img_size,
                            **cfg.model.kwargs)
    load_state_dict_checked(backbone, method.export_backbone(), strict=True, source=f"{run}: exported backbone")
    return backbone, {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scaler")}


def export_run(run: str, fmt: str = "safetensors", which: str = "best", output: str | None = None,
               with_head: bool = False) -> Path:
    import torch

    from kdforge.models import backbone_state_dict, load_model_from_run
    dense = _backbone_via_method(run, which)
    model, meta = dense if dense is not None else load_model_from_run(run, which=which)
    base = Path(run) if Path(run).is_dir() else Path(run).parent
    if fmt in ("torchvision", "detectron2"):
        from kdforge.export import export_downstream
        ext = "pkl" if fmt == "detectron2" else "safetensors"
        return export_downstream(model, fmt, Path(output) if output else base / "export" / f"backbone_{fmt}.{ext}")
    state = {k: v.contiguous() for k, v in (model.state_dict() if with_head else backbone_state_dict(model)).items()}
    lib, arch, kw = model.kdforge_spec
    info = {"kdforge_name": model.kdforge_name, "library": lib, "architecture": arch,
            "kwargs": json.dumps(kw, default=list), "with_head": str(with_head), "method": meta.get("method", "")}
    out = Path(output) if output else base / "export" / f"backbone.{fmt}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(state, str(out), metadata={k: str(v) for k, v in info.items()})
    else:
        torch.save({"state_dict": state, "meta": info}, out)
    return out


def run(args) -> int:
    out = export_run(args.run, args.format, args.which, args.output, args.with_head)
    print(f"wrote {out}")
    return 0
