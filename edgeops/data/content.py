"""A dataset version's content, its version id (a content hash) and its stored form.

The version id is the hex SHA-256 of this byte sequence:

1. ``b"edgeops-dataset/1\\n"``
2. for each array, in this order: ``x`` (float32), ``y`` (int64), ``train``, ``val``,
   ``test`` (int64 indices into ``x``): one header line, the canonical JSON (below) of
   ``{"dtype": <numpy dtype string, little-endian, e.g. "<f4">, "name": ..., "shape": [...]}``
   followed by ``\\n``, then the array's bytes in C order, little-endian
3. the canonical JSON of ``{"classes": [...], "feature_names": [...] | null,
   "feature_rule": FeatureRule.to_dict(), "task": "classification"}``

Canonical JSON is ``json.dumps(doc, sort_keys=True, separators=(",", ":"),
ensure_ascii=True, allow_nan=False)``, UTF-8. So the same samples, labels, classes, split
and feature rule give the same id on any machine; change any of them and the id changes.
Reference statistics are derived from these and are not hashed.

The stored form is one ``.npz`` (a zip of ``.npy`` files, written with
``allow_pickle=False``) holding ``x``, ``y``, ``train``, ``val``, ``test`` and ``meta``
(item 3 above as a 0-d unicode array). Its zip entries carry a fixed timestamp, so the same
content also gives the same artifact bytes and digest. Reading it back recomputes the
version id, so a row can never hand out another dataset's arrays.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agent.features import FeatureRule, FeatureRuleError
from edgeops.data.errors import DataError
from edgeops.data.splits import SPLITS

HASH_PREFIX = b"edgeops-dataset/1\n"
TASK = "classification"
_ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)  # the earliest a zip entry can carry


def canonical_json(document: Any) -> str:
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


@dataclass(frozen=True)
class DatasetContent:
    """Exactly what a dataset version is: the arrays, the split, the classes and the rule."""

    x: np.ndarray
    y: np.ndarray
    splits: dict[str, np.ndarray]
    classes: list[str]
    feature_rule: FeatureRule
    feature_names: list[str] | None = None
    task: str = TASK

    def __post_init__(self) -> None:
        object.__setattr__(self, "x", np.ascontiguousarray(self.x, dtype="<f4"))
        object.__setattr__(self, "y", np.ascontiguousarray(self.y, dtype="<i8"))
        object.__setattr__(
            self,
            "splits",
            {name: np.ascontiguousarray(self.splits[name], dtype="<i8") for name in SPLITS},
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays in hashing order."""
        return {"x": self.x, "y": self.y, **self.splits}

    def meta(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "feature_names": None if self.feature_names is None else list(self.feature_names),
            "feature_rule": self.feature_rule.to_dict(),
            "task": self.task,
        }

    def version(self) -> str:
        """The version id: see the module docstring."""
        digest = hashlib.sha256(HASH_PREFIX)
        for name, array in self.arrays().items():
            header = {"dtype": array.dtype.str, "name": name, "shape": list(array.shape)}
            digest.update(canonical_json(header).encode() + b"\n")
            digest.update(array.tobytes(order="C"))
        digest.update(canonical_json(self.meta()).encode())
        return digest.hexdigest()

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of one split."""
        index = self.splits[name]
        return self.x[index], self.y[index]

    def to_npz(self) -> bytes:
        """The stored form: a deterministic ``.npz``."""
        buffer = io.BytesIO()
        arrays = {**self.arrays(), "meta": np.array(canonical_json(self.meta()))}
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, array in arrays.items():
                entry = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIMESTAMP)
                entry.compress_type = zipfile.ZIP_DEFLATED
                with archive.open(entry, "w", force_zip64=True) as fh:
                    np.save(fh, array, allow_pickle=False)
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, data: bytes, *, what: str) -> DatasetContent:
        """Read the stored form back; DataError naming ``what`` if it is not one."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in ("x", "y", *SPLITS, "meta")}
            meta = json.loads(str(arrays["meta"]))
            return cls(
                x=arrays["x"],
                y=arrays["y"],
                splits={name: arrays[name] for name in SPLITS},
                classes=list(meta["classes"]),
                feature_rule=FeatureRule.from_dict(meta["feature_rule"]),
                feature_names=meta["feature_names"],
                task=meta["task"],
            )
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            zipfile.BadZipFile,
            FeatureRuleError,
        ) as exc:
            raise DataError(f"the stored arrays of {what} are unreadable: {exc}") from exc
