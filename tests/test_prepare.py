"""The prepare stage: CUB, ImageFolder and synthetic layouts into manifest/parts/rejected tables."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from intr.cli import main
from intr.data.cub import attribute_part
from intr.data.prepare import PrepareError, prepare_dataset
from analysis.tables import read_metadata, read_table

CLASSES = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 3: "003.Groove_billed_Ani"}
PARTS = {1: "back", 2: "beak", 3: "left eye"}
ATTRIBUTES = {1: "has_bill_shape::dagger", 2: "has_bill_color::red",
              3: "has_upper_tail_color::blue", 4: "has_size::small_(5_-_9_in)"}
# One line per class, in class id order, one value per attribute in attribute id order.
ATTRIBUTE_VALUES = [[10.0, 0.0, 55.5, 100.0], [20.0, 1.5, 0.0, 0.0], [30.0, 2.5, 3.0, 4.0]]


def image_bytes(mode: str = "RGB", size: tuple[int, int] = (12, 10), fmt: str = "PNG") -> bytes:
    """A small textured image of ``mode``, encoded in memory."""
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    data = image_bytes(size=(48, 48), fmt="JPEG")
    return data[: len(data) // 2]


def write_lines(path: Path, lines: list[str]) -> None:
    """Write list-file lines in a scrambled order: the reader must sort by id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    order = list(range(len(lines)))[1::2][::-1] + list(range(len(lines)))[0::2]
    path.write_text("".join(lines[i] + "\n" for i in order))


def good_images() -> list[tuple[int, int, int, str, bytes | None]]:
    """(image_id, CUB class id, is_training, file name, content) of six images, 2 per class."""
    rows = []
    for image_id in range(1, 7):
        class_id = (image_id + 1) // 2
        name = f"{CLASSES[class_id].split('.', 1)[1]}_{image_id:04d}.png"
        rows.append((image_id, class_id, image_id % 2, name, image_bytes(size=(10 + image_id, 8 + image_id))))
    return rows


def write_cub(root: Path, images: list[tuple[int, int, int, str, bytes | None]],
              attributes_at: str = "attributes", with_extras: bool = True,
              classes: dict[int, str] = CLASSES) -> Path:
    """A CUB_200_2011-layout fixture; content None leaves the image listed but absent."""
    write_lines(root / "classes.txt", [f"{k} {v}" for k, v in classes.items()])
    write_lines(root / "images.txt", [f"{i} {classes[c]}/{n}" for i, c, _, n, _ in images])
    write_lines(root / "image_class_labels.txt", [f"{i} {c}" for i, c, _, _, _ in images])
    write_lines(root / "train_test_split.txt", [f"{i} {t}" for i, _, t, _, _ in images])
    for image_id, class_id, _, name, content in images:
        path = root / "images" / classes[class_id] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is not None:
            path.write_bytes(content)
    if not with_extras:
        return root
    # Image 6 has no bounding box line: its bbox is null.
    write_lines(root / "bounding_boxes.txt",
                [f"{i} {i}.0 {i}.5 {2 * i}.0 {3 * i}.0" for i, *_ in images if i != 6])
    write_lines(root / "parts" / "parts.txt", [f"{k} {v}" for k, v in PARTS.items()])
    write_lines(root / "parts" / "part_locs.txt",
                [f"{i} {p} {0.0 if (i, p) == (2, 3) else i + p / 10} {0.0 if (i, p) == (2, 3) else i * 2.0} "
                 f"{0 if (i, p) == (2, 3) else 1}" for i, *_ in images for p in PARTS])
    names_at = {"attributes": root / "attributes" / "attributes.txt", "root": root / "attributes.txt",
                "beside": root.parent / "attributes.txt"}[attributes_at]
    write_lines(names_at, [f"{k} {v}" for k, v in ATTRIBUTES.items()])
    (root / "attributes").mkdir(exist_ok=True)
    (root / "attributes" / "class_attribute_labels_continuous.txt").write_text(
        "".join(" ".join(f"{v:.4f}" for v in row) + "\n" for row in ATTRIBUTE_VALUES))
    return root


def prepare(kind: str, root: Path, out: Path, **options) -> object:
    return prepare_dataset(kind, root, out, progress=False, **options)


