"""Checkpoint import: OpenAI-layout state dicts load exactly; code-carrying pickles and misfits are refused."""

import os

import pytest
import torch

from ubt_core.errors import UbtError
from ubt_core.models import create_model, load_model
from ubt_core.models.importer import import_checkpoint


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(3)
    return create_model("ubt-tiny")


def test_openai_layout_with_wrapper_and_module_prefix_gives_the_same_embeddings(source, tmp_path):
    # CLIP / CleanCLIP training code saves {"state_dict": {"module.<openai key>": tensor}, "epoch": ...}
    state = {f"module.{k}": v for k, v in source.model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 7}, tmp_path / "epoch_7.pt")
    out = import_checkpoint(str(tmp_path / "epoch_7.pt"), "ubt-tiny", tmp_path / "imported")
    imported = load_model(out)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = source.tokenizer(["a photo of a star.", "a red circle", "a heart"])
    with torch.no_grad():
        for encode in ("encode_image", "encode_text"):
            data = images if encode == "encode_image" else texts
            want, got = getattr(source.model.eval(), encode)(data), getattr(imported.model, encode)(data)
            assert torch.allclose(want, got, atol=1e-5)


def test_a_pickle_with_code_is_refused_without_running_it(source, tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"state_dict": source.model.state_dict(), "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UbtError, match="refused, it holds pickled code"):
        import_checkpoint(str(tmp_path / "evil.pt"), "ubt-tiny", tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_weights_of_another_architecture_are_refused_naming_the_keys(tmp_path):
    torch.save(create_model("ubt-small").model.state_dict(), tmp_path / "small.pt")
    expected = r"does not fit 'ubt-tiny': unexpected \(\d+\): visual\.transformer.*wrong shape"
    with pytest.raises(UbtError, match=expected):
        import_checkpoint(str(tmp_path / "small.pt"), "ubt-tiny", tmp_path / "out")


def test_unreadable_or_missing_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UbtError, match="not a readable PyTorch or safetensors checkpoint"):
        import_checkpoint(str(tmp_path / "junk.pt"), "ubt-tiny", tmp_path / "out")
    with pytest.raises(UbtError, match="no such checkpoint file"):
        import_checkpoint(str(tmp_path / "none.pt"), "ubt-tiny", tmp_path / "out")
