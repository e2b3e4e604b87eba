"""The registry's routes: datasets, runs, models (lineage, card, compression, promotion) and
releases, through the real application and the session's real registry.

The session's registry (``model_factory``: the digits dataset, a digits MLP and its int8
compression) is copied into a data dir once per module; a release of the int8 model is
published into a real TUF repository there with :func:`edgeops.trust.release_model`, and a
search run is recorded in the shape ``edgeops compress --profile`` records it. Tests that
change something (promotions, registrations) work on a fresh copy of their own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
from fastapi.testclient import TestClient

from edgeops.api import create_app
from edgeops.api.context import ApiContext
from edgeops.config import Settings
from edgeops.db import Database
from tests.fixtures.models import ModelFactory


def _context(data_dir: Path) -> ApiContext:
    database = Database(f"sqlite:///{data_dir / 'edgeops.db'}")
    database.upgrade()
    return ApiContext(Settings(data_dir=data_dir), database)


class Api:
    """A TestClient on a fresh application, with a token of each role."""

    def __init__(self, context: ApiContext) -> None:
        self.context = context
        self.client = TestClient(create_app(context))
        self.tokens = {
            role: context.tokens.create(f"test-{role}", role)[1]
            for role in ("viewer", "operator", "admin")
        }

    def _headers(self, role: str, kwargs: dict[str, Any]) -> dict[str, str]:
        return {**kwargs.pop("headers", {}), "Authorization": f"Bearer {self.tokens[role]}"}

    def get(self, path: str, role: str = "viewer", **kwargs: Any) -> Any:
        headers = self._headers(role, kwargs)
        return self.client.get(f"/api/v1{path}", headers=headers, **kwargs)

    def post(self, path: str, role: str = "operator", **kwargs: Any) -> Any:
        headers = self._headers(role, kwargs)
        return self.client.post(f"/api/v1{path}", headers=headers, **kwargs)


@pytest.fixture(scope="module")
def hub(
    tmp_path_factory: pytest.TempPathFactory, model_factory: ModelFactory, int8_model_dir: Path
) -> Iterator[ApiContext]:
    """A data dir with the session's registry, a release of the int8 model, a search run."""
    from edgeops.trust import release_model

    data_dir = model_factory.copy_to(tmp_path_factory.mktemp("api-registry") / "data")
    context = _context(data_dir)
    int8 = next(m for m in context.registry.list_models() if m.parent_id is not None)
    context.repository.init(data_dir / "offline-root-keys")
    release_model(
        context.repository,
        int8.id,
        registry=context.registry,
        datasets=context.datasets,
        runtime="litert",
        hardware={"arch": ["x86_64"]},
    )
    front = {
        "width": 1.0,
        "sparsity": 0.0,
        "quantization": "int8",
        "accuracy": 0.9,
        "test_accuracy": 0.88,
        "flash_bytes": 4000,
        "gzip_bytes": 3000,
        "ram_bytes": 1200,
        "arena_bytes": 1200,
        "latency_ms": 0.01,
        "macs": 100,
        "on_front": True,
        "fits": True,
    }
    with context.registry.start_run(
        "search", {"model": model_factory.keras_ref, "profile": {"name": "cortex-m4-256k"}}
    ) as run:
        run.log_metrics({"candidates": 4, "fitting": 2, "front": [front]})
    context.extra["search_run"] = run.id
    context.extra["front"] = front
    try:
        yield context
    finally:
        context.database.dispose()


@pytest.fixture
def api(hub: ApiContext) -> Api:
    return Api(hub)


@pytest.fixture
def fresh(tmp_path: Path, model_factory: ModelFactory) -> Iterator[Api]:
    """An application on the test's own copy of the session's registry (no releases)."""
    context = _context(model_factory.copy_to(tmp_path / "own"))
    try:
        yield Api(context)
    finally:
        context.database.dispose()


# -- datasets ---------------------------------------------------------------------------------