@pytest.mark.parametrize("attributes_at", ["attributes", "root", "beside"])
def test_cub_quirks_give_expected_manifest_parts_and_attributes(tmp_path, attributes_at):
    root = write_cub(tmp_path / "CUB_200_2011", good_images(), attributes_at)
    summary = prepare("cub", root, tmp_path / "out", val_fraction=0.0)
    assert (summary.inputs, summary.kept, summary.rejected, summary.classes) == (6, 6, 0, 3)

    manifest = read_table(tmp_path / "out" / "manifest.parquet")
    assert manifest["image_id"].tolist() == [1, 2, 3, 4, 5, 6]
    assert manifest["source_image_id"].tolist() == [1, 2, 3, 4, 5, 6]
    assert manifest["class_id"].tolist() == [0, 0, 1, 1, 2, 2]
    assert manifest["class_name"].tolist() == ["Black_footed_Albatross"] * 2 + ["Laysan_Albatross"] * 2 + [
        "Groove_billed_Ani"] * 2
    assert manifest["genus"].tolist() == ["Albatross"] * 4 + ["Ani"] * 2
    assert manifest["split"].tolist() == ["train", "test"] * 3
    assert manifest["path"][2] == "images/002.Laysan_Albatross/Laysan_Albatross_0003.png"
    assert manifest["width"].tolist() == [11, 12, 13, 14, 15, 16]
    assert manifest["height"].tolist() == [9, 10, 11, 12, 13, 14]
    assert manifest["mode"].tolist() == ["RGB"] * 6
    assert manifest.loc[3, ["bbox_x", "bbox_y", "bbox_w", "bbox_h"]].tolist() == [4.0, 4.5, 8.0, 12.0]
    assert manifest.loc[5, ["bbox_x", "bbox_y", "bbox_w", "bbox_h"]].isna().all()
    assert manifest["mask_path"].isna().all()

    parts = read_table(tmp_path / "out" / "parts.parquet")
    assert len(parts) == 18
    assert parts[["image_id", "part_id"]].values.tolist() == [[i, p] for i in range(1, 7) for p in (1, 2, 3)]
    eye = parts[(parts.image_id == 2) & (parts.part_id == 3)].iloc[0]
    assert (eye.part_name, eye.x, eye.y, bool(eye.visible)) == ("left eye", 0.0, 0.0, False)
    beak = parts[(parts.image_id == 5) & (parts.part_id == 2)].iloc[0]
    assert (beak.part_name, beak.x, beak.y, bool(beak.visible)) == ("beak", pytest.approx(5.2), 10.0, True)

    attributes = read_table(tmp_path / "out" / "class_attributes.parquet")
    assert len(attributes) == 12
    assert attributes["part"][:3].tolist() == ["bill", "bill", "upper_tail"]
    assert pd.isna(attributes["part"][3])  # has_size is about the whole bird
    laysan = attributes[attributes.class_id == 1].set_index("attribute_id")
    assert laysan.loc[2, "attribute_name"] == "has_bill_color::red"
    assert laysan["value"].tolist() == pytest.approx(ATTRIBUTE_VALUES[1])


def test_attribute_part_parsing():
    assert attribute_part("has_bill_length::about_the_same_as_head") == "bill"
    assert attribute_part("has_under_tail_color::white") == "under_tail"
    assert attribute_part("has_primary_color::black") is None
    assert attribute_part("has_shape::perching-like") is None


def test_optional_cub_files_absent_give_null_bbox_and_empty_parts(tmp_path):
    root = write_cub(tmp_path / "CUB_200_2011", good_images(), with_extras=False)
    prepare("cub", root, tmp_path / "out")
    manifest = read_table(tmp_path / "out" / "manifest.parquet")
    assert manifest[["bbox_x", "bbox_y", "bbox_w", "bbox_h"]].isna().all().all()
    parts = pq.read_table(tmp_path / "out" / "parts.parquet")
    assert parts.num_rows == 0 and parts.schema.field("part_name").type == "string"
    assert not (tmp_path / "out" / "class_attributes.parquet").exists()


