"""rlhfkit.losses."""
