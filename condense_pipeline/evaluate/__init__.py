"""Train on the condensed set, test on real data (DESIGN.md 6), and the public loader."""

from condense_pipeline.evaluate.loader import (
    CondensedDataset,
    dsa_collate,
    load_condensed,
    load_condensed_ray,
)
from condense_pipeline.evaluate.protocol import (
    EvalConfig,
    evaluate_condensed,
    random_real_subsets,
    train_and_test,
)

__all__ = [
    "CondensedDataset",
    "EvalConfig",
    "dsa_collate",
    "evaluate_condensed",
    "load_condensed",
    "load_condensed_ray",
    "random_real_subsets",
    "train_and_test",
]
