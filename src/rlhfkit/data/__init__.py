"""rlhfkit.data."""
