"""rlhfkit.data.tasks."""
