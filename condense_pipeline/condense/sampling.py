"""Which real images each probe and each init pool sees: stable keyed hashes of the sample keys.

Numpy only (no torch), so Ray Data's read tasks can apply the rule and skip decoding the images
no probe samples (DESIGN.md section 4: image i counts for probe k iff u(key_i, k) < M / n_c).
"""

from __future__ import annotations

import hashlib

import numpy as np

EMPTY_HASH = np.iinfo(np.uint64).max


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of parts, stable across processes (never Python's hash())."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def key_hashes(keys: list[str], seed: int) -> np.ndarray:
    """A keyed 64-bit blake2b hash per sample key: uint64 [n]."""
    salt = seed.to_bytes(8, "little", signed=False)
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8, key=salt).digest(), "little")
            for k in keys
        ],
        dtype=np.uint64,
    )


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def probe_uniforms(hashes: np.ndarray, probes: int) -> np.ndarray:
    """u(key_i, k) in [0, 1) for every sample and probe: float64 [n, probes].

    One blake2b per key, then a splitmix64 finaliser per (key, probe): stable, keyed, vectorised.
    """
    with np.errstate(over="ignore"):
        mixed = hashes[:, None] ^ (
            np.arange(1, probes + 1, dtype=np.uint64)[None, :] * np.uint64(0xD1B54A32D192ED03)
        )
    return (_splitmix64(mixed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def membership(
    hashes: np.ndarray, labels: np.ndarray, counts, probes: int, real_per_probe: int | None
) -> np.ndarray:
    """bool [n, K]: image i counts for probe k iff u(key_i, k) < M / n_c (all if M is None)."""
    if real_per_probe is None:
        return np.ones((len(hashes), probes), dtype=bool)
    rate = real_per_probe / np.maximum(np.asarray(counts)[labels], 1)
    return probe_uniforms(hashes, probes) < rate[:, None]


def pool_hashes(keys: list[str], seed: int) -> np.ndarray:
    """The hash that orders the init pool and the bandwidth pilot (independent of membership)."""
    return key_hashes(keys, derive_seed(seed, "pool"))


def pool_limit(counts, init_pool: int) -> np.ndarray:
    """uint64 [C]: only images whose pool hash is below this can enter their class's pool.

    About 4P + 64 images per class pass, so the readers can leave the rest undecoded; a class ends
    up with fewer than P candidates with probability below 1e-14 (Chernoff), and then its pool is
    simply shorter. Classes of at most 4P + 64 images pass whole.
    """
    rate = (4 * init_pool + 64) / np.maximum(np.asarray(counts, dtype=np.float64), 1)
    return np.where(
        rate >= 1, EMPTY_HASH, (np.minimum(rate, 1 - 2.0**-52) * 2.0**64).astype(np.uint64)
    )


def needed(
    keys: list[str],
    labels: np.ndarray,
    *,
    seed: int,
    probes: int,
    real_per_probe: int | None,
    counts,
    init_pool: int,
) -> np.ndarray:
    """bool [n]: the images that some probe samples or that may enter their class's init pool;
    the pass need not decode any other."""
    if real_per_probe is None:
        return np.ones(len(keys), dtype=bool)
    sampled = membership(key_hashes(keys, seed), labels, counts, probes, real_per_probe).any(1)
    return sampled | (pool_hashes(keys, seed) < pool_limit(counts, init_pool)[labels])