def test_datasets_list_and_show_as_the_cli_gives_them(api: Api) -> None:
    listed = api.get("/datasets")
    assert listed.status_code == 200
    [digits] = [d for d in listed.json() if d["name"] == "digits"]
    assert "feature_rule" not in digits and "reference" not in digits
    view = api.context.datasets.resolve("digits")
    assert digits["version"] == view.version
    assert digits["num_samples"] == 1797 and len(digits["classes"]) == 10
    assert digits["model_input_shape"] == [8, 8, 1]

    for ref in ("digits", view.version, view.version[:10]):
        shown = api.get(f"/datasets/{ref}")
        assert shown.status_code == 200, shown.text
        document = shown.json()
        assert document["version"] == view.version
        assert document["feature_rule"] == view.feature_rule.to_dict()
        assert document["reference"] == view.reference.to_dict()
        assert document["split_sizes"] == view.split_sizes


def test_unknown_datasets_are_404_and_reads_register_nothing(api: Api) -> None:
    missing = api.get("/datasets/no-such-set")
    assert missing.status_code == 404 and "no-such-set" in missing.json()["detail"]
    assert api.get("/datasets/0123456789abcdef").status_code == 404
    # a built-in not registered yet: 404 pointing at POST, and still not registered
    before = len(api.context.datasets.list())
    unregistered = api.get("/datasets/mnist5k")
    assert unregistered.status_code == 404
    assert "POST /api/v1/datasets" in unregistered.json()["detail"]
    assert len(api.context.datasets.list()) == before
    for junk in ("-x", "a" * 65, "a b"):
        assert api.get(f"/datasets/{junk}").status_code in (404, 422)


def test_register_a_builtin_dataset(tmp_path: Path) -> None:
    context = _context(tmp_path / "empty")
    empty = Api(context)
    body = {"builtin": "digits"}
    assert empty.post("/datasets", json=body, role="viewer").status_code == 403
    assert empty.client.post("/api/v1/datasets", json=body).status_code == 401
    assert empty.get("/datasets").json() == []

    created = empty.post("/datasets", json=body)
    assert created.status_code == 201, created.text
    document = created.json()
    assert document["name"] == "digits" and document["num_samples"] == 1797
    assert context.datasets.resolve("digits").version == document["version"]
    again = empty.post("/datasets", json=body)
    assert again.status_code == 200 and again.json()["version"] == document["version"]
    assert [v.name for v in context.datasets.list()] == ["digits"]
    context.database.dispose()


def test_register_refuses_what_is_not_a_builtin(fresh: Api) -> None:
    from edgeops.api.routes.datasets import RegisterBuiltin
    from edgeops.data.builtin import BUILTINS

    assert set(get_args(RegisterBuiltin.model_fields["builtin"].annotation)) == set(BUILTINS)
    before = len(fresh.context.datasets.list())
    for body in ({"builtin": "cifar"}, {"builtin": 3}, {}, {"builtin": "digits", "seed": 4}):
        answer = fresh.post("/datasets", json=body)
        assert answer.status_code == 422, body
        assert any(
            "builtin" in error["loc"] or "seed" in error["loc"] for error in answer.json()["detail"]
        )
    malformed = fresh.post(
        "/datasets", content=b'{"builtin": ', headers={"Content-Type": "application/json"}
    )
    assert malformed.status_code == 422
    assert len(fresh.context.datasets.list()) == before


# -- runs -------------------------------------------------------------------------------------


def test_runs_list_and_show(api: Api, model_factory: ModelFactory) -> None:
    keras = api.context.registry.get_model(model_factory.keras_ref)
    listed = api.get("/runs")
    assert listed.status_code == 200
    runs = {run["id"]: run for run in listed.json()}
    assert keras.run_id in runs and all("logs" not in run for run in runs.values())
    assert runs[keras.run_id]["kind"] == "train"
    assert keras.id in runs[keras.run_id]["model_ids"]

    only_search = api.get("/runs", params={"kind": "search"}).json()
    assert [run["id"] for run in only_search] == [api.context.extra["search_run"]]
    assert api.get("/runs", params={"kind": "nothing-like-it"}).json() == []

    shown = api.get(f"/runs/{keras.run_id}")
    assert shown.status_code == 200
    document = shown.json()
    expected = api.context.registry.get_run(keras.run_id)
    assert document["status"] == "succeeded" and document["logs"] == expected.logs
    assert document["params"] == expected.params and document["metrics"] == expected.metrics
    assert document["duration_s"] == pytest.approx(expected.duration_s)

    missing = api.get("/runs/r-000000000000")
    assert missing.status_code == 404 and "r-000000000000" in missing.json()["detail"]
    assert api.get("/runs/not-a-run").status_code == 422
    for kind in ("k" * 65, "", "a\x00b", "-x"):
        assert api.get("/runs", params={"kind": kind}).status_code == 422, kind


