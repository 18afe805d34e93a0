"""The Snakemake workflow: lint, config validation, and one tiny end-to-end run."""

from __future__ import annotations


from html import escape

import pandas as pd
import pytest
import yaml

TINY_IMAGES = 2 * 2 * 12  # genera x species per genus x images per species in config/tiny.yaml


def test_lint_is_clean(run_snakemake, repo_root):
    result = run_snakemake("--lint")
    assert result.returncode == 0, result.stdout


def test_misspelled_config_key_stops_before_any_job(run_snakemake, repo_root, tmp_path):
    config = yaml.safe_load((repo_root / "config" / "tiny.yaml").read_text())
    config["synthetic"]["images_per_specie"] = config["synthetic"].pop("images_per_species")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))

    result = run_snakemake("-n", "--cores", "1", "--configfile", bad, cwd=tmp_path)

    assert result.returncode != 0
    assert "images_per_specie" in result.stdout
    assert "Additional properties are not allowed" in result.stdout
    assert not (tmp_path / "results").exists()


def test_real_dataset_kind_needs_a_root(run_snakemake, tmp_path):
    config = tmp_path / "cub.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"name": "cub", "kind": "cub"}}))

    result = run_snakemake("-n", "--cores", "1", "--configfile", config, cwd=tmp_path)

    assert result.returncode != 0
    assert "dataset.root must be set" in result.stdout


def test_dry_run_plans_synthesize_then_prepare(run_snakemake, repo_root, tmp_path):
    result = run_snakemake("-n", "-p", "--cores", "1", "--configfile", repo_root / "config" / "tiny.yaml",
                           cwd=tmp_path)

    assert result.returncode == 0, result.stdout
    assert "rule synthesize:" in result.stdout
    assert "rule prepare:" in result.stdout
    assert "results/tiny/manifest.parquet" in result.stdout
    assert "--images-per-species 12" in result.stdout


@pytest.mark.slow
def test_tiny_config_runs_end_to_end_and_then_has_nothing_to_do(run_snakemake, repo_root, tmp_path):
    profile = repo_root / "workflow" / "profiles" / "default"
    tiny = repo_root / "config" / "tiny.yaml"
    args = ("--cores", "2", "--workflow-profile", profile, "--configfile", tiny)

    first = run_snakemake(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout

    results = tmp_path / "results" / "tiny"
    manifest = pd.read_parquet(results / "manifest.parquet")
    rejected = pd.read_parquet(results / "rejected.parquet")
    assert len(manifest) + len(rejected) == TINY_IMAGES
    assert (results / "parts.parquet").exists()
    assert (results / "data" / "images.txt").exists()
    for rule in ("synthesize", "prepare"):
        assert (tmp_path / "logs" / "tiny" / f"{rule}.log").exists()
        assert (tmp_path / "logs" / "tiny" / "benchmarks" / f"{rule}.tsv").exists()
    for rule in ("train", "evaluate", "evaluation"):
        assert (tmp_path / "logs" / "tiny" / "prompt_cam" / f"{rule}.log").exists()
    log = pd.read_parquet(results / "prompt_cam" / "train_log.parquet")
    assert log["epoch"].tolist() == [1, 2]
    evaluation = pd.read_parquet(results / "prompt_cam" / "evaluation.parquet")
    rows = set(zip(evaluation["method"], evaluation["metric"]))
    assert {("prompt_cam", "top1"), ("linear_probe", "top1"), ("prompt_cam", "peak_on_planted_part"),
            ("chance", "peak_on_planted_part"), ("best_fixed_head", "peak_on_planted_part"),
            ("lowest_ranked_head", "peak_on_planted_part")} <= rows
    test_images = int((manifest["split"] == "test").sum())
    top1 = evaluation.query("method == 'prompt_cam' and metric == 'top1'").iloc[0]
    assert top1["n"] == test_images and 0.0 <= top1["value"] <= 1.0
    assert top1["ci_lo"] <= top1["value"] <= top1["ci_hi"]

    for method in ("prompt_cam", "intr"):
        for table in ("predictions", "attention", "head_ranks", "region_effects", "trait_features",
                      "baseline_maps", "traits", "trait_members", "regions", "contrasts", "head_types"):
            assert (results / method / f"{table}.parquet").exists(), (method, table)
        for rule in ("extract", "faithfulness", "analyze"):
            assert (tmp_path / "logs" / "tiny" / method / f"{rule}.log").exists()
    attention = pd.read_parquet(results / "prompt_cam" / "attention.parquet")
    assert set(attention["image_id"]) == set(manifest.query("split == 'test'")["image_id"])
    assert {("prompt_cam", "insertion_auc"), ("prompt_cam", "deletion_auc"), ("gradcam", "deletion_auc"),
            ("rollout", "insertion_auc"), ("prompt_cam", "trait_recovery_top1"),
            ("size_baseline", "trait_recovery_top1"), ("random", "trait_recovery_top1")} <= rows

    html = (results / "report.html").read_text()
    hostile = "<img src=x onerror=alert(1)>"
    assert hostile in set(manifest["class_name"])  # config/tiny.yaml names a class folder so
    assert hostile not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    for name in manifest["class_name"].unique():
        assert escape(name, quote=False) in html, name

    report = run_snakemake("--report", tmp_path / "report.zip", "--configfile", tiny, cwd=tmp_path)
    assert report.returncode == 0, report.stdout
    import zipfile

    with zipfile.ZipFile(tmp_path / "report.zip") as archive:
        names = archive.namelist()
    # the trait report, tagged with report() in the rule, is packed as a result beside Snakemake's own page
    assert any(name.startswith("report/data/") and name.endswith("/report.html") for name in names), names[:20]

    second = run_snakemake(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stdout
    assert "Nothing to be done" in second.stdout
