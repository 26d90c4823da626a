"""``kdforge train CONFIG [KEY=VALUE ...]``."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser(
        "train", help="train any method from a YAML preset with dotted overrides",
        description="Train a method from a YAML preset. Overrides are dotted KEY=VALUE pairs, e.g. "
                    "'kdforge train configs/kd/digits_cpu.yaml train.epochs=3 optim.lr=0.01'. "
                    "resume=true continues from OUT/last.pt. Multi-GPU: torchrun --nproc_per_node=N -m "
                    "kdforge.cli train ...")
    p.add_argument("config", help="YAML preset (configs/<method>/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides KEY=VALUE (values are YAML)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def run(args) -> int:
    import yaml

    from kdforge.config import load_config, to_dict
    from kdforge.engine.trainer import train
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    res = train(cfg)
    metrics = " ".join(f"{k}={v:.2f}" for k, v in res.metrics.items())
    print(f"done: {res.run_dir} step {res.step} in {res.seconds:.1f}s {metrics}")
    return 0
