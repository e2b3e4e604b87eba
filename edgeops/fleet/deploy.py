"""Pointing devices at a signed release: ``edgeops devices deploy``.

A deployment is checked completely before anything changes (:func:`plan_deploy`): the release
must be a target of the hub's release repository, every device must be known to the hub, and
the desired patch must be valid. Only then (the caller has meanwhile connected its publisher
to the broker) :func:`apply_deploy` sets ``desired.release`` of every device in one
transaction and publishes the devices' desired documents, retained.

What names the release:

=====================================  =================================================
``digits-mlp/3/litert/model.tflite``   that target (anything with a ``/``)
``digits-mlp``                         the newest released version of the model name
``digits-mlp:3``                       the released targets of version 3
``m-3f2a9c01b7de``                     the released targets of that model version
``digits-mlp@production``              the registry's newest version in that stage
=====================================  =================================================

A model version released for several runtimes needs ``runtime`` to choose one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from edgeops.errors import ConfigError, NotFoundError
from edgeops.fleet.desired import validate_patch
from edgeops.fleet.models import DeviceView
from edgeops.fleet.service import FleetService

if TYPE_CHECKING:
    from edgeops.registry import Registry
    from edgeops.trust import Release, TrustRepository

__all__ = [
    "DeployPlan",
    "DeployResult",
    "DesiredSink",
    "apply_deploy",
    "plan_deploy",
    "resolve_release",
]

_MODEL_ID = re.compile(r"^m-[0-9a-f]{12}$")


class DesiredSink(Protocol):
    """Where desired documents go (:class:`edgeops.hub.DesiredPublisher`)."""

    def publish_many(self, devices: Sequence[DeviceView], wait_s: float = ...) -> list[str]: ...


@dataclass(frozen=True)
class DeployPlan:
    """A checked deployment: the release, the devices, and the patch that names it."""

    release: Release
    device_ids: list[str]
    patch: dict[str, Any]


@dataclass
class DeployResult:
    """What :func:`apply_deploy` did."""

    release: Release
    devices: list[DeviceView]
    changed: list[str]  # devices whose desired document changed (new version)
    unacknowledged: list[str] = field(default_factory=list)  # publishes the broker did not ack

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.release.path,
            "model_id": self.release.model_id,
            "runtime": self.release.runtime,
            "devices": [
                {
                    "device_id": device.device_id,
                    "desired_version": device.desired_version,
                    "changed": device.device_id in self.changed,
                    "published": device.device_id not in self.unacknowledged,
                }
                for device in self.devices
            ],
        }


def resolve_release(
    repository: TrustRepository,
    ref: str,
    *,
    runtime: str | None = None,
    registry: Registry | None = None,
) -> Release:
    """The released target ``ref`` names (see the module docstring); NotFoundError if none,
    ConfigError if it names several and ``runtime`` does not choose one."""
    from edgeops.trust import Release

    ref = ref.strip()
    versions = repository.versions()
    releases = [Release.of(target, versions) for target in repository.targets()]
    if not ref:
        raise ConfigError("name a release: a target path or a model version")
    if "/" in ref:
        for release in releases:
            if release.path == ref:
                if runtime is not None and release.runtime != runtime:
                    raise ConfigError(
                        f"target {ref!r} is released for runtime {release.runtime}, not {runtime}"
                    )
                return release
        raise NotFoundError(
            f"target {ref!r} is not in the release repository ({_known(releases)}); "
            "`edgeops release MODEL` publishes one"
        )
    if _MODEL_ID.fullmatch(ref):
        matches = [release for release in releases if release.model_id == ref]
    elif "@" in ref:
        if registry is None:
            raise ConfigError(f"{ref!r}: a stage reference needs the model registry")
        view = registry.get_model(ref)
        matches = [r for r in releases if _name_seq(r.path) == (view.name, view.seq)]
    else:
        name, sep, seq = ref.partition(":")
        if sep and not seq.isdigit():
            raise ConfigError(f"release {ref!r}: after ':' comes a version number, got {seq!r}")
        of_name = [r for r in releases if _name_seq(r.path)[0] == name]
        if sep:
            matches = [r for r in of_name if _name_seq(r.path)[1] == int(seq)]
        else:
            numbers = [n for r in of_name if (n := _name_seq(r.path)[1]) is not None]
            newest = max(numbers, default=None)
            matches = [r for r in of_name if _name_seq(r.path)[1] == newest]
    if runtime is not None:
        matches = [release for release in matches if release.runtime == runtime]
    if not matches:
        suffix = f" for runtime {runtime}" if runtime is not None else ""
        raise NotFoundError(
            f"no released target of {ref!r}{suffix} in the release repository "
            f"({_known(releases)}); `edgeops release {ref}` publishes one"
        )
    if len(matches) > 1:
        raise ConfigError(
            f"{ref!r} is released as {len(matches)} targets ("
            + ", ".join(release.path for release in matches)
            + "); choose one with --runtime or give the target path"
        )
    return matches[0]


def plan_deploy(
    fleet: FleetService,
    repository: TrustRepository,
    ref: str,
    device_ids: Sequence[str],
    *,
    runtime: str | None = None,
    registry: Registry | None = None,
) -> DeployPlan:
    """Check a deployment without changing anything: the release, every device, the patch."""
    ids = list(dict.fromkeys(device_ids))
    if not ids:
        raise ConfigError("name at least one device (--device ID)")
    release = resolve_release(repository, ref, runtime=runtime, registry=registry)
    missing = []
    for device_id in ids:
        try:
            fleet.get_device(device_id)
        except NotFoundError:
            missing.append(device_id)
    if missing:
        raise NotFoundError(
            f"unknown device{'s' if len(missing) > 1 else ''}: "
            + ", ".join(repr(device_id) for device_id in missing)
            + " (enroll with `edgeops devices enroll NAME`); nothing was deployed"
        )
    document: dict[str, Any] = {"target": release.path}
    if release.model_id:
        document["model_id"] = release.model_id
    patch = validate_patch({"release": document})
    return DeployPlan(release, ids, patch)


def apply_deploy(fleet: FleetService, sink: DesiredSink, plan: DeployPlan) -> DeployResult:
    """Set every planned device's desired release (one transaction), then publish them all."""
    before = {
        device_id: fleet.get_device(device_id).desired_version for device_id in plan.device_ids
    }
    views = fleet.set_desired_many(plan.device_ids, plan.patch)
    changed = [view.device_id for view in views if view.desired_version != before[view.device_id]]
    unacknowledged = sink.publish_many(views)
    return DeployResult(plan.release, views, changed, unacknowledged)


def _name_seq(path: str) -> tuple[str, int | None]:
    """(model name, version) of a target path ``{name}/{seq}/{runtime}/model.*``."""
    parts = path.split("/")
    if len(parts) == 4 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return parts[0], None


def _known(releases: Sequence[Release]) -> str:
    if not releases:
        return "nothing is released yet"
    shown = ", ".join(release.path for release in releases[:5])
    more = f" and {len(releases) - 5} more" if len(releases) > 5 else ""
    return f"released: {shown}{more}"
