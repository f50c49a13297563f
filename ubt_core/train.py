"""CLIP contrastive training and fine-tuning in plain torch.

`train_step` is the unit every training-like stage shares (a later Ray Train job calls it per
worker). `train_clip` runs the whole loop: seeded, AdamW + warmup-cosine schedule, logit-scale clamp,
a progress bar, and a resumable checkpoint after every epoch under OUT/checkpoints.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import safetensors.torch
import torch
from pydantic import BaseModel, Field
from tqdm import tqdm

from ubt_core.data.contract import read_pairs
from ubt_core.data.images import decode_pixels
from ubt_core.errors import UbtError
from ubt_core.losses import ClipLoss
from ubt_core.models import LoadedModel, load_model, save_model

STATE_NAME = "train_state.pt"


class TrainConfig(BaseModel):
    """How to train. Defaults are the synthetic benchmark's from-scratch setting on 2 CPU cores."""

    model: str = "ubt-tiny"  # open_clip / ubt config name; ignored when `init` is set
    init: str | None = None  # checkpoint dir to fine-tune from (the poisoned fine-tuning threat setting)
    epochs: int = Field(12, ge=1)  # 8 - 11 min for 20k pairs with ubt-tiny on 2 cores (docs/benchmark.md)
    batch_size: int = Field(128, ge=2)  # contrastive: more in-batch negatives, same cost per pair
    lr: float = Field(1e-3, gt=0)  # peak; use about 1e-4 when fine-tuning a trained model
    weight_decay: float = Field(0.1, ge=0)  # not applied to gains, biases and the logit scale
    warmup_steps: int = Field(100, ge=0)
    max_logit_scale: float = Field(100.0, gt=1)  # CLIP's clamp on the learned temperature
    seed: int = 0  # model init and data order (epoch e shuffles with seed + e)
    pixel_cache_mb: int = Field(1024, ge=0)  # decoded images kept between epochs; never changes a weight


@dataclass
class TrainResult:
    out_dir: Path
    epochs: int
    steps: int
    seconds: float  # training wall time, summed over the runs a resumed training took
    final_loss: float


