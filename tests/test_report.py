"""The trait report (analysis.report) built from contract-shaped tables.

``make_report_fixture`` renders a tiny synthetic data set (real images, masks
and parts, one class named ``<img src=x onerror=alert(1)>``), prepares it, and
writes every extraction and analysis table of two methods in the layouts of
docs/tables.md with generated values: maps peak on the planted parts, so the
report's region names can be checked. tests/test_browser.py reuses it.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis import part_discovery as pdisc
from analysis import tables
from analysis.tables import write_columns, write_table

HOSTILE = "<img src=x onerror=alert(1)>"
GRID = 8
HEADS = {"prompt_cam": 6, "intr": 4}
BASELINES = ("gradcam", "layercam", "eigencam", "rollout")


def _blob(cx: float, cy: float, size: float, sigma: float = 1.0) -> np.ndarray:
    """A normalised Gaussian map on the GRID x GRID cells centred on pixel (cx, cy) of a size x size image."""
    centres = (np.arange(GRID) + 0.5) * size / GRID
    gx, gy = np.meshgrid(centres, centres)
    m = np.exp(-((gx - cx) ** 2 + (gy - cy) ** 2) / (2 * (sigma * size / GRID) ** 2)) + 1e-4
    return m / m.sum()


def _write_method(out: Path, method: str, manifest: pd.DataFrame, parts: pd.DataFrame, pairs: pd.DataFrame,
                  planted_part: dict[int, str], regions_vocab: list[str], rng: np.random.Generator) -> None:
    heads = HEADS[method]
    meta = {"method": method, "backbone": "vit_tiny_patch16_224", "grid_h": GRID, "grid_w": GRID, "patch_size": 8,
            "image_size": 64, "num_heads": heads, "split": "test"}
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    classes = sorted(manifest["class_id"].unique())
    siblings = {c: [] for c in classes}
    for a, b in zip(pairs["class_a"], pairs["class_b"]):
        siblings[a].append(b)
        siblings[b].append(a)
    keypoints = {(i, p): (x, y) for i, p, x, y in parts[["image_id", "part_name", "x", "y"]].itertuples(index=False)}

    # predictions: all right but the last test image of each class
    last = test.groupby("class_id")["image_id"].transform("max") == test["image_id"]
    pred = np.where(last, (test["class_id"] + 1) % len(classes), test["class_id"]).astype(np.int16)
    prob = np.where(last, 0.3, 0.9).astype(np.float32)
    top5 = np.stack([np.roll(np.arange(5), -1) if w else np.arange(5) for w in last]).astype(np.int16)
    top5[:, 0] = pred
    write_columns("predictions", {"image_id": test["image_id"], "label": test["class_id"], "pred": pred,
                                  "correct": ~last.to_numpy(), "prob_true": prob, "top5_ids": top5,
                                  "top5_probs": np.tile(np.linspace(0.9, 0.01, 5, dtype=np.float32), (len(test), 1))},
                  out / "predictions.parquet", meta)

    # attention: true class and its siblings; the query's rank-1 head peaks on the planted part
    rows = {"image_id": [], "query_class": [], "query_role": [], "head": [], "head_rank": [], "attn": []}
    for r in test.itertuples():
        for q in [r.class_id, *siblings[r.class_id]]:
            ranks = rng.permutation(heads) + 1
            for h in range(heads):
                part = planted_part[q] if ranks[h] == 1 else str(rng.choice(["body", "wing", "tail", "crown"]))
                x, y = keypoints.get((r.image_id, part), (32.0, 32.0))
                rows["image_id"].append(r.image_id)
                rows["query_class"].append(q)
                rows["query_role"].append("true" if q == r.class_id else "sibling")
                rows["head"].append(h)
                rows["head_rank"].append(ranks[h])
                rows["attn"].append(_blob(x, y, 64))
    attn = np.stack(rows.pop("attn")).reshape(len(rows["image_id"]), -1).astype(np.float16)
    write_columns("attention", {**rows, "attn": attn}, out / "attention.parquet", meta)
    attention = pq.read_table(out / "attention.parquet")
    write_columns("head_ranks", {"image_id": rows["image_id"], "class_id": rows["query_class"], "head": rows["head"],
                                 "rank": rows["head_rank"],
                                 "prob_after_blur": rng.random(attention.num_rows).astype(np.float32)},
                  out / "head_ranks.parquet", meta)

    # baseline maps: the model's own and four CAM baselines per test image
    n = len(test)
    maps = rng.random((n * (1 + len(BASELINES)), GRID * GRID)).astype(np.float32)
    maps /= maps.sum(axis=1, keepdims=True)
    write_columns("baseline_maps", {"image_id": np.tile(test["image_id"], 1 + len(BASELINES)),
                                    "method": np.repeat([method, *BASELINES], n),
                                    "class_id": np.tile(test["class_id"], 1 + len(BASELINES)),
                                    "attn": maps.astype(np.float16)}, out / "baseline_maps.parquet", meta)
    effects = [(r.image_id, r.class_id, b, reg) for r in test.itertuples() for b in siblings[r.class_id]
               for reg in regions_vocab]
    e = pd.DataFrame(effects, columns=["image_id", "class_a", "class_b", "region"])
    write_columns("region_effects", {**{k: e[k] for k in e.columns}, "area": np.full(len(e), 0.05, np.float32),
                                     "margin": np.full(len(e), 2.0, np.float32),
                                     "margin_drop": rng.random(len(e)).astype(np.float32),
                                     "prob_a_drop": rng.random(len(e)).astype(np.float32)},
                  out / "region_effects.parquet", meta)

    # analysis tables
    R = len(regions_vocab)
    profiles = rng.random((heads, R)).astype(np.float32)
    profiles /= profiles.sum(axis=1, keepdims=True)
    dominant = [regions_vocab[i] for i in profiles.argmax(axis=1)]
    write_columns("head_types", {"head": np.arange(heads), "head_type": np.arange(heads) % 2,
                                 "dominant_region": dominant, "profile": profiles, "type_dominant_region": dominant,
                                 "consistency": np.ones(heads, np.float32), "n_maps": np.full(heads, 10)},
                  out / "head_types.parquet", {**meta, "regions": regions_vocab})
    member_rows = attention.to_pandas()
    member_rows = member_rows[(member_rows["query_role"] == "true") & (member_rows["head_rank"] <= 2)].reset_index(drop=True)
    trait_parts = ["crown", "beak", "breast"]
    trait_of = member_rows["query_class"].map(lambda c: trait_parts.index(planted_part[c]) if planted_part[c] in trait_parts else 0)
    members = pd.DataFrame({"member": np.arange(len(member_rows), dtype=np.int32), "image_id": member_rows["image_id"],
                            "class_id": member_rows["query_class"], "head": member_rows["head"],
                            "rank": member_rows["head_rank"], "trait": trait_of.astype(np.int16),
                            "umap_x": (trait_of * 3 + rng.normal(0, 0.5, len(member_rows))).astype(np.float32),
                            "umap_y": rng.normal(0, 1, len(member_rows)).astype(np.float32),
                            "dominant_region": [trait_parts[t] for t in trait_of]})
    write_table(members, out / "trait_members.parquet", meta, schema=tables.schema("trait_members"))
    traits = []
    for t, name in enumerate(trait_parts):
        ms = members[members["trait"] == t]
        counts = ms["class_id"].value_counts()
        traits.append({"trait": t, "name": name if t else f"{name}", "dominant_region": name, "purity": 0.8,
                       "size": len(ms), "classes": counts.index.astype(int).tolist(),
                       "class_counts": counts.to_numpy().astype(int).tolist(),
                       "representatives": ms["member"].head(5).astype(int).tolist()})
    write_table(pa.Table.from_pylist(traits, schema=tables.schema("traits")), out / "traits.parquet", meta)
    region_rows = []
    for c in classes:
        dens = rng.random(R) * 0.5
        dens[regions_vocab.index(planted_part[c])] = 2.0
        order = np.argsort(-dens)
        for rank, k in enumerate(order, 1):
            region_rows.append({"class_id": c, "region": regions_vocab[k], "mass": dens[k] / 10,
                                "mass_lo": dens[k] / 12, "mass_hi": dens[k] / 8, "density": dens[k],
                                "density_lo": dens[k] * 0.8, "density_hi": dens[k] * 1.2, "area": 0.05,
                                "n_images": 5, "rank": rank, "heads": [0, 2] if rank == 1 else [],
                                "trait": trait_parts.index(regions_vocab[k]) if regions_vocab[k] in trait_parts else -1,
                                "correct_only": True})
    write_table(pa.Table.from_pylist(region_rows, schema=tables.schema("regions")), out / "regions.parquet", meta)
    contrast_rows = []
    for a, b, differing in zip(pairs["class_a"], pairs["class_b"], pairs["differing_parts"]):
        for x, y in ((a, b), (b, a)):
            scores = rng.random(R)
            for part in differing:
                scores[regions_vocab.index(part)] = 1.5
            order = np.argsort(-scores)
            for rank, k in enumerate(order, 1):
                contrast_rows.append({"class_a": x, "class_b": y, "region": regions_vocab[k], "density_a": scores[k],
                                      "difference": scores[k] / 2, "occlusion": scores[k] / 3, "combined": scores[k],
                                      "rank_density": rank, "rank_difference": rank, "rank_occlusion": rank,
                                      "rank_combined": rank, "p_value": 0.001 if rank == 1 else 0.5,
                                      "q_value": 0.01 if rank == 1 else 0.6, "n_images": 5,
                                      "planted": regions_vocab[k] in set(differing), "area": 0.05})
    write_table(pa.Table.from_pylist(contrast_rows, schema=tables.schema("contrasts")), out / "contrasts.parquet", meta)
    ev = [(method, "top1", 0.81, 0.75, 0.86, n), (method, "top5", 1.0, 1.0, 1.0, n), ("chance", "top1", 0.25, None, None, n),
          ("linear_probe", "top1", 0.7, 0.6, 0.8, n)]
    for k, m in enumerate([method, *BASELINES]):
        ev += [(m, "insertion_auc", 0.6 - 0.05 * k, 0.55 - 0.05 * k, 0.65 - 0.05 * k, n),
               (m, "deletion_auc", 0.2 + 0.03 * k, 0.15 + 0.03 * k, 0.25 + 0.03 * k, n)]
    for metric in ("trait_recovery_top1", "trait_recovery_recall3", "trait_recovery_top1_density"):
        ev += [(method, metric, 0.9, 0.8, 1.0, 4), ("random", metric, 0.17, 0.1, 0.25, 4),
               ("size_baseline", metric, 0.3, 0.2, 0.4, 4)]
    ev += [(method, "pointing_game", 0.7, 0.6, 0.8, n), ("chance", "pointing_game", 0.2, 0.15, 0.25, n)]
    frame = pd.DataFrame(ev, columns=["method", "metric", "value", "ci_lo", "ci_hi", "n"]).assign(split="test")
    write_table(frame[list(tables.EVALUATION_COLUMNS)], out / "evaluation.parquet", schema=tables.schema("evaluation"))


def make_report_fixture(base: Path, hostile: bool = True, images_per_species: int = 8) -> dict:
    """A prepared tiny synthetic data set plus both methods' tables; returns build_report's arguments."""
    from analysis.regions import region_vocabulary
    from intr.data.prepare import prepare_dataset
    from intr.data.synthetic import SyntheticConfig, synthesize

    options = {"genera": 2, "species_per_genus": 2, "images_per_species": images_per_species, "image_size": 64,
               "train_fraction": 0.5, "seed": 0}
    if hostile:
        options["class_names"] = [HOSTILE]
    root = base / "data"
    results = base / "results" / "tiny"
    synthesize(SyntheticConfig.from_dict(options), root, progress=False)
    prepare_dataset("synthetic", root, results, progress=False)
    manifest = pd.read_parquet(results / "manifest.parquet")
    parts = pd.read_parquet(results / "parts.parquet")
    pairs = pd.read_parquet(results / "lookalike_pairs.parquet")
    planted = {}
    for a, b, differing in zip(pairs["class_a"], pairs["class_b"], pairs["differing_parts"]):
        planted.setdefault(int(a), str(differing[0]))
        planted.setdefault(int(b), str(differing[0]))
    vocab = region_vocabulary(parts)
    rng = np.random.default_rng(0)
    for method in HEADS:
        _write_method(results / method, method, manifest, parts, pairs, planted, vocab, rng)
    config = {"dataset": {"name": "tiny", "kind": "synthetic", "root": None}, "synthetic": options,
              "methods": list(HEADS), "report": {"max_species": 60, "exemplars": 2, "gallery": 4},
              "analysis": {"top_heads": 2}, "extract": {"split": "test", "regions": "annotated"}}
    return {"results_dir": results, "root": root, "methods": list(HEADS), "config": config,
            "names": manifest.drop_duplicates("class_id").sort_values("class_id")["class_name"].tolist(),
            "planted": planted}


@pytest.fixture(scope="module")
def fixture_tables(tmp_path_factory) -> dict:
    return make_report_fixture(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def report_html(fixture_tables, tmp_path_factory) -> str:
    from analysis.report import ReportTables, build_report

    tables = ReportTables.under(fixture_tables["results_dir"], fixture_tables["methods"])
    out = build_report(tables, fixture_tables["root"], fixture_tables["config"],
                       tmp_path_factory.mktemp("out") / "report.html", progress=False)
    return out.read_text(encoding="utf-8")


def _text(page: str) -> str:
    """The page's visible text, roughly (tags dropped, entities decoded)."""
    page = re.sub(r"<style.*?</style>", " ", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def test_report_is_self_contained_and_has_every_section(report_html):
    assert report_html.startswith("<!DOCTYPE html>")
    for anchor in ("summary", "atlas", "pairs", "traits", "comparison", "howto", "config"):
        assert f'id="{anchor}"' in report_html
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', report_html)
    assert len(sources) > 40
    assert all(s.startswith("data:image/") for s in sources), [s[:40] for s in sources if not s.startswith("data:")]
    assert not re.search(r'(href|src)="(https?:|file:|/)', report_html)
    assert "<script" not in report_html.lower()
    assert len(report_html) < 3_000_000


def test_hostile_class_name_is_escaped(report_html, fixture_tables):
    assert HOSTILE in fixture_tables["names"]
    assert HOSTILE not in report_html                  # never raw
    assert html.escape(HOSTILE, quote=False) in report_html
    assert "onerror=" not in re.sub(r"&lt;img src=x onerror=alert\(1\)&gt;", "", report_html)
    assert len(re.findall(r"<img\b", report_html)) == len(re.findall(r'<img[^>]*\ssrc="data:image/', report_html))


def test_species_names_and_tables_appear(report_html, fixture_tables):
    text = _text(report_html)
    for name in fixture_tables["names"]:
        assert name in text
    # accuracy and faithfulness with intervals, references beside the ground-truth scores
    assert "0.810 [0.750, 0.860]" in text
    assert "0.600 [0.550, 0.650]" in text and "gradcam · on Prompt-CAM" in text
    assert "trait_recovery_top1" in text and "size_baseline" in text
    assert "Head types" in text and "UMAP" in text
    # the config is shown verbatim (escaped)
    assert "max_species: 60" in text and f"- {HOSTILE}" in text


def test_exemplar_overlays_name_the_planted_region(report_html, fixture_tables):
    """Rank-1 heads peak on the planted part in the fixture, so (nearly always) the first overlay caption names it."""
    captions = re.findall(r"<figcaption>head (\d+) · #1 · ([^<]+)</figcaption>", report_html)
    assert captions
    planted = set(fixture_tables["planted"].values())
    hits = [region.strip() in planted for _, region in captions]
    assert np.mean(hits) >= 0.75, captions   # blurry blobs on the crown sometimes read as the eye inside it


def test_planted_contrast_rows_are_marked(report_html):
    rows = re.findall(r'<tr class="planted"><td>1</td>', report_html)
    assert len(rows) >= 8   # 2 pairs x 2 directions x 2 methods, planted part ranked first


def test_missing_optional_tables_drop_sections_with_a_note(fixture_tables, tmp_path):
    import shutil

    from analysis.report import ReportTables, build_report

    results = tmp_path / "tiny"
    shutil.copytree(fixture_tables["results_dir"], results)
    (results / "intr" / "contrasts.parquet").unlink()
    (results / "intr" / "traits.parquet").unlink()
    (results / "lookalike_pairs.parquet").unlink()
    (results / "prompt_cam" / "regions.parquet").unlink()
    out = build_report(ReportTables.under(results, fixture_tables["methods"]), fixture_tables["root"],
                       fixture_tables["config"], tmp_path / "r.html", progress=False)
    text = _text(out.read_text())
    assert "INTR: contrasts.parquet not found" in text
    assert "INTR: traits.parquet or trait_members.parquet not found" in text
    assert "lookalike_pairs.parquet not found" in text
    assert "Prompt-CAM: regions.parquet not found" in text
    assert 'id="comparison"' not in out.read_text()   # needs both methods' regions


def test_max_species_limits_the_atlas(fixture_tables, tmp_path):
    from analysis.report import ReportTables, build_report

    config = {**fixture_tables["config"], "report": {"max_species": 2, "exemplars": 1, "gallery": 2}}
    tables = ReportTables.under(fixture_tables["results_dir"], fixture_tables["methods"])
    out = build_report(tables, fixture_tables["root"], config, tmp_path / "r.html", progress=False)
    page = out.read_text()
    assert page.count('<details class="species"') == 2
    assert "2 more species are not shown here" in _text(page)


def test_missing_manifest_is_an_error_naming_it(tmp_path):
    from analysis.report import ReportError, ReportTables, build_report

    with pytest.raises(ReportError, match="manifest.parquet"):
        build_report(ReportTables.under(tmp_path, ["prompt_cam"]), tmp_path, {}, tmp_path / "r.html", progress=False)


def test_report_never_imports_torch(fixture_tables, tmp_path):
    import subprocess
    import sys

    code = ("import sys, json; from analysis.report import ReportTables, build_report; "
            f"build_report(ReportTables.under({str(fixture_tables['results_dir'])!r}, ['prompt_cam', 'intr']), "
            f"{str(fixture_tables['root'])!r}, {fixture_tables['config']!r}, {str(tmp_path / 'r.html')!r}, progress=False); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]


# Run in a fresh interpreter in which importing torch (or intr, which brings it) fails: every code path
# of the analysis and the report, not only their module imports, must do without a network.
NO_TORCH_RUN = """
import json, sys
from pathlib import Path

class RefuseNetworkCode:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "intr", "torchvision", "timm"):
            raise ImportError("analysis code imported " + name)

sys.meta_path.insert(0, RefuseNetworkCode())
from analysis.pipeline import AnalysisInputs, analyze
from analysis.report import ReportTables, build_report

args = json.loads(sys.argv[1])
results, root = Path(args["results"]), Path(args["root"])
for method in args["methods"]:
    inputs = AnalysisInputs.conventional(results / method, results / "manifest.parquet", root)
    analyze(inputs, Path(args["out"]) / method, {"permutations": 50, "bootstrap": 50, "umap": True,
                                                 "regions": args["config"]["extract"]["regions"]}, progress=False)
build_report(ReportTables.under(results, args["methods"]), root, args["config"], Path(args["out"]) / "report.html",
             progress=False)
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "intr")]
"""


def test_analysis_and_report_run_without_torch(fixture_tables, tmp_path):
    import json
    import subprocess
    import sys

    args = {"results": str(fixture_tables["results_dir"]), "root": str(fixture_tables["root"]),
            "methods": fixture_tables["methods"], "config": fixture_tables["config"], "out": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", NO_TORCH_RUN, json.dumps(args)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "report.html").stat().st_size > 0
    for method in fixture_tables["methods"]:
        assert len(pd.read_parquet(tmp_path / method / "contrasts.parquet")) > 0


# --------------------------------------------------------------------------- the first screen and the parts gallery


def _section(page: str, anchor: str, next_anchor: str) -> str:
    """The HTML from one section's anchor to the next's."""
    return page[page.index(f'id="{anchor}"'): page.index(f'id="{next_anchor}"')]


def _answer_rows(page: str) -> list[dict]:
    """The first screen's rows: pair (class ids), method, top region, q-value, crop data URIs."""
    out = []
    section = _section(page, "answer", "parts")
    for a, b, body in re.findall(r'<tr class="answer-row[^"]*" id="answer-(\d+)-(\d+)-\d+">(.*?)</tr>', section,
                                 flags=re.S):
        cells = [_text(c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", body, flags=re.S)]
        out.append({"pair": (int(a), int(b)), "method": cells[0], "region": cells[1], "q": cells[2],
                    "crops": re.findall(r'<img class="crop" src="(data:image/[^"]+)"', body)})
    return out


def _pairs_of(fixture_tables: dict) -> dict[tuple[int, int], set[str]]:
    pairs = pd.read_parquet(fixture_tables["results_dir"] / "lookalike_pairs.parquet")
    return {(int(a), int(b)): {str(p) for p in parts}
            for a, b, parts in zip(pairs["class_a"], pairs["class_b"], pairs["differing_parts"])}


def test_answer_comes_before_the_metric_tables(report_html):
    """The first section answers the question; the summary's metric tables come after it and the gallery."""
    answer = report_html.index('id="answer"')
    assert answer < report_html.index('id="parts"') < report_html.index('id="summary"')
    assert answer < report_html.index('<table class="metrics">')


def test_answer_names_each_pairs_top_region_with_q_value_and_two_crops(report_html, fixture_tables):
    """The fixture's contrasts rank a planted differing part first (score 1.5 against uniform noise below 1,
    q 0.01): every pair has one row per method naming it, with q and a crop from an A and a B image."""
    from analysis.report import fmt

    rows = _answer_rows(report_html)
    pairs = _pairs_of(fixture_tables)
    assert sorted({r["pair"] for r in rows}) == sorted(pairs)
    for pair, differing in pairs.items():
        mine = [r for r in rows if r["pair"] == pair]
        assert [r["method"] for r in mine] == ["Prompt-CAM", "INTR"]
        for r in mine:
            assert r["region"] in differing, (pair, r)
            assert r["q"] == fmt(np.float32(0.01))
            assert len(r["crops"]) == 2 and all(c.startswith("data:image/jpeg;base64,") for c in r["crops"])


def test_region_box_is_the_regions_bounding_box_padded_and_clipped():
    from analysis.report import region_box

    labels = np.zeros((20, 30), dtype=np.int16)
    labels[5:9, 10:15] = 2            # rows 5..8, columns 10..14
    labels[0:3, 27:30] = 3            # in the top right corner
    assert region_box(labels, 2, margin=0.0, min_pad=0) == (5, 10, 9, 15)          # exact box
    assert region_box(labels, 2, margin=0.0, min_pad=2) == (3, 8, 11, 17)          # padded by 2 px
    assert region_box(labels, 2, margin=0.6, min_pad=1) == (2, 7, 12, 18)          # 0.6 x 5 (longer side) = 3 px
    assert region_box(labels, 3, margin=0.0, min_pad=2) == (0, 25, 5, 30)          # clipped to the image
    assert region_box(labels, 7) is None                                           # absent
    top, left, bottom, right = region_box(labels, 2, margin=0.0, min_pad=0)
    crop = labels[top:bottom, left:right]
    assert (crop == 2).all() and (labels == 2).sum() == (crop == 2).sum()          # every region pixel, nothing else


def test_parts_gallery_lists_every_region_of_the_vocabulary(report_html, fixture_tables):
    """Each region of the layout (annotated parts and background here) gets a card with exemplar images."""
    from analysis.regions import region_vocabulary

    vocab = region_vocabulary(pd.read_parquet(fixture_tables["results_dir"] / "parts.parquet"))
    section = _section(report_html, "parts", "summary")
    cards = re.findall(r'<div class="card parts-card"><h4>(.*?)</h4>(.*?)</div></div>', section, flags=re.S)
    assert [_text(name).strip() for name, _ in cards] == vocab     # one layout shared by both methods
    for name, body in cards:
        images = re.findall(r'<img src="(data:image/[^"]+)"', body)
        assert 1 <= len(images) <= 3, name


def test_answer_and_gallery_with_discovered_parts(fixture_tables, tmp_path):
    """In discovered mode the regions are part_k: the rows name the part_k holding the planted part, the
    crops come from the discovered maps, and the gallery has one card per part and background, per method."""
    import shutil

    from analysis import regions
    from analysis.report import ReportTables, build_report

    results = tmp_path / "tiny"
    shutil.copytree(fixture_tables["results_dir"], results)
    manifest = pd.read_parquet(results / "manifest.parquet")
    layout = regions.RegionLayout.build("annotated", parts=pd.read_parquet(results / "parts.parquet"))
    grid = (32, 32)
    truth = regions.image_weights(layout, manifest, grid, root=fixture_tables["root"]).argmax(1)
    background = layout.vocab.index(regions.BACKGROUND)
    labels = np.where(truth == background, 0, truth + 1).astype(np.int8)   # part i of the vocabulary -> part_{i+1}
    rename = {name: f"part_{i + 1}" for i, name in enumerate(layout.vocab) if name != regions.BACKGROUND}
    for method in fixture_tables["methods"]:
        pdisc.write_discovered_parts(results / method / "discovered_parts.parquet", manifest["image_id"].to_numpy(),
                                     labels.reshape(len(manifest), -1), None,
                                     {"grid_h": grid[0], "grid_w": grid[1], "k": background, "method": "from_masks"})
        for name in ("contrasts", "region_effects"):
            frame = pd.read_parquet(results / method / f"{name}.parquet")
            frame["region"] = frame["region"].replace(rename)
            frame.to_parquet(results / method / f"{name}.parquet")
    config = {**fixture_tables["config"], "extract": {"split": "test", "regions": "discovered"}}
    page = build_report(ReportTables.under(results, fixture_tables["methods"]), fixture_tables["root"], config,
                        tmp_path / "r.html", progress=False).read_text()

    rows = _answer_rows(page)
    for pair, differing in _pairs_of(fixture_tables).items():
        mine = [r for r in rows if r["pair"] == pair]
        assert len(mine) == 2
        for r in mine:
            assert r["region"] in {rename[d] for d in differing}, (pair, r)
            assert len(r["crops"]) == 2
    section = _section(page, "parts", "summary")
    names = [_text(n).strip() for n in re.findall(r'<div class="card parts-card"><h4>(.*?)</h4>', section, flags=re.S)]
    assert names == [*[f"part_{i}" for i in range(1, background + 1)], "background"] * 2   # each method's own parts
    howto = _section(page, "howto", "config")
    assert 'id="howto-discovered"' in howto and "part_1" in howto and "majority part" in howto \
        and "parts gallery" in howto   # how to read part_k and the evaluation-only "≈ beak" labels


def test_how_to_read_explains_discovered_parts_only_when_regions_are_discovered(report_html):
    assert 'id="howto-discovered"' not in _section(report_html, "howto", "config")   # annotated regions here


def test_report_images_of_16_bit_files_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    from analysis.report import ImageStore

    gradient = (np.arange(64 * 16, dtype=np.uint16).reshape(16, 64) * 64).astype(np.uint16)
    Image.frombytes("I;16", (64, 16), gradient.astype("<u2").tobytes()).save(tmp_path / "deep.png")
    pixels = ImageStore(tmp_path, {1: "deep.png"}).get(1)
    assert pixels.shape == (16, 64, 3)
    assert np.array_equal(pixels[..., 0], np.round(gradient / 257).astype(np.uint8))
    assert (pixels == 255).mean() < 0.01


def _png(colour: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _counterfactual_tables(out: Path, a: int, b: int, part: str) -> dict[str, bytes]:
    """Hand-made counterfactual tables of one pair: A -> B flips on 3 of 4 images, B -> A on none of 2."""
    def row(image_id, x, y, kind, part_, before, after, pred):
        return {"image_id": image_id, "class_a": x, "class_b": y, "part": part_, "kind": kind, "state": "s",
                "margin_before": before, "margin_after": after, "pred_after": pred}

    rows = [row(i, a, b, kind, part, 4.0, -1.0 if i < 3 else 1.0, b if i < 3 else a)
            for i in range(4) for kind in ("planted", "all_planted")]
    rows += [row(i, a, b, "control", "legs", 4.0, 3.5, a) for i in range(4)]
    rows += [row(10 + i, b, a, kind, part, 2.0, 1.25, b) for i in range(2) for kind in ("planted", "all_planted")]
    write_table(pd.DataFrame(rows), out / "counterfactuals.parquet", schema=tables.schema("counterfactuals"))
    pngs = {"a_original": _png((200, 10, 10)), "a_swap": _png((10, 200, 10)),
            "b_original": _png((10, 10, 200)), "b_swap": _png((200, 200, 10))}
    examples = pd.DataFrame([
        {"image_id": 0, "class_a": a, "class_b": b, "part": "", "kind": "original", "margin": 4.0, "pred": a,
         "png": pngs["a_original"]},
        {"image_id": 0, "class_a": a, "class_b": b, "part": part, "kind": "planted", "margin": -1.0, "pred": b,
         "png": pngs["a_swap"]},
        {"image_id": 10, "class_a": b, "class_b": a, "part": "", "kind": "original", "margin": 2.0, "pred": b,
         "png": pngs["b_original"]},
        {"image_id": 10, "class_a": b, "class_b": a, "part": part, "kind": "planted", "margin": 1.25, "pred": b,
         "png": pngs["b_swap"]},
    ])
    write_table(examples, out / "counterfactual_examples.parquet", schema=tables.schema("counterfactual_examples"))
    return pngs


def test_counterfactual_strip_shows_renders_margins_and_says_where_the_model_does_not_flip(fixture_tables, tmp_path):
    import base64
    import shutil

    from analysis.report import ReportTables, build_report

    results = tmp_path / "tiny"
    shutil.copytree(fixture_tables["results_dir"], results)
    pairs = pd.read_parquet(results / "lookalike_pairs.parquet")
    a, b, part = int(pairs["class_a"][0]), int(pairs["class_b"][0]), str(pairs["differing_parts"][0][0])
    pngs = _counterfactual_tables(results / "intr", a, b, part)
    page = build_report(ReportTables.under(results, fixture_tables["methods"]), fixture_tables["root"],
                        fixture_tables["config"], tmp_path / "r.html", progress=False).read_text()
    pairs_html = _section(page, "pairs", "traits")
    for png in pngs.values():  # the renders as stored, beside the ranked regions
        assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in pairs_html
    text = " ".join(_text(pairs_html).split())
    names = fixture_tables["names"]
    assert "margin 4.00" in text and "margin -1.00 (-5.00)" in text    # A -> B: the swap turns the margin
    assert "margin 2.00" in text and "margin 1.25 (-0.75)" in text     # B -> A: it only lowers it
    assert f"3 of 4 images of {names[a]} (75%) are predicted {names[b]}" in text
    assert text.count("The model does not flip") == 1
    assert f"only 0 of 2 images of {names[b]} (0%) are predicted {names[a]}" in text
    assert f"{part} 75% 4.50" in text                                   # the planted part: flip share, margin drop
    assert re.search(rf"{part} 4.50 ?, legs 0.50", text)                # the model-causal ranking of A -> B's parts
    assert "Counterfactual:" not in _text(_section(page, "answer", "pairs"))


def test_report_without_counterfactual_tables_has_no_strip_and_no_note(report_html):
    """Data other than synthetic has no renders: nothing is drawn and no table is reported missing."""
    text = _text(report_html)
    assert "Counterfactual:" not in text and "counterfactuals.parquet" not in text
    assert "data:image/png" not in _section(report_html, "pairs", "traits")
