"""Counterfactual renders: the stage's rows on a tiny model, and the scores on a hand-made table."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.counterfactual import (
    agreement_rows,
    causal_effects,
    counterfactual_scores,
    pair_agreement,
    pair_part_effects,
    part_ranks,
    single_part_planted,
)


def _row(image_id, a, b, part, kind, before, after, pred):
    return {"image_id": image_id, "class_a": a, "class_b": b, "part": part, "kind": kind, "state": "x",
            "margin_before": before, "margin_after": after, "pred_after": pred}


@pytest.fixture
def hand_made() -> pd.DataFrame:
    """Pair (0, 1) differs in the beak; pair (0, 2) in beak and crown; two images of class 0."""
    return pd.DataFrame([
        _row(1, 0, 1, "beak", "planted", 5.0, -1.0, 1),      # flips to B
        _row(2, 0, 1, "beak", "planted", 4.0, 1.0, 0),       # does not
        _row(1, 0, 2, "beak", "planted", 5.0, 2.0, 0),       # two-part pair: not in the flip rate
        _row(1, 0, 2, "crown", "planted", 5.0, 3.0, 2),
        _row(1, 0, 1, "beak", "all_planted", 5.0, -1.0, 1),
        _row(1, 0, 2, "beak;crown", "all_planted", 5.0, -4.0, 2),
        _row(1, 0, 1, "wing", "control", 5.0, 5.5, 0),
        _row(2, 0, 1, "wing", "control", 4.0, 3.0, 1),       # a control that flips
        _row(1, 0, 1, "legs", "control", 5.0, 5.0, 0),
        _row(2, 0, 1, "legs", "control", 4.0, 4.0, 3),       # flips to a third class: not to B
    ])


def test_flip_rate_counts_only_single_part_pairs_and_predictions_of_b(hand_made):
    assert sorted(single_part_planted(hand_made)["image_id"]) == [1, 2]
    scores = counterfactual_scores(hand_made, "intr", "test").set_index("metric")
    assert scores.loc["counterfactual_flip_rate", "value"] == pytest.approx(0.5)
    assert scores.loc["counterfactual_flip_rate", "n"] == 2
    assert scores.loc["counterfactual_flip_rate_control", "value"] == pytest.approx(0.25)
    assert scores.loc["counterfactual_flip_rate_all_planted", "value"] == pytest.approx(1.0)


def test_margin_drop_is_the_mean_fall_of_the_a_minus_b_margin_per_kind(hand_made):
    scores = counterfactual_scores(hand_made, "intr", "test").set_index("metric")["value"]
    assert scores["counterfactual_margin_drop_planted"] == pytest.approx((6 + 3 + 3 + 2) / 4)
    assert scores["counterfactual_margin_drop_all_planted"] == pytest.approx((6 + 9) / 2)
    assert scores["counterfactual_margin_drop_control"] == pytest.approx((-0.5 + 1 + 0 + 0) / 4)


def test_scores_skip_kinds_without_rows(hand_made):
    only_controls = hand_made[hand_made["kind"] == "control"]
    metrics = set(counterfactual_scores(only_controls, "intr", "test")["metric"])
    assert metrics == {"counterfactual_flip_rate_control", "counterfactual_margin_drop_control"}


def test_pair_part_effects_rank_parts_by_mean_margin_drop(hand_made):
    effects = pair_part_effects(hand_made)
    planted_02 = effects[(effects["class_b"] == 2) & (effects["kind"] == "planted")]
    assert list(planted_02["part"]) == ["beak", "crown"]  # drops 3 and 2
    beak_01 = effects[(effects["class_b"] == 1) & (effects["kind"] == "planted")].iloc[0]
    assert (beak_01["images"], beak_01["mean_margin_drop"], beak_01["flip_rate"]) == (2, 4.5, 0.5)


def _contrast_rows(b: int, combined: list[int], occlusion: list[int]) -> list[dict]:
    """One pair (0, b) over regions beak, wing, legs, crown, background (annotated: region = part)."""
    regions = ["beak", "wing", "legs", "crown", "background"]
    area = [0.01, 0.3, 0.05, 0.02, 0.6]
    return [{"class_a": 0, "class_b": b, "region": r, "part": r, "area": s, "rank_combined": c, "rank_density": c,
             "rank_difference": -1, "rank_occlusion": o, "rank_pair_attention": -1}
            for r, s, c, o in zip(regions, area, combined + [-1], occlusion + [-1])]


@pytest.fixture
def hand_made_contrasts() -> pd.DataFrame:
    """Combined follows the model on both pairs; occlusion only on (0, 2); background is never ranked."""
    return pd.DataFrame(_contrast_rows(1, [1, 2, 3, 4], [3, 2, 1, 4]) + _contrast_rows(2, [1, 2, 4, 3], [1, 3, 4, 2]))


def test_causal_ranking_counts_planted_and_control_parts_but_not_all_planted(hand_made):
    effects = causal_effects(hand_made)
    assert effects[(0, 1)].to_dict() == {"beak": 4.5, "wing": 0.25, "legs": 0.0}  # (6+3)/2, (-0.5+1)/2, 0
    assert list(effects[(0, 1)].index) == ["beak", "wing", "legs"]  # largest first, across kinds
    assert effects[(0, 2)].to_dict() == {"beak": 3.0, "crown": 2.0}


def test_regions_of_one_part_take_its_best_rank_and_unranked_parts_come_last():
    ranks = part_ranks(np.array([3, 1, 2, -1]), ["beak", "beak", "wing", "beak"], ["beak", "wing", "legs"])
    assert ranks.tolist() == [1.0, 2.0, 4.0]  # legs has no region: after the 3 ranked ones


def test_pair_agreement_top1_and_spearman_on_one_pair():
    effect = pd.Series({"beak": 4.5, "wing": 0.25, "legs": 0.0})
    assert pair_agreement(effect, np.array([1, 2, 3, -1]), ["beak", "wing", "legs", "background"]) == (1.0, 1.0)
    assert pair_agreement(effect, np.array([3, 2, 1, -1]), ["beak", "wing", "legs", "background"]) == (0.0, -1.0)
    # the top region stands for a part the stage never changed: a miss
    assert pair_agreement(effect, np.array([2, 3, 4, 1]), ["beak", "wing", "legs", "crown"])[0] == 0.0


def test_agreement_rows_score_each_ranking_and_the_references(hand_made, hand_made_contrasts):
    rows = pd.DataFrame(agreement_rows(hand_made, hand_made_contrasts, "intr", "test"))
    values = rows.set_index(["method", "metric"])["value"]
    assert values[("intr", "counterfactual_agreement_top1")] == pytest.approx(1.0)
    assert values[("intr", "counterfactual_spearman")] == pytest.approx(1.0)
    assert values[("intr", "counterfactual_agreement_top1_density")] == pytest.approx(1.0)
    # occlusion: (0, 1) puts legs first (miss, order reversed: -1); (0, 2) beak first (hit, +1)
    assert values[("intr", "counterfactual_agreement_top1_occlusion")] == pytest.approx(0.5)
    assert values[("intr", "counterfactual_spearman_occlusion")] == pytest.approx(0.0)
    # size baseline: wing (largest) first in both pairs: never the top cause; beak (smallest) last:
    # (0, 1) part ranks beak 4, wing 1, legs 2 against effects 4.5, 0.25, 0 -> -0.5; (0, 2) -> -1
    assert values[("size_baseline", "counterfactual_agreement_top1")] == pytest.approx(0.0)
    assert values[("size_baseline", "counterfactual_spearman")] == pytest.approx(-0.75)
    # random: beak is 1 of the 4 ranked regions of each pair
    assert values[("random", "counterfactual_agreement_top1")] == pytest.approx(0.25)
    assert abs(values[("random", "counterfactual_spearman")]) < 0.2
    assert set(rows["n"]) == {2}
    # scores without a ranking in this run (difference, pair_attention) give no rows
    assert not rows["metric"].str.contains("difference|pair_attention").any()


def test_agreement_rows_skip_pairs_without_counterfactual_rows(hand_made, hand_made_contrasts):
    only_01 = hand_made[hand_made["class_b"] == 1]
    rows = pd.DataFrame(agreement_rows(only_01, hand_made_contrasts, "intr", "test"))
    occlusion = rows[rows["metric"] == "counterfactual_agreement_top1_occlusion"]
    assert occlusion[["n", "value"]].to_numpy().tolist() == [[1, 0.0]]


@pytest.fixture(scope="module")
def stage_run(tiny_dataset, tiny_models, tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    """The stage on the tiny INTR model: its rows, and the folder of both tables it wrote."""
    from intr.counterfactual import run_counterfactuals

    manifest, root = tiny_dataset
    out = tmp_path_factory.mktemp("counterfactual")
    table = run_counterfactuals(tiny_models["intr"], manifest, root, out / "cf.parquet", images_per_pair=2,
                                split="test", batch_size=5, device="cpu", examples_out=out / "examples.parquet")
    return table, out


def test_stage_rows_match_the_model_on_the_stored_image_and_on_bs_own_render(tiny_dataset, tiny_models, stage_run):

    from analysis.tables import read_table
    from intr.counterfactual import (
        Scorer,
        image_index,
        synthetic_config,
    )
    from intr.data.images import ImageSet, read_split
    from intr.data.synthetic import PARTS, build_taxonomy, image_nuisance, render_bird

    manifest, root = tiny_dataset
    table, out = stage_run
    assert len(table) and table.equals(read_table(out / "cf.parquet").astype(table.dtypes))
    rows = read_split(manifest, "test")
    scorer = Scorer(tiny_models["intr"], manifest, "cpu", 8)
    data = ImageSet(root, rows, scorer.size, [0.0] * 3, [1.0 / 255] * 3)
    taxonomy = build_taxonomy(synthetic_config(root))
    for (image_id, a, b), group in table.groupby(["image_id", "class_a", "class_b"]):
        i = int(np.flatnonzero(rows["image_id"] == image_id)[0])
        stored = data.raw(i).permute(1, 2, 0).numpy()
        logits = scorer.logits([stored])[0]
        assert int(logits.argmax()) == a  # only correctly classified images are changed
        assert group["margin_before"].iloc[0] == pytest.approx(logits[a] - logits[b], abs=1e-4)
        species_b = taxonomy[b]  # tiny data: class ids follow the taxonomy
        nuisance = image_nuisance(synthetic_config(root), a, image_index(rows.at[i, "path"]))
        own_b = scorer.logits([render_bird(species_b, nuisance, 32)[0]])[0]
        everything = group[group["kind"] == "all_planted"].iloc[0]
        assert everything["margin_after"] == pytest.approx(own_b[a] - own_b[b], abs=1e-4)
        differing = taxonomy[a].differing_parts(species_b)
        assert sorted(group.loc[group["kind"] == "planted", "part"]) == sorted(differing)
        assert set(group.loc[group["kind"] == "control", "part"]) <= set(PARTS) - set(differing)
    assert table.groupby(["class_a", "class_b"])["image_id"].nunique().max() <= 2


def test_examples_hold_each_pairs_first_image_original_and_planted_renders(tiny_dataset, stage_run):
    from PIL import Image

    from analysis.tables import read_table, schema
    from intr.data.images import ImageSet, read_split

    manifest, root = tiny_dataset
    table, out = stage_run
    examples = read_table(out / "examples.parquet")
    assert list(examples.columns) == schema("counterfactual_examples").names
    rows = read_split(manifest, "test")
    data = ImageSet(root, rows, 32, [0.0] * 3, [1.0 / 255] * 3)
    for (a, b), group in table.groupby(["class_a", "class_b"]):
        shown = examples[(examples["class_a"] == a) & (examples["class_b"] == b)]
        first = group.iloc[0]
        assert set(shown["image_id"]) == {first["image_id"]}  # the pair's first image only
        swaps = group[group["image_id"] == first["image_id"]]
        planted = swaps[swaps["kind"] == "planted"]
        kinds = ["original"] + ["planted"] * len(planted) + (["all_planted"] if len(planted) > 1 else [])
        assert shown["kind"].tolist() == kinds
        assert shown["part"].tolist()[1:len(planted) + 1] == planted["part"].tolist()
        original = shown.iloc[0]
        assert (original["margin"], original["pred"]) == (pytest.approx(first["margin_before"]), a)
        after = swaps.set_index(["kind", "part"]).loc[list(zip(shown["kind"][1:], shown["part"][1:]))]
        assert shown["margin"].tolist()[1:] == pytest.approx(after["margin_after"].tolist())
        assert shown["pred"].tolist()[1:] == after["pred_after"].tolist()
        stored = data.raw(int(np.flatnonzero(rows["image_id"] == first["image_id"])[0])).permute(1, 2, 0).numpy()
        decoded = [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in shown["png"]]
        assert np.array_equal(decoded[0], stored)  # the original is the image the model was scored on
        assert all(not np.array_equal(d, stored) for d in decoded[1:])  # every swap changes it
