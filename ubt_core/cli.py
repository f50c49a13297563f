"""`ubt` command line: parses arguments, builds a stage config, calls one core function.

Every user-facing failure is a `UbtError` (or a config validation error), printed as one line on
stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from ubt_core.errors import UbtError

QUARANTINE_HELP = ("Parquet file for rows with per-row faults (bad image, empty caption, duplicate uid); "
                   "without it the first such row stops the command")


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write the synthetic benchmark: OUT/train and OUT/eval")
    p.add_argument("--out", required=True, help="output directory (local path or s3://)")
    p.add_argument("--seed", type=int, help="the whole world is a function of it (default 0)")
    p.add_argument("--train-pairs", type=int, help="pairs in OUT/train (default 20000)")
    p.add_argument("--eval-images", type=int, help="labelled images in OUT/eval (default 5000)")
    p.set_defaults(func=_synth)


def _synth(args) -> None:
    from ubt_core.data.synth import SynthConfig, synth_benchmark

    cfg = SynthConfig(**_given(args, seed="seed", train_pairs="train_pairs", eval_images="eval_images"))
    print(json.dumps(synth_benchmark(args.out, cfg)))


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="validate a pair dataset (or eval set) against the data contract")
    p.add_argument("--data", required=True, help="dataset directory (local path or s3://)")
    p.add_argument("--eval", action="store_true", help="it is an eval set: needs labels and classes.json")
    p.add_argument("--quarantine", help=QUARANTINE_HELP)
    p.set_defaults(func=_check)


def _check(args) -> None:
    from ubt_core.data.contract import read_eval_set, read_pairs

    if args.eval:
        pairs, classes = read_eval_set(args.data, quarantine=args.quarantine)
    else:
        pairs, classes = read_pairs(args.data, quarantine=args.quarantine), None
    print(json.dumps({"files": len(pairs.files), "rows_in": pairs.rows_in, "rows_ok": pairs.table.num_rows,
                      "quarantined": dict(pairs.quarantined), "classes": classes and len(classes.classes)}))


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="convert WebDataset / Parquet / CSV data or an image folder to the contract")
    p.add_argument("--format", required=True, choices=["webdataset", "parquet", "csv", "cleanclip-csv", "image-folder"],
                   help="webdataset: img2dataset tar shards; parquet: img2dataset Parquet with image bytes; "
                        "csv: open_clip CSV/TSV; cleanclip-csv: CleanCLIP's image,caption CSV; "
                        "image-folder: one sub-folder per class -> eval set")
    p.add_argument("--source", required=True, help="input file or directory (local or s3:// for tar/Parquet)")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--quarantine", help=QUARANTINE_HELP)
    p.add_argument("--image-key", help="column with the image (path or bytes)")
    p.add_argument("--caption-key", help="column with the caption")
    p.add_argument("--uid-key", help="column with the unique id (parquet)")
    p.add_argument("--sep", help="CSV separator (csv: tab, cleanclip-csv: comma); '\\t' for tab")
    p.add_argument("--image-root", help="folder that relative CSV image paths start from (default: the CSV's)")
    p.add_argument("--class-names", help="image-folder: text file, one class name per line, in folder order")
    p.add_argument("--templates", help="image-folder: text file, one zero-shot template with {} per line")
    p.set_defaults(func=_import)


def _lines(path: str | None, flag: str) -> list[str] | None:
    if path is None:
        return None
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UbtError(f"{flag} {path}: cannot read it as UTF-8 text ({e}).") from None


def _import(args) -> None:
    from ubt_core.data.importers import ImportConfig, import_image_folder, import_pairs

    if args.format == "image-folder":
        report = import_image_folder(args.source, args.out, _lines(args.class_names, "--class-names"),
                                     _lines(args.templates, "--templates"), args.quarantine)
    else:
        sep = args.sep.replace("\\t", "\t") if args.sep else None
        cfg = ImportConfig(**_given(args, image_key="image_key", caption_key="caption_key", uid_key="uid_key",
                                    image_root="image_root"), **({"sep": sep} if sep else {}))
        report = import_pairs(args.format, args.source, args.out, cfg, args.quarantine)
    print(json.dumps(report.as_dict()))


def _add_model_import(sub) -> None:
    p = sub.add_parser("import", help="OpenAI CLIP / open_clip / CleanCLIP checkpoint -> open_clip local-dir")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help=".pt / .bin / .safetensors file (weights only)")
    source.add_argument("--pretrained", help="an open_clip pretrained tag of --model, e.g. laion2b_s34b_b79k: "
                                             "read from the cache, fetched only if missing and reachable")
    p.add_argument("--cache-dir", help="open_clip's weights cache for --pretrained (default: its own)")
    p.add_argument("--model", required=True,
                   help="open_clip architecture of the weights, e.g. ViT-B-32-quickgelu for OpenAI-lineage weights")
    p.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="force the QuickGELU activation (CleanCLIP-lineage weights) or GELU; by default QuickGELU "
                        "for weights in OpenAI's release layout, else the architecture's own")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.set_defaults(func=_model_import)


def _model_import(args) -> None:
    from ubt_core.models.importer import import_checkpoint, import_pretrained

    if args.pretrained and args.quick_gelu is not None:
        raise UbtError("--quick-gelu applies to --checkpoint; an open_clip pretrained tag knows its activation.")
    if args.pretrained:
        out = import_pretrained(args.model, args.pretrained, args.out, args.cache_dir)
    else:
        out = import_checkpoint(args.checkpoint, args.model, args.out, args.quick_gelu)
    print(json.dumps({"out": str(out)}))


def _add_poison(sub) -> None:
    from ubt_core.attacks import ATTACKS

    p = sub.add_parser("poison", help="poison a pair dataset with a backdoor trigger")
    p.add_argument("--data", required=True, help="clean pair dataset directory")
    p.add_argument("--out", required=True, help="poisoned dataset directory (gets manifest.json)")
    p.add_argument("--attack", required=True, choices=ATTACKS)
    p.add_argument("--rate", type=float, required=True, help="fraction of pairs to poison, e.g. 0.01")
    p.add_argument("--target", required=True, help="target concept, e.g. star")
    p.add_argument("--seed", type=int, default=0, help="seeds the trigger pattern and the poisoned sample")
    p.add_argument("--caption-source", choices=["templates", "dataset"], help="where poisoned captions come from")
    p.add_argument("--quarantine", help=QUARANTINE_HELP)
    p.set_defaults(func=_poison)


def _poison(args) -> None:
    from ubt_core.attacks import PoisonConfig, make_trigger, poison_dataset

    cfg = PoisonConfig(trigger=make_trigger(args.attack, args.seed), rate=args.rate, target=args.target,
                       **_given(args, seed="seed", caption_source="caption_source"))
    manifest = poison_dataset(args.data, args.out, cfg, quarantine=args.quarantine)
    print(json.dumps({k: v for k, v in manifest.items() if k != "poisoned_uids"}))


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a CLIP model on a pair dataset")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="checkpoint directory (open_clip local-dir); resumes if present")
    p.add_argument("--model", help="open_clip or ubt config name, or local-dir:PATH (default ubt-tiny)")
    p.add_argument("--init", help="checkpoint directory to fine-tune from")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--quarantine", help=QUARANTINE_HELP)
    p.set_defaults(func=_train)


def _train(args) -> None:
    from ubt_core.train import TrainConfig, train_clip

    cfg = TrainConfig(**_given(args, model="model", init="init", epochs="epochs", batch_size="batch_size",
                               lr="lr", seed="seed"))
    result = train_clip(args.data, args.out, cfg, quarantine=args.quarantine)
    print(json.dumps({"out": str(result.out_dir), "steps": result.steps, "seconds": round(result.seconds, 1),
                      "final_loss": round(result.final_loss, 4)}))


def _add_eval(sub) -> None:
    from ubt_core.attacks import ATTACKS

    p = sub.add_parser("eval", help="zero-shot CA, and ASR/RA under a trigger")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--eval", required=True, help="eval set directory (with classes.json)")
    p.add_argument("--attack", choices=ATTACKS, help="apply this attack's trigger (pattern from --trigger-seed)")
    p.add_argument("--trigger-seed", type=int, default=0, help="the --seed the dataset was poisoned with")
    p.add_argument("--trigger-from", help="poisoned dataset directory: use its manifest's trigger and target")
    p.add_argument("--target", help="target class name")
    p.add_argument("--out", required=True, help="metrics JSON path")
    p.set_defaults(func=_eval)


def _eval(args) -> None:
    from ubt_core.data.contract import write_json
    from ubt_core.eval import evaluate, resolve_trigger

    trigger, target = resolve_trigger(args.attack, args.target, args.trigger_from, args.trigger_seed)
    metrics = evaluate(args.model, args.eval, trigger, target)
    write_json(metrics, args.out)
    print(json.dumps({k: metrics[k] for k in ("ca", "asr", "ra") if k in metrics}))


def _add_defend(sub) -> None:
    p = sub.add_parser("defend",
                       help="UBT: find poisoned pairs and unlearn the backdoor (overfit, scan, select, unlearn)")
    p.add_argument("--model", required=True, help="suspect checkpoint directory")
    p.add_argument("--data", required=True, help="the pair dataset the model was trained on")
    p.add_argument("--out", required=True, help="output directory: model/, suspicious.parquet, report.json/.md")
    p.add_argument("--config", help="JSON file of DefenseConfig overrides, e.g. {\"unlearn\": {\"steps\": 40}}")
    p.add_argument("--k", type=int,
                   help="unlearn exactly the k most suspicious pairs (default: chosen from the scores)")
    p.add_argument("--quarantine", help="set faulty input rows aside in this Parquet file instead of failing")
    p.set_defaults(func=_defend)


def _json_file(path: str, flag: str) -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except OSError as e:
        raise UbtError(f"{flag} {path}: cannot read it ({e.strerror}).") from None
    except json.JSONDecodeError as e:
        raise UbtError(f"{flag} {path}: not valid JSON (line {e.lineno}: {e.msg}).") from None
    if not isinstance(value, dict):
        raise UbtError(f"{flag} {path}: expected a JSON object of settings, got {type(value).__name__}.")
    return value


def _defense_overrides(args) -> dict:
    override = _json_file(args.config, "--config") if args.config else {}
    if args.k is not None:
        override.setdefault("select", {})["k"] = args.k
    return override


def _defend(args) -> None:
    from ubt_core.defense import defend
    from ubt_core.defense.bench import variant_config

    report = defend(args.model, args.data, args.out, variant_config(_defense_overrides(args)), args.quarantine)
    print(json.dumps({k: report[k] for k in ("k", "verdict", "total_seconds")} | (
        {"detection": report["detection"]} if "detection" in report else {})))


def _add_bench_defense(sub) -> None:
    p = sub.add_parser("bench-defense", help="run UBT (and ablation variants) on the models of `ubt bench`")
    p.add_argument("--out", required=True, help="the work directory of `ubt bench`")
    p.add_argument("--setting", choices=["scratch", "finetune"], default="scratch")
    p.add_argument("--attacks", default="badnet,blended,sig,wanet", help="comma-separated attacks")
    p.add_argument("--variants", help="JSON file {name: DefenseConfig overrides}; default: UBT as configured")
    p.add_argument("--no-clean-check", action="store_true", help="skip defending the clean model")
    p.add_argument("--doc", help="also write the table into this Markdown file, e.g. docs/algorithm.md")
    p.set_defaults(func=_bench_defense)


def _bench_defense(args) -> None:
    from ubt_core.defense.bench import DefenseBenchConfig, run_defense_bench

    variants = _json_file(args.variants, "--variants") if args.variants else {"ubt": {}}
    cfg = DefenseBenchConfig(setting=args.setting, attacks=args.attacks.split(","), variants=variants,
                             clean_check=not args.no_clean_check)
    print(run_defense_bench(args.out, cfg, doc=args.doc, command=" ".join(["ubt", *sys.argv[1:]])))


def _add_size_benches(sub) -> None:
    """Benchmarks that grow a generated input through --sizes and write one table."""
    for name, help_text, func in (
            ("bench-import", "peak memory and speed of importing WebDataset shards as input grows", _bench_import),
            ("bench-scan", "Ray Data scan vs the bare in-process loop: speed and peak memory", _bench_scan)):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--out", required=True, help="work directory (generated inputs are reused)")
        p.add_argument("--sizes", default="100000,1000000", help="comma-separated numbers of pairs")
        p.add_argument("--doc", help="also write the table into this Markdown file, e.g. docs/performance.md")
        p.set_defaults(func=func)


def _bench_import(args) -> None:
    from ubt_core.data.importers.bench import run_import_bench

    sizes = [int(s) for s in args.sizes.split(",")]
    print(run_import_bench(args.out, sizes, args.doc, command=" ".join(["ubt", *sys.argv[1:]])))


def _bench_scan(args) -> None:
    from ubt_core.jobs.scan_bench import run_scan_bench

    sizes = [int(s) for s in args.sizes.split(",")]
    print(run_scan_bench(args.out, sizes, args.doc, command=" ".join(["ubt", *sys.argv[1:]])))


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="synth -> poison (BadNet) -> train backdoored model -> eval -> UBT defend -> eval")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, help="training epochs (default: the benchmark's)")
    p.add_argument("--train-pairs", type=int, help="size of the synthetic training set (default 20000)")
    p.add_argument("--eval-images", type=int, help="size of the eval set (default 5000)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="defend-flow overrides, as `ubt flow defend` takes them, e.g. defense.unlearn.steps=50")
    p.set_defaults(func=_demo)


def _demo(args) -> None:
    for name, value in _PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from flows.demo import demo_flow
    from ubt_core.data.synth import SynthConfig
    from ubt_core.train import TrainConfig

    report = demo_flow(args.out, SynthConfig(**_given(args, train_pairs="train_pairs", eval_images="eval_images")),
                       TrainConfig(**_given(args, epochs="epochs")), args.overrides)
    _print_defense(report)


def _print_defense(report: dict) -> None:
    """The defense's before/after table and where to look next."""
    rows = [f"| {which} | {m['ca']:.3f} | {m['asr']:.3f} | {m['ra']:.3f} |"
            for which, m in report["evaluation"].items()]
    detection = report.get("detection")
    found = (f"; detection precision {detection['precision_at_k']:.3f}, recall {detection['recall_at_k']:.3f}"
             if detection else "")
    print("\n".join(["| model | CA | ASR | RA |", "|---|---:|---:|---:|", *rows, "",
                     f"{report['verdict']}{found}",
                     f"MLflow run {report['mlflow_run_id']}, registered version {report['registered_version']}"]))


