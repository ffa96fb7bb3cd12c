"""rlhfkit.recipes."""
