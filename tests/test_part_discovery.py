"""Part discovery: the scores mean what they say, and discovery reads images and the model only."""

from __future__ import annotations

import inspect
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from analysis import part_discovery as pdisc
from analysis.config import defaults
from analysis.regions import DiscoveredParts
from analysis.tables import TABLES, fixed_list_to_numpy, read_metadata, schema
from intr.data.images import read_split


def test_a_relabelled_copy_of_the_truth_scores_one_and_unscored_patches_do_not_count():
    truth = np.array([[0, 1, 2, 2, -1], [1, 1, 0, 2, -1]])
    relabelled = np.array([[5, 3, 7, 7, 0], [3, 3, 5, 7, 5]])  # a permutation; the -1 patches disagree freely

    assert pdisc.agreement(relabelled, truth) == pytest.approx((1.0, 1.0))
    nmi, ari = pdisc.agreement(np.zeros_like(truth), truth)  # one label for everything says nothing
    assert nmi == pytest.approx(0.0) and ari == pytest.approx(0.0)


def test_references_grid_and_random_have_the_documented_labels():
    grid = pdisc.grid_labels(2, (6, 6), cells=3)
    assert grid.shape == (2, 36)
    assert grid[0].reshape(6, 6)[:2, :2].tolist() == [[1, 1], [1, 1]]
    assert grid[0].reshape(6, 6)[5, 5] == 9 and len(np.unique(grid)) == 9
    rand = pdisc.random_labels(50, (4, 4), k=5, seed=1)
    assert rand.shape == (50, 16) and set(np.unique(rand)) == {1, 2, 3, 4, 5}


def test_truth_is_the_majority_part_on_masks_and_the_keypoints_patch_on_cub():
    weights = np.zeros((1, 3, 4), np.float32)  # regions: beak, wing, background
    weights[0, :, 0] = [0.6, 0.0, 0.4]
    weights[0, :, 1] = [0.2, 0.3, 0.5]
    weights[0, :, 2] = [0.0, 1.0, 0.0]
    weights[0, :, 3] = [0.0, 0.0, 1.0]
    assert pdisc.mask_truth(weights, background=2).tolist() == [[0, -1, 1, -1]]

    manifest = pd.DataFrame({"image_id": [7, 9], "width": [100, 200], "height": [100, 100]})
    parts = pd.DataFrame({"image_id": [7, 7, 9, 9], "part_id": [1, 2, 1, 3], "x": [10.0, 99.0, 150.0, 5.0],
                          "y": [10.0, 60.0, 10.0, 5.0], "visible": [True, True, True, False]})
    truth = pdisc.keypoint_truth(manifest, parts, (2, 2))
    assert truth.tolist() == [[1, -1, -1, 2], [-1, 1, -1, -1]]


def test_fit_and_assign_find_parts_that_differ_in_feature_and_leave_low_attention_patches_background():
    rng = np.random.default_rng(0)
    n, grid = 40, (4, 4)
    features = rng.normal(0, 0.05, size=(n, 16, 8)) + np.eye(8)[0]  # background look
    part_of = np.zeros(16, int)
    part_of[[5, 6]], part_of[[9, 10]] = 1, 2  # two parts at the middle of the frame
    features[:, part_of == 1] += 3 * np.eye(8)[3]
    features[:, part_of == 2] += 3 * np.eye(8)[5]
    saliency = np.where(part_of > 0, 1.0, 0.05)[None].repeat(n, 0)

    vocab = pdisc.fit_part_vocabulary(features, saliency, grid, k=2, foreground_clusters=6)
    labels = pdisc.assign_parts(vocab, features, saliency)

    assert labels.dtype == np.int8 and labels.shape == (n, 16)
    assert (labels[:, part_of == 0] == 0).all()
    assert pdisc.agreement(labels, np.where(part_of > 0, part_of, -1)[None].repeat(n, 0)) == pytest.approx((1, 1))