def _add_bench(sub) -> None:
    from ubt_core.attacks import ATTACKS

    p = sub.add_parser("bench", help="benchmark: clean + backdoored models per attack, CA/ASR/RA table; with "
                                     "--defenses, UBT against the baseline defenses on those models")
    p.add_argument("--out", required=True, help="work directory (models and data are reused if present)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated attacks")
    p.add_argument("--defenses", help="comma-separated defenses to compare, of none,ft,cleanclip,abl,safeclip,"
                                      "ubt; writes OUT/results.parquet, OUT/results.md and OUT/figures/")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the comparison (default 0,1,2)")
    p.add_argument("--baseline-config", help="JSON file of BaselineConfig overrides for the baseline defenses")
    p.add_argument("--ubt-config", help="JSON file of DefenseConfig overrides for UBT, as `ubt defend --config`")
    p.add_argument("--rows", help="keep each finished cell's result row here (default OUT/rows); rows already "
                                  "there are reused, so a comparison can be completed over several runs")
    _add_world_flags(p)
    p.add_argument("--doc", help="also write the table into this Markdown file, e.g. docs/benchmark.md")
    p.set_defaults(func=_bench)


def _add_world_flags(p) -> None:
    """The benchmark world's flags: a comparison's cells are named by them."""
    p.add_argument("--setting", choices=["scratch", "finetune"], help="threat setting (default scratch)")
    p.add_argument("--rate", type=float, help="poison rate (default 0.01)")
    p.add_argument("--target", help="the class every attack targets (default triangle)")
    p.add_argument("--triggers", help='JSON file of per-attack trigger settings over the defaults, e.g. '
                                      '{"blended": {"alpha": 0.2}}')
    p.add_argument("--epochs", type=int, help="training epochs (default: the benchmark's)")
    p.add_argument("--train-pairs", type=int)
    p.add_argument("--eval-images", type=int)


