"""train.cpu_linear=onednn: OneDNNLinear matches nn.Linear (values and gradients), swaps in place
without touching parameters, falls back where it must, and a tiny training run uses it."""
import copy

import pytest
import torch
from torch import nn

from kdforge.engine.cpu_linear import OneDNNLinear, OneDNNLinearFunction, use_onednn_linears
from kdforge.eval._gemm import onednn_available

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="oneDNN linear op not used on this machine")


def _pair(bias=True, seed=0):
    torch.manual_seed(seed)
    ref = nn.Linear(24, 10, bias=bias)
    fast = copy.deepcopy(ref)
    assert use_onednn_linears(fast) == 1
    return ref, fast


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_nn_linear(bias, monkeypatch):
    ref, fast = _pair(bias)
    calls = []
    orig = OneDNNLinearFunction.apply
    monkeypatch.setattr(OneDNNLinearFunction, "apply", lambda *a: calls.append(1) or orig(*a))
    x = torch.randn(3, 7, 24)                                   # (batch, tokens, features)
    xr, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yr, yf = ref(xr), fast(xf)
    assert calls, "the oneDNN path was not taken"
    torch.testing.assert_close(yf, yr, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(yr)
    yr.backward(g)
    yf.backward(g)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-4)
    if bias:
        torch.testing.assert_close(fast.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_frozen_weight_and_no_grad():
    ref, fast = _pair()
    fast.requires_grad_(False)
    x = torch.randn(5, 24, requires_grad=True)
    fast(x).sum().backward()                                    # only the input needs a gradient
    assert fast.weight.grad is None and x.grad is not None
    torch.testing.assert_close(x.grad, ref.weight.sum(0).expand(5, -1), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_frozen_layer_keeps_no_activation_for_backward():
    _, fast = _pair()
    fast.requires_grad_(False)
    x = torch.randn(50, 24, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = fast(x)
    assert saved == [fast.weight.numel()]                       # the weight (for ∂x), not the (50, 24) input
    y.sum().backward()
    assert x.grad is not None


def test_torch_func_transforms_fall_back_to_nn_linear():
    ref, fast = _pair()
    x = torch.randn(4, 24)

    def grads(m):
        params = dict(m.named_parameters())
        return torch.func.grad(lambda p: torch.func.functional_call(m, p, (x,)).pow(2).sum())(params)

    got, want = grads(fast), grads(ref)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_swap_keeps_parameters_state_dict_and_copies():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4), nn.MultiheadAttention(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_onednn_linears(model) == 2                       # MHA's out_proj (a subclass) is left alone
    assert isinstance(model[0], OneDNNLinear) and isinstance(model[0], nn.Linear)
    assert type(model[3].out_proj) is not OneDNNLinear
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    clone = copy.deepcopy(model)
    assert isinstance(clone[2], OneDNNLinear) and clone[2].weight is not model[2].weight


def test_falls_back_outside_float32_cpu(monkeypatch):
    _, fast = _pair()
    monkeypatch.setattr(OneDNNLinearFunction, "apply", lambda *a: pytest.fail("oneDNN path taken"))
    x = torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(x).dtype == torch.bfloat16                  # autocast: nn.Linear's own bf16 path
    fast64 = copy.deepcopy(fast).double()
    assert fast64(x.double()).dtype == torch.float64
    from kdforge.engine import cpu_linear
    monkeypatch.setattr(cpu_linear, "onednn_available", lambda: False)
    assert fast(x).shape == (4, 10)


@needs_onednn
def test_training_run_uses_onednn_linears(digits_root, tmp_path, tiny):
    from kdforge.config import load_config
    from kdforge.engine.trainer import train
    runs = {}
    for mode in ("torch", "onednn"):
        over = tiny(digits_root, tmp_path / mode, **{"model.name": "kdf_vit_micro", "data.img_size": 32,
                                                     "train.cpu_linear": mode})
        runs[mode] = train(load_config("configs/supervised/digits_cpu.yaml", over))
    import re
    log = (tmp_path / "onednn" / "log.txt").read_text()
    found = re.search(r"cpu_linear=onednn: (\d+) linear layers compute on oneDNN", log)
    assert found and int(found.group(1)) == 17            # kdf_vit_micro: 4 blocks x (qkv, proj, fc1, fc2) + head
    import json

    def losses(mode):
        lines = (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if '"loss"' in line and '"step"' in line]

    lt, lo = losses("torch"), losses("onednn")
    assert len(lt) == len(lo) >= 10
    # the same run up to float32 summation order: every logged step's loss agrees closely
    assert max(abs(a - b) for a, b in zip(lt, lo)) < 1e-3
    assert runs["torch"].metrics.keys() == runs["onednn"].metrics.keys()


def test_config_rejects_unknown_cpu_linear():
    from kdforge.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="cpu_linear"):
        load_config("configs/kd/digits_cpu.yaml", ["train.cpu_linear=mkl"])
