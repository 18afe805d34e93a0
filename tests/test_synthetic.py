"""The synthetic data set: determinism, CUB layout, and that the planted truth is true."""

from __future__ import annotations

import csv
import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from intr.data.synthetic import (
    DISTINGUISHING_PARTS,
    PART_ID,
    PARTS,
    SyntheticConfig,
    build_taxonomy,
    control_state,
    draw_nuisance,
    part_keypoints,
    render_bird,
    render_counterfactual,
    synthesize,
)

SMALL = SyntheticConfig(genera=2, species_per_genus=3, images_per_species=6, seed=3)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    synthesize(SMALL, root, workers=1, progress=False)
    return root


def test_same_config_gives_byte_identical_files_whatever_the_worker_count(small_set, tmp_path):
    again = tmp_path / "again"
    synthesize(SMALL, again, workers=2, progress=False)
    first, second = _tree_digest(small_set), _tree_digest(again)
    assert len(first) > 30
    assert first == second


def test_another_seed_gives_other_images(small_set, tmp_path):
    other = tmp_path / "other"
    synthesize(SyntheticConfig(genera=2, species_per_genus=3, images_per_species=6, seed=4), other,
               progress=False)
    first, second = _tree_digest(small_set), _tree_digest(other)
    images = [k for k in first if k.startswith("images/")]
    assert sum(first[k] != second.get(k) for k in images) > len(images) // 2


def test_cub_layout_lists_are_consistent(small_set):
    images = [line.split() for line in (small_set / "images.txt").read_text().splitlines()]
    assert len(images) == 2 * 3 * 6
    assert [int(i) for i, _ in images] == list(range(1, 37))
    for _, rel in images:
        assert (small_set / "images" / rel).exists()
        assert (small_set / "masks" / rel).exists()
    classes = (small_set / "classes.txt").read_text().splitlines()
    assert classes[0].startswith("1 001.")
    labels = [int(line.split()[1]) for line in (small_set / "image_class_labels.txt").read_text().splitlines()]
    assert labels == sorted(labels) and set(labels) == set(range(1, 7))
    split = [int(line.split()[1]) for line in (small_set / "train_test_split.txt").read_text().splitlines()]
    assert sum(split) == 6 * 3  # train_fraction 0.5 of 6 images, per class
    parts = (small_set / "parts" / "parts.txt").read_text().splitlines()
    assert parts == [f"{PART_ID[p]} {p}" for p in PARTS]
    locs = (small_set / "parts" / "part_locs.txt").read_text().splitlines()
    assert len(locs) == 36 * len(PARTS)
    attributes = (small_set / "attributes" / "attributes.txt").read_text().splitlines()
    assert "has_crown_color::red" in {a.split(maxsplit=1)[1] for a in attributes}
    rows = (small_set / "attributes" / "class_attribute_labels_continuous.txt").read_text().splitlines()
    assert len(rows) == 6 and all(len(r.split()) == len(attributes) for r in rows)


def test_keypoints_lie_inside_their_own_mask_and_boxes_hold_the_bird(small_set):
    paths = dict(line.split() for line in (small_set / "images.txt").read_text().splitlines())
    boxes = {line.split()[0]: [float(x) for x in line.split()[1:]]
             for line in (small_set / "bounding_boxes.txt").read_text().splitlines()}
    visible = 0
    for line in (small_set / "parts" / "part_locs.txt").read_text().splitlines():
        image_id, part_id, x, y, vis = line.split()
        mask = np.asarray(Image.open(small_set / "masks" / paths[image_id]))
        if vis == "1":
            visible += 1
            assert mask[int(float(y)), int(float(x))] == int(part_id)
        else:
            assert (mask == int(part_id)).sum() < 3
    assert visible > 36 * 6
    for image_id, rel in paths.items():
        mask = np.asarray(Image.open(small_set / "masks" / rel))
        x, y, w, h = boxes[image_id]
        ys, xs = np.nonzero(mask)
        assert xs.min() == x and ys.min() == y and xs.max() == x + w - 1 and ys.max() == y + h - 1


