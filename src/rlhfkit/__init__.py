"""rlhfkit: the RLHF pipeline (SFT, reward models, RL, direct alignment) as a hackable library."""

__version__ = "0.1.0"
