"""Checkpoint import: OpenAI-layout state dicts load exactly, with the activation they were trained with;
open_clip pretrained tags load from the cache and fail clearly when the weights are out of reach;
code-carrying pickles, TorchScript and misfits are refused."""

import os

import open_clip
import pytest
import torch

from ubt_core.errors import UbtError
from ubt_core.models import create_model, load_model
from ubt_core.models.importer import import_checkpoint, import_pretrained


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(3)
    return create_model("ubt-tiny")


def _same_embeddings(a, b) -> bool:
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = a.tokenizer(["a photo of a star.", "a red circle", "a heart"])
    a.model.eval(), b.model.eval()
    with torch.no_grad():
        return (torch.allclose(a.model.encode_image(images), b.model.encode_image(images), atol=1e-5)
                and torch.allclose(a.model.encode_text(texts), b.model.encode_text(texts), atol=1e-5))


def test_openai_layout_with_wrapper_and_module_prefix_gives_the_same_embeddings(source, tmp_path):
    # CLIP / CleanCLIP training code saves {"state_dict": {"module.<openai key>": tensor}, "epoch": ...}
    state = {f"module.{k}": v for k, v in source.model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 7}, tmp_path / "epoch_7.pt")
    out = import_checkpoint(str(tmp_path / "epoch_7.pt"), "ubt-tiny", tmp_path / "imported")
    assert _same_embeddings(source, load_model(out))


def test_openai_release_weights_get_quickgelu_and_the_source_embeddings(tmp_path):
    torch.manual_seed(4)
    source = create_model("ubt-tiny", force_quick_gelu=True)
    release = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(32),
               "vocab_size": torch.tensor(49408)}
    torch.save(source.model.state_dict() | release, tmp_path / "openai.pt")
    out = import_checkpoint(str(tmp_path / "openai.pt"), "ubt-tiny", tmp_path / "imported")
    assert _same_embeddings(source, load_model(out))  # through the local-dir config: QuickGELU kept
    gelu = create_model("ubt-tiny")
    gelu.model.load_state_dict(source.model.state_dict())
    assert not _same_embeddings(source, gelu)  # the activation matters: GELU would have been silently wrong


def test_unmarked_weights_take_quickgelu_when_asked(tmp_path):
    torch.manual_seed(5)
    source = create_model("ubt-tiny", force_quick_gelu=True)  # e.g. a CleanCLIP checkpoint: no release keys
    torch.save({"state_dict": source.model.state_dict(), "epoch": 3}, tmp_path / "cleanclip.pt")
    guessed = load_model(import_checkpoint(str(tmp_path / "cleanclip.pt"), "ubt-tiny", tmp_path / "guessed"))
    told = load_model(import_checkpoint(str(tmp_path / "cleanclip.pt"), "ubt-tiny", tmp_path / "told",
                                        quick_gelu=True))
    assert not _same_embeddings(source, guessed) and _same_embeddings(source, told)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # the test makes an archive the old way, as OpenAI did
def test_a_torchscript_archive_is_refused_with_the_way_out(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "ViT-B-32.pt")
    with pytest.raises(UbtError, match=r"TorchScript archive .*torch\.jit\.load"):
        import_checkpoint(str(tmp_path / "ViT-B-32.pt"), "ubt-tiny", tmp_path / "out")


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


@pytest.fixture
def unit_tag(source, tmp_path, monkeypatch):
    """A pretrained tag `unit` of ubt-tiny whose weights sit behind a file:// URL (no network in tests)."""
    weights = tmp_path / "hub" / "ubt-tiny-unit.bin"
    weights.parent.mkdir()
    torch.save(source.model.state_dict(), weights)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "ubt-tiny", {"unit": {"url": weights.as_uri()}})
    return weights


def test_a_pretrained_tag_is_fetched_once_and_saved_as_a_local_dir(source, unit_tag, tmp_path):
    out = import_pretrained("ubt-tiny", "unit", tmp_path / "imported", cache_dir=str(tmp_path / "cache"))
    assert _same_embeddings(source, load_model(out))
    unit_tag.unlink()  # offline from now on: the cached copy is enough
    again = import_pretrained("ubt-tiny", "unit", tmp_path / "again", cache_dir=str(tmp_path / "cache"))
    assert _same_embeddings(source, load_model(again))


def test_pretrained_weights_out_of_reach_or_unknown_are_clear_errors(unit_tag, tmp_path):
    unit_tag.unlink()  # neither cached nor reachable
    with pytest.raises(UbtError, match=r"ubt-tiny / unit are not in the cache .* could not be fetched"):
        import_pretrained("ubt-tiny", "unit", tmp_path / "out", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UbtError, match="no pretrained weights 'laion' for 'ubt-tiny'; its tags: unit"):
        import_pretrained("ubt-tiny", "laion", tmp_path / "out")
    assert not (tmp_path / "out").exists()
