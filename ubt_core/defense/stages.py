"""UBT as file-level stages: each reads its inputs from paths and writes its outputs under OUT.

A one-process run (`ubt_core.defense.ubt.defend`) and the DAG (`flows/defend.py`, each stage a cached
task; the scans may run as Ray Data jobs writing the same embeddings files) compose these functions.
Files under OUT: `validated/` (only when rows were quarantined), `embeddings-suspect.parquet`,
`overfit-model/`, `embeddings-overfit.parquet`, `suspicious.parquet` (every pair ranked, with
`selected` and `retained`), `selection.json`, `model/`, `unlearn.json` + `unlearn-tensors.safetensors`
(what the report shows), `report.json`, `report.md` with figures.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import safetensors.torch
import torch
from tqdm import tqdm

from ubt_core.data.contract import (
    filesystem,
    list_parquet_files,
    parquet_writer,
    read_checked_pairs,
    read_pairs,
    write_json,
    write_pairs,
    write_table,
)
from ubt_core.defense.embed import (
    SCANNED_COLUMNS,
    PairEmbeddings,
    Precision,
    embed_batch,
    embed_captions,
    embed_rows,
    read_embeddings,
)
from ubt_core.defense.overfit import OverfitConfig, overfit
from ubt_core.defense.refine import (
    MatchedFilter,
    RefineConfig,
    Refinement,
    alike_group,
    captioned_alike,
    closed_group,
    concept_starts,
    most_coherent,
    pixel_filter,
    refine,
    regroup,
    scan_start,
)
from ubt_core.defense.saliency import token_saliency
from ubt_core.defense.scan import ScanConfig, scan_scores
from ubt_core.defense.select import SelectConfig, Selection, select_pairs
from ubt_core.defense.unlearn import UnlearnConfig, resolved_scope, unlearn
from ubt_core.eval.detection import detection_metrics
from ubt_core.models import LoadedModel, load_model, save_model
from ubt_core.report import write_defense_report, write_model_card
from ubt_core.train import PairDataset

SUSPICIOUS_FILE = "suspicious.parquet"
SELECTION_FILE = "selection.json"
UNLEARN_FILE = "unlearn.json"
UNLEARN_TENSORS = "unlearn-tensors.safetensors"
REPORT_SHOWN = 16  # most suspicious pairs shown in the report
PUBLISHED = ("model", SUSPICIOUS_FILE, "report.json", "report.md")  # plus the report's figures (*.png)


def validate_stage(data_uri: str, out_dir: str | Path, quarantine: str | None = None) -> dict:
    """Check the dataset against the contract; with `quarantine`, bad rows are set aside and counted.

    Returns the URI the later stages read: the input itself, or OUT/validated when rows were set aside.
    """
    pairs = read_pairs(data_uri, quarantine=quarantine)
    data = data_uri
    if sum(pairs.quarantined.values()):
        data = str(Path(out_dir) / "validated")
        write_pairs(pairs.table, data)
    return {"data": data, "rows_in": pairs.rows_in, "rows_ok": pairs.table.num_rows,
            "quarantined": dict(pairs.quarantined)}


def scan_stage(model_dir: str, data_uri: str, out_uri: str, batch_size: int = 512,
               precision: Precision = "fp32") -> str:
    """Embed every pair of `data_uri` under `model_dir` into an embeddings file (the in-process scan).

    Streams: batches are read, embedded and written one at a time, so memory does not grow with the data.
    The data is read as it is; validate it first (`validate_stage`).
    """
    in_fs, files = list_parquet_files(data_uri)
    loaded = load_model(model_dir)
    total = sum(pq.read_metadata(path, filesystem=in_fs).num_rows for path in files)
    progress = tqdm(total=total, desc=f"scan {Path(out_uri).stem}", unit="pair", mininterval=2.0)
    with parquet_writer(out_uri) as write:
        for path in files:  # one open file at a time: a reader keeps its buffers until it is closed
            with in_fs.open_input_file(path) as stream:
                for batch in pq.ParquetFile(stream).iter_batches(batch_size, columns=list(SCANNED_COLUMNS)):
                    write(embed_batch(batch, loaded, precision))
                    progress.update(batch.num_rows)
    progress.close()
    return out_uri


def overfit_stage(model_dir: str, data_uri: str, suspect_embeddings: str, out_dir: str | Path,
                  cfg: OverfitConfig) -> str:
    """Over-fit the suspect on its weakest-similarity pairs; saves the amplified model at `out_dir`."""
    table = read_checked_pairs(data_uri)  # validate_stage checked every row
    suspect = load_model(model_dir)
    cosine = read_embeddings(suspect_embeddings, table.column("uid")).cosine
    save_model(overfit(suspect, PairDataset(table, suspect), cosine, cfg), out_dir)
    return str(out_dir)


def _uids_and_truth(table: pa.Table) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    truth = None  # the `poisoned` flags only when every row has one (benchmarks)
    if "poisoned" in table.column_names and not table.column("poisoned").null_count:
        truth = table.column("poisoned").to_numpy(zero_copy_only=False).astype(bool)
    return table.column("uid"), truth


def _refinement_summary(found: Refinement, poisoned: np.ndarray | None) -> dict:
    """What the report shows of one start's group (and, given the ground truth, how many of it are poisoned)."""
    def rate(value: float | None) -> float | None:
        return None if value is None else round(value, 4)

    return ({"start": found.start, "trigger_match_rate": rate(found.match_rate),
             "clean_match_rate": rate(found.clean_match_rate), "gap": round(found.gap, 2),
             "above_gap": found.above_gap, "spread": round(found.spread, 3), "verified": found.evidence}
            | ({"poisoned_in_group": int(poisoned[found.group].sum())} if poisoned is not None else {}))


