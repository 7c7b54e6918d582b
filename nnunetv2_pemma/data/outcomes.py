"""HECKTOR 2022's clinical data and relapse-free survival, keyed by nnU-Net case id (`outcomes.json`).

HECKTOR 2022 ships two tables next to imagesTr/: hecktor2022_clinical_info_training.csv (a row per patient: centre,
gender, age, weight, tobacco, alcohol, performance status, HPV, surgery, chemotherapy, with many blank cells) and
hecktor2022_endpoint_training.csv (Relapse 0/1 and RFS in days for the Task-2 patients). `pemma convert-hecktor
--with-outcomes` validates both before anything is written and puts outcomes.json next to dataset.json, so that
prognosis training and evaluation read one checked file with the ids nnU-Net uses.

The clinical vector encodes every variable with fixed constants, not statistics of the data (a mean or a median
would leak between folds), and with an explicit "missing" indicator: real HECKTOR leaves Tobacco, Alcohol,
Performance status, HPV, Surgery and Weight blank for many patients, and dropping them would lose most cases.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Mapping, Sequence

import numpy as np
import pandas as pd

from nnunetv2_pemma.data.centers import center_of
from nnunetv2_pemma.data.phantom import CLINICAL_CSV, ENDPOINT_CSV
from nnunetv2_pemma.errors import InputDataError

OUTCOMES_FILE = "outcomes.json"  # written next to dataset.json in nnUNet_raw/DatasetNNN_Name/

PATIENT, TASK_2, CENTER_ID, RELAPSE, RFS = "PatientID", "Task 2", "CenterID", "Relapse", "RFS"
MISSING_SUFFIX = " missing"
AGE_RANGE = (10.0, 110.0)  # years; outside it a value is a typo or a placeholder, not an age
_MISSING_TEXT = frozenset({"", "na", "n/a", "nan"})  # blank cells, and what spreadsheets and pandas write for them


def _number(text: str, what: str) -> float:
    """A finite number, or ValueError saying what was expected."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"must be {what} (or blank), got {text!r}")
    return value


def _gender(text: str) -> float:
    code = {"M": 1.0, "F": 0.0}.get(text.upper())
    if code is None:
        raise ValueError(f"must be M or F (or blank), got {text!r}")
    return code


def _age(text: str) -> float:
    what = f"an age in years from {AGE_RANGE[0]:g} to {AGE_RANGE[1]:g}"
    years = _number(text, what)
    if not AGE_RANGE[0] <= years <= AGE_RANGE[1]:
        raise ValueError(f"must be {what} (or blank), got {text!r}")
    return (years - 60.0) / 10.0


def _weight(text: str) -> float:
    kg = _number(text, "a weight in kg")
    if kg <= 0:
        raise ValueError(f"must be a weight in kg (or blank), got {text!r}")
    return (kg - 75.0) / 15.0


def _choice(text: str, allowed: range, what: str) -> int:
    """An integer of `allowed`, also when written as a float ('1.0', as pandas writes a column with blanks)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value not in allowed:
        raise ValueError(f"must be {what}, got {text!r}")
    return int(value)


def _binary(text: str) -> float:
    return float(_choice(text, range(2), "0 or 1 (or blank)"))


def _performance_status(text: str) -> float:
    return _choice(text, range(5), "an ECOG performance status 0, 1, 2, 3 or 4 (or blank)") / 4.0


# (feature name, column of the clinical table, encoder of a non-blank cell), in the order of CLINICAL_FEATURES
_VARIABLES: tuple[tuple[str, str, Callable[[str], float]], ...] = (
    ("Gender", "Gender", _gender), ("Age", "Age", _age), ("Weight", "Weight", _weight),
    ("Tobacco", "Tobacco", _binary), ("Alcohol", "Alcohol", _binary),
    ("Performance status", "Performance status", _performance_status),
    ("HPV status", "HPV status (0=-, 1=+)", _binary), ("Surgery", "Surgery", _binary),
    ("Chemotherapy", "Chemotherapy", _binary))
CLINICAL_FEATURES: tuple[str, ...] = tuple(n for name, _, _ in _VARIABLES for n in (name, name + MISSING_SUFFIX))
CLINICAL_REQUIRED: tuple[str, ...] = (PATIENT, CENTER_ID) + tuple(column for _, column, _ in _VARIABLES)
ENDPOINT_REQUIRED: tuple[str, ...] = (PATIENT, RELAPSE, RFS)

_DESCRIPTION = {
    "what": f"Clinical data and relapse-free survival of this nnU-Net dataset's cases, from HECKTOR 2022's "
            f"{CLINICAL_CSV} and {ENDPOINT_CSV}, validated and written by `pemma convert-hecktor --with-outcomes`.",
    "features": "names of the entries of every 'clinical' vector, in order: for each variable its value and a "
                "'<variable> missing' indicator",
    "encoding": "Gender M=1, F=0; Age (years - 60) / 10; Weight (kg - 75) / 15; Performance status (ECOG 0-4) / 4; "
                "Tobacco, Alcohol, HPV status, Surgery, Chemotherapy 0/1. A blank cell gives value 0 and indicator "
                "1, a filled one indicator 0. Fixed constants, no statistics of the data: nothing leaks between folds.",
    "cases": "nnU-Net case id -> center (the case-id prefix); clinical (the encoded row, null when the case has no "
             "row in the clinical table: use values 0 and every indicator 1); relapse (1 relapse, 0 censored) and "
             "rfs_days (days to relapse or to the last follow-up), both null when the case has no endpoint (not a "
             "Task-2 case); clinical_raw (the row's cells as read, for the record; null without a row)",
}


@dataclass(frozen=True)
class CaseOutcome:
    """One case's encoded clinical row and endpoint; None where the tables have none."""

    center: str
    clinical: tuple[float, ...] | None  # the encoded row (len(CLINICAL_FEATURES)), None without a clinical row
    relapse: int | None  # 0/1, None when the case has no endpoint (not a Task-2 case)
    rfs_days: float | None
    clinical_raw: tuple[tuple[str, str], ...] | None = None  # (column, cell) as read, kept for the record


