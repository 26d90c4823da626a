"""Masked ViT wrapper (timm) and the iBOT head: shapes, mask-token semantics, legacy weight-norm keys."""
import warnings

import pytest
import torch
from torch import nn

from kdforge.models import cls_attention, create_model
from kdforge.models.dino_head import IBOTHead, convert_legacy_weight_norm
from kdforge.models.masked_vit import MaskedViT, cls_weighted_patch_feature


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return MaskedViT(create_model("kdf_vit_micro", num_classes=0)).eval()


def test_masked_vit_shapes_multi_resolution(vit):
    # kdf_vit_micro: patch 4, width 96, 3 heads; 32 px -> 8×8 grid, 16 px -> 4×4 grid
    tok, attn = vit(torch.randn(2, 3, 32, 32), return_attention=True)
    assert tok.shape == (2, 65, 96) and attn.shape == (2, 3, 64)
    tok, attn = vit(torch.randn(3, 3, 16, 16))
    assert tok.shape == (3, 17, 96) and attn is None
    assert vit.patch_tokens(tok).shape == (3, 16, 96)


def test_unmasked_forward_equals_timm_and_attention_equals_tap(vit):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tok, attn = vit(x, return_attention=True)
        ref = vit.vit.forward_features(x)
        tap = cls_attention(vit.vit, x, [-1])[0]
    assert torch.allclose(tok, ref, atol=1e-5)
    assert torch.allclose(attn, tap, atol=1e-5)
    # CLS row over patches = 1 - attention on the CLS key itself
    assert (attn.sum(-1) < 1).all() and (attn.sum(-1) > 0).all()


def test_mask_token_replaces_patch_embedding_before_pos_embed(vit):
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, 1, 2] = mask[0, 5, 7] = True
    with torch.no_grad():
        vit.mask_token.copy_(torch.randn(1, 96))
        e_masked, e_clean = vit.embed(x, mask), vit.embed(x)
        pos = vit.vit.pos_embed[0]                    # (1 + 64, D): CLS first
    for (i, j) in [(1, 2), (5, 7)]:
        n = i * 8 + j
        assert torch.allclose(e_masked[0, 1 + n], vit.mask_token[0] + pos[1 + n], atol=1e-6)
    keep = torch.ones(65, dtype=torch.bool)
    keep[1 + 1 * 8 + 2] = keep[1 + 5 * 8 + 7] = False
    assert torch.equal(e_masked[0, keep], e_clean[0, keep]) and torch.equal(e_masked[1], e_clean[1])
    # flat (B, N) masks are accepted, wrong sizes are refused
    assert torch.equal(vit.embed(x, mask.flatten(1)), e_masked)
    with pytest.raises(ValueError):
        vit.embed(x, torch.zeros(2, 4, 4, dtype=torch.bool))


def test_mask_token_gets_gradient_only_when_masking():
    torch.manual_seed(1)
    m = MaskedViT(create_model("kdf_vit_micro", num_classes=0))
    x = torch.randn(2, 3, 32, 32)
    m(x)[0].sum().backward()
    assert m.mask_token.grad is None or m.mask_token.grad.abs().sum() == 0
    mask = torch.rand(2, 8, 8) > 0.5
    m(x, mask)[0].pow(2).sum().backward()
    assert m.mask_token.grad.abs().sum() > 0
    assert "mask_token" in dict(m.named_parameters()) and m.mask_token.shape == (1, 96)


def test_cls_weighted_patch_feature():
    # tokens: CLS (3,4) -> (0.6,0.8); patches (1,0), (0,2); weights (1,3)/4 -> pooled (0.25, 1.5) -> /1.5207 
    tok = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]])
    attn = torch.tensor([[[0.1, 0.3], [0.1, 0.3]]])            # 2 heads, same row -> weights (0.25, 0.75)
    f = cls_weighted_patch_feature(tok, attn)
    n = (0.25 ** 2 + 1.5 ** 2) ** 0.5
    assert torch.allclose(f, torch.tensor([[0.6, 0.8, 0.25 / n, 1.5 / n]]), atol=1e-6)


def test_ibot_head_shapes_shared_and_separate():
    torch.manual_seed(2)
    x = torch.randn(2, 5, 16)
    h = IBOTHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=False, shared_head=True)
    c, p = h(x)
    assert c.shape == (2, 32) and p.shape == (2, 4, 32) and h.patch_layer is h.last_layer
    assert h(x[:, 0]).shape == (2, 32)                      # 2-D input: DINO head
    assert torch.allclose(h(x[:, 0]), c, atol=1e-6)
    h2 = IBOTHead(16, out_dim=32, patch_out_dim=20, hidden_dim=24, bottleneck_dim=8, shared_head=False)
    c, p = h2(x)
    assert c.shape == (2, 32) and p.shape == (2, 4, 20)
    # layers: 3 Linear layers in the MLP with GELU between, no norm layers
    linears = [m for m in h.mlp if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(16, 24), (24, 24), (24, 8)]
    assert all(float(l.bias.detach().abs().sum()) == 0 for l in linears)


def test_ibot_head_weight_norm_and_frozen_g():
    h = IBOTHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=True)
    g = h.last_layer.parametrizations.weight.original0
    v = h.last_layer.parametrizations.weight.original1
    assert g.shape == (32, 1) and torch.equal(g, torch.ones(32, 1)) and not g.requires_grad
    # weight = g · v / ‖v‖ (rows), so every prototype has unit norm
    assert torch.allclose(h.last_layer.weight.norm(dim=1), torch.ones(32), atol=1e-5)
    assert torch.allclose(h.last_layer.weight, v / v.norm(dim=1, keepdim=True), atol=1e-6)
    h2 = IBOTHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=False)
    assert h2.last_layer.parametrizations.weight.original0.requires_grad
    # the logits are bounded by ‖g‖ because the bottleneck is L2-normalised
    assert h(torch.randn(7, 16) * 100).abs().max() <= 1.0 + 1e-5


def test_ibot_head_loads_legacy_weight_g_weight_v_keys():
    torch.manual_seed(3)
    old_last = nn.Linear(8, 32, bias=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old_last = torch.nn.utils.weight_norm(old_last)     # deprecated API: keys weight_g / weight_v
    with torch.no_grad():
        old_last.weight_g.uniform_(0.5, 2.0)
    ref = IBOTHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8)
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("last_layer.")}
    sd.update({f"last_layer.{k}": v for k, v in old_last.state_dict().items()})
    assert "last_layer.weight_g" in sd and "last_layer.weight_v" in sd
    new = IBOTHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8)
    new.load_state_dict(sd)                                  # strict: every key maps
    z = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    assert torch.allclose(new.last_layer(z), old_last(z), atol=1e-6)
    # the same through a parent module prefix, and the standalone converter
    parent = nn.Module()
    parent.head = IBOTHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8)
    parent.load_state_dict({f"head.{k}": v for k, v in sd.items()})
    conv = convert_legacy_weight_norm({"head.last_layer.weight_g": 1, "head.last_layer.weight_v": 2, "x.weight": 3})
    assert conv == {"head.last_layer.parametrizations.weight.original0": 1,
                    "head.last_layer.parametrizations.weight.original1": 2, "x.weight": 3}
