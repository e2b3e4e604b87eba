"""Dataset versions: built-ins, importing files, splits, hashes, bad input, the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlmodel import select

from edgeops.data import (
    AmbiguousReferenceError,
    ClassCountError,
    DataError,
    DataFileError,
    DatasetConflictError,
    DatasetInputError,
    DatasetNotFoundError,
    DatasetService,
    DatasetVersion,
    FeatureRule,
    InvalidNameError,
    LabelColumnError,
    NonFiniteValueError,
    NonNumericFeatureError,
    labels_to_indices,
    read_labelled_file,
)
from edgeops.data.content import DatasetContent
from edgeops.data.splits import encode_labels, stratified_split
from edgeops.db import Database
from edgeops.store import ArtifactStore
from tests.clitools import assert_one_line_error, run_cli


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def datasets(database: Database, store: ArtifactStore) -> DatasetService:
    """The service on SQLite and on PostgreSQL."""
    return DatasetService(database, store)


@pytest.fixture
def sqlite_datasets(tmp_path: Path, store: ArtifactStore) -> Iterator[DatasetService]:
    """The service on SQLite only, for checks where the backend does not matter."""
    database = Database(f"sqlite:///{tmp_path / 'db' / 'edgeops.db'}")
    database.upgrade()
    yield DatasetService(database, store)
    database.dispose()


def row_count(service: DatasetService) -> int:
    with service._db.session() as session:
        return len(session.exec(select(DatasetVersion)).all())


def stored_artifacts(store: ArtifactStore) -> list[Path]:
    return [p for p in store.root.rglob("*") if p.is_file()] if store.root.exists() else []


def sensor_table(rows_per_class: int = 20) -> pd.DataFrame:
    """Three activities, four numeric sensor columns, string labels."""
    rng = np.random.default_rng(7)
    frames = []
    for offset, label in enumerate(["walk", "idle", "run"]):
        values = rng.normal(loc=offset * 3.0, size=(rows_per_class, 4))
        frame = pd.DataFrame(values, columns=["ax", "ay", "az", "temp"])
        frame["activity"] = label
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


# -- built-in datasets ------------------------------------------------------------------------

BUILTIN_SHAPES = {
    # name: (samples, raw sample, model input, classes, split sizes)
    "digits": (1797, (64,), (8, 8, 1), 10, None),
    "mnist5k": (5000, (784,), (28, 28, 1), 10, None),
    "basic_motions": (80, (6, 100), (100, 6), 4, {"train": 32, "val": 8, "test": 40}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUILTIN_SHAPES))
def test_builtin_loads_with_documented_shapes(name: str, sqlite_datasets: DatasetService) -> None:
    samples, raw, model_input, num_classes, splits = BUILTIN_SHAPES[name]
    view = sqlite_datasets.register_builtin(name)
    assert (view.num_samples, view.input_shape, view.model_input_shape) == (
        samples,
        raw,
        model_input,
    )
    assert len(view.classes) == num_classes and view.classes == sorted(view.classes)
    assert sum(view.split_sizes.values()) == samples
    if splits is not None:
        assert view.split_sizes == splits
    arrays = sqlite_datasets.load(view.version)
    for split in ("train", "val", "test"):
        inputs = arrays.model_inputs(split)
        assert inputs.dtype == np.float32 and inputs.shape[1:] == model_input
        assert set(np.unique(arrays.split(split)[1])) == set(range(num_classes))
    train = arrays.model_inputs("train")
    if name == "basic_motions":  # standardised per channel on the training split
        np.testing.assert_allclose(train.reshape(-1, 6).mean(axis=0), 0.0, atol=1e-4)
        assert view.feature_rule.window is not None and view.reference.num_features == 6
    else:  # pixels scaled to [0, 1]
        assert train.min() == 0.0 and train.max() == 1.0
        assert view.reference.num_features == 16  # a 4 x 4 grid of cell means
        assert max(len(edges) + 1 for edges in view.reference.feature_edges) >= 10
    assert view.reference.count_features(train) == view.reference.feature_counts


def test_registering_a_builtin_twice_gives_the_same_version_and_one_row(
    datasets: DatasetService, store: ArtifactStore
) -> None:
    first = datasets.register_builtin("digits")
    second = datasets.register_builtin("digits")
    assert second.version == first.version and len(first.version) == 64
    assert row_count(datasets) == 1
    assert len(stored_artifacts(store)) == 1
    assert datasets.resolve("digits") == first
    assert datasets.resolve(first.version[:8]).version == first.version
    other_seed = datasets.register_builtin("digits", seed=1)
    assert other_seed.version != first.version
    assert datasets.resolve("digits").version == other_seed.version  # the newest
    assert [v.version for v in datasets.list()] == [other_seed.version, first.version]


def test_a_builtin_is_registered_on_first_use(datasets: DatasetService) -> None:
    view = datasets.resolve("basic_motions")
    assert view.name == "basic_motions" and row_count(datasets) == 1
    with pytest.raises(DatasetNotFoundError, match=r"dataset 'nope' not found.*basic_motions"):
        datasets.resolve("nope")
    with pytest.raises(DatasetNotFoundError, match="no dataset version 'deadbeef'"):
        datasets.resolve("deadbeef")


def test_ambiguous_version_prefix_is_refused(datasets: DatasetService) -> None:
    view = datasets.register_builtin("basic_motions")
    with datasets._db.session() as session:
        row = session.get(DatasetVersion, view.version)
        assert row is not None
        twin = DatasetVersion.model_validate(row.model_dump())
        twin.version = view.version[:10] + "0" * 54
        twin.name = "twin"
        session.add(twin)
    with pytest.raises(AmbiguousReferenceError, match=f"prefix '{view.version[:8]}'"):
        datasets.resolve(view.version[:8])
    assert datasets.resolve(view.version[:12]).version == view.version


# -- splits and hashes ------------------------------------------------------------------------


def test_split_is_stratified_disjoint_and_seeded() -> None:
    y = np.repeat(np.arange(3), [40, 20, 10])
    splits = stratified_split(y, seed=3)
    together = np.concatenate(list(splits.values()))
    assert sorted(together.tolist()) == list(range(70))
    for index in splits.values():
        assert index.tolist() == sorted(index.tolist())
    assert np.bincount(y[splits["test"]]).tolist() == [6, 3, 2]  # 15% rounded, at least 1
    assert np.bincount(y[splits["val"]]).tolist() == [6, 3, 2]
    again = stratified_split(y, seed=3)
    assert all(np.array_equal(again[k], splits[k]) for k in splits)
    other = stratified_split(y, seed=4)
    assert not np.array_equal(other["test"], splits["test"])


def test_labels_become_sorted_class_names() -> None:
    y, classes = encode_labels(np.array([10, 2, 2, 1]), what="labels")
    assert classes == ["1", "2", "10"] and y.tolist() == [2, 1, 1, 0]
    y, classes = encode_labels(np.array(["b", "a", "b"]), what="labels")
    assert classes == ["a", "b"] and y.tolist() == [1, 0, 1]
    with pytest.raises(LabelColumnError, match=r"fractional numbers \(e.g. 0.5\)"):
        encode_labels(np.array([0.5, 1.0]), what="labels")


def test_version_id_hashes_arrays_split_classes_and_rule() -> None:
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    y = np.array([0, 0, 0, 1, 1, 1])
    splits = {"train": np.array([0, 3]), "val": np.array([1, 4]), "test": np.array([2, 5])}
    rule = FeatureRule(input_shape=(2,), offset=[0.0], scale=[1.0])
    base = DatasetContent(x=x, y=y, splits=splits, classes=["a", "b"], feature_rule=rule)
    assert (
        base.version()
        == DatasetContent(
            x=x.astype(np.float64), y=y, splits=splits, classes=["a", "b"], feature_rule=rule
        ).version()
    )
    changed_x = x.copy()
    changed_x[0, 0] = 0.5
    swapped = {"train": splits["val"], "val": splits["train"], "test": splits["test"]}
    variants = [
        DatasetContent(x=changed_x, y=y, splits=splits, classes=["a", "b"], feature_rule=rule),
        DatasetContent(x=x, y=y, splits=swapped, classes=["a", "b"], feature_rule=rule),
        DatasetContent(x=x, y=y, splits=splits, classes=["a", "c"], feature_rule=rule),
        DatasetContent(
            x=x,
            y=y,
            splits=splits,
            classes=["a", "b"],
            feature_rule=FeatureRule(input_shape=(2,), offset=[0.0], scale=[0.5]),
        ),
    ]
    versions = {variant.version() for variant in variants}
    assert len(versions) == 4 and base.version() not in versions
    stored = base.to_npz()
    assert stored == base.to_npz()  # deterministic bytes, so a deterministic artifact digest
    assert DatasetContent.from_npz(stored, what="test").version() == base.version()


# -- importing files --------------------------------------------------------------------------


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def test_import_csv_registers_a_standardised_version(
    datasets: DatasetService, tmp_path: Path
) -> None:
    path = write_csv(sensor_table(), tmp_path / "sensors.csv")
    view = datasets.import_file(path, name="sensors", label_column="activity", seed=1)
    assert view.classes == ["idle", "run", "walk"]
    assert view.feature_names == ["ax", "ay", "az", "temp"]
    assert view.input_shape == (4,) and view.split_sizes == {"train": 42, "val": 9, "test": 9}
    assert view.reference.feature_names == ["ax", "ay", "az", "temp"]
    arrays = datasets.load("sensors")
    train = arrays.model_inputs("train")
    np.testing.assert_allclose(train.mean(axis=0), 0.0, atol=1e-5)
    again = datasets.import_file(path, name="sensors", label_column="activity", seed=1)
    assert again.version == view.version and row_count(datasets) == 1
    with pytest.raises(DatasetConflictError, match="already registered as dataset 'sensors'"):
        datasets.import_file(path, name="sensors-copy", label_column="activity", seed=1)
    assert row_count(datasets) == 1


def test_import_npz_and_parquet(sqlite_datasets: DatasetService, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 10, 2))
    y = np.repeat([3, 1, 2], 10)
    np.savez(tmp_path / "series.npz", x=x, y=y)
    view = sqlite_datasets.import_file(tmp_path / "series.npz", name="series", label_column=None)
    assert view.classes == ["1", "2", "3"] and view.input_shape == (10, 2)
    assert view.reference.num_features == 2 and len(view.feature_rule.offset) == 2
    arrays = sqlite_datasets.load(view.version)
    label_of = {
        row.tobytes(): str(label) for row, label in zip(x.astype(np.float32), y, strict=True)
    }
    seen = 0
    for split in ("train", "val", "test"):
        xs, ys = arrays.split(split)
        for row, index in zip(xs, ys, strict=True):
            assert label_of[row.tobytes()] == arrays.classes[index]
        seen += len(xs)
    assert seen == 30

    table = sensor_table()
    table.to_parquet(tmp_path / "sensors.parquet")
    parquet = sqlite_datasets.import_file(
        tmp_path / "sensors.parquet", name="sensors-pq", label_column="activity"
    )
    assert parquet.feature_names == ["ax", "ay", "az", "temp"] and parquet.num_samples == 60


def test_new_data_is_read_in_the_dataset_column_order_and_class_index(tmp_path: Path) -> None:
    table = sensor_table()[["temp", "activity", "az", "ay", "ax"]]
    path = write_csv(table, tmp_path / "field.csv")
    columns = ["ax", "ay", "az", "temp"]
    data = read_labelled_file(path, label_column="activity", feature_names=columns)
    assert data.feature_names == columns
    np.testing.assert_array_equal(data.x[:, 0], table["ax"].to_numpy(dtype=np.float32))
    y = labels_to_indices(data.labels, ["idle", "run", "walk"], what="activity")
    assert y[:3].tolist() == [2, 2, 2]
    with pytest.raises(LabelColumnError, match="labels the model does not know: 'walk'"):
        labels_to_indices(data.labels, ["idle", "run"], what="activity")
    with pytest.raises(DataFileError, match="lacks feature column"):
        read_labelled_file(path, label_column="activity", feature_names=["ax", "gx"])


def test_corrupted_or_swapped_arrays_are_detected_on_load(
    sqlite_datasets: DatasetService, store: ArtifactStore, tmp_path: Path
) -> None:
    path = write_csv(sensor_table(), tmp_path / "sensors.csv")
    first = sqlite_datasets.import_file(path, name="a", label_column="activity")
    second = sqlite_datasets.import_file(path, name="b", label_column="activity", seed=5)
    with sqlite_datasets._db.session() as session:
        row = session.get(DatasetVersion, first.version)
        assert row is not None
        row.artifact_sha256 = second.artifact_sha256
    with pytest.raises(DataError, match="do not hash to its version id"):
        sqlite_datasets.load(first.version)
    stored = store.verified_path(second.artifact_sha256)
    stored.chmod(0o644)
    stored.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"dataset 'b' version .* cannot be read: .*is corrupted"):
        sqlite_datasets.load("b")
    # importing the same data again repairs the stored arrays
    sqlite_datasets.import_file(path, name="b", label_column="activity", seed=5)
    assert sqlite_datasets.load("b").name == "b"
    stored.unlink()
    with pytest.raises(DataError, match=r"dataset 'b' .* cannot be read: .*is not in"):
        sqlite_datasets.load("b")
    sqlite_datasets.import_file(path, name="b", label_column="activity", seed=5)
    assert sqlite_datasets.load("b").name == "b"


BadFile = Callable[[Path], Path]


def csv_with(change: Callable[[pd.DataFrame], None], name: str = "bad.csv") -> BadFile:
    def write(tmp_path: Path) -> Path:
        frame = sensor_table()
        change(frame)
        return write_csv(frame, tmp_path / name)

    return write


def set_cell(column: str, row: int, value: object) -> Callable[[pd.DataFrame], None]:
    def change(frame: pd.DataFrame) -> None:
        if isinstance(value, str):
            frame[column] = frame[column].astype(object)
        frame.loc[row, column] = value

    return change


def raw_file(name: str, content: bytes) -> BadFile:
    def write(tmp_path: Path) -> Path:
        path = tmp_path / name
        path.write_bytes(content)
        return path

    return write


def npz_file(**arrays: np.ndarray) -> BadFile:
    def write(tmp_path: Path) -> Path:
        path = tmp_path / "bad.npz"
        np.savez(path, **arrays)  # type: ignore[arg-type]
        return path

    return write


def one_class(frame: pd.DataFrame) -> None:
    frame["activity"] = "walk"


def tiny_class(frame: pd.DataFrame) -> None:
    frame.loc[frame.index[-18:], "activity"] = "walk"  # "run" keeps 2 rows


BAD_INPUTS: list[tuple[str, BadFile, str | None, type[DatasetInputError], str]] = [
    ("missing file", lambda p: p / "absent.csv", "activity", DataFileError, "does not exist"),
    (
        "unknown format",
        raw_file("data.xlsx", b"x"),
        "activity",
        DataFileError,
        "unknown format .xlsx",
    ),
    (
        "garbage parquet",
        raw_file("data.parquet", b"not parquet"),
        "activity",
        DataFileError,
        "cannot read data.parquet as Parquet",
    ),
    (
        "garbage npz",
        raw_file("data.npz", b"not a zip"),
        None,
        DataFileError,
        "cannot read data.npz as NPZ",
    ),
    ("empty csv", raw_file("empty.csv", b""), "activity", DataFileError, "empty.csv is empty"),
    (
        "missing label column",
        csv_with(lambda f: None),
        "label",
        LabelColumnError,
        "label column 'label' is not in bad.csv; columns: 'ax', 'ay', 'az', 'temp', 'activity'",
    ),
    (
        "no label column named",
        csv_with(lambda f: None),
        None,
        LabelColumnError,
        "name the label column",
    ),
    (
        "nan feature",
        csv_with(set_cell("temp", 4, np.nan)),
        "activity",
        NonFiniteValueError,
        r"column 'temp' has 1 NaN or infinite value\(s\) "
        r"\(first in data row 5\)",
    ),
    (
        "inf feature",
        csv_with(set_cell("ax", 0, np.inf)),
        "activity",
        NonFiniteValueError,
        "column 'ax' has 1 NaN or infinite",
    ),
    (
        "missing label",
        csv_with(set_cell("activity", 2, np.nan)),
        "activity",
        LabelColumnError,
        r"'activity' has 1 missing value\(s\) \(first in data row 3\)",
    ),
    (
        "text feature",
        csv_with(set_cell("ay", 1, "high")),
        "activity",
        NonNumericFeatureError,
        r"column\(s\) 'ay' are not numeric",
    ),
    (
        "one class",
        csv_with(one_class),
        "activity",
        ClassCountError,
        r"has 1 class \('walk'\); classification needs at least 2",
    ),
    (
        "class too small",
        csv_with(tiny_class),
        "activity",
        ClassCountError,
        "class 'run' has 2 sample",
    ),
    (
        "npz without x",
        npz_file(features=np.zeros((4, 2)), y=np.zeros(4)),
        None,
        DataFileError,
        "has no array 'x' .* arrays: 'features', 'y'",
    ),
    (
        "npz nan",
        npz_file(x=np.where(np.eye(9) > 0, np.nan, 0.0), y=np.arange(9) % 3),
        None,
        NonFiniteValueError,
        r"array 'x' has 9 NaN .* \(first in sample 1\)",
    ),
    (
        "npz pickled",
        npz_file(x=np.array([{"a": 1}] * 6, dtype=object), y=np.arange(6) % 2),
        None,
        DataFileError,
        "without pickle",
    ),
    (
        "npz label length",
        npz_file(x=np.zeros((6, 2)), y=np.zeros(5)),
        None,
        LabelColumnError,
        r"one label per sample \(6\)",
    ),
]


@pytest.mark.parametrize(
    ("write", "label_column", "error", "message"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_is_refused_and_leaves_nothing_behind(
    sqlite_datasets: DatasetService,
    store: ArtifactStore,
    tmp_path: Path,
    write: BadFile,
    label_column: str | None,
    error: type[DatasetInputError],
    message: str,
) -> None:
    path = write(tmp_path)
    with pytest.raises(error, match=message):
        sqlite_datasets.import_file(path, name="bad", label_column=label_column)
    assert row_count(sqlite_datasets) == 0
    assert stored_artifacts(store) == []


@pytest.mark.parametrize(
    ("name", "message"),
    [("digits", "reserved"), ("deadbeef00", "looks like a version id"), ("a/b", "invalid")],
)
def test_bad_names_are_refused(
    sqlite_datasets: DatasetService, tmp_path: Path, name: str, message: str
) -> None:
    path = write_csv(sensor_table(), tmp_path / "ok.csv")
    with pytest.raises(InvalidNameError, match=message):
        sqlite_datasets.import_file(path, name=name, label_column="activity")


# -- the command line -------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_import_list_show_json(tmp_path: Path) -> None:
    path = write_csv(sensor_table(), tmp_path / "sensors.csv")
    imported = run_cli(
        "edgeops", "data", "import", str(path), "--name", "sensors",
        "--label-column", "activity", "--json",
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    view = json.loads(imported.stdout)
    assert view["name"] == "sensors" and view["classes"] == ["idle", "run", "walk"]
    listed = run_cli("edgeops", "data", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [entry["version"] for entry in json.loads(listed.stdout)] == [view["version"]]
    shown = run_cli("edgeops", "data", "show", view["version"][:10], "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == view
    table = run_cli("edgeops", "data", "show", "sensors", env={"COLUMNS": "200"})
    assert table.returncode == 0 and view["version"] in table.stdout


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    path = write_csv(sensor_table(), tmp_path / "sensors.csv")
    result = run_cli(
        "edgeops", "data", "import", str(path), "--name", "sensors", "--label-column", "kind"
    )
    assert_one_line_error(result, "label column 'kind' is not in sensors.csv", "'activity'")