@dataclass(frozen=True)
class Outcomes:
    """The outcomes of a converted dataset; a case unknown to it counts as having no clinical row and no endpoint."""

    features: tuple[str, ...]
    cases: dict[str, CaseOutcome]  # case id as in the nnU-Net dataset (e.g. "CHUM-001")

    def clinical_vector(self, case_id: str) -> np.ndarray:
        """float32 (len(features),): the case's encoded row, else the encoding of an all-blank row."""
        case = self.cases.get(case_id)
        if case is None or case.clinical is None:
            return np.array([1.0 if f.endswith(MISSING_SUFFIX) else 0.0 for f in self.features], np.float32)
        return np.asarray(case.clinical, np.float32)

    def endpoint(self, case_id: str) -> tuple[int, float] | None:
        """(relapse, rfs_days), or None when the case has no endpoint."""
        case = self.cases.get(case_id)
        if case is None or case.relapse is None or case.rfs_days is None:
            return None
        return case.relapse, case.rfs_days

    def to_json(self) -> dict:
        """The outcomes.json content (see its "description")."""
        return {"description": _DESCRIPTION, "features": list(self.features),
                "cases": {case_id: {"center": c.center, "clinical": None if c.clinical is None else list(c.clinical),
                                    "relapse": c.relapse, "rfs_days": c.rfs_days,
                                    "clinical_raw": None if c.clinical_raw is None else dict(c.clinical_raw)}
                          for case_id, c in self.cases.items()}}

    @classmethod
    def from_json(cls, d: dict, source: str) -> Outcomes:
        """Parse and check `to_json`'s form; InputDataError naming `source` and the entry otherwise."""
        def bad(where: str, problem: str) -> InputDataError:
            return InputDataError(f"{source}: {where} {problem}; convert again with pemma convert-hecktor ... "
                                  f"--with-outcomes")

        if not isinstance(d, dict) or not isinstance(d.get("features"), list) or not isinstance(d.get("cases"), dict):
            raise bad("the file", "is not an outcomes file (it needs a 'features' list and a 'cases' object)")
        features = d["features"]
        if not features or not all(isinstance(f, str) for f in features):
            raise bad("'features'", "must be a non-empty list of names")
        cases = {}
        for case_id, entry in d["cases"].items():
            where = f"case {case_id}:"
            if not isinstance(entry, dict) or not isinstance(entry.get("center"), str):
                raise bad(where, "needs an object with a 'center' name")
            clinical = entry.get("clinical")
            if clinical is not None and not (isinstance(clinical, list) and len(clinical) == len(features)
                                             and all(_is_number(v) for v in clinical)):
                raise bad(where, f"'clinical' must be null or a list of {len(features)} numbers, got {clinical!r}")
            relapse, rfs = entry.get("relapse"), entry.get("rfs_days")
            if (relapse is None) != (rfs is None):
                raise bad(where, "'relapse' and 'rfs_days' must both be null or both be given")
            if relapse is not None and (type(relapse) is not int or relapse not in (0, 1)):
                raise bad(where, f"'relapse' must be 0, 1 or null, got {relapse!r}")
            if rfs is not None and not (_is_number(rfs) and rfs >= 0):
                raise bad(where, f"'rfs_days' must be a number >= 0 or null, got {rfs!r}")
            raw = entry.get("clinical_raw")
            if raw is not None and not (isinstance(raw, dict) and all(isinstance(v, str) for v in raw.values())):
                raise bad(where, "'clinical_raw' must be null or an object of column -> cell text")
            cases[case_id] = CaseOutcome(entry["center"], None if clinical is None else tuple(map(float, clinical)),
                                         relapse, None if rfs is None else float(rfs),
                                         None if raw is None else tuple(raw.items()))
        return cls(tuple(features), cases)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(value: object) -> str | None:
    """A cell's text, stripped; None when blank (or NaN/NA, from a table read with pandas' defaults)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    text = str(value).strip()
    return None if text.lower() in _MISSING_TEXT else text


def _cell_error(where: str, column: str, problem: str) -> InputDataError:
    return InputDataError(f"{where}, column {column!r}: {problem}")


def encode_clinical_row(row: Mapping[str, object], where: str) -> tuple[float, ...]:
    """The clinical vector of one table row (see CLINICAL_FEATURES); `where` (e.g. "<file> row 7") starts the
    message of the InputDataError a bad cell raises."""
    encoded: list[float] = []
    for _, column, encode in _VARIABLES:
        if column not in row:
            raise _cell_error(where, column, "no such column")
        text = _text(row[column])
        try:
            encoded += [0.0, 1.0] if text is None else [encode(text), 0.0]
        except ValueError as e:
            raise _cell_error(where, column, str(e)) from None
    return tuple(encoded)


def _read_table(path: Path, required: Sequence[str]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The columns of a CSV table and its rows as (row number as a spreadsheet shows it, header = row 1; cells,
    stripped, blank = ''); all-blank rows are left out."""
    if not path.is_file():
        raise InputDataError(f"missing table {path}: HECKTOR 2022 ships it next to imagesTr/, and --with-outcomes "
                             f"reads it")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], skip_blank_lines=False,
                            encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        detail = " ".join(str(e).split())
        raise InputDataError(f"{path} is not a readable CSV table ({type(e).__name__}: {detail})") from None
    columns = [str(c).strip() for c in table.columns]
    missing = [c for c in required if c not in columns]
    if missing:
        raise InputDataError(f"{path} row 1 (the header) lacks column(s) {', '.join(map(repr, missing))}; "
                             f"{path.name} needs {', '.join(required)}")
    rows = []
    for number, values in enumerate(table.itertuples(index=False, name=None), start=2):
        cells = {column: str(value).strip() for column, value in zip(columns, values)}
        if any(cells.values()):
            rows.append((number, cells))
    return columns, rows


