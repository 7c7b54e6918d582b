"""PET-to-CT rigid registration: accuracy on phantoms with a known misalignment, already registered cases left
alone, the transform recorded and applied, and refusals (implausible motion, no PET signal) as one-line errors with
nothing written. Phantom size `demo` (the `small` field of view is too narrow for a 15 mm motion), one case per
centre."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import assert_conversion_interrupted, run_cli
from nnunetv2_pemma.data.alignment import check_alignment, write_csv
from nnunetv2_pemma.data.geometry import CROPS_FILE, crop, physical_bounds
from nnunetv2_pemma.data.hecktor import convert_hecktor
from nnunetv2_pemma.data.phantom import MISALIGNMENT_FILE, case_model, read_misalignment, write_phantom
from nnunetv2_pemma.data.registration import MIN_MI_GAIN, RegistrationLimits, transform_from_record
from nnunetv2_pemma.data.geometry import resample_pet_to
from nnunetv2_pemma.data.outline import OUTLINE_WARN_MM, outline_distance_mm
from nnunetv2_pemma.errors import InputDataError, PemmaWarning

pytestmark = pytest.mark.slow  # about 3.5 minutes of registrations on 2 CPU cores

SEED = 0
MISALIGN = (15.0, 5.0)
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same patients aligned and misaligned by 15 mm and 5 degrees, each converted with --register rigid, and
    the aligned one also without registration."""
    root = tmp_path_factory.mktemp("registration")
    write_phantom(root / "aligned", 1, size="demo", seed=SEED)
    write_phantom(root / "misaligned", 1, size="demo", seed=SEED, misalign=MISALIGN)
    raw = root / "raw"
    out = {"aligned": root / "aligned", "misaligned": root / "misaligned", "raw": raw}
    for number, (name, register) in enumerate((("aligned", "rigid"), ("misaligned", "rigid"), ("aligned", "none"))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = convert_hecktor(root / name, 600 + number, f"{name}_{register}", raw_root=raw, register=register)
        out[f"{name}_{register}"] = report.dataset_dir
        out[f"{name}_{register}_warnings"] = [str(w.message) for w in caught if issubclass(w.category, PemmaWarning)]
    return out


def records(dataset: Path) -> dict[str, dict]:
    return json.loads((dataset / CROPS_FILE).read_text())


def hot_spots(case_id: str) -> list[tuple[float, float, float]]:
    anatomy = case_model(case_id, case_id.split("-")[0], "demo", SEED).anatomy
    return [anatomy.gtvp[0].center] + [n.center for n in anatomy.nodes] + [m[0].center for m in anatomy.mimics]


def test_misaligned_hot_spots_land_within_two_pet_voxels(phantoms: dict[str, Path]) -> None:
    truth = read_misalignment(phantoms["misaligned"])
    found = records(phantoms["misaligned_rigid"])
    assert set(found) == set(truth)
    for case_id, motion in truth.items():
        record = found[case_id]["registration"]
        assert record["applied"], case_id
        transform, true_motion = transform_from_record(record), motion.transform()
        pet_voxel_mm = max(sitk.ReadImage(str(phantoms["misaligned"] / "imagesTr" / f"{case_id}__PT.nii.gz"))
                           .GetSpacing())
        for spot in hot_spots(case_id):
            residual = np.linalg.norm(np.subtract(transform.TransformPoint(spot), true_motion.TransformPoint(spot)))
            assert residual <= 2 * pet_voxel_mm, (case_id, spot, residual)
        # without registration the same spots are off by about the motion
        spot = hot_spots(case_id)[0]
        assert np.linalg.norm(np.subtract(true_motion.TransformPoint(spot), spot)) > 2 * pet_voxel_mm


def test_written_pet_is_resampled_through_the_recorded_transform(phantoms: dict[str, Path]) -> None:
    case_id = "CHUM-001"
    record = records(phantoms["misaligned_rigid"])[case_id]
    ct = crop(sitk.ReadImage(str(phantoms["misaligned"] / "imagesTr" / f"{case_id}__CT.nii.gz")), record)
    pet = sitk.ReadImage(str(phantoms["misaligned"] / "imagesTr" / f"{case_id}__PT.nii.gz"))
    expected = sitk.Resample(pet, ct, transform_from_record(record["registration"]), sitk.sitkLinear, 0.0,
                             sitk.sitkFloat32)
    written = sitk.ReadImage(str(phantoms["misaligned_rigid"] / "imagesTr" / f"{case_id}_0001.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(expected))
    assert json.loads((phantoms["misaligned_rigid"] / "dataset.json").read_text())["pemma"]["registration"] == "rigid"
    # the registered PET puts the GTVp's uptake where the label is: higher mean SUV there than without registration
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(phantoms["misaligned_rigid"] / "labelsTr"
                                                      / f"{case_id}.nii.gz"))) == 1
    unregistered = sitk.GetArrayFromImage(sitk.Resample(pet, ct, sitk.Transform(), sitk.sitkLinear, 0.0))
    assert sitk.GetArrayFromImage(written)[label].mean() > 1.5 * unregistered[label].mean()


def test_already_registered_cases_stay_within_1_mm(phantoms: dict[str, Path]) -> None:
    registered, plain = records(phantoms["aligned_rigid"]), records(phantoms["aligned_none"])
    assert set(registered) == set(plain)
    for case_id, record in registered.items():
        assert "registration" not in plain[case_id]
        transform = transform_from_record(record["registration"])
        ct = crop(sitk.ReadImage(str(phantoms["aligned"] / "imagesTr" / f"{case_id}__CT.nii.gz")), record)
        lo, hi = physical_bounds(ct)
        corners = [[(lo, hi)[(c >> a) & 1][a] for a in range(3)] for c in range(8)]
        worst = max(np.linalg.norm(np.subtract(transform.TransformPoint(p), p)) for p in corners)
        assert worst <= 1.0, (case_id, worst)
        a = sitk.ReadImage(str(phantoms["aligned_rigid"] / "imagesTr" / f"{case_id}_0001.nii.gz"))
        b = sitk.ReadImage(str(phantoms["aligned_none"] / "imagesTr" / f"{case_id}_0001.nii.gz"))
        np.testing.assert_allclose(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b), atol=1e-5)
        # the quality figures are recorded: mutual information barely improves on an aligned case
        quality = record["registration"]
        assert not quality["applied"] and quality["mi_gain"] <= MIN_MI_GAIN and quality["seconds"] > 0


