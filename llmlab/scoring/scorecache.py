"""Label scores already computed in this session, so a prompt is scored once: eval's calibration
methods differ only after scoring, and content-free prompts repeat across items. Owned by the
session that loaded the model (never a module global), bounded by bytes, least recently used first."""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import TYPE_CHECKING, Hashable, Optional, Tuple

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

# A prompt's label probabilities, label log-probabilities, and hidden states (a float32 vector) or None.
Scores = Tuple[list[float], list[float], Optional["NDArray[np.float32]"]]

DEFAULT_BYTES = 256 * 2**20  # 256 MiB: ~1M two-label entries, or ~5k entries with 3 x 4,096-wide states


class ScoreCache:
    """key -> (label probabilities, label log-probabilities, hidden states or None)."""

    def __init__(self, max_bytes: int = DEFAULT_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Hashable, tuple[Scores, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Scores | None:
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)  # recently used: dropped last
        return found[0]

    def put(self, key: Hashable, entry: Scores) -> None:
        size = entry_bytes(key, entry)
        if key in self._entries:
            self.bytes -= self._entries.pop(key)[1]
        if size > self.max_bytes:
            return  # larger than the whole budget: not kept
        self._entries[key] = (entry, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped


def entry_bytes(key: Hashable, entry: Scores) -> int:
    """An entry's size: its floats (8 bytes each), its hidden states' buffer and its key's text."""
    probs, logprobs, hidden = entry
    text = sum(len(part) for part in key if isinstance(part, str)) if isinstance(key, tuple) else sys.getsizeof(key)
    return 8 * (len(probs) + len(logprobs)) + int(getattr(hidden, "nbytes", 0)) + text + 64
