"""Saliency, overfit and unlearning on a tiny fresh open_clip ViT (behaviour, not quality)."""

import numpy as np
import pytest
import torch

from ubt_core.defense.overfit import OverfitConfig, overfit, weakest_pairs
from ubt_core.defense.saliency import token_saliency, top_patch_masks
from ubt_core.defense.unlearn import UnlearnConfig, pattern_tokens, resolved_scope, shared_pattern, unlearn
from ubt_core.models import create_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("ubt-tiny")


def _batch(loaded, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, loaded.image_size, loaded.image_size, generator=gen)
    texts = loaded.tokenizer([f"a photo of a star number {i}" for i in range(n)])
    return images, texts


def _params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_saliency_has_one_value_per_patch_and_caption_token(tiny):
    images, texts = _batch(tiny)
    sal = token_saliency(tiny, images, texts, batch_size=4)
    grid = tiny.image_size // sal.patch_size[0]
    assert sal.patches.shape == (6, grid, grid) and sal.tokens.shape == texts.shape
    assert torch.all(sal.tokens[texts == 0] == 0)  # padding carries nothing
    assert sal.patches.abs().sum() > 0


def test_a_blank_patch_carries_no_saliency(tiny):
    """Grad x activation at a patch whose embedding is zero (blank pixels, bias-free projection) is zero."""
    images, texts = _batch(tiny, n=2)
    p = 4
    images[:, :, :p, :p] = 0  # grad x activation at a zero patch embedding input is bias-only
    sal = token_saliency(tiny, images, texts)
    assert tiny.model.visual.conv1.bias is None
    assert torch.all(sal.patches[:, 0, 0] == 0) and torch.all(sal.patches[:, 1:, 1:] != 0)


def test_top_patch_masks_cover_exactly_the_chosen_tokens(tiny):
    images, texts = _batch(tiny)
    sal = token_saliency(tiny, images, texts)
    masks = top_patch_masks(sal, 3, tuple(images.shape[-2:]))
    assert masks.shape == (6, 1, *images.shape[-2:])
    assert torch.all(masks.flatten(1).sum(dim=1) == 3 * sal.patch_size[0] * sal.patch_size[1])


def test_weakest_pairs_are_the_lowest_cosines():
    assert set(weakest_pairs(torch.tensor([0.9, -0.2, 0.5, 0.1]), 0.5)) == {1, 3}


