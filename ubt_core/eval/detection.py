"""Detection quality of a suspicion score against ground-truth `poisoned` flags."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def detection_metrics(suspicion: np.ndarray, poisoned: np.ndarray, k: int) -> dict[str, float | int]:
    """Precision and recall of the k most suspicious pairs, and the score's AUROC."""
    poisoned = np.asarray(poisoned, bool)
    top = np.argsort(-suspicion, kind="stable")[:k]
    hits = int(poisoned[top].sum())
    n_poisoned = int(poisoned.sum())
    single_class = n_poisoned in (0, len(poisoned))
    return {"k": int(k), "n_poisoned": n_poisoned, "hits_at_k": hits,
            "precision_at_k": hits / k if k else float("nan"),
            "recall_at_k": hits / n_poisoned if n_poisoned else float("nan"),
            "auroc": float("nan") if single_class else float(roc_auc_score(poisoned, suspicion))}
