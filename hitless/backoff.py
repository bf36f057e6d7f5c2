"""Waiting between retries: bounded exponential backoff with full jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Bounded exponential backoff with full jitter."""

    initial_s: float = 0.2
    max_s: float = 5.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_s, self.initial_s * 2**attempt))
