"""Budget-aware search: width x sparsity x quantization, scored on the device runtime.

For a device profile, every candidate of the grid is built, compressed and evaluated with
LiteRT (accuracy, size, gzip size, latency on this CPU) and, for MCU profiles, on the
tflite-micro interpreter itself: its accuracy (validation and test splits, each sample
invoked on TFLM with a batch of 1; ``val_samples``/``test_samples`` say how many) replaces
LiteRT's, ``scored_on`` says ``tflm``, and its arena bytes are the RAM figure. LiteRT's scores
are kept beside (``litert_accuracy``, ``litert_test_accuracy``). Candidates run in a process
pool (``spawn``, one job per width: train — or reuse the registered model at its own width —
then prune to each sparsity, then quantize to each mode). The Pareto front is taken over
validation accuracy (max), flash (min), RAM (min) and latency (min); each candidate is
marked as fitting the profile or not, with the reasons. Nothing is registered: the search is
recorded as a registry run (kind ``search``) with its parameters, the front and the log.

When ``EDGEOPS_RAY_ADDRESS`` is set (``local``, ``auto``, ``HOST:PORT`` or
``ray://HOST:PORT``), the same per-width job runs as Ray tasks instead: see
:func:`ray_address`. Ray is imported only then (the ``ray`` extra).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import socket
from collections.abc import Generator, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack, closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeops.compress._progress import Steps
from edgeops.compress.errors import CompressError, NothingFitsError
from edgeops.compress.pareto import pareto_front
from edgeops.compress.profiles import DeviceProfile, Needs, get_profile
from edgeops.compress.quantize import (
    check_mode,
    quantize,
    representative_sample,
    tflite_tensor_bytes,
)

if TYPE_CHECKING:
    from edgeops.data import DatasetService
    from edgeops.registry import Registry
    from edgeops.registry.models import ModelVersionView

__all__ = [
    "RAY_ADDRESS_VARIABLE",
    "Candidate",
    "SearchResult",
    "mark_candidates",
    "ray_address",
    "run_search",
]

DEFAULT_WIDTHS = (0.25, 0.5, 1.0)
RAY_ADDRESS_VARIABLE = "EDGEOPS_RAY_ADDRESS"
RAY_LOCAL_OBJECT_STORE_BYTES = 200 * 2**20  # a local instance's object store (jobs: data + model)
RAY_CONNECT_TIMEOUT_S = 5.0  # TCP check of a HOST:PORT address before Ray's own, longer retries
_HOST_PORT = re.compile(r"^(?:ray://)?(?P<host>\[[^\]]+\]|[^:/\s]+):(?P<port>\d{1,5})$")


@dataclass
class Candidate:
    """One point of the grid, as measured."""

    width: float
    sparsity: float
    quantization: str
    accuracy: float  # validation split, on `scored_on` (AUC for anomaly models)
    test_accuracy: float  # test split, on `scored_on`
    flash_bytes: int  # the .tflite's size
    gzip_bytes: int
    ram_bytes: int | None  # TFLM arena (MCU profiles); LiteRT's tensor bytes (Linux profiles)
    arena_bytes: int | None  # tflite-micro arena, when TFLM can plan the model
    latency_ms: float  # median LiteRT invoke on this CPU
    macs: int | None
    ops: list[str] = field(default_factory=list)
    scored_on: str = "litert"  # "tflm": MCU profile, scored on the tflite-micro interpreter
    val_samples: int = 0  # samples behind `accuracy` (TFLM: at most TFLM_MAX_SAMPLES)
    test_samples: int = 0  # samples behind `test_accuracy`
    litert_accuracy: float | None = None  # validation split on LiteRT (when scored on TFLM)
    litert_test_accuracy: float | None = None
    fits: bool = False
    misfits: list[str] = field(default_factory=list)
    on_front: bool = False

    @property
    def label(self) -> str:
        return f"width {self.width:g}, sparsity {self.sparsity:.0%}, {self.quantization}"

    def needs(self) -> Needs:
        return Needs(self.flash_bytes, self.ram_bytes, tuple(self.ops), self.latency_ms)

    def objectives(self) -> tuple[float, float, float, float]:
        """Minimised: -accuracy, flash, RAM (unknown: infinite), latency."""
        ram = math.inf if self.ram_bytes is None else float(self.ram_bytes)
        return (-self.accuracy, float(self.flash_bytes), ram, self.latency_ms)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchResult:
    """Every candidate, marked; the front is the candidates with ``on_front``."""

    model_id: str
    profile: DeviceProfile
    metric: str
    candidates: list[Candidate]
    run_id: str | None = None

    @property
    def front(self) -> list[Candidate]:
        return [c for c in self.candidates if c.on_front]

    @property
    def best(self) -> Candidate | None:
        """The most accurate fitting candidate (smallest flash on ties)."""
        fitting = [c for c in self.candidates if c.fits]
        return max(fitting, key=lambda c: (c.accuracy, -c.flash_bytes), default=None)

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "model_id": self.model_id,
            "run_id": self.run_id,
            "profile": self.profile.to_dict(),
            "metric": self.metric,
            "candidates": [c.to_dict() for c in self.candidates],
            "front": [i for i, c in enumerate(self.candidates) if c.on_front],
            "best": None if best is None else self.candidates.index(best),
        }


def mark_candidates(candidates: list[Candidate], profile: DeviceProfile) -> None:
    """Mark each candidate's fit to ``profile`` and membership of the Pareto front."""
    front = set(pareto_front([c.objectives() for c in candidates]))
    for i, candidate in enumerate(candidates):
        candidate.misfits = profile.misfits(candidate.needs())
        candidate.fits = not candidate.misfits
        candidate.on_front = i in front


