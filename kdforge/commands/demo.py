"""``kdforge demo``: every method on the bundled digits, one report table."""
from __future__ import annotations


def add_parser(sub):
    from kdforge.demo.core import ROWS
    p = sub.add_parser("demo", help="run every method on the bundled digits data and print one table",
                       description="Writes the digits ImageFolder, trains a teacher CNN, then each method's "
                                   f"demo row ({', '.join(ROWS)}), and writes OUT/report.md. Re-running reuses "
                                   "finished runs in OUT.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--rows", default=None, help=f"comma-separated subset of rows ({','.join(ROWS)})")
    p.add_argument("--quick", action="store_true", help="one seed, few epochs (smoke test)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
    return p


def run(args) -> int:
    from kdforge.demo.core import run_demo
    rows = args.rows.split(",") if args.rows else None
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    results, report = run_demo(args.out, rows, args.quick, seeds)
    print(report.read_text())
    print(f"report written to {report}")
    return 0