def test_overfit_changes_a_copy_only(tiny, tiny_world):
    from ubt_core.data.contract import read_pairs
    from ubt_core.train import PairDataset

    before = _params(tiny.model)
    dataset = PairDataset(read_pairs(tiny_world["train"]).table, tiny)
    amplified = overfit(tiny, dataset, torch.linspace(-1, 1, len(dataset)),
                        OverfitConfig(steps=2, weak_per_batch=8, normal_per_batch=4))
    after = _params(tiny.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert any(not torch.equal(before[n], p) for n, p in amplified.model.named_parameters())


@pytest.mark.parametrize("portion", ["visual-early", "visual-late", "visual", "all"])
def test_unlearning_moves_only_its_portion(tiny, portion):
    images, texts = _batch(tiny, n=8)
    before = _params(tiny.model)
    cfg = UnlearnConfig(scope="pattern", steps=2, batch_size=4, portion=portion)
    student, info = unlearn(tiny, images[:4], texts[:4], images[4:], cfg)
    assert all(torch.equal(before[n], p) for n, p in tiny.model.named_parameters())  # suspect untouched
    moved = {n for n, p in student.model.named_parameters() if not torch.equal(before[n], p)}
    text_moved = {n for n in moved if not n.startswith("visual.")}
    late_moved = {n for n in moved if n.startswith(("visual.transformer.resblocks.2", "visual.transformer.resblocks.3",
                                                    "visual.ln_post", "visual.proj"))}
    assert moved
    assert (portion == "all") or not text_moved
    assert (portion != "visual-early") or not late_moved
    assert (portion != "visual-late") or moved == late_moved
    assert 0 < info["trainable_fraction"] <= 1
    assert all(p.requires_grad for p in student.model.parameters())


def test_where_tokens_are_transplanted_clean_images_keep_their_affinity_to_the_target_concept(tiny):
    """Pushing transplanted images off the selected captions' concept shifts clean ones too; the concept term
    holds them where the suspect put them."""
    images, texts = _batch(tiny, n=16)
    forget_texts = tiny.tokenizer(["a photo of a star"] * 4)
    with torch.no_grad():
        concept = tiny.model.encode_text(forget_texts, normalize=True).mean(dim=0)

    def affinity_shift(weight: float) -> float:
        cfg = UnlearnConfig(scope="token", transplant_steps=20, transplant_batch_size=8, lr=1e-3,
                            transplant_retain_weight=0.0, target_weight=100.0, transplant_concept_weight=weight)
        student, _ = unlearn(tiny, images[:4], forget_texts, images[4:], cfg)
        with torch.no_grad():
            before = tiny.model.encode_image(images[4:], normalize=True) @ concept
            after = student.model.encode_image(images[4:], normalize=True) @ concept
        return (after - before).abs().mean().item()

    assert affinity_shift(300.0) < 0.5 * affinity_shift(0.0)


@pytest.mark.parametrize("scope", ["pattern", "token"])
def test_a_transplant_is_not_pulled_onto_its_clean_original_unless_asked(tiny, scope):
    """With every other term off, only the invariance term can move the model: the pattern's by default, the
    transplant's when its own weight is set."""
    images, texts = _batch(tiny, n=8)
    base = {"scope": scope, "steps": 2, "transplant_steps": 2, "batch_size": 4, "transplant_batch_size": 4,
            "retain_weight": 0, "transplant_retain_weight": 0, "target_weight": 0, "transplant_target_weight": 0,
            "transplant_concept_weight": 0}

    def moved(**weights) -> bool:
        student, _ = unlearn(tiny, images[:4], texts[:4], images[4:], UnlearnConfig(**base, **weights))
        return any(not torch.equal(p, q) for p, q in zip(tiny.model.parameters(), student.model.parameters(),
                                                      strict=True))

    assert moved() == (scope == "pattern")
    assert moved(transplant_invariance_weight=1.0)
    assert not moved(invariance_weight=0.0, transplant_invariance_weight=0.0)


def test_sample_level_unlearning_runs_without_saliency(tiny):
    images, texts = _batch(tiny, n=8)
    _, info = unlearn(tiny, images[:4], texts[:4], images[4:],
                      UnlearnConfig(scope="full", steps=1, batch_size=4))
    assert info["scope"] == "full" and "patch_saliency" not in info
    assert np.isfinite(info["trainable_fraction"])


def test_auto_scope_transplants_tokens_only_where_refine_found_no_shared_pattern(tiny):
    assert resolved_scope("auto", {"evidence_kind": "shared pattern", "refine": {"verified": True}}) == "pattern"
    assert resolved_scope("auto", {"evidence_kind": "collapse", "refine": {"verified": False}}) == "token"
    assert resolved_scope("auto", {"evidence_kind": "alike group", "refine": {"verified": False}}) == "token"
    assert resolved_scope("auto", {"evidence_kind": "collapse", "refine": None}) == "pattern"  # refine never looked
    assert resolved_scope("token", {"evidence_kind": "shared pattern", "refine": {"verified": True}}) == "token"
    images, texts = _batch(tiny, n=8)
    with pytest.raises(ValueError, match="resolved scope"):
        unlearn(tiny, images[:4], texts[:4], images[4:], UnlearnConfig(steps=1, batch_size=4))


def test_token_unlearning_transplants_its_share_of_each_pairs_tokens(tiny):
    images, texts = _batch(tiny, n=8)
    grid = tiny.image_size // token_saliency(tiny, images[:1], texts[:1]).patch_size[0]
    _, info = unlearn(tiny, images[:4], texts[:4], images[4:],
                      UnlearnConfig(scope="token", transplant_share=0.25, transplant_steps=1, transplant_batch_size=4))
    assert info["scope"] == "token" and info["tokens_per_pair"] == grid * grid // 4


@pytest.mark.parametrize(("scope", "clean_per_step", "images_per_step"),
                         [("pattern", None, 2 * 3), ("token", None, 2 * 5), ("pattern", 2, 3 + 2), ("token", 2, 5 + 2)])
def test_each_scope_trains_its_own_steps_and_batch(tiny, scope, clean_per_step, images_per_step):
    """Each step embeds its triggered images and (`clean_per_step` of) their clean originals together; a transplant
    trains for its own number of steps."""
    images, texts = _batch(tiny, n=8)
    seen = []
    hook = tiny.model.visual.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))
    try:  # the student is a copy of the suspect, hooks included
        unlearn(tiny, images[:4], texts[:4], images[4:], UnlearnConfig(
            scope=scope, steps=2, transplant_steps=3, batch_size=3, transplant_batch_size=5,
            clean_per_step=clean_per_step))
    finally:
        hook.remove()
    steps = 3 if scope == "token" else 2
    assert seen[-steps - 1] != images_per_step and seen[-steps:] == [images_per_step] * steps


