"""Shared fixtures: the bundled digits written once per session, and tiny run configs."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    from kdforge.data.digits import write_digits
    return write_digits(tmp_path_factory.mktemp("data") / "digits")


def tiny_overrides(root, out, **extra) -> list[str]:
    """Overrides that make any digits preset run in a second or two."""
    base = {"data.root": str(root), "out": str(out), "data.img_size": 16, "data.batch_size": 32,
            "train.epochs": 1, "train.progress": False, "train.device": "cpu", "train.log_every": 1}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny():
    return tiny_overrides