def _bench_config(args):
    from ubt_core.bench import BenchConfig

    triggers = {"triggers": _json_file(args.triggers, "--triggers")} if args.triggers else {}
    return BenchConfig(attacks=args.attacks.split(","), **_given(args, setting="setting", rate="rate", target="target"),
                       **triggers, **_bench_overrides(args, "finetune" if args.setting == "finetune" else "train"))


def _bench(args) -> None:
    from ubt_core.bench import run_bench
    from ubt_core.defense.compare import run_compare

    cfg = _bench_config(args)
    command = " ".join(["ubt", *sys.argv[1:]])
    if args.defenses:
        print(run_compare(args.out, _compare_config(args, cfg, args.defenses.split(",")), doc=args.doc,
                          command=command, rows_dir=args.rows))
        return
    print(run_bench(args.out, cfg, doc=args.doc, command=command).markdown)


def _compare_config(args, bench, defenses: list[str]):
    from ubt_core.defense.compare import CompareConfig

    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        raise UbtError(f"--seeds {args.seeds}: expected comma-separated integers, e.g. 0,1,2.") from None
    baseline = getattr(args, "baseline_config", None)
    return CompareConfig(attacks=bench.attacks, defenses=defenses, seeds=seeds, bench=bench,
                         baseline=_json_file(baseline, "--baseline-config") if baseline else {},
                         ubt=_json_file(args.ubt_config, "--ubt-config") if args.ubt_config else {})


