"""``kdforge data digits OUT``: write the bundled scikit-learn digits as a PNG ImageFolder."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("digits", help="write scikit-learn's 1,797 handwritten digits as OUT/{train,val,test}/<class>/*.png",
                       description="Write the bundled real digits data (8x8 grayscale PNGs) with a fixed "
                                   "stratified train/val/test split (60/15/25%%).")
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--force", action="store_true", help="rewrite even if OUT already holds the data")
    return p


def run(args) -> int:
    from kdforge.data.digits import write_digits
    out = write_digits(args.out, seed=args.seed, force=args.force)
    import json
    meta = json.loads((out / "dataset.json").read_text())
    print(f"wrote digits to {out}: " + ", ".join(f"{k} {v}" for k, v in meta["counts"].items()))
    return 0
