"""HECKTOR 2022 / 2021 -> nnU-Net v2 raw dataset (`pemma convert-hecktor`).

Input layouts
  2022: imagesTr/CHUM-001__CT.nii.gz, imagesTr/CHUM-001__PT.nii.gz, labelsTr/CHUM-001.nii.gz (or CHUM_001.nii.gz;
        labels 0 background, 1 GTVp, 2 GTVn), optional imagesTs/ with optional labelsTs/ (the labels of test cases,
        as HECKTOR released them after the challenge). Centre = case-id prefix.
  2021: one flat folder of <ID>_ct.nii.gz, <ID>_pt.nii.gz, <ID>_gtvt.nii.gz (GTVp = 1) with
        hecktor2021_bbox_*.csv (PatientID,x1,x2,y1,y2,z1,z2, physical mm) giving the head-and-neck box.

Output `$nnUNet_raw/DatasetNNN_NAME/`: imagesTr/{case}_0000.nii.gz... in the order of `modalities`, labelsTr
(uint8), imagesTs (and labelsTs, for labelled test cases) when present, never in a split; dataset.json (nnU-Net's
own generator, plus a "pemma" block), pemma_crops.json (crop records, see `geometry`) and splits_final.json
(centre-stratified folds, see `splits`); with `with_outcomes` (2022 only) also outcomes.json, the validated
clinical and endpoint tables (see `outcomes`).

The CT grid is the output grid: CT is written untouched (its pixel type, HU), only cut to the head-and-neck box.
PET is resampled onto the (cropped) CT grid through physical coordinates (with `register="rigid"`, through the
rigid transform `registration` finds first, recorded as the crop record's "registration") and stays in SUV on
purpose: the PET normalisation (a global SUV window) is decided in the plans, not by nnU-Net's per-image z-score,
and SUV is what makes PET comparable across centres.

Every selected case is validated before anything is written; the dataset is written into a hidden temporary
folder inside nnUNet_raw and renamed at the end, so a failure, Ctrl-C or SIGTERM leaves nothing behind. While it
converts, `.DatasetNNN.lock` in nnUNet_raw (holding the process id) keeps a second conversion off the same id.
Hidden files (names starting with '.', such as the '._' resource forks macOS leaves on shared drives) are ignored.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import signal
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from tqdm import tqdm

from nnunetv2_pemma.data.centers import KNOWN_CENTERS, LABELS_2021, LABELS_2022, center_of
from nnunetv2_pemma.data.geometry import CROPS_FILE, crop, resample_pet_to
from nnunetv2_pemma.data.outcomes import OUTCOMES_FILE, Outcomes, read_hecktor_tables, write_outcomes
from nnunetv2_pemma.data.registration import (RegistrationFailed, RegistrationLimits, register_pet_to_ct,
                                              transform_from_record)
from nnunetv2_pemma.data.splits import N_FOLDS, make_center_splits, save_splits
from nnunetv2_pemma.data.validation import CaseCheck, CaseFiles, check_case
from nnunetv2_pemma.errors import InputDataError, warn
from nnunetv2_pemma.filesystem import sigterm_as_interrupt

_NIFTI = re.compile(r"^(?P<stem>.+?)\.nii(?:\.gz)?$", re.IGNORECASE)
_IMAGE_2022 = re.compile(r"^(?P<id>.+)__(?P<mod>CT|PT)\.nii(?:\.gz)?$", re.IGNORECASE)
_FILE_2021 = re.compile(r"^(?P<id>.+)_(?P<kind>ct|pt|gtvt)\.nii(?:\.gz)?$", re.IGNORECASE)
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_BBOX_COLUMNS = ("PatientID", "x1", "x2", "y1", "y2", "z1", "z2")
_CHANNEL = {"CT": "CT", "PET": "PT"}  # modality name -> HECKTOR file tag
_KIND_NAMES = {"CT": "CT", "PT": "PET", "label": "label", "ct": "CT", "pt": "PET", "gtvt": "label"}
# Why a file was ignored, as the report says it: "ignored N file(s) <why>: ..."
UNEXPECTED_NAME = "with unexpected names"
HIDDEN = "whose names start with '.' (hidden files, such as macOS '._' resource forks)"


@dataclass
class ConversionReport:
    """What `convert_hecktor` wrote; printed by the CLI."""

    dataset_dir: Path
    dataset_id: int
    channels: list[str]
    training_cases: list[str]
    test_cases: list[str]
    center_counts: dict[str, int]  # training and test cases per centre
    crop: str
    splits_file: Path | None
    skipped: dict[str, str]
    ignored_files: dict[str, str]  # file (relative to the input folder) -> why (UNEXPECTED_NAME or HIDDEN)
    outcomes: Outcomes | None = None  # what outcomes.json holds (--with-outcomes), else None
    registration: dict[str, dict] | None = None  # case -> registration record (--register rigid), else None
    labelled_test_cases: list[str] = dataclasses.field(default_factory=list)  # test cases with a label (labelsTs)

    def __str__(self) -> str:
        lines = [f"wrote {self.dataset_dir}",
                 f"  channels: {', '.join(f'{i}={m}' for i, m in enumerate(self.channels))}; crop: {self.crop}",
                 f"  cases: {len(self.training_cases)} training, {len(self.test_cases)} test"
                 + (f" ({len(self.labelled_test_cases)} labelled, in labelsTs/)" if self.labelled_test_cases else "")
                 + "; by centre: "
                 + ", ".join(f"{c} {n}" for c, n in sorted(self.center_counts.items()))]
        if self.splits_file is not None:
            lines.append(f"  splits: {N_FOLDS} folds stratified by centre in {self.splits_file.name} "
                         f"(nnUNetv2_plan_and_preprocess and `pemma plans transfer` copy it to nnUNet_preprocessed)")
        else:
            lines.append(f"  splits: none (fewer than {N_FOLDS} training cases, too few for nnU-Net's {N_FOLDS}-fold "
                         f"cross-validation): train on all of them with fold `all` (nnUNetv2_train "
                         f"{self.dataset_id} CONFIGURATION all -tr TRAINER) or convert more cases")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} bad case(s):")
            lines += [f"    {case}: {reason}" for case, reason in sorted(self.skipped.items())]
        if self.outcomes is not None:
            lines.append(self._describe_outcomes(self.outcomes))
        if self.registration is not None:
            lines.append(_describe_registrations(self.registration))
        for why in dict.fromkeys(self.ignored_files.values()):
            files = [f for f, w in self.ignored_files.items() if w == why]
            lines.append(f"  ignored {len(files)} file(s) {why}: {', '.join(files)}")
        return "\n".join(lines)

    @staticmethod
    def _describe_outcomes(outcomes: Outcomes) -> str:
        cases = outcomes.cases.values()
        endpoints = [c.relapse for c in cases if c.relapse is not None]
        return (f"  outcomes: {sum(c.clinical is not None for c in cases)} of {len(cases)} cases with a clinical row, "
                f"{len(endpoints)} with an endpoint ({sum(endpoints)} relapses), in {OUTCOMES_FILE}")


def convert_hecktor(input_dir: Path, dataset_id: int, name: str, centers: Sequence[str] | None = None,
                    modalities: Sequence[str] = ("CT", "PET"), crop: str = "headneck",
                    crop_size_mm: Sequence[float] = (200.0, 200.0, 310.0), edition: int = 2022,
                    skip_bad: bool = False, raw_root: Path | None = None,
                    with_outcomes: bool = False, register: str = "none",
                    limits: RegistrationLimits = RegistrationLimits(), workers: int = 1) -> ConversionReport:
    """Validate the HECKTOR cases, then write `<raw_root>/Dataset{id:03d}_{name}` in one go (or nothing).

    with_outcomes: also validate HECKTOR 2022's clinical and endpoint tables (before any image is read) and write
    them as outcomes.json, for prognosis. register: "rigid" registers each PET to its CT region before anything is
    written; a case whose registration fails or moves beyond `limits` is bad like any other. Suspicious but
    convertible cases (an all-zero PET, a constant CT, with "none" PET and CT body outlines further apart than
    registered cases') are reported as PemmaWarnings. workers: registrations run in this many processes, one
    ITK thread each (every registration runs on one thread, so the results do not depend on `workers`).
    """
    input_dir = Path(input_dir)
    modalities = _check_options(modalities, crop, crop_size_mm, edition, dataset_id, name)
    if register not in ("none", "rigid"):
        raise InputDataError(f"register must be 'none' or 'rigid', got {register!r}")
    if register == "rigid" and "PET" not in modalities:
        raise InputDataError("--register rigid aligns PET to CT; it needs PET among --modalities")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputDataError(f"--workers must be a positive number of processes, got {workers!r}")
    if workers > 1 and register != "rigid":
        raise InputDataError("--workers runs the registrations of --register rigid in parallel; without "
                             "registration there is nothing to run in parallel")
    if with_outcomes and edition != 2022:
        raise InputDataError(f"--with-outcomes reads HECKTOR 2022's clinical and endpoint tables; it does not work "
                             f"with edition {edition}")
    raw_root = _raw_root(raw_root)
    final_dir = raw_root / f"Dataset{dataset_id:03d}_{name}"
    cases, ignored = discover(input_dir, edition, crop, centers)
    outcomes = _read_outcomes(input_dir, cases, centers) if with_outcomes else None
    labels = LABELS_2022 if edition == 2022 else LABELS_2021
    with sigterm_as_interrupt(), _dataset_lock(raw_root, dataset_id):
        _check_target(raw_root, final_dir, dataset_id)  # under the lock: no other conversion can add the id now
        good, checks, bad = _check_cases(cases, modalities, labels, crop, crop_size_mm, skip_bad, input_dir,
                                         limits if register == "rigid" else None, workers)
        for check in checks.values():
            for message in check.warnings:
                warn(message)
        size_mm = [float(v) for v in crop_size_mm] if crop == "headneck" and edition == 2022 else None
        pemma_block = {"modalities": list(modalities), "edition": edition, "crop": crop, "crop_size_mm": size_mm,
                       "registration": register,
                       "centers": {case.case_id: case.center for case in good}, "pet_units": "SUV",
                       "source": str(input_dir), "skipped": bad}
        if outcomes is not None:  # the good cases only: --skip-bad may have left some out
            outcomes = dataclasses.replace(outcomes, cases={c.case_id: outcomes.cases[c.case_id] for c in good})
            pemma_block["outcomes"] = OUTCOMES_FILE
        splits_file = _write_atomically(final_dir, good, {cid: check.record for cid, check in checks.items()},
                                        modalities, labels, pemma_block, outcomes)
    return ConversionReport(final_dir, dataset_id, list(modalities), [c.case_id for c in good if c.split == "train"],
                            [c.case_id for c in good if c.split == "test"], dict(Counter(c.center for c in good)),
                            _describe_crop(crop, crop_size_mm, edition),
                            final_dir / splits_file.name if splits_file else None, bad, ignored, outcomes,
                            {cid: check.record["registration"] for cid, check in checks.items()}
                            if register == "rigid" else None,
                            [c.case_id for c in good if c.split == "test" and c.label is not None])


def _read_outcomes(input_dir: Path, cases: list[CaseFiles], centers: Sequence[str] | None) -> Outcomes:
    """The validated tables for the selected cases (bad ones too: their rows are no strangers); rows of the centres
    --centers left out are not checked against the cases."""
    left_out = KNOWN_CENTERS - set(centers) if centers is not None else frozenset()
    return read_hecktor_tables(input_dir, {case.case_id: case.center for case in cases}, left_out)


def _write_atomically(final_dir: Path, good: list[CaseFiles], records: dict[str, dict], modalities: list[str],
                      labels: dict[str, int], pemma_block: dict, outcomes: Outcomes | None) -> Path | None:
    """Write the dataset into a hidden folder next to `final_dir` and rename it into place; remove it on any failure
    (Ctrl-C and, within `sigterm_as_interrupt`, SIGTERM included)."""
    tmp_dir = final_dir.parent / f".{final_dir.name}.tmp-{os.getpid()}"
    try:
        splits_file = _write_dataset(tmp_dir, good, records, modalities, labels, pemma_block, final_dir.name)
        if outcomes is not None:
            write_outcomes(tmp_dir, outcomes)
        if final_dir.exists():
            raise InputDataError(f"output folder {final_dir} appeared while converting; nothing was written")
        tmp_dir.rename(final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return splits_file


@contextlib.contextmanager
def _dataset_lock(raw_root: Path, dataset_id: int) -> Iterator[Path]:
    """Hold `.DatasetNNN.lock` in nnUNet_raw while converting: two conversions to one id would race for it (and may
    name their folders differently, leaving nnU-Net two datasets with one id). Always released."""
    lock = raw_root / f".Dataset{dataset_id:03d}.lock"
    try:
        raw_root.mkdir(parents=True, exist_ok=True)
        _acquire(lock, dataset_id)
    except OSError as e:  # not FileExistsError: _acquire handles that
        raise InputDataError(f"cannot create lock file {lock} ({type(e).__name__}: {e.strerror}); nnUNet_raw must "
                             f"be a writable folder") from None
    try:
        yield lock
    finally:
        if _lock_owner(lock) == os.getpid():
            lock.unlink(missing_ok=True)


def _acquire(lock: Path, dataset_id: int) -> None:
    """Create the lock, or take it over from a process that is gone (killed with -9, a crashed node) together with
    its unfinished dataset folder; refuse while its owner is alive."""
    try:
        _create_lock(lock)
        return
    except FileExistsError:
        owner = _lock_owner(lock)
    if owner is None and lock.exists():
        raise InputDataError(f"lock file {lock} exists but holds no process id; remove it if no conversion of "
                             f"dataset id {dataset_id} is running")
    if owner is not None and _alive(owner):
        raise InputDataError(f"dataset id {dataset_id} is being converted by process {owner} (lock file {lock}); "
                             f"wait for it to finish, or remove the lock file if process {owner} is not a conversion")
    if owner is not None:
        _remove_stale_lock(lock, owner, dataset_id)
    try:
        _create_lock(lock)
    except FileExistsError:
        raise InputDataError(f"another conversion of dataset id {dataset_id} took lock file {lock} at the same time; "
                             f"nothing was written") from None


def _create_lock(lock: Path) -> None:
    """Create the lock file holding our process id; FileExistsError when it exists (O_EXCL: atomic)."""
    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")


def _remove_stale_lock(lock: Path, owner: int, dataset_id: int) -> None:
    """Remove a dead process's lock and the temporary dataset folder it left, with a warning."""
    leftovers = sorted(lock.parent.glob(f".Dataset{dataset_id:03d}_*.tmp-{owner}"))
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
    lock.unlink(missing_ok=True)
    removed = f" and removed its unfinished {', '.join(p.name for p in leftovers)}" if leftovers else ""
    warn(f"took over lock file {lock} of process {owner}, which is no longer running{removed}")


def _lock_owner(lock: Path) -> int | None:
    """The process id in a lock file, or None if it holds none (or is gone)."""
    try:
        text = lock.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def _alive(pid: int) -> bool:
    """Whether a process with this id exists (signal 0 only asks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _check_cases(cases: list[CaseFiles], modalities: list[str], labels: dict[str, int], crop: str,
                 crop_size_mm: Sequence[float], skip_bad: bool, input_dir: Path,
                 limits: RegistrationLimits | None, workers: int = 1
                 ) -> tuple[list[CaseFiles], dict[str, CaseCheck], dict[str, str]]:
    """Good cases, their checks (crop record, warnings; with `limits`, the registration in the record, `workers`
    cases at a time), and the bad ones (case -> reason); raise unless skip_bad can cope."""
    checks = {case.case_id: check_case(case, modalities, sorted(labels.values()), crop, crop_size_mm,
                                       screen_alignment=limits is None)
              for case in tqdm(cases, desc="checking cases", unit="case")}
    if limits is not None:
        registrable = [case for case in cases if not checks[case.case_id].problems]
        checks.update(_register_cases([(case, checks[case.case_id], limits) for case in registrable], workers))
    bad = {cid: " and ".join(check.problems) for cid, check in checks.items() if check.problems}
    listing = "; ".join(f"{case}: {reason}" for case, reason in bad.items())
    if bad and not skip_bad:
        raise InputDataError(f"{len(bad)} of {len(cases)} case(s) in {input_dir} are bad, nothing was written "
                             f"(--skip-bad converts the rest): {listing}")
    good = [case for case in cases if case.case_id not in bad]
    if not any(case.split == "train" for case in good):
        why = f" after skipping the bad ones: {listing}" if bad else " (only imagesTs/ cases were selected)"
        raise InputDataError(f"no valid training case left in {input_dir}{why}")
    return good, {case.case_id: checks[case.case_id] for case in good}, bad


def _register_cases(jobs: list[tuple[CaseFiles, CaseCheck, RegistrationLimits]], workers: int
                    ) -> dict[str, CaseCheck]:
    """Each case's check with its registration, in `workers` processes. The workers ignore Ctrl-C: the
    conversion's own process takes it (or SIGTERM), stops them and removes what it started."""
    progress = tqdm(total=len(jobs), desc="registering PET to CT", unit="case")
    if workers == 1 or len(jobs) < 2:
        results = {}
        for job in jobs:
            results[job[0].case_id] = _register_case(*job)
            progress.update()
        progress.close()
        return results
    # the workers ignore Ctrl-C from their start (a disposition they inherit), before their imports are done
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), initializer=_worker_signals)
    finally:
        signal.signal(signal.SIGINT, handler)
    try:
        results = {}
        for case_id, check in pool.imap_unordered(_register_job, jobs):
            results[case_id] = check
            progress.update()
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        progress.close()
    return results