def bad_and_odd_images() -> list[tuple[int, int, int, str, bytes | None]]:
    return good_images() + [
        (7, 1, 1, "zero.jpg", b""),
        (8, 1, 1, "text.jpg", b"not an image at all\n"),
        (9, 2, 1, "cut.jpg", truncated_jpeg()),
        (10, 2, 1, "gone.jpg", None),
        (11, 2, 1, "gray.jpg", image_bytes("L", fmt="JPEG")),
        (12, 3, 1, "cmyk.jpg", image_bytes("CMYK", fmt="JPEG")),
        (13, 3, 1, "palette.png", image_bytes("P")),
        (14, 3, 1, "alpha.png", image_bytes("RGBA")),
    ]


def test_bad_images_are_rejected_with_reasons_and_odd_modes_kept(tmp_path):
    root = write_cub(tmp_path / "CUB_200_2011", bad_and_odd_images())
    summary = prepare("cub", root, tmp_path / "out", max_reject_fraction=0.5)
    rejected = read_table(tmp_path / "out" / "rejected.parquet").set_index("path")
    assert rejected["reason"].to_dict() == {
        "images/001.Black_footed_Albatross/zero.jpg": "empty",
        "images/001.Black_footed_Albatross/text.jpg": "not_an_image",
        "images/002.Laysan_Albatross/cut.jpg": "truncated",
        "images/002.Laysan_Albatross/gone.jpg": "missing",
    }
    assert "truncated" in rejected.loc["images/002.Laysan_Albatross/cut.jpg", "detail"].lower()
    manifest = read_table(tmp_path / "out" / "manifest.parquet").set_index("image_id")
    assert manifest.loc[11:14, "mode"].tolist() == ["L", "CMYK", "P", "RGBA"]
    assert not set(manifest.index) & {7, 8, 9, 10}
    assert (summary.inputs, summary.kept, summary.rejected) == (14, 10, 4)
    assert summary.inputs == len(manifest) + len(rejected)
    parts = read_table(tmp_path / "out" / "parts.parquet")
    assert set(parts["image_id"]) == set(manifest.index)  # the fixture lists parts for all 14
    assert summary.describe().startswith("inputs 14 = manifest 10 + rejected 4 (3 classes) -> ")


def test_too_many_rejections_fail_naming_an_example_and_leave_no_manifest(tmp_path):
    root = write_cub(tmp_path / "CUB_200_2011", bad_and_odd_images())
    out = tmp_path / "out"
    prepare("cub", root, out, max_reject_fraction=1.0)
    assert (out / "manifest.parquet").exists()
    with pytest.raises(PrepareError, match=r"images/001\.Black_footed_Albatross/zero\.jpg \(empty\)"):
        prepare("cub", root, out, max_reject_fraction=0.2)
    assert not (out / "manifest.parquet").exists()
    assert not (out / "parts.parquet").exists()
    assert len(read_table(out / "rejected.parquet")) == 4


def test_missing_root_or_required_file_names_the_path(tmp_path):
    with pytest.raises(PrepareError, match="nowhere"):
        prepare("cub", tmp_path / "nowhere", tmp_path / "out")
    root = write_cub(tmp_path / "CUB_200_2011", good_images())
    (root / "images.txt").unlink()
    with pytest.raises(PrepareError, match=str(root / "images.txt")):
        prepare("cub", root, tmp_path / "out")


def test_label_of_unknown_class_names_the_file(tmp_path):
    root = write_cub(tmp_path / "CUB_200_2011", good_images())
    (root / "image_class_labels.txt").write_text("".join(f"{i} {9 if i == 4 else (i + 1) // 2}\n" for i in range(1, 7)))
    with pytest.raises(PrepareError, match="image_class_labels.txt: class id 9"):
        prepare("cub", root, tmp_path / "out")