def _nothing_fits(candidates: list[Candidate], profile: DeviceProfile) -> NothingFitsError:
    smallest = min(
        candidates,
        key=lambda c: (c.flash_bytes, math.inf if c.ram_bytes is None else c.ram_bytes),
    )
    ram = "unknown" if smallest.ram_bytes is None else f"{smallest.ram_bytes} B"
    ops = "any" if profile.ops is None else f"{len(profile.ops)} ops"
    return NothingFitsError(
        f"no candidate fits device profile {profile.name!r} (flash {profile.flash_bytes} B, "
        f"RAM {profile.ram_bytes} B, {profile.runtime}, {ops}): the smallest, "
        f"{smallest.label}, needs flash {smallest.flash_bytes} B, RAM {ram} "
        f"({'; '.join(smallest.misfits)})",
        candidates=list(candidates),
    )


@dataclass(frozen=True)
class _WidthJob:
    """Everything one worker process needs for the candidates of one width."""

    width: float
    arch: str
    keras: bytes | None  # the registered model, when its width is this width
    arrays: Any
    task: str
    metric: str
    runtime: str
    sparsities: tuple[float, ...]
    modes: tuple[str, ...]
    epochs: int
    fine_tune_epochs: int
    seed: int


# each job with its candidates, in the order they finish
_Completed = Generator[tuple[_WidthJob, list[Candidate]], None, None]


