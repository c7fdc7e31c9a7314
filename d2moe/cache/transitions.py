"""EdgeMoE-style prediction: which experts follow which, counted across consecutive MoE layers.

EdgeMoE profiles, offline, how often expert j of layer l+1 runs after expert i of layer l, and prefetches
the most likely successors of the experts a token just used. Here the counts are kept online per engine
(decode steps only), so the prediction needs no profiling pass and adapts to the text being served.
"""

from __future__ import annotations

import numpy as np


class ExpertTransitions:
    """counts[l, i, j]: steps in which expert i ran at MoE layer l - 1 and expert j at layer l."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.counts = np.zeros((num_layers, num_experts, num_experts), dtype=np.int64)

    def observe(self, layer: int, before: list[int], now: list[int]) -> None:
        """Experts of layer - 1 (`before`) and of `layer` (`now`) in the same step."""
        if layer > 0 and before and now:
            self.counts[layer][np.ix_(before, now)] += 1

    def predict(self, layer: int, current: list[int], k: int) -> list[int]:
        """The k experts of `layer` that most often followed `current` at layer - 1 (fewer if never seen;
        ties to the lower id)."""
        if not 0 < layer < len(self.counts) or not current:
            return []
        score = self.counts[layer][current].sum(axis=0)
        order = np.argsort(-score, kind="stable")[:k]
        return [int(e) for e in order if score[e] > 0]