def _refine(model_dir: str, table: pa.Table, columns: dict[str, np.ndarray], starts: dict[str, np.ndarray],
            clean_rows: np.ndarray, cfg: RefineConfig,
            poisoned: np.ndarray | None) -> tuple[dict, list[Refinement], MatchedFilter]:
    """Adds the `pattern` column; a verified pattern's scores become the suspicion. Returns what it found,
    with every start's group, the groups themselves, and the pixels' matched filter (for any group's `spread`)."""
    suspect = load_model(model_dir)
    dataset = PairDataset(table, suspect)
    pixels = pixel_filter(dataset, cfg)
    tried = refine(suspect, dataset, pixels, starts, clean_rows, cfg)
    found = tried[0]
    columns["pattern"] = found.scores
    if found.evidence:
        columns["suspicion"] = found.scores
    copies = any(r.gap >= cfg.min_gap and r.spread < cfg.min_spread for r in tried)  # one image copied stands apart
    summary = _refinement_summary(found, poisoned) | {"group_size": len(found.group), "copies": copies,
                                                      "starts": [_refinement_summary(r, poisoned) for r in tried]}
    return summary, tried, pixels


def _alike_group(suspect: LoadedModel, table: pa.Table, texts: torch.Tensor, tried: list[Refinement],
                 columns: dict[str, np.ndarray], select: SelectConfig, cfg: RefineConfig, precision: Precision,
                 batch_size: int, poisoned: np.ndarray | None) -> tuple[Selection | None, dict]:
    """The pixel group whose captions agree most, embedded with the pairs captioned most alike (`alike_group`);
    where its images keep to themselves there and select's evidence holds on its direction's scores, those become
    the `alike` column and the suspicion (the pairs not embedded, captioned unlike the group, rank below all of
    them), and the pairs most of whose nearest images are in the regrouped group are unlearned, most suspicious
    first. Returns the selection (None: columns untouched) and what the report shows."""
    start = most_coherent(tried, texts, cfg.min_spread)
    if start is None:  # every group is copies of one image
        return None, {"start": None}
    rows = captioned_alike(texts, start.group, cfg.regroup_contrast)
    embedded = embed_rows(table, rows, suspect, precision, batch_size)
    found = alike_group(embedded.images, embedded.texts, rows, start.group, start.start, cfg)
    scores = np.full(len(texts), found.scores.min(), np.float32)
    scores[rows] = found.scores
    summary = {"start": found.start, "closure": round(found.closure, 3), "embedded": len(rows),
               "members": found.members,
               **({"poisoned_in_group": int(poisoned[start.group].sum())} if poisoned is not None else {})}
    if not found.is_evidence(cfg) or not select_pairs(scores, select, poisoned).evidence:
        return None, summary
    columns["alike"] = columns["suspicion"] = scores
    return select_pairs(scores, select.model_copy(update={"k": found.members}), poisoned), summary


