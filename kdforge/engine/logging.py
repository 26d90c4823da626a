"""Run logging: one JSON line per log step in ``RUN/metrics.jsonl``, a text log ``RUN/log.txt``,
optional TensorBoard (``logging.tensorboard=true``) and wandb (only if ``logging.wandb=true``)."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("kdforge")


def setup_console_logging(level=logging.INFO) -> None:
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.setLevel(level)
        log.propagate = False


class RunLogger:
    """Writes metrics (main process only)."""

    def __init__(self, run_dir: Path, cfg, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.tb = None
        self.wandb = None
        self._jsonl = None
        self._text = None
        if not enabled:
            return
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self._text = open(self.run_dir / "log.txt", "a")
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("logging.tensorboard=true needs tensorboard: pip install 'kdforge[tensorboard]'") from None
            self.tb = SummaryWriter(str(self.run_dir / "tb"))
        if cfg.logging.wandb:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("logging.wandb=true needs wandb: pip install 'kdforge[wandb]'") from None
            from kdforge.config import to_dict
            self.wandb = wandb.init(project=cfg.logging.wandb_project, dir=str(self.run_dir), config=to_dict(cfg))

    def metrics(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **record}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self.tb is not None:
            for k, v in numeric.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)

    def text(self, msg: str) -> None:
        log.info(msg)
        if self.enabled:
            self._text.write(msg + "\n")
            self._text.flush()

    def close(self) -> None:
        for f in (self._jsonl, self._text):
            if f is not None:
                f.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
