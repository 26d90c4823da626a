"""KDEP SVD statistics: streaming float64 PCA (kdforge) vs the reference's in-memory SVD, side by side.

The reference (``gen_svd_weights.py``) concatenates every teacher feature into an N×2048 float32 matrix
and runs ``torch.svd`` on the centred matrix; ``kdforge kdep-svd`` streams batches into a float64
mean + scatter matrix (:class:`kdforge.align.svd.StreamingPCA`) and finishes with ``eigh``. On the same
synthetic, heavy-tailed "teacher features" (N × D, a decaying spectrum like pooled ResNet-50
features) it prints, each variant in its own child process:

* wall time (accumulation + decomposition) and the child's peak resident memory above its level
  after imports and set-up (so it excludes torch itself);
* the bytes the method must hold for the features (N·D·4 for the reference, 2·D²·8 for streaming);
* agreement with a float64 in-memory reference: max |Δ mean|, max relative error of the top-k
  singular values, ‖V_k V_kᵀ − V̂_k V̂_kᵀ‖_F of the top-k subspace (k = 512, ResNet-18's width) and the
  max column error after the canonical sign convention.

Usage: ``python benchmarks/kdep_svd.py [--n 8192] [--dim 2048] [--k 512] [--batch 256] [--threads 1]``
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import resource
import time


@functools.lru_cache(maxsize=2)
def _generator_state(dim: int, seed: int):
    import torch
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0].float()
    scales = (1.0 / torch.arange(1, dim + 1, dtype=torch.float32).sqrt()) * 4.0
    mean = torch.randn(dim, generator=g) * 0.5
    return basis, scales, mean


def make_features(n: int, dim: int, seed: int, start: int = 0, stop: int | None = None):
    """Rows ``start:stop`` of a fixed synthetic feature matrix (generated in 1024-row blocks, so any
    slice is reproducible without materialising the rest). Spectrum ∝ 1/sqrt(i), offset mean."""
    import torch
    basis, scales, mean = _generator_state(dim, seed)
    stop = n if stop is None else stop
    out = []
    for b0 in range(0, n, 1024):
        b1 = min(b0 + 1024, n)
        if b1 <= start or b0 >= stop:
            continue
        gb = torch.Generator().manual_seed(seed * 1_000_003 + b0)
        z = torch.randn(b1 - b0, dim, generator=gb) * scales
        rows = (z @ basis.T + mean)[max(start, b0) - b0: min(stop, b1) - b0]
        out.append(rows)
    return torch.cat(out)


def _child(kind: str, args, q) -> None:
    import torch
    torch.set_num_threads(args.threads)
    from kdforge.align.svd import StreamingPCA, SVDAligner, canonical_signs
    _generator_state(args.dim, args.seed)   # the synthetic source is not part of either method
    base_mb = _rss_mb()
    t0 = time.perf_counter()
    if kind == "streaming":
        acc = StreamingPCA()
        for b0 in range(0, args.n, 1024):   # generated in blocks, fed in batches of --batch rows
            for chunk in torch.split(make_features(args.n, args.dim, args.seed, b0, min(b0 + 1024, args.n)),
                                     args.batch):
                acc.update(chunk)
        t_acc = time.perf_counter() - t0
        al = acc.finalize(k=args.k)
        held = 2 * args.dim * args.dim * 8
    else:   # the reference: all features in RAM (float32), torch.svd of the centred matrix
        feats = make_features(args.n, args.dim, args.seed)
        t_acc = time.perf_counter() - t0
        if kind == "reference_fp32":
            mu = feats.mean(0)
            _, s, v = torch.linalg.svd(feats - mu, full_matrices=False)
            al = SVDAligner(mu.double(), canonical_signs(v[: args.k].T.double()), s.double(), n_samples=args.n,
                            k=args.k)
        else:   # float64 in memory: the ground truth
            al = SVDAligner.fit(feats.double(), k=args.k)
        held = args.n * args.dim * 4
    secs = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_mb
    q.put({"kind": kind, "seconds": secs, "accumulate_s": t_acc, "peak_mb": peak_mb, "held_mb": held / 2 ** 20,
           # numpy, not tensors: torch would share storage through file descriptors of the exiting child
           "mean": al.mean.double().numpy(), "V": al.V.double().numpy(),
           "S": al.singular_values.double()[: args.k].numpy()})


def _rss_mb() -> float:
    """Current resident set size (MB) from /proc (Linux); the peak is measured relative to it."""
    import os
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def run_child(kind: str, args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(kind, args, q))
    p.start()
    import torch
    out = q.get()
    p.join()
    return {k: torch.from_numpy(v) if hasattr(v, "dtype") and not isinstance(v, float) else v
            for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8192, help="number of feature rows N")
    ap.add_argument("--dim", type=int, default=2048, help="teacher feature width D (ResNet-50: 2048)")
    ap.add_argument("--k", type=int, default=512, help="kept directions (ResNet-18: 512, MobileNetV2: 1280)")
    ap.add_argument("--batch", type=int, default=256, help="streaming batch size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch
    from kdforge.align.svd import subspace_distance
    print(f"torch={torch.__version__} threads={args.threads} N={args.n} D={args.dim} k={args.k} batch={args.batch}")
    truth = run_child("float64_in_memory", args)
    rows = [truth, run_child("reference_fp32", args), run_child("streaming", args)]
    hdr = (f"{'variant':>18} | {'time s':>7} | {'of which pass s':>16} | {'peak +RSS MB':>12} | {'feature store MB':>16} | "
           f"{'max|dmean|':>10} | {'max rel dS_k':>12} | {'subspace dist':>13} | {'max |dV| (sign)':>15}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        dmean = (r["mean"] - truth["mean"]).abs().max().item()
        ds = ((r["S"] - truth["S"]).abs() / truth["S"]).max().item()
        dist = subspace_distance(r["V"], truth["V"])
        dv = (r["V"] - truth["V"]).abs().max().item()
        print(f"{r['kind']:>18} | {r['seconds']:7.2f} | {r['accumulate_s']:16.2f} | {r['peak_mb']:12.0f} | "
              f"{r['held_mb']:16.1f} | {dmean:10.1e} | {ds:12.1e} | {dist:13.1e} | {dv:15.1e}")
    print("feature store: what the method keeps for the features (reference N·D float32; streaming mean + "
          "scatter D² float64, independent of N). 'of which pass s': the feature pass (generating the synthetic rows; "
          "for streaming also the float64 scatter updates), the rest is the decomposition.")


if __name__ == "__main__":
    main()
