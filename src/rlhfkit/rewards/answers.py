"""Answer-checking rewards usable as ``module:function``.

The verifiers of the reasoning issue (``rewards/verifiers/``) will build on these.
"""

from __future__ import annotations

import re


def exact_answer(completion: str, answer: str) -> float:
    """1.0 when the completion's last number equals ``answer`` (the verifiable schema's field)."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", completion.replace(",", ""))
    return float(bool(numbers) and numbers[-1] == str(answer).strip())
