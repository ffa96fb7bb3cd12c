"""rlhfkit.ops."""
