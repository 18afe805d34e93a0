"""Occlusion operators: they change only the removed pixels, fills remove a part's colour, blur stays RISE's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import intr.extract as ex
from analysis import regions
from intr.data.images import ImageSet, read_split
from intr.faithfulness import curve_ends, insertion_deletion_curves
from intr.models import load_model
from intr.occlusion import OPERATORS, Occlusion, gaussian_blur, separable_gaussian_blur

GREEN = torch.tensor([0.1, 0.7, 0.2])  # the surroundings
GREY = torch.tensor([0.5, 0.5, 0.5])  # the bird's body
RED = torch.tensor([0.9, 0.1, 0.1])  # the part


def bird_image() -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, 24, 24) green image with a grey body and a red 4 x 4 part inside it, and the part's hard mask."""
    image = GREEN.view(3, 1, 1).repeat(1, 24, 24)
    image[:, 6:18, 6:18] = GREY.view(3, 1, 1)
    image[:, 10:14, 10:14] = RED.view(3, 1, 1)
    mask = torch.zeros(1, 1, 24, 24)
    mask[..., 10:14, 10:14] = 1
    return image.unsqueeze(0), mask


def region_colour(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean colour (3,) of ``image`` (1, 3, H, W) over ``mask`` (1, 1, H, W)."""
    return (image * mask).sum((0, 2, 3)) / mask.sum()


@pytest.mark.parametrize("operator", OPERATORS)
def test_every_operator_changes_pixels_only_inside_a_hard_mask(operator):
    image, mask = bird_image()
    occluded = Occlusion(operator, 0.05)(image, mask)
    outside = mask.expand_as(image) == 0
    assert torch.equal(occluded[outside], image[outside])
    assert not torch.allclose(occluded[~outside], image[~outside], atol=0.05)  # the red part is gone


@pytest.mark.parametrize("operator", ["mean_fill", "background_fill"])
def test_fills_replace_the_part_colour_by_the_surroundings(operator):
    image, mask = bird_image()
    fill = region_colour(Occlusion(operator, 0.05)(image, mask), mask)
    ring = torch.zeros_like(mask)
    ring[..., 8:16, 8:16] = 1
    ring = ring * (1 - mask)  # the grey body just around the part
    # background_fill takes the nearby body's colour; mean_fill the image's colour (all but the part).
    surroundings = region_colour(image, ring if operator == "background_fill" else 1 - mask)
    assert (fill - RED).norm() > 0.5
    assert (fill - surroundings).norm() < 0.1 * (RED - surroundings).norm()


def test_blur_keeps_the_part_colour_the_fills_do_not():
    image, mask = bird_image()
    fill = {op: region_colour(Occlusion(op, 0.05)(image, mask), mask) for op in OPERATORS}
    distance = {op: float((fill[op] - RED).norm()) for op in OPERATORS}
    assert distance["blur"] < distance["strong_blur"] and distance["blur"] < distance["background_fill"]
    assert distance["blur"] < 0.4  # sigma 1.2 px leaves a 4 px red square mostly red


def test_blur_occlusion_equals_extracts_blur_images_exactly():
    image, mask = bird_image()
    images = torch.cat([image, image.flip(-1)])
    masks = torch.cat([mask, mask.flip(-2)])
    blurred = ex.blur_images(images, 0.05)
    occlusion = Occlusion("blur", 0.05)
    assert torch.equal(occlusion.fill(images), blurred)
    assert torch.equal(blurred, gaussian_blur(images, 0.05 * 24))
    assert torch.equal(occlusion(images, masks), images * (1 - masks) + blurred * masks)


def test_separable_blur_equals_the_2d_kernel_blur():
    images = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    for sigma in (0.8, 3.0, 12.0):
        torch.testing.assert_close(separable_gaussian_blur(images, sigma), gaussian_blur(images, sigma),
                                   atol=1e-5, rtol=1e-5)


def test_background_fill_of_a_fully_removed_image_is_its_mean_colour():
    image, _ = bird_image()
    occlusion = Occlusion("background_fill", 0.05)
    expected = image.mean((2, 3), keepdim=True).expand_as(image)
    torch.testing.assert_close(occlusion(image, torch.ones_like(image[:, :1])), expected)
    torch.testing.assert_close(occlusion.fill(image), expected)


def test_a_soft_mask_blends_image_and_fill():
    image, mask = bird_image()
    occlusion = Occlusion("mean_fill", 0.05)
    soft = 0.25 * mask
    torch.testing.assert_close(occlusion(image, soft), image * (1 - soft) + occlusion.fill(image) * soft)


def test_an_unknown_operator_is_refused():
    with pytest.raises(ValueError, match="background_fill"):
        Occlusion("inpaint", 0.05)


def test_background_fill_deletion_curve_fills_each_step_from_its_kept_pixels():
    image, _ = bird_image()
    weights = torch.randn(3 * 24 * 24, 2, generator=torch.Generator().manual_seed(1))
    predict = lambda x: x.flatten(1) @ weights  # noqa: E731  (a linear "model" of two classes)
    saliency = torch.zeros(1, 24, 24)
    saliency[0, 10:14, 10:14] = 1  # the part first
    occlusion = Occlusion("background_fill", 0.05)
    removed_all = occlusion.fill(image)
    ins, dele = insertion_deletion_curves(predict, image, removed_all, saliency, torch.tensor([0]), steps=36,
                                          occlusion=occlusion)
    # Step 1 deletes 16 pixels: the part, filled from the grey around it.
    mask = saliency.view(1, 1, 24, 24)
    expected = predict(occlusion(image, mask)).softmax(-1)[0, 0]
    torch.testing.assert_close(dele[0, 1], expected)
    torch.testing.assert_close(dele[0, -1], predict(removed_all).softmax(-1)[0, 0])
    torch.testing.assert_close(ins[0, 0], predict(removed_all).softmax(-1)[0, 0])
    torch.testing.assert_close(ins[0, -1], predict(image).softmax(-1)[0, 0])
    # The shared ends (intr.faithfulness.curve_ends) are the same curve: everything removed by the
    # step's mask is the operator's fill of the whole image.
    ends = curve_ends(predict, image, {"": removed_all}, torch.tensor([0]))[""]
    ins2, dele2 = insertion_deletion_curves(predict, image, removed_all, saliency, torch.tensor([0]), steps=36,
                                            occlusion=occlusion, ends=ends)
    torch.testing.assert_close(ins2, ins)
    torch.testing.assert_close(dele2, dele)


def three_test_images(tiny_models, tiny_dataset):
    """The tiny Prompt-CAM, its first three test images (32 px), their classes and annotated regions."""
    manifest, root = tiny_dataset
    model, config = load_model(tiny_models["prompt_cam"])
    model.eval()
    rows = read_split(manifest, "test").iloc[:3].reset_index(drop=True)
    data = ImageSet(root, rows, 32, config["normalization"]["mean"], config["normalization"]["std"])
    images, labels = torch.stack([data[i][0] for i in range(3)]), data.labels[:3]
    source = ex.RegionSource.load("annotated", rows, root, manifest.parent / "parts.parquet", None,
                                  regions.DEFAULT_RADIUS, regions.DEFAULT_CELLS)
    return model, images, labels, source


@pytest.mark.parametrize("operator", ["blur", "background_fill"])
def test_region_effects_with_an_operator_are_the_margin_drop_of_that_occlusion(operator, tiny_models, tiny_dataset):
    model, images, labels, source = three_test_images(tiny_models, tiny_dataset)
    masks = [regions.region_masks(m, len(source.vocab)) for m in source.labels(np.arange(3), 32)]
    siblings = [[(int(y) + 1) % 4] for y in labels]
    occlusion = Occlusion(operator, 0.05)
    with torch.no_grad():
        logits = model(images)
        eff = ex.region_effects(model, images, labels, logits, masks, siblings, source.vocab, occlusion, chunk=4)
    assert len(eff["image"]) == sum(int(m.reshape(len(m), -1).any(1).sum()) for m in masks)
    j = len(eff["image"]) // 2
    k, b = int(eff["image"][j]), int(eff["class_b"][j])
    mask = torch.from_numpy(masks[k][source.vocab.index(eff["region"][j])]).float().view(1, 1, 32, 32)
    a = int(labels[k])
    with torch.no_grad():
        after = model(occlusion(images[k:k + 1], mask))[0]
    margin = logits[k, a] - logits[k, b]
    assert eff["margin"][j] == pytest.approx(float(margin), abs=1e-5)
    assert eff["margin_drop"][j] == pytest.approx(float(margin - (after[a] - after[b])), abs=1e-4)
    assert np.isclose(eff["area"][j], float(mask.mean()))
    # Only the ranked regions (RegionLayout.ranked: not background) when asked: the same rows, less background's.
    ranked = source.layout.ranked
    assert not ranked.all() and "background" in set(eff["region"])
    with torch.no_grad():
        part = ex.region_effects(model, images, labels, logits, masks, siblings, source.vocab, occlusion, chunk=4,
                                 ranked=ranked)
    keep = eff["region"] != "background"
    assert "background" not in set(part["region"]) and len(part["image"]) == int(keep.sum())
    for name in ("image", "class_b", "region", "area", "margin"):
        assert (part[name] == eff[name][keep]).all()
    np.testing.assert_allclose(part["margin_drop"], eff["margin_drop"][keep], atol=1e-4)


def test_lookalike_fill_colours_are_each_class_region_mean_with_the_overall_mean_below_the_pixel_floor():
    from intr.occlusion import LookalikeSums

    image, mask = bird_image()  # green surroundings, grey body, red 4 x 4 part
    labels = torch.zeros(2, 24, 24, dtype=torch.long)
    labels[:, 6:18, 6:18] = 1
    labels[:, 10:14, 10:14] = 2
    labels[1, 10:14, 10:14] = 1  # class 1's image shows no part: its 16 pixels count as body
    other = image.clone()
    other[:, :, 6:18, 6:18] = RED.view(3, 1, 1)  # class 1's body is red
    sums = LookalikeSums(2, 3, 3)
    sums.add(torch.cat([image, other]), labels, torch.tensor([0, 1]))
    assert sums.counts.tolist() == [[24 * 24 - 144, 128, 16], [24 * 24 - 144, 144, 0]]
    fill = sums.fill()
    assert fill.places is None  # no body frames were added
    torch.testing.assert_close(fill.colours[0, 0], GREEN)
    torch.testing.assert_close(fill.colours[0, 1], GREY)
    torch.testing.assert_close(fill.colours[0, 2], RED)
    torch.testing.assert_close(fill.colours[1, 1], RED)
    torch.testing.assert_close(fill.colours[1, 2], RED)  # no pixels of its own: all classes' mean
    # Filling the part with class 0's own colour changes nothing; with class 1's body colour, only the mask.
    same = fill(image, mask, torch.tensor([0]), torch.tensor([2]))
    torch.testing.assert_close(same, image)
    body = (labels[:1] == 1).float().unsqueeze(1)
    swapped = fill(image, body, torch.tensor([1]), torch.tensor([1]))
    assert torch.equal(swapped[body.expand_as(image) == 0], image[body.expand_as(image) == 0])
    torch.testing.assert_close(region_colour(swapped, body), RED)


def test_lookalike_fill_with_body_frames_gives_each_pixel_the_colour_of_its_own_place():
    """One region holding two pieces (the head's top and, lower, the breast): class 1 shows the top as class 0
    does and the breast blue, so filling class 0's region with class 1's colours changes the breast only."""
    from intr.occlusion import LookalikeFill, LookalikeSums

    image, _ = bird_image()
    region = torch.zeros(1, 24, 24, dtype=torch.long)  # region 0 everywhere but the two pieces
    region[:, 6:8, 6:18] = 1  # top piece, red in both classes
    region[:, 16:18, 6:18] = 1  # lower piece: red in class 0, blue in class 1
    image[:, :, 6:8, 6:18] = RED.view(3, 1, 1)
    image[:, :, 16:18, 6:18] = RED.view(3, 1, 1)
    blue = torch.tensor([0.1, 0.1, 0.9])
    other = image.clone()
    other[:, :, 16:18, 6:18] = blue.view(3, 1, 1)
    cells = torch.zeros(2, 24, 24, dtype=torch.long)
    cells[:, 12:, :] = 7  # the lower half of the frame is another place
    sums = LookalikeSums(2, 2, 3)
    sums.add(torch.cat([image, other]), region.expand(2, -1, -1), torch.tensor([0, 1]), cells)
    fill = sums.fill()
    assert fill.places.shape == (2, 2, LookalikeFill.PLACE_BINS ** 2, 3)
    torch.testing.assert_close(fill.places[1, 1, 0], RED)
    torch.testing.assert_close(fill.places[1, 1, 7], blue)
    torch.testing.assert_close(fill.places[1, 1, 3], fill.colours[1, 1])  # no pixels there: the region's mean
    torch.testing.assert_close(fill.colours[1, 1], (RED + blue) / 2)
    mask = (region == 1).float().unsqueeze(1)
    placed = fill(image, mask, torch.tensor([1]), torch.tensor([1]), cells[:1])
    torch.testing.assert_close(placed, other)  # the top stays red, the breast turns blue, nothing else moves
    flat = fill(image, mask, torch.tensor([1]), torch.tensor([1]), torch.full((1, 24, 24), -1))
    torch.testing.assert_close(flat, fill(image, mask, torch.tensor([1]), torch.tensor([1])))  # no frame: the mean
    torch.testing.assert_close(region_colour(flat, mask), (RED + blue) / 2)


def test_region_effects_with_the_lookalike_fill_score_each_region_once_per_lookalike(tiny_models, tiny_dataset):
    from intr.occlusion import LookalikeSums

    model, images, labels, source = three_test_images(tiny_models, tiny_dataset)
    maps = list(source.labels(np.arange(3), 32))
    masks = [regions.region_masks(m, len(source.vocab)) for m in maps]
    sums = LookalikeSums(4, len(source.vocab), 3)
    sums.add(images, torch.as_tensor(np.stack(maps)), labels)
    fill = sums.fill()
    siblings = [[(int(y) + 1) % 4, (int(y) + 2) % 4] for y in labels]
    siblings[1] = []  # an image without look-alikes has no rows
    with torch.no_grad():
        logits = model(images)
        eff = ex.region_effects(model, images, labels, logits, masks, siblings, source.vocab,
                                Occlusion("mean_fill", 0.05), chunk=5, lookalike=fill)
    present = [int(m.reshape(len(m), -1).any(1).sum()) for m in masks]
    assert len(eff["image"]) == 2 * (present[0] + present[2])
    assert set(eff["image"].tolist()) == {0, 2}
    for j in (0, len(eff["image"]) - 1):
        k, b, r = int(eff["image"][j]), int(eff["class_b"][j]), source.vocab.index(eff["region"][j])
        mask = torch.from_numpy(masks[k][r]).float().view(1, 1, 32, 32)
        a = int(labels[k])
        with torch.no_grad():
            after = model(fill(images[k:k + 1], mask, torch.tensor([b]), torch.tensor([r])))[0]
        margin = logits[k, a] - logits[k, b]
        assert eff["margin"][j] == pytest.approx(float(margin), abs=1e-5)
        assert eff["margin_drop"][j] == pytest.approx(float(margin - (after[a] - after[b])), abs=1e-4)
        assert eff["prob_a_drop"][j] == pytest.approx(
            float(logits[k].softmax(0)[a] - after.softmax(0)[a]), abs=1e-5)
