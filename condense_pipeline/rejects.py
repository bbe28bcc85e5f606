"""Counting rejected samples: shard -> kind -> count. The reader's summaries and the statistics'
checkpoints both count with these two functions, so their counts cannot drift apart."""

from __future__ import annotations


def reason_kind(reason: str) -> str:
    """The short category of a rejection reason: "undecodable image: ..." -> "undecodable image"."""
    return reason.split(":", 1)[0]


def count(rejected: dict[str, dict[str, int]], shard: str, reason: str) -> None:
    """Count one sample of `shard` rejected for `reason`, in place."""
    kinds = rejected.setdefault(str(shard), {})
    kind = reason_kind(str(reason))
    kinds[kind] = kinds.get(kind, 0) + 1


def merged(*parts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The counts of several disjoint parts of the data, added."""
    out: dict[str, dict[str, int]] = {}
    for part in parts:
        for shard, kinds in part.items():
            into = out.setdefault(shard, {})
            for kind, n in kinds.items():
                into[kind] = into.get(kind, 0) + n
    return out
