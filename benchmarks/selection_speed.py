"""Speed of the wild-pool scoring pass (Attention Probe selection), side by side.

Variants, all on the same teacher and the same in-memory batches:

* ``kdforge single pass``  — :func:`kdforge.selection.score_batch`: one forward gives the logits
  (confidence + prediction) and the CLS-row attention of every probed block (hooks recompute only
  the CLS query row, (B, H, 1, N)).
* ``reference two passes`` — what the reference script does: a first full pass with hooks on the
  probed blocks that recomputes the full (B, H, N, N) attention and keeps head 0, then a second
  full pass for the logits.
* ``logits only``          — a plain forward (the lower bound; DFND's confidence-only scoring).

Then the end-to-end ``score_pool`` (PNG decoding, loader, safetensors progress file) on a folder.
Prints images/s per variant, on CPU and, when available, on CUDA (bf16 autocast there too).

    python benchmarks/selection_speed.py                       # the CIFAR teacher (DeiT-B/4 at 32 px, 21 M)
    python benchmarks/selection_speed.py --model vit_base_patch16_224 --img-size 224 --batch 64
"""
from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

# the reference's CIFAR-10/100 teacher: 32 px, patch 4, width 384, depth 12, 3 heads (~21.3 M params)
CIFAR_TEACHER = dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=3)


def build_teacher(name: str, img_size: int, num_classes: int):
    from kdforge.models import create_model
    if name == "cifar_teacher":
        return create_model("vit_small_patch16_224", num_classes=num_classes, **CIFAR_TEACHER)
    return create_model(name, num_classes=num_classes, img_size=img_size)


def reference_two_pass(teacher, x, blocks):
    """The reference's scoring: pass 1 recomputes full attention at ``blocks`` (head 0), pass 2 logits."""
    from kdforge.selection import attention_probe_scores, confidence_scores
    inputs = {}
    hs = [teacher.blocks[b].attn.register_forward_pre_hook(lambda m, a, b=b: inputs.__setitem__(b, a[0]))
          for b in blocks]
    try:
        teacher(x)
    finally:
        for h in hs:
            h.remove()
    scores = []
    for b in blocks:
        attn, h = teacher.blocks[b].attn, inputs[b]
        B, N, C = h.shape
        qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        a = ((qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)).softmax(-1)  # (B, H, N, N)
        scores.append(attention_probe_scores(a[:, 0, 0, 1:]))
    z = teacher(x)
    return confidence_scores(z), z.argmax(-1), torch.stack(scores)


def timed(fn, iters: int, device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def bench_device(teacher, device, args) -> list[tuple[str, float]]:
    from kdforge.selection import score_batch
    teacher = teacher.to(device).eval()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    blocks = args.blocks
    rows = []
    with torch.no_grad():
        for name, fn in (("kdforge single pass", lambda: score_batch(teacher, x, blocks)),
                         ("reference two passes", lambda: reference_two_pass(teacher, x, blocks)),
                         ("logits only", lambda: teacher(x))):
            with amp():
                dt = timed(fn, args.iters, device)
            rows.append((name, args.batch / dt))
    return rows


def bench_end_to_end(teacher, args) -> float:
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T
    from kdforge.data import UnlabeledFolder
    from kdforge.selection import score_pool
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "pool"
        root.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.pool):
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(root / f"{i:05d}.png")
        ds = UnlabeledFolder(root, T.Compose([T.Resize((args.img_size, args.img_size)), T.ToTensor()]))
        t = time.perf_counter()
        table = score_pool(teacher.cpu(), ds, args.blocks, out=Path(d) / "scores", batch_size=args.batch,
                           num_workers=args.workers)
        dt = time.perf_counter() - t
        assert table.complete
        return args.pool / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_teacher", help="'cifar_teacher' (default) or a timm ViT name")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--blocks", type=int, nargs="+", default=[3, 7])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--gpu-batch", type=int, default=256)
    p.add_argument("--gpu-iters", type=int, default=30)
    p.add_argument("--pool", type=int, default=512, help="images in the end-to-end folder test (CPU)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = build_teacher(args.model, args.img_size, args.num_classes)
    n_params = sum(q.numel() for q in teacher.parameters())
    tokens = teacher.patch_embed.num_patches + teacher.num_prefix_tokens
    print(f"teacher {args.model}: {n_params / 1e6:.1f} M params, {tokens} tokens, blocks {args.blocks}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'device':<34}{'variant':<24}{'images/s':>10}{'vs reference':>14}")
    devices = [(torch.device("cpu"), args.batch, args.iters)]
    if torch.cuda.is_available():
        devices.append((torch.device("cuda"), args.gpu_batch, args.gpu_iters))
    for device, batch, iters in devices:
        a = argparse.Namespace(**{**vars(args), "batch": batch, "iters": iters})
        rows = bench_device(teacher, device, a)
        ref = dict(rows)["reference two passes"]
        label = f"{device.type} (batch {batch}" + (", bf16)" if device.type == "cuda" else ", fp32)")
        if device.type == "cuda":
            label = f"{torch.cuda.get_device_name()} " + label[4:]
        for name, ips in rows:
            print(f"{label:<34}{name:<24}{ips:>10.1f}{ips / ref:>13.2f}x")
    ips = bench_end_to_end(teacher.cpu(), args)
    print(f"{'cpu end-to-end score_pool':<34}{f'{args.pool} PNGs, {args.workers} workers':<24}{ips:>10.1f}")


if __name__ == "__main__":
    main()