def _two_square_image(noise: float = 0.01, seed: int = 0) -> np.ndarray:
    """(1, 3, 16, 16): a grey noisy ground with a flat red 4 x 4 square at (2, 2) and a flat blue one at (10, 10)."""
    rng = np.random.default_rng(seed)
    rgb = 0.5 + rng.uniform(-noise, noise, size=(1, 3, 16, 16))
    rgb[0, :, 2:6, 2:6] = np.array([0.9, 0.1, 0.1])[:, None, None]
    rgb[0, :, 10:14, 10:14] = np.array([0.1, 0.1, 0.9])[:, None, None]
    return rgb


def test_colour_segments_join_flat_colours_and_split_at_colour_steps():
    segments = pdisc.colour_segments(_two_square_image(), tolerance=0.1)[0]

    assert len(np.unique(segments)) == 3  # the noisy ground (steps < 0.1) is one piece, each square one more
    assert len(np.unique(segments[2:6, 2:6])) == 1 and len(np.unique(segments[10:14, 10:14])) == 1
    assert segments[2, 2] != segments[10, 10] != segments[0, 0] != segments[2, 2]
    two = pdisc.colour_segments(np.concatenate([_two_square_image()] * 2), tolerance=0.1)
    assert not set(two[0].ravel()) & set(two[1].ravel())  # ids are unique over the batch


def test_salient_foreground_is_the_connected_piece_holding_most_saliency_and_never_the_large_ground():
    rgb = _two_square_image()
    gradient = np.zeros_like(rgb)
    gradient[0, :, 2:6, 2:6] = 1.0  # the red square matters most
    gradient[0, :, 10:14, 10:14] = 0.4  # the blue one less: a separate piece, so it is left out
    gradient[0, :, 0, :] = 2.0  # salient ground: the ground is 86 % of the image, so it stays background

    saliency, fg, segments = pdisc.salient_foreground(rgb, gradient, tolerance=0.1, share=32 / 256)

    expected = np.zeros((16, 16), dtype=bool)
    expected[2:6, 2:6] = True
    assert (fg[0] == expected).all()
    assert saliency.max() == pytest.approx(1.0) and (saliency[0, 0, :] == 0).all()
    assert segments.shape == (1, 16, 16)


def test_congealing_turns_every_image_to_one_facing():
    rng = np.random.default_rng(0)
    side = rng.uniform(0, 1, size=64)  # one asymmetric body-frame map and its mirror
    mirror_of = side[::-1].copy()
    flipped = rng.random(30) < 0.5
    seen = np.where(flipped[:, None], mirror_of, side) + rng.uniform(0, 0.2, size=(30, 64))
    mirrored = np.where(flipped[:, None], side, mirror_of) + rng.uniform(0, 0.2, size=(30, 64))

    mirror, template = pdisc.congeal_facing(seen, mirrored)

    assert (mirror == flipped).all() or (mirror == ~flipped).all()
    assert template.shape == (64,)


def test_segment_majority_gives_each_segment_the_label_most_of_its_pixels_have():
    segments = np.array([[[0, 0, 0, 1], [2, 2, 1, 1]]])
    labels = np.array([[[3, 3, 0, 1], [0, 2, 2, 0]]])

    assert pdisc.segment_majority(segments, labels, 4).tolist() == [[[3, 3, 3, 0], [0, 0, 0, 0]]]


def test_segment_majority_breaks_a_tie_towards_the_smaller_label_whatever_the_segment_ids():
    segments = np.array([[[7, 7, 900, 900], [900, 900, 7, 7]]])  # sparse ids, as batches of segments have
    labels = np.array([[[2, 1, 3, 3], [1, 1, 2, 1]]])  # segment 7: 1 x2, 2 x2; segment 900: 1 x2, 3 x2

    assert pdisc.segment_majority(segments, labels, 4).tolist() == [[[1, 1, 1, 1], [1, 1, 1, 1]]]


def test_compact_ids_gives_each_id_its_rank_among_the_distinct_ones():
    ids = np.random.default_rng(0).choice([3, 8, 8, 40, 1000, 0], size=500)

    rank, m = pdisc.compact_ids(ids)

    assert m == len(np.unique(ids)) == 5
    assert np.array_equal(rank, np.unique(ids, return_inverse=True)[1])