def write_imagefolder(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    """root/<split>/<class>/img_<k>.png with the given number of images per class."""
    for split, classes in splits.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                (folder / f"img_{k:02d}.png").write_bytes(image_bytes(size=(6 + k % 3, 5)))
    return root


def test_imagefolder_train_val_maps_val_to_test_and_carves_val(tmp_path):
    root = write_imagefolder(tmp_path / "data", {"train": {"dog": 10, "cat": 10}, "val": {"dog": 2, "cat": 3}})
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"hidden")
    (root / "val" / "stray.png").write_bytes(image_bytes())
    summary = prepare("imagefolder", root, tmp_path / "out", val_fraction=0.2, max_reject_fraction=0.1)
    manifest = read_table(tmp_path / "out" / "manifest.parquet")
    rejected = read_table(tmp_path / "out" / "rejected.parquet")
    assert sorted(zip(rejected["path"], rejected["reason"])) == [
        ("train/cat/notes.txt", "not_an_image"), ("val/stray.png", "no_class")]
    assert (summary.inputs, summary.kept, summary.rejected, summary.classes) == (27, 25, 2, 2)
    assert manifest["class_id"][manifest["path"].str.contains("/cat/")].eq(0).all()
    assert set(manifest.loc[manifest["path"].str.startswith("val/"), "split"]) == {"test"}
    from_train = manifest[manifest["path"].str.startswith("train/")]
    assert from_train.groupby(["class_name", "split"]).size().to_dict() == {
        ("cat", "train"): 8, ("cat", "val"): 2, ("dog", "train"): 8, ("dog", "val"): 2}
    assert manifest["image_id"].tolist() == [i for i in range(1, 27) if i != 11]  # 11: notes.txt
    assert manifest["path"][0] == "train/cat/img_00.png"
    assert manifest["source_image_id"].isna().all() and manifest["genus"].isna().all()
    assert len(read_table(tmp_path / "out" / "parts.parquet")) == 0


def test_imagefolder_with_test_folder_maps_one_to_one(tmp_path):
    splits = {split: {"cat": 3, "dog": 3} for split in ("train", "val", "test")}
    root = write_imagefolder(tmp_path / "data", splits)
    prepare("imagefolder", root, tmp_path / "out", val_fraction=0.5)
    manifest = read_table(tmp_path / "out" / "manifest.parquet")
    assert (manifest["path"].str.split("/").str[0] == manifest["split"]).all()
    # ids follow sorted (split folder, class, file): test/ < train/ < val/
    assert manifest["path"][[0, 6, 12]].tolist() == ["test/cat/img_00.png", "train/cat/img_00.png",
                                                      "val/cat/img_00.png"]


def test_imagefolder_class_missing_in_a_split_names_class_and_split(tmp_path):
    root = write_imagefolder(tmp_path / "data", {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1}})
    with pytest.raises(PrepareError, match=r"class 'dog' has no folder in split 'val'"):
        prepare("imagefolder", root, tmp_path / "out")


def test_val_split_is_stratified_deterministic_and_independent_of_workers(tmp_path):
    root = write_imagefolder(tmp_path / "data", {"train": {"a": 20, "b": 12}, "val": {"a": 1, "b": 1}})
    runs = {}
    for name, seed, workers in (("one", 3, 1), ("again", 3, 1), ("pool", 3, 2), ("other_seed", 4, 1)):
        prepare("imagefolder", root, tmp_path / name, val_fraction=0.25, seed=seed, workers=workers)
        runs[name] = read_table(tmp_path / name / "manifest.parquet")
    pd.testing.assert_frame_equal(runs["one"], runs["again"])
    pd.testing.assert_frame_equal(runs["one"], runs["pool"])
    val = runs["one"][runs["one"]["split"] == "val"]
    assert val.groupby("class_name").size().to_dict() == {"a": 5, "b": 3}
    other = runs["other_seed"]
    assert set(val["image_id"]) != set(other.loc[other["split"] == "val", "image_id"])


def test_tables_carry_schema_version_and_narrow_ids(tmp_path):
    root = write_cub(tmp_path / "CUB_200_2011", good_images())
    prepare("cub", root, tmp_path / "out", seed=7)
    meta = read_metadata(tmp_path / "out" / "manifest.parquet")
    assert meta["schema_version"] == "1"
    assert (meta["kind"], meta["root"], meta["seed"], meta["val_fraction"]) == ("cub", str(root.resolve()), 7, 0.1)
    for name in ("parts", "rejected", "class_attributes"):
        assert read_metadata(tmp_path / "out" / f"{name}.parquet")["schema_version"] == "1"
    schema = pq.read_schema(tmp_path / "out" / "manifest.parquet")
    types = {name: str(schema.field(name).type) for name in schema.names}
    assert (types["image_id"], types["class_id"], types["width"], types["bbox_x"]) == (
        "int32", "int16", "int32", "float")
    parts = pq.read_schema(tmp_path / "out" / "parts.parquet")
    assert (str(parts.field("part_id").type), str(parts.field("visible").type)) == ("int16", "bool")


