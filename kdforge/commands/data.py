"""``kdforge data <converter> ...``: write datasets in kdforge's ImageFolder layout."""
from __future__ import annotations

import importlib


def add_parser(sub):
    from kdforge.data.converters import CONVERTERS
    p = sub.add_parser("data", help="write datasets in the ImageFolder layout (digits, converters, subsets)",
                       description="Dataset converters. Layout: ROOT/{train,val,test}/<class>/<image>.")
    conv = p.add_subparsers(dest="converter", metavar="CONVERTER")
    for name, module in CONVERTERS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        cp = mod.add_parser(conv)
        cp.set_defaults(_convert=mod.run)
    p.set_defaults(_parser=p)
    return p


def run(args) -> int:
    if not getattr(args, "_convert", None):
        args._parser.print_help()
        return 2
    return int(args._convert(args) or 0)
