"""HECKTOR 2022's clinical and endpoint tables -> outcomes.json (`convert-hecktor --with-outcomes`): the encoding,
the round trip from the phantom's tables, and every bad table: a one-line error naming file, row and column, and
nothing written to nnUNet_raw (no dataset folder, no temporary folder, no lock)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Callable

import nnunetv2.paths
import numpy as np
import pandas as pd
import pytest

from nnunetv2_pemma.cli import main
from nnunetv2_pemma.data.hecktor import convert_hecktor
from nnunetv2_pemma.data.outcomes import (CLINICAL_FEATURES, OUTCOMES_FILE, CaseOutcome, Outcomes, dataset_outcomes,
                                          encode_clinical_row, load_outcomes, read_hecktor_tables, write_outcomes)
from nnunetv2_pemma.data.phantom import CLINICAL_CSV, ENDPOINT_CSV, write_phantom
from nnunetv2_pemma.errors import InputDataError

TRAIN = ["CHUM-001", "CHUP-001", "CHUS-001", "CHUV-001", "HGJ-001", "HMR-001", "MDA-001"]  # table rows 2-8
TEST = ["CHB-001", "MDA-201", "USZ-001"]
HPV = "HPV status (0=-, 1=+)"
ALL_MISSING = [0.0, 1.0] * 9


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One training case per centre and one test case per test centre (under a second)."""
    root = tmp_path_factory.mktemp("phantom") / "hecktor"
    write_phantom(root, 1, test_cases_per_center=1)
    return root


@pytest.fixture
def hecktor(phantom: Path, tmp_path: Path) -> Path:
    """A copy of the phantom that a test may damage."""
    return Path(shutil.copytree(phantom, tmp_path / "in"))


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def edit(path: Path, change: Callable[[pd.DataFrame], pd.DataFrame | None]) -> None:
    table = read(path)
    changed = change(table)
    (table if changed is None else changed).to_csv(path, index=False)


def set_cell(path: Path, patient: str, column: str, value: str) -> None:
    def change(table: pd.DataFrame) -> None:
        table.loc[table["PatientID"] == patient, column] = value
    edit(path, change)


def add_row(path: Path, **cells: str) -> None:
    edit(path, lambda table: pd.concat([table, pd.DataFrame([cells])], ignore_index=True).fillna(""))


def drop_row(path: Path, patient: str) -> None:
    edit(path, lambda table: table[table["PatientID"] != patient])


def convert(root: Path, raw: Path, **kwargs: object):
    return convert_hecktor(root, dataset_id=512, name="Outcomes", raw_root=raw, with_outcomes=True, **kwargs)


# --- encoding ----------------------------------------------------------------------------------------------------

def test_feature_names() -> None:
    assert CLINICAL_FEATURES == (
        "Gender", "Gender missing", "Age", "Age missing", "Weight", "Weight missing", "Tobacco", "Tobacco missing",
        "Alcohol", "Alcohol missing", "Performance status", "Performance status missing", "HPV status",
        "HPV status missing", "Surgery", "Surgery missing", "Chemotherapy", "Chemotherapy missing")


def row(**cells: object) -> dict[str, object]:
    full = {"Gender": "", "Age": "", "Weight": "", "Tobacco": "", "Alcohol": "", "Performance status": "", HPV: "",
            "Surgery": "", "Chemotherapy": ""}
    full.update({HPV if k == "HPV" else k.replace("_", " "): v for k, v in cells.items()})
    return full