def _add_bench_unlearn(sub) -> None:
    p = sub.add_parser("bench-unlearn", help="re-run only UBT's unlearning step, with other settings, on the "
                                             "UBT cells of `ubt bench --defenses ...,ubt` (same selection)")
    p.add_argument("--out", required=True, help="the work directory of the comparison")
    p.add_argument("--variants", required=True, help="JSON file {name: UnlearnConfig overrides}")
    p.add_argument("--attacks", default="badnet,blended,sig,label-consistent", help="comma-separated attacks")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--ubt-config", help="the comparison's --ubt-config, if it had one (names its UBT cells)")
    _add_world_flags(p)
    p.add_argument("--doc", help="also write the table into this Markdown file, e.g. docs/algorithm.md")
    p.set_defaults(func=_bench_unlearn)


def _bench_unlearn(args) -> None:
    from ubt_core.defense.sweep import SweepConfig, run_unlearn_sweep

    cfg = SweepConfig(compare=_compare_config(args, _bench_config(args), ["ubt"]),
                      variants=_json_file(args.variants, "--variants"))
    print(run_unlearn_sweep(args.out, cfg, doc=args.doc, command=" ".join(["ubt", *sys.argv[1:]])))


def _bench_overrides(args, trained: str = "train") -> dict:
    """Config sections set by flags; --epochs goes to the training config of the setting (`trained`)."""
    out = {}
    if args.epochs is not None:
        out[trained] = {"epochs": args.epochs}
    synth = _given(args, train_pairs="train_pairs", eval_images="eval_images")
    if synth:
        out["synth"] = synth
    return out