def test_heaviest_top_piece_keeps_each_images_own_heaviest_piece_and_never_joins_images():
    saliency = np.zeros((3, 6, 6))
    saliency[0, 5, 0:3] = 1.0  # image 0: a bottom-row piece (mass 3) ...
    saliency[0, 0, 4:6] = 0.9  # ... and a lighter one (1.8)
    saliency[1, 0, 0:2] = 1.0  # image 1: a top-row piece just below image 0's (mass 2) ...
    saliency[1, 3:5, 3] = 1.5  # ... and a heavier one (3.0)
    # image 2: nothing salient

    piece = pdisc.heaviest_top_piece(saliency, share=0.2)

    assert np.array_equal(np.argwhere(piece[0]), [[5, 0], [5, 1], [5, 2]])
    assert np.array_equal(np.argwhere(piece[1]), [[3, 3], [4, 3]])
    assert not piece[2].any()


def _birds(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rgb (n, 3, 32, 32), gradient, head (n, 32, 32) bool): a red 4 x 4 head ahead of a blue 4 x 8 body on a grey
    noisy ground, at random places and facing left or right; the gradient is strong on the head, weak on the
    body."""
    rng = np.random.default_rng(seed)
    rgb = 0.5 + rng.uniform(-0.01, 0.01, size=(n, 3, 32, 32))
    gradient = np.zeros_like(rgb)
    head = np.zeros((n, 32, 32), dtype=bool)
    for i in range(n):
        r, c = rng.integers(2, 26), rng.integers(2, 18)
        left = rng.random() < 0.5
        hc, bc = (c, c + 4) if left else (c + 8, c)
        rgb[i, :, r:r + 4, hc:hc + 4] = np.array([0.9, 0.1, 0.1])[:, None, None]
        rgb[i, :, r:r + 4, bc:bc + 8] = np.array([0.1, 0.1, 0.9])[:, None, None]
        gradient[i, :, r:r + 4, hc:hc + 4] = 1.0
        gradient[i, :, r:r + 4, bc:bc + 8] = 0.3
        head[i, r:r + 4, hc:hc + 4] = True
    return rgb, gradient, head


def test_aligned_parts_are_places_on_the_bird_whatever_its_place_and_facing():
    rgb, gradient, head = _birds(24)
    vocabulary, choice = pdisc.fit_aligned_vocabulary(rgb, gradient, k=2, share=48 / 1024)
    new_rgb, new_gradient, new_head = _birds(10, seed=1)
    labels = pdisc.assign_aligned_parts(vocabulary, new_rgb, new_gradient)

    assert choice is None and vocabulary.k == 2 and labels.shape == (10, 32, 32) and labels.dtype == np.int8
    body = (new_rgb[:, 2] > 0.8) & ~new_head
    head_label, body_label = np.unique(labels[new_head]), np.unique(labels[body])
    assert len(head_label) == 1 and len(body_label) == 1 and head_label[0] != body_label[0] > 0
    assert int((labels > 0).sum()) == int(new_head.sum() + body.sum())  # the ground is background


def test_body_frames_put_the_head_in_the_same_cells_whichever_way_the_bird_faces():
    rgb, gradient, head = _birds(24)
    vocabulary, _ = pdisc.fit_aligned_vocabulary(rgb, gradient, k=2, share=48 / 1024)
    labels, frames = pdisc.assign_aligned_parts_and_frames(vocabulary, rgb, gradient)

    assert np.array_equal(labels, pdisc.assign_aligned_parts(vocabulary, rgb, gradient))
    bird = head | (rgb[:, 2] > 0.8)
    rows, cols = np.nonzero(bird[0])
    assert np.allclose(frames.centre[0], [rows.mean() / 32, cols.mean() / 32])  # the foreground's own centre
    facing_left = np.array([np.argwhere(h)[:, 1].mean() < np.argwhere(b)[:, 1].mean()
                            for h, b in zip(head, rgb[:, 2] > 0.8)])
    assert len(set(facing_left)) == 2  # both facings are in the sample
    assert np.array_equal(frames.mirrored, facing_left) or np.array_equal(frames.mirrored, ~facing_left)
    cells = frames.cells((32, 32), 12)
    assert cells.shape == (24, 32, 32) and cells.min() >= 0 and cells.max() < 144
    head_cells = [set(np.unique(cells[i][head[i]])) for i in range(24)]
    assert all(h == head_cells[0] for h in head_cells)  # the same places of the body, left or right facing
    assert not head_cells[0] & set(np.unique(cells[0][bird[0] & ~head[0]]))  # and none of the body's


def test_aligned_parts_tell_a_small_segment_from_the_larger_one_around_it():
    """An eye in the middle of the head sits at the head's place; its size, shape and border tell it apart."""
    rgb, gradient, head = _birds(24)
    eye = np.zeros_like(head)
    for i in range(len(rgb)):
        r, c = np.argwhere(head[i]).min(0)
        eye[i, r + 1:r + 3, c + 1:c + 3] = True
        rgb[i, :, r + 1:r + 3, c + 1:c + 3] = np.array([0.1, 0.9, 0.1])[:, None, None]
    vocabulary, _ = pdisc.fit_aligned_vocabulary(rgb, gradient, k=3, share=48 / 1024)
    labels = pdisc.assign_aligned_parts(vocabulary, rgb, gradient)

    body = (rgb[:, 2] > 0.8)
    found = [np.unique(labels[m]) for m in (head & ~eye, eye, body)]
    assert all(len(f) == 1 and f[0] > 0 for f in found), found
    assert len({int(f[0]) for f in found}) == 3