def _pattern_selection(columns: dict[str, np.ndarray], refined: dict, select: SelectConfig, cfg: RefineConfig,
                       poisoned: np.ndarray | None) -> tuple[Selection, str | None]:
    """The selection a verified pattern makes (its scores are the suspicion): the pairs above its drop, which share
    it, or with `cut_at_gap` off select's thresholds on its scores."""
    if cfg.cut_at_gap:
        cut = select_pairs(columns["suspicion"], select.model_copy(update={"k": refined["above_gap"]}), poisoned)
        return replace(cut, evidence=True), "shared pattern"  # the verified pattern is the evidence
    selection = select_pairs(columns["suspicion"], select, poisoned)
    return selection, "shared pattern" if selection.evidence else None


def pattern_stage(data_uri: str, out_dir: str | Path, select: SelectConfig, model_dir: str, refine_cfg: RefineConfig,
                  precision: Precision = "fp32", batch_size: int = 512) -> dict:
    """The first pass, before any image is embedded: refine from the caption concepts of the suspect's caption
    embeddings (the text tower only), with the patterns checked on images drawn from every pair (no scan has told
    clean from suspect yet; a few poisoned ones among 500 move the patched and the unpatched rate alike).

    A verified pattern is the evidence, as in the select stage: writes suspicious.parquet and selection.json and
    returns select's summary; the image scan, the overfit and select are not needed. Without one, the pixel group
    whose captions agree most is checked among the pairs captioned alike (`_alike_group`, a warp's); where the model
    keeps it together, that is the evidence. Otherwise writes nothing and returns `backdoor_evidence` False with what
    was tried (`refine`, to pass to `select_stage` as `tried`).
    """
    table = read_checked_pairs(data_uri)  # validate_stage checked every row
    uids, poisoned = _uids_and_truth(table)
    suspect = load_model(model_dir)
    texts = embed_captions(table.column("caption").to_pylist(), suspect, precision, batch_size)
    starts = concept_starts(texts, refine_cfg)
    if not starts:
        return {"backdoor_evidence": False, "evidence_kind": None, "refine": None}
    columns: dict[str, np.ndarray] = {}
    refined, tried, _ = _refine(model_dir, table, columns, starts, np.arange(len(uids)), refine_cfg, poisoned)
    if refined["verified"]:
        selection, kind = _pattern_selection(columns, refined, select, refine_cfg, poisoned)
        return _write_selection(out_dir, uids, columns, selection, kind, refined, poisoned)
    if refine_cfg.alike_group:  # no pattern: the group whose captions agree most, if the model keeps it together
        selection, refined["alike_group"] = _alike_group(suspect, table, texts, tried, columns, select, refine_cfg,
                                                         precision, batch_size, poisoned)
        if selection is not None:
            return _write_selection(out_dir, uids, columns, selection, "alike group", refined, poisoned)
    return {"backdoor_evidence": False, "evidence_kind": None, "refine": refined}


