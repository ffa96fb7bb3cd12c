"""Models: loading (hub, local, embedded), precision policy, heads, forward passes.

Importing this package registers rlhfkit's ``varlen_sdpa`` attention with transformers.
"""

from rlhfkit.models import attention as _attention  # noqa: F401  (registers varlen_sdpa)