def test_segment_places_are_each_segments_place_size_border_and_shape():
    features, inverse = pdisc.segment_places(np.array([[[0, 0], [1, 2]]]), np.array([[[True, True], [True, False]]]),
                                             np.array([[[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]]),
                                             np.array([0.5]))
    places = features[inverse]
    # segment 0: two foreground pixels at along 0 and 2 (mean 1), size log(2 / (0.5 * 2) ** 2), spatial variance
    # 1 plus a pixel's own 1 / 6 over its area 2; of its 6 border steps (2 into segments 1 and 2, 4 off the
    # image) 5 land outside the foreground (the non-foreground segment 2 and off the image)
    w_size, w_border, w_shape = pdisc.SEGMENT_SIZE_WEIGHT, pdisc.SEGMENT_BORDER_WEIGHT, pdisc.SEGMENT_SHAPE_WEIGHT
    assert np.allclose(places[0], [1.0, 0.0, w_size * np.log(2.0), w_border * 5 / 6, w_shape * np.log(7 / 12)])
    assert np.allclose(places[0], places[1])
    assert np.allclose(places[2], [0.0, 1.0, 0.0, w_border * 3 / 4, w_shape * np.log(1 / 6)])
    # no foreground pixel: the place of nothing, both its border steps inside, two off the image
    assert np.allclose(places[3], [0.0, 0.0, 0.0, w_border * 2 / 4, w_shape * np.log(1 / 6)])


def test_segment_points_weigh_each_foreground_segment_by_its_pixels_so_kmeans_sees_every_pixel(monkeypatch):
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(3)
    segments = rng.integers(0, 40, size=(2, 16, 16)) + 40 * np.arange(2)[:, None, None]
    foreground = rng.random((2, 16, 16)) < 0.6
    foreground[1, :, :] &= segments[1] != 45  # a segment with no foreground pixel is left out
    coords = rng.normal(size=(2, 256, 2))
    places, inverse = pdisc.segment_places(segments, foreground, coords, np.array([0.3, 0.4]))
    points, weights = pdisc.segment_points(places, inverse, foreground, seed=0)
    fg = foreground.ravel()
    counts = np.bincount(inverse[fg], minlength=len(places))
    assert weights.sum() == fg.sum() and len(points) == (counts > 0).sum() and 45 not in set(inverse[fg])
    assert np.array_equal(points, places[counts > 0]) and np.array_equal(weights, counts[counts > 0])
    # Weighted k-means of the segments is k-means of the pixels: the same inertia at the same centres.
    per_pixel = places[inverse[fg]]
    fit = KMeans(4, n_init=1, random_state=0).fit(points, sample_weight=weights)
    assert np.isclose(fit.inertia_, ((per_pixel - fit.cluster_centers_[fit.predict(per_pixel)]) ** 2).sum())
    monkeypatch.setattr(pdisc, "FIT_SEGMENTS", 10)  # above the cap: a seeded subsample of the segments
    few, few_weights = pdisc.segment_points(places, inverse, foreground, seed=0)
    assert len(few) == 10 and np.array_equal(few_weights, counts[np.flatnonzero((places[:, None] == few[None]).all(-1).any(1))])


def test_segment_shape_tells_a_disk_from_a_ring_and_a_stripe():
    """A disk's spatial variance over its area is 1 / (2 pi); a ring's and a stripe's are larger."""
    yy, xx = np.mgrid[0:64, 0:64] - 31.5
    r = np.hypot(yy, xx)
    shapes = {"disk": r < 12, "ring": (r < 20) & (r >= 14), "stripe": (np.abs(yy) < 2) & (np.abs(xx) < 24)}
    segments = np.zeros((3, 64, 64), dtype=np.int64)
    for i, mask in enumerate(shapes.values()):
        segments[i][mask] = 1
    segments += 2 * np.arange(3)[:, None, None]
    foreground = segments % 2 == 1
    coords = pdisc.frame_coordinates((64, 64), np.full((3, 2), 0.5), np.full(3, 0.25), np.zeros(3, bool))
    features, inverse = pdisc.segment_places(segments, foreground, coords, np.full(3, 0.25))
    places = features[inverse].reshape(3, 64 * 64, -1)
    shape = {name: places[i][mask.ravel()][0, 4] / pdisc.SEGMENT_SHAPE_WEIGHT for i, (name, mask) in
             enumerate(shapes.items())}
    assert abs(shape["disk"] - np.log(1 / (2 * np.pi))) < 0.02
    assert shape["ring"] > shape["disk"] + 0.5 and shape["stripe"] > shape["disk"] + 0.5
    border = {name: places[i][mask.ravel()][0, 3] / pdisc.SEGMENT_BORDER_WEIGHT for i, (name, mask) in
              enumerate(shapes.items())}
    assert border == {"disk": 1.0, "ring": 1.0, "stripe": 1.0}  # each lies on background alone


def test_discover_defaults_are_the_schema_defaults():
    from intr.discover import discover_parts

    params = inspect.signature(discover_parts).parameters
    as_schema = {k: list(v) if isinstance(v, tuple) else v for k, v in
                 ((k, params[k].default) for k in defaults("discovery"))}   # a tuple default is the schema's list
    assert as_schema == defaults("discovery")
    assert params["split"].default == defaults("extract")["split"]


@pytest.fixture(scope="module")
def unlabelled_copy(tiny_dataset, tmp_path_factory):
    """The tiny data set with parts.parquet, part masks, boxes, traits and attributes removed."""
    manifest, root = tiny_dataset
    out = tmp_path_factory.mktemp("unlabelled")
    shutil.copytree(root / "images", out / "data" / "images")
    rows = pd.read_parquet(manifest).drop(columns=["mask_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h"])
    (out / "tables").mkdir()
    rows.to_parquet(out / "tables" / "manifest.parquet")
    return out / "tables" / "manifest.parquet", out / "data"


@pytest.mark.parametrize("method", ["prompt_cam", "intr"])
def test_discover_labels_every_image_of_the_split_and_reads_no_annotation(method, tiny_models, tiny_dataset,
                                                                           unlabelled_copy, tmp_path):
    from intr.cli import main
    from intr.discover import discover_parts

    manifest, root = tiny_dataset
    options = {"k": 3, "fit_images": 0, "foreground_clusters": 4, "units": "patches"}
    path = discover_parts(tiny_models[method], manifest, root, tmp_path / "full.parquet", device="cpu", **options)
    bare_manifest, bare_root = unlabelled_copy
    assert not (bare_manifest.parent / "parts.parquet").exists() and not (bare_root / "masks").exists()
    code = main(["discover", "--model", str(tiny_models[method]), "--manifest", str(bare_manifest),
                 "--root", str(bare_root), "--out", str(tmp_path / "bare.parquet"), "--quiet",
                 "--config-json", json.dumps({"discovery": options, "extract": {"device": "cpu"}})])
    assert code == 0

    table = pq.read_table(path)
    meta = read_metadata(path)
    assert table.schema.remove_metadata() == schema("discovered_parts", cells=16).remove_metadata()
    assert table["image_id"].to_pylist() == read_split(manifest, "test")["image_id"].tolist()
    labels = fixed_list_to_numpy(table["labels"], np.int64)
    assert labels.min() >= 0 and labels.max() <= 3 and (labels > 0).any()
    assert {k: meta[k] for k in ("grid_h", "grid_w", "k", "method", "split")} == \
        {"grid_h": 4, "grid_w": 4, "k": 3, "method": method, "split": "test"}
    assert pq.read_table(tmp_path / "bare.parquet").equals(table)  # no annotation changed a label
    assert table["frame_spread"].null_count == len(table)  # patch units place no image in a body frame
    assert DiscoveredParts.read(path).frame_cells([int(table["image_id"][0].as_py())], 32, 12) is None

    scores = pdisc.part_discovery_scores(path, manifest, manifest.parent / "parts.parquet", root, method)
    assert sorted(set(zip(scores["method"], scores["metric"]))) == sorted(
        (m, f"part_discovery_{s}") for m in (method, "grid", "random") for s in ("ari", "nmi"))
    nmi = scores[scores["metric"] == "part_discovery_nmi"]
    assert nmi["value"].between(0, 1).all() and (scores["split"] == "test").all()
    assert pdisc.part_discovery_scores(tmp_path / "bare.parquet", bare_manifest, None, bare_root, method).empty


@pytest.mark.parametrize("method", ["prompt_cam", "intr"])
def test_aligned_discovery_writes_sub_patch_label_maps_and_reads_no_annotation(method, tiny_models, tiny_dataset,
                                                                               unlabelled_copy, tmp_path):
    from intr.cli import main
    from intr.discover import discover_parts
    from intr.models import load_model

    manifest, root = tiny_dataset
    options = {"k": 3, "fit_images": 0, "units": "aligned"}
    path = discover_parts(tiny_models[method], manifest, root, tmp_path / "full.parquet", device="cpu", **options)
    bare_manifest, bare_root = unlabelled_copy
    assert main(["discover", "--model", str(tiny_models[method]), "--manifest", str(bare_manifest),
                 "--root", str(bare_root), "--out", str(tmp_path / "bare.parquet"), "--quiet",
                 "--config-json", json.dumps({"discovery": options, "extract": {"device": "cpu"}})]) == 0

    size = load_model(tiny_models[method])[1]["image_size"]
    side = len(range(0, size, -(-size // 32)))
    meta = read_metadata(path)
    assert (meta["grid_h"], meta["grid_w"], meta["discovery"]) == (side, side, "body_frame_parts")
    labels = fixed_list_to_numpy(pq.read_table(path)["labels"], np.int64)
    assert labels.shape[1] == side * side and labels.min() >= 0 and labels.max() <= 3 and (labels > 0).any()
    assert pq.read_table(tmp_path / "bare.parquet").equals(pq.read_table(path))
    frames = pq.read_table(path).to_pandas()
    assert frames["frame_spread"].gt(0).all() and frames[["frame_row", "frame_col"]].stack().between(0, 1).all()
    parts = DiscoveredParts.read(path)
    ids = frames["image_id"].astype(int).tolist()
    cells = parts.frame_cells([ids[0], -1, ids[1]], size, 12)  # -1: an image without a frame
    assert cells.shape == (3, size, size) and 0 <= cells[[0, 2]].min() and cells.max() < 144
    assert (cells[1] == -1).all()
    assert (parts.frame_cells([ids[1]], size, 12)[0] == cells[2]).all()  # each image's cells alone or in a batch


def test_discover_refuses_other_classes_and_pickled_code_in_one_line_before_any_compute(
        tiny_models, tiny_dataset, six_class_manifest, tmp_path, capsys):
    import torch

    from intr.cli import main

    manifest, root = tiny_dataset
    torch.save({"config": "{}", "payload": print}, tmp_path / "model.pt")  # builtins.print: not a tensor

    def discover(model, manifest_path) -> int:
        return main(["discover", "--model", str(model), "--manifest", str(manifest_path), "--root", str(root),
                     "--out", str(tmp_path / "parts.parquet"), "--quiet", "--config-json",
                     json.dumps({"extract": {"device": "cpu"}})])

    assert discover(tiny_models["prompt_cam"], six_class_manifest) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"intr discover: error: {tiny_models['prompt_cam']} was trained on other classes") and \
        "4 classes in the model, 6 in the manifest" in err and err.count("\n") == 1
    assert discover(tmp_path / "model.pt", manifest) == 1
    assert capsys.readouterr().err == (f"intr discover: error: {tmp_path / 'model.pt'} is not a checkpoint this tool "
                                       "wrote (it holds Python objects other than tensors: print); "
                                       "refusing to load it\n")
    assert not (tmp_path / "parts.parquet").exists()


def test_discovered_parts_table_is_declared():
    assert [c.name for c in TABLES["discovered_parts"]] == ["image_id", "labels", "frame_row", "frame_col",
                                                            "frame_spread", "frame_mirrored"]


def test_pixel_map_of_a_non_square_image_resizes_each_axis_on_its_own():
    """A 2 x 2 patch map over a 5 x 3 px image: each pixel takes the cell its centre falls in, per axis."""
    from analysis.regions import DiscoveredParts, grid_labels_at

    grid_map = np.array([[1, 2], [0, 3]], dtype=np.int8)
    expected = np.array([[1, 1, 2, 2, 2],   # pixel centres x 0.5..4.5 -> columns 0,0,1,1,1 (x * 2 / 5)
                         [0, 0, 3, 3, 3],   # centres y 0.5, 1.5, 2.5 -> rows 0, 1, 1 (y * 2 / 3)
                         [0, 0, 3, 3, 3]])
    assert np.array_equal(grid_labels_at(grid_map, 5, 3, (3, 5)), expected)
    parts = DiscoveredParts(3, (2, 2), {7: grid_map})
    assert np.array_equal(parts.pixel_labels(7, width=5, height=3), expected)
    # the region indices the report's gallery outlines (background last) are the same map, relabelled
    assert np.array_equal(parts.label_map(7, 5, 3, (3, 5)), np.where(expected == 0, 3, expected - 1))
    # a thumbnail samples the same rule: a 2 x 4 thumbnail of the 5 x 3 image
    assert np.array_equal(grid_labels_at(grid_map, 5, 3, (2, 4)), [[1, 1, 2, 2], [0, 0, 3, 3]])


def test_elbow_is_the_candidate_farthest_below_the_chord():
    assert pdisc.elbow([2, 3, 4, 5, 6], [100.0, 40.0, 30.0, 25.0, 22.0]) == 3
    assert pdisc.elbow([2, 3, 4], [3.0, 2.0, 1.0]) == 2   # a straight line has no elbow: the first


def test_auto_k_picks_the_planted_part_count_and_records_the_curve():
    """Four well-separated planted parts: the inertia elbow over k 2..8 is 4, without any label."""
    rng = np.random.default_rng(0)
    n, grid = 60, (4, 4)
    features = rng.normal(0, 0.05, size=(n, 16, 8)) + np.eye(8)[0]
    part_of = np.zeros(16, int)
    part_of[[5, 6, 9, 10]] = [1, 2, 3, 4]
    for p in range(1, 5):
        features[:, part_of == p] += 3 * np.eye(8)[p + 2]
    saliency = np.where(part_of > 0, 1.0, 0.05)[None].repeat(n, 0)

    choice = pdisc.choose_part_count(features, saliency, grid, (2, 8), foreground_clusters=6)
    assert choice.k == 4 and choice.candidates == list(range(2, 9))
    assert all(a >= b for a, b in zip(choice.inertia, choice.inertia[1:]))   # more parts never fit worse
    meta = choice.metadata()
    assert meta["k_criterion"] == "inertia_elbow" and len(meta["k_inertia"]) == len(meta["k_candidates"]) == 7


def test_discover_works_on_an_intr_with_a_resnet_backbone(tiny_dataset, tmp_path):
    """A CNN backbone: the label maps take the feature map's grid (3 x 3 at 96 px, stride 32), labels 0..k."""
    import torch

    from intr.discover import discover_parts
    from intr.models import load_model
    from intr.train import train

    manifest, root = tiny_dataset
    torch.manual_seed(0)
    transformer = {"d_model": 32, "heads": 4, "encoder_layers": 1, "decoder_layers": 1, "ffn": 64, "dropout": 0.0}
    train("intr", {"backbone": {"name": "resnet18"}, "transformer": transformer, "freeze_backbone": True},
          {"epochs": 1, "batch_size": 8, "lr": 0.01, "warmup_epochs": 0, "seed": 1},
          manifest, root, tmp_path / "intr", image_size=96, progress=False)
    model, _ = load_model(tmp_path / "intr" / "model.pt", manifest=manifest)
    assert model.grid_size == (3, 3)

    path = discover_parts(tmp_path / "intr" / "model.pt", manifest, root, tmp_path / "parts.parquet",
                          k=2, fit_images=0, foreground_clusters=3, device="cpu", units="patches")
    meta = read_metadata(path)
    labels = fixed_list_to_numpy(pq.read_table(path)["labels"], np.int64)
    assert (meta["grid_h"], meta["grid_w"], meta["k"]) == (3, 3, 2)
    assert labels.shape == (len(read_split(manifest, "test")), 9)
    assert labels.min() >= 0 and labels.max() <= 2
    # body-frame parts need only the input gradient, so a CNN backbone gives them too
    path = discover_parts(tmp_path / "intr" / "model.pt", manifest, root, tmp_path / "aligned.parquet",
                          k=2, fit_images=0, device="cpu", units="aligned")
    labels = fixed_list_to_numpy(pq.read_table(path)["labels"], np.int64)
    side = read_metadata(path)["grid_h"]
    assert labels.shape == (len(read_split(manifest, "test")), side * side) and side > 3
    assert labels.min() >= 0 and labels.max() <= 2 and (labels > 0).any()


def test_majority_part_of_a_region_smaller_than_a_patch_is_the_part_under_it():
    from analysis.pipeline import ImageTable, RegionGeometry, majority_parts
    from analysis.regions import DiscoveredParts, RegionLayout, image_weights

    regions = np.zeros((4, 4), int)
    regions[0, 0] = 1  # a quarter of the top-left patch ...
    regions[0, 1] = regions[1, 0] = regions[1, 1] = 2
    regions[3, 3] = regions[3, 2] = regions[2, 3] = 3
    truth = np.zeros((4, 4), int)
    truth[0, 0] = 1  # ... lies on part 1, the patch's smallest part
    truth[0, 1] = truth[1, 0] = truth[1, 1] = 2
    truth[3, 3] = 2  # region 3 is two thirds background
    rows = pd.DataFrame({"image_id": [1], "width": [16], "height": [16]})
    images = ImageTable(np.array([1]), np.array([0]), np.array([True]), rows)

    def geometry(labels: np.ndarray, k: int) -> RegionGeometry:
        layout = RegionLayout.build("discovered", discovered=DiscoveredParts(k, (4, 4), {1: labels}))
        weights = image_weights(layout, rows, (2, 2))
        return RegionGeometry(layout.vocab, weights, weights.mean(-1), layout=layout, grid=(2, 2))

    found, parts = geometry(regions, 3), geometry(truth, 2)
    named = majority_parts(found, parts, images, np.array([0]), root=None)
    strict = majority_parts(found, parts, images, np.array([0]), root=None, background=True)

    assert named[0] == ["part_1", "part_2", "part_2", "background"]  # the last: the background region itself
    assert strict[0] == ["part_1", "part_2", "background", "background"]
    patchwise = np.einsum("nrg,npg->rp", found.weights, parts.weights)
    assert parts.vocab[patchwise[0].argmax()] == "part_2"  # patch weights alone name region 1 wrongly