def _worker_signals() -> None:
    """Ctrl-C is the conversion's to handle; SIGTERM (the pool's terminate) ends a worker at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _register_job(job: tuple[CaseFiles, CaseCheck, RegistrationLimits]) -> tuple[str, CaseCheck]:
    return job[0].case_id, _register_case(*job)


def _register_case(case: CaseFiles, check: CaseCheck, limits: RegistrationLimits) -> CaseCheck:
    """The check with the case's registration added to its crop record, or with the reason it is refused."""
    ct = crop(sitk.ReadImage(str(case.ct)), check.record)
    try:
        result = register_pet_to_ct(ct, sitk.ReadImage(str(case.pet)), limits)
    except RegistrationFailed as e:
        return CaseCheck([f"PET file {case.show(case.pet)} cannot be registered to its CT: {e}"], None)
    problem = result.problem(limits)
    if problem is not None:
        return CaseCheck([f"PET file {case.show(case.pet)}: {problem}"], None)
    return dataclasses.replace(check, record={**check.record, "registration": result.record()})


def _describe_registrations(records: dict[str, dict]) -> str:
    """One line on what the registration did to the converted cases."""
    moved = [r for r in records.values() if r["applied"]]
    seconds = [r["seconds"] for r in records.values()]
    line = f"  registration (rigid): moved the PET of {len(moved)} of {len(records)} case(s)"
    if len(moved) < len(records):
        line += " (the others' header alignment was as good)"
    if moved:
        shifts = [r["shift_mm"] for r in moved]
        line += (f"; shifts {min(shifts):.1f}-{max(shifts):.1f} mm, rotations up to "
                 f"{max(r['rotation_deg'] for r in moved):.1f} degrees")
    return line + f"; {sum(seconds) / len(seconds):.1f} s per case (records in {CROPS_FILE})"