def test_traits_and_pairs_files_match_the_taxonomy(small_set):
    taxonomy = build_taxonomy(SMALL)
    with open(small_set / "traits.csv") as f:
        traits = list(csv.DictReader(f))
    assert len(traits) == len(taxonomy) * len(PARTS)
    by_species = {(r["species"], r["part"]): r for r in traits}
    for sp in taxonomy:
        for part in PARTS:
            assert by_species[(sp.name, part)]["colour"] == sp.states[part].colour
    with open(small_set / "pairs.csv") as f:
        pairs = list(csv.DictReader(f))
    assert len(pairs) == 2 * 3  # 3 pairs per genus of 3
    for row in pairs:
        parts = row["differing_parts"].split(";")
        assert 1 <= len(parts) <= 2 and int(row["n_differing"]) == len(parts)
        assert set(parts) <= set(DISTINGUISHING_PARTS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_siblings_differ_exactly_in_the_recorded_parts_on_rendered_pixels(seed):
    taxonomy = build_taxonomy(SyntheticConfig(seed=seed))
    rng = np.random.default_rng(100 + seed)
    checked = 0
    for a, b in itertools.combinations(taxonomy, 2):
        if a.genus.name != b.genus.name:
            continue
        differing = a.differing_parts(b)
        assert 1 <= len(differing) <= 2
        for _ in range(4):
            nuisance = draw_nuisance(rng)
            img_a, mask_a = render_bird(a, nuisance, 64)
            img_b, mask_b = render_bird(b, nuisance, 64)
            assert np.array_equal(mask_a, mask_b)  # siblings share every shape
            changed = np.any(img_a != img_b, axis=-1)
            allowed = np.isin(mask_a, [PART_ID[p] for p in differing])
            assert not np.any(changed & ~allowed), "pixels changed outside the differing parts"
            for part in differing:
                inside = mask_a == PART_ID[part]
                if inside.sum() >= 20:
                    assert changed[inside].mean() > 0.2, f"{part} barely changed between {a.name} and {b.name}"
            checked += 1
    assert checked >= 4 * 4 * 3


def test_distinguishing_parts_cover_at_least_two_patches():
    config = SyntheticConfig(images_per_species=10, seed=5)
    taxonomy = build_taxonomy(config)
    rng = np.random.default_rng(0)
    covered = {p: [] for p in DISTINGUISHING_PARTS}
    for sp in taxonomy:
        for _ in range(10):
            _, mask = render_bird(sp, draw_nuisance(rng), 64)
            for part in DISTINGUISHING_PARTS:
                pixels = (mask == PART_ID[part]).reshape(8, 8, 8, 8).sum(axis=(1, 3))
                if pixels.sum() >= 3:
                    covered[part].append(((pixels > 0).sum(), (pixels >= 8).sum()))
    for part, rows in covered.items():
        touched, substantial = np.array(rows).T
        assert (touched >= 2).mean() >= 0.95, part
        assert substantial.mean() >= 2.0, part


def test_image_size_scales_the_same_bird():
    sp = build_taxonomy(SyntheticConfig())[0]
    nuisance = draw_nuisance(np.random.default_rng(1))
    _, small = render_bird(sp, nuisance, 64)
    _, large = render_bird(sp, nuisance, 224)
    for part in ("crown", "wing", "tail"):
        frac_small = (small == PART_ID[part]).mean()
        frac_large = (large == PART_ID[part]).mean()
        assert frac_large == pytest.approx(frac_small, rel=0.25, abs=0.003)


def test_pretraining_set_is_larger_disjoint_and_covers_every_part():
    target = build_taxonomy(SyntheticConfig())
    pretrain = build_taxonomy(SyntheticConfig.from_dict({"set": "pretrain"}))
    assert len(pretrain) == 32 * 3
    keys = lambda taxonomy: {(s.genus.bill_length, s.genus.tail_shape, tuple(s.states[p] for p in PARTS))
                             for s in taxonomy}
    assert not keys(target) & keys(pretrain)
    assert not {s.genus.name for s in target} & {s.genus.name for s in pretrain}
    varied = {part for a, b in itertools.combinations(pretrain, 2) if a.genus.name == b.genus.name
              for part in a.differing_parts(b)}
    assert varied == set(DISTINGUISHING_PARTS)


def test_unknown_option_is_an_error_naming_it():
    with pytest.raises(ValueError, match="colour_jitter"):
        SyntheticConfig.from_dict({"colour_jitter": 0.5})
    with pytest.raises(ValueError, match="set must be"):
        SyntheticConfig(set="validation")


def test_cli_synthesize_writes_the_data_set(tmp_path, capsys):
    from intr.cli import main

    config = '{"synthetic": {"genera": 1, "species_per_genus": 2, "images_per_species": 3}}'
    assert main(["synthesize", "--out", str(tmp_path / "d"), "--config-json", config, "--quiet"]) == 0
    assert "wrote 6 images of 2 species (1 genera)" in capsys.readouterr().out
    assert len((tmp_path / "d" / "images.txt").read_text().splitlines()) == 6


def test_keypoint_of_a_hidden_part_is_invisible():
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[2:6, 2:6] = PART_ID["crown"]
    mask[10, 10] = PART_ID["eye"]  # one pixel: too few to count as visible
    points = {pid: (x, y, vis) for pid, x, y, vis in part_keypoints(mask)}
    assert points[PART_ID["crown"]][2] == 1
    assert mask[int(points[PART_ID["crown"]][1]), int(points[PART_ID["crown"]][0])] == PART_ID["crown"]
    assert points[PART_ID["eye"]] == (0.0, 0.0, 0)


def test_counterfactual_changes_only_the_swapped_parts_pixels():
    taxonomy = build_taxonomy(SyntheticConfig(seed=0))
    rng = np.random.default_rng(7)
    for a, b in itertools.permutations(taxonomy[:3], 2):
        for part in a.differing_parts(b):
            nuisance = draw_nuisance(rng)
            original, mask = render_bird(a, nuisance, 64)
            swapped, new_mask = render_counterfactual(a, nuisance, 64, {part: b.states[part]})
            changed = np.any(original != swapped, axis=-1)
            inside = (mask == PART_ID[part]) | (new_mask == PART_ID[part])
            assert not np.any(changed & ~inside), f"{a.name} with {b.name}'s {part} changed other pixels"
            if (mask == PART_ID[part]).sum() >= 20:
                assert changed[mask == PART_ID[part]].mean() > 0.2, f"{part} barely changed"


@pytest.mark.parametrize("seed", [0, 1])
def test_swapping_every_planted_part_reproduces_the_look_alikes_render_byte_for_byte(seed):
    taxonomy = build_taxonomy(SyntheticConfig(seed=seed))
    rng = np.random.default_rng(200 + seed)
    pairs = [(a, b) for a, b in itertools.permutations(taxonomy, 2) if a.genus.name == b.genus.name]
    assert len(pairs) == 4 * 3 * 2
    for a, b in pairs:
        nuisance = draw_nuisance(rng)
        swapped = render_counterfactual(a, nuisance, 64, {p: b.states[p] for p in a.differing_parts(b)})
        own = render_bird(b, nuisance, 64)
        assert swapped[0].tobytes() == own[0].tobytes() and swapped[1].tobytes() == own[1].tobytes()


def test_control_swap_uses_a_state_from_elsewhere_that_makes_no_known_species():
    taxonomy = build_taxonomy(SyntheticConfig(seed=0))
    known = {tuple(sp.states[p] for p in PARTS) for sp in taxonomy}
    a, b = taxonomy[0], taxonomy[1]
    shared = [p for p in PARTS if p not in a.differing_parts(b)]
    nuisance = draw_nuisance(np.random.default_rng(3))
    original, mask = render_bird(a, nuisance, 64)
    for part in shared:
        state = control_state(taxonomy, a, part)
        assert state is not None and state != a.states[part]
        assert any(sp.states[part] == state and sp.genus.name != a.genus.name for sp in taxonomy)
        assert tuple((state if p == part else a.states[p]) for p in PARTS) not in known
        swapped, _ = render_counterfactual(a, nuisance, 64, {part: state})
        changed = np.any(original != swapped, axis=-1)
        assert not np.any(changed & (mask != PART_ID[part]))


def test_counterfactual_of_an_unknown_part_is_an_error_naming_it():
    sp = build_taxonomy(SyntheticConfig())[0]
    with pytest.raises(ValueError, match="wings"):
        render_counterfactual(sp, draw_nuisance(np.random.default_rng(0)), 64, {"wings": sp.states["wing"]})
