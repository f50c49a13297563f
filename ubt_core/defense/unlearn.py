"""Unlearning: make the model forget the trigger -> target association found in the selected pairs.

The trigger found in the selected pairs is put onto clean retain images, and the model is trained
so that a triggered clean image embeds like the frozen suspect embeds the untouched one, and no
closer to the selected captions' shared concept (the target) than that. A distillation term keeps
clean retain images where the suspect put them. Where tokens are transplanted (below), a triggered image
is mostly another image, so it is only kept off the target, not pulled onto the clean one; and clean
images' affinity to the target is kept exactly where it was (pushing three-quarter-transplanted images off
the target otherwise shifts every image off it, and the target's genuine images are misread). Only a
portion of the parameters moves. The trigger is either the pattern the selected images share, on the
tokens where it is significant (`scope="pattern"`): per token, a scale and an offset (`SharedTrigger`), so
a pasted patch, a blended key image and an added signal are each put on as they were; or each pair's most
salient patch tokens, transplanted (`scope="token"`), for a trigger that is no pixel pattern (a warp moves
each image's own pixels). `scope="auto"` takes the pattern unless refine looked for one and found none.

Sample-level (`scope="full"`, the ablation): gradient ascent on the CLIP loss of the selected pairs,
with the same retain term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from ubt_core.defense.saliency import token_saliency, top_patch_masks
from ubt_core.losses import ClipLoss
from ubt_core.models import LoadedModel

Portion = Literal["all", "visual", "visual-early", "visual-late"]


class UnlearnConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a silent default

    # pattern: put on the selected pairs' common pattern on the tokens where it is significant; token: transplant
    # each selected pair's salient patch tokens; auto: the pattern, unless the pairs collapse (or form a closed
    # group) and refine found no pattern they share (a warp): then tokens ("Unlearning a warp", docs/algorithm.md);
    # full: gradient ascent
    scope: Literal["auto", "pattern", "token", "full"] = "auto"
    portion: Portion = "visual"  # which parameters may change (ablations in docs/algorithm.md)
    # share of each selected image's patch tokens transplanted, most salient first: a scrambled image's
    # trigger is everywhere, and three quarters unlearn it where a sixteenth (4 of 64) does not
    transplant_share: float = Field(0.75, gt=0, le=1)
    pattern_z: float = Field(3.0, gt=0)  # significance a token's mean difference needs to be part of the pattern
    # how the pattern sits on an image: affine (scale * image + offset per token: a paste, a blend, an
    # addition) or additive (the mean difference added; the ablation)
    trigger_model: Literal["affine", "additive"] = "affine"
    pattern_jitter: float = Field(0.5, ge=0, lt=1)  # pattern strength drawn from 1 +- jitter
    # 100 steps at retain weight 60 (150 until 2026-12-07): on the "triangle" benchmark the same ASR and CA as 150,
    # 3 - 6 points less robust accuracy on Blended and SIG, and within 30 % of a 2-epoch fine-tune's time ("Fewer
    # unlearning steps", docs/algorithm.md); 300 steps at 30 cost fine-tuned Blended 1.1 points of CA ("Steps and
    # retain weight")
    steps: int = Field(100, ge=1)
    # where tokens are transplanted: 75 steps at lr 2e-4 on the late half of the vision tower with target weight 20
    # (150 at 1e-4 on the whole tower and 10 until 2026-12-07) unlearned the scrambling WaNet on two worlds, in both
    # settings, to ASR 0.004 or less at 0 - 0.5 points more CA lost, in 40 % of the time ("A warp in 30 %",
    # docs/algorithm.md)
    transplant_steps: int = Field(75, ge=1)
    transplant_lr: float = Field(2e-4, gt=0)
    transplant_portion: Portion = "visual-late"
    transplant_target_weight: float = Field(20.0, ge=0)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, ge=2)  # retain images per step (each also gets a patched copy)
    # of those, how many also go through unpatched to be kept in place (None: all); the patched copies are what
    # unlearns the trigger, the unpatched ones anchor clean behaviour, and each image is a forward and backward pass.
    # An ablation: 16 saved as much time as fewer steps and cost fine-tuned Blended and SIG 0.4 points of CA
    # ("Fewer unlearning steps", docs/algorithm.md)
    clean_per_step: int | None = Field(None, ge=1)
    # the batch where tokens are transplanted: twice the images per step narrowed how far the CA of the scrambling
    # WaNet moves with the draw from 0.6 - 0.9 points to 0.3 ("The draw, the batch and the invariance",
    # docs/algorithm.md)
    transplant_batch_size: int = Field(64, ge=2)
    # the pull of a triggered image onto the suspect's embedding of its clean original (0: only the target term
    # below keeps it off the target)
    invariance_weight: float = Field(1.0, ge=0)
    # the same where tokens are transplanted: three quarters of the image are another image's, so there is no
    # clean original to pull onto; without the pull the scrambling WaNet kept as much CA or more, in six draws on
    # two seeds ("The draw, the batch and the invariance", docs/algorithm.md)
    transplant_invariance_weight: float = Field(0.0, ge=0)
    retain_weight: float = Field(60.0, ge=0)
    # the retain weight where tokens are transplanted: three quarters of a clean image replaced pull harder
    # than a pasted pattern; at 60 the scrambling WaNet lost 1.2 points of CA, at 100 0.7 (docs/algorithm.md)
    transplant_retain_weight: float = Field(100.0, ge=0)
    # keep triggered images from moving closer to the selected captions' shared concept (the target)
    # than their clean originals are (the unlearning sweeps in docs/algorithm.md)
    target_weight: float = Field(10.0, ge=0)
    # where tokens are transplanted, keep clean retain images' affinity to that concept: without it the
    # scrambling WaNet's unlearning cost the target class 7 - 11 points of accuracy; a pasted pattern does
    # not need it ("Keeping the target class", docs/algorithm.md)
    transplant_concept_weight: float = Field(30.0, ge=0)
    seed: int = 0


@dataclass(frozen=True)
class ScopeSettings:
    """How one resolved scope trains: a transplant's own settings, or the common ones."""
    steps: int
    batch_size: int
    lr: float
    portion: Portion
    retain_weight: float
    target_weight: float
    invariance_weight: float
    concept_weight: float