def test_phantom_misalignment_moves_only_the_pet(phantoms: dict[str, Path]) -> None:
    aligned, moved = phantoms["aligned"], phantoms["misaligned"]
    for name in ("imagesTr/CHUP-001__CT.nii.gz", "labelsTr/CHUP-001.nii.gz", "hecktor2022_endpoint_training.csv"):
        assert (aligned / name).read_bytes() == (moved / name).read_bytes()
    assert (aligned / "imagesTr/CHUP-001__PT.nii.gz").read_bytes() != (moved / "imagesTr/CHUP-001__PT.nii.gz").read_bytes()
    truth = json.loads((moved / MISALIGNMENT_FILE).read_text())
    assert truth["shift_mm"] == MISALIGN[0] and len(truth["cases"]) == 7
    for case_id, motion in read_misalignment(moved).items():
        transform = motion.transform()
        assert np.linalg.norm(np.subtract(transform.TransformPoint(motion.center), motion.center)) == \
            pytest.approx(MISALIGN[0])
        assert np.degrees(np.arccos((np.trace(np.reshape(transform.GetMatrix(), (3, 3))) - 1) / 2)) == \
            pytest.approx(MISALIGN[1])
        # the PET's brightest spot near the GTVp sits where the motion puts the GTVp
        pet = sitk.ReadImage(str(moved / "imagesTr" / f"{case_id}__PT.nii.gz"))
        gtvp = np.asarray(hot_spots(case_id)[0])
        moved_gtvp = np.asarray(transform.TransformPoint(tuple(gtvp)))
        index = pet.TransformPhysicalPointToIndex(tuple(moved_gtvp))
        values = sitk.GetArrayViewFromImage(pet)
        assert values[index[::-1]] > values[pet.TransformPhysicalPointToIndex(tuple(gtvp))[::-1]], case_id
    with pytest.raises(InputDataError, match="not a phantom written with --misalign"):
        read_misalignment(aligned)


