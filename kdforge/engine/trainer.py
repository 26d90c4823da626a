"""The one trainer: runs any :class:`kdforge.methods.base.Method` from a validated :class:`Config`.

It owns devices, AMP, DDP (torchrun), per-iteration schedules, gradient clipping, checkpoints
(atomic ``last.pt`` / ``best.pt`` with model, optimizer, scaler, RNG, epoch, batch and step),
resume, logging and the non-finite-loss guard. Methods never touch any of it.
"""
from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from kdforge.config import Config, ConfigError, from_dict, save_config, to_dict
from kdforge.engine import distributed as D
from kdforge.engine.checkpoint import atomic_save, available, load_checkpoint, rng_state, set_rng_state
from kdforge.engine.logging import RunLogger, setup_console_logging
from kdforge.engine.schedules import cosine_value, lr_factor


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; no optimizer step was taken and no checkpoint was overwritten."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM received: ``last.pt`` was written; resume with ``resume=true``."""


@dataclass
class RunResult:
    run_dir: Path
    step: int
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)   # last validation
    best: Optional[float] = None
    seconds: float = 0.0
    params: int = 0
    corrupt_images: int = 0
    stopped_early: bool = False


# ------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", D.local_rank())
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {name!r} requested but CUDA is not available; use device=cpu")
        if name == "cuda":
            return torch.device("cuda", D.local_rank())
    return torch.device(name)


def amp_context(device: torch.device, amp: str):
    """A zero-argument factory of the autocast context for this device and precision."""
    if amp == "none":
        return contextlib.nullcontext
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp: fp16 needs a CUDA device; use amp=bf16 or amp=none on CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(batch, torch.Tensor):
        t = batch.to(device, non_blocking=True)
        if channels_last and t.ndim == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


