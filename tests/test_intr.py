"""INTR: the fused model equals a plain DETR reference, its maps, ranking, DETR weights, training."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import timm
import torch
from torchvision.ops.misc import FrozenBatchNorm2d  # what timm.layers.freeze_batch_norm_2d puts in
from torch import nn

from intr.models.backbones import BackboneSpec
from intr.models.intr import INTR, FeatureBackbone, Transformer, TransformerConfig, build_intr
from intr.ranking import rank_heads_by_blurring, rank_heads_naive

VIT = {"name": "vit_tiny_patch16_224",
       "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4}}
TRANSFORMER = {"d_model": 32, "heads": 4, "encoder_layers": 1, "decoder_layers": 2, "ffn": 64, "dropout": 0.1}




def tiny_intr(seed: int, num_classes: int = 5, query_scale: float = 1.0, **options) -> INTR:
    """A double-precision INTR on a tiny ViT, with non-trivial biases and norms, in eval mode."""
    torch.manual_seed(seed)
    model = build_intr({"backbone": VIT, "transformer": TRANSFORMER, **options}, num_classes, image_size=32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("backbone."):
                p.add_(torch.randn_like(p) * 0.1)  # biases, norms: away from their 0/1 init
        model.query_embed.weight.mul_(query_scale)
    return model.double().eval()


def images(seed: int, b: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)


# --------------------------------------------------------------------------- the plain DETR reference


def detr_sine_position(b: int, h: int, w: int, dim: int) -> torch.Tensor:
    """DETR's ``PositionEmbeddingSine(dim // 2, normalize=True)`` as written there: (h*w, B, dim)."""
    not_mask = torch.ones(b, h, w, dtype=torch.float64)
    y_embed, x_embed = not_mask.cumsum(1), not_mask.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    n = dim // 2
    dim_t = torch.arange(n, dtype=torch.float64)
    dim_t = 10000 ** (2 * (dim_t // 2) / n)
    pos_x, pos_y = x_embed[:, :, :, None] / dim_t, y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, dim, h, w)
    return pos.flatten(2).permute(2, 0, 1)


def torch_mha(ours, heads: int) -> nn.MultiheadAttention:
    """``nn.MultiheadAttention`` (sequence first, as in DETR) carrying our attention's weights."""
    d = ours.in_proj_weight.shape[1]
    mha = nn.MultiheadAttention(d, heads, dropout=0.1).double().eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(ours.in_proj_weight)
        mha.in_proj_bias.copy_(ours.in_proj_bias)
        mha.out_proj.weight.copy_(ours.out_proj.weight)
        mha.out_proj.bias.copy_(ours.out_proj.bias)
    return mha


@torch.no_grad()
def reference(model: INTR, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DETR's post-norm transformer with torch's attention: logits (B, C), last cross-attention (B, heads, C, N)."""
    heads = model.num_heads
    features = model.input_proj(model.backbone(x))
    b, d, h, w = features.shape
    src = features.flatten(2).permute(2, 0, 1)  # (N, B, d)
    pos = detr_sine_position(b, h, w, d)
    for layer in model.transformer.encoder.layers:
        q = k = src + pos
        src2 = torch_mha(layer.self_attn, heads)(q, k, value=src)[0]
        src = layer.norm1(src + src2)
        src2 = layer.linear2(torch.relu(layer.linear1(src)))
        src = layer.norm2(src + src2)
    memory = src
    query_pos = model.query_embed.weight.unsqueeze(1).repeat(1, b, 1)  # (C, B, d)
    tgt = torch.zeros_like(query_pos)
    weights = None
    for layer in model.transformer.decoder.layers:
        q = k = tgt + query_pos
        tgt2 = torch_mha(layer.self_attn, heads)(q, k, value=tgt)[0]
        tgt = layer.norm1(tgt + tgt2)
        tgt2, weights = torch_mha(layer.multihead_attn, heads)(
            tgt + query_pos, memory, value=memory, average_attn_weights=False)
        tgt = layer.norm2(tgt + tgt2)
        tgt2 = layer.linear2(torch.relu(layer.linear1(tgt)))
        tgt = layer.norm3(tgt + tgt2)
    hs = model.transformer.decoder.norm(tgt).transpose(0, 1)  # (B, C, d)
    return model.presence_head(hs).squeeze(-1), weights


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_forward_equals_plain_detr_reference_with_torch_attention(seed: int) -> None:
    model = tiny_intr(seed, query_scale=3.0)
    x = images(seed)
    with torch.no_grad():
        logits = model(x)
    expected, _ = reference(model, x)
    assert logits.shape == (3, 5)
    assert logits.std() > 1e-3  # the classes are told apart, not a constant
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_maps_are_per_head_softmax_of_last_cross_attention_and_logits_equal_forward() -> None:
    model = tiny_intr(3, query_scale=3.0)
    x = images(3)
    classes = torch.tensor([[0, 3], [4, 1], [2, 0]])
    with torch.no_grad():
        logits, maps = model.forward_with_maps(x, classes)
        plain = model(x)
    _, weights = reference(model, x)  # (B, heads, C, N)
    assert model.grid_size == (4, 4)
    assert maps.shape == (3, 2, 4, 4, 4)  # (B, R, heads, h, w)
    # Over the memory only: each head's map is a distribution over the feature map.
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(3, 2, 4, dtype=torch.float64))
    assert (maps >= 0).all()
    expected = torch.stack([weights[b, :, classes[b]] for b in range(3)]).transpose(1, 2)  # (B, R, heads, N)
    torch.testing.assert_close(maps.flatten(-2), expected, rtol=0, atol=1e-6)
    # The heads look at different places (not all uniform maps).
    assert (maps.flatten(-2).max(-1).values > 1.5 / 16).any()
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-10)


def test_blurred_head_attends_uniformly_and_only_that_query_logit_changes() -> None:
    model = tiny_intr(4, query_scale=3.0)
    x = images(4, b=2)
    classes = torch.tensor([[1], [3]])
    blur = torch.tensor([[[True, False, False, True]], [[False, True, False, False]]])
    with torch.no_grad():
        plain = model(x)
        logits, maps = model.forward_with_maps(x, classes, blur=blur)
    flat = maps.flatten(-2)
    torch.testing.assert_close(flat[blur], torch.full((3, 16), 1 / 16, dtype=torch.float64))
    assert (flat[~blur].max(-1).values > 1 / 16 + 1e-3).all()
    changed = torch.zeros_like(plain, dtype=torch.bool).scatter(1, classes, True)
    torch.testing.assert_close(logits[~changed], plain[~changed], rtol=0, atol=1e-10)
    assert ((logits[changed] - plain[changed]).abs() > 1e-6).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blurring_rank_matches_naive_loop(seed: int) -> None:
    torch.manual_seed(seed)
    model = tiny_intr(10 + seed, num_classes=4, query_scale=30.0)
    with torch.no_grad():
        model.presence_head.weight.mul_(10.0)
    x = images(seed, b=4)
    target = torch.tensor([0, 3, 1, 3])
    fast = rank_heads_by_blurring(model, x, target)
    naive = rank_heads_naive(model, x, target)
    # The heads do differ, so the order is decided by the model and not by ties.
    top, low = fast.prob_after_blur.max(dim=1).values, fast.prob_after_blur.min(dim=1).values
    assert ((top - low) / top).min() > 0.05
    assert torch.equal(fast.order, naive.order)
    assert torch.equal(fast.rank, naive.rank)
    torch.testing.assert_close(fast.prob_after_blur, naive.prob_after_blur, rtol=0, atol=1e-5)
    with torch.no_grad():
        expected_prob = model(x).softmax(dim=1).gather(1, target.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(fast.prob, expected_prob.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(naive.prob, expected_prob.float(), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- CNN backbone and DETR weights


def test_resnet_backbone_has_frozen_batch_norm_and_returns_last_stage() -> None:
    torch.manual_seed(0)
    backbone = FeatureBackbone(BackboneSpec("resnet50"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules()) == 53
    assert backbone.channels == 2048 and not backbone.is_vit
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    backbone.train()  # frozen batch norm: training mode changes nothing
    before = backbone.body.layer4[2].bn3.running_mean.clone()
    with torch.no_grad():
        features = backbone(x)
    assert features.shape == (2, 2048, 2, 2)  # stride 32
    assert torch.equal(backbone.body.layer4[2].bn3.running_mean, before)
    # The same weights in timm's plain ResNet-50 (eval batch norm): its last stage.
    plain = timm.create_model("resnet50", pretrained=False, num_classes=0).eval()
    missing, unexpected = plain.load_state_dict(backbone.body.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    with torch.no_grad():
        torch.testing.assert_close(features, plain.forward_features(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backbone, image_size, grid", [
    (VIT, 32, (4, 4)),  # 8 px patches
    ({"name": "resnet18"}, 96, (3, 3)),  # stride 32
    ({"name": "resnet50"}, 100, (4, 4)),  # stride 32, rounded up by the padded convolutions
])
def test_grid_is_known_at_construction_and_equals_the_maps_after_a_forward(backbone, image_size: int,
                                                                          grid: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = build_intr({"backbone": backbone, "transformer": TRANSFORMER}, num_classes=3, image_size=image_size)
    assert model.grid_size == grid  # before any forward pass
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, maps = model.eval().forward_with_maps(x, torch.tensor([[0], [2]]))
    assert maps.shape == (2, 1, 4, *grid)


def test_cnn_intr_refuses_images_of_another_size_than_its_grid() -> None:
    # A CNN takes any size, but the maps would no longer fit the grid the tables are written with.
    model = build_intr({"backbone": {"name": "resnet18"}, "transformer": TRANSFORMER}, num_classes=3, image_size=64)
    with pytest.raises(ValueError, match="built for 64 px"):
        model(torch.randn(1, 3, 96, 96))


def test_grid_of_a_cnn_leaves_training_batch_norm_untouched() -> None:
    torch.manual_seed(0)
    backbone = FeatureBackbone(BackboneSpec("resnet18"), frozen_batch_norm=False).train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    assert backbone.grid_for(64) == (2, 2)
    assert backbone.training and backbone.body.layer1[0].bn1.training
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics included


def detr_state(transformer: dict, backbone: str = "resnet50", seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with DETR-R50's key names and shapes (random values)."""
    torch.manual_seed(seed)
    body = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(-1,))
    state = {}
    for key, value in body.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        state["backbone.0.body." + key] = torch.rand_like(value) + 0.5 if key.endswith("running_var") \
            else torch.randn_like(value)
    cfg = TransformerConfig(**transformer)
    for key, value in Transformer(cfg).state_dict().items():
        state["transformer." + key] = torch.randn_like(value)
    d = cfg.d_model
    state |= {"input_proj.weight": torch.randn(d, 2048, 1, 1), "input_proj.bias": torch.randn(d),
              "query_embed.weight": torch.randn(100, d),
              "class_embed.weight": torch.randn(92, d), "class_embed.bias": torch.randn(92)}
    for i, (n_in, n_out) in enumerate([(d, d), (d, d), (d, 4)]):
        state[f"bbox_embed.layers.{i}.weight"] = torch.randn(n_out, n_in)
        state[f"bbox_embed.layers.{i}.bias"] = torch.randn(n_out)
    return state


def test_detr_checkpoint_loads_backbone_transformer_and_projection_but_not_queries(tmp_path) -> None:
    state = detr_state(TRANSFORMER)
    path = tmp_path / "detr-r50.pth"
    torch.save({"model": state}, path)
    model = build_intr({"backbone": {"name": "resnet50"}, "transformer": TRANSFORMER,
                        "detr_checkpoint": str(path)}, num_classes=5, image_size=64)
    body = model.backbone.body
    assert torch.equal(body.conv1.weight, state["backbone.0.body.conv1.weight"])
    assert torch.equal(body.layer3[4].conv2.weight, state["backbone.0.body.layer3.4.conv2.weight"])
    assert torch.equal(body.layer4[2].bn3.running_var, state["backbone.0.body.layer4.2.bn3.running_var"])
    assert torch.equal(body.layer4[0].downsample[1].bias, state["backbone.0.body.layer4.0.downsample.1.bias"])
    assert torch.equal(model.transformer.encoder.layers[0].self_attn.in_proj_weight,
                       state["transformer.encoder.layers.0.self_attn.in_proj_weight"])
    assert torch.equal(model.transformer.decoder.layers[1].multihead_attn.out_proj.weight,
                       state["transformer.decoder.layers.1.multihead_attn.out_proj.weight"])
    assert torch.equal(model.transformer.decoder.norm.bias, state["transformer.decoder.norm.bias"])
    assert torch.equal(model.input_proj.weight, state["input_proj.weight"])
    assert torch.equal(model.input_proj.bias, state["input_proj.bias"])
    # One query per class, freshly initialised (not DETR's 100 object queries).
    assert model.query_embed.weight.shape == (5, 32)
    assert not torch.equal(model.query_embed.weight, state["query_embed.weight"][:5])
    assert model.presence_head.weight.shape == (1, 32)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize("mismatch", ["shapes", "layers"])
def test_mismatched_detr_checkpoint_is_a_value_error_naming_the_file(tmp_path, mismatch: str) -> None:
    # A ResNet-50 DETR into a ResNet-18 INTR: wrong shapes; extra decoder layers: unexpected keys.
    small = TRANSFORMER | {"decoder_layers": 1}
    if mismatch == "shapes":
        state, options = detr_state(TRANSFORMER), {"backbone": {"name": "resnet18"}, "transformer": TRANSFORMER}
    else:
        state, options = detr_state(TRANSFORMER, backbone="resnet18"), \
            {"backbone": {"name": "resnet18"}, "transformer": small}
        state["input_proj.weight"] = state["input_proj.weight"][:, :512]
    path = tmp_path / f"detr-{mismatch}.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match="detr-" + mismatch):
        build_intr(options | {"detr_checkpoint": str(path)}, num_classes=3, image_size=64)


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_backbone_decides_whether_backbone_trains(freeze: bool) -> None:
    model = build_intr({"backbone": VIT, "transformer": TRANSFORMER, "freeze_backbone": freeze}, num_classes=3,
                       image_size=32)
    backbone = [p.requires_grad for p in model.backbone.parameters()]
    rest = [p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone.")]
    assert backbone and all(rest)
    assert all(backbone) is (not freeze) and any(backbone) is (not freeze)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from intr.data.prepare import prepare_dataset
    from intr.data.synthetic import SyntheticConfig, synthesize

    base = tmp_path_factory.mktemp("intr_data")
    root, tables = base / "data", base / "tables"
    synthesize(SyntheticConfig(genera=2, species_per_genus=2, images_per_species=12, image_size=32), root,
               progress=False)
    prepare_dataset("synthetic", root, tables, progress=False)
    return tables / "manifest.parquet", root


def test_training_writes_best_epoch_and_load_model_rebuilds_it(tiny_dataset, tmp_path) -> None:
    from intr.data.images import ImageSet, read_split
    from intr.models import load_model
    from intr.train import train

    manifest, root = tiny_dataset
    options = {"backbone": VIT, "transformer": TRANSFORMER}
    summary = train("intr", options, {"epochs": 2, "batch_size": 8, "optimizer": "adamw", "lr": 1e-3,
                                      "clip_grad": 0.1}, manifest, root, tmp_path, image_size=32, progress=False)
    assert summary["finished"] and summary["epochs"] == 2
    log = pd.read_parquet(tmp_path / "train_log.parquet")
    assert log["epoch"].tolist() == [1, 2]
    assert log["train_loss"].map(math.isfinite).all()
    saved = torch.load(tmp_path / "model.pt", weights_only=True)  # torch itself: an independent read
    assert saved["epoch"] == summary["best_epoch"]
    model, config = load_model(tmp_path / "model.pt")
    assert isinstance(model, INTR) and not model.training
    assert config["method"] == "intr" and config["num_classes"] == 4
    # The backbone trains (not frozen), so the saved state is the whole model.
    assert set(saved["state"]) == set(model.state_dict())
    for key, value in saved["state"].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(model.query_embed.weight, saved["state"]["query_embed.weight"])
    # The same weights loaded by hand give the same logits.
    manual = build_intr(config["model"], config["num_classes"], config["image_size"])
    manual.load_state_dict(saved["state"])
    manual.eval()
    mean, std = config["normalization"]["mean"], config["normalization"]["std"]
    val = ImageSet(root, read_split(manifest, "val"), 32, mean, std)
    batch = torch.stack([val[i][0] for i in range(min(4, len(val)))])
    with torch.no_grad():
        logits = model(batch)
        torch.testing.assert_close(logits, manual(batch), rtol=0, atol=0)
    assert logits.shape == (len(batch), 4)
    # Training moved the weights away from a fresh model's.
    torch.manual_seed(0)
    fresh = build_intr(config["model"], config["num_classes"], config["image_size"])
    assert not torch.equal(fresh.query_embed.weight, model.query_embed.weight)
