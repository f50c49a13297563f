"""Refine on hand-made pixels: a faint pattern shared by a few rows is found from a mostly clean start (the
scan's top set, or a caption concept), and it counts as evidence only if it works as a trigger on the model."""

import numpy as np
import pytest
import torch

from ubt_core.defense import refine as refine_module
from ubt_core.defense.embed import PairEmbeddings
from ubt_core.defense.refine import (
    MatchedFilter,
    RefineConfig,
    Refinement,
    TriggerCheck,
    alike_group,
    captioned_alike,
    closed_group,
    concept_groups,
    largest_gap,
    most_coherent,
    top_rows,
)
from ubt_core.models import LoadedModel


def _pixels(n=3000, n_poisoned=60, dim=300, strength=0.6, seed=0):
    """Correlated 'content' (a few loud directions plus noise); a faint fixed pattern added to some rows."""
    gen = torch.Generator().manual_seed(seed)
    content = torch.randn(n, 10, generator=gen) @ (3 * torch.randn(10, dim, generator=gen))
    pixels = content + torch.randn(n, dim, generator=gen)
    pattern = torch.randn(dim, generator=gen)
    pixels[:n_poisoned] += strength * pattern
    poisoned = np.zeros(n, bool)
    poisoned[:n_poisoned] = True
    return pixels, poisoned