def build_datasets(cfg: Config, method_cls) -> tuple[Any, Any]:
    """-> (train dataset, val dataset or None)."""
    from kdforge.data.datasets import ImageFolderDataset, UnlabeledFolder
    from kdforge.data.transforms import build_eval_transform
    d = cfg.data
    if d.synthetic:
        from kdforge.data.datasets import SyntheticDataset
        make = lambda n, seed: SyntheticDataset(n, d.synthetic_classes, d.img_size, d.in_chans, seed)  # noqa: E731
        return make(d.synthetic, 0), (make(max(d.batch_size, d.synthetic // 10), 1) if d.val_split else None)
    own = method_cls.build_dataset(cfg, cfg.data.train_split, True)
    if own is not None:  # the method reads its own data (detection, segmentation)
        return own, (method_cls.build_dataset(cfg, cfg.data.val_split, False) if cfg.data.val_split else None)
    root = Path(cfg.data.root)
    mode = "RGB" if cfg.data.in_chans == 3 else "L"
    train_dir = root / cfg.data.train_split
    tf = method_cls.train_transform(cfg)
    has_classes = any(p.is_dir() for p in train_dir.iterdir())
    if has_classes:
        train = ImageFolderDataset(train_dir, tf, cfg.data.on_corrupt, mode)
    elif method_cls.unlabeled_ok:
        train = UnlabeledFolder(train_dir, tf, cfg.data.on_corrupt, mode)
    else:
        raise ConfigError(f"data.train_split: {str(train_dir)!r} has no class folders; method "
                          f"{cfg.method_name!r} needs labels (ROOT/{cfg.data.train_split}/<class>/<image>)")
    val = None
    if cfg.data.val_split and (root / cfg.data.val_split).is_dir():
        val = ImageFolderDataset(root / cfg.data.val_split, build_eval_transform(cfg.data), cfg.data.on_corrupt,
                                 mode, classes=train.classes or None)
    return train, val


def eval_loader(dataset, cfg: Config, device: torch.device, collate_fn=None) -> DataLoader:
    """Sharded over ranks without padding, so metric sums over ranks are exact."""
    from kdforge.data.sampling import shard_indices
    ds = Subset(dataset, shard_indices(len(dataset), D.get_rank(), D.get_world_size())) \
        if D.is_dist() else dataset
    return DataLoader(ds, batch_size=cfg.data.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                      pin_memory=device.type == "cuda", collate_fn=collate_fn)


def build_teacher(cfg: Config, num_classes: int) -> Optional[nn.Module]:
    from kdforge.models import create_model, load_model_from_run
    t = cfg.teacher
    if t is None:
        return None
    if t.checkpoint:
        model, meta = load_model_from_run(t.checkpoint)
        return model
    n = t.num_classes if t.num_classes is not None else num_classes
    return create_model(t.name, num_classes=n, in_chans=cfg.data.in_chans, img_size=cfg.data.img_size,
                        weights=t.weights, strict=t.strict, **t.kwargs)


def config_of_checkpoint(ck: dict) -> Config:
    """The run's :class:`Config` from a checkpoint, made loadable anywhere: no data-folder check, and no
    weights / teacher / init_from / ``method.backbone`` files (the weights are in the checkpoint; those files
    may have moved)."""
    raw = ck["config"]
    raw = {**raw, "data": {**raw["data"], "require_root": False}}
    for key in ("model", "teacher"):
        if raw.get(key):
            raw[key] = {**raw[key], "weights": None, "checkpoint": None}
    raw["init_from"] = None
    if raw["method"].get("backbone") is not None:  # dense methods: backbone initialisation file
        raw["method"] = {**raw["method"], "backbone": None}
    return from_dict(Config, raw)


def build_method(cfg: Config, num_classes: int, with_teacher: bool = True):
    """Student (+ teacher) + method module, on CPU."""
    from kdforge.methods import get_method
    from kdforge.models import create_model
    method_cls = get_method(cfg.method_name)
    if method_cls.needs_teacher and with_teacher and cfg.teacher is None:
        raise ConfigError(f"teacher: method {cfg.method_name!r} needs a teacher; set teacher.name and "
                          "teacher.checkpoint (a kdforge run) or teacher.weights (a local file)")
    n_student = (cfg.model.num_classes if cfg.model.num_classes is not None else num_classes) \
        if method_cls.student_head else 0
    student = create_model(cfg.model.name, num_classes=n_student, in_chans=cfg.data.in_chans,
                           img_size=cfg.data.img_size, weights=cfg.model.weights, strict=cfg.model.strict,
                           **cfg.model.kwargs)
    teacher = method_cls.build_teacher(cfg, num_classes) if with_teacher else None
    return method_cls(cfg, student, teacher)


def build_optimizer(cfg: Config, method, global_batch: int) -> torch.optim.Optimizer:
    o = cfg.optim
    base_lr = o.lr * (global_batch / o.ref_batch if o.ref_batch else 1.0)
    groups = method.param_groups()
    if not groups:
        raise ConfigError(f"method {cfg.method_name!r} has no trainable parameters")
    for g in groups:
        g["base_lr"] = base_lr * g.get("lr_scale", 1.0)
        g["lr"] = g["base_lr"]
        g.setdefault("weight_decay", o.weight_decay)
        g["base_wd"] = g["weight_decay"]
    if o.name == "sgd":
        # Nesterov needs momentum: with momentum 0 it is plain SGD (torch would refuse the combination)
        return torch.optim.SGD(groups, lr=base_lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=base_lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    return torch.optim.Adam(groups, lr=base_lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def clip_gradients(params, max_norm: float, mode: str) -> None:
    if mode == "norm":
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:  # per tensor (DINO/iBOT): each gradient clipped to norm max_norm on its own
        for p in params:
            if p.grad is not None:
                n = p.grad.detach().norm(2)
                p.grad.mul_(torch.clamp(max_norm / (n + 1e-6), max=1.0))


class _SignalGuard:
    """Turns SIGINT/SIGTERM into a flag checked between steps (main thread only)."""

    def __init__(self):
        self.received: Optional[int] = None
        self._old = {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.received is not None:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------

def _onednn_linears(method, device: torch.device) -> str:
    """train.cpu_linear=onednn: the student's (and teacher's) nn.Linear layers on oneDNN; a log line."""
    from kdforge.engine.cpu_linear import use_onednn_linears
    from kdforge.eval._gemm import onednn_available
    if device.type != "cpu":
        return f"train.cpu_linear=onednn ignored: the run is on {device.type}, not cpu"
    if not onednn_available():
        return ("train.cpu_linear=onednn ignored: torch's oneDNN linear op is unavailable here "
                "(or not an x86-64 CPU, or KDFORGE_ONEDNN=0)")
    n = use_onednn_linears(method) + (use_onednn_linears(method.teacher) if method.teacher is not None else 0)
    return f"train.cpu_linear=onednn: {n} linear layers compute on oneDNN (float32, outside autocast)"


def train(cfg: Config) -> RunResult:
    """Train ``cfg`` to completion (or until interrupted / ``train.max_steps``). See module doc."""
    setup_console_logging()
    device_hint = resolve_device(cfg.train.device)
    D.init_from_env(device_hint.type)
    rank, world = D.get_rank(), D.get_world_size()
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    main = rank == 0
    tc = cfg.train
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    amp_ctx = amp_context(device, tc.amp)

    run_dir = Path(cfg.out)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if last_path.exists() and not cfg.resume:
        raise ConfigError(f"out: {str(run_dir)!r} already holds a run (last.pt); pass resume=true to continue it "
                          "or choose another out=...")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    D.barrier()
    logger = RunLogger(run_dir, cfg, enabled=main)

    from kdforge.methods import get_method
    method_cls = get_method(cfg.method_name)
    train_ds, val_ds = build_datasets(cfg, method_cls)
    num_classes = len(train_ds.classes)

    torch.manual_seed(tc.seed)  # identical initialisation on every rank
    method = build_method(cfg, num_classes)
    if cfg.init_from:
        from kdforge.models.checkpoint import load_state_dict_checked
        src = load_checkpoint(cfg.init_from, available(cfg.init_from, "best"))
        rep = load_state_dict_checked(method, src["model"], strict=False, source=f"init_from {cfg.init_from}")
        logger.text(f"warm start from {cfg.init_from}: {rep.summary()}")
    method.to(device)
    if tc.cpu_linear == "onednn":
        logger.text(_onednn_linears(method, device))
    if tc.channels_last:
        method.to(memory_format=torch.channels_last)
    if tc.compile:
        method.student.compile()
    n_params = sum(p.numel() for p in method.student.parameters())

    global_batch = cfg.data.batch_size * world
    optimizer = build_optimizer(cfg, method, global_batch)
    scaler = torch.amp.GradScaler(device.type) if tc.amp == "fp16" else None
    model = method
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=tc.find_unused_parameters)

    from kdforge.data.sampling import EpochBatchSampler
    sampler = method_cls.build_batch_sampler(cfg, train_ds, tc.seed, rank, world) or \
        EpochBatchSampler(len(train_ds), cfg.data.batch_size, tc.seed, rank, world, drop_last=cfg.data.drop_last)
    collate = method_cls.collate_fn(cfg)
    loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False, collate_fn=collate)
    val_loader = eval_loader(val_ds, cfg, device, collate) if val_ds is not None else None
    steps_per_epoch = len(sampler)
    total_steps = steps_per_epoch * tc.epochs
    warmup_steps = int(round(cfg.sched.warmup_epochs * steps_per_epoch))
    min_ratio = cfg.sched.min_lr / cfg.optim.lr
    milestones = [m * steps_per_epoch for m in cfg.sched.milestones]
    best_key = tc.best_metric or method_cls.best_metric

    start_epoch, start_batch, step, best = 0, 0, 0, None
    if cfg.resume and last_path.exists():
        ck = load_checkpoint(run_dir, "last", map_location=device)
        method.load_state_dict(ck["model"])
        saved_opt = ((ck.get("config") or {}).get("optim") or {}).get("name", cfg.optim.name)
        if saved_opt != cfg.optim.name:
            logger.text(f"resume: optim.name changed from {saved_opt!r} to {cfg.optim.name!r}; the optimizer "
                        "state (momentum / moments) is not restored")
        else:
            # the state (moments, buffers) comes from the checkpoint; hyper-parameters from the config,
            # so that e.g. `resume=true optim.lr=...` takes effect (identical when the config is unchanged)
            fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            optimizer.load_state_dict(ck["optimizer"])
            for g, h in zip(optimizer.param_groups, fresh):
                g.update(h)
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"])
        start_epoch, start_batch, step, best = ck["epoch"], ck["batch_in_epoch"], ck["step"], ck.get("best")
        logger.text(f"resumed {run_dir} at epoch {start_epoch} batch {start_batch} (step {step})")
    elif cfg.resume:
        logger.text(f"resume=true but {last_path} does not exist: starting a new run")
    if world > 1:  # per-rank randomness for dropout / masks after identical init
        torch.manual_seed(tc.seed * 1000 + rank + step)
    method.on_train_start(steps_per_epoch, tc.epochs)

    def checkpoint(path: Path, epoch: int, batch_in_epoch: int) -> None:
        if not main:
            return
        atomic_save({
            "model": method.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_state(),
            "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": step, "best": best,
            "best_metric": best_key, "config": to_dict(cfg), "method": cfg.method_name,
            "num_classes": num_classes, "classes": list(train_ds.classes),
            "student_head": method_cls.student_head, "model_name": cfg.model.name,
        }, path)

    params = [p for g in optimizer.param_groups for p in g["params"]]
    metrics: dict[str, float] = {}
    t_start = time.time()
    stopped = False
    loss = None  # the last step's loss (None when a resumed epoch had no batches left)
    logger.text(f"training {cfg.method_name}: {cfg.model.name} ({n_params / 1e6:.2f} M params) on {device}, "
                f"{world} process(es), {len(train_ds)} images, {steps_per_epoch} steps/epoch x {tc.epochs} epochs")
    from tqdm.auto import tqdm
    with _SignalGuard() as sig:
        for epoch in range(start_epoch, tc.epochs):
            method.on_epoch_start(epoch)
            train_ds.set_seed(tc.seed, epoch)
            sampler.set_epoch(epoch)
            skip = start_batch if epoch == start_epoch else 0
            if skip:
                sampler.skip(skip)
            model.train()
            bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{tc.epochs}",
                       disable=not (main and tc.progress), leave=False, dynamic_ncols=True)
            t_win, n_win = time.time(), 0
            batch_idx = skip
            for batch in loader:
                f = lr_factor(step, total_steps, cfg.sched.name, warmup_steps, cfg.sched.warmup_start_factor,
                              min_ratio, milestones, cfg.sched.gamma, cfg.sched.power)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * f
                    if cfg.optim.weight_decay_end is not None and g["base_wd"] > 0:
                        g["weight_decay"] = cosine_value(g["base_wd"], cfg.optim.weight_decay_end, step, total_steps)
                batch = to_device(batch, device, tc.channels_last)
                with amp_ctx():
                    out = model(batch, step)
                loss = out["loss"]
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
                if not bool(torch.isfinite(loss.detach())):
                    terms = ", ".join(f"{k}={float(v.detach() if torch.is_tensor(v) else v):.4g}" for k, v in out.items())
                    good = str(last_path) if last_path.exists() else "none yet"
                    logger.text(f"non-finite loss at step {step}")
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step} (epoch {epoch + 1}, batch {batch_idx}): {terms}. "
                        f"Last good checkpoint: {good}. Try a lower optim.lr, gradient clipping "
                        f"(train.clip_grad=1.0) or train.amp=bf16/none.")
                if tc.clip_grad > 0:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    clip_gradients(params, tc.clip_grad, tc.clip_mode)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                method.on_after_optimizer_step(step)
                step += 1
                batch_idx += 1
                n_win += 1
                bar.update(1)
                if step % tc.log_every == 0 or batch_idx == steps_per_epoch:
                    dt = max(time.time() - t_win, 1e-9)
                    rec = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}
                    rec.update(epoch=epoch, lr=optimizer.param_groups[0]["lr"],
                               img_per_s=n_win * global_batch / dt)
                    logger.metrics(rec, step)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                    img_s=f"{rec['img_per_s']:.0f}")
                    t_win, n_win = time.time(), 0
                interrupt = sig.received is not None
                if D.is_dist():
                    flag = D.all_reduce_sum(torch.tensor([float(interrupt)], device=device))
                    interrupt = bool(flag.item() > 0)
                if interrupt or (tc.max_steps is not None and step >= tc.max_steps):
                    checkpoint(last_path, epoch, batch_idx)
                    bar.close()
                    stopped = True
                    if interrupt:
                        logger.text(f"interrupted at step {step}: wrote {last_path}; continue with resume=true")
                        logger.close()
                        raise TrainingInterrupted(f"interrupted at step {step}; checkpoint {last_path}")
                    break
            bar.close()
            if stopped:
                break
            if train_ds.corrupt_count:
                logger.text(f"epoch {epoch + 1}: skipped {train_ds.corrupt_count} unreadable image(s) so far")
            do_val = val_loader is not None and tc.val_every > 0 and \
                ((epoch + 1) % tc.val_every == 0 or epoch + 1 == tc.epochs)
            if do_val:
                metrics = method.evaluate(val_loader, device, amp_ctx)
                if metrics:
                    logger.metrics({**metrics, "epoch": epoch}, step)
            improved = best_key in metrics and (best is None or metrics[best_key] > best)
            if improved:
                best = metrics[best_key]
            if (epoch + 1) % tc.save_every == 0 or epoch + 1 == tc.epochs or improved:
                checkpoint(last_path, epoch + 1, 0)
            if improved and main:
                checkpoint(best_path, epoch + 1, 0)
            mtxt = " ".join(f"{k} {v:.2f}" for k, v in metrics.items()) if do_val else ""
            ltxt = "n/a" if loss is None else f"{float(loss.detach()):.4f}"
            logger.text(f"epoch {epoch + 1}/{tc.epochs} step {step} loss {ltxt} {mtxt}"
                        + (f" (best {best_key} {best:.2f})" if best is not None else ""))
    seconds = time.time() - t_start
    if main:
        logger.metrics({"done": True, "seconds": seconds, "corrupt_images": train_ds.corrupt_count}, step)
    logger.close()
    D.barrier()
    return RunResult(run_dir=run_dir, step=step, epoch=epoch + 1 if not stopped else epoch, metrics=metrics,
                     best=best, seconds=seconds, params=n_params, corrupt_images=train_ds.corrupt_count,
                     stopped_early=stopped)