def _write_selection(out_dir: str | Path, uids: pa.ChunkedArray, columns: dict[str, np.ndarray],
                     selection: Selection, kind: str | None, refined: dict | None,
                     poisoned: np.ndarray | None) -> dict:
    """suspicious.parquet (every pair ranked by its suspicion, with `selected` and `retained`) and selection.json;
    returns the summary."""
    out = Path(out_dir)
    rank = np.empty(len(uids), np.int64)
    rank[np.argsort(-columns["suspicion"], kind="stable")] = np.arange(1, len(uids) + 1)
    flags = {name: np.zeros(len(uids), bool) for name in ("selected", "retained")}
    flags["selected"][selection.forget] = True
    flags["retained"][selection.retain] = True
    truth = {"poisoned": poisoned} if poisoned is not None else {}
    write_table(pa.table({"uid": uids, **columns, "rank": rank, **flags, **truth}).sort_by("rank"),
                str(out / SUSPICIOUS_FILE))
    summary = {"n_pairs": len(uids), "k": int(len(selection.forget)), "backdoor_evidence": bool(selection.evidence),
               "evidence_kind": kind, "anomalous_pairs": selection.n_anomalous, "refine": refined}
    if poisoned is not None:
        summary["detection"] = detection_metrics(columns["suspicion"], poisoned, len(selection.forget))
    write_json(summary, str(out / SELECTION_FILE))
    return summary


def _regroup(columns: dict[str, np.ndarray], suspect: PairEmbeddings, select: SelectConfig, cfg: RefineConfig,
             pixels: MatchedFilter, poisoned: np.ndarray | None) -> tuple[Selection, int] | None:
    """Re-rank every pair by what the scan's densest images share beyond their captions (`regroup`, started from
    the pairs over select's threshold); the `regrouped` column becomes the suspicion. Returns the selection and
    how many of the regrouped group's top `group_size` pairs the scan saw collapsed, or None (columns untouched)
    when fewer than `min_group` were, or the group is copies of one image (its pixel spread under `min_spread`): a
    trigger's images collapse together, so its group stays dense, where a few dense clean pairs (near-duplicates)
    lead to a content group that is not.

    Only the pairs above the evidence threshold are unlearned: a direction fitted to a group also ranks the
    content nearest to it above select's lower threshold (on the benchmark's warp, rings and crescents).
    """
    dense = columns["suspicion"] > select.select_threshold
    scores = regroup(suspect.images, suspect.texts, np.flatnonzero(dense), cfg)
    group = np.argsort(-scores, kind="stable")[:cfg.group_size]
    collapsed = int(dense[group].sum())
    selection = select_pairs(scores, select, poisoned)
    if not selection.evidence or collapsed < select.min_group or pixels.spread(group) < cfg.min_spread:
        return None
    columns["regrouped"] = columns["suspicion"] = scores
    return select_pairs(scores, select.model_copy(update={"k": selection.n_anomalous}), poisoned), collapsed


def _closed_group(columns: dict[str, np.ndarray], models: dict[str, PairEmbeddings], select: SelectConfig,
                  cfg: RefineConfig, pixels: MatchedFilter,
                  poisoned: np.ndarray | None) -> tuple[Selection | None, dict]:
    """The caption concept whose regrouped pairs keep most to themselves in any model's image embeddings
    (`closed_group`); where it is closed enough and stands apart from the other concepts' groups
    (`ClosedGroup.is_evidence`), and select's evidence holds on its scores, those become the `closed` column and the
    suspicion, and the pairs most of whose nearest images are in the group are unlearned (as many as there are, most
    suspicious first). Returns the selection (None: columns untouched) and what the report shows."""
    found = {name: closed_group(embeddings, cfg, pixels.spread) for name, embeddings in models.items()}
    name, best = max(((name, group) for name, group in found.items() if group is not None),  # evidence first
                     key=lambda item: (item[1].is_evidence(cfg), item[1].closure), default=(None, None))
    if best is None:
        return None, {}
    summary = {"closure": round(best.closure, 3), "next_closure": round(best.next_closure, 3),
               "members": best.members, "start": best.start, "model": name,
               **({"poisoned_in_group": int(poisoned[np.argsort(-best.scores, kind="stable")[:cfg.group_size]].sum())}
                  if poisoned is not None else {})}
    selection = select_pairs(best.scores, select, poisoned)
    if not best.is_evidence(cfg) or not selection.evidence:
        return None, summary
    columns["closed"] = columns["suspicion"] = best.scores
    return select_pairs(best.scores, select.model_copy(update={"k": best.members}), poisoned), summary


