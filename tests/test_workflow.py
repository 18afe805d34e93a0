"""The Snakemake workflow: lint, config validation, and one tiny end-to-end run."""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from html import escape
from pathlib import Path

import pandas as pd
import pytest
import yaml

TINY_IMAGES = 2 * 2 * 12  # genera x species per genus x images per species in config/tiny.yaml


def test_lint_is_clean(run_snakemake, repo_root):
    result = run_snakemake("--lint")
    assert result.returncode == 0, result.stdout


def dry_run_of_tiny_config(run_snakemake, repo_root, tmp_path, change):
    """``snakemake -n`` on config/tiny.yaml after ``change(config)`` edits it in place."""
    config = yaml.safe_load((repo_root / "config" / "tiny.yaml").read_text())
    change(config)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    return run_snakemake("-n", "--cores", "1", "--configfile", bad, cwd=tmp_path)


def test_misspelled_config_key_stops_before_any_job(run_snakemake, repo_root, tmp_path):
    def misspell(config):
        config["synthetic"]["images_per_specie"] = config["synthetic"].pop("images_per_species")

    result = dry_run_of_tiny_config(run_snakemake, repo_root, tmp_path, misspell)

    assert result.returncode != 0
    assert "images_per_specie" in result.stdout
    assert "Additional properties are not allowed" in result.stdout
    assert not (tmp_path / "results").exists()


def test_every_config_problem_is_listed_before_any_job_without_the_schema(run_snakemake, repo_root, tmp_path):
    def three_problems(config):
        config["synthetic"]["images_per_specie"] = config["synthetic"].pop("images_per_species")
        config["extract"]["split"] = "validation"
        config["analysis"]["top_heads"] = 0

    result = dry_run_of_tiny_config(run_snakemake, repo_root, tmp_path, three_problems)

    assert result.returncode != 0
    assert "3 problems in the config:" in result.stdout
    for line in ("  analysis.top_heads: 0 is less than the minimum of 1",
                 "  extract.split: 'validation' is not one of ['train', 'val', 'test']",
                 "  synthetic: Additional properties are not allowed ('images_per_specie' was unexpected)"):
        assert line in result.stdout.splitlines(), line
    assert "Failed validating" not in result.stdout and "'description'" not in result.stdout  # no schema dump
    assert not (tmp_path / "results").exists()


def test_values_at_odds_with_each_other_or_the_model_stop_the_workflow_before_any_job(run_snakemake, repo_root,
                                                                                     tmp_path):
    def values_at_odds(config):
        config["analysis"]["traits_k_range"] = [16, 4]
        config["intr"]["train"]["warmup_epochs"] = 5  # epochs: 2
        config["extract"]["top_heads"] = 5  # the tiny INTR decoder has 4 heads

    result = dry_run_of_tiny_config(run_snakemake, repo_root, tmp_path, values_at_odds)

    assert result.returncode != 0
    assert "analysis.traits_k_range: [16, 4] has its minimum above its maximum" in result.stdout
    assert "intr.train.warmup_epochs: 5 is more than intr.train.epochs (2)" in result.stdout
    assert "extract.top_heads: 5 is more than the 4 attention heads of intr's model" in result.stdout
    assert not (tmp_path / "results").exists()


def test_a_dataset_root_that_is_a_file_or_has_braces_stops_the_workflow_naming_it(run_snakemake, tmp_path):
    archive = tmp_path / "gulls.tgz"
    archive.write_bytes(b"an archive, not a folder")
    (tmp_path / "gulls{2}" / "train" / "a").mkdir(parents=True)
    for root, message in ((archive, f"dataset.root: '{archive}' is a file, not a folder"),
                          (tmp_path / "gulls{2}", f"dataset.root: '{tmp_path}/gulls{{2}}' has {{ or }}, which "
                                                  "Snakemake reads as a wildcard")):
        config = tmp_path / "gulls.yaml"
        config.write_text(yaml.safe_dump({"dataset": {"name": "gulls", "kind": "imagefolder", "root": str(root)}}))

        result = run_snakemake("-n", "--cores", "1", "--configfile", config, cwd=tmp_path)

        assert result.returncode != 0
        assert message in result.stdout, result.stdout
        assert "WildcardError" not in result.stdout


