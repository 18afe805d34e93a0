"""Extraction: tables equal what the model computes, regions follow the rule, reruns are complete."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import intr.extract as ex
from analysis import io, regions
from analysis.config import defaults
from analysis.pipeline import ImageTable, images_by_class
from intr.data.images import ImageSet, read_split
from intr.ranking import rank_heads_by_blurring, rank_pair_heads_by_blurring
from conftest import TINY_VIT
from intr.models import CheckpointError, load_model


@pytest.fixture(scope="module", params=["prompt_cam", "intr"])
def extracted(request, tiny_models, tiny_dataset, tmp_path_factory):
    manifest, root = tiny_dataset
    out = tmp_path_factory.mktemp(f"extract_{request.param}")
    paths = ex.extract(tiny_models[request.param], manifest, root, out, batch_size=5, top_heads=2,
                       parts=manifest.parent / "parts.parquet", regions="annotated", progress=False)
    return request.param, paths


def model_and_images(model_path, manifest, root):
    model, config = load_model(model_path)
    rows = read_split(manifest, "test")
    data = ImageSet(root, rows, config["image_size"], config["normalization"]["mean"],
                    config["normalization"]["std"])
    images = torch.stack([data[i][0] for i in range(len(data))])
    return model, rows, images, data.labels


def test_tables_hold_every_image_and_the_documented_schema(extracted, tiny_dataset):
    method, paths = extracted
    manifest, _ = tiny_dataset
    test_ids = sorted(read_split(manifest, "test")["image_id"])
    preds = io.load(paths["predictions"])
    assert sorted(preds["image_id"]) == test_ids
    meta = io.metadata(paths["attention"])
    assert meta["method"] == method and meta["grid_h"] == 4 and meta["grid_w"] == 4
    assert meta["patch_size"] == 8 and meta["image_size"] == 32 and meta["split"] == "test"
    schema = pq.read_schema(paths["attention"])
    for field in (schema.field("attn"), pq.read_schema(paths["trait_features"]).field("feature")):
        assert pa.types.is_fixed_size_list(field.type) and pa.types.is_float16(field.type.value_type)
    assert schema.field("attn").type.list_size == 16
    ranks = io.load(paths["head_ranks"])
    # Every (image, class) ranking is a permutation of 1..H.
    perm = ranks.groupby(["image_id", "class_id"])["rank"].apply(lambda r: sorted(r.tolist()))
    assert all(p == [1, 2, 3, 4] for p in perm)


def test_predictions_maps_and_ranks_equal_the_model(extracted, tiny_models, tiny_dataset):
    method, paths = extracted
    manifest, root = tiny_dataset
    model, rows, images, labels = model_and_images(tiny_models[method], manifest, root)
    with torch.no_grad():
        logits, maps = model.forward_with_maps(images, labels.view(-1, 1))
        ranking = rank_heads_by_blurring(model, images, labels)
    preds = io.load(paths["predictions"]).set_index("image_id").loc[rows["image_id"]]
    assert (preds["pred"].to_numpy() == logits.argmax(1).numpy()).all()
    assert np.allclose(preds["prob_true"], logits.softmax(1).gather(1, labels.view(-1, 1)).squeeze(1), atol=1e-5)
    assert (np.stack(preds["top5_ids"])[:, 0] == preds["pred"]).all()
    for k in (0, len(rows) - 1):
        image_id = int(rows["image_id"][k])
        m = io.map_of(paths["attention"], image_id)  # the true class's maps, heads in order
        assert m.shape == (4, 4, 4)
        assert np.allclose(m, maps[k, 0].numpy(), atol=2e-3)
        keys, _ = io.maps(paths["attention"], image_id=image_id, query_role="true")
        assert keys.sort_values("head")["head_rank"].tolist() == ranking.rank[k].tolist()


def test_query_roles_are_true_pred_and_genus_siblings(extracted, tiny_dataset):
    _, paths = extracted
    manifest, _ = tiny_dataset
    genus = pd.read_parquet(manifest).drop_duplicates("class_id").set_index("class_id")["genus"]
    keys = io.load(paths["attention"], columns=["image_id", "query_class", "query_role", "head"])
    preds = io.load(paths["predictions"]).set_index("image_id")
    per_image = keys[keys["head"] == 0].groupby("image_id")
    for image_id, g in per_image:
        label, pred = preds.loc[image_id, ["label", "pred"]]
        roles = dict(zip(g["query_class"], g["query_role"]))
        assert roles[label] == "true" and list(g["query_role"]).count("true") == 1
        if pred != label:
            assert roles[pred] == "pred"
        siblings = {c for c in genus.index if genus[c] == genus[label] and c != label}
        assert {c for c, r in roles.items() if r == "sibling"} == siblings - {pred}
    looks = io.load(paths["lookalikes"])
    assert set(looks["source"]) == {"genus"} and len(looks) == 4  # 2 genera x 2 species, one sibling each


def test_two_jobs_region_effects_and_the_rest_write_what_one_extraction_writes(extracted, tiny_models, tiny_dataset,
                                                                                tmp_path):
    method, paths = extracted
    manifest, root = tiny_dataset
    rest = [t for t in ex.TABLES if t != "region_effects"]
    # The rest reads no regions: a discovered-parts table that does not exist is never opened.
    first = ex.extract(tiny_models[method], manifest, root, tmp_path / "a", batch_size=5, top_heads=2,
                       regions="discovered", discovered_parts=tmp_path / "missing.parquet", only=rest,
                       progress=False)
    second = ex.extract(tiny_models[method], manifest, root, tmp_path / "b", batch_size=5, top_heads=2,
                        parts=manifest.parent / "parts.parquet", regions="annotated", only=["region_effects"],
                        progress=False)
    assert sorted(first) == sorted(rest) and list(second) == ["region_effects"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["region_effects.parquet"]
    for name, path in {**first, **second}.items():
        pd.testing.assert_frame_equal(io.load(path), io.load(paths[name]), check_exact=False, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="extract tables must be some of .*; got region_effect"):
        ex.extract(tiny_models[method], manifest, root, tmp_path / "c", only=["region_effect"], progress=False)


def test_region_effects_cover_the_images_the_contrasts_use_and_only_the_ranked_regions(extracted):
    _, paths = extracted
    preds = io.load(paths["predictions"])
    effects = io.load(paths["region_effects"])
    assert regions.BACKGROUND not in set(effects["region"])  # not a trait: never filled
    looks = io.load(paths["lookalikes"])
    for c, of_class in preds.groupby("label"):
        right = of_class.loc[of_class["correct"], "image_id"]
        # analysis.pipeline.images_by_class: the correctly classified images, all of them where none is
        expected = set(right if len(right) else of_class["image_id"])
        got = effects[effects["class_a"] == c]
        assert set(got["image_id"]) == expected, c
        assert set(got["class_b"]) == set(looks.loc[looks["class_a"] == c, "class_b"])
    # the tiny models get some classes wholly wrong and others right: both branches are taken
    share = preds.groupby("label")["correct"].mean()
    assert (share == 0).any() and (share > 0).any(), share.tolist()


def test_region_effects_of_a_per_class_sample_are_the_images_the_contrasts_average_over(extracted, tiny_models,
                                                                                        tiny_dataset, tmp_path):
    method, paths = extracted
    manifest, root = tiny_dataset
    sample = ex.extract(tiny_models[method], manifest, root, tmp_path, batch_size=5, top_heads=2,
                        parts=manifest.parent / "parts.parquet", regions="annotated", only=["region_effects"],
                        contrast_images=2, progress=False)["region_effects"]
    assert io.metadata(sample)["contrast_images"] == 2
    preds = io.load(paths["predictions"]).sort_values("image_id").reset_index(drop=True)
    images = ImageTable(preds["image_id"].to_numpy(), preds["label"].to_numpy(), preds["correct"].to_numpy(), preds)
    by_class = images_by_class(images, np.arange(len(preds)), 2)
    effects, full = io.load(sample), io.load(paths["region_effects"])
    assert set(effects["class_a"]) == set(by_class)
    for c, rows in by_class.items():
        picked = preds.loc[preds["label"] == c, "image_id"]
        assert len(rows) <= 2 < len(picked)  # a sample of each class, not all of it
        assert set(effects.loc[effects["class_a"] == c, "image_id"]) == set(preds["image_id"][rows]), c
    # the same rows as the full table's for those images (a class right only outside its sample
    # is filled over the whole sample, which the full table does not hold)
    key = ["image_id", "class_a", "class_b", "region"]
    both = effects.merge(full, on=key, suffixes=("", "_full"))
    assert len(both) > 0
    assert np.allclose(both["margin_drop"], both["margin_drop_full"], atol=1e-5)


def test_region_effects_are_the_margin_drop_of_filling_that_region_with_the_lookalikes_colour(extracted, tiny_models,
                                                                                              tiny_dataset):
    method, paths = extracted
    manifest, root = tiny_dataset
    model, rows, images, labels = model_and_images(tiny_models[method], manifest, root)
    effects = io.load(paths["region_effects"])
    assert defaults("extract")["region_fill"] == "lookalike"
    assert io.metadata(paths["region_effects"])["region_fill"] == "lookalike"
    assert set(effects["region"]) <= set(io.metadata(paths["region_effects"])["regions"])
    source = ex.RegionSource.load("annotated", rows, root, manifest.parent / "parts.parquet", None,
                                  regions.DEFAULT_RADIUS, regions.DEFAULT_CELLS)
    maps = source.labels(np.arange(len(rows)), 32)
    assert (maps[3] == source.labels([3], 32)[0]).all()  # a batch is its images' maps, one by one
    for row in (effects.iloc[len(effects) // 2], effects.iloc[-1]):
        k = int(np.flatnonzero(rows["image_id"].to_numpy() == row["image_id"])[0])
        r = source.vocab.index(row["region"])
        a, b = int(row["class_a"]), int(row["class_b"])
        mask = torch.from_numpy(maps[k] == r).float()
        assert row["area"] == pytest.approx(mask.mean().item(), abs=1e-6)
        # B's colour of the region: the mean over the region's pixels in the split's images of B.
        of_b = (labels.numpy() == b)[:, None, None] & (maps == r)  # (N, S, S)
        assert of_b.sum() >= 16
        colour = images.permute(0, 2, 3, 1).numpy()[of_b].mean(0)
        image = images[k:k + 1].clone()
        image[0][:, mask.bool()] = torch.as_tensor(colour, dtype=image.dtype)[:, None]
        with torch.no_grad():
            base = model(images[k:k + 1])[0]
            after = model(image)[0]
        assert row["margin"] == pytest.approx((base[a] - base[b]).item(), abs=1e-4)
        assert row["margin_drop"] == pytest.approx(((base[a] - base[b]) - (after[a] - after[b])).item(), abs=1e-4)
        assert row["prob_a_drop"] == pytest.approx((base.softmax(0)[a] - after.softmax(0)[a]).item(), abs=1e-5)


def test_discovered_region_effects_fill_each_pixel_with_the_lookalikes_colour_at_its_place_of_the_body(
        tiny_models, tiny_dataset, tmp_path):
    """With discovered parts the pair fill is placed: recomputed here from the split's pixels, body-frame
    cells and fallbacks (a place with under MIN_PLACE_PIXELS of B's pixels takes B's region mean)."""
    from intr.discover import discover_parts
    from intr.occlusion import LookalikeFill

    manifest, root = tiny_dataset
    parts_path = discover_parts(tiny_models["prompt_cam"], manifest, root, tmp_path / "parts.parquet",
                                device="cpu", k=3, fit_images=0, units="aligned")
    paths = ex.extract(tiny_models["prompt_cam"], manifest, root, tmp_path / "out", batch_size=5, top_heads=2,
                       regions="discovered", discovered_parts=parts_path, progress=False)
    model, rows, images, labels = model_and_images(tiny_models["prompt_cam"], manifest, root)
    source = ex.RegionSource.load("discovered", rows, root, None, parts_path, regions.DEFAULT_RADIUS,
                                  regions.DEFAULT_CELLS)
    maps = source.labels(np.arange(len(rows)), 32)
    cells = source.cells(np.arange(len(rows)), 32).numpy()
    assert (cells[2] == source.cells([2], 32).numpy()[0]).all()  # a batch is its images' cells, one by one
    assert cells.min() >= 0  # every image of the split has its body frame
    pixels = images.permute(0, 2, 3, 1).numpy().astype(np.float64)
    effects = io.load(paths["region_effects"])
    tested = 0
    for _, row in effects[effects["region"] != regions.BACKGROUND].iterrows():
        k = int(np.flatnonzero(rows["image_id"].to_numpy() == row["image_id"])[0])
        r = source.vocab.index(row["region"])
        a, b = int(row["class_a"]), int(row["class_b"])
        of_b = (labels.numpy() == b)[:, None, None] & (maps == r)
        if of_b.sum() < LookalikeFill.MIN_PIXELS:
            continue
        mean = pixels[of_b].mean(0)
        mask = maps[k] == r
        image = images[k:k + 1].clone()
        placed = 0
        for y, x in zip(*np.nonzero(mask)):
            here = of_b & (cells == cells[k, y, x])
            enough = here.sum() >= LookalikeFill.MIN_PLACE_PIXELS
            placed += enough
            image[0, :, y, x] = torch.as_tensor(pixels[here].mean(0) if enough else mean, dtype=image.dtype)
        with torch.no_grad():
            base, after = model(images[k:k + 1])[0], model(image)[0]
        assert row["margin_drop"] == pytest.approx(((base[a] - base[b]) - (after[a] - after[b])).item(), abs=1e-4)
        tested += placed > 0
        if tested == 2:
            break
    assert tested == 2


def test_trait_features_are_the_map_weighted_patch_features_of_the_top_heads(extracted, tiny_models, tiny_dataset):
    method, paths = extracted
    manifest, root = tiny_dataset
    model, rows, images, labels = model_and_images(tiny_models[method], manifest, root)
    feats = io.load(paths["trait_features"])
    assert len(feats) == 2 * len(rows) and set(feats["rank"]) == {1, 2}
    row = feats.iloc[3]
    k = int(np.flatnonzero(rows["image_id"].to_numpy() == row["image_id"])[0])
    with torch.no_grad():
        _, maps = model.forward_with_maps(images[k:k + 1], labels[k:k + 1].view(1, 1))
        patches = model.patch_features(images[k:k + 1])[0]
    m = maps[0, 0, int(row["head"])].flatten()
    expected = (m / m.sum()) @ patches
    assert np.allclose(row["feature"], expected.numpy(), atol=2e-2 * float(expected.abs().max()))


def test_pair_head_ranks_have_one_row_per_head_per_image_and_lookalike_and_equal_the_model(
        extracted, tiny_models, tiny_dataset):
    method, paths = extracted
    manifest, root = tiny_dataset
    model, rows, images, labels = model_and_images(tiny_models[method], manifest, root)
    pair_ranks = io.load(paths["pair_head_ranks"])
    looks = io.load(paths["lookalikes"]).groupby("class_a")["class_b"].apply(sorted)
    # One row per head for every (image, look-alike B of its class A), and nothing else.
    expected = sorted((int(i), int(a), b, h) for i, a in zip(rows["image_id"], labels.tolist())
                      for b in looks[a] for h in range(4))
    got = sorted(pair_ranks[["image_id", "class_a", "class_b", "head"]].itertuples(index=False, name=None))
    assert got == expected
    perm = pair_ranks.groupby(["image_id", "class_b"])["rank"].apply(lambda r: sorted(r.tolist()))
    assert all(p == [1, 2, 3, 4] for p in perm)
    sibling = torch.tensor([[looks[a][0]] for a in labels.tolist()])
    ranking = rank_pair_heads_by_blurring(model, images, labels, sibling)
    table = pair_ranks.set_index(["image_id", "class_b", "head"]).sort_index()
    for k in range(len(rows)):
        stored = table.loc[(int(rows["image_id"][k]), int(sibling[k, 0]))]
        assert stored["rank"].tolist() == ranking.rank[k, 0].tolist()
        assert np.allclose(stored["margin_after_blur"], ranking.margin_after_blur[k, 0].numpy(), atol=1e-4)


def test_pairs_of_a_batch_skip_images_without_lookalikes_and_drop_the_padding(tiny_models, tiny_dataset):
    manifest, root = tiny_dataset
    model, _, images, _ = model_and_images(tiny_models["prompt_cam"], manifest, root)
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        trunk = model.trunk_of(images[:3])
    image, class_b, rank, margins = ex.rank_lookalike_pairs(model, trunk, labels, [[1], [0, 2], []], torch.no_grad)
    assert image.tolist() == [0, 1, 1] and class_b.tolist() == [1, 0, 2]
    assert rank.shape == margins.shape == (3, 4)
    alone = rank_pair_heads_by_blurring(model, images[1:2], labels[1:2], torch.tensor([[2]]))
    assert rank[2].tolist() == alone.rank[0, 0].tolist()
    assert ex.rank_lookalike_pairs(model, trunk.select(torch.tensor([0])), labels[:1], [[]], torch.no_grad) is None


def test_interrupted_extraction_leaves_no_table_and_a_rerun_is_complete(tiny_models, tiny_dataset, tmp_path,
                                                                       monkeypatch):
    manifest, root = tiny_dataset
    calls = {"n": 0}
    original = ex._extract_batch

    def crash_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(ex, "_extract_batch", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        ex.extract(tiny_models["prompt_cam"], manifest, root, tmp_path / "run", batch_size=4, regions="annotated", progress=False)
    assert list((tmp_path / "run").iterdir()) == []  # neither tables nor temporary files
    monkeypatch.setattr(ex, "_extract_batch", original)
    first = ex.extract(tiny_models["prompt_cam"], manifest, root, tmp_path / "run", batch_size=4, regions="annotated", progress=False)
    again = ex.extract(tiny_models["prompt_cam"], manifest, root, tmp_path / "again", batch_size=4, regions="annotated", progress=False)
    for name in ex.TABLES:
        a, b = pq.read_table(first[name]), pq.read_table(again[name])
        assert a.num_rows > 0 and a.equals(b)  # the rerun after the crash == an uninterrupted run


@pytest.fixture(scope="module")
def six_class_model(six_class_manifest, tiny_dataset, tmp_path_factory):
    """model.pt of a Prompt-CAM trained one epoch on the 6-class relabelling of the tiny set."""
    from intr.train import train

    out = tmp_path_factory.mktemp("six_class_model")
    train("prompt_cam", {"backbone": TINY_VIT}, {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "seed": 1},
          six_class_manifest, tiny_dataset[1], out, image_size=32, progress=False)
    return out / "model.pt"


def test_a_model_of_other_classes_is_refused_both_ways_before_anything_is_written(
        tiny_models, tiny_dataset, six_class_manifest, six_class_model, tmp_path, monkeypatch):
    manifest, root = tiny_dataset
    original = pd.read_parquet(manifest).set_index("class_id")["class_name"].loc[1].iloc[0]  # renamed in the 6
    monkeypatch.setattr(ex, "ImageSet", None)  # refused before a single image is read
    with pytest.raises(CheckpointError) as four_on_six:
        ex.extract(tiny_models["prompt_cam"], six_class_manifest, root, tmp_path / "four_on_six", regions="annotated", progress=False)
    assert "4 classes in the model, 6 in the manifest; first difference at class_id 1: " \
           f"{original!r} in the model, 'renamed_species' in the manifest" in str(four_on_six.value)
    with pytest.raises(CheckpointError) as six_on_four:
        ex.extract(six_class_model, manifest, root, tmp_path / "six_on_four", regions="annotated", progress=False)
    assert str(six_on_four.value).startswith(f"{six_class_model} was trained on other classes than {manifest}: "
                                             "6 classes in the model, 4 in the manifest; first difference at "
                                             f"class_id 1: 'renamed_species' in the model, {original!r} in the manifest")
    assert not (tmp_path / "four_on_six").exists() and not (tmp_path / "six_on_four").exists()


def test_lookalikes_from_confusion_pick_the_most_confused_classes():
    labels = np.array([0, 0, 1, 2, 3])
    probs = np.array([[0.5, 0.1, 0.4, 0.0], [0.6, 0.0, 0.3, 0.1],
                      [0.2, 0.7, 0.0, 0.1], [0.0, 0.0, 0.9, 0.1], [0.0, 0.3, 0.0, 0.7]])
    looks = ex.lookalikes_from_confusion(probs, labels, 4, k=1)
    assert looks == {0: [2], 1: [3], 2: [0], 3: [1]}
    assert ex.lookalikes_from_genus(pd.DataFrame({"class_id": [0, 1], "genus": [None, None]})) is None


# --------------------------------------------------------------------------- the region rule


def test_mask_regions_keypoint_discs_and_grid_cells():
    vocab = ["crown", "beak", "background"]
    mask = np.zeros((20, 40), dtype=np.uint8)
    mask[0:10, 0:20] = 1   # crown: top-left quarter
    mask[10:20, 20:40] = 2  # beak: bottom-right quarter
    labels = regions.label_map(vocab, 40, 20, (4, 4), mask=mask, mask_names={1: "crown", 2: "beak"})
    assert labels.tolist() == [[0, 0, 2, 2], [0, 0, 2, 2], [2, 2, 1, 1], [2, 2, 1, 1]]
    w = regions.patch_weights(labels, (2, 2), 3)
    assert np.allclose(w.sum(0), 1) and w[0, 0] == 1 and w[1, 3] == 1 and w[2, 1] == 1
    parts = pd.DataFrame({"part_name": ["crown", "beak"], "x": [5.0, 35.0], "y": [5.0, 15.0],
                          "visible": [True, False]})
    disc = regions.label_map(vocab, 40, 20, (20, 40), parts=parts, bbox=(0, 0, 40, 20), radius=0.1)
    ys, xs = np.nonzero(disc == 0)
    assert ((xs + 0.5 - 5) ** 2 + (ys + 0.5 - 5) ** 2 <= 16).all() and len(xs) > 30  # radius 0.1 x 40 px
    assert not (disc == 1).any()  # an invisible part has no region
    grid = regions.label_map(regions.region_vocabulary(None, cells=2), 40, 20, (2, 2), cells=2)
    assert grid.tolist() == [[0, 1], [2, 3]]
    assert regions.region_masks(grid, 4).sum() == 4


@pytest.mark.parametrize("out_hw", [(4, 4), (40, 80), (7, 3)])
def test_a_mask_gives_each_sample_its_pixels_region_whether_sampled_finer_or_coarser(out_hw):
    vocab = ["crown", "beak", "background"]
    mask = np.random.default_rng(1).integers(0, 6, size=(20, 40)).astype(np.uint8)  # ids 3-5: unnamed or unused
    names = {1: "crown", 2: "beak", 4: "tail"}
    labels = regions.label_map(vocab, 40, 20, out_hw, mask=mask, mask_names=names)
    h, w = out_hw
    rows = ((np.arange(h) + 0.5) * 20 / h).astype(int)  # each sample's pixel: the centre rule of the resize
    cols = ((np.arange(w) + 0.5) * 40 / w).astype(int)
    expected = np.vectorize(lambda pid: vocab.index(names[pid]) if names.get(pid) in vocab else 2)(
        mask[rows[:, None], cols[None, :]])
    assert labels.dtype == np.int16 and labels.tolist() == expected.tolist()


@pytest.mark.parametrize("genus, source", [("one", "genus+confusion"), (None, "confusion")])
def test_large_genera_and_missing_taxonomy_fall_back_to_the_most_confused_classes(
        genus, source, tiny_models, tiny_dataset, tmp_path):
    manifest, root = tiny_dataset
    table = pd.read_parquet(manifest)
    table["genus"] = genus  # one genus of 4 species, or no taxonomy at all
    (tmp_path / "tables").mkdir()
    table.to_parquet(tmp_path / "tables" / "manifest.parquet")
    paths = ex.extract(tiny_models["intr"], tmp_path / "tables" / "manifest.parquet", root, tmp_path / "out",
                       siblings_k=2, parts=manifest.parent / "parts.parquet", regions="annotated", progress=False)
    looks = io.load(paths["lookalikes"])
    assert set(looks["source"]) == {source}
    assert looks.groupby("class_a").size().tolist() == [2, 2, 2, 2]
    assert not (looks["class_a"] == looks["class_b"]).any()
    roles = io.load(paths["attention"], columns=["image_id", "query_role", "head"]).query("head == 0")
    assert roles.groupby("image_id").size().max() <= 4  # true, 2 look-alikes, and pred when it is neither
