from ubt_core.defense.ubt import DefenseConfig, scan_digest


def test_a_retrained_model_or_rewritten_data_in_the_same_place_gets_a_new_scan(tmp_path):
    model, data = tmp_path / "model", tmp_path / "data"
    (model / "checkpoints").mkdir(parents=True)
    data.mkdir()
    weights, part = model / "open_clip_model.safetensors", data / "part-00000.parquet"
    weights.write_bytes(b"first weights")
    part.write_bytes(b"pairs")
    digest = scan_digest(str(model), str(data), DefenseConfig())
    assert scan_digest(str(model), str(data), DefenseConfig()) == digest  # nothing changed: the scan is reused

    weights.write_bytes(b"other weights")  # same path and size, other contents
    retrained = scan_digest(str(model), str(data), DefenseConfig())
    assert retrained != digest

    (data / "part-00001.parquet").write_bytes(b"more pairs")
    assert scan_digest(str(model), str(data), DefenseConfig()) not in (digest, retrained)


def test_the_scan_precision_is_part_of_the_scan_s_name(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "open_clip_model.safetensors").write_bytes(b"weights")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "part-00000.parquet").write_bytes(b"pairs")
    names = {scan_digest(str(tmp_path / "model"), str(tmp_path / "data"), DefenseConfig(precision=precision))
             for precision in ("fp32", "amp_bf16")}
    assert len(names) == 2