def test_taxonomy_overrides_genus_and_warns_for_missing_class(tmp_path):
    root = write_cub(tmp_path / "CUB_200_2011", good_images())
    taxonomy = tmp_path / "taxonomy.csv"
    taxonomy.write_text("class_name,genus\nBlack_footed_Albatross,Phoebastria\n002.Laysan_Albatross,Phoebastria\n")
    with pytest.warns(UserWarning, match="Groove_billed_Ani"):
        prepare("cub", root, tmp_path / "out", taxonomy=taxonomy)
    manifest = read_table(tmp_path / "out" / "manifest.parquet")
    assert manifest["genus"].tolist()[:4] == ["Phoebastria"] * 4
    assert manifest["genus"][4:].isna().all()


def write_synthetic(root: Path) -> Path:
    """A synthetic-layout fixture: CUB files plus masks/, traits.csv, pairs.csv."""
    classes = {1: "001.Common_Finch", 2: "002.Crested_Finch", 3: "003.Red_Sparrow"}
    images = [(i, (i + 1) // 2, i % 2, f"{classes[(i + 1) // 2][4:]}_{i:04d}.png", image_bytes())
              for i in range(1, 7)]
    write_cub(root, images, classes=classes)
    for i, c, _, name, _ in images[:5]:  # image 6 has no mask
        mask = np.zeros((10, 12), dtype=np.uint8)
        mask[2:5, 3:6] = 2
        path = root / "masks" / classes[c] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(path)
    (root / "traits.csv").write_text(
        "species_id,species,genus,part,colour,pattern,state\n"
        "2,Crested_Finch,Finch,crown,red,plain,crest\n1,Common_Finch,Finch,crown,grey,plain,flat\n"
        "3,Red_Sparrow,Passer,breast,red,streaked,plain\n")
    (root / "pairs.csv").write_text("species_a,species_b,genus,differing_parts,n_differing\n"
                                    "Common_Finch,Crested_Finch,Finch,crown;beak,2\n")
    return root


def test_synthetic_layout_gives_masks_traits_and_pairs(tmp_path):
    root = write_synthetic(tmp_path / "synthetic")
    with pytest.warns(UserWarning, match="have no mask"):
        summary = prepare("synthetic", root, tmp_path / "out", val_fraction=0.0)
    assert (summary.kept, summary.classes) == (6, 3)
    manifest = read_table(tmp_path / "out" / "manifest.parquet")
    assert manifest["mask_path"][0] == "masks/001.Common_Finch/Common_Finch_0001.png"
    assert pd.isna(manifest["mask_path"][5])
    assert manifest["genus"].tolist() == ["Finch"] * 4 + ["Passer"] * 2
    assert manifest["class_name"].tolist()[2] == "Crested_Finch"
    traits = read_table(tmp_path / "out" / "planted_traits.parquet")
    assert traits[["species", "class_id", "part", "colour"]].values.tolist() == [
        ["Crested_Finch", 1, "crown", "red"], ["Common_Finch", 0, "crown", "grey"],
        ["Red_Sparrow", 2, "breast", "red"]]
    pairs = read_table(tmp_path / "out" / "lookalike_pairs.parquet")
    row = pairs.iloc[0]
    assert (row.class_a, row.class_b, row.species_a, row.genus, row.n_differing) == (
        0, 1, "Common_Finch", "Finch", 2)
    assert list(row.differing_parts) == ["crown", "beak"]


def test_output_of_the_synthetic_generator_prepares_cleanly(tmp_path):
    from intr.data.synthetic import SyntheticConfig, synthesize

    config = SyntheticConfig.from_dict({"genera": 2, "species_per_genus": 2, "images_per_species": 6})
    synthesize(config, tmp_path / "data", progress=False)
    summary = prepare("synthetic", tmp_path / "data", tmp_path / "out")
    assert (summary.inputs, summary.kept, summary.rejected, summary.classes) == (24, 24, 0, 4)
    manifest = read_table(tmp_path / "out" / "manifest.parquet")
    assert manifest["mask_path"].notna().all() and manifest["genus"].notna().all()
    assert all((tmp_path / "data" / p).is_file() for p in manifest["mask_path"])
    traits = read_table(tmp_path / "out" / "planted_traits.parquet")
    assert set(traits["class_id"]) == {0, 1, 2, 3}
    pairs = read_table(tmp_path / "out" / "lookalike_pairs.parquet")
    assert (pairs["differing_parts"].map(len) == pairs["n_differing"]).all()
    assert len(read_table(tmp_path / "out" / "parts.parquet")) > 0


def test_cli_prepare_prints_the_count_line(tmp_path, capsys):
    root = write_cub(tmp_path / "CUB_200_2011", bad_and_odd_images())
    config = '{"dataset": {"kind": "cub", "max_reject_fraction": 0.5}}'
    code = main(["prepare", "--root", str(root), "--out", str(tmp_path / "out"), "--config-json", config, "--quiet"])
    assert code == 0
    assert "inputs 14 = manifest 10 + rejected 4 (3 classes)" in capsys.readouterr().out
    code = main(["prepare", "--root", str(tmp_path / "absent"), "--out", str(tmp_path / "o"),
                 "--config-json", config, "--quiet"])
    assert code == 1
    assert str(tmp_path / "absent") in capsys.readouterr().err


# --------------------------------------------------------------------------- hostile but realistic inputs


def gradient16(fmt: str, path: Path, mode: str = "I;16") -> np.ndarray:
    """A 64 x 64 16-bit grayscale gradient over the full 0..65535 range, saved as ``fmt``; its values."""
    values = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    byte_order = ">" if mode == "I;16B" else "<"
    Image.frombytes(mode, (64, 64), values.astype(f"{byte_order}u2").tobytes()).save(path, fmt)
    return values


@pytest.mark.parametrize("fmt, suffix, mode", [("PNG", "png", "I;16"), ("TIFF", "tif", "I;16"),
                                               ("TIFF", "tif", "I;16B")])
def test_16_bit_grayscale_is_scaled_to_8_bits_in_prepare_and_load_image(tmp_path, fmt, suffix, mode):
    from intr.data.images import load_image
    from intr.data.prepare import decode_image

    path = tmp_path / f"gradient.{suffix}"
    values = gradient16(fmt, path, mode)
    decoded = decode_image(str(path))
    assert decoded.reason is None and decoded.mode.startswith("I;16") and (decoded.width, decoded.height) == (64, 64)
    loaded = load_image(path, 64).numpy()
    expected = np.rint(values / 257).astype(np.uint8)
    assert (loaded == expected[None]).all()  # every channel equals round(v / 257)
    assert (loaded == 255).mean() < 0.01  # Pillow's own conversion clipped 99.6 % of it to white


def test_keypoints_outside_their_image_are_marked_invisible_and_counted(tmp_path, capsys):
    root = write_cub(tmp_path / "CUB_200_2011", good_images())
    locs = root / "parts" / "part_locs.txt"
    moved = {"1 2 ": "1 2 99999 -50 1", "3 1 ": "3 1 13.0 2.0 1", "4 3 ": "4 3 2.0 -0.5 1"}
    locs.write_text("".join(next((new for key, new in moved.items() if line.startswith(key)), line) + "\n"
                            for line in locs.read_text().splitlines()))
    summary = prepare("cub", root, tmp_path / "out", val_fraction=0.0)
    parts = read_table(tmp_path / "out" / "parts.parquet").set_index(["image_id", "part_id"])
    assert summary.keypoints_outside == 3
    # Image 1 is 11 x 9, image 3 is 13 x 11 (x = 13 is one past the last column), image 4 is 14 x 12.
    assert not parts.loc[[(1, 2), (3, 1), (4, 3)], "visible"].any()
    assert parts.loc[(1, 2), ["x", "y"]].tolist() == [99999.0, -50.0]  # coordinates kept as given
    assert parts["visible"].sum() == 18 - 1 - 3  # (2, 3) was invisible in the fixture already
    assert ("note: 3 part keypoints outside their image marked invisible, e.g. image_id 1 part 2 (beak) "
            "at (99999, -50) in a 11 x 9 image") in summary.describe().splitlines()


def test_imagefolder_accounts_for_links_loops_and_odd_entries(tmp_path):
    root = write_imagefolder(tmp_path / "data", {"train": {"cat": 2}, "val": {"cat": 1}})
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "album").mkdir(parents=True)
    (elsewhere / "outside.png").write_bytes(image_bytes())
    (elsewhere / "album" / "a.png").write_bytes(image_bytes())
    (elsewhere / "dogs").mkdir()
    for k in range(3):
        (elsewhere / "dogs" / f"d{k}.png").write_bytes(image_bytes())
    cat = root / "train" / "cat"
    (cat / "linked.png").symlink_to(elsewhere / "outside.png")  # a linked file outside the root
    (cat / "dangling.png").symlink_to(tmp_path / "gone.png")
    (cat / "album").symlink_to(elsewhere / "album", target_is_directory=True)
    (cat / "sub").mkdir()
    (cat / "sub" / "deep.png").write_bytes(image_bytes())
    (cat / "self").symlink_to(".", target_is_directory=True)
    (cat / "up").symlink_to("..", target_is_directory=True)
    os.mkfifo(cat / "pipe")
    (root / "train" / "dog").symlink_to(elsewhere / "dogs", target_is_directory=True)  # a linked class folder
    (root / "val" / "dog").mkdir()
    (root / "val" / "dog" / "v.png").write_bytes(image_bytes())
    (root / "train" / "ghost").symlink_to(tmp_path / "no_such_folder", target_is_directory=True)

    summary = prepare("imagefolder", root, tmp_path / "out", max_reject_fraction=0.5)
    manifest = read_table(tmp_path / "out" / "manifest.parquet")
    rejected = read_table(tmp_path / "out" / "rejected.parquet")
    assert sorted(zip(rejected["path"], rejected["reason"])) == [
        ("train/cat/dangling.png", "broken_link"), ("train/cat/pipe", "not_a_file"),
        ("train/cat/self", "link_loop"), ("train/cat/up", "link_loop"), ("train/ghost", "broken_link")]
    assert str(tmp_path / "gone.png") in rejected.set_index("path").loc["train/cat/dangling.png", "detail"]
    assert sorted(manifest["path"]) == [
        "train/cat/album/a.png", "train/cat/img_00.png", "train/cat/img_01.png", "train/cat/linked.png",
        "train/cat/sub/deep.png", "train/dog/d0.png", "train/dog/d1.png", "train/dog/d2.png",
        "val/cat/img_00.png", "val/dog/v.png"]
    assert manifest.set_index("path").loc["train/dog/d0.png", "class_name"] == "dog"
    assert (summary.inputs, summary.kept, summary.rejected) == (15, 10, 5)