def _evaluate_width(job: _WidthJob) -> list[Candidate]:
    """Runs in a worker process: build, prune, quantize and evaluate one width's grid."""
    from edgeops.compress.prune import prune
    from edgeops.evaluate import evaluate_artifact, tflm_arena_bytes, tflm_evaluate
    from edgeops.export.card import op_set
    from edgeops.train.trainer import load_keras, train_model

    arrays = job.arrays
    if job.keras is not None:
        model = load_keras(job.keras)
    else:
        model, _ = train_model(
            arrays, job.arch, epochs=job.epochs, seed=job.seed, width=job.width, progress=False
        )
    x_val = np.asarray(arrays.model_inputs("val"), dtype=np.float32)
    x_test = np.asarray(arrays.model_inputs("test"), dtype=np.float32)
    representative = representative_sample(arrays.model_inputs("train"))
    results: list[Candidate] = []
    for sparsity in job.sparsities:
        pruned = (
            model
            if sparsity == 0
            else prune(model, arrays, sparsity=sparsity, epochs=job.fine_tune_epochs, seed=job.seed)
        )
        for mode in job.modes:
            flatbuffer = quantize(pruned, mode, representative)
            val = evaluate_artifact(flatbuffer, "tflite", x_val, arrays.y_val, task=job.task)
            test = evaluate_artifact(flatbuffer, "tflite", x_test, arrays.y_test, task=job.task)
            arena = test.arena_bytes
            if arena is None and job.runtime == "tflm":
                arena = tflm_arena_bytes(flatbuffer)
            # MCU: the arena TFLM plans; Linux: every tensor LiteRT holds (same rule for all)
            ram = arena if job.runtime == "tflm" else tflite_tensor_bytes(flatbuffer)
            litert_val = float(val.to_dict()[job.metric])
            litert_test = float(test.to_dict()[job.metric])
            scores, scored_on = (litert_val, litert_test), "litert"
            counts = (val.num_samples, test.num_samples)
            if job.runtime == "tflm" and arena is not None:
                # an MCU candidate is scored on the interpreter the MCU runs
                tflm_val = tflm_evaluate(flatbuffer, x_val, arrays.y_val, task=job.task)
                tflm_test = tflm_evaluate(flatbuffer, x_test, arrays.y_test, task=job.task)
                if tflm_val is not None and tflm_test is not None:
                    scores, scored_on = (tflm_val.score, tflm_test.score), "tflm"
                    counts = (tflm_val.num_samples, tflm_test.num_samples)
            results.append(
                Candidate(
                    width=job.width,
                    sparsity=sparsity,
                    quantization=mode,
                    accuracy=scores[0],
                    test_accuracy=scores[1],
                    scored_on=scored_on,
                    val_samples=counts[0],
                    test_samples=counts[1],
                    litert_accuracy=litert_val,
                    litert_test_accuracy=litert_test,
                    flash_bytes=int(test.size_bytes),
                    gzip_bytes=int(test.gzip_bytes),
                    ram_bytes=ram,
                    arena_bytes=arena,
                    latency_ms=float(test.latency_ms_median),
                    macs=None if test.macs is None else int(test.macs),
                    ops=op_set(flatbuffer, "tflite"),
                )
            )
    return results


def ray_address() -> str | None:
    """The Ray cluster the search runs on: ``EDGEOPS_RAY_ADDRESS``, or None (process pool).

    This is the one place the variable is read. ``local`` starts a Ray instance on this
    machine for the search and stops it afterwards; ``auto`` joins the instance started here
    with ``ray start``; ``HOST:PORT`` is a cluster's GCS address and ``ray://HOST:PORT`` its
    Ray Client server. A malformed value is a :class:`CompressError`.
    """
    address = os.environ.get(RAY_ADDRESS_VARIABLE, "").strip()
    if not address:
        return None
    if address not in ("local", "auto") and not _HOST_PORT.match(address):
        raise CompressError(
            f"{RAY_ADDRESS_VARIABLE} must be 'local', 'auto', HOST:PORT or ray://HOST:PORT, "
            f"not {address!r}"
        )
    return address


def _first_line(reason: object) -> str:
    lines = str(reason).strip().splitlines()
    return lines[0] if lines else type(reason).__name__


def _unreachable(address: str, reason: object) -> CompressError:
    """One line: Ray's message, plus the gist of its root cause when it has one."""
    detail, root = _first_line(reason), reason
    while isinstance(root, BaseException) and root.__cause__ is not None:
        root = root.__cause__  # e.g. "Failed to connect to Ray cluster" <- an auth error
    if root is not reason:  # its message may hold a traceback: the last line is the error
        last = str(root).strip().splitlines() or [type(root).__name__]
        detail += f" ({last[-1].split('. ')[0]})"
    return CompressError(f"cannot reach Ray at {address!r} ({RAY_ADDRESS_VARIABLE}): {detail}")


