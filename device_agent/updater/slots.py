"""Two model slots and the pointer that names the active one.

::

    <state_dir>/slots/a/            a model bundle: card.json + model.tflite (or model.onnx,
                                    or firmware.tar for a card of runtime ``firmware``)
    <state_dir>/slots/b/            the other one
    <state_dir>/slots/active.json   {"active": "a", "previous": "b" | null,
                                     "targets": {"a": "<target path>", "b": "..."}}

Only the inactive slot is ever written: :meth:`Slots.write` wipes it, writes the model and
``card.json`` (each temp file + fsync + rename), fsyncs the slot directory, then loads the
result with :meth:`ModelBundle.load` so a slot that does not load is never activated. The
pointer is replaced atomically (temp + fsync + rename + directory fsync): that replacement
*is* the activation, so after a power cut at any moment the pointer names the old or the new
slot, and either one is complete. A slot seeded from a configured ``model_dir`` has no
target path (it is missing from ``targets``); see :meth:`Slots.seed`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from device_agent.card import ModelCard
from device_agent.errors import AgentError
from device_agent.fsio import (
    atomic_write_bytes,
    atomic_write_chunks,
    atomic_write_json,
    fsync_dir,
    make_dir,
)
from device_agent.runtime import CARD_FILE, MODEL_FILES, ModelBundle, parse_card
from device_agent.runtime._bundle import model_file_name

__all__ = ["POINTER_FILE", "SLOT_NAMES", "Pointer", "SlotError", "Slots", "fsync_dir"]

SLOT_NAMES = ("a", "b")
POINTER_FILE = "active.json"
_CHUNK = 1 << 20


class SlotError(AgentError):
    """A slot or the pointer file is unusable; the message names the path."""


@dataclass(frozen=True)
class Pointer:
    """The content of ``active.json``."""

    active: str
    previous: str | None = None
    targets: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"active": self.active, "previous": self.previous, "targets": dict(self.targets)}

    @classmethod
    def from_dict(cls, data: Any, where: str = POINTER_FILE) -> Pointer:
        if not isinstance(data, Mapping):
            raise SlotError(f"{where}: expected a JSON object, got {type(data).__name__}")
        active, previous, targets = data.get("active"), data.get("previous"), data.get("targets")
        if active not in SLOT_NAMES:
            raise SlotError(f"{where}: field 'active' must be one of {SLOT_NAMES}, got {active!r}")
        if previous is not None and previous not in SLOT_NAMES:
            raise SlotError(
                f"{where}: field 'previous' must be one of {SLOT_NAMES} or null, got {previous!r}"
            )
        if targets is None:
            targets = {}
        if not isinstance(targets, Mapping) or not all(
            k in SLOT_NAMES and (v is None or isinstance(v, str)) for k, v in targets.items()
        ):
            raise SlotError(f"{where}: field 'targets' must map slot names to target paths")
        known = {k: v for k, v in targets.items() if v is not None}  # null: no target path
        return cls(active=str(active), previous=previous, targets=known)

    def target(self, slot: str | None = None) -> str | None:
        """The target path the slot (default: the active one) was installed from."""
        return self.targets.get(self.active if slot is None else slot)


def other(slot: str) -> str:
    """The other slot's name."""
    return SLOT_NAMES[1 - SLOT_NAMES.index(slot)]


