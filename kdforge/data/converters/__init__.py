"""``kdforge data <name>`` converters: one module each, exposing ``add_parser(sub)`` and ``run(args)``.

``CONVERTERS`` maps the sub-command name to its module; a missing module answers with a clear error.
"""
CONVERTERS: dict[str, str] = {
    "digits": "kdforge.data.converters.digits",
    "static-augs": "kdforge.data.converters.static_augs",
    "subset": "kdforge.data.converters.subset",
    "digits-fewshot": "kdforge.data.converters.digits_fewshot",
    "mini-imagenet": "kdforge.data.converters.mini_imagenet",
    "tiered-imagenet": "kdforge.data.converters.tiered_imagenet",
    "cifar-fs": "kdforge.data.converters.cifar_fs",
    "fc100": "kdforge.data.converters.fc100",
    "cifar": "kdforge.data.converters.cifar",
    "cifar10": "kdforge.data.converters.cifar10",
    "cifar100": "kdforge.data.converters.cifar100",
    "tiny-imagenet": "kdforge.data.converters.tiny_imagenet",
    "wild-pool": "kdforge.data.converters.wild_pool",
    "digits-detect": "kdforge.data.converters.digits_detect",
}