@pytest.mark.parametrize("cells, expected", [
    (dict(Gender="M", Age="72", Weight="90", Tobacco="1", Alcohol="0", Performance_status="2", HPV="1",
          Surgery="0", Chemotherapy="1"),
     [1, 0, 1.2, 0, 1.0, 0, 1, 0, 0, 0, 0.5, 0, 1, 0, 0, 0, 1, 0]),
    # values as a table saved by pandas writes them (floats in columns with blanks), and lower-case gender
    (dict(Gender="f", Age="45", Weight="60.0", Tobacco="0.0", Alcohol="1.0", Performance_status="4.0", HPV="0",
          Surgery="1", Chemotherapy="0"),
     [0, 0, -1.5, 0, -1.0, 0, 0, 0, 1, 0, 1.0, 0, 0, 0, 1, 0, 0, 0]),
    (dict(), ALL_MISSING),
    # blanks in every spelling: empty, spaces, NA, NaN from pandas' defaults, None
    (dict(Gender=" ", Age="NA", Weight=np.nan, Tobacco=pd.NA, Alcohol=None, Performance_status="nan", HPV="N/A"),
     ALL_MISSING),
    (dict(Age="60", Performance_status="0", HPV="1"),
     [0, 1, 0.0, 0, 0, 1, 0, 1, 0, 1, 0.0, 0, 1, 0, 0, 1, 0, 1]),
])
def test_encoding(cells: dict[str, object], expected: list[float]) -> None:
    assert encode_clinical_row(row(**cells), "t.csv row 2") == pytest.approx(tuple(expected), abs=1e-12)


@pytest.mark.parametrize("column, value, problem", [
    ("Gender", "X", "must be M or F (or blank), got 'X'"),
    ("Age", "sixty", "must be an age in years from 10 to 110 (or blank), got 'sixty'"),
    ("Age", "0", "must be an age in years from 10 to 110 (or blank), got '0'"),
    ("Age", "999", "must be an age in years from 10 to 110 (or blank), got '999'"),
    ("Weight", "heavy", "must be a weight in kg (or blank), got 'heavy'"),
    ("Weight", "-70", "must be a weight in kg (or blank), got '-70'"),
    ("Weight", "inf", "must be a weight in kg (or blank), got 'inf'"),
    ("Tobacco", "2", "must be 0 or 1 (or blank), got '2'"),
    ("Alcohol", "yes", "must be 0 or 1 (or blank), got 'yes'"),
    (HPV, "+", "must be 0 or 1 (or blank), got '+'"),
    ("Surgery", "-1", "must be 0 or 1 (or blank), got '-1'"),
    ("Chemotherapy", "0.5", "must be 0 or 1 (or blank), got '0.5'"),
    ("Performance status", "5", "must be an ECOG performance status 0, 1, 2, 3 or 4 (or blank), got '5'"),
    ("Performance status", "1.5", "must be an ECOG performance status 0, 1, 2, 3 or 4 (or blank), got '1.5'"),
])
def test_bad_cell(column: str, value: str, problem: str) -> None:
    cells = row(Gender="M", Age="60")
    cells[column] = value
    with pytest.raises(InputDataError) as e:
        encode_clinical_row(cells, "t.csv row 7")
    assert str(e.value) == f"t.csv row 7, column {column!r}: {problem}"


def test_vectors_of_cases_without_data() -> None:
    outcomes = Outcomes(CLINICAL_FEATURES, {"CHUM-001": CaseOutcome("CHUM", None, None, None)})
    for case in ("CHUM-001", "NOPE-001"):
        vector = outcomes.clinical_vector(case)
        assert vector.dtype == np.float32 and vector.tolist() == ALL_MISSING
        assert outcomes.endpoint(case) is None


# --- the round trip: phantom tables -> convert-hecktor --with-outcomes -> outcomes.json ----------------------------

def expected_from_csv(root: Path) -> dict[str, tuple]:
    """case -> (clinical vector, raw row, endpoint) straight from the phantom's tables."""
    clinical = read(root / CLINICAL_CSV).set_index("PatientID", drop=False)
    endpoint = read(root / ENDPOINT_CSV).set_index("PatientID")
    expected = {}
    for case in TRAIN:
        cells = clinical.loc[case].to_dict()
        expected[case] = (list(encode_clinical_row(cells, case)), cells,
                          (int(endpoint.loc[case, "Relapse"]), float(endpoint.loc[case, "RFS"])))
    return expected


