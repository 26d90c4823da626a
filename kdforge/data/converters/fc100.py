"""``kdforge data fc100 SRC OUT``: FC100 (Oreshkin et al., TADAM, NeurIPS 2018) from the CIFAR-100 pickle.

FC100 splits CIFAR-100 by *super-class* so that train and test classes are semantically apart:
12 / 4 / 4 super-classes (60 / 20 / 20 fine classes) for train / val / test, 600 images per class.
``SRC`` is the ``cifar-100-python`` folder or archive. Output as for :mod:`.cifar_fs`:
``OUT/{train,val,test}/<fine class>/<split>_<index>.png`` plus ``OUT/dataset.json``.
"""
from __future__ import annotations

from kdforge.data.converters.cifar_fs import add_fewshot_split_parser, load_cifar100, write_cifar_split

#: FC100 super-class split (CIFAR-100 coarse label names).
FC100_TRAIN = ("fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
               "household_furniture", "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "reptiles",
               "trees", "vehicles_1", "vehicles_2")
FC100_VAL = ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals")
FC100_TEST = ("aquatic_mammals", "insects", "medium_mammals", "people")


def fc100_split(data: dict) -> dict[str, str]:
    """Fine class name -> split, from the super-class of each fine class in ``data`` (see
    :func:`kdforge.data.converters.cifar_fs.load_cifar100`)."""
    coarse_split = {c: "train" for c in FC100_TRAIN}
    coarse_split.update({c: "val" for c in FC100_VAL})
    coarse_split.update({c: "test" for c in FC100_TEST})
    missing = sorted(set(coarse_split) - set(data["coarse_names"]))
    if missing:
        raise ValueError(f"fc100: super-classes {missing} are not CIFAR-100 coarse classes")
    out = {}
    for f, c in zip(data["fine"], data["coarse"]):
        out[data["fine_names"][int(f)]] = coarse_split[data["coarse_names"][int(c)]]
    return out


def add_parser(sub):
    return add_fewshot_split_parser(sub, "fc100", "FC100 few-shot split (12/4/4 super-classes)",
                                    "FC100 (Oreshkin et al. 2018)")


def run(args) -> int:
    data = load_cifar100(args.src)
    write_cifar_split(data, fc100_split(data), args.out, "fc100", args.size)
    return 0
