"""SMKD cross-image patch loss: scatter-add formulation vs the direct gather of matched student logits.

The direct way gathers, for every same-class pair (a, b) and teacher patch q, the student's log-probs
at the matched position: a (pairs, N, K) tensor per view pair, kept for backward. kdforge's
:func:`kdforge.losses.smkd.smkd_patch_loss` scatter-adds the teacher targets onto the matched student
positions instead (W (G, B·N, K)), so memory no longer grows with the number of pairs.

    python benchmarks/smkd_patch_loss.py            # CPU, a mid-size setting
    python benchmarks/smkd_patch_loss.py --paper    # B=64, N=196, K=8192, 16 classes x 4 (needs a GPU)

Prints forward+backward time, the peak memory (CUDA) or the size of the largest intermediate (CPU),
and the relative difference of the two losses.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from kdforge.losses.smkd import same_class_pairs, smkd_patch_loss


def gather_patch_loss(fS, Z, fT, P, labels, G, tau=0.1):
    """Direct formulation: materialise the matched student log-probs for every pair."""
    B = labels.numel()
    N, K = Z.shape[1], Z.shape[2]
    a, b = same_class_pairs(labels, labels).nonzero(as_tuple=True)
    fS = F.normalize(fS.detach().float(), dim=-1).view(G, B, N, -1)
    fT = F.normalize(fT.detach().float(), dim=-1).view(G, B, N, -1)
    logp = F.log_softmax(Z.float() / tau, -1).view(G, B, N, K)
    P = P.view(G, B, N, K)
    total = 0.0
    for s in range(G):
        for t in range(G):
            if s == t:
                continue
            pi = torch.einsum("npd,nqd->nqp", fS[s, a], fT[t, b]).argmax(-1)        # (pairs, N)
            matched = logp[s][a[:, None], pi]                                         # (pairs, N, K)
            total = total - (P[t, b] * matched).sum()
    return total / (G * (G - 1) * a.numel() * N)


def bench(fn, args, device, reps):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    Z = args[1]
    t0 = time.perf_counter()
    for _ in range(reps):
        Z.grad = None
        out = fn(*args)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / reps
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None
    return float(loss.detach()), dt, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--paper", action="store_true", help="B=64, N=196, K=8192, D=384 (16 classes x 4 images)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    B, N, K, D, per = (64, 196, 8192, 384, 4) if args.paper else (32, 64, 2048, 96, 4)
    G = 2
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(B // per).repeat_interleave(per).to(device)
    fS = torch.randn(G * B, N, D, generator=g).to(device)
    fT = torch.randn(G * B, N, D, generator=g).to(device)
    Z = torch.randn(G * B, N, K, generator=g).to(device).requires_grad_(True)
    P = torch.randn(G * B, N, K, generator=g).softmax(-1).to(device)
    pairs = int(same_class_pairs(labels, labels).sum())
    print(f"device {device}, B={B} N={N} K={K} D={D}, {B // per} classes x {per}: {pairs} ordered pairs")
    lg, tg, mg = bench(gather_patch_loss, (fS, Z, fT, P, labels, G), device, args.reps)
    ls, ts, ms = bench(lambda *a: smkd_patch_loss(*a), (fS, Z, fT, P, labels, G), device, args.reps)
    inter_g = pairs * N * K * 4 / 2 ** 20
    inter_s = G * B * N * K * 4 / 2 ** 20
    for name, loss, dt, peak, inter in (("gather (direct)", lg, tg, mg, inter_g), ("scatter-add (kdforge)", ls, ts, ms,
                                                                                   inter_s)):
        mem = f"peak {peak:.0f} MiB" if peak is not None else f"largest intermediate {inter:.0f} MiB per view pair"
        print(f"{name:24s} loss {loss:.6f}  fwd+bwd {dt * 1e3:8.1f} ms  {mem}")
    print(f"relative difference {abs(lg - ls) / abs(lg):.2e}")


if __name__ == "__main__":
    main()
