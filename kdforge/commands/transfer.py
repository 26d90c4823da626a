"""``kdforge transfer detect|segment PRESET [KEY=VALUE ...]``: dense transfer of a backbone.

Fine-tunes a detector (``detect``: COCO box mAP) or a segmenter (``segment``: mIoU) on a kdforge
backbone through the one trainer, then scores the val-selected checkpoint (``best.pt``) and the last
one on the test split, and writes ``OUT/transfer.json``. ``--backbone`` takes a kdforge run (e.g. a
KDEP or VkD pre-training) or an exported ``.safetensors`` file; without it the backbone is as the
preset says (random init unless ``model.weights``). Presets: ``configs/dense/`` (the KDEP recipes and
their CPU twins). Classification transfer stays ``kdforge eval transfer``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

TASKS = {"detect": ("detect", "vkd_dense"), "segment": ("segment",)}
PRIMARY = {"detect": "AP", "segment": "mIoU"}


def dense_transfer(task: str, preset: str, overrides: Optional[list[str]] = None, backbone: Optional[str] = None,
                   data: Optional[str] = None, out: Optional[str] = None, test_split: str = "test") -> dict:
    """Run the transfer (see the module docstring); returns the report written to ``OUT/transfer.json``."""
    from kdforge.config import ConfigError, load_config
    from kdforge.engine.trainer import evaluate_run, train
    if task not in TASKS:
        raise ConfigError(f"transfer: task must be one of {', '.join(TASKS)}, got {task!r}")
    extra = list(overrides or [])
    if backbone:
        extra.append(f"method.backbone={backbone}")
    if data:
        extra.append(f"data.root={data}")
    if out:
        extra.append(f"out={out}")
    cfg = load_config(preset, extra)
    if cfg.method_name not in TASKS[task]:
        raise ConfigError(f"method.name: 'transfer {task}' runs {' | '.join(TASKS[task])}, the preset has "
                          f"{cfg.method_name!r}; use 'kdforge transfer "
                          f"{'segment' if task == 'detect' else 'detect'}' or another preset")
    res = train(cfg)
    run = Path(cfg.out)
    key = PRIMARY[task]
    report = {"task": task, "method": cfg.method_name, "preset": str(preset), "run": str(run),
              "backbone": backbone or cfg.method.get("backbone") or cfg.model.weights, "model": cfg.model.name,
              "val_best": res.best, "val_last": res.metrics, "seconds": res.seconds, "params": res.params}
    has_test = False
    for which in ("best", "last"):
        try:
            m = evaluate_run(run, test_split, which=which, device=cfg.train.device)
        except FileNotFoundError:
            break
        has_test = True
        report[f"{test_split}_at_{'val_best' if which == 'best' else 'last'}"] = m
    report["summary"] = (f"{key}: val best {res.best if res.best is not None else float('nan'):.2f}"
                         + (f", {test_split} {report[f'{test_split}_at_val_best'].get(f'{test_split}/{key}', float('nan')):.2f}"
                            if has_test else ""))
    (run / "transfer.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def add_parser(sub):
    p = sub.add_parser("transfer", help="dense transfer: fine-tune a detector or segmenter on a backbone",
                       description="Fine-tune a torchvision detector (detect: Faster R-CNN / RetinaNet / FCOS + "
                                   "FPN, COCO mAP) or segmenter (segment: DeepLabV3 / FCN, mIoU) on a kdforge "
                                   "backbone, select on val, score test. Example: 'kdforge transfer detect "
                                   "configs/dense/digits_detect_cpu.yaml train.epochs=3 --backbone runs/kdep_digits' "
                                   "(KEY=VALUE overrides go before the --options).")
    p.add_argument("task", choices=sorted(TASKS), help="detect | segment")
    p.add_argument("config", help="preset (configs/dense/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides KEY=VALUE")
    p.add_argument("--backbone", help="backbone weights: a kdforge run folder/checkpoint or a .safetensors/.pth file")
    p.add_argument("--data", help="dataset root (overrides data.root)")
    p.add_argument("--out", help="run folder (overrides out)")
    p.add_argument("--test-split", default="test", help="split scored at the end (default test; skipped if absent)")
    return p


def run(args) -> int:
    rep = dense_transfer(args.task, args.config, args.overrides, args.backbone, args.data, args.out, args.test_split)
    print(f"done: {rep['run']} {rep['summary']} (report: {Path(rep['run']) / 'transfer.json'})")
    return 0
