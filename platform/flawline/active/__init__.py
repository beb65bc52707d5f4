"""Active learning: choose which unlabelled images the annotators should label next."""

from flawline.active.strategies import (
    STRATEGIES,
    PoolScores,
    Selection,
    Strategy,
    k_center_greedy,
    list_strategies,
    make_strategy,
    register_strategy,
    select,
    select_k_center,
    strategy_names,
)

__all__ = [
    "STRATEGIES",
    "PoolScores",
    "Selection",
    "Strategy",
    "k_center_greedy",
    "list_strategies",
    "make_strategy",
    "register_strategy",
    "select",
    "select_k_center",
    "strategy_names",
]
