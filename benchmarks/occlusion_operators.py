"""Which occlusion operator's region effects follow the model? Scored against counterfactual renders.

    python benchmarks/occlusion_operators.py --results results/synthetic --threads 1
    python benchmarks/occlusion_operators.py --results /work/heldout/results/heldout_s1 --json-out occl.json

For each method with ``{method}/model.pt`` and ``{method}/counterfactuals.parquet``
(``intr counterfactual``) under ``--results``, and each operator of
``intr.occlusion.OPERATORS``, and the pair fill ``lookalike`` (the default
``extract.region_fill``: each part filled with look-alike B's mean colour of it
over the listed images, ``intr.occlusion.LookalikeFill``): the annotated-part region effects
(``intr.extract.region_effects``, the extraction's own code) of every original
image the counterfactual table lists, against each look-alike B it lists for
that image.  Per directed pair (A, B) the parts are ranked by mean margin drop
(A - B) under occlusion, and compared with the model-causal ranking: the mean
margin drop when that part alone is re-rendered in B's state (``planted``) or
in a state of another genus (``control``), ``analysis.counterfactual.pair_part_effects``.

* ``top1``: share of pairs whose largest occlusion effect, among the parts
  with counterfactual rows, is the part with the largest counterfactual effect;
* ``top1_all_regions``: the same with every annotated region (body, legs and
  background too) competing for the occlusion top;
* ``spearman``: mean over pairs of the rank correlation of the two rankings
  over the parts with counterfactual rows.

``--json-out`` writes the table and, per operator and pair, the two top parts
and the pair's rank correlation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHODS = ("prompt_cam", "intr")
LOOKALIKE = "lookalike"  # the pair fill, extract.region_fill's default, beside the operators


def counterfactual_ranking(counterfactuals: pd.DataFrame) -> pd.DataFrame:
    """(class_a, class_b, part, cf_drop): single-part swaps' mean margin drop per directed pair."""
    from analysis.counterfactual import pair_part_effects

    effects = pair_part_effects(counterfactuals)
    single = effects[effects["kind"].isin(["planted", "control"])]
    return single.rename(columns={"mean_margin_drop": "cf_drop"})[["class_a", "class_b", "part", "cf_drop"]]


def occlusion_effects(model, data, rows: pd.DataFrame, source, siblings: dict[int, list[int]],
                      occlusion, size: int, batch_size: int, lookalike=None) -> pd.DataFrame:
    """(image_id, class_a, class_b, region, margin_drop) of every listed image under ``occlusion``
    (or the pair fill ``lookalike``)."""
    import torch

    from analysis import regions as reg
    from intr.extract import region_effects

    out = []
    for start in range(0, len(rows), batch_size):
        idx = list(range(start, min(start + batch_size, len(rows))))
        images = torch.stack([data[i][0] for i in idx])
        labels = data.labels[idx]
        ids = rows["image_id"].to_numpy()[idx]
        with torch.no_grad():
            logits = model(images).float()
        masks = [reg.region_masks(source.labels(i, size), len(source.vocab)) for i in idx]
        eff = region_effects(model, images, labels, logits, masks, [siblings[int(i)] for i in ids],
                             source.vocab, occlusion, chunk=4 * batch_size, lookalike=lookalike)
        if eff:
            out.append(pd.DataFrame({"image_id": ids[eff["image"]], "class_a": labels.numpy()[eff["image"]],
                                     "class_b": eff["class_b"], "region": eff["region"],
                                     "margin_drop": eff["margin_drop"]}))
    return pd.concat(out, ignore_index=True)


