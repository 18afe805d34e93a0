"""Accuracy of the model and of the linear probe, the bootstrap, and gathering metric tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.stats import bootstrap_mean, metric_row
from intr.data.images import ImageSet, read_split
from intr.evaluate import evaluate_model, gather_evaluation
from analysis.tables import read_metadata, read_table, write_table
from intr.cli import main as intr_main
from intr.models import load_model


@pytest.mark.parametrize("method", ["prompt_cam", "intr"])
def test_evaluate_writes_model_accuracy_and_the_linear_probe_only(method, tiny_models, tiny_dataset, tmp_path):
    manifest, root = tiny_dataset
    out = tmp_path / "metrics_model.parquet"
    table = evaluate_model(tiny_models[method], manifest, root, out, split="test", batch_size=5,
                           device="cpu", progress=False)
    pd.testing.assert_frame_equal(read_table(out), table)
    assert read_metadata(out)["split"] == "test"
    assert list(zip(table["method"], table["metric"])) == [(method, "top1"), (method, "top5"),
                                                          ("linear_probe", "top1")]

    # The model's own logits on the split, in one pass, independently of intr.evaluate.
    model, config = load_model(tiny_models[method])
    norm = config["normalization"]
    data = ImageSet(root, read_split(manifest, "test"), config["image_size"], norm["mean"], norm["std"])
    with torch.no_grad():
        logits = model.eval()(torch.stack([data[i][0] for i in range(len(data))]))
    expected_top1 = (logits.argmax(1) == data.labels).float().mean().item()
    rows = table.set_index(["method", "metric"])
    assert rows.loc[(method, "top1"), "value"] == pytest.approx(expected_top1)
    assert rows.loc[(method, "top5"), "value"] == 1.0  # 4 classes: the true one is always in the top 5
    assert (table["n"] == len(data)).all() and (table["split"] == "test").all()

    # The probe: logistic regression on the frozen features of train+val, scored on the split.
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fit = ImageSet(root, read_split(manifest, ["train", "val"]), config["image_size"], norm["mean"], norm["std"])
    with torch.no_grad():
        features = lambda d: model.probe_features(torch.stack([d[i][0] for i in range(len(d))])).numpy()  # noqa: E731
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000))
        probe.fit(features(fit), fit.labels.numpy())
        expected_probe = (probe.predict(features(data)) == data.labels.numpy()).mean()
    assert rows.loc[("linear_probe", "top1"), "value"] == pytest.approx(expected_probe)


def test_cli_refuses_a_model_of_other_classes_and_a_truncated_model_in_one_line(tiny_models, tiny_dataset,
                                                                               six_class_manifest, tmp_path, capsys):
    manifest, root = tiny_dataset
    model = tiny_models["prompt_cam"]
    out = tmp_path / "metrics_model.parquet"

    def evaluate(model_path, manifest_path) -> int:
        return intr_main(["evaluate", "--model", str(model_path), "--manifest", str(manifest_path), "--root",
                          str(root), "--out", str(out), "--quiet", "--config-json", '{"extract": {"device": "cpu"}}'])

    assert evaluate(model, six_class_manifest) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"intr evaluate: error: {model} was trained on other classes than {six_class_manifest}: "
                          "4 classes in the model, 6 in the manifest; first difference at class_id 1: ")
    assert err.count("\n") == 1 and "Traceback" not in err

    data = model.read_bytes()
    (tmp_path / "model.pt").write_bytes(data[:len(data) // 2])
    assert evaluate(tmp_path / "model.pt", manifest) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"intr evaluate: error: {tmp_path / 'model.pt'} is truncated ({len(data) // 2} bytes")
    assert err.count("\n") == 1 and not out.exists()


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_items():
    rng = np.random.default_rng(0)
    small = rng.random(50) < 0.3
    large = rng.random(5000) < 0.3
    m, lo, hi = bootstrap_mean(small)
    assert lo <= m <= hi and m == pytest.approx(small.mean())
    _, lo2, hi2 = bootstrap_mean(large)
    assert hi2 - lo2 < (hi - lo) / 5
    assert np.isnan(bootstrap_mean([])).all()  # no items: NaNs, not an error
    row = metric_row("prompt_cam", "top1", "test", [1, 0, 1, 1])
    assert row["value"] == 0.75 and row["n"] == 4 and row["method"] == "prompt_cam"


def test_gather_evaluation_concatenates_metric_tables(tmp_path):
    a = pd.DataFrame([metric_row("prompt_cam", "top1", "test", [1, 1, 0])])
    b = pd.DataFrame([metric_row("linear_probe", "top1", "test", [0.2, 0.1])])
    write_table(a, tmp_path / "a.parquet")
    write_table(b, tmp_path / "b.parquet")
    gather_evaluation([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "evaluation.parquet")
    table = read_table(tmp_path / "evaluation.parquet")
    assert list(table.columns) == ["method", "metric", "split", "value", "ci_lo", "ci_hi", "n"]
    assert table["method"].tolist() == ["prompt_cam", "linear_probe"]
    assert table["value"].tolist() == pytest.approx([2 / 3, 0.15])
