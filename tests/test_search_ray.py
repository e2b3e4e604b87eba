"""The search's Ray backend (``EDGEOPS_RAY_ADDRESS``), on a real local Ray instance.

Ray is in the ``all`` extra, so ``make test`` installs it: these tests never skip. The Ray
run is the process-pool test's tiny search (digits CNN, widths 0.5 and 1, int8, 1 epoch),
started with ``EDGEOPS_RAY_ADDRESS=local``: the search starts Ray (2 CPUs, no dashboard,
200 MB object store) and stops it afterwards.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from edgeops.compress import search
from edgeops.compress.errors import CompressError
from edgeops.compress.search import SearchResult
from tests.test_compress import Hub
from tests.test_compress import hub as hub  # the module fixture: a registered digits CNN

pytestmark = pytest.mark.slow  # a trained parent model; the Ray test starts Ray and TF workers

TINY_SEARCH: dict[str, Any] = {
    "widths": (0.5, 1.0),  # 1.0 is the parent itself; 0.5 is trained for 1 epoch
    "sparsities": (0.0,),
    "modes": ("int8",),
    "epochs": 1,
    "workers": 2,
    "progress": False,
}


def measured(result: SearchResult) -> list[dict[str, Any]]:
    """Every candidate as a dict, without the one timing (latency varies run to run)."""
    return [{k: v for k, v in c.to_dict().items() if k != "latency_ms"} for c in result.candidates]


def grid_point(result: SearchResult) -> list[tuple[float, float, str]]:
    return [(c.width, c.sparsity, c.quantization) for c in result.front]


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_ray_backend_finds_what_the_process_pool_finds(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    on_processes = hub.service.search(hub.parent.id, "cortex-m4-256k", **TINY_SEARCH)

    def no_process_pool(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Ray backend must not start a process pool")

    monkeypatch.setattr(search, "ProcessPoolExecutor", no_process_pool)
    monkeypatch.setenv("EDGEOPS_RAY_ADDRESS", "local")
    on_ray = hub.service.search(hub.parent.id, "cortex-m4-256k", **TINY_SEARCH)

    assert not ray.is_initialized()  # the search stopped the instance it started
    assert len(on_ray.candidates) == 2
    assert measured(on_ray) == measured(on_processes)
    assert grid_point(on_ray) == grid_point(on_processes) and on_ray.front
    assert on_ray.best is not None and on_processes.best is not None
    assert on_ray.best.label == on_processes.best.label
    run = hub.registry.get_run(on_ray.run_id or "")
    assert run.status == "succeeded" and run.params["backend"] == "ray local"
    assert hub.registry.get_run(on_processes.run_id or "").params["backend"] == "process pool"


@pytest.mark.parametrize("scheme", ["ray://", ""])  # Ray Client server, GCS address
def test_unreachable_ray_is_one_clear_error_naming_the_address(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    address = f"{scheme}127.0.0.1:{closed_port()}"
    monkeypatch.setenv("EDGEOPS_RAY_ADDRESS", address)
    runs_before = len(hub.registry.list_runs(kind="search"))
    with pytest.raises(CompressError) as caught:
        hub.service.search(hub.parent.id, "cortex-m4-256k", **TINY_SEARCH)
    message = str(caught.value)
    assert message.startswith(f"cannot reach Ray at {address!r} (EDGEOPS_RAY_ADDRESS): ")
    assert "\n" not in message
    assert len(hub.registry.list_runs(kind="search")) == runs_before  # no run was started


def test_auto_resolving_to_a_stopped_instance_fails_at_once(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = f"127.0.0.1:{closed_port()}"  # what `auto` finds once the instance has stopped
    monkeypatch.setenv("RAY_ADDRESS", stale)
    monkeypatch.setenv("EDGEOPS_RAY_ADDRESS", "auto")
    with pytest.raises(CompressError, match=r"^cannot reach Ray at 'auto' .*: Connection refused$"):
        hub.service.search(hub.parent.id, "cortex-m4-256k", **TINY_SEARCH)


def test_malformed_ray_address_names_the_forms_it_accepts(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEOPS_RAY_ADDRESS", "http://head-node")
    with pytest.raises(CompressError, match=r"EDGEOPS_RAY_ADDRESS must be 'local', 'auto'"):
        hub.service.search(hub.parent.id, "cortex-m4-256k", **TINY_SEARCH)


def test_cli_unreachable_ray_is_one_line_without_traceback(hub: Hub) -> None:
    from tests.clitools import assert_one_line_error, run_cli

    address = f"ray://127.0.0.1:{closed_port()}"
    result = run_cli(
        "edgeops",
        "compress",
        hub.parent.id,
        "--profile",
        "cortex-m4-256k",
        "--widths",
        "1",
        env={"EDGEOPS_DATA_DIR": str(hub.root), "EDGEOPS_RAY_ADDRESS": address},
    )
    assert_one_line_error(result, f"cannot reach Ray at {address!r}", "Connection refused")
