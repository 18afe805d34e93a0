"""``intr``: one sub-command per pipeline stage.

Each sub-command parses its arguments and calls one plain Python function, so
every stage is usable without Snakemake and without this CLI.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Sequence


def _add_config_options(parser: argparse.ArgumentParser, reads: str) -> None:
    """--config FILE or --config-json JSON: the one way options reach a sub-command.

    Args:
        parser: the sub-command's parser.
        reads: which part of the config the sub-command reads (for --help).
    """
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="FILE",
                       help=f"workflow config (YAML); {reads} is read, checked against the schema, "
                       "missing keys at their defaults (config/README.md)")
    where.add_argument("--config-json", dest="config_json", metavar="JSON",
                       help="the same as JSON text, e.g. '{\"extract\": {\"split\": \"val\"}}' (the "
                       "workflow's rules pass their sections this way)")


def _config(args: argparse.Namespace) -> dict:
    """The workflow config of --config or --config-json, validated, every missing key at its default.

    Args:
        args: the parsed arguments of a sub-command built with _add_config_options (neither flag: all defaults).
    """
    from analysis.config import ConfigError, parse_config_json, read_config, validated

    try:
        if args.config:
            return validated(read_config(args.config))
        return validated(parse_config_json(args.config_json) if args.config_json else {})
    except ConfigError as err:
        raise SystemExit(f"intr {args.command}: {err}") from err


def _config_section(args: argparse.Namespace, name: str) -> dict:
    """Section ``name`` of the sub-command's config (see _config).

    Args:
        args: the parsed arguments.
        name: a top-level key of the config schema.
    """
    return _config(args)[name]


def _check_writable(command: str, path: str | Path, folder: bool) -> None:
    """Stop with one line naming ``path`` unless the sub-command can write there (run before any compute).

    Creates the folder (or the file's folder) when missing and writes and removes a temporary file in it,
    so a read-only folder, a file where a folder belongs (or the reverse) fails now, not after an epoch.

    Args:
        command: the sub-command (for the message).
        path: the output folder, or the output file.
        folder: whether ``path`` is a folder (else a file, whose parent folder is checked).
    """
    target = Path(path)
    where = target if folder else target.parent
    problem = None
    if folder and target.is_file():
        problem = "it is a file, not a folder; give a folder"
    elif not folder and target.is_dir():
        problem = "it is a folder; give a file name"
    blocking = next((p for p in (where, *where.parents) if p.exists()), None)
    if problem is None and blocking is not None and not blocking.is_dir():
        problem = f"{blocking} is a file, not a folder"
    if problem is None:
        try:
            where.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=where, prefix=".intr-write-test-"):
                pass
        except OSError as err:
            problem = f"{err.strerror or err} in {where}; make it writable or choose another output"
    if problem:
        raise SystemExit(f"intr {command}: cannot write the output {target}: {problem}")


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
    _check_writable(args.command, args.out, folder=True)
    from intr.data.synthetic import SyntheticConfig, synthesize

    if args.recipe and (args.config or args.config_json):
        raise SystemExit("intr synthesize: give --recipe or a config, not both")
    if args.recipe:  # the pretraining species: the recipe's data section, not a workflow config
        from intr.pretrain import load_recipe

        options = dict(load_recipe(args.recipe)["data"])
    else:
        options = _config_section(args, "synthetic")
    config_workers = options.pop("workers", 1)
    workers = args.workers or config_workers
    try:
        config = SyntheticConfig.from_dict(options)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"intr synthesize: {err}") from err
    summary = synthesize(config, Path(args.out), workers=workers, progress=not args.quiet)
    print(f"wrote {summary['images']} images of {summary['species']} species "
          f"({summary['genera']} genera) to {args.out}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    _check_writable(args.command, args.out, folder=True)
    from intr.data.prepare import PrepareError, prepare_dataset

    options = _config_section(args, "dataset")
    try:
        summary = prepare_dataset(
            kind=options["kind"],
            root=Path(args.root),
            out=Path(args.out),
            val_fraction=options["val_fraction"],
            max_reject_fraction=options["max_reject_fraction"],
            seed=options["seed"],
            taxonomy=Path(options["taxonomy"]) if options["taxonomy"] else None,
            workers=args.workers,
            progress=not args.quiet,
        )
    except PrepareError as err:
        print(f"intr prepare: error: {err}", file=sys.stderr)
        return 1
    print(summary.describe())
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    _check_writable(args.command, args.out, folder=False)
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


def _cmd_train(args: argparse.Namespace) -> int:
    _check_writable(args.command, args.out, folder=True)
    from intr.train import TrainingDiverged, train

    section = _config_section(args, args.method)
    if section["pretrained_model"]:
        return _convert_published(args, section)
    if args.backbone_checkpoint:
        section["model"]["backbone"]["checkpoint"] = str(Path(args.backbone_checkpoint).resolve())
    _set_threads(args.threads)
    try:
        result = train(args.method, section["model"], section["train"], Path(args.manifest), Path(args.root),
                       Path(args.out), image_size=section["image_size"], progress=not args.quiet)
    except (TrainingDiverged, ValueError, FileNotFoundError) as err:
        print(f"intr train: error: {err}", file=sys.stderr)
        return 1
    print(f"{args.method}: best val acc {result['best_val_acc']:.3f} at epoch {result['best_epoch']} "
          f"-> {args.out}/model.pt")
    return 0


def _convert_published(args: argparse.Namespace, section: dict) -> int:
    """``intr train`` with ``pretrained_model`` set: convert the released checkpoint, train nothing."""
    from intr.models.published import convert_published

    _set_threads(args.threads)
    path = convert_published(args.method, section["model"], section["pretrained_model"], Path(args.manifest),
                             Path(args.out), image_size=section["image_size"])
    print(f"{args.method}: converted the published checkpoint {section['pretrained_model']} -> {path} "
          "(no training; train_log.parquet has no epochs)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    for out in (args.out, args.probe_out):
        if out:
            _check_writable(args.command, out, folder=False)
    from intr.evaluate import evaluate_model

    options = _config_section(args, "extract")
    _set_threads(args.threads)
    table = evaluate_model(Path(args.model), Path(args.manifest), Path(args.root), Path(args.out),
                           split=options["split"], batch_size=options["batch_size"], device=options["device"],
                           probe_out=Path(args.probe_out) if args.probe_out else None, progress=not args.quiet)
    with_ci = table.assign(ci=lambda t: t.apply(lambda r: f"[{r.ci_lo:.3f}, {r.ci_hi:.3f}]", axis=1))
    print(with_ci[["method", "metric", "split", "value", "ci", "n"]].to_string(index=False, float_format="%.3f"))
    return 0


def _cmd_evaluation(args: argparse.Namespace) -> int:
    _check_writable(args.command, args.out, folder=False)
    from intr.evaluate import gather_evaluation

    table = gather_evaluation(args.inputs, Path(args.out))
    print(f"evaluation: {len(table)} rows from {len(args.inputs)} table(s) -> {args.out}")
    return 0


EXTRACT_KEYS = ("split", "batch_size", "top_heads", "siblings_k", "regions", "region_radius", "region_cells",
                "blur_sigma", "occlusion", "region_fill", "contrast_images", "device")


def _cmd_extract(args: argparse.Namespace) -> int:
    _check_writable(args.command, args.out, folder=True)
    from intr.extract import extract

    _set_threads(args.threads)
    options = {k: v for k, v in _config_section(args, "extract").items() if k in EXTRACT_KEYS}
    paths = extract(Path(args.model), Path(args.manifest), Path(args.root), Path(args.out),
                    parts=args.parts, discovered_parts=args.discovered_parts, workers=args.workers, limit=args.limit,
                    only=args.tables.split(",") if args.tables else None, progress=not args.quiet, **options)
    print(f"extract: {len(paths)} tables -> {args.out}")
    return 0


def _cmd_discover(args: argparse.Namespace) -> int:
    _check_writable(args.command, args.out, folder=False)
    from intr.discover import discover_parts

    _set_threads(args.threads)
    config = _config(args)
    extract = config["extract"]
    path = discover_parts(Path(args.model), Path(args.manifest), Path(args.root), Path(args.out),
                          split=extract["split"], batch_size=extract["batch_size"], device=extract["device"],
                          **config["discovery"])
    from analysis.tables import read_metadata

    meta = read_metadata(path)
    print(f"discover: {meta['k']} parts ({meta['k_criterion']}) -> {path}")
    return 0


def _cmd_faithfulness(args: argparse.Namespace) -> int:
    for out in (args.out_maps, args.out_metrics):
        _check_writable(args.command, out, folder=False)
    from intr.faithfulness import run_faithfulness

    _set_threads(args.threads)
    options = _config_section(args, "extract")
    table = run_faithfulness(
        Path(args.model), Path(args.manifest), Path(args.root), Path(args.out_maps), Path(args.out_metrics),
        attention=Path(args.attention),
        split=options["split"], top_heads=options["top_heads"], images=options["faithfulness_images"],
        steps=options["faithfulness_steps"], blur_sigma=options["blur_sigma"], occlusion=options["occlusion"],
        batch_size=options["batch_size"], device=options["device"],
        probe=Path(args.probe) if args.probe else None, progress=not args.quiet)
    print(table.to_string(index=False, float_format="%.3f"))
    return 0


def _cmd_counterfactual(args: argparse.Namespace) -> int:
    _check_writable(args.command, args.out, folder=False)
    from intr.counterfactual import run_counterfactuals

    _set_threads(args.threads)
    config = _config(args)
    extract = config["extract"]
    try:
        table = run_counterfactuals(Path(args.model), Path(args.manifest), Path(args.root), Path(args.out),
                                    images_per_pair=config["counterfactual"]["images_per_pair"],
                                    split=extract["split"], batch_size=extract["batch_size"],
                                    device=extract["device"], synthetic=config["synthetic"],
                                    examples_out=Path(args.examples_out) if args.examples_out else None)
    except ValueError as err:
        print(f"intr counterfactual: error: {err}", file=sys.stderr)
        return 1
    flips = (table["pred_after"] == table["class_b"]).groupby(table["kind"]).mean()
    print(f"counterfactual: {len(table)} rows -> {args.out}; prediction becomes B: "
          + ", ".join(f"{kind} {share:.3f}" for kind, share in flips.items()))
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    _check_writable(args.command, args.out, folder=True)
    from dataclasses import fields

    from analysis.pipeline import ANALYSIS_EXTRACT_KEYS, AnalysisInputs, analyze

    config = _config(args)
    options = {**config["analysis"], **{k: config["extract"][k] for k in ANALYSIS_EXTRACT_KEYS}}
    # One flag per AnalysisInputs field (--head-ranks -> head_ranks); optional ones may be omitted.
    given = {f.name: Path(getattr(args, f.name)) for f in fields(AnalysisInputs) if getattr(args, f.name) is not None}
    table = analyze(AnalysisInputs(**given), Path(args.out), options, progress=not args.quiet)
    print(table.to_string(index=False, float_format="%.3f"))
    return 0


def _method_tables(method_args: list[list[str]]) -> dict[str, dict[str, Path]]:
    """--method NAME TABLE=PATH ... (repeated) as {method: {table: path}}, in the order given.

    Args:
        method_args: the values of each --method flag.
    """
    methods: dict[str, dict[str, Path]] = {}
    for name, *pairs in method_args:
        tables = methods.setdefault(name, {})
        for pair in pairs:
            table, sep, path = pair.partition("=")
            if not sep or not table or not path:
                raise SystemExit(f"intr report: --method {name}: expected TABLE=PATH, got {pair!r}")
            tables[table] = Path(path)
    return methods


def _cmd_report(args: argparse.Namespace) -> int:
    _check_writable(args.command, args.out, folder=False)
    from analysis.report import ReportTables, build_report

    config = _config(args)
    tables = ReportTables(manifest=Path(args.manifest), parts=Path(args.parts) if args.parts else None,
                          lookalike_pairs=Path(args.lookalike_pairs) if args.lookalike_pairs else None,
                          methods=_method_tables(args.method))
    out = build_report(tables, Path(args.root), config, Path(args.out), progress=not args.quiet)
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
    _add_config_options(syn, "its 'synthetic' section")
    syn.add_argument("--recipe", help="render the pretraining species of this backbone recipe's data section "
                     "(intr/configs/pretrain_synthetic_vit.yaml) instead of the config's synthetic section")
    syn.add_argument("--workers", type=int,
                     help="worker processes (default: the config's synthetic.workers; output does not depend on it)")
    syn.add_argument("--quiet", action="store_true", help="no progress bar")
    syn.set_defaults(func=_cmd_synthesize)

    prep = sub.add_parser(
        "prepare",
        help="read a data set into manifest/parts/rejected Parquet tables",
        description="Decode every image once and write manifest.parquet, parts.parquet, "
        "rejected.parquet (and class_attributes.parquet, planted_traits.parquet, "
        "lookalike_pairs.parquet where the data has them) into --out.",
    )
    prep.add_argument("--root", required=True, help="data set root folder")
    prep.add_argument("--out", required=True, help="folder for the tables")
    _add_config_options(prep, "its 'dataset' section")
    prep.add_argument("--workers", type=int, default=1, help="decoding processes")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(func=_cmd_prepare)

    pre = sub.add_parser(
        "pretrain",
        help="train the small backbone of the embedded default on the pretraining species",
        description="Train the recipe's timm ViT from scratch on the synthetic pretraining set "
        "(intr synthesize --recipe RECIPE, then intr prepare) and save its weights without classifier.",
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
        help="train Prompt-CAM or INTR (resumable; torchrun for several GPUs), or convert a published "
        "checkpoint",
        description="Train a method on the manifest's train split, validating on val. Rerunning the "
        "same command resumes from the last epoch checkpoint. Several GPUs: "
        "torchrun --nproc_per_node N -m intr.cli train ... When the method's section sets "
        "pretrained_model (a checkpoint released with the paper's code), that file is converted into "
        "model.pt instead, and nothing is trained.",
    )
    tr.add_argument("--method", required=True, choices=["prompt_cam", "intr"])
    _add_config_options(tr, "the section named after --method")
    tr.add_argument("--backbone-checkpoint", dest="backbone_checkpoint",
                    help="override the backbone's weights file (e.g. a freshly pretrained one)")
    tr.add_argument("--manifest", required=True, help="manifest.parquet from intr prepare")
    tr.add_argument("--root", required=True, help="data set root")
    tr.add_argument("--out", required=True, help="output folder (model.pt, train_log.parquet, checkpoints/)")
    _add_run_options(tr)
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser(
        "evaluate",
        help="accuracy of a trained model and of a linear probe on its frozen backbone",
        description="Write metrics_model.parquet: top1/top5 of the model and top1 of a linear probe of its "
        "frozen backbone (the planted-part scores come from intr analyze, on the extracted tables).",
    )
    _add_model_inputs(ev, "manifest.parquet")
    ev.add_argument("--out", required=True, help="metrics table to write")
    ev.add_argument("--probe-out", dest="probe_out",
                    help="also write the fitted linear probe here (linear_probe.pt, for intr faithfulness --probe)")
    _add_config_options(ev, "its 'extract' section (split, batch_size, device)")
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
        "attention.parquet, head_ranks.parquet, pair_head_ranks.parquet, region_effects.parquet, "
        "trait_features.parquet and "
        "lookalikes.parquet into --out (layouts in docs/tables.md).",
    )
    _add_model_inputs(ex, "manifest.parquet")
    ex.add_argument("--out", required=True, help="output folder")
    ex.add_argument("--parts", help="parts.parquet: the regions with extract.regions 'annotated' (else unread)")
    ex.add_argument("--discovered-parts", dest="discovered_parts",
                    help="discovered_parts.parquet: the regions with extract.regions 'discovered'")
    _add_config_options(ex, "its 'extract' section")
    ex.add_argument("--workers", type=int, default=0, help="image-decoding processes")
    ex.add_argument("--limit", type=int, help="only the first N images (benchmarks)")
    ex.add_argument("--tables", help="comma-separated tables to write (default: all); e.g. region_effects alone, "
                    "which a second job can write beside the others (the workflow does)")
    _add_run_options(ex)
    ex.set_defaults(func=_cmd_extract)

    di = sub.add_parser(
        "discover",
        help="learn a part vocabulary from the images and the model (no part labels) and label every patch",
        description="Fit k parts plus background on a sample of training images (backbone patch features, "
        "foreground voted by the model's class attention) and write discovered_parts.parquet: every image of "
        "extract's split, its part label per patch cell (docs/tables.md). Reads no parts, masks or boxes.",
    )
    _add_model_inputs(di, "manifest.parquet (only image paths and splits are read)")
    di.add_argument("--out", required=True, help="discovered_parts.parquet to write")
    _add_config_options(di, "its 'discovery' section (and extract's split, batch_size, device)")
    _add_run_options(di)
    di.set_defaults(func=_cmd_discover)

    fa = sub.add_parser(
        "faithfulness",
        help="insertion/deletion AUC of the model's maps and of CAM baselines on the same backbone",
        description="Write baseline_maps.parquet (the model's top-heads map, Grad-CAM, Layer-CAM, "
        "Eigen-CAM of a linear probe on the frozen backbone, attention rollout) and "
        "metrics_faithfulness.parquet (insertion_auc, deletion_auc per method, RISE's blur; with "
        "extract.occlusion other than blur also insertion_auc_<operator>, deletion_auc_<operator>).",
    )
    _add_model_inputs(fa, "manifest.parquet")
    fa.add_argument("--attention", required=True,
                    help="attention.parquet from intr extract for the same model and split (the model's maps)")
    fa.add_argument("--out-maps", dest="out_maps", required=True, help="baseline_maps.parquet to write")
    fa.add_argument("--out-metrics", dest="out_metrics", required=True, help="metrics table to write")
    fa.add_argument("--probe", help="linear_probe.pt from intr evaluate --probe-out for the same model.pt "
                    "(the probe the CAMs explain); without it the probe is fitted here, the same way")
    _add_config_options(fa, "its 'extract' section")
    _add_run_options(fa)
    fa.set_defaults(func=_cmd_faithfulness)

    cf = sub.add_parser(
        "counterfactual",
        help="re-render test images with one part swapped to a look-alike's state and score the model (synthetic data)",
        description="Write counterfactuals.parquet: every correctly classified image of species A (the first "
        "counterfactual.images_per_pair per look-alike pair) re-rendered by the generator with the same nuisance "
        "and a part set to look-alike B's state (planted, all_planted) or to a state from another genus (control), "
        "with the logit margin A - B before and after and the prediction after (docs/tables.md).",
    )
    _add_model_inputs(cf, "manifest.parquet of the synthetic data set")
    cf.add_argument("--out", required=True, help="counterfactuals.parquet to write")
    cf.add_argument("--examples-out", dest="examples_out",
                    help="counterfactual_examples.parquet to write: the renders of each pair's first image (PNG), "
                    "which the report shows")
    _add_config_options(cf, "its 'counterfactual' section (and extract's split, batch_size, device)")
    _add_run_options(cf)
    cf.set_defaults(func=_cmd_counterfactual)

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
    an.add_argument("--pair-head-ranks", dest="pair_head_ranks",
                    help="pair_head_ranks.parquet (the pair_attention score of the contrasts)")
    an.add_argument("--trait-features", dest="trait_features", help="trait_features.parquet")
    an.add_argument("--baseline-maps", dest="baseline_maps", help="baseline_maps.parquet (CAM baselines)")
    an.add_argument("--manifest", required=True, help="manifest.parquet")
    an.add_argument("--parts", help="parts.parquet (without it: grid-cell regions)")
    an.add_argument("--lookalike-pairs", dest="lookalike_pairs", help="lookalike_pairs.parquet (planted parts)")
    an.add_argument("--class-attributes", dest="class_attributes", help="class_attributes.parquet (CUB)")
    an.add_argument("--counterfactuals", help="counterfactuals.parquet (synthetic data: flip-rate scores)")
    an.add_argument("--discovered-parts", dest="discovered_parts",
                    help="discovered_parts.parquet (the regions with extract.regions 'discovered')")
    an.add_argument("--root", required=True, help="data set root (part masks)")
    an.add_argument("--out", required=True, help="output folder")
    _add_config_options(an, "its 'analysis' section (and extract's regions, region_radius, region_cells, "
                           "contrast_images)")
    an.add_argument("--quiet", action="store_true", help="no progress bar")
    an.set_defaults(func=_cmd_analyze)

    rp = sub.add_parser(
        "report",
        help="the self-contained HTML trait report",
        description="Build report.html from the results of one data set and its methods.",
    )
    rp.add_argument("--manifest", required=True, help="manifest.parquet")
    rp.add_argument("--parts", help="parts.parquet")
    rp.add_argument("--lookalike-pairs", dest="lookalike_pairs", help="lookalike_pairs.parquet (where the data has it)")
    rp.add_argument("--method", nargs="+", action="append", required=True, metavar="NAME TABLE=PATH",
                    help="a method to report and its tables by name (file stems of docs/tables.md), e.g. "
                    "--method prompt_cam attention=results/x/prompt_cam/attention.parquet evaluation=...; "
                    "repeat per method; a table not given drops what needs it, with a note")
    rp.add_argument("--root", required=True, help="data set root (exemplar images)")
    _add_config_options(rp, "the whole config (shown in the report; its 'report' section sets it)")
    rp.add_argument("--out", required=True, help="report.html to write")
    rp.add_argument("--quiet", action="store_true", help="no progress bar")
    rp.set_defaults(func=_cmd_report)
    return parser


class _NothingRaisesThis(Exception):
    """Stands in for CheckpointError in a run that read no checkpoint."""


def _checkpoint_error() -> type[Exception]:
    """CheckpointError where a checkpoint was read (its module is loaded): found so, the CLI does not import torch."""
    module = sys.modules.get("intr.models.checkpoint")
    return module.CheckpointError if module is not None else _NothingRaisesThis


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _checkpoint_error() as err:  # damaged, unsafe or other classes' checkpoint: one line, no traceback
        print(f"intr {args.command}: error: {err}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:  # a missing input (model.pt, a table, the data root): name it
        missing = err.filename or str(err)
        print(f"intr {args.command}: error: {missing}: no such file (check the path, or run the stage that "
              f"writes it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
