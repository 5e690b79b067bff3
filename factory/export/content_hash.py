"""The content hash of a dataset's rows: what `factory train` records as `dataset_hash` and `factory publish` as
`export_hash`, so `trainings` and `publications` join on it whatever the files' bytes."""

from __future__ import annotations

import hashlib
from typing import Any

from factory.core.keys import canonical_json


def dataset_hash(dd: Any) -> str:
    """A hash of the rows the training sees (every split), independent of where and how they are stored."""
    digest = hashlib.sha256()
    for split in sorted(dd):
        digest.update(split.encode())
        for row in dd[split]:
            digest.update(canonical_json(row).encode())
    return digest.hexdigest()[:16]
