"""The comparison as a Prefect flow: every cell a task, and a second run served from the cache."""


def test_compare_flow_tabulates_every_cell_and_reuses_them(prefect_server, tiny_compare, tmp_path, monkeypatch):
    from flows.compare import compare_flow
    from ubt_core.defense import compare

    cfg = tiny_compare.model_copy(update={"seeds": [0], "defenses": ["none", "ft"]})
    markdown = compare_flow(str(tmp_path), cfg)
    assert "| badnet | none |" in markdown and "| badnet | ft |" in markdown
    assert (tmp_path / "results.parquet").is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("a cached cell ran again")

    monkeypatch.setattr(compare, "run_baseline", refuse)
    monkeypatch.setattr(compare, "run_bench", refuse)
    assert compare_flow(str(tmp_path), cfg).split("measured")[1] == markdown.split("measured")[1]
