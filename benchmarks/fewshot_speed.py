"""Few-shot evaluation speed: kdforge's batched evaluator vs a per-episode loop shaped like SMKD's
``fseval`` (class -> list of vectors, per-episode index list, stacking, prototypes, cosine), on the
same episodes; and batched logistic regression vs scikit-learn fitted per episode.

SMKD protocol: 20 test classes × 600 features of dim 768, 5-way 1-shot and 5-shot, every remaining
image of the 5 classes as a query, 10,000 episodes; also the 15-query protocol.

The per-episode loops are timed on a prefix of the episodes (``--loop-episodes``) and extrapolated
linearly to the full count (stated in the output); their per-episode accuracies are compared with
kdforge's on that prefix.

    OMP_NUM_THREADS=2 python benchmarks/fewshot_speed.py
    OMP_NUM_THREADS=1 python benchmarks/fewshot_speed.py --clock cpu   # on a busy, shared machine

``--clock cpu`` times with the process CPU clock (all threads summed) instead of wall time: on a shared
machine wall time mostly measures waiting for a core, while CPU seconds stay close to what an idle
core would take.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from kdforge.eval import evaluate_episodes, sample_episodes


def synthetic(n_classes=20, per_class=600, dim=768, seed=0, spread=0.1):
    """Class-mean + noise features, non-negative like post-GELU ViT features; labels 0..C-1."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=g)
    means = common + spread * torch.randn(n_classes, dim, generator=g) * 3
    x = means[:, None, :] + torch.randn(n_classes, per_class, dim, generator=g) * 1.5
    y = torch.arange(n_classes).repeat_interleave(per_class)
    return x.reshape(-1, dim).contiguous(), y


def reference_loop(cl_data: dict, episodes: np.ndarray, pos: np.ndarray, labels: np.ndarray, n_shot: int):
    """Per-episode prototype evaluation shaped like SMKD's fseval.feature_evaluation_cos."""
    accs = []
    for ep in episodes:
        z_all = []
        for way in ep:
            img_feat = cl_data[int(labels[way[0]])]
            perm_ids = pos[way].tolist()                       # the episode's rows, as positions in the class
            z_all.append([np.squeeze(img_feat[perm_ids[i]]) for i in range(len(perm_ids))])
        z_all = torch.from_numpy(np.array(z_all))
        n_way = z_all.shape[0]
        n_query = z_all.shape[1] - n_shot
        z_support = z_all[:, :n_shot]
        z_query = z_all[:, n_shot:].contiguous().view(n_way * n_query, -1)
        proto = z_support.mean(1)
        sim = (z_query @ proto.T) / (z_query.norm(dim=1)[:, None] * proto.norm(dim=1)[None, :])
        pred = sim.argmax(1).numpy()
        y = np.repeat(range(n_way), n_query)
        accs.append((pred == y).mean() * 100)
    return np.array(accs)


def exact_agrees(x, episodes, n_shot, accs) -> bool:
    """Whether float64 prototype scoring of these episodes gives kdforge's accuracies (the loop is float32:
    a query within float32 rounding of a tie can go either way there)."""
    xd = x.double()
    for ep, acc in zip(episodes, accs):
        p = torch.nn.functional.normalize(xd[ep[:, :n_shot]].mean(1), dim=-1)
        q = torch.nn.functional.normalize(xd[ep[:, n_shot:].reshape(-1)], dim=-1)
        tgt = torch.arange(ep.shape[0]).repeat_interleave(ep.shape[1] - n_shot)
        if abs(((q @ p.T).argmax(1) == tgt).double().mean().item() * 100 - float(acc)) > 1e-9:
            return False
    return True


def sklearn_loop(xn: np.ndarray, episodes: np.ndarray, n_shot: int):
    from sklearn.linear_model import LogisticRegression
    accs = []
    for ep in episodes:
        n_way, n_query = ep.shape[0], ep.shape[1] - n_shot
        clf = LogisticRegression().fit(xn[ep[:, :n_shot].reshape(-1)], np.repeat(range(n_way), n_shot))
        pred = clf.predict(xn[ep[:, n_shot:].reshape(-1)])
        accs.append((pred == np.repeat(range(n_way), n_query)).mean() * 100)
    return np.array(accs)


CLOCK = time.perf_counter     # --clock cpu: time.process_time (CPU seconds of all the process's threads)


