"""The scan's batch adapter: bfloat16 autocast gives the float32 embeddings up to rounding; the caption-only pass
gives the scan's caption embeddings."""

import torch

from ubt_core.data.contract import read_pairs
from ubt_core.defense.embed import embed_batch, embed_captions, embeddings_of
from ubt_core.models import create_model


def test_bf16_autocast_embeddings_are_unit_float32_rows_close_to_fp32(tiny_world):
    loaded = create_model("ubt-tiny")
    batch = read_pairs(tiny_world["train"]).table.slice(0, 16)
    exact = embeddings_of(embed_batch(batch, loaded))
    fast = embeddings_of(embed_batch(batch, loaded, "amp_bf16"))
    for rows in (fast.images, fast.texts):
        assert rows.dtype == torch.float32
        assert torch.allclose(rows.norm(dim=1), torch.ones(len(rows)), atol=1e-5)
    assert not torch.equal(fast.images, exact.images)  # the encoders did run in bfloat16
    assert (fast.images * exact.images).sum(dim=1).min() > 0.99
    assert (fast.texts * exact.texts).sum(dim=1).min() > 0.99


def test_captions_alone_embed_as_the_scan_embeds_them_each_distinct_one_once(tiny_world):
    loaded = create_model("ubt-tiny")
    batch = read_pairs(tiny_world["train"]).table.slice(0, 16)
    captions = batch.column("caption").to_pylist()
    captions[5] = captions[2]  # a repeated caption
    batch = batch.set_column(batch.column_names.index("caption"), "caption", [captions])
    encoded = []
    encode_text = loaded.model.encode_text
    loaded.model.encode_text = lambda tokens, **kw: encoded.append(len(tokens)) or encode_text(tokens, **kw)
    texts = embed_captions(captions, loaded, batch_size=4)
    assert sum(encoded) == len(set(captions)) == 15
    loaded.model.encode_text = encode_text
    assert torch.allclose(texts, embeddings_of(embed_batch(batch, loaded)).texts, atol=1e-6)
    assert torch.equal(texts[5], texts[2])
