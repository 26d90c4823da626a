"""``kdforge data cifar100 SRC OUT [--labels fine|coarse] [--val N]``: CIFAR-100 (``cifar-100-python`` or its
.tar.gz) as a PNG ImageFolder ``OUT/{train,[val,]test}/<class>/<index>.png``, with the 100 fine classes or
the 20 coarse super-classes. See :mod:`kdforge.data.converters.cifar`."""
from __future__ import annotations

from kdforge.data.converters.cifar import add_common, run_spec


def add_parser(sub):
    p = sub.add_parser("cifar100", help="CIFAR-100 python pickles (folder or .tar.gz) as a PNG ImageFolder",
                       description="Write CIFAR-100 as OUT/{train,test}/<class>/<index>.png (50,000 / 10,000 "
                                   "32x32 PNGs, class names from meta); --val N moves N train images per class "
                                   "to OUT/val (seeded). Get cifar-100-python.tar.gz from "
                                   "https://www.cs.toronto.edu/~kriz/cifar.html.")
    add_common(p, "cifar100")
    p.add_argument("--labels", choices=("fine", "coarse"), default="fine",
                   help="class folders: the 100 fine classes (default) or the 20 coarse super-classes")
    return p


def run(args) -> int:
    return run_spec(args, "cifar100")
