"""Trainer overhead: the same KD step run by kdforge's trainer and by a minimal hand-written loop.

Both runs use the same timm student and teacher, the same synthetic images
(:class:`kdforge.data.datasets.SyntheticDataset`, ``data.synthetic=N``: no disk, no decode), the same
batch size, AdamW, and the same loss ``(1-α)·CE + α·kd_kl``. Throughput is the median images/s of
``--window``-step windows after the first window (warm-up), so start-up, the final checkpoint
write and compilation are excluded from both. Goal: kdforge ≥ 0.95× the bare loop.

    python benchmarks/trainer_overhead.py                       # CPU defaults (about a minute on 2 cores)
    python benchmarks/trainer_overhead.py --device cuda --img-size 224 --batch-size 128 --amp bf16
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kdforge.config import load_config
from kdforge.data.datasets import SyntheticDataset
from kdforge.engine.trainer import train
from kdforge.losses import kd_kl
from kdforge.models import create_model


def bare_loop(args, device) -> list[float]:
    """Images/s of each window of ``args.window`` steps (a plain PyTorch KD loop)."""
    torch.manual_seed(0)
    student = create_model(args.student, num_classes=args.classes, img_size=args.img_size).to(device)
    teacher = create_model(args.teacher, num_classes=args.classes, img_size=args.img_size).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.05)
    ds = SyntheticDataset(args.images, args.classes, args.img_size)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    rates, n, t0 = [], 0, time.perf_counter()
    steps = 0
    while steps < args.steps:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                with torch.no_grad():
                    t = teacher(x)
                s = student(x)
                loss = 0.1 * F.cross_entropy(s.float(), y) + 0.9 * kd_kl(s, t, 4.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            n += 1
            if n == args.window:
                loss.item()  # the trainer also syncs once per log window
                now = time.perf_counter()
                rates.append(n * args.batch_size / (now - t0))
                n, t0 = 0, now
            if steps >= args.steps:
                break
    return rates


def kdforge_run(args, device) -> list[float]:
    """Images/s of each log window of the kdforge trainer on the same step."""
    out = Path(tempfile.mkdtemp(prefix="kdf_bench_")) / "run"
    epochs = -(-args.steps // (args.images // args.batch_size))
    cfg = load_config(data={
        "method": {"name": "kd", "temperature": 4.0, "alpha": 0.9},
        "data": {"synthetic": args.images, "synthetic_classes": args.classes, "img_size": args.img_size,
                 "batch_size": args.batch_size, "num_workers": args.workers, "val_split": None},
        "model": {"name": args.student},
        "teacher": {"name": args.teacher, "num_classes": args.classes},
        "optim": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.05},
        "sched": {"name": "cosine", "warmup_epochs": 0},
        "train": {"epochs": epochs, "max_steps": args.steps, "device": str(device), "amp": args.amp,
                  "log_every": args.window, "save_every": 10 ** 6, "val_every": 0, "progress": False},
        "out": str(out)})
    train(cfg)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["img_per_s"] for r in recs if "img_per_s" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="deit_tiny_patch16_224")
    p.add_argument("--teacher", default="resnet18")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--images", type=int, default=1024, help="synthetic images per epoch")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--window", type=int, default=10, help="steps per timing window")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--repeats", type=int, default=2, help="alternate bare/kdforge this many times")
    args = p.parse_args()
    device = torch.device(args.device)
    bare, kdf = [], []
    for _ in range(args.repeats):  # alternate, so drift in machine load hits both
        bare += bare_loop(args, device)[1:]
        kdf += kdforge_run(args, device)[1:]
    b, k = statistics.median(bare), statistics.median(kdf)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; student {args.student}, teacher {args.teacher}, {args.img_size} px, batch "
          f"{args.batch_size}, amp {args.amp}, {args.steps} steps x {args.repeats} repeats, window {args.window}")
    print(f"bare loop : {b:9.1f} img/s (median of {len(bare)} windows)")
    print(f"kdforge   : {k:9.1f} img/s (median of {len(kdf)} windows)")
    print(f"ratio     : {k / b:.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