# -- models -----------------------------------------------------------------------------------


def test_models_list_filters_and_show(api: Api, model_factory: ModelFactory) -> None:
    keras = api.context.registry.get_model(model_factory.keras_ref)
    listed = api.get("/models")
    assert listed.status_code == 200
    models = {m["id"]: m for m in listed.json()}
    assert keras.id in models and "card" not in models[keras.id]
    assert models[keras.id]["has_card"] is (keras.card is not None)
    assert models[keras.id]["ref"] == keras.ref and models[keras.id]["stage"] == "candidate"

    named = api.get("/models", params={"name": keras.name}).json()
    assert [m["id"] for m in named] == [keras.id]
    assert api.get("/models", params={"stage": "production"}).json() == []
    assert len(api.get("/models", params={"stage": "candidate"}).json()) == len(models)
    for name in ("", "a\x00b", "x" * 101, "a b"):
        assert api.get("/models", params={"name": name}).status_code == 422, name
    bad_stage = api.get("/models", params={"stage": "gold"})
    assert bad_stage.status_code == 422 and "stage" in json.dumps(bad_stage.json())

    for ref in (keras.id, keras.name, f"{keras.name}:1", f"{keras.name}@candidate"):
        shown = api.get(f"/models/{ref}")
        assert shown.status_code == 200, (ref, shown.text)
        assert shown.json()["id"] == keras.id
    document = api.get(f"/models/{keras.id}").json()
    assert document["card"] == keras.card
    assert document["metrics"] == keras.metrics and document["config"] == keras.config
    assert [link["id"] for link in document["lineage"]] == [keras.id]


def test_unknown_models_are_404_naming_the_reference(api: Api) -> None:
    for ref in ("m-000000000000", "no-such-model", "digits-mlp:999", "digits-mlp@archived"):
        for suffix in ("", "/lineage", "/card", "/compression"):
            answer = api.get(f"/models/{ref}{suffix}")
            assert answer.status_code == 404, (ref, suffix)
            name = ref.partition(":")[0].partition("@")[0]
            assert name in answer.json()["detail"]
    assert api.get("/models/x@gold").status_code == 404
    for junk in ("-x", "x:1:2", "x:" + "9" * 12, "x" * 200):
        assert api.get(f"/models/{junk}").status_code == 422, junk


def test_lineage_card_and_compression_of_a_compressed_model(
    api: Api, model_factory: ModelFactory
) -> None:
    keras = api.context.registry.get_model(model_factory.keras_ref)
    int8 = next(m for m in api.context.registry.list_models() if m.parent_id == keras.id)

    lineage = api.get(f"/models/{int8.id}/lineage")
    assert lineage.status_code == 200
    assert [link["id"] for link in lineage.json()] == [int8.id, keras.id]

    card = api.get(f"/models/{int8.ref}/card")
    assert card.status_code == 200
    assert card.json() == int8.card
    assert card.json()["model_id"] == int8.id and card.json()["quantization"]["mode"] == "int8"

    compression = api.get(f"/models/{keras.id}/compression")
    assert compression.status_code == 200, compression.text
    document = compression.json()
    assert document["baseline"]["model_id"] == keras.id
    assert document["baseline"]["size_bytes"] == keras.size_bytes
    [point] = document["compressed"]
    assert point["model_id"] == int8.id and point["quantization"] == "int8"
    assert point["size_bytes"] == int8.size_bytes
    assert point["accuracy"] == pytest.approx(int8.metrics["accuracy"])
    assert point["ram_bytes"] == int8.metrics["arena_bytes"] and point["ram_bytes"] > 0
    [search] = document["searches"]
    assert search["run_id"] == api.context.extra["search_run"]
    assert search["status"] == "succeeded" and search["candidates"] == 4
    assert search["fitting"] == 2 and search["front"] == [api.context.extra["front"]]
    assert search["profile"] == {"name": "cortex-m4-256k"}

    # the int8 model was compressed from nothing and searched by no one
    own = api.get(f"/models/{int8.id}/compression").json()
    assert own["compressed"] == [] and own["searches"] == []
    assert own["baseline"]["label"] == int8.config["compression"]["label"]