def test_outline_screen_separates_misaligned_cases(phantoms: dict[str, Path]) -> None:
    """The registration-free figure: every aligned case under the warning level, every 15 mm / 5 degree case over
    it and over its aligned twin; the conversion without registration warns for exactly the latter."""
    for case_id in read_misalignment(phantoms["misaligned"]):
        figures = {}
        for name in ("aligned", "misaligned"):
            ct = sitk.ReadImage(str(phantoms[name] / "imagesTr" / f"{case_id}__CT.nii.gz"))
            ct = crop(ct, records(phantoms["aligned_none"])[case_id])
            pet = sitk.ReadImage(str(phantoms[name] / "imagesTr" / f"{case_id}__PT.nii.gz"))
            figures[name] = outline_distance_mm(ct, resample_pet_to(pet, ct))
        assert figures["aligned"] < OUTLINE_WARN_MM < figures["misaligned"], (case_id, figures)
    assert not any("body outlines" in w for w in phantoms["aligned_none_warnings"])
    # with --register rigid the screen is not needed and stays quiet
    assert not any("body outlines" in w for w in phantoms["misaligned_rigid_warnings"])


def test_conversion_without_registration_warns_about_misaligned_outlines(phantoms: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    with pytest.warns(PemmaWarning, match=r"HGJ-001: PET and CT body outlines are \d+\.\d mm apart on average "
                                          r"\(registered cases: under 3 mm\).*--register rigid"):
        convert_hecktor(phantoms["misaligned"], 615, "Warned", centers=["HGJ"], raw_root=tmp_path / "raw")


def test_outline_needs_a_body_outline_in_both() -> None:
    from hecktor_fixtures import make_ct, make_pet

    ct = make_ct()
    assert outline_distance_mm(ct, resample_pet_to(make_pet(), ct)) is None  # uptake everywhere: no PET outline
    air = sitk.Image(ct.GetSize(), sitk.sitkInt16) - 1000
    air.CopyInformation(ct)
    assert outline_distance_mm(air, resample_pet_to(make_pet(), ct)) is None


def test_check_alignment_flags_only_the_misaligned(phantoms: dict[str, Path], tmp_path: Path) -> None:
    flagged = check_alignment(phantoms["misaligned"], centers=["HGJ"])
    assert [(r.case, r.status) for r in flagged] == [("HGJ-001", "MISALIGNED")]
    assert flagged[0].shift_mm > 10 and flagged[0].outline_mm > OUTLINE_WARN_MM
    quick = check_alignment(phantoms["misaligned"], centers=["HGJ"], quick=True)
    assert [(r.case, r.status, r.shift_mm) for r in quick] == [("HGJ-001", "MISALIGNED", None)]
    done = run_cli(["pemma", "check-alignment", str(phantoms["aligned"]), "--centers", "HGJ", "--csv",
                    str(tmp_path / "alignment.csv")], env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert "HGJ-001      aligned" in done.stdout and "0 of 1 case(s) misaligned" in done.stdout
    assert (tmp_path / "alignment.csv").read_text().splitlines()[1].startswith("HGJ-001,aligned,")
    done = run_cli(["pemma", "check-alignment", str(phantoms["misaligned"]), "--centers", "HGJ", "CHUM", "--quick"],
                   env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert "2 of 2 case(s) with body outlines more than 3 mm apart (quick screen, no registration)" in done.stdout


def _error_line(done) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [ln for ln in done.stderr.replace("\r", "\n").splitlines()
             if ln.strip() and "case/s]" not in ln and "s/case]" not in ln]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_implausible_registration_is_refused_or_skipped(phantoms: dict[str, Path], tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    env = {**os.environ, "nnUNet_raw": str(raw)}
    args = ["pemma", "convert-hecktor", str(phantoms["misaligned"]), "--dataset-id", "610", "--name", "Far",
            "--centers", "HGJ", "--register", "rigid", "--max-shift-mm", "5"]
    line = _error_line(run_cli(args, env))
    assert "HGJ-001" in line and "implausibly far" in line and "limits 5 mm" in line and "nothing was written" in line
    assert not raw.exists() or list(raw.iterdir()) == []
    # one misaligned PET among aligned cases: --skip-bad converts the rest and lists it
    mixed = tmp_path / "mixed"
    shutil.copytree(phantoms["aligned"], mixed)
    shutil.copy(phantoms["misaligned"] / "imagesTr" / "HGJ-001__PT.nii.gz", mixed / "imagesTr" / "HGJ-001__PT.nii.gz")
    report = convert_hecktor(mixed, 611, "Mixed", centers=["HGJ", "HMR"], raw_root=raw, register="rigid",
                             limits=RegistrationLimits(5.0, 10.0), skip_bad=True)
    assert report.training_cases == ["HMR-001"] and "implausibly far" in report.skipped["HGJ-001"]


def test_failed_registration_names_the_case_and_writes_nothing(phantoms: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(phantoms["aligned"], broken)
    pet_path = broken / "imagesTr" / "CHUV-001__PT.nii.gz"
    pet = sitk.ReadImage(str(pet_path))
    zero = sitk.Image(pet.GetSize(), pet.GetPixelID())
    zero.CopyInformation(pet)
    sitk.WriteImage(zero, str(pet_path))
    raw = tmp_path / "raw"
    with pytest.raises(InputDataError, match=r"CHUV-001: PET file imagesTr/CHUV-001__PT.nii.gz cannot be registered "
                                             r"to its CT: .*no PET signal"):
        convert_hecktor(broken, 612, "Zero", centers=["CHUV", "HMR"], raw_root=raw, register="rigid")
    assert list(raw.iterdir()) == []
    # check-alignment lists it as bad and checks the rest
    rows = {r.case: r for r in check_alignment(broken, centers=["CHUV"])}
    assert rows["CHUV-001"].status == "bad" and "no PET signal" in rows["CHUV-001"].detail


@pytest.mark.parametrize("kwargs, message", [
    ({"register": "affine"}, "register must be 'none' or 'rigid'"),
    ({"register": "rigid", "modalities": ["CT"]}, "needs PET among --modalities"),
])
def test_bad_registration_options(phantoms: dict[str, Path], tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(InputDataError, match=message):
        convert_hecktor(phantoms["aligned"], 613, "Opt", raw_root=tmp_path / "raw", **kwargs)
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []


def test_bad_limits_and_misalign_values_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="registration limits must be positive"):
        RegistrationLimits(0.0, 5.0)
    done = run_cli(["pemma", "convert-hecktor", str(tmp_path), "--dataset-id", "614", "--name", "X", "--register",
                    "rigid", "--max-rotation-deg", "nan"], env={**os.environ,
                                                               "nnUNet_raw": str(tmp_path / "raw")})
    assert "registration limits must be positive" in _error_line(done)
    done = run_cli(["pemma", "phantom", str(tmp_path / "ph"), "--misalign", "5", "-1"], env=dict(os.environ))
    assert "misalign must be a shift from 0 to 50 mm and a rotation from 0 to 30 degrees" in _error_line(done)
    assert not (tmp_path / "ph").exists()


def test_check_alignment_lists_unreadable_cases_as_bad(phantoms: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "some_broken"
    shutil.copytree(phantoms["aligned"], folder)
    ct_file = folder / "imagesTr" / "CHUM-001__CT.nii.gz"
    ct_file.write_bytes(ct_file.read_bytes()[:2000])
    rows = {r.case: r for r in check_alignment(folder, centers=["CHUM", "HGJ"], quick=True)}
    assert rows["CHUM-001"].status == "bad" and "imagesTr/CHUM-001__CT.nii.gz" in rows["CHUM-001"].detail
    assert rows["HGJ-001"].status == "aligned"


def test_check_alignment_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match=f"input folder {tmp_path / 'missing'} does not exist"):
        check_alignment(tmp_path / "missing")
    with pytest.raises(InputDataError, match="tolerances must be positive"):
        check_alignment(tmp_path, tolerance_mm=-1.0)
    with pytest.raises(InputDataError, match="edition must be 2022 or 2021, got 2020"):
        check_alignment(tmp_path, edition=2020)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(InputDataError, match=f"cannot write the alignment table {blocker / 'out.csv'}"):
        write_csv([], blocker / "out.csv")


def test_registrations_in_two_processes_give_the_same_dataset(phantoms: dict[str, Path], tmp_path: Path) -> None:
    """Three centres of different scanner geometry (the serial run registered all seven): one worker takes two."""
    centers = ["CHUM", "HGJ", "MDA"]
    report = convert_hecktor(phantoms["misaligned"], 620, "Parallel", centers=centers, raw_root=tmp_path / "raw",
                             register="rigid", workers=2)
    serial = {c: r for c, r in records(phantoms["misaligned_rigid"]).items() if c.split("-")[0] in centers}
    parallel = records(report.dataset_dir)
    assert serial.keys() == parallel.keys() and len(serial) == 3
    for case_id, record in serial.items():
        mine = {**parallel[case_id], "registration": {**parallel[case_id]["registration"], "seconds": None}}
        assert mine == {**record, "registration": {**record["registration"], "seconds": None}}, case_id
    written = sorted((report.dataset_dir / "imagesTr").iterdir())
    assert len(written) == 6  # CT and PET of each case
    for image in (phantoms["misaligned_rigid"] / "imagesTr" / w.name for w in written):
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(report.dataset_dir / "imagesTr" /
                                                                         image.name))), expected), image.name


@pytest.mark.parametrize("workers, register, match", [(0, "rigid", "positive number"),
                                                      (2, "none", "nothing to run in parallel")])
def test_workers_that_cannot_work_are_refused(phantoms: dict[str, Path], tmp_path: Path, workers: int,
                                              register: str, match: str) -> None:
    raw = tmp_path / "raw"
    args = ["pemma", "convert-hecktor", str(phantoms["aligned"]), "--dataset-id", "621", "--name", "Workers",
            "--register", register, "--workers", str(workers)]
    assert match in _error_line(run_cli(args, {**os.environ, "nnUNet_raw": str(raw)}))
    assert not raw.exists() or list(raw.iterdir()) == []


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


@pytest.mark.parametrize("signum, why", [(signal.SIGTERM, "terminated by signal 15"), (signal.SIGINT, "Ctrl-C")])
def test_a_signal_while_registering_in_workers_leaves_nothing(phantoms: dict[str, Path], tmp_path: Path,
                                                              signum: int, why: str) -> None:
    """Ctrl-C reaches every process of the terminal's group, SIGTERM only the conversion: either way the
    conversion stops its workers, removes its lock and temporary files, and says so in one line."""
    raw = tmp_path / "raw"
    raw.mkdir()
    with (tmp_path / "stderr.txt").open("w+") as stderr:
        proc = subprocess.Popen([str(BIN / "pemma"), "convert-hecktor", str(phantoms["misaligned"]), "--dataset-id",
                                 "622", "--name", "Stopped", "--register", "rigid", "--workers", "2"],
                                env={**os.environ, "nnUNet_raw": str(raw)}, stdout=subprocess.DEVNULL, stderr=stderr,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 300
        workers: set[int] = set()
        while len(workers) < 3:  # two workers and multiprocessing's resource tracker
            assert proc.poll() is None, "the conversion ended before it registered in parallel"
            assert time.monotonic() < deadline, "the conversion never started its workers"
            workers = _children(proc.pid)
            time.sleep(0.05)
        time.sleep(1.0)  # the workers are registering
        for pid in {proc.pid, *workers} if signum == signal.SIGINT else {proc.pid}:
            os.kill(pid, signum)
        assert_conversion_interrupted(proc, stderr, why, raw)
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in workers):
        assert time.monotonic() < deadline, "a registration worker outlived the conversion"
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_the_command_registers_on_every_core_unless_told() -> None:
    import argparse

    from nnunetv2_pemma.cli import _registration_workers

    cores = len(os.sched_getaffinity(0))
    assert _registration_workers(argparse.Namespace(workers=None, register="rigid")) == cores
    assert _registration_workers(argparse.Namespace(workers=None, register="none")) == 1
    assert _registration_workers(argparse.Namespace(workers=3, register="rigid")) == 3
