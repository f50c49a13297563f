"""The pair-dataset contract and the synthetic benchmark."""

from ubt_core.data.contract import (
    DataContractError,
    EvalClasses,
    PairSet,
    read_eval_set,
    read_pairs,
    write_pairs,
)

__all__ = ["DataContractError", "EvalClasses", "PairSet", "read_eval_set", "read_pairs", "write_pairs"]
