"""``intr``: one sub-command per pipeline stage.

Each sub-command parses its arguments and calls one plain Python function, so
every stage is usable without Snakemake and without this CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import yaml


def _load_section(path: str | None, section: str) -> dict:
    """Read ``section`` of a YAML file (or the whole file when it has no such key).

    ``section`` may name alternatives, ``"synthetic|data"``: the first present wins.
    """
    if not path:
        return {}
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"intr: config file not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"intr: config file {p} must hold a mapping")
    for name in section.split("|"):
        if name in data:
            return dict(data[name])
    return dict(data)


def _set_threads(threads: int | None) -> None:
    """Torch CPU threads for a network stage (None: torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """--threads and --quiet, shared by the stages that run a network."""
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_model_inputs(parser: argparse.ArgumentParser, manifest_help: str) -> None:
    """--model, --manifest, --root: what every stage that runs a trained model reads."""
    parser.add_argument("--model", required=True, help="model.pt from intr train")
    parser.add_argument("--manifest", required=True, help=manifest_help)
    parser.add_argument("--root", required=True, help="data set root")


def _cmd_synthesize(args: argparse.Namespace) -> int:
    from intr.data.synthetic import SyntheticConfig, synthesize

    options = _load_section(args.config, "synthetic|data")
    for key in ("genera", "species_per_genus", "images_per_species", "image_size",
                "seed", "train_fraction", "set"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    if args.class_names:
        options["class_names"] = args.class_names
    try:
        config = SyntheticConfig.from_dict(options)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"intr synthesize: {err}") from err
    summary = synthesize(config, Path(args.out), workers=args.workers, progress=not args.quiet)
    print(f"wrote {summary['images']} images of {summary['species']} species "
          f"({summary['genera']} genera) to {args.out}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from intr.data.prepare import PrepareError, prepare_dataset

    try:
        summary = prepare_dataset(
            kind=args.kind,
            root=Path(args.root),
            out=Path(args.out),
            val_fraction=args.val_fraction,
            max_reject_fraction=args.max_reject_fraction,
            seed=args.seed,
            taxonomy=Path(args.taxonomy) if args.taxonomy else None,
            workers=args.workers,
            progress=not args.quiet,
        )
    except PrepareError as err:
        print(f"intr prepare: error: {err}", file=sys.stderr)
        return 1
    print(summary.describe())
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from intr.pretrain import load_recipe, pretrain

    recipe = load_recipe(args.recipe)
    if args.epochs is not None:
        recipe["train"]["epochs"] = args.epochs
    _set_threads(args.threads)
    result = pretrain(Path(args.manifest), Path(args.root), Path(args.out), recipe,
                      log_path=Path(args.log) if args.log else None, progress=not args.quiet)
    from intr.models.backbones import sha256_of

    print(f"pretrained backbone -> {args.out} (sha256 {sha256_of(args.out)}): "
          f"train acc {result['train_acc']:.3f}, held-out acc {result['test_acc']:.3f}, "
          f"{result['minutes']:.1f} min")
    return 0


def _method_section(args: argparse.Namespace) -> dict:
    """The method's config section: from --section-json, else from --config's section."""
    import copy
    import json

    if args.section_json:
        section, where = json.loads(args.section_json), "--section-json"
    elif args.config:
        section, where = _load_section(args.config, args.method), args.config
    else:
        raise SystemExit("intr train: give --config FILE or --section-json JSON")
    for key in ("model", "train"):
        if key not in section:
            raise SystemExit(f"intr: {where}: section '{args.method}' needs a '{key}' key")
    section = copy.deepcopy(section)
    if args.backbone_checkpoint:
        section["model"]["backbone"]["checkpoint"] = str(Path(args.backbone_checkpoint).resolve())
    return section


def _cmd_train(args: argparse.Namespace) -> int:
    from intr.train import TrainingDiverged, train

    section = _method_section(args)
    options = dict(section["train"])
    if args.epochs is not None:
        options["epochs"] = args.epochs
    _set_threads(args.threads)
    try:
        result = train(args.method, section["model"], options, Path(args.manifest), Path(args.root),
                       Path(args.out), image_size=int(section.get("image_size", 224)), progress=not args.quiet)
    except (TrainingDiverged, ValueError, FileNotFoundError) as err:
        print(f"intr train: error: {err}", file=sys.stderr)
        return 1
    print(f"{args.method}: best val acc {result['best_val_acc']:.3f} at epoch {result['best_epoch']} "
          f"-> {args.out}/model.pt")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from intr.evaluate import evaluate_model

    _set_threads(args.threads)
    table = evaluate_model(Path(args.model), Path(args.manifest), Path(args.root), Path(args.out),
                           split=args.split, device=args.device, progress=not args.quiet)
    with_ci = table.assign(ci=lambda t: t.apply(lambda r: f"[{r.ci_lo:.3f}, {r.ci_hi:.3f}]", axis=1))
    print(with_ci[["method", "metric", "split", "value", "ci", "n"]].to_string(index=False, float_format="%.3f"))
    return 0


def _cmd_evaluation(args: argparse.Namespace) -> int:
    from intr.evaluate import gather_evaluation

    table = gather_evaluation(args.inputs, Path(args.out))
    print(f"evaluation: {len(table)} rows from {len(args.inputs)} table(s) -> {args.out}")
    return 0


def _section_json(text: str | None) -> dict:
    """A config section handed over as JSON by the workflow (empty: defaults)."""
    import json

    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"intr: --section-json is not valid JSON: {err}")
    if not isinstance(value, dict):
        raise SystemExit("intr: --section-json must hold a JSON object")
    return value


EXTRACT_KEYS = ("split", "batch_size", "top_heads", "siblings_k", "region_radius", "region_cells",
                "blur_sigma", "device")


def _cmd_extract(args: argparse.Namespace) -> int:
    from intr.extract import extract

    _set_threads(args.threads)
    options = {k: v for k, v in _section_json(args.section_json).items() if k in EXTRACT_KEYS}
    for key in ("split", "batch_size", "device"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    paths = extract(Path(args.model), Path(args.manifest), Path(args.root), Path(args.out),
                    workers=args.workers, limit=args.limit, progress=not args.quiet, **options)
    print(f"extract: {len(paths)} tables -> {args.out}")
    return 0


def _cmd_faithfulness(args: argparse.Namespace) -> int:
    from intr.faithfulness import run_faithfulness

    _set_threads(args.threads)
    options = _section_json(args.section_json)
    table = run_faithfulness(
        Path(args.model), Path(args.manifest), Path(args.root), Path(args.out_maps), Path(args.out_metrics),
        attention=Path(args.attention),
        split=options.get("split", "test"), top_heads=options.get("top_heads", 4),
        images=options.get("faithfulness_images", 300), steps=options.get("faithfulness_steps", 16),
        blur_sigma=options.get("blur_sigma", 0.05), batch_size=options.get("batch_size", 64),
        device=options.get("device", "auto"), progress=not args.quiet)
    print(table.to_string(index=False, float_format="%.3f"))
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from analysis.pipeline import AnalysisInputs, analyze

    # One flag per AnalysisInputs field (--head-ranks -> head_ranks); optional ones may be omitted.
    given = {f.name: Path(getattr(args, f.name)) for f in fields(AnalysisInputs) if getattr(args, f.name) is not None}
    inputs = AnalysisInputs(**given)
    table = analyze(inputs, Path(args.out), _section_json(args.section_json), progress=not args.quiet)
    print(table.to_string(index=False, float_format="%.3f"))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import build_report

    config = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    if args.config_json:
        config = _section_json(args.config_json)
    out = build_report(Path(args.results), Path(args.root), args.methods, config, Path(args.out),
                       progress=not args.quiet)
    print(f"report -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="intr",
        description="Fine-grained trait discovery with Prompt-CAM and INTR.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    syn = sub.add_parser(
        "synthesize",
        help="render the built-in synthetic bird data set (CUB_200_2011 layout)",
        description="Render procedurally drawn 'birds' whose look-alike species differ "
        "in known, planted parts. Output is in the CUB_200_2011 layout plus part masks, "
        "traits.csv and pairs.csv. The same options give byte-identical files.",
    )
    syn.add_argument("--out", required=True, help="output folder (the data set root)")
    syn.add_argument("--config", help="YAML file; its 'synthetic' section (or the whole file) sets defaults")
    syn.add_argument("--genera", type=int, help="number of genera (default 4)")
    syn.add_argument("--species-per-genus", dest="species_per_genus", type=int,
                     help="species per genus (default 3)")
    syn.add_argument("--images-per-species", dest="images_per_species", type=int,
                     help="images per species (default 100)")
    syn.add_argument("--image-size", dest="image_size", type=int, help="square image side in px (default 64)")
    syn.add_argument("--train-fraction", dest="train_fraction", type=float,
                     help="fraction of each species marked as training images (default 0.5)")
    syn.add_argument("--seed", type=int, help="random seed (default 0)")
    syn.add_argument("--set", choices=["target", "pretrain"],
                     help="'target' (default): the look-alike species to study; 'pretrain': "
                     "the larger, disjoint species set for backbone pretraining")
    syn.add_argument("--class-name", dest="class_names", action="append",
                     help="replace the next generated species name (repeatable; a class folder name: no '/')")
    syn.add_argument("--workers", type=int, default=1, help="worker processes (output does not depend on it)")
    syn.add_argument("--quiet", action="store_true", help="no progress bar")
    syn.set_defaults(func=_cmd_synthesize)

    prep = sub.add_parser(
        "prepare",
        help="read a data set into manifest/parts/rejected Parquet tables",
        description="Decode every image once and write manifest.parquet, parts.parquet, "
        "rejected.parquet (and class_attributes.parquet, planted_traits.parquet, "
        "lookalike_pairs.parquet where the data has them) into --out.",
    )
    prep.add_argument("--kind", required=True, choices=["cub", "imagefolder", "synthetic"],
                      help="data set layout")
    prep.add_argument("--root", required=True, help="data set root folder")
    prep.add_argument("--out", required=True, help="folder for the tables")
    prep.add_argument("--val-fraction", dest="val_fraction", type=float, default=0.1,
                      help="fraction of training images held out as 'val' (per class; default 0.1)")
    prep.add_argument("--max-reject-fraction", dest="max_reject_fraction", type=float, default=0.05,
                      help="stop with an error when more than this fraction of images is rejected")
    prep.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    prep.add_argument("--taxonomy", help="optional CSV with columns class_name,genus")
    prep.add_argument("--workers", type=int, default=1, help="decoding processes")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(func=_cmd_prepare)

    pre = sub.add_parser(
        "pretrain",
        help="train the small backbone of the embedded default on the pretraining species",
        description="Train the recipe's timm ViT from scratch on the synthetic pretraining set "
        "(intr synthesize --set pretrain, then intr prepare) and save its weights without classifier.",
    )
    pre.add_argument("--manifest", required=True, help="manifest.parquet of the prepared pretraining set")
    pre.add_argument("--root", required=True, help="root of the pretraining data set")
    pre.add_argument("--out", required=True, help="output weights file (.pt)")
    pre.add_argument("--recipe", help="recipe YAML (default: intr/configs/pretrain_synthetic_vit.yaml)")
    pre.add_argument("--epochs", type=int, help="override the recipe's epochs")
    pre.add_argument("--log", help="optional pretrain_log.parquet")
    _add_run_options(pre)
    pre.set_defaults(func=_cmd_pretrain)

    tr = sub.add_parser(
        "train",
        help="train Prompt-CAM or INTR (resumable; torchrun for several GPUs)",
        description="Train a method on the manifest's train split, validating on val. Rerunning the "
        "same command resumes from the last epoch checkpoint. Several GPUs: "
        "torchrun --nproc_per_node N -m intr.cli train ...",
    )
    tr.add_argument("--method", required=True, choices=["prompt_cam", "intr"])
    tr.add_argument("--config", help="YAML config with a section named after the method "
                    "(model: backbone..., train: optimiser..., image_size)")
    tr.add_argument("--section-json", dest="section_json", help="the method's section as JSON (instead of --config)")
    tr.add_argument("--backbone-checkpoint", dest="backbone_checkpoint",
                    help="override the backbone's weights file (e.g. a freshly pretrained one)")
    tr.add_argument("--manifest", required=True, help="manifest.parquet from intr prepare")
    tr.add_argument("--root", required=True, help="data set root")
    tr.add_argument("--out", required=True, help="output folder (model.pt, train_log.parquet, checkpoints/)")
    tr.add_argument("--epochs", type=int, help="override the config's epochs")
    _add_run_options(tr)
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser(
        "evaluate",
        help="accuracy, linear probe and the planted-part test of a trained model",
        description="Write metrics_model.parquet: top1/top5 of the model, a linear probe of its frozen "
        "backbone, and (on data with part masks) how often the top-ranked head's peak lands on the "
        "planted distinguishing part, beside chance, the best fixed head and the lowest-ranked head.",
    )
    _add_model_inputs(ev, "manifest.parquet (parts and pairs tables beside it)")
    ev.add_argument("--out", required=True, help="metrics table to write")
    ev.add_argument("--split", default="test", help="evaluation split (default test)")
    ev.add_argument("--device", default="auto", help="auto, cpu or cuda")
    _add_run_options(ev)
    ev.set_defaults(func=_cmd_evaluate)

    ga = sub.add_parser(
        "evaluation",
        help="gather a method's metric tables into evaluation.parquet",
        description="Concatenate metric tables (same columns: method, metric, split, value, ci_lo, "
        "ci_hi, n) into one evaluation.parquet.",
    )
    ga.add_argument("inputs", nargs="*", help="metric tables")
    ga.add_argument("--out", required=True, help="evaluation.parquet to write")
    ga.set_defaults(func=_cmd_evaluation)

    ex = sub.add_parser(
        "extract",
        help="write a trained model's predictions, attention maps, head ranks, region effects and trait features",
        description="Stream every image of the split through the model and write predictions.parquet, "
        "attention.parquet, head_ranks.parquet, region_effects.parquet, trait_features.parquet and "
        "lookalikes.parquet into --out (layouts in docs/tables.md).",
    )
    _add_model_inputs(ex, "manifest.parquet (parts.parquet beside it)")
    ex.add_argument("--out", required=True, help="output folder")
    ex.add_argument("--section-json", dest="section_json", help="the config's extract section as JSON")
    ex.add_argument("--split", help="split to extract (default test)")
    ex.add_argument("--batch-size", dest="batch_size", type=int, help="images per forward pass (default 64)")
    ex.add_argument("--device", help="auto, cpu or cuda")
    ex.add_argument("--workers", type=int, default=0, help="image-decoding processes")
    ex.add_argument("--limit", type=int, help="only the first N images (benchmarks)")
    _add_run_options(ex)
    ex.set_defaults(func=_cmd_extract)

    fa = sub.add_parser(
        "faithfulness",
        help="insertion/deletion AUC of the model's maps and of CAM baselines on the same backbone",
        description="Write baseline_maps.parquet (the model's top-heads map, Grad-CAM, Layer-CAM, "
        "Eigen-CAM of a linear probe on the frozen backbone, attention rollout) and "
        "metrics_faithfulness.parquet (insertion_auc, deletion_auc per method).",
    )
    _add_model_inputs(fa, "manifest.parquet")
    fa.add_argument("--attention", required=True,
                    help="attention.parquet from intr extract for the same model and split (the model's maps)")
    fa.add_argument("--out-maps", dest="out_maps", required=True, help="baseline_maps.parquet to write")
    fa.add_argument("--out-metrics", dest="out_metrics", required=True, help="metrics table to write")
    fa.add_argument("--section-json", dest="section_json", help="the config's extract section as JSON")
    _add_run_options(fa)
    fa.set_defaults(func=_cmd_faithfulness)

    an = sub.add_parser(
        "analyze",
        help="trait discovery on the extracted tables (no network): traits, regions, contrasts, scores",
        description="Read a method's extraction tables and write head_types, traits, trait_members, "
        "regions, contrasts and metrics_analysis tables into --out.",
    )
    an.add_argument("--attention", required=True, help="attention.parquet (every map, with its head rank)")
    an.add_argument("--predictions", required=True, help="predictions.parquet")
    an.add_argument("--head-ranks", dest="head_ranks", help="head_ranks.parquet (declared input; the ranks "
                    "are read from attention.parquet)")
    an.add_argument("--region-effects", dest="region_effects", help="region_effects.parquet (occlusion score)")
    an.add_argument("--trait-features", dest="trait_features", help="trait_features.parquet")
    an.add_argument("--baseline-maps", dest="baseline_maps", help="baseline_maps.parquet (CAM baselines)")
    an.add_argument("--manifest", required=True, help="manifest.parquet")
    an.add_argument("--parts", help="parts.parquet (without it: grid-cell regions)")
    an.add_argument("--lookalike-pairs", dest="lookalike_pairs", help="lookalike_pairs.parquet (planted parts)")
    an.add_argument("--class-attributes", dest="class_attributes", help="class_attributes.parquet (CUB)")
    an.add_argument("--root", required=True, help="data set root (part masks)")
    an.add_argument("--out", required=True, help="output folder")
    an.add_argument("--section-json", dest="section_json", help="the config's analysis options as JSON")
    an.add_argument("--quiet", action="store_true", help="no progress bar")
    an.set_defaults(func=_cmd_analyze)

    rp = sub.add_parser(
        "report",
        help="the self-contained HTML trait report",
        description="Build report.html from the results of one data set and its methods.",
    )
    rp.add_argument("--results", required=True, help="results/{dataset} folder")
    rp.add_argument("--root", required=True, help="data set root (exemplar images)")
    rp.add_argument("--methods", nargs="+", required=True, help="methods to report")
    rp.add_argument("--config", help="the workflow config YAML shown in the report")
    rp.add_argument("--config-json", dest="config_json", help="the workflow config as JSON (instead of --config)")
    rp.add_argument("--out", required=True, help="report.html to write")
    rp.add_argument("--quiet", action="store_true", help="no progress bar")
    rp.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
