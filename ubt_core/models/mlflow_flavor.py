"""MLflow pyfunc for an open_clip local-dir checkpoint, logged as MLflow "models from code".

`ubt_core.tracking.register_model` copies this file into every logged model and MLflow runs it when the
model loads, so it imports no ubt code: torch, open_clip, pandas and Pillow are enough to serve it. Do not
import it from ubt code (its last line sets MLflow's module-level "model to log").
"""

from __future__ import annotations

import io

import mlflow
import open_clip
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel
from PIL import Image

CHECKPOINT = "checkpoint"  # the artifact key holding the open_clip local-dir
TEXT_COLUMN, IMAGE_COLUMN = "caption", "image"
TEXT_OUT, IMAGE_OUT = "text_embedding", "image_embedding"
BATCH = 64  # rows per forward pass: bounds memory, never changes an embedding


class OpenClipEmbedder(PythonModel):
    """Embeds captions and/or encoded images (PNG/JPEG bytes) with an open_clip checkpoint, on CPU."""

    def load_context(self, context) -> None:
        name = "local-dir:" + context.artifacts[CHECKPOINT]
        # weights_only: checkpoints come from people we do not trust
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, weights_only=True)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """One row per input row: `text_embedding` for a `caption` column, `image_embedding` for an
        `image` column; each cell is an L2-normalised list of floats, or None where the input is null."""
        out = pd.DataFrame(index=model_input.index)
        if TEXT_COLUMN in model_input:
            out[TEXT_OUT] = self._embed(model_input[TEXT_COLUMN], self._encode_text)
        if IMAGE_COLUMN in model_input:
            out[IMAGE_OUT] = self._embed(model_input[IMAGE_COLUMN], self._encode_images)
        if out.shape[1] == 0:
            raise MlflowException.invalid_parameter_value(
                f"input has columns {list(model_input.columns)}; pass a `{TEXT_COLUMN}` column (strings) and/or "
                f"an `{IMAGE_COLUMN}` column (PNG/JPEG bytes)."
            )
        return out

    def _embed(self, column: pd.Series, encode) -> list:
        values = column.tolist()
        present = [i for i, v in enumerate(values) if v is not None and not (isinstance(v, float) and v != v)]
        result: list = [None] * len(values)
        with torch.inference_mode():
            for start in range(0, len(present), BATCH):
                rows = present[start:start + BATCH]
                emb = encode([values[i] for i in rows]).float().tolist()
                for i, vector in zip(rows, emb, strict=True):
                    result[i] = vector
        return result

    def _encode_text(self, captions: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer([str(c) for c in captions]), normalize=True)

    def _encode_images(self, images: list[bytes]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        return self.model.encode_image(pixels, normalize=True)


mlflow.models.set_model(OpenClipEmbedder())