def timed(fn, repeat=1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = CLOCK()
        out = fn()
        best = min(best, CLOCK() - t)
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=10000)
    ap.add_argument("--loop-episodes", type=int, default=300, help="prefix timed for the per-episode loop")
    ap.add_argument("--logistic-episodes", type=int, default=1000)
    ap.add_argument("--sklearn-episodes", type=int, default=200, help="prefix timed for sklearn")
    ap.add_argument("--repeat", type=int, default=2, help="kdforge timings: best of N")
    ap.add_argument("--loop-repeat", type=int, default=2,
                    help="per-episode loop timings: best of N (the minimum is the least noisy estimate for both)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time (all threads summed; steadier than wall time on a shared "
                         "machine, and never flatters multi-threaded kdforge)")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock {args.clock}")
    x, y = synthetic()
    xn_np = torch.nn.functional.normalize(x, dim=1).numpy()
    labels = y.numpy()
    cl_data = {c: [v for v in x[y == c].numpy()] for c in range(20)}  # class -> list of vectors
    pos = np.empty(len(labels), dtype=np.int64)
    for c in range(20):
        pos[labels == c] = np.arange((labels == c).sum())
    print(f"features: {tuple(x.shape)} float32, 20 classes x 600\n")
    rows = []
    for n_query in ("all", 15):
        for shot in (1, 5):
            t_s, ep = timed(lambda: sample_episodes(y, 5, shot, n_query, args.episodes, seed=0))
            t_k, res = timed(lambda: evaluate_episodes(x, y, ep, shot, "prototype"), args.repeat)
            m = min(args.loop_episodes, args.episodes)
            t_l, ref = timed(lambda: reference_loop(cl_data, ep[:m].numpy(), pos, labels, shot), args.loop_repeat)
            t_l_full = t_l * args.episodes / m
            diff = np.nonzero(np.round(ref, 9) != np.round(res.accuracies[:m].numpy(), 9))[0]
            same = "True" if diff.size == 0 else (
                f"False on {diff.size} episode(s), where float64 scoring agrees with "
                f"{'kdforge' if exact_agrees(x, ep[diff], shot, res.accuracies[diff]) else 'the loop (!)'}")
            q = res.n_query
            rows.append((f"prototype 5w{shot}s q={q}", t_s, t_k, t_l_full, m, same, res))
            print(f"[prototype] 5-way {shot}-shot, {q} queries/class, {args.episodes} episodes: "
                  f"sample {t_s:.2f}s, kdforge {t_k:.2f}s ({res.options['strategy']}); reference loop "
                  f"{t_l:.2f}s for {m} episodes = {1000 * t_l / m:.1f} ms/episode -> {t_l_full:.0f}s extrapolated; "
                  f"speed-up x{t_l_full / t_k:.0f}; per-episode accuracies identical on the {m}: {same}; "
                  f"kdforge {res}")
    print()
    for shot in (1, 5):
        E = args.logistic_episodes
        ep = sample_episodes(y, 5, shot, 15, E, seed=0)
        t_k, res = timed(lambda: evaluate_episodes(x, y, ep, shot, "logistic"), args.repeat)
        m = min(args.sklearn_episodes, E)
        t_sk, acc_sk = timed(lambda: sklearn_loop(xn_np, ep[:m].numpy(), shot))
        t_sk_full = t_sk * E / m
        diff = abs(acc_sk.mean() - res.accuracies[:m].mean().item())
        rows.append((f"logistic 5w{shot}s q=15", 0.0, t_k, t_sk_full, m, diff, res))
        print(f"[logistic] 5-way {shot}-shot, 15 queries/class, {E} episodes: kdforge {t_k:.2f}s; sklearn "
              f"LogisticRegression per episode {t_sk:.2f}s for {m} = {1000 * t_sk / m:.1f} ms/episode -> "
              f"{t_sk_full:.0f}s extrapolated; speed-up x{t_sk_full / t_k:.0f}; mean accuracy on the {m}: "
              f"sklearn {acc_sk.mean():.2f} vs kdforge {res.accuracies[:m].mean().item():.2f} "
              f"(|diff| {diff:.2f} points); kdforge over {E}: {res}")
    print("\nsummary (seconds for the full episode count; loops extrapolated from a prefix):")
    print(f"{'protocol':26s} {'kdforge':>9s} {'loop':>9s} {'speed-up':>9s}")
    for name, _, t_k, t_l, _, _, _ in rows:
        print(f"{name:26s} {t_k:9.3f} {t_l:9.1f} {t_l / t_k:8.1f}x")


if __name__ == "__main__":
    main()
