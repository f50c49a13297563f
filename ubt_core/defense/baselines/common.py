"""What the baseline defenses share: their budget, the fine-tuning loop, per-pair losses and the report.

Every baseline is a fine-tune of the suspect under its own loss and data. The budget is counted in
pair-passes (one pair through forward and backward once), so the baselines can be held to the same
compute: CleanCLIP's paper budget (10 epochs over a clean set a fifth the size of the poisoned
fine-tuning data) scaled to the benchmark.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from ubt_core.defense.embed import embed_batch, embeddings_of
from ubt_core.models import LoadedModel
from ubt_core.train import PairDataset, optimizer_step, param_groups, warmup_cosine


class BaselineConfig(BaseModel):
    """The fine-tuning budget and optimiser every baseline uses (defaults: the benchmark's, see docs/results.md)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a silent default

    pair_passes: int = Field(40_000, ge=2)  # forward+backward of one pair; 4,000 clean pairs x 10 epochs
    batch_size: int = Field(128, ge=4)
    lr: float = Field(1e-4, gt=0)  # the benchmark's fine-tuning learning rate
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(20, ge=0)
    max_logit_scale: float = Field(100.0, gt=1)
    abl_isolation: float = Field(0.01, gt=0, lt=1)  # ABL: share of lowest-loss pairs isolated (the paper's 1 %)
    abl_isolated_per_batch: int = Field(32, ge=2)  # ABL: isolated pairs ascended per step
    abl_unlearn_weight: float = Field(1.0, gt=0)  # ABL: weight of the ascent term
    seed: int = 0

    @property
    def steps(self) -> int:
        return max(1, self.pair_passes // self.batch_size)


StepLoss = Callable[[torch.nn.Module, int], torch.Tensor]  # (model in train mode, step) -> loss


def fine_tune(suspect: LoadedModel, step_loss: StepLoss, cfg: BaselineConfig, desc: str) -> LoadedModel:
    """A copy of `suspect` trained for `cfg.steps` AdamW + warmup-cosine steps on `step_loss`."""
    student = suspect.copy()
    model = student.model
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps))
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", mininterval=2.0)
    for step in bar:
        model.train()
        loss = step_loss(model, step)
        optimizer_step(model, loss, optimizer, scheduler, cfg.max_logit_scale)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return student


def batches_per_epoch(rows: int, batch_size: int) -> int:
    """How many batches `epoch_batches` makes of each epoch over `rows` rows."""
    return max(1, rows // batch_size)


def epoch_batches(rows: np.ndarray, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless batches of `rows`: each epoch a fresh seeded permutation, the last partial batch dropped."""
    rows = np.asarray(rows)
    size = min(batch_size, len(rows))
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(rows)
        for batch in range(batches_per_epoch(len(order), size)):
            yield order[batch * size:(batch + 1) * size]


@torch.no_grad()
def per_pair_clip_loss(loaded: LoadedModel, dataset: PairDataset, batch_size: int, seed: int) -> np.ndarray:
    """Each pair's CLIP loss (mean of its image->text and text->image cross-entropy) in a random batch."""
    model = loaded.model.eval()
    order = np.random.default_rng(seed).permutation(len(dataset))
    losses = np.empty(len(dataset), np.float32)
    for start in tqdm(range(0, len(order), batch_size), desc="per-pair loss", unit="batch", mininterval=2.0):
        rows = order[start:start + batch_size]
        image, text, scale = model(*dataset.stack(rows))[:3]
        logits = scale * image @ text.T
        labels = torch.arange(len(rows))
        pair = (F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels, reduction="none"))
        losses[rows] = (pair / 2).numpy()
    return losses


def pair_cosines(loaded: LoadedModel, table: pa.Table, batch_size: int = 512) -> np.ndarray:
    """Image-caption cosine similarity of every pair of `table` under `loaded` (the scan's embedding)."""
    batches = range(0, table.num_rows, batch_size)
    return torch.cat([embeddings_of(embed_batch(table.slice(start, batch_size), loaded)).cosine
                      for start in tqdm(batches, desc="cosines", unit="batch", mininterval=2.0)]).numpy()