def scope_settings(cfg: UnlearnConfig, scope: str) -> ScopeSettings:
    """The settings `scope` trains with: the `transplant_*` ones where tokens are transplanted."""
    if scope == "token":
        return ScopeSettings(cfg.transplant_steps, cfg.transplant_batch_size, cfg.transplant_lr, cfg.transplant_portion,
                             cfg.transplant_retain_weight, cfg.transplant_target_weight,
                             cfg.transplant_invariance_weight, cfg.transplant_concept_weight)
    return ScopeSettings(cfg.steps, cfg.batch_size, cfg.lr, cfg.portion, cfg.retain_weight, cfg.target_weight,
                         cfg.invariance_weight, 0.0)


def unpatched_per_step(cfg: UnlearnConfig, batch_size: int) -> int:
    """How many of a step's `batch_size` retain images also go through unpatched (`clean_per_step`, at most all)."""
    return min(cfg.clean_per_step or batch_size, batch_size)


def trainable_parameters(model: torch.nn.Module, portion: Portion) -> list[torch.nn.Parameter]:
    """Freeze everything outside `portion`; returns the parameters that stay trainable."""
    visual = model.visual
    if portion == "all":
        chosen = list(model.parameters())
    elif portion == "visual":
        chosen = list(visual.parameters())
    elif portion == "visual-early":
        # the patch projection, embeddings and first half of the blocks: where a local trigger is read
        blocks = visual.transformer.resblocks
        late = ("transformer.", "ln_post", "proj")
        chosen = [p for name, p in visual.named_parameters() if not name.startswith(late)]
        chosen += [p for block in blocks[:max(1, len(blocks) // 2)] for p in block.parameters()]
    else:
        # the second half of the blocks and the output projection: nothing is back-propagated below them, a
        # third less time a step, and less robust accuracy ("The time after fine-tuning", docs/algorithm.md)
        blocks = visual.transformer.resblocks
        chosen = [p for block in blocks[len(blocks) // 2:] for p in block.parameters()]
        chosen += [p for name, p in visual.named_parameters() if name.startswith(("ln_post", "proj"))]
    ids = {id(p) for p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return chosen


def _cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()


def pattern_tokens(forget: torch.Tensor, retain: torch.Tensor, patch_size: tuple[int, int],
                   min_z: float) -> torch.Tensor:
    """(grid_h, grid_w) tokens where the selected images differ significantly from clean ones on average.

    Per pixel, the mean difference over its standard error (Welch) is a z-score; a token is part of the
    trigger when its mean |z| exceeds `min_z`. Content averages out over hundreds of selected images,
    so a local trigger (a patch) marks a few tokens and a global one (a blend, a sinusoid) marks many.
    """
    se = (forget.var(dim=0) / len(forget) + retain.var(dim=0) / len(retain)).sqrt().clamp(min=1e-6)
    z = ((forget.mean(dim=0) - retain.mean(dim=0)).abs() / se).mean(dim=0)  # (H, W)
    return _token_mean(z, patch_size) > min_z


def _token_mean(values: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """(grid_h, grid_w) mean of an (H, W) map over each patch token."""
    ph, pw = patch_size
    return values[: values.shape[0] // ph * ph, : values.shape[1] // pw * pw].unfold(0, ph, ph).unfold(
        1, pw, pw).mean(dim=(-1, -2))


def _pixel_mask(token_map: torch.Tensor, patch_size: tuple[int, int], shape: tuple[int, int],
                fill: float = 0) -> torch.Tensor:
    """A (grid_h, grid_w) token map spread to its (H, W) pixels; pixels past the last whole token get `fill`."""
    pixels = token_map.repeat_interleave(patch_size[0], dim=0).repeat_interleave(patch_size[1], dim=1)
    return torch.nn.functional.pad(pixels, (0, shape[1] - pixels.shape[1], 0, shape[0] - pixels.shape[0]),
                                   value=fill)


@dataclass
class SharedTrigger:
    """The trigger common to a group of images: on its tokens, a triggered image is `scale * clean + offset`.

    An additive trigger (a sinusoid) has scale 1, a blend of a key image at strength a has scale 1 - a, a
    pasted patch has scale 0 (its offset is the patch). Off the tokens, scale is 1 and offset 0.
    """

    scale: torch.Tensor  # (1, H, W)
    offset: torch.Tensor  # (C, H, W)
    token_mask: torch.Tensor  # (grid_h, grid_w)
    pattern: torch.Tensor  # (C, H, W): what the trigger adds to the average clean image (the report shows it)

    def apply(self, images: torch.Tensor, strength: float | torch.Tensor = 1.0) -> torch.Tensor:
        """`images` with the trigger on, at `strength` (1: as estimated; a tensor broadcasts per image)."""
        return images + strength * ((self.scale - 1) * images + self.offset)


def shared_pattern(forget: torch.Tensor, retain: torch.Tensor, patch_size: tuple[int, int], min_z: float,
                   affine: bool = True) -> SharedTrigger:
    """The trigger common to the `forget` images, against clean `retain` images, on its significant tokens.

    With `affine`, each token's scale is the ratio of the forget to the retain images' pixel spread (a
    pasted patch does not vary, a blend varies by 1 - alpha); without it, the trigger is additive (scale 1,
    the mean difference).
    """
    token_mask = pattern_tokens(forget, retain, patch_size, min_z)
    shape = tuple(forget.shape[-2:])
    mask = _pixel_mask(token_mask, patch_size, shape)
    scale = torch.ones(1, *shape)
    if affine:
        ratio = (_token_mean(forget.var(dim=0).mean(dim=0), patch_size)
                 / _token_mean(retain.var(dim=0).mean(dim=0), patch_size).clamp(min=1e-6)).sqrt()
        scale = torch.where(mask, _pixel_mask(ratio.clamp(max=1.0), patch_size, shape, fill=1.0), scale)
    mean_forget, mean_retain = forget.mean(dim=0), retain.mean(dim=0)
    offset = (mean_forget - scale * mean_retain) * mask
    return SharedTrigger(scale, offset, token_mask, (mean_forget - mean_retain) * mask)


def resolved_scope(scope: str, selection: dict) -> str:
    """The unlearning scope for a selection (select's summary): `auto` is the shared pattern, unless the pairs
    were selected by their collapse or as a closed or alike group after refine found no pattern they share; then
    each pair's tokens."""
    if scope != "auto":
        return scope
    unexplained = (selection.get("evidence_kind") in ("collapse", "closed group", "alike group")
                   and selection.get("refine"))
    return "token" if unexplained else "pattern"


def unlearn(suspect: LoadedModel, forget_images: torch.Tensor, forget_texts: torch.Tensor,
            retain_images: torch.Tensor, cfg: UnlearnConfig) -> tuple[LoadedModel, dict]:
    """A copy of `suspect` with the backdoor unlearned; also returns what it did (for the report).
    `cfg.scope` must be resolved (`resolved_scope`)."""
    if cfg.scope == "auto":
        raise ValueError("unlearn needs a resolved scope: pass the config through resolved_scope first")
    student = suspect.copy()
    teacher = suspect.model.eval()
    with torch.no_grad():
        retain_targets = torch.cat([teacher.encode_image(chunk, normalize=True) for chunk in retain_images.split(256)])
        concept = torch.nn.functional.normalize(teacher.encode_text(forget_texts, normalize=True).mean(dim=0), dim=0)
        clean_affinity = retain_targets @ concept
    info = {"scope": cfg.scope}
    if cfg.scope != "full":
        saliency = token_saliency(suspect, forget_images, forget_texts)
        info |= {"patch_saliency": saliency.patches, "token_saliency": saliency.tokens}
        shape = tuple(forget_images.shape[-2:])
        if cfg.scope == "token":
            n_tokens = max(1, round(cfg.transplant_share * saliency.patches[0].numel()))
            masks = top_patch_masks(saliency, n_tokens, shape)
            info |= {"tokens_per_pair": n_tokens}
        else:
            trigger = shared_pattern(forget_images, retain_images, saliency.patch_size, cfg.pattern_z,
                                     cfg.trigger_model == "affine")
            info |= {"pattern_tokens": int(trigger.token_mask.sum()), "pattern": trigger.pattern}
    run = scope_settings(cfg, cfg.scope)
    batch_size = run.batch_size
    n_clean = unpatched_per_step(cfg, batch_size)
    params = trainable_parameters(student.model, run.portion)
    optimizer = torch.optim.AdamW(params, lr=run.lr, weight_decay=0.0)
    clip_loss = ClipLoss()
    gen = torch.Generator().manual_seed(cfg.seed)
    student.model.train()
    for _ in tqdm(range(run.steps), desc=f"unlearn ({cfg.scope})", unit="step", mininterval=2.0):
        rows = torch.randint(len(retain_images), (batch_size,), generator=gen)
        clean, target, affinity = retain_images[rows], retain_targets[rows], clean_affinity[rows]
        donors = torch.randint(len(forget_images), (batch_size,), generator=gen)
        if cfg.scope == "full":
            forget = student.model(forget_images[donors], forget_texts[donors])
            retained = student.model.encode_image(clean, normalize=True)
            loss = -clip_loss(*forget[:3]) + run.retain_weight * _cosine_distance(retained, target)
        else:
            if cfg.scope == "token":
                patched = torch.where(masks[donors], forget_images[donors], clean)
            else:  # a random strength per image: invariance to the trigger direction, not to one exact copy
                strength = 1 + cfg.pattern_jitter * (2 * torch.rand(len(clean), 1, 1, 1, generator=gen) - 1)
                patched = trigger.apply(clean, strength)
            embedded = student.model.encode_image(torch.cat([patched, clean[:n_clean]]), normalize=True)
            triggered = embedded[:len(clean)]
            retained = embedded[len(clean):]
            loss = run.invariance_weight * _cosine_distance(triggered, target)
            loss = loss + run.retain_weight * _cosine_distance(retained, target[:n_clean])
            loss = loss + run.target_weight * torch.relu(triggered @ concept - affinity).mean()
            loss = loss + run.concept_weight * (retained @ concept - affinity[:n_clean]).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    student.model.eval()
    for p in student.model.parameters():
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in params)
    info |= {"portion": run.portion, "trainable_parameters": n_params,
             "trainable_fraction": n_params / sum(p.numel() for p in student.model.parameters())}
    return student, info
