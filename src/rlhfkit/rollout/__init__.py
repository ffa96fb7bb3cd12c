"""Rollout generation: the Generator protocol and its Hugging Face implementation."""