def test_a_model_without_a_card_answers_404_on_its_card(fresh: Api) -> None:
    registry = fresh.context.registry
    with registry.start_run("train", {}) as run:
        bare = registry.register_model(
            name="bare",
            artifact=b"\x00" * 16,
            format="keras",
            run_id=run.id,
            dataset_version="d" * 64,
            parent_id=None,
            config={},
            metrics={},
        )
    answer = fresh.get(f"/models/{bare.id}/card")
    assert answer.status_code == 404 and bare.id in answer.json()["detail"]
    assert fresh.get(f"/models/{bare.id}").json()["has_card"] is False


# -- promotion --------------------------------------------------------------------------------


def test_promote_needs_an_operator(fresh: Api, model_factory: ModelFactory) -> None:
    path = f"/models/{model_factory.keras_ref}/promote"
    assert fresh.client.post(f"/api/v1{path}", json={"stage": "staging"}).status_code == 401
    refused = fresh.post(path, json={"stage": "staging"}, role="viewer")
    assert refused.status_code == 403 and "operator" in refused.json()["detail"]
    assert fresh.context.registry.get_model(model_factory.keras_ref).stage == "candidate"
    assert fresh.post(path, json={"stage": "staging"}, role="admin").status_code == 200


def test_promote_follows_the_stage_rules_as_the_cli_does(
    fresh: Api, model_factory: ModelFactory
) -> None:
    registry = fresh.context.registry
    keras = registry.get_model(model_factory.keras_ref)
    int8 = next(m for m in registry.list_models() if m.parent_id == keras.id)

    staged = fresh.post(f"/models/{keras.name}/promote", json={"stage": "staging"})
    assert staged.status_code == 200, staged.text
    assert staged.json()["from_stage"] == "candidate" and staged.json()["to_stage"] == "staging"
    assert staged.json()["archived"] == [] and staged.json()["model"]["stage"] == "staging"
    produced = fresh.post(f"/models/{keras.id}/promote", json={"stage": " Production "})
    assert produced.status_code == 200 and produced.json()["to_stage"] == "production"
    assert registry.get_model(keras.id).stage == "production"

    # a second production version archives the first, and the answer says so
    fresh.post(f"/models/{int8.id}/promote", json={"stage": "staging"})
    replaced = fresh.post(f"/models/{int8.id}/promote", json={"stage": "production"})
    # (another name: the int8 model has its own name, so nothing of keras's is archived)
    assert replaced.status_code == 200 and replaced.json()["archived"] == []
    with registry.start_run("train", {}) as run:
        second = registry.register_model(
            name=keras.name,
            artifact=b"\x01" * 16,
            format="keras",
            run_id=run.id,
            dataset_version=keras.dataset_version,
            parent_id=None,
            config={},
            metrics={},
        )
    fresh.post(f"/models/{second.id}/promote", json={"stage": "staging"})
    swapped = fresh.post(f"/models/{keras.name}:2/promote", json={"stage": "production"})
    assert swapped.status_code == 200 and swapped.json()["archived"] == [keras.id]
    assert registry.get_model(keras.id).stage == "archived"
    assert fresh.get(f"/models/{keras.name}@production").json()["id"] == second.id

    # forbidden transitions: 409 naming both stages; nothing changes
    for ref, stage in ((keras.id, "staging"), (second.id, "production"), (int8.id, "candidate")):
        before = registry.get_model(ref)
        refused = fresh.post(f"/models/{ref}/promote", json={"stage": stage})
        assert refused.status_code == 409, (ref, stage)
        assert before.stage in refused.json()["detail"] and stage in refused.json()["detail"]
        assert registry.get_model(ref) == before