def test_imagefolder_class_folder_without_readable_image_stops_prepare_naming_it(tmp_path):
    root = write_imagefolder(tmp_path / "data", {"train": {"cat": 3, "dog": 3, "Foo": 0},
                                                 "val": {"cat": 1, "dog": 1, "Foo": 1}})
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=r"^class folder 'train/Foo' holds no readable image: "
                                           r"remove it or add images$"):
        prepare("imagefolder", root, out, max_reject_fraction=1.0)
    assert not (out / "manifest.parquet").exists()
    (root / "train" / "Foo" / "notes.txt").write_text("not an image")
    (root / "val" / "dog" / "img_00.png").write_bytes(b"")
    with pytest.raises(PrepareError, match=r"class folders 'train/Foo' \(1 file\(s\) rejected, see .*rejected"
                                           r"\.parquet\), 'val/dog' \(1 file\(s\) rejected.*: remove them"):
        prepare("imagefolder", root, out, max_reject_fraction=1.0)
    assert sorted(read_table(out / "rejected.parquet")["path"]) == ["train/Foo/notes.txt", "val/dog/img_00.png"]


def test_cub_class_without_readable_image_stops_prepare_naming_it(tmp_path):
    classes = {**CLASSES, 4: "004.Crested_Auklet"}
    root = write_cub(tmp_path / "CUB_200_2011", good_images(), with_extras=False, classes=classes)
    with pytest.raises(PrepareError, match=r"1 class\(es\) have no readable image: 'Crested_Auklet'"):
        prepare("cub", root, tmp_path / "out")


