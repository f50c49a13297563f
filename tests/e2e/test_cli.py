"""The `ubt` command line end to end on a tiny world: synth -> poison -> train -> eval, and its errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ubt_core.data.contract import read_eval_set

pytestmark = pytest.mark.e2e


def test_synth_poison_train_eval(ubt_main, tmp_path):
    world = tmp_path / "world"
    ubt_main("data", "synth", "--out", str(world), "--train-pairs", "64", "--eval-images", "30", "--seed", "3")
    ubt_main("poison", "--data", str(world / "train"), "--out", str(tmp_path / "poisoned"), "--attack", "blended",
        "--rate", "0.05", "--target", "star", "--seed", "2")
    manifest = json.loads((tmp_path / "poisoned" / "manifest.json").read_text())
    assert manifest["n_poisoned"] == 3 and manifest["trigger"]["attack"] == "blended"
    ubt_main("train", "--data", str(tmp_path / "poisoned"), "--out", str(tmp_path / "model"), "--epochs", "1",
        "--batch-size", "16")
    ubt_main("eval", "--model", str(tmp_path / "model"), "--eval", str(world / "eval"), "--trigger-from",
        str(tmp_path / "poisoned"), "--out", str(tmp_path / "metrics.json"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["ca_den"] == 30 and metrics["target"] == "star"
    pairs, classes = read_eval_set(str(world / "eval"))
    star = classes.classes.index("star")
    assert metrics["asr_den"] == sum(label != star for label in pairs.table.column("label").to_pylist())
    assert 0 <= metrics["asr"] <= 1 and 0 <= metrics["ra"] <= 1 and 0 <= metrics["ca"] <= 1


def test_errors_are_one_clear_line(ubt, tmp_path):
    proc = ubt("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "m"), ok=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing" in lines[0] and "no such dataset directory" in lines[0]


def test_impossible_values_are_refused_before_work(ubt_main, tmp_path):
    proc = ubt_main("poison", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--attack", "badnet",
                    "--rate", "2", "--target", "star", ok=False)
    assert "rate" in proc.stderr and "less than or equal to 0.5" in proc.stderr
    proc = ubt_main("model", "import", "--model", "ViT-B-32", "--pretrained", "openai", "--no-quick-gelu", "--out",
                    str(tmp_path / "m"), ok=False)
    assert "--quick-gelu applies to --checkpoint" in proc.stderr and not (tmp_path / "m").exists()


def test_check_refuses_a_bad_row_then_quarantines_and_counts_it(ubt_main, tmp_path):
    ubt_main("data", "synth", "--out", str(tmp_path / "world"), "--train-pairs", "20", "--eval-images", "5")
    part = tmp_path / "world" / "train" / "part-00000.parquet"
    table = pq.read_table(part)
    images = table.column("image").to_pylist()
    images[4] = b"\x89PNG truncated"
    pq.write_table(table.set_column(1, "image", pa.array(images, pa.binary())), part)

    refused = ubt_main("data", "check", "--data", str(tmp_path / "world" / "train"), ok=False)
    assert f"{part} row 4: image bytes do not decode" in refused.stderr
    assert "--quarantine FILE" in refused.stderr

    checked = ubt_main("data", "check", "--data", str(tmp_path / "world" / "train"), "--quarantine",
                       str(tmp_path / "bad.parquet"))
    report = json.loads(checked.stdout)
    assert report["rows_in"] == 20 and report["rows_ok"] == 19
    assert report["quarantined"] == {"undecodable image": 1}
    assert pq.read_table(tmp_path / "bad.parquet").column("source_row").to_pylist() == [4]


def test_import_a_tab_separated_csv_given_as_backslash_t(ubt_main, tmp_path):
    ubt_main("data", "synth", "--out", str(tmp_path / "world"), "--train-pairs", "12", "--eval-images", "5")
    table = pq.read_table(tmp_path / "world" / "train")
    lines = ["path\ttext"]
    for uid, image, caption in zip(*(table.column(c).to_pylist() for c in ("uid", "image", "caption")), strict=True):
        (tmp_path / f"{uid}.png").write_bytes(image)
        lines.append(f"{uid}.png\t{caption}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    proc = ubt_main("data", "import", "--format", "cleanclip-csv", "--source", str(tmp_path / "pairs.csv"), "--out",
                    str(tmp_path / "imported"), "--sep", "\\t", "--image-key", "path", "--caption-key", "text")
    assert json.loads(proc.stdout)["rows_out"] == 12
    ubt_main("data", "check", "--data", str(tmp_path / "imported"))