def test_a_bad_stage_changes_nothing(fresh: Api, model_factory: ModelFactory) -> None:
    registry = fresh.context.registry
    path = f"/models/{model_factory.keras_ref}/promote"
    before = registry.list_models()
    unknown = fresh.post(path, json={"stage": "gold"})
    assert unknown.status_code == 400
    assert "stage" in unknown.json()["detail"] and "gold" in unknown.json()["detail"]
    for body in ({}, {"stage": 3}, {"stage": ""}, {"stage": "x" * 33}, {"stage": "a", "b": 1}):
        answer = fresh.post(path, json=body)
        assert answer.status_code == 422, body
        assert any(
            error["loc"][-1] in ("stage", "b") or error["loc"] == ["body"]
            for error in answer.json()["detail"]
        ), answer.json()
    assert fresh.post("/models/m-000000000000/promote", json={"stage": "staging"}).status_code == (
        404
    )
    assert registry.list_models() == before


# -- releases ---------------------------------------------------------------------------------


def test_releases_list_the_repository_targets(api: Api) -> None:
    int8 = next(m for m in api.context.registry.list_models() if m.parent_id is not None)
    listed = api.get("/releases")
    assert listed.status_code == 200
    [release] = listed.json()
    target = api.context.repository.get_target(release["target"])
    assert release["target"] == f"{int8.name}/{int8.seq}/litert/model.tflite"
    assert release["name"] == int8.name and release["seq"] == int8.seq
    assert release["runtime"] == "litert" and release["model_id"] == int8.id
    assert release["length"] == target.length and release["sha256"] == target.hashes["sha256"]
    assert release["versions"] == api.context.repository.versions()
    contract = release["custom"]["edgeops"]
    assert contract["hardware"] == {"arch": ["x86_64"]} and contract["runtime"] == "litert"
    assert json.loads(contract["card"])["model_id"] == int8.id

    mine = api.get(f"/releases/{int8.name}")
    assert mine.status_code == 200 and mine.json() == [release]
    missing = api.get("/releases/never-released")
    assert missing.status_code == 404 and "never-released" in missing.json()["detail"]
    assert api.get("/releases/..").status_code in (404, 422)


def test_releases_without_a_repository(fresh: Api) -> None:
    assert not fresh.context.repository.exists()
    assert fresh.get("/releases").json() == []
    assert fresh.get("/releases/digits-mlp").status_code == 404


# -- auth and the schema ----------------------------------------------------------------------


def test_every_read_needs_a_token(api: Api, model_factory: ModelFactory) -> None:
    ref = model_factory.keras_ref
    paths = [
        "/datasets",
        "/datasets/digits",
        "/runs",
        "/models",
        f"/models/{ref}",
        f"/models/{ref}/lineage",
        f"/models/{ref}/card",
        f"/models/{ref}/compression",
        "/releases",
    ]
    for path in paths:
        assert api.client.get(f"/api/v1{path}").status_code == 401, path
        assert api.get(path).status_code == 200, path


def test_the_openapi_schema_documents_the_routes(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    paths = schema["paths"]
    for path, method, codes in (
        ("/api/v1/datasets", "get", {"200", "401", "403"}),
        ("/api/v1/datasets", "post", {"201", "200", "401", "403", "422"}),
        ("/api/v1/datasets/{ref}", "get", {"200", "404"}),
        ("/api/v1/runs", "get", {"200"}),
        ("/api/v1/runs/{run_id}", "get", {"200", "404", "422"}),
        ("/api/v1/models", "get", {"200"}),
        ("/api/v1/models/{ref}", "get", {"200", "404"}),
        ("/api/v1/models/{ref}/lineage", "get", {"200", "404"}),
        ("/api/v1/models/{ref}/card", "get", {"200", "404"}),
        ("/api/v1/models/{ref}/compression", "get", {"200", "404"}),
        ("/api/v1/models/{ref}/promote", "post", {"200", "400", "401", "403", "404", "409"}),
        ("/api/v1/releases", "get", {"200"}),
        ("/api/v1/releases/{name}", "get", {"200", "404"}),
    ):
        operation = paths[path][method]
        assert codes <= set(operation["responses"]), (path, method)
        assert operation["tags"], (path, method)
    assert paths["/api/v1/runs"]["get"]["tags"] == ["runs"]
    assert paths["/api/v1/models/{ref}"]["get"]["tags"] == ["models"]