def agreement(occluded: pd.DataFrame, causal: pd.DataFrame) -> tuple[dict[str, float], list[dict]]:
    """top1, top1_all_regions and mean Spearman of occlusion vs counterfactual rankings over pairs.

    Returns:
        (the figures, one dict per pair: class_a, class_b, the two top parts and rho).
    """
    from scipy.stats import spearmanr

    drops = occluded.groupby(["class_a", "class_b", "region"], as_index=False)["margin_drop"].mean()
    top1, top1_all, rhos, pairs = [], [], [], []
    for (a, b), cf in causal.groupby(["class_a", "class_b"]):
        occ = drops[(drops["class_a"] == a) & (drops["class_b"] == b)].set_index("region")["margin_drop"]
        cf = cf.set_index("part")["cf_drop"]
        parts = [p for p in cf.index if p in occ.index]
        if len(parts) < 2:
            continue
        best_cf = cf[parts].idxmax()
        top1.append(occ[parts].idxmax() == best_cf)
        top1_all.append(occ.idxmax() == best_cf)
        rho = spearmanr(occ[parts].to_numpy(), cf[parts].to_numpy()).statistic
        if np.isfinite(rho):
            rhos.append(rho)
        pairs.append({"class_a": int(a), "class_b": int(b), "counterfactual_top": best_cf,
                      "occlusion_top": occ[parts].idxmax(), "rho": float(rho)})
    figures = {"pairs": len(top1), "top1": float(np.mean(top1)), "top1_all_regions": float(np.mean(top1_all)),
               "spearman": float(np.mean(rhos)) if rhos else float("nan")}
    return figures, pairs


def score_method(results: Path, method: str, operators: list[str], blur_sigma: float,
                 batch_size: int) -> tuple[list[dict], list[dict]]:
    """One row per operator (agreement figures, seconds) and one per operator and pair, for one method."""
    from analysis import regions as reg
    from intr.data.images import ImageSet
    import torch
    from torch.utils.data import DataLoader

    from intr.extract import IndexedImages, RegionSource, lookalike_colours
    from intr.models import load_model
    from intr.occlusion import Occlusion

    manifest = results / "manifest.parquet"
    model, config = load_model(results / method / "model.pt", map_location="cpu", manifest=manifest)
    model.eval()
    counterfactuals = pd.read_parquet(results / method / "counterfactuals.parquet")
    causal = counterfactual_ranking(counterfactuals)
    listed = counterfactuals[["image_id", "class_b"]].drop_duplicates()
    siblings = listed.groupby("image_id")["class_b"].apply(lambda s: sorted(s.tolist())).to_dict()
    full = pd.read_parquet(manifest)
    rows = full[full["image_id"].isin(siblings)].sort_values("image_id").reset_index(drop=True)
    root = results / "data"
    size = int(config["image_size"])
    data = ImageSet(root, rows, size, config["normalization"]["mean"], config["normalization"]["std"])
    source = RegionSource.load("annotated", rows, root, results / "parts.parquet", None, reg.DEFAULT_RADIUS,
                               reg.DEFAULT_CELLS)
    table, per_pair = [], []
    for operator in operators:
        start = time.perf_counter()
        lookalike = None
        if operator == LOOKALIKE:
            loader = DataLoader(IndexedImages(data), batch_size=batch_size, shuffle=False)
            lookalike = lookalike_colours(loader, source, size, int(config["num_classes"]), torch.device("cpu"),
                                          progress=False)
        occlusion = Occlusion("mean_fill" if operator == LOOKALIKE else operator, blur_sigma)
        occluded = occlusion_effects(model, data, rows, source, siblings, occlusion, size, batch_size, lookalike)
        figures, pairs = agreement(occluded, causal)
        table.append({"method": method, "operator": operator, "images": len(rows), **figures,
                      "seconds": round(time.perf_counter() - start, 1)})
        per_pair += [{"method": method, "operator": operator, **pair} for pair in pairs]
    return table, per_pair


def main(argv: list[str] | None = None) -> int:
    from intr.occlusion import OPERATORS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True,
                        help="results/{dataset}: manifest, parts, data/ and {method}/model.pt, counterfactuals")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--operators", nargs="+", default=[*OPERATORS, LOOKALIKE], choices=[*OPERATORS, LOOKALIKE])
    parser.add_argument("--blur-sigma", type=float, default=0.05, help="the blur operator's sigma (side fraction)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-out", type=Path, help="write the table as JSON here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    table, per_pair = [], []
    for method in args.methods:
        if not (args.results / method / "counterfactuals.parquet").exists():
            print(f"{method}: no counterfactuals.parquet under {args.results / method}; skipped", file=sys.stderr)
            continue
        rows, pairs = score_method(args.results, method, args.operators, args.blur_sigma, args.batch_size)
        table += rows
        per_pair += pairs
    frame = pd.DataFrame(table)
    print(f"occlusion vs counterfactual ranking, {args.results}")
    print(frame.to_string(index=False, float_format="%.3f"))
    if args.json_out:
        args.json_out.write_text(json.dumps({"results": str(args.results), "rows": table,
                                              "pairs": per_pair}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