def canonical_id(raw_id: str) -> str:
    """HECKTOR 2022 ids are CENTRE-NNN; some releases spell them CENTRE_NNN."""
    return raw_id.replace("_", "-", 1) if "-" not in raw_id else raw_id


def discover(input_dir: Path, edition: int, crop: str,
             centers: Sequence[str] | None) -> tuple[list[CaseFiles], dict[str, str]]:
    """The cases of the selected centres in a HECKTOR folder of either edition, and the files ignored."""
    if not input_dir.is_dir():
        raise InputDataError(f"input folder {input_dir} does not exist")
    if edition == 2022:
        cases, ignored = discover_2022(input_dir)
    else:
        cases, ignored = discover_2021(input_dir, with_bbox=crop == "headneck")
    return select_centers(cases, centers, input_dir), ignored


def discover_2022(root: Path) -> tuple[list[CaseFiles], dict[str, str]]:
    """Cases of a HECKTOR 2022 folder, and the files ignored (hidden ones, NIfTI files whose names fit no case)."""
    if not (root / "imagesTr").is_dir():
        hint = " (it looks like HECKTOR 2021: use --edition 2021)" if any(root.glob("*_ct.nii*")) else ""
        raise InputDataError(f"no imagesTr/ folder in {root}: not a HECKTOR 2022 folder{hint}")
    found: dict[str, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    ignored: dict[str, str] = {}
    for folder, split in (("imagesTr", "train"), ("imagesTs", "test"), ("labelsTr", "train"), ("labelsTs", "test")):
        is_label = folder.startswith("labels")
        for path in sorted((root / folder).glob("*")) if (root / folder).is_dir() else []:
            match = (_NIFTI if is_label else _IMAGE_2022).match(path.name)
            if match is None or path.name.startswith("."):
                if (why := _ignored_because(path.name)) is not None:
                    ignored[f"{folder}/{path.name}"] = why
                continue
            case_id = canonical_id(match["stem"] if is_label else match["id"])
            kind = "label" if is_label else match["mod"].upper()
            found[case_id][kind].append(path)
            found[case_id][split].append(path)
    cases = []
    for case_id, files in sorted(found.items()):
        split = "test" if files["test"] else "train"
        images = root / ("imagesTs" if split == "test" else "imagesTr")
        if files["test"] and files["train"]:
            problems = ["has files among the test cases (imagesTs/, labelsTs/) and among the training cases "
                        "(imagesTr/, labelsTr/): "
                        + ", ".join(f"{p.parent.name}/{p.name}" for p in files["train"] + files["test"])]
        else:
            problems = _duplicates(files, ("CT", "PT", "label"))
        cases.append(CaseFiles(
            case_id, split, root,
            ct=(files["CT"] or [images / f"{case_id}__CT.nii.gz"])[0],
            pet=(files["PT"] or [images / f"{case_id}__PT.nii.gz"])[0],
            label=(files["label"] or [root / "labelsTr" / f"{case_id}.nii.gz"])[0] if split == "train"
            else (files["label"] or [None])[0],
            problems=tuple(_center_problem(case_id) + problems)))
    return cases, ignored


def discover_2021(root: Path, with_bbox: bool) -> tuple[list[CaseFiles], dict[str, str]]:
    """Cases of a flat HECKTOR 2021 folder and the files ignored; with_bbox: attach each case's box from
    hecktor2021_bbox_*.csv."""
    found: dict[str, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    ignored: dict[str, str] = {}
    for path in sorted(root.glob("*")):
        match = _FILE_2021.match(path.name)
        if match is None or path.name.startswith("."):
            if (why := _ignored_because(path.name)) is not None:
                ignored[path.name] = why
            continue
        found[match["id"]][match["kind"].lower()].append(path)
    boxes = _read_bboxes(root) if with_bbox else {}
    csv_names = ", ".join(sorted(p.name for p in root.glob("hecktor2021_bbox_*.csv")))
    cases = []
    for case_id, files in sorted(found.items()):
        problems = _center_problem(case_id) + _duplicates(files, ("ct", "pt", "gtvt"))
        box = boxes.get(case_id)
        if with_bbox and box is None:
            problems.append(f"no bounding box for {case_id} in {csv_names}")
        elif isinstance(box, str):
            problems.append(box)
        cases.append(CaseFiles(
            case_id, "train", root,
            ct=(files["ct"] or [root / f"{case_id}_ct.nii.gz"])[0],
            pet=(files["pt"] or [root / f"{case_id}_pt.nii.gz"])[0],
            label=(files["gtvt"] or [root / f"{case_id}_gtvt.nii.gz"])[0],
            bbox_mm=box if isinstance(box, tuple) else None, problems=tuple(problems)))
    return cases, ignored


def _ignored_because(name: str) -> str | None:
    """Why a file that is no case file is listed as ignored; None for other files (tables, notes), skipped silently.

    A hidden file is never a case file: a macOS resource fork '._CHUM-001__CT.nii.gz' fits the names but holds no
    image.
    """
    if name.startswith("."):
        return HIDDEN
    return UNEXPECTED_NAME if _NIFTI.match(name) else None


def _read_bboxes(root: Path) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]] | str]:
    """PatientID -> (lo, hi) physical mm, or a problem string when two CSV rows disagree."""
    csv_files = sorted(root.glob("hecktor2021_bbox_*.csv"))
    if not csv_files:
        raise InputDataError(f"no hecktor2021_bbox_*.csv in {root}: HECKTOR 2021 takes the head-and-neck box from "
                             f"it (or use --crop none)")
    boxes: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | str] = {}
    for csv_file in csv_files:
        with csv_file.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in _BBOX_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputDataError(f"{csv_file} lacks column(s) {', '.join(missing)} "
                                     f"(expected {','.join(_BBOX_COLUMNS)})")
            for line, row in enumerate(reader, start=2):
                try:
                    x1, x2, y1, y2, z1, z2 = (float(row[c]) for c in _BBOX_COLUMNS[1:])
                except (TypeError, ValueError):
                    raise InputDataError(f"{csv_file} line {line}: bounding box values are not numbers") from None
                box = ((min(x1, x2), min(y1, y2), min(z1, z2)), (max(x1, x2), max(y1, y2), max(z1, z2)))
                case_id = row["PatientID"].strip()
                if boxes.get(case_id, box) != box:
                    box = f"two different bounding boxes for {case_id} in {', '.join(p.name for p in csv_files)}"
                boxes[case_id] = box
    return boxes