def check_outcomes(outcomes: Outcomes, root: Path) -> None:
    assert outcomes.features == CLINICAL_FEATURES
    assert sorted(outcomes.cases) == sorted(TRAIN + TEST)
    for case, (vector, cells, endpoint) in expected_from_csv(root).items():
        assert outcomes.clinical_vector(case).tolist() == pytest.approx(vector, abs=1e-6)
        assert outcomes.endpoint(case) == endpoint
        assert dict(outcomes.cases[case].clinical_raw) == cells and outcomes.cases[case].center == case.split("-")[0]
    for case in TEST:  # the training table has no rows for test cases
        assert outcomes.cases[case].clinical is None and outcomes.endpoint(case) is None
        assert outcomes.clinical_vector(case).tolist() == ALL_MISSING


def test_round_trip(phantom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "raw"
    report = convert(phantom, raw)
    out = raw / "Dataset512_Outcomes"
    outcomes = load_outcomes(out)
    check_outcomes(outcomes, phantom)
    assert outcomes == report.outcomes == load_outcomes(out / OUTCOMES_FILE)
    relapses = sum(int(v) for v in read(phantom / ENDPOINT_CSV)["Relapse"])
    assert (f"  outcomes: 7 of 10 cases with a clinical row, 7 with an endpoint ({relapses} relapses), in "
            f"outcomes.json") in str(report).splitlines()
    assert json.loads((out / "dataset.json").read_text())["pemma"]["outcomes"] == OUTCOMES_FILE
    stored = json.loads((out / OUTCOMES_FILE).read_text())
    assert set(stored) == {"description", "features", "cases"}
    assert set(stored["description"]) >= {"features", "encoding", "cases"}
    assert set(stored["cases"]["CHUM-001"]) == {"center", "clinical", "relapse", "rfs_days", "clinical_raw"}
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset512_Outcomes"]
    monkeypatch.setattr(nnunetv2.paths, "nnUNet_raw", str(raw))
    assert dataset_outcomes("Dataset512_Outcomes") == outcomes


def test_round_trip_through_the_cli(phantom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    raw = tmp_path / "raw"
    monkeypatch.setenv("nnUNet_raw", str(raw))
    with warnings.catch_warnings():  # the CLI changes how warnings are shown
        code = main(["convert-hecktor", str(phantom), "--dataset-id", "513", "--name", "Cli", "--with-outcomes"])
    assert code == 0, capsys.readouterr().err
    assert "outcomes: 7 of 10 cases with a clinical row, 7 with an endpoint" in capsys.readouterr().out
    check_outcomes(load_outcomes(raw / "Dataset513_Cli"), phantom)


def test_without_the_flag_nothing_changes(phantom: Path, tmp_path: Path) -> None:
    report = convert_hecktor(phantom, dataset_id=514, name="Plain", centers=["CHUM"], raw_root=tmp_path)
    assert report.outcomes is None and "outcomes" not in str(report)
    assert not (report.dataset_dir / OUTCOMES_FILE).exists()
    assert "outcomes" not in json.loads((report.dataset_dir / "dataset.json").read_text())["pemma"]
    with pytest.raises(InputDataError) as e:
        load_outcomes(report.dataset_dir)
    assert str(e.value) == (f"no outcomes.json in {report.dataset_dir}: convert with pemma convert-hecktor ... "
                            f"--with-outcomes")


def test_centres_left_out_and_bad_cases_skipped(hecktor: Path, tmp_path: Path) -> None:
    """Rows of centres left out with --centers are no strangers, nor are those of cases --skip-bad skipped."""
    add_row(hecktor / CLINICAL_CSV, PatientID="HGJ-002", CenterID="5", Gender="M", Age="60", **{"Task 2": "0"})
    (hecktor / "imagesTr" / "CHUS-001__PT.nii.gz").unlink()
    report = convert(hecktor, tmp_path / "raw", centers=["CHUP", "CHUS", "MDA"], skip_bad=True)
    assert report.skipped.keys() == {"CHUS-001"}
    outcomes = load_outcomes(report.dataset_dir)
    assert sorted(outcomes.cases) == ["CHUP-001", "MDA-001", "MDA-201"] and outcomes == report.outcomes
    assert outcomes.endpoint("MDA-001") is not None and outcomes.cases["MDA-201"].clinical is None


def test_cases_without_rows_and_outside_task_2(hecktor: Path) -> None:
    """A case without a clinical row, and one outside Task 2 without an endpoint, are converted without them."""
    for table in (CLINICAL_CSV, ENDPOINT_CSV):
        drop_row(hecktor / table, "CHUS-001")
    set_cell(hecktor / CLINICAL_CSV, "CHUV-001", "Task 2", "0")
    drop_row(hecktor / ENDPOINT_CSV, "CHUV-001")
    set_cell(hecktor / CLINICAL_CSV, "HGJ-001", "Task 2", "0")  # outside Task 2, endpoint row left blank
    set_cell(hecktor / ENDPOINT_CSV, "HGJ-001", "Relapse", "")
    set_cell(hecktor / ENDPOINT_CSV, "HGJ-001", "RFS", "")
    outcomes = read_hecktor_tables(hecktor, {case: case.split("-")[0] for case in TRAIN})
    assert outcomes.cases["CHUS-001"] == CaseOutcome("CHUS", None, None, None)
    for case in ("CHUV-001", "HGJ-001"):
        assert outcomes.cases[case].clinical is not None and outcomes.endpoint(case) is None
    assert outcomes.endpoint("CHUM-001") is not None


def test_tables_as_spreadsheets_save_them(hecktor: Path, phantom: Path) -> None:
    """A byte-order mark, CENTRE_NNN ids (as some HECKTOR releases spell them), NA for blanks, blank lines."""
    set_cell(hecktor / CLINICAL_CSV, "HMR-001", "Age", "abc")
    for table in (CLINICAL_CSV, ENDPOINT_CSV):
        text = (hecktor / table).read_text().replace("CHUM-001", "CHUM_001").replace(",,", ",NA,")
        lines = text.splitlines()
        (hecktor / table).write_text("\ufeff" + "\n".join(lines[:3] + [""] + lines[3:]) + "\n\n")
    with pytest.raises(InputDataError) as e:  # HMR-001 is row 7 of the table, row 8 after the blank line
        read_hecktor_tables(hecktor, {case: case.split("-")[0] for case in TRAIN})
    assert str(e.value).startswith(f"{hecktor / CLINICAL_CSV} row 8, column 'Age': ")
    (hecktor / CLINICAL_CSV).write_text((hecktor / CLINICAL_CSV).read_text().replace(",abc,", ",68,"))
    outcomes = read_hecktor_tables(hecktor, {case: case.split("-")[0] for case in TRAIN})
    pristine = read_hecktor_tables(phantom, {case: case.split("-")[0] for case in TRAIN})
    for case in TRAIN:
        assert outcomes.cases[case].clinical == pristine.cases[case].clinical, case
        assert outcomes.endpoint(case) == pristine.endpoint(case) is not None, case
    assert dict(outcomes.cases["CHUM-001"].clinical_raw)["PatientID"] == "CHUM_001"  # as read


# --- bad tables: one line naming file, row and column; nothing written ---------------------------------------------

def clin(root: Path) -> Path:
    return root / CLINICAL_CSV


def endp(root: Path) -> Path:
    return root / ENDPOINT_CSV


BAD_TABLES: dict[str, tuple[Callable[[Path], None], Callable[[Path], str]]] = {
    "missing clinical table": (lambda r: clin(r).unlink(),
                               lambda r: f"missing table {clin(r)}: HECKTOR 2022 ships it next to imagesTr/, and "
                                         f"--with-outcomes reads it"),
    "missing endpoint table": (lambda r: endp(r).unlink(),
                               lambda r: f"missing table {endp(r)}: HECKTOR 2022 ships it next to imagesTr/, and "
                                         f"--with-outcomes reads it"),
    "missing clinical column": (lambda r: edit(clin(r), lambda t: t.drop(columns=["Weight"])),
                                lambda r: f"{clin(r)} row 1 (the header) lacks column(s) 'Weight'; {CLINICAL_CSV} "
                                          f"needs PatientID, CenterID, Gender, Age, Weight, Tobacco, Alcohol, "
                                          f"Performance status, HPV status (0=-, 1=+), Surgery, Chemotherapy"),
    "missing endpoint column": (lambda r: edit(endp(r), lambda t: t.drop(columns=["RFS"])),
                                lambda r: f"{endp(r)} row 1 (the header) lacks column(s) 'RFS'; {ENDPOINT_CSV} needs "
                                          f"PatientID, Relapse, RFS"),
    "duplicate clinical row": (lambda r: edit(clin(r), lambda t: pd.concat([t, t.iloc[[2]]])),
                               lambda r: f"{clin(r)} row 9, column 'PatientID': patient CHUS-001 repeats row 4"),
    "duplicate under another spelling": (lambda r: edit(endp(r), lambda t: pd.concat(
                                             [t, t.iloc[[0]].replace("CHUM-001", "CHUM_001")])),
                                         lambda r: f"{endp(r)} row 9, column 'PatientID': patient CHUM-001 repeats "
                                                   f"row 2"),
    "unknown patient": (lambda r: add_row(clin(r), PatientID="CHUM-002", **{"Task 2": "0"}),
                        lambda r: f"{clin(r)} row 9, column 'PatientID': patient CHUM-002 is none of the 10 case(s) "
                                  f"being converted from {r}; remove the row, or leave centre CHUM out with "
                                  f"--centers"),
    "endpoint without clinical row": (lambda r: drop_row(clin(r), "CHUS-001"),
                                      lambda r: f"{endp(r)} row 4, column 'PatientID': patient CHUS-001 has no row "
                                                f"in {clin(r)}"),
    "blank patient id": (lambda r: set_cell(clin(r), "HGJ-001", "PatientID", ""),
                         lambda r: f"{clin(r)} row 6, column 'PatientID': blank"),
    "age not a number": (lambda r: set_cell(clin(r), "CHUV-001", "Age", "62y"),
                         lambda r: f"{clin(r)} row 5, column 'Age': must be an age in years from 10 to 110 (or "
                                   f"blank), got '62y'"),
    "implausible age": (lambda r: set_cell(clin(r), "CHUV-001", "Age", "620"),
                        lambda r: f"{clin(r)} row 5, column 'Age': must be an age in years from 10 to 110 (or "
                                  f"blank), got '620'"),
    "gender": (lambda r: set_cell(clin(r), "MDA-001", "Gender", "male"),
               lambda r: f"{clin(r)} row 8, column 'Gender': must be M or F (or blank), got 'male'"),
    "binary column": (lambda r: set_cell(clin(r), "CHUP-001", HPV, "2"),
                      lambda r: f"{clin(r)} row 3, column 'HPV status (0=-, 1=+)': must be 0 or 1 (or blank), "
                                f"got '2'"),
    "performance status": (lambda r: set_cell(clin(r), "CHUP-001", "Performance status", "7"),
                           lambda r: f"{clin(r)} row 3, column 'Performance status': must be an ECOG performance "
                                     f"status 0, 1, 2, 3 or 4 (or blank), got '7'"),
    "weight not a number": (lambda r: set_cell(clin(r), "HMR-001", "Weight", "70kg"),
                            lambda r: f"{clin(r)} row 7, column 'Weight': must be a weight in kg (or blank), got "
                                      f"'70kg'"),
    "Task 2 not 0/1": (lambda r: set_cell(clin(r), "HMR-001", "Task 2", "yes"),
                       lambda r: f"{clin(r)} row 7, column 'Task 2': must be 0 or 1, got 'yes'"),
    "negative RFS": (lambda r: set_cell(endp(r), "CHUS-001", "RFS", "-3"),
                     lambda r: f"{endp(r)} row 4, column 'RFS': must be a number of days >= 0, got '-3'"),
    "RFS not a number": (lambda r: set_cell(endp(r), "CHUS-001", "RFS", "3 years"),
                         lambda r: f"{endp(r)} row 4, column 'RFS': must be a number of days >= 0, got '3 years'"),
    "RFS blank for Task 2": (lambda r: set_cell(endp(r), "CHUS-001", "RFS", ""),
                             lambda r: f"{endp(r)} row 4, column 'RFS': blank for a Task-2 patient ('Task 2' is 1 "
                                       f"in {CLINICAL_CSV} row 4)"),
    "RFS blank, no Task 2 column": (lambda r: (edit(clin(r), lambda t: t.drop(columns=["Task 2"])),
                                               set_cell(endp(r), "MDA-001", "RFS", "")),
                                    lambda r: f"{endp(r)} row 8, column 'RFS': blank for a Task-2 patient "
                                              f"({CLINICAL_CSV} has no 'Task 2' column, so every patient of "
                                              f"{ENDPOINT_CSV} is one)"),
    "relapse not 0/1": (lambda r: set_cell(endp(r), "HGJ-001", "Relapse", "2"),
                        lambda r: f"{endp(r)} row 6, column 'Relapse': must be 0 (censored) or 1 (relapse), got '2'"),
    "relapse blank outside Task 2": (lambda r: (set_cell(clin(r), "HGJ-001", "Task 2", "0"),
                                                set_cell(endp(r), "HGJ-001", "Relapse", "")),
                                     lambda r: f"{endp(r)} row 6, column 'Relapse': blank while 'RFS' is given"),
    "Task-2 case without endpoint": (lambda r: drop_row(endp(r), "HGJ-001"),
                                     lambda r: f"{endp(r)} has no row for patient HGJ-001, a Task-2 patient "
                                               f"({clin(r)} row 6, column 'Task 2' is 1)"),
    "not a CSV table": (lambda r: endp(r).write_text('PatientID,Relapse,RFS\nCHUM-001,0,1,"x\n'),
                        lambda r: f"{endp(r)} is not a readable CSV table (ParserError: Error tokenizing data. C "
                                  f"error: EOF inside string starting at row 1)"),
}


@pytest.mark.parametrize("problem", list(BAD_TABLES))
def test_bad_table_is_named_and_nothing_is_written(hecktor: Path, tmp_path: Path, problem: str) -> None:
    damage, message = BAD_TABLES[problem]
    damage(hecktor)
    raw = tmp_path / "raw"
    raw.mkdir()
    with pytest.raises(InputDataError) as e:
        convert(hecktor, raw)
    assert str(e.value) == message(hecktor) and "\n" not in str(e.value)
    assert list(raw.iterdir()) == []  # no dataset, no temporary folder, no lock


def test_bad_table_through_the_cli(hecktor: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    set_cell(clin(hecktor), "MDA-001", "Gender", "male")
    raw = tmp_path / "raw"
    raw.mkdir()
    monkeypatch.setenv("nnUNet_raw", str(raw))
    with warnings.catch_warnings():
        code = main(["convert-hecktor", str(hecktor), "--dataset-id", "515", "--name", "Bad", "--with-outcomes"])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"pemma convert-hecktor: error: {clin(hecktor)} row 8, column 'Gender': must be M "
                                 f"or F (or blank), got 'male'\n")
    assert list(raw.iterdir()) == []


def test_edition_2021_has_no_outcomes(hecktor: Path, tmp_path: Path) -> None:
    with pytest.raises(InputDataError) as e:
        convert(hecktor, tmp_path / "raw", edition=2021)
    assert str(e.value) == ("--with-outcomes reads HECKTOR 2022's clinical and endpoint tables; it does not work with "
                            "edition 2021")
    assert not (tmp_path / "raw").exists()


# --- outcomes.json read back --------------------------------------------------------------------------------------

def good_outcomes() -> Outcomes:
    clinical = encode_clinical_row(row(Gender="F", Age="50"), "t")
    return Outcomes(CLINICAL_FEATURES, {
        "CHUM-001": CaseOutcome("CHUM", clinical, 1, 300.0, (("Gender", "F"), ("Age", "50"))),
        "CHUP-001": CaseOutcome("CHUP", None, None, None)})


def test_write_and_load(tmp_path: Path) -> None:
    path = write_outcomes(tmp_path, good_outcomes())
    assert path == tmp_path / OUTCOMES_FILE and [p.name for p in tmp_path.iterdir()] == [OUTCOMES_FILE]
    assert load_outcomes(path) == load_outcomes(tmp_path) == good_outcomes()
    assert load_outcomes(path).endpoint("CHUM-001") == (1, 300.0)


@pytest.mark.parametrize("change, problem", [
    (lambda d: d["cases"]["CHUM-001"].update(clinical=[0.0] * 17),
     "case CHUM-001: 'clinical' must be null or a list of 18 numbers, got [0.0, "),
    (lambda d: d["cases"]["CHUM-001"].update(relapse=2), "case CHUM-001: 'relapse' must be 0, 1 or null, got 2"),
    (lambda d: d["cases"]["CHUM-001"].update(rfs_days=-1), "case CHUM-001: 'rfs_days' must be a number >= 0 or null"),
    (lambda d: d["cases"]["CHUM-001"].update(rfs_days=None),
     "case CHUM-001: 'relapse' and 'rfs_days' must both be null or both be given"),
    (lambda d: d["cases"]["CHUP-001"].pop("center"), "case CHUP-001: needs an object with a 'center' name"),
    (lambda d: d.pop("cases"), "the file is not an outcomes file (it needs a 'features' list and a 'cases' object)"),
])
def test_malformed_outcomes(tmp_path: Path, change: Callable[[dict], object], problem: str) -> None:
    data = good_outcomes().to_json()
    change(data)
    path = tmp_path / OUTCOMES_FILE
    path.write_text(json.dumps(data))
    with pytest.raises(InputDataError) as e:
        load_outcomes(tmp_path)
    assert str(e.value).startswith(f"{path}: {problem}") and "\n" not in str(e.value)
    assert str(e.value).endswith("; convert again with pemma convert-hecktor ... --with-outcomes")


def test_outcomes_file_not_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / OUTCOMES_FILE
    path.write_text('{"features": [')
    with pytest.raises(InputDataError) as e:
        load_outcomes(path)
    assert str(e.value) == (f"{path} is not valid JSON (Expecting value at line 1 column 15); convert again with "
                            f"pemma convert-hecktor ... --with-outcomes")
    monkeypatch.setattr(nnunetv2.paths, "nnUNet_raw", str(tmp_path))
    with pytest.raises(InputDataError) as e:
        dataset_outcomes("Dataset599_Nope")
    assert str(e.value) == f"no dataset Dataset599_Nope in nnUNet_raw ({tmp_path / 'Dataset599_Nope'} does not exist)"


def test_prognosis_training_needs_a_case_with_an_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prognosis trainers' check (before nnU-Net writes anything): outcomes in which no case has a relapse-free
    survival endpoint are refused in one line; one case with an endpoint is enough."""
    from nnunetv2_pemma.trainers.prognosis.survival import training_outcomes

    folder = tmp_path / "Dataset613_NoEndpoints"
    folder.mkdir()
    clinical_only = Outcomes(CLINICAL_FEATURES, {"CHUM-001": CaseOutcome("CHUM", None, None, None),
                                                 "CHUP-001": CaseOutcome("CHUP", None, None, None)})
    (folder / OUTCOMES_FILE).write_text(json.dumps(clinical_only.to_json()))
    monkeypatch.setattr(nnunetv2.paths, "nnUNet_raw", str(tmp_path))
    with pytest.raises(InputDataError) as e:
        training_outcomes("Dataset613_NoEndpoints")
    assert str(e.value) == ("no case of Dataset613_NoEndpoints has a relapse-free survival endpoint in its "
                            "outcomes.json: prognosis trainers need HECKTOR's Task-2 cases")
    one = Outcomes(CLINICAL_FEATURES, {**clinical_only.cases, "CHUS-001": CaseOutcome("CHUS", None, 0, 900.0)})
    (folder / OUTCOMES_FILE).write_text(json.dumps(one.to_json()))
    assert training_outcomes("Dataset613_NoEndpoints") == one