def test_class_names_with_braces_reach_the_manifest_as_written(run_snakemake, repo_root, tmp_path):
    names = ["a{2}", "{dataset}", "b}{"]  # Python format and Snakemake wildcard syntax, taken as text
    config = yaml.safe_load((repo_root / "config" / "tiny.yaml").read_text())
    config["synthetic"].update(class_names=names, images_per_species=2, image_size=32)
    path = tmp_path / "braces.yaml"
    path.write_text(yaml.safe_dump(config))

    plan = run_snakemake("-n", "-p", "--cores", "1", "--configfile", path, cwd=tmp_path)
    assert plan.returncode == 0, plan.stdout
    synthesize = shell_commands(plan.stdout, "synthesize")[0]
    assert json.loads(option(synthesize, "--config-json"))["synthetic"]["class_names"] == names

    run = run_snakemake("results/tiny/manifest.parquet", "--cores", "1", "--configfile", path, cwd=tmp_path)
    assert run.returncode == 0, run.stdout
    manifest = pd.read_parquet(tmp_path / "results" / "tiny" / "manifest.parquet")
    by_class = manifest.drop_duplicates("class_id").sort_values("class_id")
    assert by_class["class_name"].tolist()[:3] == names  # the first species, in class order


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
    synthesize = shell_commands(result.stdout, "synthesize")[0]
    assert json.loads(option(synthesize, "--config-json"))["synthetic"]["images_per_species"] == 12


def shell_commands(dry_run: str, subcommand: str) -> list[list[str]]:
    """The `intr SUBCOMMAND ...` shell commands of a `snakemake -n -p` output, split into words."""
    return [shlex.split(line.removeprefix("Shell command: ").split(" > ")[0])
            for line in dry_run.splitlines() if line.startswith(f"Shell command: intr {subcommand} ")]


def option(words: list[str], flag: str) -> str:
    """The value after `flag` in a split command line."""
    return words[words.index(flag) + 1]


def planned(dry_run: str) -> dict[str, list[str]]:
    """Rule name -> the outputs of each of its planned jobs (`snakemake -n`), in plan order."""
    jobs: dict[str, list[str]] = {}
    rule = None
    for line in dry_run.splitlines():
        if match := re.match(r"(?:local)?rule (\w+):$", line.strip()):
            rule = match.group(1)
            jobs.setdefault(rule, [])
        elif rule and line.strip().startswith("output: "):
            jobs[rule].extend(line.strip().removeprefix("output: ").split(", "))
    return jobs


