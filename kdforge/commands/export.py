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


def export_run(run: str, fmt: str = "safetensors", which: str = "best", output: str | None = None,
               with_head: bool = False) -> Path:
    import torch

    from kdforge.models import backbone_state_dict, load_model_from_run
    model, meta = load_model_from_run(run, which=which)
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
