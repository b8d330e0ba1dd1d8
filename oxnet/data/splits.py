"""The one patient split: train / val / test per patient, by a seeded hash of the patient's key.

The store (:func:`db.projects.assign_splits`), the granularity sweep
(:func:`oxnet.experiments.sweep.split_by_patient`) and the active-learning simulation
(:func:`oxnet.experiments.simulate.plan_labels`) all place images with :func:`split_of` on the key of
:func:`patient_key`, so an image lands in the same split everywhere for the same seed and fractions.

The rule (the store's since its first version, so existing stores' splits do not move):

- every image of a patient goes where the patient goes;
- an image without a patient id is its own patient, with the key ``image:<image id>``;
- a patient goes to train when ``u < train``, to val when ``u < train + val``, else to test, where
  ``u`` in [0, 1) is the first 8 bytes of SHA-256 of ``"<seed>:<key>"`` as a fraction. Each patient
  is placed on its own (not by counting), so the placement of a patient never depends on which other
  images exist: a patient that arrives later lands where it would have landed in the first place.

The fractions are therefore reached on average, not exactly: a small set of patients may leave a
split empty, which :func:`split_patients` reports when asked (``require``).

Torch-free: the store imports it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

#: The splits in the order the fractions name them.
SPLITS = ("train", "val", "test")


def patient_key(patient_id: object | None, image_id: object) -> str:
    """The key an image is split by: its patient id, or ``image:<image id>`` for an image without one."""
    return str(patient_id) if patient_id is not None else f"image:{image_id}"


def unit_hash(seed: int, key: str) -> float:
    """A number in [0, 1) from ``seed`` and ``key`` (SHA-256): the same on every machine and run."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def check_fractions(fractions: tuple[float, float, float]) -> None:
    """ValueError unless ``fractions`` are three non-negative numbers (train, val, test) summing to 1."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test) summing to 1, got {fractions}")


def split_of(key: str, *, seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """The split ("train", "val" or "test") of the patient with ``key`` (see the module docstring)."""
    u = unit_hash(seed, key)
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


def split_patients(
    keys: Iterable[str],
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    require: Iterable[str] = (),
) -> dict[str, str]:
    """``{key: split}`` for every distinct key, by :func:`split_of`.

    Raises:
        ValueError: bad ``fractions``, or a split named in ``require`` that received no patient (too
            few patients for the fractions; the message says how many there are).
    """
    check_fractions(fractions)
    placed = {key: split_of(key, seed=seed, fractions=fractions) for key in dict.fromkeys(keys)}
    counts: Mapping[str, int] = {s: sum(1 for v in placed.values() if v == s) for s in SPLITS}
    empty = [s for s in require if counts[s] == 0]
    if empty:
        raise ValueError(f"the {' and '.join(empty)} split got no patient: {len(placed)} patients are too few for "
                         f"fractions {tuple(fractions)} with seed {seed}; use more images, larger fractions "
                         "or another seed")
    return placed