def _patient_id(cells: dict[str, str], where: str, seen: Mapping[str, int]) -> str:
    """The row's canonical patient id; an error when blank or already seen in this table."""
    from nnunetv2_pemma.data.hecktor import canonical_id  # here: hecktor imports this module

    text = _text(cells[PATIENT])
    if text is None:
        raise _cell_error(where, PATIENT, "blank")
    patient = canonical_id(text)
    if patient in seen:
        raise _cell_error(where, PATIENT, f"patient {patient} repeats row {seen[patient]}")
    return patient


def read_hecktor_tables(input_dir: Path, case_centers: Mapping[str, str],
                        left_out_centers: Collection[str] = ()) -> Outcomes:
    """Validate HECKTOR 2022's clinical and endpoint tables in `input_dir` against the cases being converted
    (`case_centers`: case id -> centre) and return their outcomes; InputDataError naming file, row and column.

    A clinical row must belong to one of the cases, unless its centre is in `left_out_centers` (left out with
    --centers); a case without a row is fine. Task-2 patients ("Task 2" = 1, or without that column every patient of
    the endpoint table) need a complete endpoint row.
    """
    input_dir = Path(input_dir)
    clinical_path, endpoint_path = input_dir / CLINICAL_CSV, input_dir / ENDPOINT_CSV
    clinical_columns, clinical_rows = _read_table(clinical_path, CLINICAL_REQUIRED)
    _, endpoint_rows = _read_table(endpoint_path, ENDPOINT_REQUIRED)
    rows: dict[str, int] = {}  # patient -> row of the clinical table
    clinical: dict[str, tuple[tuple[float, ...], dict[str, str]]] = {}
    task_2: dict[str, int] = {}  # Task-2 patient -> clinical row
    for number, cells in clinical_rows:
        where = f"{clinical_path} row {number}"
        patient = _patient_id(cells, where, rows)
        if patient not in case_centers and center_of(patient) not in left_out_centers:
            raise _cell_error(where, PATIENT, f"patient {patient} is none of the {len(case_centers)} case(s) being "
                                              f"converted from {input_dir}; remove the row, or leave centre "
                                              f"{center_of(patient)} out with --centers")
        rows[patient] = number
        clinical[patient] = encode_clinical_row(cells, where), cells
        if TASK_2 in clinical_columns:
            try:
                in_task_2 = _choice(cells[TASK_2], range(2), "0 or 1")
            except ValueError as e:
                raise _cell_error(where, TASK_2, str(e)) from None
            if in_task_2:
                task_2[patient] = number
    endpoints: dict[str, tuple[int, float]] = {}
    endpoint_rows_seen: dict[str, int] = {}
    for number, cells in endpoint_rows:
        where = f"{endpoint_path} row {number}"
        patient = _patient_id(cells, where, endpoint_rows_seen)
        endpoint_rows_seen[patient] = number
        if patient not in rows:
            raise _cell_error(where, PATIENT, f"patient {patient} has no row in {clinical_path}")
        if TASK_2 in clinical_columns:
            why = f"'Task 2' is 1 in {clinical_path.name} row {rows[patient]}" if patient in task_2 else None
        else:
            why = f"{clinical_path.name} has no 'Task 2' column, so every patient of {endpoint_path.name} is one"
        endpoint = _endpoint(cells, where, why)
        if endpoint is not None:
            endpoints[patient] = endpoint
    for patient, number in task_2.items():
        if patient not in endpoint_rows_seen:
            raise InputDataError(f"{endpoint_path} has no row for patient {patient}, a Task-2 patient "
                                 f"({clinical_path} row {number}, column 'Task 2' is 1)")
    cases = {}
    for case_id, center in case_centers.items():
        encoded, cells = clinical.get(case_id, (None, None))
        relapse, rfs_days = endpoints.get(case_id, (None, None))
        cases[case_id] = CaseOutcome(center, encoded, relapse, rfs_days,
                                     None if cells is None else tuple(cells.items()))
    return Outcomes(CLINICAL_FEATURES, cases)


