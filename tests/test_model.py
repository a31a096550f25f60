"""The MAE: shapes, finite outputs, gradients everywhere, masked-only loss, MONAI ViT compatibility, and the
inference API (encode, reconstruct) that reconstruct and embed use."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from monai.networks.nets import ViT

from ctmae.mae.config import MaskConfig, RunConfig
from ctmae.mae.masking import sample_mask
from ctmae.mae.model import MaskedAutoencoder3D, build_model

CPU = torch.device("cpu")
CFG = RunConfig.from_dict({"model": {"size": "tiny", "patch": 8}, "data": {"crop": 32}}).model


def make(seed: int = 0, **over) -> MaskedAutoencoder3D:
    torch.manual_seed(seed)
    return build_model(replace(CFG, **over))


def masks(kind: str = "block", batch: int = 2, seed: int = 0):
    return sample_mask(MaskConfig(kind=kind), batch, (4, 4, 4), torch.Generator().manual_seed(seed), CPU)


@pytest.mark.parametrize("kind", ["block", "random", "none", "noise"])
def test_shapes_and_finite(kind):
    model, x = make(), torch.rand(2, 1, 32, 32, 32)
    m = masks(kind)
    loss, pred, mask = model(x, m)
    assert pred.shape == (2, m.ids_pred.shape[1], 8**3) and mask.shape == (2, 64)
    assert loss.ndim == 0 and torch.isfinite(loss) and torch.isfinite(pred).all()


def test_every_parameter_gets_a_gradient():
    model = make()
    loss, _, _ = model(torch.rand(2, 1, 32, 32, 32), masks("block"))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_patchify_roundtrip():
    model, x = make(), torch.rand(2, 1, 32, 32, 32)
    assert torch.equal(model.unpatchify(model.patchify(x), (4, 4, 4)), x)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_uses_masked_patches_only(norm_pix):
    """Changing the targets of visible patches (with the encoder input fixed) leaves the loss unchanged."""
    model, m = make(norm_pix_loss=norm_pix), masks("block", batch=1)
    x = torch.rand(1, 1, 32, 32, 32)
    target = model.patchify(x).clone()
    target[0, m.ids_keep[0]] = torch.rand_like(target[0, m.ids_keep[0]])
    changed = model.unpatchify(target, (4, 4, 4))
    with torch.no_grad():
        a, _, _ = model(x, m, inputs=x)
        b, _, _ = model(changed, m, inputs=x)
        target[0, m.ids_pred[0, :3]] = torch.rand(3, target.shape[-1])  # masked targets change: so must the loss
        c, _, _ = model(model.unpatchify(target, (4, 4, 4)), m, inputs=x)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("predict_ratio", [0.25, 1.0])
def test_loss_matches_a_straightforward_reference(predict_ratio):
    """Reference, one sample at a time: a query for every hidden token, explicit softmax attention over the visible
    tokens, every hidden patch predicted, the error averaged over the predicted subset only."""
    model, x = make(), torch.rand(2, 1, 32, 32, 32)
    m = sample_mask(
        MaskConfig(kind="random", predict_ratio=predict_ratio), 2, (4, 4, 4), torch.Generator().manual_seed(0), CPU
    )
    assert m.ids_pred.shape[1] == (16 if predict_ratio == 0.25 else 48)
    dec, patches = model.decoder, model.patchify(x)
    pos = dec.position_embeddings[0]
    with torch.no_grad():
        loss, _, _ = model(x, m)
        latent = model.encoder.forward_features(patches, m.ids_keep)
        errors = []
        for b in range(2):
            hidden = m.mask[b].nonzero().flatten()
            context = dec.embed(latent[b]) + pos[m.ids_keep[b]]  # (Lv, Dd)
            q = dec.mask_token[0] + pos[hidden]  # (Lh, Dd)
            for blk in dec.blocks:
                heads = blk.attn.heads
                qh = blk.attn.q(blk.norm1(q)).unflatten(-1, (heads, -1)).transpose(0, 1)  # (H, Lh, hd)
                k, v = blk.attn.kv(blk.norm_context(context)).unflatten(-1, (2, heads, -1)).permute(1, 2, 0, 3)
                attn = torch.softmax(qh @ k.transpose(1, 2) / qh.shape[-1] ** 0.5, dim=-1) @ v  # (H, Lh, hd)
                q = q + blk.attn.out_proj(attn.transpose(0, 1).flatten(1))
                q = q + blk.mlp(blk.norm2(q))
            pred = dec.head(dec.norm(q))  # (Lh, p³)
            picked = torch.isin(hidden, m.ids_pred[b])
            errors.append(((pred[picked] - patches[b, hidden[picked]]) ** 2).mean(-1))
        ref = torch.cat(errors).mean()
    assert torch.allclose(loss, ref, atol=1e-6)


def test_encoder_weights_load_into_monai_vit_and_compute_the_same_features():
    model = make()
    vit = ViT(
        1,
        32,
        8,
        hidden_size=CFG.dim,
        mlp_dim=int(CFG.dim * CFG.mlp_ratio),
        num_layers=CFG.depth,
        num_heads=CFG.heads,
        qkv_bias=True,
        pos_embed_type="sincos",
    )
    result = vit.load_state_dict(model.encoder.state_dict(), strict=False)  # MONAI reads the encoder's weights
    assert not result.unexpected_keys
    assert all("norm_cross_attn" in k for k in result.missing_keys)
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        ours = model.encoder.forward_features(model.patchify(x))
        theirs, _ = vit(x)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_build_model_names_the_architectures():
    assert isinstance(make(), MaskedAutoencoder3D)
    with pytest.raises(ValueError, match="unknown model arch 'vit9d'; known: mae3d"):
        build_model(replace(CFG, arch="vit9d"))


@pytest.mark.parametrize("visible", [None, "masked"])
def test_encode_is_the_encoder_on_patchified_images(visible):
    model, x = make(), torch.rand(2, 1, 32, 32, 32)
    ids = None if visible is None else masks("block").ids_keep
    with torch.no_grad():
        reference = model.encoder.forward_features(model.patchify(x), ids)
        assert torch.equal(model.encode(x, ids), reference)
        assert torch.equal(model.encoder(model.patchify(x), ids), reference)  # ViTEncoder.forward
    assert model.encode(x, ids).shape == (2, 64 if ids is None else ids.shape[1], CFG.dim)
    with pytest.raises(ValueError, match="expects 32³ crops"):
        model.encode(torch.rand(1, 1, 16, 16, 16))


@pytest.mark.parametrize(
    "kind,fill_sigma,fill_queries",
    [("block", 0.0, False), ("noise", 0.0, False), ("block", 4.0, False), ("block", 4.0, True)],
)
def test_reconstruct_gives_what_forward_decodes_for_the_same_tokens(kind, fill_sigma, fill_queries):
    """The voxels ``reconstruct`` returns at the predicted tokens are forward's ``pred``; other tokens are 0; and
    predicting every token gives the same values at those tokens (queries do not attend to each other; a fill, when
    the decoder predicts the residual over one, and the fills its queries read depend on the visible tokens only)."""
    model = make(fill_sigma=fill_sigma, fill_queries=fill_queries)
    x, m = torch.rand(2, 1, 32, 32, 32), masks(kind)
    torch.nn.init.normal_(model.decoder.head.weight, std=0.02)  # a trained head: not the zero of a fresh fill model
    with torch.no_grad():
        _, pred, _ = model(x, m)  # (B, Lp, p³)
        volume = model.reconstruct(x, m.ids_keep, m.ids_pred)  # (B, 1, 32, 32, 32)
        full = model.reconstruct(x, m.ids_keep)
    assert volume.shape == x.shape
    patches, every = model.patchify(volume), model.patchify(full)
    index = m.ids_pred[..., None].expand(-1, -1, pred.shape[-1])
    assert torch.allclose(torch.gather(patches, 1, index), pred, atol=1e-6)
    others = torch.ones(2, 64, dtype=torch.bool).scatter_(1, m.ids_pred, False)
    assert (patches[others] == 0).all()
    assert torch.allclose(torch.gather(every, 1, index), pred, atol=1e-5)


@pytest.mark.parametrize(
    "head,fill_queries", [("linear", False), ("upsample", False), ("linear", True), ("smooth", True)]
)
def test_a_fresh_fill_residual_model_is_the_fill_of_the_visible_voxels(head, fill_queries):
    """With ``fill_sigma`` the decoder's output is added to a gaussian fill of the visible voxels and starts at zero:
    before training, hidden voxels of a volume whose visible voxels are all 0.3 come back as 0.3 exactly, whatever
    the hidden ones held, and the loss still reaches every weight after one step."""
    model, m = make(fill_sigma=4.0, head=head, fill_queries=fill_queries), masks("block", batch=1)
    x = torch.full((1, 1, 32, 32, 32), 0.3)
    hidden = model.unpatchify(m.mask[..., None].float().expand(-1, -1, 8**3), (4, 4, 4)).bool()  # (1, 1, 32³)
    x[hidden] = torch.rand(int(hidden.sum()))
    with torch.no_grad():
        out = model.reconstruct(x, m.ids_keep)
    assert torch.allclose(out[hidden], torch.full_like(out[hidden], 0.3), atol=1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # the zero head gets a gradient first, then everything upstream of it
        opt.zero_grad()
        model(x, m)[0].backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
    if fill_queries:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fill_queries.parameters())


def test_padding_beyond_the_scan_never_enters_the_fill():
    """A crop that runs past the scan's edge is padded with zeros; told which voxels are the scan's (``known``), a
    fresh fill-residual model fills the hidden voxels from the scan's visible voxels only (0.3 everywhere), where
    the zeros of the padding, counted as visible, would darken the fill near the edge."""
    model, m = make(fill_sigma=4.0, fill_queries=True), masks("block", batch=1)
    x = torch.full((1, 1, 32, 32, 32), 0.3)
    x[..., 24:] = 0.0  # the scan ends at z = 24: the rest is padding
    known = torch.ones_like(x)
    known[..., 24:] = 0.0
    hidden = model.unpatchify(m.mask[..., None].float().expand(-1, -1, 8**3), (4, 4, 4)).bool()  # (1, 1, 32³)
    inside = hidden & known.bool()
    with torch.no_grad():
        told = model.reconstruct(x, m.ids_keep, known=known)
        untold = model.reconstruct(x, m.ids_keep)
    assert torch.allclose(told[inside], torch.full_like(told[inside], 0.3), atol=1e-5)
    assert untold[inside].min() < 0.25  # the padding's zeros pull the fill down near the edge


def test_fill_maps_per_patch_are_fills_and_supports():
    """``fill_maps`` gives, per width, the coarse fill and visible support, and ``per_patch`` groups them by token:
    on a volume that is 0.6 wherever visible, each fill is 0.6 and each support lies in [0, 1], highest on the
    visible tokens."""
    from ctmae.mae.fill_context import QUERY_SIGMAS, fill_maps, per_patch, visible_voxels

    m = masks("block", batch=1)
    visible = visible_voxels(m.ids_keep, (4, 4, 4), 8, torch.zeros(1))
    maps = fill_maps(torch.full((1, 1, 32, 32, 32), 0.6) * visible, visible, QUERY_SIGMAS, 8)
    assert maps.shape == (1, 2 * len(QUERY_SIGMAS), 8, 8, 8)  # patch 8 on a 4x coarser grid
    features = per_patch(maps, 8)
    assert features.shape == (1, 64, 2 * len(QUERY_SIGMAS) * 2**3)
    per = features.view(1, 64, 2 * len(QUERY_SIGMAS), 2**3)  # (B, L, [fill, support] x S, coarse cells)
    fills, supports = per[:, :, 0::2], per[:, :, 1::2]
    assert torch.allclose(fills, torch.full_like(fills, 0.6), atol=1e-5)
    assert supports.min() >= 0 and supports.max() <= 1 + 1e-6
    seen = torch.zeros(1, 64, dtype=torch.bool).scatter_(1, m.ids_keep, True)
    assert supports[:, :, 0][seen].mean() > supports[:, :, 0][~seen].mean()


def test_the_smooth_head_predicts_one_residual_field_across_patch_borders():
    """The ``smooth`` head's residual over the fill is interpolated across patches: between two hidden patches it
    steps no more at the border than inside a patch (a linear head's patches are independent of each other), and
    with every hidden token predicted, forward's voxels are reconstruct's (for both heads)."""
    mask_cfg = MaskConfig(kind="block", predict_ratio=0.75)  # the loss on every hidden token
    m = sample_mask(mask_cfg, 1, (4, 4, 4), torch.Generator().manual_seed(3), CPU)
    x = torch.rand(1, 1, 32, 32, 32)
    steps = {}
    for head in ("smooth", "linear"):
        model = make(fill_sigma=4.0, head=head)
        with torch.no_grad():
            fill = model.reconstruct(x, m.ids_keep)  # a fresh model is its fill
            torch.nn.init.normal_(model.decoder.head.weight, std=0.05)
            out = model.reconstruct(x, m.ids_keep)
            _, pred, _ = model(x, m)
        index = m.ids_pred[..., None].expand(-1, -1, pred.shape[-1])
        assert torch.allclose(torch.gather(model.patchify(out), 1, index), pred, atol=1e-5)
        residual = (out - fill)[0, 0]
        hidden = model.unpatchify(m.mask[..., None].float().expand(-1, -1, 8**3), (4, 4, 4))[0, 0].bool()
        both = hidden[1:] & hidden[:-1]  # neighbours along x, both hidden
        jump = (residual[1:] - residual[:-1]).abs() * both
        border = torch.zeros_like(both)
        border[7::8] = True  # x = 8k-1 -> 8k crosses a patch border
        steps[head] = (float(jump[border].max()), float(jump[~border].max()))
    border, inside = steps["smooth"]
    assert 0.01 < inside and border <= inside * 1.01, steps