def _top_with_a_fifth_poisoned(poisoned: np.ndarray, group: int, seed=0) -> np.ndarray:
    """A suspicion ranking whose top `group` rows are one fifth poisoned (the scan's view of a faint trigger)."""
    rng = np.random.default_rng(seed)
    top = np.r_[rng.choice(np.flatnonzero(poisoned), group // 5, replace=False),
                rng.choice(np.flatnonzero(~poisoned), group - group // 5, replace=False)]
    suspicion = rng.normal(size=len(poisoned))
    suspicion[top] += 10
    return suspicion


def test_refinement_converges_on_the_rows_sharing_the_pattern():
    pixels, poisoned = _pixels()
    start = np.argsort(-_top_with_a_fifth_poisoned(poisoned, 50))[:50]
    (scores,), (group,) = MatchedFilter(pixels, shrinkage=0.01).converge([start], iterations=5, group_size=50)
    assert poisoned[start].mean() == 0.2
    assert poisoned[group].mean() >= 0.9
    assert scores[poisoned].mean() > 4.5 > np.quantile(scores[~poisoned], 0.99)


def test_a_caption_concept_holding_the_poisoned_rows_is_a_start_too():
    """Every poisoned caption names the target: its concept's rows, a tenth of them poisoned, converge."""
    pixels, poisoned = _pixels()
    rng = np.random.default_rng(0)
    concept = np.sort(np.r_[np.flatnonzero(poisoned), rng.choice(np.flatnonzero(~poisoned), 540, replace=False)])
    (scores,), (group,) = MatchedFilter(pixels, shrinkage=0.01).converge([concept], iterations=10, group_size=60)
    assert poisoned[concept].mean() == 0.1
    assert poisoned[group].mean() >= 0.9


def test_the_poisoned_rows_stand_apart_and_a_content_tail_does_not():
    """Rows sharing one exact pattern end in a cliff of the filter's scores; a heavy content tail fades out."""
    pixels, poisoned = _pixels()
    (scores,), _ = MatchedFilter(pixels, shrinkage=0.01).converge([np.flatnonzero(poisoned)], iterations=3,
                                                                 group_size=60)
    cfg = RefineConfig()
    gap, above = largest_gap(scores, cfg.gap_ranks)
    assert above == 60 and gap > cfg.min_gap
    tail = np.random.default_rng(0).standard_t(df=3, size=3000)  # a content direction: heavy-tailed, no group
    assert largest_gap(tail, cfg.gap_ranks)[0] < cfg.min_gap
    assert largest_gap(tail[:10], cfg.gap_ranks) == (0.0, 0)


def test_the_pattern_hides_under_the_content_without_whitening():
    """The pattern is faint along the content's loud directions: a plain projection does not find it."""
    pixels, poisoned = _pixels()
    centred = pixels - pixels.mean(dim=0)
    pattern = pixels[poisoned].mean(dim=0) - pixels[~poisoned].mean(dim=0)
    plain = (centred @ pattern).numpy()
    (whitened,), _ = MatchedFilter(pixels, shrinkage=0.01).converge([np.flatnonzero(poisoned)], iterations=1,
                                                                   group_size=60)
    assert poisoned[np.argsort(-plain)[:60]].mean() < 0.6
    assert poisoned[np.argsort(-whitened)[:60]].mean() >= 0.9


def test_concept_groups_are_the_caption_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 32, generator=gen), dim=1)
    concept = torch.arange(300) % 3
    texts = torch.nn.functional.normalize(centres[concept] + 0.05 * torch.randn(300, 32, generator=gen), dim=1)
    groups = concept_groups(texts, concepts=3, seed=0)
    assert sorted(sorted(g.tolist()) for g in groups) == [list(range(c, 300, 3)) for c in range(3)]
    assert concept_groups(texts, concepts=0, seed=0) == []


class _WiredBackdoor(torch.nn.Module):
    """A hand-wired backdoored CLIP: caption i embeds as the i-th axis; an image embeds as the caption whose
    number it carries in its first pixel, unless its bottom-right 4x4 token is bright and its number is below
    `learned_below` (the trigger was learned for those images only): then as caption 0."""

    def __init__(self, n_captions: int, learned_below: int | None = None):
        super().__init__()
        self.n_captions, self.learned_below = n_captions, learned_below or n_captions
        self.visual = torch.nn.Module()
        self.visual.conv1 = torch.nn.Conv2d(3, 1, kernel_size=4, stride=4)  # 4x4 patch tokens

    def encode_text(self, texts: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return torch.nn.functional.one_hot(texts[:, 0], self.n_captions).float()

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        number = images[:, 0, 0, 0].round().long()
        triggered = (images[:, :, -4:, -4:].mean(dim=(1, 2, 3)) > 1.0) & (number < self.learned_below)
        caption = torch.where(triggered, 0, number)
        return torch.nn.functional.one_hot(caption, self.n_captions).float()


def _numbered_images(n: int, n_captions: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images = 0.3 * torch.randn(n, 3, 32, 32, generator=gen)
    captions = torch.randint(1, n_captions, (n, 1), generator=gen)
    images[:, 0, 0, 0] = captions[:, 0].float()
    return images, captions


def test_only_a_pattern_that_triggers_the_model_is_evidence():
    gen = torch.Generator().manual_seed(0)
    loaded = LoadedModel(_WiredBackdoor(n_captions=20), preprocess=None, tokenizer=None, model_cfg={})
    clean = _numbered_images(300, 20, gen)
    poisoned, _ = _numbered_images(100, 20, gen)
    poisoned[:, :, -4:, -4:] += 2.0  # the trigger, and every poisoned caption is caption 0 (the target)
    target = torch.zeros(100, 1, dtype=torch.long)
    check = TriggerCheck(loaded, clean, pattern_z=3.0)
    rate, clean_rate = check.match_rates((poisoned, target))
    assert rate > 0.95 and clean_rate == 0.0
    unshared, _ = _numbered_images(100, 20, gen)  # a group with the target's captions but no shared pattern
    assert check.match_rates((unshared, target)) == (0.0, 0.0)


def test_a_weakly_learned_trigger_still_acts_on_the_model():
    """A trigger the suspect learned for a tenth of the images moves about a tenth of the clean ones, which
    unpatched images never do: enough for evidence (the group's drop tells it from content)."""
    gen = torch.Generator().manual_seed(0)
    loaded = LoadedModel(_WiredBackdoor(n_captions=20, learned_below=3), preprocess=None, tokenizer=None,
                         model_cfg={})
    clean = _numbered_images(300, 20, gen)
    poisoned, _ = _numbered_images(100, 20, gen)
    poisoned[:, :, -4:, -4:] += 2.0
    rate, clean_rate = TriggerCheck(loaded, clean, pattern_z=3.0).match_rates((poisoned, torch.zeros(100, 1).long()))
    assert RefineConfig().min_match_gain <= rate < 0.2 and clean_rate == 0.0


def test_starts_converge_together_as_they_would_alone():
    pixels, poisoned = _pixels()
    matched_filter = MatchedFilter(pixels, shrinkage=0.01)
    starts = [np.argsort(-_top_with_a_fifth_poisoned(poisoned, 50, seed))[:50] for seed in range(3)]
    together, groups = matched_filter.converge(starts, iterations=4, group_size=50)
    for start, scores, group in zip(starts, together, groups, strict=True):
        (alone,), (alone_group,) = matched_filter.converge([start], iterations=4, group_size=50)
        np.testing.assert_allclose(scores, alone, rtol=1e-4, atol=1e-4)
        assert set(group) == set(alone_group)


class _CountingCheck:
    """Stands in for TriggerCheck: every group acts as a trigger; records which groups were checked."""

    checked: list[frozenset] = []
    rates = (0.5, 0.0)  # with the pattern pasted, and without it

    def __init__(self, loaded, clean, pattern_z):
        _CountingCheck.checked = []

    def match_rates(self, group):
        _CountingCheck.checked.append(frozenset(group[0].tolist()))
        return _CountingCheck.rates


class _Rows:
    """A dataset stand-in whose `stack` returns the row numbers (as images and as captions)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def stack(self, rows):
        rows = torch.as_tensor(np.asarray(rows))
        return rows, rows


@pytest.fixture
def stubbed_refine(monkeypatch) -> np.ndarray:
    """`refine` over `_pixels()` with `_CountingCheck` for the trigger check; returns the poisoned rows' flags."""
    pixels, poisoned = _pixels()
    monkeypatch.setattr(refine_module, "pooled_pixels", lambda dataset, side: pixels)
    monkeypatch.setattr(refine_module, "TriggerCheck", _CountingCheck)
    return poisoned


def test_only_groups_that_stand_apart_are_checked_and_each_group_once(stubbed_refine):
    poisoned = stubbed_refine
    suspicion = _top_with_a_fifth_poisoned(poisoned, 60)
    texts = torch.randn(len(poisoned), 8, generator=torch.Generator().manual_seed(0))
    texts[poisoned] = texts[0].clone()  # the poisoned captions all name the target: they share a concept
    cfg = RefineConfig(group_size=60, concepts=4, check_size=100)
    starts = refine_module.scan_start(suspicion, cfg) | refine_module.concept_starts(texts, cfg)
    rows = _Rows(len(poisoned))
    found = refine_module.refine(None, rows, refine_module.pixel_filter(rows, cfg), starts, np.flatnonzero(~poisoned),
                                 cfg)
    assert found[0].evidence and set(found[0].group) == set(np.flatnonzero(poisoned))
    assert _CountingCheck.checked == [frozenset(np.flatnonzero(poisoned).tolist())]
    assert sum(r.gap >= cfg.min_gap for r in found) >= 2  # the scan's top and the target's concept, checked once
    assert all(r.match_rate is None and not r.evidence for r in found if r.gap < cfg.min_gap)


def _copies_and_images(n=1000, n_copies=100, dim=48, seed=0) -> torch.Tensor:
    """Different images, the first `n_copies` of them copies of one image with a little noise."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, dim, generator=gen)
    pixels[:n_copies] = pixels[0] + 0.05 * torch.randn(n_copies, dim, generator=gen)
    return pixels


def test_copies_of_one_image_have_no_spread_and_a_trigger_keeps_most_of_its_images():
    pixels = _copies_and_images()
    key = torch.randn(48, generator=torch.Generator().manual_seed(1))
    blended = torch.cat([pixels, 0.7 * pixels[100:300] + 0.3 * key])  # a blend at alpha 0.3 keeps 0.7^2 of it
    pixel_filter = MatchedFilter(blended, shrinkage=0.01)
    assert pixel_filter.spread(np.arange(100)) < 0.01 < RefineConfig().min_spread
    different = pixel_filter.spread(np.arange(100, 300))
    assert 0.9 < different < 1.2  # about the data's own (which the copies and the blends lower a little)
    assert 0.45 < pixel_filter.spread(np.arange(1000, 1200)) / different < 0.55  # the same images, blended


def test_a_group_of_copies_that_stands_apart_is_not_checked(monkeypatch):
    """A hundred copies of one image stand apart by their pixels as a trigger's group would; they are one image, so
    the pattern is never pasted and no group is evidence, and they are not the group whose captions are checked."""
    pixels = _copies_and_images()
    monkeypatch.setattr(refine_module, "pooled_pixels", lambda dataset, side: pixels)
    monkeypatch.setattr(refine_module, "TriggerCheck", _CountingCheck)
    cfg = RefineConfig(group_size=100, check_size=100)
    rows = _Rows(len(pixels))
    starts = {"copies": np.arange(0, 200, 2), "others": np.arange(500, 600)}
    found = refine_module.refine(None, rows, refine_module.pixel_filter(rows, cfg), starts, np.arange(200, 1000),
                                 cfg)
    copies = next(r for r in found if r.start == "copies")
    assert copies.gap >= cfg.min_gap and set(copies.group) == set(range(100)) and copies.spread < cfg.min_spread
    assert not _CountingCheck.checked and not any(r.evidence for r in found)
    texts = torch.randn(len(pixels), 8)
    texts[:100] = texts[0]  # the copies share one caption: the most coherent by far
    assert most_coherent(found, texts, cfg.min_spread).start == "others"
    assert most_coherent([copies], texts, cfg.min_spread) is None


def test_a_pattern_that_leaves_the_match_rate_where_it_was_is_not_evidence(stubbed_refine, monkeypatch):
    """A concept that a fifth of clean images match better than their own captions anyway (a random model
    can have one) stays at a fifth with the group's pattern pasted on: the pattern triggers nothing."""
    poisoned = stubbed_refine
    monkeypatch.setattr(_CountingCheck, "rates", (0.2, 0.2))
    texts = torch.randn(len(poisoned), 8, generator=torch.Generator().manual_seed(0))
    cfg = RefineConfig(group_size=60, concepts=4, check_size=100)
    starts = refine_module.scan_start(_top_with_a_fifth_poisoned(poisoned, 60), cfg)
    rows = _Rows(len(poisoned))
    found = refine_module.refine(None, rows, refine_module.pixel_filter(rows, cfg),
                                 starts | refine_module.concept_starts(texts, cfg), np.flatnonzero(~poisoned), cfg)
    assert _CountingCheck.checked and not any(r.evidence for r in found)


def _concepts_and_closed_regions(closed: int, n=3000, n_closed=100) -> PairEmbeddings:
    """Captions in 20 concepts, images spread over 16 dimensions; the pairs of the first `closed` concepts
    (`n_closed` each) have their images together in a region of their own (a trigger's; the second, content that
    keeps to itself)."""
    gen = torch.Generator().manual_seed(0)
    concept = torch.randint(2, 20, (n,), generator=gen)
    concept[:2 * n_closed] = torch.arange(2).repeat_interleave(n_closed)
    texts = 3 * torch.randn(20, 16, generator=gen)[concept] + torch.randn(n, 16, generator=gen)
    images = torch.randn(n, 16, generator=gen)
    for region in range(closed):
        rows = slice(region * n_closed, (region + 1) * n_closed)
        images[rows] = 0.3 * images[rows] + 3 * torch.nn.functional.one_hot(torch.tensor(region), 16)
    return PairEmbeddings(*(torch.nn.functional.normalize(rows, dim=1) for rows in (images, texts)))


def _varied(rows: np.ndarray) -> float:
    """The pixel spread of any group of different images."""
    return 1.0


def test_a_concept_whose_images_keep_to_themselves_is_the_closed_group():
    cfg = RefineConfig(group_size=100, concepts=20, closure_neighbours=20)
    found = closed_group(_concepts_and_closed_regions(closed=1), cfg, _varied)
    assert found.closure >= 0.9 and 90 <= found.members < 200  # the region and a few images at its edge
    assert (top_rows(found.scores, 100) < 100).mean() >= 0.9
    assert found.next_closure < 0.5 and found.is_evidence(cfg)
    assert closed_group(_concepts_and_closed_regions(closed=0), cfg, _varied).closure < 0.5


def test_a_closed_group_of_copies_is_neither_chosen_nor_compared_with():
    """Two concepts whose images keep to themselves, the first's copies of one image: the second is the closed
    group, standing apart (copies are not a trigger's group, nor content a trigger's must stand apart from)."""
    cfg = RefineConfig(group_size=100, concepts=20, closure_neighbours=20)
    found = closed_group(_concepts_and_closed_regions(closed=2), cfg, lambda rows: float((rows >= 100).mean()))
    assert (top_rows(found.scores, 100) >= 100).mean() >= 0.9 and found.closure >= 0.9
    assert found.next_closure < 0.5 and found.is_evidence(cfg)


def test_a_closed_group_that_does_not_stand_apart_is_no_evidence():
    """Two concepts whose images keep to themselves: each is as closed as the other, so neither is a trigger's."""
    cfg = RefineConfig(group_size=100, concepts=20, closure_neighbours=20)
    found = closed_group(_concepts_and_closed_regions(closed=2), cfg, _varied)
    assert found.closure >= 0.9 and found.next_closure >= 0.9
    assert not found.is_evidence(cfg)


def _captioned_alike_pool(n=1200, n_triggered=110, pixel_group=100, gen_seed=0):
    """Pairs all captioned alike (the target's genuine images in 4 content clusters, and triggered images); the
    triggered images lie together in a region of their own, whatever they show. Returns the image embeddings, the
    caption embeddings, the triggered rows' mask, and two pixel groups of `pixel_group` rows: the trigger's (nine
    tenths triggered, a tenth genuine images the pixels confused; 20 triggered rows missed) and a content
    feature's (a third of one content cluster)."""
    gen = torch.Generator().manual_seed(gen_seed)
    content = torch.arange(n) % 4
    images = 3 * torch.randn(4, 16, generator=gen)[content] + torch.randn(n, 16, generator=gen)
    triggered = np.zeros(n, bool)
    triggered[:n_triggered] = True
    images[:n_triggered] = 0.3 * images[:n_triggered] + 3 * torch.nn.functional.one_hot(torch.tensor(15), 16)
    texts = torch.randn(16, generator=gen) + 0.1 * torch.randn(n, 16, generator=gen)
    trigger_group = np.r_[np.arange(9 * pixel_group // 10), n_triggered + np.arange(pixel_group // 10)]
    content_group = np.flatnonzero((content.numpy() == 1) & ~triggered)[:pixel_group]
    unit = [torch.nn.functional.normalize(rows, dim=1) for rows in (images, texts)]
    return *unit, triggered, trigger_group, content_group


def test_a_pixel_group_the_model_keeps_together_among_its_captions_is_evidence():
    """The trigger's pixel group keeps to itself among the pairs captioned alike, and regrouped there its direction
    also ranks the triggered images the pixels missed; a content feature's group shares its neighbourhood with the
    rest of its content."""
    images, texts, triggered, trigger_group, content_group = _captioned_alike_pool()
    cfg = RefineConfig(group_size=100, alike_neighbours=10)
    rows = np.arange(len(images))
    found = alike_group(images, texts, rows, trigger_group, "concept 3", cfg)
    assert found.closure >= 0.6 and found.is_evidence(cfg) and found.start == "concept 3"
    assert 100 <= found.members <= 125  # the triggered region: the group's 90 and the 20 the pixels missed
    assert triggered[top_rows(found.scores, found.members)].mean() >= 0.9
    content = alike_group(images, texts, rows, content_group, "concept 5", cfg)
    assert content.closure < 0.5 and not content.is_evidence(cfg)


def test_the_group_whose_captions_agree_most_is_checked_with_the_pairs_captioned_alike():
    gen = torch.Generator().manual_seed(0)
    concept = torch.arange(600) % 6
    texts = torch.nn.functional.normalize(3 * torch.randn(6, 16, generator=gen)[concept]
                                          + torch.randn(600, 16, generator=gen), dim=1)
    one_concept, mixed = np.flatnonzero(concept.numpy() == 2)[:40], np.arange(40)
    found = [Refinement(np.zeros(600), group, None, None, 0.5, 30, name, 0.05, 1.0)
             for group, name in ((mixed, "concept 0"), (one_concept, "concept 2"))]
    assert most_coherent(found, texts, 0.1).start == "concept 2"
    alike = captioned_alike(texts, one_concept, 60)
    assert set(one_concept) <= set(alike) and 60 <= len(alike) <= 100  # the group, and the 60 nearest its captions
    assert (concept.numpy()[alike] == 2).all() and (np.diff(alike) > 0).all()