def select_stage(data_uri: str, suspect_embeddings: str, overfit_embeddings: str | None, out_dir: str | Path,
                 scan: ScanConfig, select: SelectConfig, model_dir: str, refine_cfg: RefineConfig,
                 tried: dict | None = None) -> dict:
    """Score every pair, choose the unlearning and retain sets; writes suspicious.parquet and selection.json.

    The shared pixel pattern of the top pairs (and of each caption concept, unless `tried`: what `pattern_stage`
    already tried from them, which the summary lists too) is refined and checked as a trigger on the suspect
    (`model_dir`). A verified pattern is the evidence, and it overrides a collapsed group: the pairs above its drop
    carry the trigger, where a collapse may hold only part of them. Without a pattern, a caption concept regrouped
    into a group whose images keep to themselves is (`_closed_group`). Failing that, dense pairs are regrouped in
    the suspect's image embeddings (`_regroup`); a regrouped group that stays collapsed is evidence even where too
    few pairs passed select's own rule. The closed group comes first: on a held-out model the regroup's test
    passed a content group that the closed group's rejects.
    """
    table = read_checked_pairs(data_uri)  # validate_stage checked every row
    uids, poisoned = _uids_and_truth(table)
    suspect = read_embeddings(suspect_embeddings, uids)
    amplified = read_embeddings(overfit_embeddings, uids) if overfit_embeddings else None
    columns = scan_scores(suspect, amplified, scan)
    selection = select_pairs(columns["suspicion"], select, poisoned)
    kind, refined = ("collapse" if selection.evidence else None), None
    if refine_cfg.iterations and select.k is None and not select.oracle:
        starts = scan_start(columns["suspicion"], refine_cfg)
        if tried is None:
            starts |= concept_starts(suspect.texts, refine_cfg)
        refined, _, pixels = _refine(model_dir, table, columns, starts, selection.retain, refine_cfg, poisoned)
        if tried and tried.get("refine"):
            refined["starts"] = tried["refine"]["starts"] + refined["starts"]
            refined["copies"] = refined["copies"] or tried["refine"].get("copies", False)
            if "alike_group" in tried["refine"]:  # what the first pass's alike group check saw, for the report
                refined["alike_group"] = tried["refine"]["alike_group"]
        if selection.evidence and pixels.spread(selection.forget[:refine_cfg.group_size]) < refine_cfg.min_spread:
            selection, kind = replace(selection, forget=selection.forget[:0], evidence=False), None
            refined["copies"] = True  # the collapse is one image copied, not a trigger's many images
        if refined["verified"]:
            selection, kind = _pattern_selection(columns, refined, select, refine_cfg, poisoned)
        else:
            closed = None
            if refine_cfg.closed_group:  # no pattern: a group whose images keep to themselves, the stricter test
                models = {"suspect": suspect} | ({"overfit": amplified} if amplified is not None else {})
                closed, refined["closed_group"] = _closed_group(columns, models, select, refine_cfg, pixels, poisoned)
            if closed is not None:
                selection, kind = closed, "closed group"
            elif refine_cfg.regroup_collapse and selection.n_anomalous:  # dense pairs no pixel pattern explains
                regrouped = _regroup(columns, suspect, select, refine_cfg, pixels, poisoned)
                refined["regrouped"] = regrouped is not None
                if regrouped is not None:
                    selection, refined["regrouped_collapsed"] = regrouped
                    kind = "collapse"
    return _write_selection(out_dir, uids, columns, selection, kind, refined, poisoned)


