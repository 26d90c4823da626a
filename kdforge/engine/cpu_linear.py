"""``train.cpu_linear=onednn``: the linear layers of a CPU float32 run computed by oneDNN.

On CPU, torch's ``nn.Linear`` runs its GEMMs (forward ``addmm``, backward ``mm``) on MKL, which gives
non-Intel CPUs no AVX-512 kernels; torch's bundled oneDNN computes the same products 2-2.6x faster
on an AMD EPYC (``benchmarks/gemm_backends.py``), and a DeiT-tiny training step spends ~79 % of its
time in those GEMMs: 81 vs 115 ms per step there with every linear layer on oneDNN.

:func:`use_onednn_linears` switches the class of every plain ``nn.Linear`` of a module tree to
:class:`OneDNNLinear` in place: same parameters, same ``state_dict``, still an ``nn.Linear``. Its
forward takes the oneDNN path (:class:`OneDNNLinearFunction`) only for float32 CPU inputs outside
autocast and ``torch.compile`` tracing and when the op passed kdforge's one-time check
(:func:`kdforge.eval._gemm.onednn_available`); otherwise it is ``nn.Linear.forward``. Results equal
``nn.Linear``'s up to float32 summation order (first-step losses of the DeiT-tiny run: 5e-7 apart).
Off by default: it changes training numerics in their last bits, so runs are not bit-identical
to runs made without it. Not twice differentiable (``create_graph=True`` gradients-of-gradients
raise); inside ``torch.func`` transforms the layers fall back to ``nn.Linear``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kdforge.eval._gemm import onednn_available, onednn_linear


class OneDNNLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b, x (..., in), W (out, in), b (out,) or None, with the three GEMMs on oneDNN:
    forward x Wᵀ; backward ∂x = g W, ∂W = gᵀ x, ∂b = Σ g (each only when needed)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        # keep only what the backward will use: x for ∂W, W for ∂x (a frozen layer keeps no activation)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        ctx.features = weight.shape                                         # (out, in)
        return onednn_linear(x2, weight.contiguous(), bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x2, weight = ctx.saved_tensors
        n_out, n_in = ctx.features
        g2 = grad.reshape(-1, n_out).contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = onednn_linear(g2, weight.t().contiguous()).view(*grad.shape[:-1], n_in)
        if ctx.needs_input_grad[1]:
            gw = onednn_linear(g2.t().contiguous(), x2.t().contiguous())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose float32 CPU forward/backward run on oneDNN (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32 and x.shape[-1] > 0
                and self.out_features > 0 and x.numel() > 0 and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling() and not _functorch_active() and onednn_available()):
            return OneDNNLinearFunction.apply(x, self.weight, self.bias)
        return super().forward(x)


def _functorch_active() -> bool:
    """Inside torch.func transforms (grad, vmap, ...), which this Function does not support."""
    probe = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(probe()) if probe is not None else False


def use_onednn_linears(module: nn.Module) -> int:
    """Switch every plain ``nn.Linear`` in ``module`` to :class:`OneDNNLinear`, in place; returns how many.

    Subclasses of ``nn.Linear`` (e.g. the out-projection of ``nn.MultiheadAttention``, which that
    module never calls) are left alone.
    """
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear
            n += 1
    return n