def _duplicates(files: dict[str, list[Path]], kinds: Sequence[str]) -> list[str]:
    return [f"{len(files[k])} {_KIND_NAMES[k]} files map to this case id: "
            + ", ".join(f"{p.parent.name}/{p.name}" for p in files[k]) for k in kinds if len(files[k]) > 1]


def _center_problem(case_id: str) -> list[str]:
    center = center_of(case_id)
    if center in KNOWN_CENTERS:
        return []
    return [f"unknown centre '{center}' (the case-id prefix; known: {', '.join(sorted(KNOWN_CENTERS))})"]


def select_centers(cases: list[CaseFiles], centers: Sequence[str] | None, root: Path) -> list[CaseFiles]:
    if not cases:
        raise InputDataError(f"no HECKTOR cases found in {root}")
    if centers is None:
        return cases
    unknown = sorted(set(centers) - KNOWN_CENTERS)
    if unknown:
        raise InputDataError(f"unknown centre(s) {', '.join(unknown)} in --centers "
                             f"(known: {', '.join(sorted(KNOWN_CENTERS))})")
    present = {case.center for case in cases}
    empty = [c for c in centers if c not in present]
    if empty:
        raise InputDataError(f"no cases of centre(s) {', '.join(empty)} in {root} "
                             f"(found: {', '.join(sorted(present))})")
    return [case for case in cases if case.center in centers]


