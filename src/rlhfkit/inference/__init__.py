"""Inference commands: sample from a model and score, select or filter what it wrote.

``eval`` (:mod:`~rlhfkit.inference.evaluate`), ``generate``, ``rs`` (rejection sampling, whose
selected rows feed an SFT run), ``bon`` (best-of-N), ``filter`` (difficulty filter) and
``decontam``. Each samples through the same :class:`rlhfkit.rollout.Generator` as training.
"""