def tiny_config_with(tmp_path: Path, repo_root: Path, section: str, **values) -> Path:
    config = yaml.safe_load((repo_root / "config" / "tiny.yaml").read_text())
    config.setdefault(section, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_evaluate_and_extract_use_the_configured_split(run_snakemake, repo_root, tmp_path):
    config = tiny_config_with(tmp_path, repo_root, "extract", split="val")

    result = run_snakemake("-n", "-p", "--cores", "1", "--configfile", config, cwd=tmp_path)

    assert result.returncode == 0, result.stdout
    for subcommand, count in (("evaluate", 2), ("extract", 4), ("faithfulness", 2)):  # extract: + region effects
        commands = shell_commands(result.stdout, subcommand)
        assert len(commands) == count, subcommand  # prompt_cam and intr
        for words in commands:
            assert json.loads(option(words, "--config-json"))["extract"]["split"] == "val", subcommand
    # The region effects are a job of their own: the same model, their table alone, the regions beside it.
    tables = sorted(option(words, "--tables") for words in shell_commands(result.stdout, "extract"))
    assert tables == ["predictions,attention,head_ranks,pair_head_ranks,trait_features,lookalikes"] * 2 + \
        ["region_effects"] * 2
    for words in shell_commands(result.stdout, "faithfulness"):
        assert option(words, "--probe").endswith("linear_probe.pt")  # the probe evaluate fitted


def test_rules_declare_the_ground_truth_tables_and_pass_them_by_path(run_snakemake, repo_root, tmp_path):
    result = run_snakemake("-n", "-p", "--cores", "1", "--configfile", repo_root / "config" / "tiny.yaml",
                           cwd=tmp_path)

    assert result.returncode == 0, result.stdout
    jobs = planned(result.stdout)
    tables = {f"results/tiny/{name}.parquet" for name in ("lookalike_pairs", "class_attributes", "planted_traits")}
    assert tables <= set(jobs["prepare"])
    analyze = shell_commands(result.stdout, "analyze")[0]
    method = Path(option(analyze, "--attention")).parent.name
    for flag, path in {"--lookalike-pairs": "results/tiny/lookalike_pairs.parquet",
                       "--class-attributes": "results/tiny/class_attributes.parquet",
                       "--parts": "results/tiny/parts.parquet",
                       "--baseline-maps": f"results/tiny/{method}/baseline_maps.parquet",
                       "--trait-features": f"results/tiny/{method}/trait_features.parquet",
                       "--pair-head-ranks": f"results/tiny/{method}/pair_head_ranks.parquet",
                       "--discovered-parts": f"results/tiny/{method}/discovered_parts.parquet"}.items():
        assert option(analyze, flag) == path, flag
    faithfulness = shell_commands(result.stdout, "faithfulness")[0]
    assert option(faithfulness, "--attention").endswith("/attention.parquet")
    report = shell_commands(result.stdout, "report")[0]
    assert option(report, "--lookalike-pairs") == "results/tiny/lookalike_pairs.parquet"
    given = {word.split("=", 1)[0] for word in report if re.fullmatch(r"\w+=results/.*", word)}
    assert {"attention", "evaluation", "contrasts", "regions", "traits", "trait_members", "head_types",
            "baseline_maps", "predictions", "head_ranks", "region_effects",
            "counterfactuals", "counterfactual_examples",  # synthetic data: the counterfactual strip
            "discovered_parts"} == given  # the default regions: discovered parts


def test_imagefolder_data_declares_no_ground_truth_tables(run_snakemake, repo_root, tmp_path):
    (tmp_path / "gulls" / "train" / "a").mkdir(parents=True)
    config = tmp_path / "gulls.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"name": "gulls", "kind": "imagefolder",
                                                  "root": str(tmp_path / "gulls")}, "methods": ["prompt_cam"]}))

    result = run_snakemake("-n", "-p", "--cores", "1", "--configfile", config, cwd=tmp_path)

    assert result.returncode == 0, result.stdout
    assert sorted(Path(p).name for p in planned(result.stdout)["prepare"]) == \
        ["manifest.parquet", "parts.parquet", "rejected.parquet"]
    analyze = shell_commands(result.stdout, "analyze")[0]
    assert "--lookalike-pairs" not in analyze and "--class-attributes" not in analyze


def test_a_deleted_table_is_rebuilt_by_the_rule_that_writes_it(run_snakemake, repo_root, tmp_path):
    tiny = repo_root / "config" / "tiny.yaml"
    plan = run_snakemake("-n", "--cores", "1", "--configfile", tiny, cwd=tmp_path)
    assert plan.returncode == 0, plan.stdout
    outputs = [path for paths in planned(plan.stdout).values() for path in paths]
    for path in outputs:  # a finished run's files, all with one time stamp
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
        os.utime(tmp_path / path, (1.7e9, 1.7e9))
    assert "Nothing to be done" in run_snakemake("-n", "--cores", "1", "--configfile", tiny, cwd=tmp_path).stdout

    for table, rule in (("prompt_cam/attention.parquet", "extract"), ("intr/contrasts.parquet", "analyze"),
                        ("lookalike_pairs.parquet", "prepare"), ("prompt_cam/trait_features.parquet", "extract")):
        (tmp_path / "results" / "tiny" / table).unlink()
        again = run_snakemake("-n", "--cores", "1", "--configfile", tiny, cwd=tmp_path)
        assert again.returncode == 0, again.stdout
        assert f"results/tiny/{table}" in planned(again.stdout)[rule], (table, again.stdout)
        (tmp_path / "results" / "tiny" / table).touch()
        os.utime(tmp_path / "results" / "tiny" / table, (1.7e9, 1.7e9))


