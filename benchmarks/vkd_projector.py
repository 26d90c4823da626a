"""VkD projector: ours (QR, fp32, cached per step) vs the reference's torch Householder parametrisation.

For the DeiT-Ti/S → RegNetY-160 shapes (192/384 → 3024) it prints, side by side:

* time of one training step of the projector alone (weight + forward + backward + AdamW step, B rows);
* the number of weight materialisations when the projector is used twice in one step;
* ‖WᵀW − I‖_max after one AdamW step with wd 0.05 (the reference collapses: W = 0) and under
  bf16 autocast;
* the size of the projector's state dict.

Usage: ``python benchmarks/vkd_projector.py [--batch 512] [--steps 5] [--ref-steps 1] [--device cpu]
[--shapes 192x3024 384x3024]``
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from kdforge.align.orthogonal import OrthogonalProjector


def reference_projector(d_in: int, d_out: int) -> nn.Module:
    """The reference's projector (vkd.md §1.4): torch orthogonal parametrisation (Householder)."""
    return parametrizations.orthogonal(nn.Linear(d_in, d_out, bias=False))


def ref_weight(m: nn.Module) -> torch.Tensor:
    return m.weight


def gram_err(w: torch.Tensor) -> float:
    w = w.detach().float()
    g = w.T @ w
    return (g - torch.eye(g.shape[0], device=g.device)).abs().max().item()


def step_time(m: nn.Module, d_in: int, d_out: int, batch: int, steps: int, device) -> float:
    opt = torch.optim.AdamW(m.parameters(), lr=5e-4, weight_decay=0.0)
    x = torch.randn(batch, d_in, device=device)
    t = torch.randn(batch, d_out, device=device)
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = F.smooth_l1_loss(m(x), F.layer_norm(t, (d_out,)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
    return 1000 * sum(times) / len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--ref-steps", type=int, default=1, help="timed steps of the (slow on CPU) reference")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", nargs="+", default=["192x3024", "384x3024"],
                    help="d_in x d_out pairs (default: DeiT-Ti and DeiT-S -> RegNetY-160)")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    device = torch.device(args.device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} batch={args.batch}")
    hdr = f"{'shape':>10} | {'impl':>10} | {'step ms':>8} | {'W/step(2 uses)':>14} | {'err wd-step':>11} | " \
          f"{'err bf16':>9} | {'state MB':>8}"
    print(hdr)
    print("-" * len(hdr))
    for d_in, d_out in shapes:
        torch.manual_seed(0)
        for name in ("ours", "reference"):
            m = (OrthogonalProjector(d_in, d_out) if name == "ours" else reference_projector(d_in, d_out)).to(device)
            ms = step_time(m, d_in, d_out, args.batch, args.steps if name == "ours" else args.ref_steps, device)
            # materialisations per step when used twice
            if name == "ours":
                n0 = m.n_weight_computations
                x = torch.randn(4, d_in, device=device)
                (m(x).sum() + m(x).sum()).backward()
                n_w = m.n_weight_computations - n0
            else:
                n_w = 2  # torch parametrizations recompute on every access outside parametrize.cached()
            # one AdamW step with wd 0.05 on every parameter (the reference's optimizer groups)
            torch.manual_seed(1)
            m2 = (OrthogonalProjector(d_in, d_out) if name == "ours" else reference_projector(d_in, d_out)).to(device)
            opt = torch.optim.AdamW(m2.parameters(), lr=5e-4, weight_decay=0.05)
            x = torch.randn(8, d_in, device=device)
            F.smooth_l1_loss(m2(x), torch.randn(8, d_out, device=device)).backward()
            opt.step()
            w = m2.weight if name == "ours" else ref_weight(m2)
            err_wd = gram_err(w)
            collapsed = " (W=0)" if w.detach().abs().max().item() == 0 else ""
            with torch.autocast(device.type, dtype=torch.bfloat16):
                w16 = m.weight if name == "ours" else ref_weight(m)
            err16 = gram_err(w16)
            mb = sum(v.numel() * v.element_size() for v in m.state_dict().values()) / 2 ** 20
            print(f"{d_in:>4}->{d_out:<5} | {name:>10} | {ms:8.2f} | {n_w:>14} | {err_wd:11.1e}{collapsed} | "
                  f"{err16:9.1e} | {mb:8.2f}")


if __name__ == "__main__":
    main()