def exif_rotated_jpeg(path: Path, orientation: int) -> None:
    """A 16 x 8 JPEG stored with a dark left half and a bright right half, tagged with ``orientation``."""
    pixels = np.zeros((8, 16, 3), dtype=np.uint8)
    pixels[:, 8:] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, "JPEG", exif=exif.tobytes(), quality=95)


def test_exif_rotated_images_are_used_in_the_stored_frame_and_counted(tmp_path):
    from intr.data.images import load_image

    root = write_imagefolder(tmp_path / "data", {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    exif_rotated_jpeg(root / "train" / "cat" / "phone.jpg", orientation=6)  # a viewer turns it 90 degrees
    exif_rotated_jpeg(root / "train" / "dog" / "upright.jpg", orientation=1)
    summary = prepare("imagefolder", root, tmp_path / "out")
    manifest = read_table(tmp_path / "out" / "manifest.parquet").set_index("path")
    assert manifest.loc["train/cat/phone.jpg", ["width", "height"]].tolist() == [16, 8]  # stored, not 8 x 16
    loaded = load_image(root / "train" / "cat" / "phone.jpg", 16).numpy().astype(int)
    assert loaded[:, :, :6].max() < 40 and loaded[:, :, 10:].min() > 215  # left/right halves, as stored
    assert [note for note in summary.notes if "EXIF" in note] == [
        "EXIF orientation tag other than 1 (a photo viewer shows the image rotated or mirrored): 1 image(s), "
        "e.g. train/cat/phone.jpg; they are used as stored, the frame of their keypoints, boxes and masks and "
        "of the report's crops. To use the viewer's frame, rotate the files themselves (e.g. mogrify "
        "-auto-orient) and prepare again"]


def test_images_above_pillows_size_limit_are_named_not_bare(tmp_path, monkeypatch):
    from intr.data.images import load_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # warn above 100 pixels, refuse above 200
    root = write_cub(tmp_path / "CUB_200_2011", good_images())  # image k is (10 + k) x (8 + k)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = prepare("cub", root, tmp_path / "out", max_reject_fraction=0.5)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    rejected = read_table(tmp_path / "out" / "rejected.parquet")
    assert rejected[["path", "reason"]].values.tolist() == [
        ["images/003.Groove_billed_Ani/Groove_billed_Ani_0006.png", "too_large"]]  # 16 x 14 = 224 pixels
    assert "MAX_IMAGE_PIXELS" in rejected["detail"][0]
    assert summary.notes == [
        "more pixels than Pillow's decompression-bomb limit of 100 (PIL.Image.MAX_IMAGE_PIXELS), kept: "
        "4 image(s), e.g. images/001.Black_footed_Albatross/Black_footed_Albatross_0002.png, "
        "images/002.Laysan_Albatross/Laysan_Albatross_0003.png, images/002.Laysan_Albatross/Laysan_Albatross_0004.png"
        " ...; decoding each takes much memory: downscale them if they are not meant to be this large"]
    second = root / "images" / "001.Black_footed_Albatross" / "Black_footed_Albatross_0002.png"
    with pytest.warns(UserWarning, match=f"{second}: 12 x 10 = 120 pixels, above Pillow's"):
        load_image(second, 8)


def test_16_bit_colour_png_is_read_by_its_high_byte_not_clipped(tmp_path):
    import struct
    import zlib

    from intr.data.images import load_image

    values = np.linspace(0, 65535, 8 * 8 * 3).round().astype(">u2").reshape(8, 8, 3)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + row.tobytes() for row in values)  # filter type 0 per row
    header = struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0)  # 8 x 8, 16 bits, colour type 2 (RGB)
    (tmp_path / "rgb16.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                         + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    loaded = load_image(tmp_path / "rgb16.png", 8).permute(1, 2, 0).numpy()
    assert (loaded == values // 256).all()