def rebuild_method(run: str | Path, which: str = "best"):
    """A saved run's method, rebuilt without its teacher and without loading weights.

    ``run``: a run folder (``<which>.pt``, falling back to ``last.pt``) or a checkpoint file.
    Returns ``(method, cfg, checkpoint)``; the caller loads what it needs from ``checkpoint["model"]``.
    """
    ck = load_checkpoint(run, available(run, which))
    cfg = config_of_checkpoint(ck)
    return build_method(cfg, ck["num_classes"], with_teacher=False), cfg, ck


@torch.no_grad()
def evaluate_run(run: str | Path, split: str = "test", which: str = "best", data_root: Optional[str] = None,
                 device: str = "auto") -> dict[str, float]:
    """Rebuild a run's method from its checkpoint and evaluate it on ``split`` (default: test)."""
    from kdforge.data.datasets import ImageFolderDataset
    from kdforge.data.transforms import build_eval_transform
    method, cfg, ck = rebuild_method(run, which)
    dev = resolve_device(device)
    method.load_state_dict(ck["model"])
    method.to(dev)
    root = Path(data_root or cfg.data.root)
    mode = "RGB" if cfg.data.in_chans == 3 else "L"
    cfg.data.root = str(root)
    method_cls = type(method)
    own = method_cls.build_dataset(cfg, split, False)
    ds = own if own is not None else \
        ImageFolderDataset(root / split, build_eval_transform(cfg.data), "skip", mode, classes=ck["classes"] or None)
    loader = DataLoader(ds, batch_size=cfg.data.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                        collate_fn=method_cls.collate_fn(cfg))
    out = method.evaluate(loader, dev, amp_context(dev, cfg.train.amp))
    return {k.replace("val/", f"{split}/"): v for k, v in out.items()}