def _bootstrap_target(address: str) -> tuple[str, int] | None:
    """The host and port Ray will dial for ``address``; None for ``local``.

    ``auto`` is resolved as Ray resolves it (``RAY_ADDRESS``, else the last ``ray start`` on
    this machine), so a stale record of a stopped instance fails here instead of hanging.
    """
    if address == "local":
        return None
    if address == "auto":
        try:  # Ray's own resolution; a private function, so its absence only skips the check
            from ray._private import services

            resolve: Any = services.canonicalize_bootstrap_address
        except (ImportError, AttributeError):
            return None
        try:
            address_or_none = resolve("auto")
        except (ConnectionError, ValueError) as exc:
            raise _unreachable("auto", exc) from exc
        if not isinstance(address_or_none, str):
            return None
        resolved = address_or_none
    else:
        resolved = address
    found = _HOST_PORT.match(resolved)
    return None if found is None else (found["host"].strip("[]"), int(found["port"]))


@contextmanager
def _ray_session(address: str, cpus: int) -> Iterator[Any]:
    """The ``ray`` module, connected to ``address``; disconnected (or stopped) afterwards.

    A connection this process already has (``ray.init`` called by the caller) is used as it
    is and left open. ``cpus`` sizes a ``local`` instance, as ``workers`` sizes the pool.
    """
    try:
        import ray
    except ImportError as exc:
        raise CompressError(
            f"{RAY_ADDRESS_VARIABLE} is set to {address!r} but ray is not installed; "
            "install it with pip install 'edgeops[ray]'"
        ) from exc
    if ray.is_initialized():
        yield ray
        return
    target = _bootstrap_target(address)
    if target is not None:  # fail in seconds, not after Ray's minutes of reconnect attempts
        try:
            socket.create_connection(target, timeout=RAY_CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise _unreachable(address, exc.strerror or exc) from exc
    options: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address == "local":
        options |= {
            "num_cpus": cpus,
            "include_dashboard": False,
            "object_store_memory": RAY_LOCAL_OBJECT_STORE_BYTES,
        }
    try:
        ray.init(address=address, **options)
    except Exception as exc:
        raise _unreachable(address, exc) from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def _on_ray(ray: Any, address: str, jobs: list[_WidthJob]) -> _Completed:
    """Each job as a Ray task: 1 CPU, a fresh worker process per job (a clean TensorFlow)."""
    from ray.exceptions import RayError, RayTaskError

    task = ray.remote(num_cpus=1, max_calls=1)(_evaluate_width)
    pending = {task.remote(job): job for job in jobs}
    try:
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready)
            try:
                done: list[Candidate] = ray.get(ready)
            except RayTaskError as exc:  # the job's own error, as the process pool raises it
                raise exc.cause from exc
            except RayError as exc:
                raise CompressError(
                    f"Ray at {address!r} lost width {job.width:g}: {_first_line(exc)}"
                ) from exc
            yield job, done
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def _in_processes(jobs: list[_WidthJob], processes: int) -> _Completed:
    """Each job in a process pool (``spawn``: every worker has a clean TensorFlow)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        futures = {pool.submit(_evaluate_width, job): job for job in jobs}
        for future in as_completed(futures):
            yield futures[future], future.result()


def _check_grid(
    widths: tuple[float, ...], sparsities: tuple[float, ...], modes: tuple[str, ...]
) -> None:
    if not widths or not sparsities or not modes:
        raise CompressError("the search grid is empty: give at least one width, sparsity, mode")
    for width in widths:
        if not (math.isfinite(width) and 0 < width <= 8):
            raise CompressError(f"search width must be in (0, 8], not {width}")
    for sparsity in sparsities:
        if not 0 <= sparsity < 1:
            raise CompressError(f"search sparsity must be in [0, 1), not {sparsity}")
    for mode in modes:
        check_mode(mode)


def run_search(
    datasets: DatasetService,
    registry: Registry,
    parent: ModelVersionView,
    profile_name: str,
    *,
    profiles_file: Path | None = None,
    widths: tuple[float, ...] | None = None,
    sparsities: tuple[float, ...] = (0.0, 0.5),
    modes: tuple[str, ...] | None = None,
    epochs: int | None = None,
    fine_tune_epochs: int = 1,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
) -> SearchResult:
    """Search the grid for ``profile_name`` starting from the Keras version ``parent``.

    ``widths`` defaults to 0.25, 0.5 and 1 times the parent's width; ``modes`` to the
    profile's; ``epochs`` (training of other widths) to the parent's training epochs.
    Jobs run in ``workers`` processes, or as Ray tasks when ``EDGEOPS_RAY_ADDRESS`` is set
    (:func:`ray_address`; a Ray that cannot be reached is a :class:`CompressError` raised
    before the run starts). Raises :class:`NothingFitsError` when no candidate fits (the run
    is recorded as failed).
    """
    from edgeops.compress.service import model_task, score_key

    profile = get_profile(profile_name, profiles_file)
    config = parent.config
    arch = str(config.get("architecture") or config.get("arch") or "")
    parent_width = float(config.get("width", 1.0))
    grid_widths = widths or tuple(sorted({round(parent_width * w, 4) for w in DEFAULT_WIDTHS}))
    grid_modes = modes or profile.modes
    _check_grid(grid_widths, sparsities, grid_modes)
    address = ray_address()
    training = config.get("training")
    recorded = config.get("epochs") or (
        training.get("epochs") if isinstance(training, dict) else None
    )
    train_epochs = int(epochs or recorded or 5)
    if any(w != parent_width for w in grid_widths) and not arch:
        raise CompressError(
            f"model {parent.id} ({parent.ref}) records no architecture, so other widths "
            "cannot be trained; search its own width only"
        )
    task = model_task(config)
    metric = score_key(task)
    arrays = datasets.load(parent.dataset_version)
    parent_bytes = registry.load_artifact(parent.id)
    jobs = [
        _WidthJob(
            width=width,
            arch=arch,
            keras=parent_bytes if width == parent_width else None,
            arrays=arrays,
            task=task,
            metric=metric,
            runtime=profile.runtime,
            sparsities=tuple(sorted(set(sparsities))),
            modes=tuple(dict.fromkeys(grid_modes)),
            epochs=train_epochs,
            fine_tune_epochs=fine_tune_epochs,
            seed=seed,
        )
        for width in grid_widths
    ]
    slots = max(1, min(workers, len(jobs)))
    params = {
        "backend": "process pool" if address is None else f"ray {address}",
        "model": parent.id,
        "profile": profile.to_dict(),
        "widths": list(grid_widths),
        "sparsities": list(jobs[0].sparsities),
        "modes": list(jobs[0].modes),
        "epochs": train_epochs,
        "fine_tune_epochs": fine_tune_epochs,
        "seed": seed,
        "workers": workers,
    }
    with ExitStack() as stack:
        if address is None:
            completed, where = _in_processes(jobs, slots), f"{slots} processes"
        else:  # connected before the run starts: an unreachable Ray leaves no run behind
            ray = stack.enter_context(_ray_session(address, slots))
            completed, where = _on_ray(ray, address, jobs), f"Ray at {address}"
        run = stack.enter_context(registry.start_run("search", params))
        candidates: list[Candidate] = []
        with Steps(len(jobs), f"search {profile.name}", enabled=progress) as steps:
            steps.start(f"{len(jobs)} widths on {where}")
            for job, done in stack.enter_context(closing(completed)):
                run.log(f"width {job.width:g}: {len(done)} candidates evaluated")
                candidates.extend(done)
                steps.done()
        candidates.sort(key=lambda c: (c.width, c.sparsity, c.quantization))
        mark_candidates(candidates, profile)
        result = SearchResult(parent.id, profile, metric, candidates, run.id)
        run.log_metrics(
            {
                "candidates": len(candidates),
                "fitting": sum(c.fits for c in candidates),
                "front": [c.to_dict() for c in result.front],
            }
        )
        if not any(c.fits for c in candidates):
            raise _nothing_fits(candidates, profile)
        return result