def _check_options(modalities: Sequence[str], crop: str, crop_size_mm: Sequence[float], edition: int,
                   dataset_id: int, name: str) -> list[str]:
    modalities = list(modalities)
    if not modalities or len(set(modalities)) != len(modalities) or not set(modalities) <= set(_CHANNEL):
        raise InputDataError(f"modalities must be CT and/or PET, each once, got {modalities}")
    if crop not in ("headneck", "none"):
        raise InputDataError(f"crop must be 'headneck' or 'none', got {crop!r}")
    if len(crop_size_mm) != 3 or min(crop_size_mm) <= 0:
        raise InputDataError(f"crop size must be three positive lengths in mm, got {list(crop_size_mm)}")
    if edition not in (2021, 2022):
        raise InputDataError(f"edition must be 2022 or 2021, got {edition}")
    if not 1 <= dataset_id <= 999:
        raise InputDataError(f"dataset id must be between 1 and 999 (nnU-Net uses three digits), got {dataset_id}")
    if not _DATASET_NAME.match(name):
        raise InputDataError(f"dataset name {name!r} must be letters, digits, '_', '-' or '.'")
    return modalities


def _raw_root(raw_root: Path | None) -> Path:
    if raw_root is None:
        if not os.environ.get("nnUNet_raw"):
            raise InputDataError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (or pass raw_root)")
        raw_root = Path(os.environ["nnUNet_raw"])
    if raw_root.exists() and not raw_root.is_dir():
        raise InputDataError(f"nnUNet_raw {raw_root} is not a folder")
    return raw_root


