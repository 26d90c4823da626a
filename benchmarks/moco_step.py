"""MoCo training-step cost, side by side in one run (CPU by default).

Measures, on the same backbone and batch:

* ``plain``   — forward + backward of the query encoder on one view (the floor);
* ``moco``    — the full ``moco`` training step (query fwd/bwd, key encoder on a shuffled batch in
  ``bn_splits`` groups, InfoNCE over the queue) + momentum update + enqueue;
* the augmentation of one view: the MoCo preset with the fused ``ToNormalizedTensor`` vs
  torchvision ``ToTensor`` + ``Normalize``.

    OMP_NUM_THREADS=1 python benchmarks/moco_step.py [--model kdf_resnet_narrow] [--size 16] [--batch 64]
"""
from __future__ import annotations

import argparse
import random
import time

import torch
from PIL import Image
from torchvision import transforms as T


def bench(fns, warmup: int = 2, reps: int = 5, rounds: int = 4) -> list[float]:
    """Milliseconds per call of each function: rounds interleave the functions (so a busy machine
    slows them alike) and the best round is kept."""
    for f in fns:
        for _ in range(warmup):
            f()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            for _ in range(reps):
                f()
            best[i] = min(best[i], (time.perf_counter() - t) / reps * 1000.0)
    return best


def main() -> None:
    from kdforge.data.ssl_transforms import moco_preset_transform
    from kdforge.methods.moco import MoCo, MoCoConfig
    from kdforge.models import create_model
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="kdf_resnet_narrow")
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--queue", type=int, default=4096)
    ap.add_argument("--bn-splits", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    m = MoCo(None, create_model(a.model, num_classes=0, img_size=a.size))
    m.args = MoCoConfig(queue_size=a.queue, bn_splits=a.bn_splits)
    from kdforge.losses.moco import KeyQueue
    m.queue = KeyQueue(m.head.out_dim, a.queue)
    m.to(dev).train()
    opt = torch.optim.SGD([p for g in m.param_groups() for p in g["params"]], lr=0.01, momentum=0.9)
    x1, x2 = (torch.randn(a.batch, 3, a.size, a.size, device=dev) for _ in range(2))

    def plain():
        opt.zero_grad()
        m.head(m.student(x1)).sum().backward()
        opt.step()

    step = [0]

    def moco():
        opt.zero_grad()
        out = m.training_step(([x1, x2], None), step[0])
        out["loss"].backward()
        opt.step()
        m.on_after_optimizer_step(step[0])
        step[0] += 1

    t_plain, t_moco = bench([plain, moco])
    print(f"{a.model} @ {a.size}px, batch {a.batch}, queue {a.queue}, bn_splits {a.bn_splits}, {dev}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"  plain query fwd+bwd       {t_plain:8.1f} ms/step")
    print(f"  moco step (+key, queue)   {t_moco:8.1f} ms/step  ({t_moco / t_plain:.2f}x plain, "
          f"{a.batch / t_moco * 1000:.0f} img/s)")

    img = Image.fromarray((torch.rand(8, 8, 3) * 255).to(torch.uint8).numpy())
    fused = moco_preset_transform("improved", img_size=a.size)
    tv = T.Compose(fused.transforms[:-1] + [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    random.seed(0)
    t_f, t_t = (t / 100 for t in bench([lambda: [fused(img) for _ in range(100)],
                                         lambda: [tv(img) for _ in range(100)]], 1, 2, 5))
    print(f"  one augmented view        {t_f:8.3f} ms (fused ToNormalizedTensor)  vs {t_t:.3f} ms "
          "(ToTensor + Normalize)")


if __name__ == "__main__":
    main()
