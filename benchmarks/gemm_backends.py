"""float32 GEMM on this CPU: torch's default (MKL ``addmm``) vs oneDNN (``kdforge.eval._gemm.matmul_nt``).

Prints, for the shapes of kdforge's hot loops, the time and GFLOPS of each backend, the share of a
small ViT's CPU training step spent in torch's GEMMs, and the same step with every ``nn.Linear`` on
oneDNN in forward and backward (what ``train.cpu_linear=onednn`` does; off by default).

    OMP_NUM_THREADS=2 python benchmarks/gemm_backends.py
"""
from __future__ import annotations

import argparse
import time

import torch

from kdforge.eval._gemm import matmul_nt, onednn_available, prepack

SHAPES = [  # (name, m, n, k)
    ("knn block (queries x gallery rows x dim)", 256, 16384, 384),
    ("knn, old block shape", 1024, 50000, 384),
    ("few-shot classblock (diffs x class rows x dim)", 2184, 600, 768),
    ("ViT-tiny MLP fc1 (tokens x 4D x D)", 2048, 768, 192),
]


def best_of(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def training_gemm_share(steps: int) -> tuple[float, float]:
    """(GEMM share of self CPU time, ms per step) of a DeiT-tiny step at 64 px, batch 32."""
    import timm
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", img_size=64, num_classes=10)
    x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()

    for _ in range(2):
        step()
    t = time.perf_counter()
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            step()
    ms = (time.perf_counter() - t) * 1e3 / steps
    rows = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in rows)
    gemm = sum(e.self_cpu_time_total for e in rows if e.key in ("aten::addmm", "aten::mm", "aten::bmm"))
    return gemm / total, ms


def training_ab(rounds: int) -> tuple[float, float, float]:
    """(ms per step with torch's nn.Linear, ms with ``train.cpu_linear=onednn``'s layers, max |loss difference|)
    for DeiT-tiny at 64 px, batch 32, SGD; the two models start equal and are timed interleaved."""
    import timm

    from kdforge.engine.cpu_linear import use_onednn_linears

    def build(onednn: bool):
        torch.manual_seed(0)
        m = timm.create_model("deit_tiny_patch16_224", img_size=64, num_classes=10)
        if onednn:
            use_onednn_linears(m)                    # what train.cpu_linear=onednn does
        return m, torch.optim.SGD(m.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 64, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
    runs = {k: build(k) for k in (False, True)}

    def step(k):
        m, opt = runs[k]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    diff = max(abs(step(False) - step(True)) for _ in range(3))
    times = {False: [], True: []}
    for _ in range(rounds):
        for k in (False, True):
            t = time.perf_counter()
            for _ in range(3):
                step(k)
            times[k].append((time.perf_counter() - t) / 3)
    return min(times[False]) * 1e3, min(times[True]) * 1e3, diff


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5, help="profiled training steps (0: skip)")
    ap.add_argument("--train-rounds", type=int, default=6,
                    help="interleaved rounds of the nn.Linear-on-oneDNN training experiment (0: skip)")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, oneDNN GEMM used by kdforge: "
          f"{onednn_available()}")
    for name, m, n, k in SHAPES:
        a, b, c = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        flops = 2.0 * m * n * k
        t_mkl = best_of(lambda: torch.addmm(c, a, b.T), args.repeat)
        line = f"{name:48s} {m}x{n}x{k}: addmm {t_mkl * 1e3:7.2f} ms ({flops / t_mkl / 1e9:4.0f} GFLOPS)"
        if onednn_available():
            t_dnn = best_of(lambda: matmul_nt(a, b, c), args.repeat)
            bp = prepack(b, m)
            t_pk = best_of(lambda: matmul_nt(a, bp, c), args.repeat)
            line += (f" | oneDNN {t_dnn * 1e3:7.2f} ms ({flops / t_dnn / 1e9:4.0f} GFLOPS), prepacked "
                     f"{t_pk * 1e3:7.2f} ms | addmm / oneDNN {t_mkl / t_dnn:.2f}x")
        print(line)
    if args.steps:
        share, ms = training_gemm_share(args.steps)
        print(f"DeiT-tiny training step (64 px, batch 32, fp32 CPU): {ms:.0f} ms, {share * 100:.0f} % of the "
              "self CPU time in torch's GEMMs (addmm / mm / bmm)")
    if args.train_rounds and onednn_available():
        t_torch, t_dnn, diff = training_ab(args.train_rounds)
        print(f"same step with train.cpu_linear=onednn (forward + backward on oneDNN): {t_dnn:.0f} ms vs "
              f"{t_torch:.0f} ms with torch's nn.Linear ({t_torch / t_dnn:.2f}x); losses of the first 3 steps "
              f"differ by at most {diff:.1e}")


if __name__ == "__main__":
    main()
