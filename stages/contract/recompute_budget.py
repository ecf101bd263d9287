"""Partial activation recomputation: how many decoder layers a batch recomputes, from its length and a budget.

A pure function of sizes, so that the memory plan (prepare's fit check) and the train loop apply the same rule;
its byte counts come from :func:`qlora_pipeline.stages.contract.memory_plan.recompute_budget`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RecomputeBudget:
    """How many decoder layers a batch of a given length recomputes in backward (gradient checkpointing).

    Why: recomputing every layer of every long batch, as transformers' checkpointing does, runs the forward pass
    twice (a third of such a step's matmul work) to save memory that a batch just under the threshold, which
    recomputes nothing, spends anyway. So the budget is what a batch of `tokens` tokens keeps without recomputing,
    and a longer batch recomputes its first layers, as few as keep it within that: a batch of 8 x 100 tokens
    against 512 recomputes 12 of SmolLM2's 30 layers, not 30. The first ones, because backward reaches them last,
    when the later layers' activations are freed: recomputing them then adds to less. Recomputation repeats the
    forward bit for bit (the dropout masks too), so how many layers recompute changes the time, never the result.
    """

    layers: int
    kept_per_token: int
    """Bytes a layer keeps for its backward, per token, when it is not recomputed."""
    input_per_token: int
    """Bytes a recomputed layer keeps, per token: its input."""
    tokens: int
    """The budget in tokens (train.checkpoint_min_tokens); 0: every layer of every batch recomputes."""

    def kept(self, tokens: int, recomputed: int) -> int:
        """Activation bytes saved at the end of the forward pass."""
        return tokens * (recomputed * self.input_per_token + (self.layers - recomputed) * self.kept_per_token)

    def peak(self, tokens: int, recomputed: int) -> int:
        """The most activation bytes held at once: what forward saved, plus, when every layer recomputes, the one
        being recomputed (with fewer, the recomputed layers come last, after the others' activations are freed)."""
        extra = tokens * self.kept_per_token if recomputed == self.layers and recomputed else 0
        return self.kept(tokens, recomputed) + extra

    def recomputed_layers(self, tokens: int) -> int:
        """The fewest first layers a batch of `tokens` tokens recomputes to stay within the budget (all of them
        when none is enough)."""
        budget = self.tokens * self.layers * self.kept_per_token
        return next((k for k in range(self.layers + 1) if self.peak(tokens, k) <= budget), self.layers)
