"""rlhfkit.eval: evaluation metrics (pure functions) and evaluation runs."""