class Slots:
    """The A/B slots under ``root`` (``<state_dir>/slots``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        # card file -> (its stat identity, its model id): a state report every heartbeat
        # would otherwise parse both cards (test vectors and all) each time
        self._model_ids: dict[Path, tuple[tuple[int, int, int], str | None]] = {}

    @property
    def pointer_file(self) -> Path:
        return self.root / POINTER_FILE

    def dir(self, slot: str) -> Path:
        if slot not in SLOT_NAMES:
            raise SlotError(f"unknown slot {slot!r}; slots are {', '.join(SLOT_NAMES)}")
        return self.root / slot

    def pointer(self) -> Pointer | None:
        """The pointer, or None before anything was installed or seeded."""
        try:
            raw = self.pointer_file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SlotError(f"{self.pointer_file}: cannot read: {exc}") from exc
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SlotError(f"{self.pointer_file}: not valid JSON: {exc}") from exc
        return Pointer.from_dict(data, str(self.pointer_file))

    def active(self) -> str | None:
        pointer = self.pointer()
        return pointer.active if pointer else None

    def active_dir(self) -> Path | None:
        """The directory of the active slot, or None if no slot was ever activated."""
        slot = self.active()
        return self.dir(slot) if slot else None

    def inactive(self) -> str:
        """The slot a new model goes to: the one the pointer does not name ("a" if none)."""
        slot = self.active()
        return SLOT_NAMES[0] if slot is None else other(slot)

    # -- writing ---------------------------------------------------------------------------

    def wipe(self, slot: str) -> None:
        """Remove everything in ``slot``; refused for the active slot.

        The pointer forgets the slot's target path first, so it never pairs that target with
        the model written into the slot next."""
        pointer = self.pointer()
        if pointer is not None and slot == pointer.active:
            raise SlotError(f"slot {slot} is active; only the inactive slot is written")
        if pointer is not None and slot in pointer.targets:
            targets = {k: v for k, v in pointer.targets.items() if k != slot}
            self.switch(replace(pointer, targets=targets))
        directory = self.dir(slot)
        if directory.exists():
            shutil.rmtree(directory)
        make_dir(self.root)
        fsync_dir(self.root)

    def write(
        self, slot: str, model_file: Path, card: ModelCard, card_json: bytes | None = None
    ) -> ModelBundle:
        """Wipe the inactive ``slot``, write ``model_file`` and ``card`` into it, fsync, and
        return the bundle loaded from it (BundleError if it does not load).

        ``card_json``: the card's JSON as already written (``card.to_json()``), so it is not
        serialized again; it must hold ``card``."""
        self.wipe(slot)
        directory = self.dir(slot)
        directory.mkdir(parents=True)
        fsync_dir(self.root)
        name = model_file_name(card)
        atomic_write_chunks(directory / name, _read_chunks(model_file))
        text = card_json if card_json is not None else card.to_json().encode()
        atomic_write_bytes(directory / CARD_FILE, text)
        fsync_dir(directory)
        return ModelBundle.load(directory)

    def seed(self, model_dir: Path) -> bool:
        """Activate the configured bundle in ``model_dir`` unless a release took over.

        With no pointer, the bundle is copied into slot a and activated: the configured model
        is the slot a rollback returns to. While the active slot still holds a configured
        bundle (no target path) that differs from ``model_dir`` (the configuration changed),
        the new one is copied into the inactive slot and activated the same way. Once a
        release was installed, ``model_dir`` is not read. Returns True if it activated a
        slot; BundleError if ``model_dir`` does not hold a loadable bundle.
        """
        pointer = self.pointer()
        if pointer is not None and (
            pointer.target() is not None or _same_bundle(self.dir(pointer.active), model_dir)
        ):
            return False
        bundle = ModelBundle.load(model_dir)
        slot = self.inactive()
        self.wipe(slot)
        directory = self.dir(slot)
        directory.mkdir(parents=True)
        fsync_dir(self.root)
        atomic_write_chunks(directory / bundle.model_path.name, _read_chunks(bundle.model_path))
        atomic_write_bytes(directory / CARD_FILE, (model_dir / CARD_FILE).read_bytes())
        fsync_dir(directory)
        ModelBundle.load(directory)
        targets = {k: v for k, v in (pointer.targets if pointer else {}).items() if k != slot}
        self.switch(
            Pointer(active=slot, previous=pointer.active if pointer else None, targets=targets)
        )
        return True

    def switch(self, pointer: Pointer | None) -> None:
        """Replace the pointer atomically (None removes it: no slot is active)."""
        make_dir(self.root)
        if pointer is None:
            self.pointer_file.unlink(missing_ok=True)
            fsync_dir(self.root)
            return
        self.dir(pointer.active)  # a known slot name
        atomic_write_json(self.pointer_file, pointer.to_dict())

    # -- reporting -------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """``{"active": "a", "a": {"target", "model_id"}, "b": {...}}`` for ``state.slots``
        (empty before any slot was activated)."""
        try:
            pointer = self.pointer()
        except SlotError as exc:
            return {"error": str(exc)}
        if pointer is None:
            return {}  # nothing was ever activated
        report: dict[str, Any] = {"active": pointer.active}
        for slot in SLOT_NAMES:
            card_path = self.dir(slot) / CARD_FILE
            if not card_path.exists():
                continue
            report[slot] = {"target": pointer.target(slot), "model_id": self._model_id(card_path)}
        return report

    def _model_id(self, card_path: Path) -> str | None:
        """The model id of a slot's card, parsed again only when the file changed (every
        write replaces it: a new inode, size or modification time)."""
        try:
            stat = card_path.stat()
        except OSError:
            return None
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = self._model_ids.get(card_path)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            model_id: str | None = parse_card(card_path.read_bytes()).model_id
        except (OSError, AgentError):
            model_id = None
        self._model_ids[card_path] = (key, model_id)
        return model_id


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    for chunk in _read_chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def _same_bundle(slot_dir: Path, model_dir: Path) -> bool:
    """True if ``slot_dir`` holds the same card and model file as ``model_dir``."""
    try:
        for name in (CARD_FILE, *MODEL_FILES):
            mine, theirs = slot_dir / name, model_dir / name
            if mine.exists() != theirs.exists():
                return False
            if mine.exists() and _digest(mine) != _digest(theirs):
                return False
    except OSError:
        return False
    return True


def _read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            yield chunk
