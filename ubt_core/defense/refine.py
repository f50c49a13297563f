"""Refine: the pattern a group of images shares, and whether it works as a trigger.

A backdoor whose images do not collapse (a faint blend over the whole image) leaves the poisoned
pairs scattered through the scan's ranking, with no clearly anomalous group. But an additive
trigger adds the same pixels to every poisoned image. A whitened matched filter, (x - mean)^T S^-1 p
with S the images' covariance, weighs each pixel direction by how little clean images vary along
it, and the trigger stands out of the content. Estimating p from a group and re-ranking every pair
by it, in turn, converges on the poisoned pairs from a start where a tenth of the group is poisoned.

Two kinds of start: the scan's top pairs, and each caption concept (a k-means cluster of the
suspect's caption embeddings). Every poisoned caption names the target, so the target's concept
holds the poisoned pairs at several times their share of the data, whatever the scan saw.

Any start converges on *some* group (a content direction with a heavy tail does too), so a group is
not evidence. Evidence is two things. The group stands apart: every poisoned image carries the same
pattern, so their scores end in a cliff, where a content attribute (a colour, a shape) fades out
gradually. And the group's pattern acts on the suspect as a trigger: pasted onto clean images, it makes
some of them match the group's captions better than their own, which unpatched clean images almost
never do. The second test alone does not tell a backdoor from content (a green tint makes most images
match "green ..." captions, while a weakly learned trigger moves a tenth of them); the first does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.linalg.blas import ssyrk
from sklearn.cluster import KMeans

from ubt_core.defense.embed import PairEmbeddings
from ubt_core.defense.saliency import patch_size
from ubt_core.defense.scan import nearest_rows, robust_z
from ubt_core.defense.unlearn import shared_pattern
from ubt_core.models import LoadedModel
from ubt_core.train import PairDataset


class RefineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a silent default

    iterations: int = Field(10, ge=0)  # pattern <-> group alternations per start; 0 = off (the "no-refine" ablation)
    group_size: int = Field(200, ge=2)  # top pairs each pattern estimate averages
    # caption clusters tried as starts besides the scan's top pairs; 0 = scan only. Many small clusters: the
    # target's captions need not form one cluster, and a start converges from a few percent poisoned
    concepts: int = Field(64, ge=0)
    side: int = Field(32, ge=4)  # images are average-pooled to side x side pixels for the matched filter
    shrinkage: float = Field(0.01, gt=0)  # added to the covariance's eigenvalues, as a share of their mean
    pattern_z: float = Field(3.0, gt=0)  # token significance of the checked pattern (as unlearn.pattern_z)
    check_size: int = Field(500, ge=1)  # clean images the pattern is pasted onto
    # evidence: a drop of this much robust z between two consecutive ranks of the group's scores ...
    min_gap: float = Field(3.0, gt=0)
    gap_ranks: tuple[int, int] = (20, 1000)  # ... somewhere between these ranks (select's min_group and max_k) ...
    # ... and pasting its pattern makes at least this much larger a share of clean images match the group's
    # captions better than their own (patched rate - unpatched rate: a concept clean images prefer anyway is no trigger)
    min_match_gain: float = Field(0.05, gt=0, le=1)
    # a group whose images vary less than this share of the data's pixel variance is copies of one image (a pair
    # duplicated in the data), not a trigger's group: a trigger rides on many different images. Measured: the
    # benchmark's poisoned groups 0.50 (Blended, alpha 0.3) - 1.02, caption concepts 0.44 - 1.58, 200 noisy copies
    # of one image 0.006 ("Copies are not a trigger", docs/algorithm.md)
    min_spread: float = Field(0.1, ge=0)
    cut_at_gap: bool = True  # a verified group's unlearning set is the pairs above its drop; False: select's thresholds
    # dense pairs that no shared pattern explains are regrouped by their direction in the image embeddings ...
    regroup_collapse: bool = True
    regroup_contrast: int = Field(2000, ge=1)  # ... against the images of this many pairs captioned most alike
    # where nothing else is found, each caption concept is regrouped in every model's image embeddings; a group
    # whose images keep to themselves is evidence: at least `min_closure` of the `closure_neighbours` nearest images
    # of its members are members, and at least `min_closure_gap` more than of any other concept's group (one that
    # shares under half its pairs). The warps' groups found this way reached 0.92 - 0.96, 0.11 - 0.23 above the
    # next; a held-out model's over-fitted copy had a content group at 0.88, 0.05 above the next ("A closed
    # group", docs/algorithm.md)
    closed_group: bool = True
    closure_neighbours: int = Field(100, ge=1)
    min_closure: float = Field(0.85, gt=0, le=1)
    min_closure_gap: float = Field(0.08, ge=0, le=1)
    # before any scan (`stages.pattern_stage`), where no pattern is verified: the pixel group whose captions agree
    # most is embedded with the `regroup_contrast` pairs captioned most alike; it is evidence where its images keep
    # to themselves among those: at least `min_alike_closure` of the `alike_neighbours` nearest images of its
    # members are members. Warps' pixel groups reached 0.60 - 0.73 on four models, content 0.20 - 0.48 ("A warp
    # before the scan", docs/algorithm.md)
    alike_group: bool = True
    alike_neighbours: int = Field(10, ge=1)
    min_alike_closure: float = Field(0.55, gt=0, le=1)
    seed: int = 0  # the caption clusters and the check images


@dataclass
class Refinement:
    scores: np.ndarray  # robust z of every pair's matched-filter score against the group's pattern
    group: np.ndarray  # rows the pattern was estimated from
    match_rate: float | None  # patched clean images matching the group's captions better than their own
    clean_match_rate: float | None  # the same for the unpatched clean images (None: no drop, not checked)
    gap: float  # the largest drop between consecutive sorted scores within `gap_ranks`
    above_gap: int  # how many pairs score above that drop
    start: str  # the start that converged on this group ("scan top" or "concept i")
    min_match_gain: float  # the gain that makes the group evidence (RefineConfig.min_match_gain)
    spread: float  # the group's pixel variance as a share of the data's (`MatchedFilter.spread`)

    @property
    def match_gain(self) -> float:
        """How much the group's pattern raises the match rate of clean images (-1 where it was not checked)."""
        return -1.0 if self.match_rate is None else self.match_rate - self.clean_match_rate

    @property
    def evidence(self) -> bool:
        """The group stood apart (so it was checked) and its pattern raised the match rate enough."""
        return self.match_gain >= self.min_match_gain


