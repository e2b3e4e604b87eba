"""The registry and metadata store: runs, model versions, stages, artifacts and lineage,
on SQLite and PostgreSQL, plus the ``edgeops models`` / ``edgeops runs`` commands."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from sqlmodel import func, select

from device_agent.card import ModelCard
from edgeops.db import Database
from edgeops.registry import (
    CorruptArtifactError,
    InvalidModelError,
    InvalidStageTransitionError,
    MissingArtifactError,
    ModelNotFoundError,
    ModelVersion,
    ModelVersionView,
    Registry,
    RegistryError,
    RunNotFoundError,
    Stage,
    UnknownStageError,
    code_version,
)
from edgeops.registry.codeversion import detect_code_version
from edgeops.registry.stages import check_promotion
from edgeops.store import ArtifactStore
from tests.clitools import assert_one_line_error, run_cli

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
DATASET = "d" * 64


class ManualClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def registry(database: Database, store: ArtifactStore, clock: ManualClock) -> Registry:
    return Registry(database, store, clock=clock)


def register(
    registry: Registry,
    name: str = "digits-cnn",
    artifact: bytes = b"keras model bytes",
    *,
    parent_id: str | None = None,
    card: ModelCard | None = None,
    run_id: str | None = None,
    fmt: str = "keras",
) -> ModelVersionView:
    """Register ``artifact`` inside a run of its own (or ``run_id``)."""
    if run_id is not None:
        return registry.register_model(
            name=name,
            artifact=artifact,
            format=fmt,
            run_id=run_id,
            dataset_version=DATASET,
            parent_id=parent_id,
            config={"arch": "cnn"},
            metrics={"accuracy": 0.95},
            card=card,
        )
    with registry.start_run("train", {"arch": "cnn"}) as run:
        return register(
            registry, name, artifact, parent_id=parent_id, card=card, run_id=run.id, fmt=fmt
        )


def small_card() -> ModelCard:
    return ModelCard(
        model_id="",
        version="",
        name="draft",
        task="classification",
        runtime="litert",
        quantization={"mode": "none"},  # type: ignore[arg-type]
        input_spec={"name": "x", "shape": [1, 64], "dtype": "float32"},  # type: ignore[arg-type]
        output_spec={"name": "y", "shape": [1, 10], "dtype": "float32"},  # type: ignore[arg-type]
        lineage={"notes": "kept"},
    )


def row_count(database: Database, table: type[Any]) -> int:
    with database.session() as session:
        return int(session.exec(select(func.count()).select_from(table)).one())


# -- runs -------------------------------------------------------------------------------------


def test_successful_run_records_params_metrics_logs_and_duration(
    registry: Registry, clock: ManualClock
) -> None:
    with registry.start_run("train", {"arch": "cnn", "epochs": 3, "shape": (8, 8)}) as run:
        assert registry.get_run(run.id).status == "running"
        run.log("epoch 1/3")
        clock.advance(42.5)
        run.log_metrics({"accuracy": np.float32(0.5), "loss": 1.25})
        run.log_metrics({"accuracy": 0.97})
    recorded = registry.get_run(run.id)
    assert (recorded.kind, recorded.status, recorded.error) == ("train", "succeeded", None)
    assert recorded.params == {"arch": "cnn", "epochs": 3, "shape": [8, 8]}
    assert recorded.metrics == {"accuracy": 0.97, "loss": 1.25}
    assert recorded.logs == ["epoch 1/3"]
    assert recorded.started_at == T0
    assert recorded.ended_at == T0 + timedelta(seconds=42.5)
    assert recorded.duration_s == 42.5
    assert recorded.code_version == code_version()
    assert re.fullmatch(r"r-[0-9a-f]{12}", run.id)


def test_failed_run_is_recorded_with_its_error_and_the_exception_propagates(
    registry: Registry, clock: ManualClock
) -> None:
    with (
        pytest.raises(ValueError, match="loss is NaN"),
        registry.start_run("compress", {"quantize": "int8"}) as run,
    ):
        run.log("calibrating")
        clock.advance(3)
        raise ValueError("loss is NaN")
    recorded = registry.get_run(run.id)
    assert recorded.status == "failed"
    assert recorded.error == "ValueError: loss is NaN"
    assert recorded.logs == ["calibrating"]
    assert recorded.duration_s == 3.0
    assert [r.id for r in registry.list_runs(kind="compress")] == [run.id]


def test_run_documents_that_json_cannot_hold_are_refused(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="parameters of the train run cannot be stored"):
        registry.start_run("train", {"lr": float("nan")})
    with (
        registry.start_run("train", {}) as run,
        pytest.raises(RegistryError, match=f"metrics of run {run.id}"),
    ):
        run.log_metrics({"loss": float("inf")})
    assert registry.get_run(run.id).status == "succeeded"


def test_unknown_run_is_named(registry: Registry) -> None:
    with pytest.raises(RunNotFoundError, match="run 'r-000000000000' not found"):
        registry.get_run("r-000000000000")


# -- model versions -----------------------------------------------------------------------------


def test_register_stores_the_artifact_and_gets_it_by_id_name_and_name_seq(
    registry: Registry, store: ArtifactStore
) -> None:
    first = register(registry, artifact=b"v1")
    second = register(registry, artifact=b"v2")
    other = register(registry, name="motions-cnn1d", artifact=b"m1")
    assert re.fullmatch(r"m-[0-9a-f]{12}", first.id)
    assert (first.seq, second.seq, other.seq) == (1, 2, 1)
    assert first.stage == second.stage == "candidate"
    assert first.size_bytes == 2 and store.has(first.artifact_sha256)
    assert first.code_version == code_version()
    assert (first.config, first.metrics, first.dataset_version) == (
        {"arch": "cnn"},
        {"accuracy": 0.95},
        DATASET,
    )
    assert registry.get_model(first.id) == first
    assert registry.get_model("digits-cnn") == second
    assert registry.get_model("digits-cnn:1") == first
    assert registry.get_model(" digits-cnn:2 ") == second
    assert registry.load_artifact(first.id) == b"v1"
    assert registry.load_artifact("digits-cnn") == b"v2"
    assert [m.ref for m in registry.list_models()] == [
        "digits-cnn:1",
        "digits-cnn:2",
        "motions-cnn1d:1",
    ]
    assert [m.id for m in registry.list_models(name="motions-cnn1d")] == [other.id]
    assert registry.get_run(first.run_id).model_ids == [first.id]


def test_unknown_references_say_what_exists(registry: Registry) -> None:
    with pytest.raises(ModelNotFoundError, match="the registry holds no models yet"):
        registry.get_model("digits-cnn")
    register(registry)
    register(registry)
    cases = {
        "digits-cnn:3": "'digits-cnn' has versions 1-2",
        "mnist-cnn": "no model is named 'mnist-cnn'; known names: digits-cnn",
        "digits-cnn:x": "after ':' comes a version number",
        "m-0123456789ab": "model m-0123456789ab not found",
        "digits-cnn@production": "no version of 'digits-cnn' is in production",
    }
    for ref, message in cases.items():
        with pytest.raises(ModelNotFoundError, match=re.escape(message)):
            registry.get_model(ref)
    with pytest.raises(UnknownStageError, match="unknown stage 'live'"):
        registry.get_model("digits-cnn@live")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "bad name"}, "model name 'bad name' is invalid"),
        ({"name": "m-0123456789ab"}, "looks like a model id"),
        ({"format": "pt"}, "format must be one of keras, tflite, onnx, got 'pt'"),
        ({"artifact": b""}, "the artifact is empty"),
        ({"metrics": {"accuracy": float("nan")}}, "metrics of model 'digits-cnn' cannot be stored"),
        ({"config": {"callback": object()}}, "config of model 'digits-cnn' cannot be stored"),
        ({"dataset_version": ""}, "dataset_version must be 1-128 characters"),
    ],
)
def test_bad_registrations_are_refused_and_leave_nothing(
    registry: Registry,
    database: Database,
    store: ArtifactStore,
    changes: dict[str, Any],
    message: str,
) -> None:
    arguments: dict[str, Any] = {
        "name": "digits-cnn",
        "artifact": b"bytes",
        "format": "keras",
        "dataset_version": DATASET,
        "parent_id": None,
        "config": {},
        "metrics": {},
        "card": None,
    }
    arguments.update(changes)
    with registry.start_run("train", {}) as run, pytest.raises(InvalidModelError) as error:
        registry.register_model(run_id=run.id, **arguments)
    assert message in str(error.value)
    assert row_count(database, ModelVersion) == 0
    assert not store.root.exists()  # refused before anything was stored


def test_unknown_run_or_parent_leaves_no_row(registry: Registry, database: Database) -> None:
    with pytest.raises(RunNotFoundError, match="run 'r-ffffffffffff' not found"):
        register(registry, run_id="r-ffffffffffff")
    with pytest.raises(ModelNotFoundError, match="parent model m-0123456789ab not found"):
        register(registry, parent_id="m-0123456789ab")
    assert row_count(database, ModelVersion) == 0
    # the failed registration's run is recorded as failed, with the reason
    (failed,) = [r for r in registry.list_runs() if r.status == "failed"]
    assert "ModelNotFoundError: parent model m-0123456789ab not found" in (failed.error or "")


def test_card_is_stored_with_the_version_id_seq_and_lineage(registry: Registry) -> None:
    parent = register(registry, "digits-cnn")
    child = register(registry, "digits-cnn-int8", b"tflite", parent_id=parent.id, card=small_card())
    assert child.card is not None
    card = ModelCard.from_dict(child.card)
    assert (card.model_id, card.version, card.name) == (child.id, "1", "digits-cnn-int8")
    assert card.lineage == {
        "notes": "kept",
        "run_id": child.run_id,
        "dataset_version": DATASET,
        "parent_id": parent.id,
        "code_version": child.code_version,
    }
    assert parent.card is None


def test_lineage_is_the_chain_of_parents(registry: Registry) -> None:
    base = register(registry, "digits-cnn", b"float")
    pruned = register(registry, "digits-cnn-pruned", b"pruned", parent_id=base.id)
    quantized = register(registry, "digits-cnn-int8", b"int8", parent_id="digits-cnn-pruned:1")
    assert quantized.parent_id == pruned.id
    assert [m.id for m in registry.lineage(quantized.id)] == [quantized.id, pruned.id, base.id]
    assert [m.id for m in registry.lineage("digits-cnn")] == [base.id]


def test_concurrent_registrations_of_one_name_get_distinct_numbers(registry: Registry) -> None:
    with registry.start_run("search", {}) as run:
        seqs: list[int] = []
        errors: list[BaseException] = []

        def worker(index: int) -> None:
            try:
                seqs.append(register(registry, artifact=bytes([index]), run_id=run.id).seq)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert sorted(seqs) == list(range(1, 9))


# -- artifacts ----------------------------------------------------------------------------------


def test_corrupted_artifact_is_reported_with_model_and_digest(
    registry: Registry, store: ArtifactStore
) -> None:
    model = register(registry, artifact=b"weights")
    path = store.verified_path(model.artifact_sha256)
    path.chmod(0o644)
    path.write_bytes(b"weightz")
    with pytest.raises(CorruptArtifactError) as error:
        registry.load_artifact(model.id)
    assert f"model {model.id} (digits-cnn:1)" in str(error.value)
    assert f"sha256:{model.artifact_sha256} is corrupted" in str(error.value)
    path.unlink()
    with pytest.raises(MissingArtifactError, match=f"sha256:{model.artifact_sha256} is missing"):
        registry.load_artifact(model.id)


def test_the_same_bytes_are_stored_once(registry: Registry, store: ArtifactStore) -> None:
    a = register(registry, "a", b"same")
    b = register(registry, "b", b"same")
    assert a.artifact_sha256 == b.artifact_sha256
    assert len([p for p in store.root.rglob("*") if p.is_file()]) == 1


# -- stages -------------------------------------------------------------------------------------

ALLOWED = [
    ("candidate", "staging"),
    ("candidate", "archived"),
    ("staging", "production"),
    ("staging", "archived"),
    ("production", "archived"),
]
FORBIDDEN = [
    ("candidate", "production", "from candidate a model can go only to archived or staging"),
    ("candidate", "candidate", "it is already in candidate"),
    ("staging", "candidate", "from staging a model can go only to archived or production"),
    ("production", "staging", "from production a model can go only to archived"),
    ("archived", "candidate", "archived is final"),
    ("archived", "production", "archived is final"),
]


@pytest.mark.parametrize(("current", "target"), ALLOWED)
def test_allowed_promotions(current: str, target: str) -> None:
    check_promotion("m-x", Stage(current), Stage(target))


@pytest.mark.parametrize(("current", "target", "reason"), FORBIDDEN)
def test_forbidden_promotions_name_both_stages(current: str, target: str, reason: str) -> None:
    with pytest.raises(InvalidStageTransitionError) as error:
        check_promotion("m-x (a:1)", Stage(current), Stage(target))
    assert str(error.value) == (
        f"cannot promote model m-x (a:1) from {current} to {target}: {reason}"
    )


def test_promotion_walks_forward_and_refusals_change_nothing(
    registry: Registry, clock: ManualClock
) -> None:
    model = register(registry)
    with pytest.raises(InvalidStageTransitionError, match="from candidate to production"):
        registry.promote(model.id, "production")
    assert registry.get_model(model.id).stage == "candidate"
    with pytest.raises(UnknownStageError, match="unknown stage 'live'; the stages are"):
        registry.promote(model.id, "live")
    clock.advance(10)
    staged = registry.promote("digits-cnn:1", "staging")
    assert (staged.stage, staged.updated_at, staged.created_at) == (
        "staging",
        T0 + timedelta(seconds=10),
        T0,
    )
    assert registry.promote(model.id, "Production").stage == "production"
    assert registry.get_model("digits-cnn@production").id == model.id
    assert registry.promote(model.id, "archived").stage == "archived"
    with pytest.raises(InvalidStageTransitionError, match="archived is final"):
        registry.promote(model.id, "staging")


def test_promoting_to_production_archives_the_previous_production_version(
    registry: Registry,
) -> None:
    old = register(registry)
    new = register(registry)
    other_name = register(registry, "motions-cnn1d")
    for model in (old, new, other_name):
        registry.promote(model.id, "staging")
    registry.promote(old.id, "production")
    registry.promote(other_name.id, "production")
    registry.promote(new.id, "production")
    stages = {m.id: m.stage for m in registry.list_models()}
    assert stages == {old.id: "archived", new.id: "production", other_name.id: "production"}
    assert [m.id for m in registry.list_models(stage="production", name="digits-cnn")] == [new.id]


def test_concurrent_promotions_to_production_leave_one_production_version(
    registry: Registry,
) -> None:
    models = [register(registry) for _ in range(4)]
    for model in models:
        registry.promote(model.id, "staging")
    errors: list[BaseException] = []

    def promote(model_id: str) -> None:
        try:
            registry.promote(model_id, "production")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(m.id,)) for m in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stages = sorted(m.stage for m in registry.list_models())
    assert stages == ["archived", "archived", "archived", "production"]


def test_the_database_holds_at_most_one_production_version_per_name(
    registry: Registry, database: Database
) -> None:
    first = register(registry)
    second = register(registry)
    registry.promote(first.id, "staging")
    registry.promote(first.id, "production")
    with pytest.raises(sa.exc.IntegrityError), database.session() as session:
        row = session.get(ModelVersion, second.id)
        assert row is not None
        row.stage = "production"
    assert registry.get_model(second.id).stage == "candidate"


# -- code version ---------------------------------------------------------------------------


def test_code_version_is_the_package_version_outside_a_checkout(tmp_path: Path) -> None:
    assert detect_code_version(tmp_path) == "package:0.1.0"
    assert re.fullmatch(r"git:[0-9a-f]{40}(\+dirty)?|package:\S+", code_version())


def test_code_version_is_the_commit_of_a_checkout_and_says_when_it_is_dirty(
    tmp_path: Path,
) -> None:
    package = tmp_path / "checkout" / "edgeops"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("VERSION = 1\n")
    env = {
        **os.environ,
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=package.parent, env=env, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    git("init", "-q")
    assert detect_code_version(package) == "package:0.1.0"  # no commit yet
    git("add", "edgeops/__init__.py")
    git("commit", "-q", "-m", "first")
    commit = git("rev-parse", "HEAD")
    assert detect_code_version(package) == f"git:{commit}"
    (package / "__init__.py").write_text("VERSION = 2\n")
    assert detect_code_version(package) == f"git:{commit}+dirty"


# -- command line -------------------------------------------------------------------------------


@pytest.fixture
def cli_registry(isolated_environment: Path) -> Registry:
    """A registry in the data dir the CLI will use (EDGEOPS_DATA_DIR)."""
    database = Database(f"sqlite:///{isolated_environment / 'edgeops.db'}")
    database.upgrade()
    return Registry(database, ArtifactStore(isolated_environment / "artifacts"))


def cli_json(*args: str) -> Any:
    result = run_cli("edgeops", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_models_and_runs_commands(cli_registry: Registry) -> None:
    base = register(cli_registry, "digits-cnn", b"float")
    child = register(cli_registry, "digits-cnn", b"int8", parent_id=base.id, card=small_card())
    cli_registry.promote(base.id, "staging")
    cli_registry.promote(base.id, "production")

    listed = cli_json("models", "list")
    assert [(m["id"], m["seq"], m["stage"], m["has_card"]) for m in listed] == [
        (base.id, 1, "production", False),
        (child.id, 2, "candidate", True),
    ]

    shown = cli_json("models", "show", "digits-cnn")
    assert shown["id"] == child.id and shown["card"]["model_id"] == child.id
    assert [link["id"] for link in shown["lineage"]] == [child.id, base.id]

    human = run_cli("edgeops", "models", "show", "digits-cnn:2")
    assert human.returncode == 0, human.stderr
    assert "Model card: digits-cnn v2" in human.stdout and base.id in human.stdout

    promoted = cli_json("models", "promote", child.id, "--stage", "staging")
    assert (promoted["from_stage"], promoted["to_stage"]) == ("candidate", "staging")
    promoted = cli_json("models", "promote", "digits-cnn:2", "--stage", "production")
    assert promoted["archived"] == [base.id] and promoted["model"]["stage"] == "production"

    run = cli_json("runs", "show", child.run_id)
    assert (run["status"], run["model_ids"], run["params"]) == (
        "succeeded",
        [child.id],
        {"arch": "cnn"},
    )
    assert {r["id"] for r in cli_json("runs", "list")} == {base.run_id, child.run_id}

    refused = run_cli("edgeops", "models", "promote", base.id, "--stage", "staging")
    assert_one_line_error(refused, "edgeops: error:", "from archived to staging", base.id)
    assert_one_line_error(run_cli("edgeops", "models", "show", "nope"), "model 'nope' not found")
    assert_one_line_error(run_cli("edgeops", "runs", "show", "r-0"), "run 'r-0' not found")


def test_corrupted_artifact_is_one_line_at_the_command_line(
    cli_registry: Registry, isolated_environment: Path
) -> None:
    # models show does not read the artifact; only the service's load_artifact does, so
    # the check is on the service's error type being an EdgeOpsError the CLI prints.
    from edgeops.errors import EdgeOpsError

    model = register(cli_registry, artifact=b"weights")
    path = isolated_environment / "artifacts" / "sha256" / model.artifact_sha256[:2]
    target = path / model.artifact_sha256[2:]
    target.chmod(0o644)
    target.write_bytes(b"tampered")
    with pytest.raises(EdgeOpsError):
        cli_registry.load_artifact(model.id)