def test_conda_environment_holds_the_project_dependencies_and_torch_pins(repo_root):
    env = yaml.safe_load((repo_root / "workflow" / "envs" / "trait-discovery.yaml").read_text())
    pip = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = re.search(r"TORCH_PINS := (.*)", (repo_root / "Makefile").read_text()).group(1).split()

    def name(spec: str) -> str:
        return re.split(r"[<>=!~ ]", spec)[0]

    assert pip[:2] == pins
    assert sorted(pip[2:]) == sorted(spec for spec in project if name(spec) not in
                                     {"torch", "torchvision", "snakemake", "snakemake-executor-plugin-slurm"})
    directives = [(rule_file.parent / found).resolve() for rule_file in (repo_root / "workflow" / "rules").glob("*.smk")
                  for found in re.findall(r"conda:\n\s+\"([^\"]+)\"", rule_file.read_text())]
    assert len(directives) >= 10  # every rule but `all`
    assert set(directives) == {repo_root / "workflow" / "envs" / "trait-discovery.yaml"}


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
        for table in ("predictions", "attention", "head_ranks", "pair_head_ranks", "region_effects",
                      "trait_features", "baseline_maps", "traits", "trait_members", "regions", "contrasts",
                      "head_types"):
            assert (results / method / f"{table}.parquet").exists(), (method, table)
        for rule in ("extract", "region_effects", "faithfulness", "analyze"):
            assert (tmp_path / "logs" / "tiny" / method / f"{rule}.log").exists()
    counterfactuals = pd.read_parquet(results / "prompt_cam" / "counterfactuals.parquet")
    assert set(counterfactuals["kind"]) <= {"planted", "all_planted", "control"}
    if (counterfactuals["kind"] == "control").any():  # only correctly classified images are re-rendered
        assert ("prompt_cam", "counterfactual_flip_rate_control") in rows
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


@pytest.mark.slow
def test_users_own_imagefolder_runs_end_to_end_on_discovered_parts(run_snakemake, repo_root, tmp_path):
    """A user's ImageFolder (no parts, masks, boxes or genus): the report shows discovered parts and ranked pairs."""
    import shutil

    from intr.data.synthetic import SyntheticConfig, synthesize

    tiny = yaml.safe_load((repo_root / "config" / "tiny.yaml").read_text())
    options = {k: v for k, v in tiny["synthetic"].items() if k not in ("workers", "class_names")}
    rendered = tmp_path / "rendered"
    synthesize(SyntheticConfig.from_dict(options), rendered, progress=False)
    split_of = {}
    for line in (rendered / "train_test_split.txt").read_text().split("\n"):
        if line.strip():
            image_id, is_train = line.split()
            split_of[image_id] = "train" if is_train == "1" else "test"
    photos = tmp_path / "photos"
    for line in (rendered / "images.txt").read_text().split("\n"):
        if not line.strip():
            continue
        image_id, rel = line.split(maxsplit=1)
        species = rel.split("/")[0].split(".", 1)[1]
        target = photos / split_of[image_id] / species / Path(rel).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(rendered / "images" / rel, target)

    config = {**tiny, "dataset": {"name": "photos", "kind": "imagefolder", "root": str(photos)},
              "extract": {**tiny["extract"], "regions": "discovered"},
              "discovery": {"k": 4, "fit_images": 16}}
    config.pop("synthetic")
    (tmp_path / "photos.yaml").write_text(yaml.safe_dump(config))
    run = run_snakemake("--cores", "2", "--workflow-profile", repo_root / "workflow" / "profiles" / "default",
                        "--configfile", tmp_path / "photos.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stdout

    results = tmp_path / "results" / "photos"
    for method in ("prompt_cam", "intr"):
        discovered = pd.read_parquet(results / method / "discovered_parts.parquet")
        assert len(discovered) == int((pd.read_parquet(results / "manifest.parquet")["split"] == "test").sum())
        regions = set(pd.read_parquet(results / method / "regions.parquet")["region"])
        assert regions <= {f"part_{i}" for i in range(1, 5)} | {"background"} and regions
        contrasts = pd.read_parquet(results / method / "contrasts.parquet")
        assert contrasts["rank_combined"].max() >= 1 and contrasts["planted"].isna().all()
    html = (results / "report.html").read_text()
    answer = html[html.index('id="answer"'):html.index('id="parts"')]
    assert "part_" in answer and "data:image" in answer  # ranked pairs with crops of discovered parts
    assert "cell_" not in html
