"""Key groups: the unit keyed state is split, routed, checkpointed and rescaled by.

A key hashes (:func:`key_hashes`, the same in every process) into one of ``key_groups``
groups; group ``g`` belongs to partition ``g * parallelism // key_groups`` of a keyed
exchange, so a restore at another parallelism moves whole groups (Flink's design).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from millstream.core.hashing import hash_columns

#: Key groups of a streaming job unless ``start(key_groups=...)`` says otherwise.
DEFAULT_KEY_GROUPS = 128


def key_hashes(columns: list[Any], num_rows: int) -> np.ndarray:
    """The key-group hash (uint64) of every row's key columns, the same in every process."""
    return hash_columns(columns, num_rows)


def key_group_owners(key_groups: int, parallelism: int) -> np.ndarray:
    """Partition index owning each key group: ``g * parallelism // key_groups`` (contiguous)."""
    return (np.arange(key_groups, dtype=np.int64) * parallelism) // key_groups


def owned_key_groups(index: int, parallelism: int, key_groups: int) -> range:
    """The key groups partition ``index`` of ``parallelism`` owns."""
    return range((index * key_groups + parallelism - 1) // parallelism,
                 ((index + 1) * key_groups + parallelism - 1) // parallelism)


def python_key_hash(key: Any) -> int:
    """Key-group hash of a Python key value (fallback when the key's Arrow row was not seen)."""
    import pyarrow as pa

    values = list(key) if isinstance(key, tuple) else [key]
    return int(key_hashes([pa.array([v]) for v in values], 1)[0])