def test_a_transplant_trains_its_own_portion_and_learning_rate(tiny):
    images, texts = _batch(tiny, n=8)
    cfg = UnlearnConfig(steps=1, transplant_steps=1, batch_size=2, transplant_batch_size=2, portion="visual",
                        transplant_portion="visual-late", lr=1e-4, transplant_lr=5e-3)
    moved = {}
    for scope in ("pattern", "token"):
        student, info = unlearn(tiny, images[:4], texts[:4], images[4:], cfg.model_copy(update={"scope": scope}))
        moved[scope] = max((a - b).abs().max().item() for a, b in zip(student.model.visual.parameters(),
                                                                      tiny.model.visual.parameters(), strict=True))
        assert info["portion"] == ("visual-late" if scope == "token" else "visual")
    assert moved["token"] > 10 * moved["pattern"]  # one Adam step moves a weight by about the learning rate


def test_pattern_tokens_mark_where_the_selected_images_share_a_pattern():
    gen = torch.Generator().manual_seed(0)
    retain = torch.randn(300, 3, 32, 32, generator=gen)
    local = torch.randn(300, 3, 32, 32, generator=gen)
    local[:, :, -4:, -4:] += 2.0  # a patch in the bottom-right token
    marked = pattern_tokens(local, retain, (4, 4), min_z=3.0)
    assert marked.shape == (8, 8) and marked[-1, -1] and marked.sum() == 1
    wave = torch.sin(torch.arange(32) / 2.0) * 1.0
    global_ = torch.randn(300, 3, 32, 32, generator=gen) + wave  # a sinusoid over the whole image
    assert pattern_tokens(global_, retain, (4, 4), min_z=3.0).sum() > 48
    assert pattern_tokens(torch.randn(300, 3, 32, 32, generator=gen), retain, (4, 4), min_z=3.0).sum() == 0


def test_shared_pattern_puts_a_pasted_patch_and_a_blend_on_as_they_were():
    gen = torch.Generator().manual_seed(0)
    retain, clean, fresh = (torch.randn(n, 3, 32, 32, generator=gen) for n in (500, 200, 50))
    key = 2 * torch.randn(3, 32, 32, generator=gen)

    def paste(images):
        out = images.clone()
        out[..., -4:, -4:] = key[:, -4:, -4:]
        return out

    def blend(images):
        return 0.8 * images + 0.2 * key

    for trigger_on in (paste, blend):
        errors = {}
        for affine in (True, False):
            trigger = shared_pattern(trigger_on(clean), retain, (4, 4), 3.0, affine=affine)
            missed = (trigger.apply(fresh) - trigger_on(fresh)).abs().mean()
            errors[affine] = (missed / (fresh - trigger_on(fresh)).abs().mean()).item()
        # the additive model adds the mean difference and misses what each image loses under the trigger;
        # what the affine one misses is the sampling noise of 200 images' mean
        assert errors[True] < 0.25 < 0.4 < errors[False], errors