def _check_target(raw_root: Path, final_dir: Path, dataset_id: int) -> None:
    """Refuse to overwrite, and refuse an id that nnU-Net would find twice."""
    if final_dir.exists():
        raise InputDataError(f"output folder {final_dir} already exists; remove it or choose another "
                             f"--dataset-id/--name")
    others = sorted(p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*")) if raw_root.is_dir() else []
    if others:
        raise InputDataError(f"dataset id {dataset_id} is already used by {', '.join(others)} in {raw_root}; "
                             f"nnU-Net needs ids to be unique")


def _write_dataset(out_dir: Path, cases: list[CaseFiles], records: dict[str, dict], modalities: list[str],
                   labels: dict[str, int], pemma_block: dict, dataset_name: str) -> Path | None:
    """Write images, labels, dataset.json, crop records and splits of already validated cases."""
    test = [c for c in cases if c.split == "test"]
    # the bar exists before the folder does: a signal while tqdm is half built makes its __del__ print a traceback
    progress = tqdm(cases, desc="writing cases", unit="case")
    for sub in ("imagesTr", "labelsTr") + (("imagesTs",) if test else ()) + (
            ("labelsTs",) if any(c.label is not None for c in test) else ()):
        (out_dir / sub).mkdir(parents=True)
    for case in progress:
        _write_case(out_dir, case, records[case.case_id], modalities)
    train = {case.case_id: case.center for case in cases if case.split == "train"}
    generate_dataset_json(str(out_dir), channel_names={i: m for i, m in enumerate(modalities)}, labels=dict(labels),
                          num_training_cases=len(train), file_ending=".nii.gz", dataset_name=dataset_name,
                          reference="https://hecktor.grand-challenge.org/",
                          license="HECKTOR challenge data terms of use",
                          description="HECKTOR head-and-neck PET/CT converted by nnunetv2-pemma convert-hecktor",
                          converted_by="nnunetv2-pemma", pemma=pemma_block)
    (out_dir / CROPS_FILE).write_text(json.dumps(records, indent=1))
    if len(train) < N_FOLDS:
        return None
    return save_splits(make_center_splits(train), out_dir)


def _write_case(out_dir: Path, case: CaseFiles, record: dict, modalities: list[str]) -> None:
    images = out_dir / ("imagesTr" if case.split == "train" else "imagesTs")
    ct = crop(sitk.ReadImage(str(case.ct)), record)
    for channel, modality in enumerate(modalities):
        image = ct if modality == "CT" else resample_pet_to(
            sitk.ReadImage(str(case.pet)), ct, transform_from_record(record.get("registration", {})))
        sitk.WriteImage(image, str(images / f"{case.case_id}_{channel:04d}.nii.gz"), useCompression=True)
    if case.label is not None:
        label = sitk.Cast(crop(sitk.ReadImage(str(case.label)), record), sitk.sitkUInt8)
        label.CopyInformation(ct)  # equal within header rounding (checked); one grid for every file of the case
        labels = "labelsTr" if case.split == "train" else "labelsTs"
        sitk.WriteImage(label, str(out_dir / labels / f"{case.case_id}.nii.gz"), useCompression=True)


def _describe_crop(crop: str, crop_size_mm: Sequence[float], edition: int) -> str:
    if crop == "none":
        return "none (whole CT)"
    if edition == 2021:
        return "headneck (hecktor2021_bbox_*.csv)"
    return "headneck " + "x".join(f"{v:g}" for v in crop_size_mm) + " mm"