def pooled_pixels(dataset: PairDataset, side: int, batch_size: int = 512) -> torch.Tensor:
    """(N, 3 * side * side) preprocessed images, average-pooled to side x side."""
    rows = []
    for start in range(0, len(dataset), batch_size):
        images = dataset.pixels(range(start, min(start + batch_size, len(dataset))))
        rows.append(torch.nn.functional.adaptive_avg_pool2d(images, side).flatten(1))
    return torch.cat(rows)


def top_rows(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the `n` largest values along the last axis, in no particular order (a partition, not a sort)."""
    n = min(n, values.shape[-1])
    return np.argpartition(-values, n - 1, axis=-1)[..., :n]


class MatchedFilter:
    """The whitened matched filter over one vector per row (pooled pixels, or image embeddings); the covariance
    is inverted once for every start."""

    def __init__(self, rows: torch.Tensor, shrinkage: float):
        self.rows = rows
        self.mean = rows.mean(dim=0)
        self.centred = rows - self.mean
        # only the lower triangle, in half the products of a full matrix product; Cholesky reads nothing else
        covariance = torch.from_numpy(ssyrk(1 / len(rows), self.centred.numpy().T, lower=1)).double()
        ridge = shrinkage * covariance.diagonal().mean()  # a share of the mean eigenvalue (the trace / dimensions)
        shrunk = covariance + ridge * torch.eye(len(covariance), dtype=covariance.dtype)
        self.inverse = torch.cholesky_inverse(torch.linalg.cholesky(shrunk)).float()
        self.variance = covariance.diagonal().sum().item()

    def spread(self, group: np.ndarray) -> float:
        """The variance of `group`'s rows as a share of all rows' (total variance: the trace of the covariance):
        near 0 for copies of one image, about 1 for as many different images."""
        rows = self.rows[group]
        return (rows - rows.mean(dim=0)).pow(2).sum(dim=1).mean().item() / self.variance

    def converge(self, starts: list[np.ndarray], iterations: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
        """For each start, the robust z of every row's match to the pattern of the start's rows, re-estimated
        from the top `group_size` rows `iterations` times (at least once); all starts in one product per round.
        Returns the scores (starts x rows) and the final groups (starts x group_size)."""
        groups = starts
        for _ in range(max(iterations, 1)):
            scores = self.scores(torch.stack([self.rows[group].mean(dim=0) for group in groups]) - self.mean)
            groups = top_rows(scores, group_size)
        return scores, groups

    def scores(self, patterns: torch.Tensor) -> np.ndarray:
        """Robust z of every row's match to each pattern (patterns x rows)."""
        return np.stack([robust_z(row) for row in ((patterns @ self.inverse) @ self.centred.T).numpy()])


def regroup(images: torch.Tensor, texts: torch.Tensor, dense: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    """Robust z of every pair's match to what a group of dense images shares beyond their captions, in a
    model's embeddings (`images`, `texts`): the matched filter over embeddings instead of pixels, started
    from the `dense` rows (those the scan saw collapsed, or a caption concept's).

    A trigger with no shared pixel pattern (a warp) still moves every triggered image the same way in the
    model's embedding space. The density score sees only the most collapsed of them. The pattern is the
    group's mean image less the mean image of the `regroup_contrast` pairs whose captions are nearest the
    group's mean caption: poisoned captions name the target, so the group's direction against all pairs also
    points at the target's genuine images; against the pairs captioned alike it points at the trigger.
    Re-estimated from the top `group_size` rows, it also ranks the triggered images that collapsed less.
    Any group has such a direction (a content group too), so this ranks; whether the group found is a
    trigger's is the caller's test (`stages._regroup`: its pairs stay collapsed).
    """
    matched_filter = MatchedFilter(images, cfg.shrinkage)
    group = dense
    for _ in range(max(cfg.iterations, 1)):
        alike = np.setdiff1d(captioned_alike(texts, group, cfg.regroup_contrast), group)
        (scores,) = matched_filter.scores((images[group].mean(dim=0) - images[alike].mean(dim=0))[None])
        group = top_rows(scores, cfg.group_size)
    return scores


def neighbourhood_share(neighbours: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Per row, the share of its nearest neighbours (`neighbours`: rows x k row indices) that are in `group`."""
    member = np.zeros(len(neighbours), bool)
    member[group] = True
    return member[neighbours].mean(axis=1)


@dataclass
class ClosedGroup:
    scores: np.ndarray  # robust z of every pair's match to the group's direction (`regroup`)
    closure: float  # mean share of the group's (top `group_size` pairs') nearest images that are among them
    members: int  # pairs most of whose nearest images are in the group: the closed region's size
    start: str  # the caption concept it was regrouped from ("concept i")
    next_closure: float  # the closure of the most closed other group (sharing under half its pairs); 0 if none

    def is_evidence(self, cfg: RefineConfig) -> bool:
        """Closed enough, and standing apart from every other concept's group by enough."""
        return self.closure >= cfg.min_closure and self.closure - self.next_closure >= cfg.min_closure_gap


def closed_group(embeddings: PairEmbeddings, cfg: RefineConfig,
                 spread: Callable[[np.ndarray], float]) -> ClosedGroup | None:
    """The caption concept whose regrouped pairs keep most to themselves in `embeddings`' image space.

    A trigger moves the images that carry it, whatever they show, towards one place: even where they do not
    collapse (a warp, weakly learned), they end up each other's nearest neighbours, while a content group shares
    its neighbourhood with the content around it (red crosses with orange crosses and red hearts). Every poisoned
    caption names the target, so one caption concept holds the poisoned pairs; regrouped from it (`regroup`,
    against the pairs captioned alike), its top `group_size` pairs are the trigger's. Some content keeps to itself
    too, so the group's closure is also compared with that of the most closed other group. Copies of one image
    keep to themselves most of all: a group whose pixel `spread` is under `min_spread` is neither chosen nor
    compared with. None without concepts (or with only copies).
    """
    near = nearest_rows(embeddings.images, cfg.closure_neighbours)
    found = []  # (closure, group, scores, concept)
    for i, rows in enumerate(concept_groups(embeddings.texts, cfg.concepts, cfg.seed)):
        scores = regroup(embeddings.images, embeddings.texts, rows, cfg)
        group = top_rows(scores, cfg.group_size)
        if spread(group) >= cfg.min_spread:
            found.append((float(neighbourhood_share(near, group)[group].mean()), group, scores, i))
    if not found:
        return None
    closure, group, scores, concept = max(found, key=lambda item: item[0])
    apart = [other for other, rows, _, _ in found if len(np.intersect1d(rows, group)) < len(group) / 2]
    share = neighbourhood_share(near, group)
    return ClosedGroup(scores, closure, int((share > 0.5).sum()), f"concept {concept}", max(apart, default=0.0))


@dataclass
class AlikeGroup:
    rows: np.ndarray  # the dataset rows embedded: the pixel group and the pairs captioned most alike, sorted
    scores: np.ndarray  # robust z of each of `rows` along the group's direction among them (`regroup`)
    closure: float  # mean share of the pixel group's nearest images (among `rows`) that are in the group
    members: int  # rows most of whose nearest images are in the regrouped group: the closed region's size
    start: str  # the refine start whose pixel group this is

    def is_evidence(self, cfg: RefineConfig) -> bool:
        return self.closure >= cfg.min_alike_closure


def most_coherent(found: list[Refinement], texts: torch.Tensor, min_spread: float) -> Refinement | None:
    """The refine start whose pixel group's captions agree most (the length of their mean normalised embedding):
    every poisoned caption names the target, while a group sharing a content feature is captioned variously.
    Groups of copies (spread under `min_spread`) agree by being one pair duplicated and are passed over; None
    where every group is."""
    varied = [r for r in found if r.spread >= min_spread]
    return max(varied, key=lambda r: texts[r.group].mean(dim=0).norm().item(), default=None)


def captioned_alike(texts: torch.Tensor, group: np.ndarray, size: int) -> np.ndarray:
    """`group` and the `size` rows whose captions are nearest its mean caption, sorted."""
    concept = torch.nn.functional.normalize(texts[group].mean(dim=0), dim=0)
    return np.union1d(top_rows((texts @ concept).numpy(), size), group)


def alike_group(images: torch.Tensor, texts: torch.Tensor, rows: np.ndarray, group: np.ndarray, start: str,
                cfg: RefineConfig) -> AlikeGroup:
    """How far a pixel group's images keep to themselves in a model's embeddings of the pairs captioned alike
    (`rows`, from `captioned_alike`; `images`, `texts` are theirs, in that order), and its pairs regrouped there.

    A faint feature shared by the trigger's images (a warp's) leads the pixel filter to most of them, with no drop to
    tell it from content. The model tells them apart: it has learned to read every one of them as the target, so
    among the pairs captioned like them (the target's genuine images and the poisoned ones) they are each other's
    nearest neighbours, whatever they show; a content feature's images share their neighbourhood with the rest of
    their content. Regrouped among those pairs (against them), the group's direction also ranks the trigger's
    images the pixels missed."""
    local = np.searchsorted(rows, group)
    near = nearest_rows(images, cfg.alike_neighbours)
    closure = float(neighbourhood_share(near, local)[local].mean())
    scores = regroup(images, texts, local, cfg)
    members = int((neighbourhood_share(near, top_rows(scores, cfg.group_size)) > 0.5).sum())
    return AlikeGroup(rows, scores, closure, members, start)


def largest_gap(scores: np.ndarray, ranks: tuple[int, int]) -> tuple[float, int]:
    """The largest drop between consecutive sorted scores with the upper one at rank `ranks[0]`..`ranks[1]`
    (1-based), and how many scores lie above it."""
    ordered = np.sort(scores)[::-1][ranks[0] - 1:ranks[1] + 1]
    if len(ordered) < 2:  # fewer pairs than the group's smallest size
        return 0.0, 0
    drops = ordered[:-1] - ordered[1:]
    return float(drops.max()), ranks[0] + int(drops.argmax())


def concept_groups(texts: torch.Tensor, concepts: int, seed: int) -> list[np.ndarray]:
    """Rows of each caption concept: k-means clusters of the (normalised) caption embeddings."""
    if concepts == 0:
        return []
    labels = KMeans(min(concepts, len(texts)), n_init=1, random_state=seed).fit_predict(texts.numpy())
    return [np.flatnonzero(labels == concept) for concept in range(labels.max() + 1)]


class TriggerCheck:
    """Pastes a group's shared pattern onto a fixed set of clean pairs and asks the model whether the images
    now match the group's captions better than their own; the clean pairs are encoded once for every group."""

    @torch.no_grad()
    def __init__(self, loaded: LoadedModel, clean: tuple[torch.Tensor, torch.Tensor], pattern_z: float):
        self.loaded, self.images, self.pattern_z = loaded, clean[0], pattern_z
        self.model = loaded.model.eval()
        self.own_texts = self.model.encode_text(clean[1], normalize=True)
        self.clean_embedded = self._encode(clean[0])

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model.encode_image(chunk, normalize=True) for chunk in images.split(256)])

    def _preferred(self, embedded: torch.Tensor, concept: torch.Tensor) -> float:
        return ((embedded @ concept) > (embedded * self.own_texts).sum(dim=1)).float().mean().item()

    @torch.no_grad()
    def match_rates(self, group: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
        """Share of the clean images that match the group's shared concept better than their own caption,
        with the group's shared pattern pasted on, and without it."""
        trigger = shared_pattern(group[0], self.images, patch_size(self.loaded), self.pattern_z)
        concept = torch.nn.functional.normalize(self.model.encode_text(group[1], normalize=True).mean(dim=0), dim=0)
        return (self._preferred(self._encode(trigger.apply(self.images)), concept),
                self._preferred(self.clean_embedded, concept))


def concept_starts(texts: torch.Tensor, cfg: RefineConfig) -> dict[str, np.ndarray]:
    """Refine's starts from the caption concepts of `texts` (the suspect's caption embeddings), by name."""
    return {f"concept {i}": rows for i, rows in enumerate(concept_groups(texts, cfg.concepts, cfg.seed))
            if len(rows) >= 2}


def scan_start(suspicion: np.ndarray, cfg: RefineConfig) -> dict[str, np.ndarray]:
    """Refine's start from the scan's most suspicious pairs."""
    return {"scan top": np.argsort(-suspicion, kind="stable")[:cfg.group_size]}


def pixel_filter(dataset: PairDataset, cfg: RefineConfig) -> MatchedFilter:
    """The matched filter over every pair's pooled pixels (refine's, and the groups' `spread`)."""
    return MatchedFilter(pooled_pixels(dataset, cfg.side), cfg.shrinkage)


def refine(loaded: LoadedModel, dataset: PairDataset, matched_filter: MatchedFilter, starts: dict[str, np.ndarray],
           clean_rows: np.ndarray, cfg: RefineConfig) -> list[Refinement]:
    """From each start (`concept_starts`, `scan_start`), find the group sharing one pixel pattern in `matched_filter`
    (`pixel_filter`); the patterns are checked on clean images drawn from `clean_rows`. Only a group that stands apart,
    and is not copies of one image, is checked as a trigger. Returns every start's group, the chosen one first:
    evidence first, then the pattern that raises the match rate most, then the largest drop."""
    check = TriggerCheck(loaded, dataset.stack(np.random.default_rng(cfg.seed).choice(
        clean_rows, min(cfg.check_size, len(clean_rows)), replace=False)), cfg.pattern_z)
    all_scores, groups = matched_filter.converge(list(starts.values()), cfg.iterations, cfg.group_size)
    checked: dict[bytes, tuple[float, float]] = {}  # starts that converge on the same group are checked once
    found = []
    for name, scores, group in zip(starts, all_scores, groups, strict=True):
        gap, above = largest_gap(scores, cfg.gap_ranks)
        spread = matched_filter.spread(group)
        # a group that does not stand apart, or is copies of one image, is not evidence whatever the check says
        rate = clean_rate = None
        if gap >= cfg.min_gap and spread >= cfg.min_spread:
            key = np.sort(group).tobytes()
            if key not in checked:
                checked[key] = check.match_rates(dataset.stack(group))
            rate, clean_rate = checked[key]
        found.append(Refinement(scores, group, rate, clean_rate, gap, above, name, cfg.min_match_gain, spread))
    return sorted(found, key=lambda r: (r.evidence, r.match_gain, r.gap), reverse=True)