def _endpoint(cells: dict[str, str], where: str, task_2_because: str | None) -> tuple[int, float] | None:
    """(relapse, RFS days) of an endpoint row; None for a blank row of a patient outside Task 2."""
    relapse_text, rfs_text = _text(cells[RELAPSE]), _text(cells[RFS])
    if relapse_text is None and rfs_text is None and task_2_because is None:
        return None
    for column, text, other in ((RELAPSE, relapse_text, RFS), (RFS, rfs_text, RELAPSE)):
        if text is None:
            why = f"for a Task-2 patient ({task_2_because})" if task_2_because else f"while {other!r} is given"
            raise _cell_error(where, column, f"blank {why}")
    try:
        relapse = _choice(relapse_text, range(2), "0 (censored) or 1 (relapse)")
    except ValueError as e:
        raise _cell_error(where, RELAPSE, str(e)) from None
    try:
        rfs_days = float(rfs_text)
    except ValueError:
        rfs_days = math.nan
    if not (math.isfinite(rfs_days) and rfs_days >= 0):
        raise _cell_error(where, RFS, f"must be a number of days >= 0, got {rfs_text!r}")
    return relapse, rfs_days


def _dumps(value: object, depth: int = 0) -> str:
    """JSON with the top three levels indented and everything deeper on one line: a case's clinical vector and
    raw row each read as one line."""
    if depth < 3 and isinstance(value, dict) and value:
        pad = " " * (depth + 1)
        items = [f"{pad}{json.dumps(k)}: {_dumps(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    return json.dumps(value)


def write_outcomes(dataset_dir: Path, outcomes: Outcomes) -> Path:
    """Write `dataset_dir`/outcomes.json (through a temporary file and a rename: never half-written)."""
    path = Path(dataset_dir) / OUTCOMES_FILE
    tmp = path.with_name(f".{OUTCOMES_FILE}.tmp-{os.getpid()}")
    try:
        tmp.write_text(_dumps(outcomes.to_json()) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_outcomes(path: Path) -> Outcomes:
    """The outcomes in an outcomes.json file, or in the one inside a converted dataset folder."""
    path = Path(path)
    file = path / OUTCOMES_FILE if path.is_dir() or path.suffix != ".json" else path
    if not file.is_file():
        raise InputDataError(f"no {OUTCOMES_FILE} in {file.parent}: convert with pemma convert-hecktor ... "
                             f"--with-outcomes")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputDataError(f"{file} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); convert "
                             f"again with pemma convert-hecktor ... --with-outcomes") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputDataError(f"cannot read {file} ({type(e).__name__}: {e})") from None
    return Outcomes.from_json(data, str(file))


def dataset_outcomes(dataset_name: str) -> Outcomes:
    """The outcomes of dataset `dataset_name` (e.g. Dataset502_HNC_CTPET_MDA) in nnU-Net's nnUNet_raw."""
    import nnunetv2.paths as nnunet_paths  # read when called: nnU-Net sets it from the environment on import

    if not nnunet_paths.nnUNet_raw:
        raise InputDataError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw")
    folder = Path(nnunet_paths.nnUNet_raw) / dataset_name
    if not folder.is_dir():
        raise InputDataError(f"no dataset {dataset_name} in nnUNet_raw ({folder} does not exist)")
    return load_outcomes(folder)