class PairDataset(torch.utils.data.Dataset):
    """Contract rows as (image tensor, token ids); images decode on the fly, each caption tokenizes once,
    when first asked for (a stage that reads a few hundred rows of millions does not tokenize them all).

    With `cache_mb`, preprocessed images are kept until that much memory is used, so a second epoch over
    them decodes nothing (a decoded image is the same tensor each time: the eval transform is deterministic).
    """

    def __init__(self, table: pa.Table, loaded: LoadedModel, cache_mb: float = 0):
        self.images = table.column("image").to_pylist()
        self.captions = table.column("caption").to_pylist()
        self.tokenizer = loaded.tokenizer
        self.preprocess_pixels = loaded.preprocess_pixels
        self._tokens: dict[int, torch.Tensor] = {}
        self._pixels: dict[int, torch.Tensor] = {}
        self._cache_left = cache_mb * 2**20

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pixels([i])[0], self.tokens([i])[0]

    def tokens(self, rows) -> torch.Tensor:
        """Token ids (N, context) of the captions of `rows`, in that order."""
        rows = [int(i) for i in rows]
        new = [i for i in dict.fromkeys(rows) if i not in self._tokens]
        if new:
            self._tokens.update(zip(new, self.tokenizer([self.captions[i] for i in new]), strict=True))
        return torch.stack([self._tokens[i] for i in rows])

    def pixels(self, rows) -> torch.Tensor:
        """The preprocessed images (N, 3, H, W) of `rows`, in that order (those not cached decode as one batch)."""
        rows = [int(i) for i in rows]
        new = [i for i in dict.fromkeys(rows) if i not in self._pixels]
        decoded = dict(zip(new, self.preprocess_pixels([decode_pixels(self.images[i]) for i in new]), strict=True)
                       ) if new else {}
        for i, pixels in decoded.items():
            if pixels.nbytes > self._cache_left:
                break
            self._pixels[i] = pixels.clone()  # not a view: it would keep the whole batch alive
            self._cache_left -= pixels.nbytes
        return torch.stack([self._pixels[i] if i in self._pixels else decoded[i] for i in rows])

    def stack(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The images (N, 3, H, W) and token ids (N, context) of `rows`, in that order."""
        rows = [int(i) for i in rows]
        return self.pixels(rows), self.tokens(rows)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as in CLIP: no decay on gains, biases, norms and the logit scale."""
    no_decay = [p for n, p in model.named_parameters()
                if p.requires_grad and (p.ndim < 2 or "bias" in n or "ln" in n or "logit_scale" in n)]
    ids = {id(p) for p in no_decay}
    decay = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def warmup_cosine(warmup: int, total: int):
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at `total` steps."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def optimizer_step(model, loss: torch.Tensor, optimizer, scheduler, max_logit_scale: float) -> None:
    """Back-propagate `loss`, step the optimizer and schedule, and clamp the logit scale as CLIP does."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        getattr(model, "module", model).logit_scale.clamp_(0, math.log(max_logit_scale))  # DDP wraps the model


def train_step(model, images, texts, loss_fn, optimizer, scheduler, max_logit_scale: float) -> dict[str, float]:
    """One optimisation step on a batch of pairs; returns the named loss terms."""
    model.train()
    image_features, text_features, logit_scale = model(images, texts)[:3]
    loss = loss_fn(image_features, text_features, logit_scale)
    optimizer_step(model, loss, optimizer, scheduler, max_logit_scale)
    return {"contrastive_loss": loss.item()}


def _latest_state(out_dir: Path) -> Path | None:
    states = sorted((out_dir / "checkpoints").glob(f"epoch_*/{STATE_NAME}"))
    return states[-1].parent if states else None


def _save_state(ckpt_dir: Path, loaded: LoadedModel, optimizer, scheduler, epoch: int, seconds: float) -> None:
    save_model(loaded, ckpt_dir)
    tmp = ckpt_dir / (STATE_NAME + ".tmp")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                "seconds": seconds}, tmp)
    tmp.replace(ckpt_dir / STATE_NAME)
    for old in (ckpt_dir.parent).glob("epoch_*"):  # keep only the newest resumable state
        if old != ckpt_dir:
            shutil.rmtree(old)


def train_clip(data_uri: str, out_dir: str | Path, cfg: TrainConfig, quarantine: str | None = None) -> TrainResult:
    """Train (or fine-tune) a CLIP model on a pair dataset and save it as a local-dir checkpoint.

    Re-running with the same `out_dir` resumes from the newest epoch checkpoint. With `quarantine`,
    rows with per-row faults are set aside there instead of stopping the run.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    table = read_pairs(data_uri, quarantine=quarantine).table  # bad data fails before any model work
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.init or cfg.model)
    model = loaded.model
    dataset = PairDataset(table, loaded, cfg.pixel_cache_mb)
    steps_per_epoch = len(dataset) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UbtError(f"{data_uri}: {len(dataset)} pairs is fewer than one batch ({cfg.batch_size}); "
                       "lower --batch-size.")
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.warmup_steps, cfg.epochs * steps_per_epoch))
    first_epoch, earlier_seconds = 0, 0.0
    resume = _latest_state(out_dir)
    if resume is not None:
        state = torch.load(resume / STATE_NAME, weights_only=True)
        model.load_state_dict(safetensors.torch.load_file(resume / "open_clip_model.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        first_epoch, earlier_seconds = state["epoch"] + 1, state["seconds"]
        tqdm.write(f"resuming {out_dir} after epoch {first_epoch}")
    loss_fn = ClipLoss()
    steps, loss = 0, float("nan")
    for epoch in range(first_epoch, cfg.epochs):
        order = torch.Generator().manual_seed(cfg.seed + epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                                             drop_last=True, generator=order)
        bar = tqdm(loader, desc=f"train epoch {epoch + 1}/{cfg.epochs}", unit="step", mininterval=2.0)
        for images, texts in bar:
            loss = train_step(model, images, texts, loss_fn, optimizer, scheduler, cfg.max_logit_scale)[
                "contrastive_loss"]
            steps += 1
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
        _save_state(out_dir / "checkpoints" / f"epoch_{epoch:03d}", loaded, optimizer, scheduler, epoch,
                    earlier_seconds + time.perf_counter() - start)
    model.eval()
    seconds = earlier_seconds + time.perf_counter() - start
    save_model(loaded, out_dir, extra={"trained_on": data_uri, "train_config": cfg.model_dump(),
                                       "train_seconds": round(seconds, 1)})
    return TrainResult(out_dir, cfg.epochs, steps, seconds, loss)
