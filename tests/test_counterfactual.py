"""Counterfactual renders: the stage's rows on a tiny model, and the scores on a hand-made table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.counterfactual import (
    counterfactual_scores,
    pair_part_effects,
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


def test_stage_rows_match_the_model_on_the_stored_image_and_on_bs_own_render(tiny_dataset, tiny_models, tmp_path):

    from analysis.tables import read_table
    from intr.counterfactual import (
        Scorer,
        image_index,
        run_counterfactuals,
        synthetic_config,
    )
    from intr.data.images import ImageSet, read_split
    from intr.data.synthetic import PARTS, build_taxonomy, image_nuisance, render_bird

    manifest, root = tiny_dataset
    table = run_counterfactuals(tiny_models["intr"], manifest, root, tmp_path / "cf.parquet",
                                images_per_pair=2, split="test", batch_size=5, device="cpu")
    assert len(table) and table.equals(read_table(tmp_path / "cf.parquet").astype(table.dtypes))
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
