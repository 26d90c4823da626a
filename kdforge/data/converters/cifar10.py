"""``kdforge data cifar10 SRC OUT [--val N]``: CIFAR-10 (``cifar-10-batches-py`` or its .tar.gz) as a PNG
ImageFolder ``OUT/{train,[val,]test}/<class>/<index>.png``. See :mod:`kdforge.data.converters.cifar`."""
from __future__ import annotations

from kdforge.data.converters.cifar import add_common, run_spec


def add_parser(sub):
    p = sub.add_parser("cifar10", help="CIFAR-10 python pickles (folder or .tar.gz) as a PNG ImageFolder",
                       description="Write CIFAR-10 as OUT/{train,test}/<class>/<index>.png (50,000 / 10,000 "
                                   "32x32 PNGs, class names from batches.meta); --val N moves N train images "
                                   "per class to OUT/val (seeded). Get cifar-10-python.tar.gz from "
                                   "https://www.cs.toronto.edu/~kriz/cifar.html.")
    add_common(p, "cifar10")
    return p


def run(args) -> int:
    return run_spec(args, "cifar10")