def _given(args, **names: str) -> dict:
    """Config fields whose flags were given (so defaults stay in the config classes)."""
    return {field: getattr(args, attr) for field, attr in names.items() if getattr(args, attr) is not None}


def _add_flow(sub) -> None:
    flows = sub.add_parser("flow", help="run a Prefect flow (stages cached; a re-run resumes after a failure)")
    p = flows.add_subparsers(required=True, metavar="FLOW").add_parser(
        "defend", help="UBT as a DAG: validate, scan (Ray Data), overfit, select, unlearn, evaluate, register (MLflow)")
    p.add_argument("--config", help="run config YAML (see configs/run-example.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides, e.g. defense.unlearn.steps=50")
    p.set_defaults(func=_flow_defend)


# Prefect's embedded server takes 15-25 s to start on 2 cores (its default timeout is shorter), and no
# analytics leave the machine; both must be set before prefect is imported. A user's settings win.
_PREFECT_DEFAULTS = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
                     "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _flow_defend(args) -> None:
    for name, value in _PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from flows.defend import defend_flow

    report = defend_flow(args.config, args.overrides)
    print(json.dumps({k: report[k] for k in ("k", "verdict", "registered_version", "mlflow_run_id")}
                     | {"evaluation": {which: {m: v.get(m) for m in ("ca", "asr", "ra")}
                                       for which, v in report["evaluation"].items()}}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ubt", description="Find and unlearn backdoors in CLIP models.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    data_parser = sub.add_parser("data", help="datasets: synth, check, import")
    data = data_parser.add_subparsers(required=True, metavar="COMMAND")
    _add_synth(data)
    _add_check(data)
    _add_import(data)
    models = sub.add_parser("model", help="checkpoints: import").add_subparsers(required=True, metavar="COMMAND")
    _add_model_import(models)
    for add in (_add_poison, _add_train, _add_eval, _add_defend, _add_flow, _add_demo, _add_bench, _add_bench_defense,
                _add_bench_unlearn, _add_size_benches):
        add(sub)
    return parser


def _given_value(error: dict) -> str:
    """`, got X` for a scalar input pydantic refused (its message does not always say what it was given)."""
    value = error.get("input")
    return f", got {value!r}" if isinstance(value, str | int | float | bool) else ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UbtError as e:
        print(f"ubt: error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}{_given_value(err)}"
                             for err in e.errors())
        print(f"ubt: error: invalid settings: {problems}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