def _rows(table: pa.Table, uids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Row indices of `uids` in `table`, in the order given."""
    return pc.index_in(uids, value_set=table.column("uid")).to_numpy(zero_copy_only=False).astype(np.int64)


def _selection(out: Path) -> dict:
    """What the select stage found (selection.json): k, the evidence and how it was found."""
    return json.loads((out / SELECTION_FILE).read_text())


def _suspicious(out: Path) -> pa.Table:
    return pq.read_table(out / SUSPICIOUS_FILE)  # sorted by rank: most suspicious first


def unlearn_stage(model_dir: str, data_uri: str, out_dir: str | Path, cfg: UnlearnConfig,
                  provenance: dict | None = None) -> dict:
    """Unlearn the selected pairs' trigger from the suspect; writes OUT/model and what the report shows.

    Without selected pairs (no evidence, no fixed k) the suspect is saved unchanged. An `auto` scope is resolved
    from OUT/selection.json: how the pairs were found decides how their trigger is put on clean images.
    """
    out = Path(out_dir)
    table = read_checked_pairs(data_uri)  # validate_stage checked every row
    suspect = load_model(model_dir)
    dataset = PairDataset(table, suspect)
    ranked = _suspicious(out)
    forget = _rows(table, pc.filter(ranked.column("uid"), ranked.column("selected")))
    tensors: dict[str, torch.Tensor] = {}
    if len(forget):
        retain_images = dataset.pixels(_rows(table, pc.filter(ranked.column("uid"), ranked.column("retained"))))
        scope = resolved_scope(cfg.scope, _selection(out))
        cleaned, info = unlearn(suspect, *dataset.stack(forget), retain_images, cfg.model_copy(update={"scope": scope}))
        tensors = {name: info.pop(name) for name in ("patch_saliency", "token_saliency", "pattern") if name in info}
    else:
        cleaned, info = suspect, {"skipped": "no strong backdoor evidence and no fixed k"}
    if "patch_saliency" not in tensors:  # the report still shows where the top pairs' match lives
        shown = forget if len(forget) else _rows(table, ranked.column("uid").slice(0, REPORT_SHOWN))
        saliency = token_saliency(suspect, *dataset.stack(shown[:REPORT_SHOWN]))
        tensors |= {"patch_saliency": saliency.patches, "token_saliency": saliency.tokens}
    save_model(cleaned, out / "model", extra={"defended_from": str(model_dir), "data": data_uri, **(provenance or {})})
    safetensors.torch.save_file({k: v.detach().contiguous()[:REPORT_SHOWN] if k != "pattern" else v.contiguous()
                                 for k, v in tensors.items()}, out / UNLEARN_TENSORS)
    write_json(info, str(out / UNLEARN_FILE))
    return info


def _verdict(selection: dict) -> str:
    evidence, k, refined = selection["backdoor_evidence"], selection["k"], selection.get("refine")
    if evidence and selection.get("evidence_kind") == "shared pattern":
        return (f"backdoor evidence: the most suspicious images share a pixel pattern that, pasted onto clean "
                f"images, makes {refined['trigger_match_rate']:.0%} of them match the group's captions better "
                f"than their own ({refined['clean_match_rate']:.0%} without it), and {refined['above_gap']} images "
                f"stand apart by it (a drop of {refined['gap']:.1f} z); {k} pairs unlearned")
    if evidence and (refined or {}).get("regrouped"):
        return (f"backdoor evidence: the most collapsed images share a direction in the image embeddings, and "
                f"{refined['regrouped_collapsed']} of the {refined['group_size']} pairs furthest along it collapse "
                f"too (no pixel pattern explains them); {k} pairs along it unlearned")
    if evidence and selection.get("evidence_kind") == "closed group":
        closed = refined["closed_group"]
        return (f"backdoor evidence: pairs captioned alike whose images keep to themselves: {closed['closure']:.0%} of "
                f"the nearest images of the {refined['group_size']} pairs furthest along their direction are among "
                f"them ({closed['next_closure']:.0%} for any other caption concept's group; {closed['model']} model; "
                f"no pixel pattern or collapse explains them); {k} pairs along it unlearned")
    if evidence and selection.get("evidence_kind") == "alike group":
        alike = refined["alike_group"]
        return (f"backdoor evidence: images that share a faint pixel feature and whose captions agree keep to "
                f"themselves among the {alike['embedded']} pairs captioned alike: {alike['closure']:.0%} of their "
                f"nearest images are among them (no pixel pattern stands apart; {alike['start']}); {k} pairs "
                f"along their direction unlearned")
    if evidence:
        return f"backdoor evidence: a group of pairs whose images collapse onto one point; {k} pairs unlearned"
    found = "no strong backdoor evidence: no anomalous group of pairs"
    if (refined or {}).get("copies"):
        found = ("no strong backdoor evidence: the pairs that stand apart are copies of one image (a pair duplicated "
                 "in the data, not a trigger on many different images); deduplicate the data")
    return f"{found}; the {k} pairs asked for (fixed k) were unlearned anyway" if k else found


def report_stage(model_dir: str, data_uri: str, out_dir: str | Path, config: dict,
                 stage_seconds: dict[str, float], extra: dict | None = None) -> dict:
    """Assemble report.json, report.md (figures) and the model card from the stages' files.

    The report's own writing time is added to `stage_seconds` in report.json (report.md is written before).
    """
    start = time.perf_counter()
    out = Path(out_dir)
    selection = _selection(out)
    info = json.loads((out / UNLEARN_FILE).read_text())
    report = {"model": str(model_dir), "data": data_uri, **selection,
              "verdict": _verdict(selection), "unlearn": info,
              "stage_seconds": stage_seconds, "overfit_ran": "overfit" in stage_seconds, "config": config,
              **(extra or {})}
    report["total_seconds"] = round(sum(stage_seconds.values()), 2)
    table = read_checked_pairs(data_uri)  # validate_stage checked every row
    ranked = _suspicious(out)
    tensors = safetensors.torch.load_file(out / UNLEARN_TENSORS)
    shown_uids = ranked.column("uid").slice(0, REPORT_SHOWN)
    if selection["k"]:
        shown_uids = pc.filter(ranked.column("uid"), ranked.column("selected")).slice(0, REPORT_SHOWN)
    columns = {"suspicion": ranked.column("suspicion").to_numpy()}
    poisoned = ranked.column("poisoned").to_numpy(zero_copy_only=False) if "poisoned" in ranked.column_names else None
    write_defense_report(out, report, columns, _rows(table, shown_uids), table, tensors["patch_saliency"],
                         tensors["token_saliency"], load_model(model_dir), poisoned, tensors.get("pattern"))
    write_model_card(out / "model", report)
    report["stage_seconds"] = stage_seconds | {"report": round(time.perf_counter() - start, 2)}
    report["total_seconds"] = round(sum(report["stage_seconds"].values()), 2)
    write_json(report, str(out / "report.json"))
    return report


def publish_outputs(stage_dir: str | Path, output_uri: str) -> list[str]:
    """Copy the defense's results (model, ranked pairs, reports and figures) from `stage_dir` to `output_uri`.

    `output_uri` may be an s3:// prefix; returns the URIs written.
    """
    stage = Path(stage_dir)
    out_fs, out_root = filesystem(output_uri)
    written = []
    for path in [stage / name for name in PUBLISHED] + sorted(stage.glob("*.png")):
        target = posixpath.join(out_root, path.name)
        pafs.copy_files(str(path.resolve()), target, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=out_fs)
        written.append(target)
    return written
