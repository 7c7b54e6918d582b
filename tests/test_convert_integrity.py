"""What used to convert silently wrong, or block, or linger: real phantom data and float32-rounded headers pass, a
PET with a zero voxel size does not, hidden files are ignored, suspicious images warn, a second conversion of an id is
kept off by a lock (a dead one's taken over), and SIGTERM (or Ctrl-C) leaves nothing behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_conversion_interrupted, BIN
from hecktor_fixtures import image, make_ct, make_pet, patch_header, read_header, write, write_hecktor_2021, \
    write_hecktor_2022
from nnunetv2_pemma.data.hecktor import convert_hecktor
from nnunetv2_pemma.data.phantom import write_phantom
from nnunetv2_pemma.errors import InputDataError, PemmaWarning
from test_convert_bad_inputs import error_line, run_cli

HIDDEN_LINE = "file(s) whose names start with '.' (hidden files, such as macOS '._' resource forks): "


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "hecktor"
    write_phantom(out, cases_per_center=1)
    return out


def test_phantom_converts_without_problems_or_warnings(phantom: Path, tmp_path: Path) -> None:
    pet = read_header(phantom / "imagesTr" / "CHUM-001__PT.nii.gz")
    assert pet["qform_code"] > 0 and pet["sform_code"] > 0  # so the sform/qform comparison runs on every file
    with warnings.catch_warnings():
        warnings.simplefilter("error", PemmaWarning)
        report = convert_hecktor(phantom, dataset_id=610, name="Phantom", raw_root=tmp_path / "raw")
    assert len(report.training_cases) == 7 and not report.skipped


def test_phantom_pet_with_a_zero_voxel_size_is_refused(phantom: Path, tmp_path: Path) -> None:
    """SimpleITK reads the zero as 1 mm: the conversion used to succeed with no PET signal in the tumour."""
    root = shutil.copytree(phantom, tmp_path / "in")
    patch_header(root / "imagesTr" / "CHUM-001__PT.nii.gz", pixdim=(4.0, 4.0, 0.0))
    with pytest.raises(InputDataError, match=re.escape(
            "CHUM-001: PET file imagesTr/CHUM-001__PT.nii.gz has voxel sizes (pixdim) (4, 4, 0) mm in its header; "
            "they must be finite and positive")):
        convert_hecktor(root, dataset_id=611, name="X", centers=["CHUM"], raw_root=tmp_path / "raw")
    assert list((tmp_path / "raw").iterdir()) == []


def test_sform_and_qform_equal_up_to_float32_rounding_pass(tmp_path: Path) -> None:
    """An oblique grid stored twice, as float32 sform rows and as a float32 quaternion: the two differ in the last
    digits, as in real scanner exports, and must not be refused."""
    root = write_hecktor_2022(tmp_path / "in", ["CHUM-001"])
    c, s = np.cos(0.05), np.sin(0.05)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([-2.0, -2.0, 2.0])
    affine[:3, 3] = (23.123456789, 22.987654321, -23.333333333)
    for path in (root / "imagesTr" / "CHUM-001__CT.nii.gz", root / "labelsTr" / "CHUM-001.nii.gz"):
        patch_header(path, sform=(affine, 1), qform=(affine, 1))
    header = read_header(root / "imagesTr" / "CHUM-001__CT.nii.gz")
    difference = np.abs(header.get_sform() - header.get_qform()).max()
    assert 0 < difference < 1e-5
    report = convert_hecktor(root, dataset_id=612, name="Rounded", raw_root=tmp_path / "raw")
    assert report.training_cases == ["CHUM-001"]


def test_scaled_voxels_pass(tmp_path: Path) -> None:
    """scl_slope/scl_inter: SimpleITK scales in float32, nibabel in float64; the two agree within rounding."""
    root = write_hecktor_2022(tmp_path / "in", ["CHUM-001"])
    patch_header(root / "imagesTr" / "CHUM-001__CT.nii.gz", scl_slope=2.0, scl_inter=0.0)
    patch_header(root / "imagesTr" / "CHUM-001__PT.nii.gz", scl_slope=0.37, scl_inter=0.0123)
    report = convert_hecktor(root, dataset_id=616, name="Scaled", raw_root=tmp_path / "raw")
    assert report.training_cases == ["CHUM-001"]


def _resource_fork(path: Path) -> None:
    """What macOS writes beside a file on a non-Apple drive: an AppleDouble header, no image."""
    path.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00" + bytes(4088))


def test_hidden_files_are_ignored_and_listed(tmp_path: Path) -> None:
    root = write_hecktor_2022(tmp_path / "in", ["CHUM-001"])
    _resource_fork(root / "imagesTr" / "._CHUM-001__CT.nii.gz")
    _resource_fork(root / "labelsTr" / "._CHUM-001.nii.gz")
    (root / "imagesTr" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    report = convert_hecktor(root, dataset_id=613, name="Hidden", raw_root=tmp_path / "raw")
    assert report.training_cases == ["CHUM-001"]
    assert ("ignored 3 " + HIDDEN_LINE
            + "imagesTr/.DS_Store, imagesTr/._CHUM-001__CT.nii.gz, labelsTr/._CHUM-001.nii.gz") in str(report)


def test_hidden_files_in_a_2021_folder(tmp_path: Path) -> None:
    root = write_hecktor_2021(tmp_path / "in", ["CHGJ007"], box_mm=((-14, -14, -20), (14, 14, 20)))
    _resource_fork(root / "._CHGJ007_ct.nii.gz")
    report = convert_hecktor(root, dataset_id=614, name="Hidden2021", edition=2021, raw_root=tmp_path / "raw")
    assert report.training_cases == ["CHGJ007"]
    assert "ignored 1 " + HIDDEN_LINE + "._CHGJ007_ct.nii.gz" in str(report)


def _zero_pet(root: Path) -> None:
    pet = make_pet()
    write(image(np.zeros(tuple(reversed(pet.GetSize())), np.float32), pet.GetSpacing(), pet.GetOrigin()),
          root / "imagesTr" / "CHUS-001__PT.nii.gz")


def _constant_ct(root: Path) -> None:
    ct = make_ct()
    write(image(np.full(tuple(reversed(ct.GetSize())), 40, np.int16), ct.GetSpacing(), ct.GetOrigin()),
          root / "imagesTr" / "CHUS-001__CT.nii.gz")


SUSPICIOUS = {
    "all-zero PET": (_zero_pet, "CHUS-001: PET file imagesTr/CHUS-001__PT.nii.gz is all zero (no uptake anywhere)"),
    "constant CT": (_constant_ct, "CHUS-001: CT file imagesTr/CHUS-001__CT.nii.gz has the same value (40) in every "
                                  "voxel"),
}


@pytest.mark.parametrize("problem", list(SUSPICIOUS))
def test_suspicious_image_is_a_warning(tmp_path: Path, problem: str) -> None:
    root = write_hecktor_2022(tmp_path / "in", ["CHUM-001", "CHUS-001"])
    damage, message = SUSPICIOUS[problem]
    damage(root)
    with pytest.warns(PemmaWarning, match=re.escape(message)) as record:
        report = convert_hecktor(root, dataset_id=615, name="Suspicious", raw_root=tmp_path / "raw")
    assert [str(w.message) for w in record if w.category is PemmaWarning] == [message]
    assert report.training_cases == ["CHUM-001", "CHUS-001"]


@pytest.mark.parametrize("problem", list(SUSPICIOUS))
def test_suspicious_image_is_one_warning_line_of_the_cli(tmp_path: Path, problem: str) -> None:
    root = write_hecktor_2022(tmp_path / "in", ["CHUM-001", "CHUS-001"])
    damage, message = SUSPICIOUS[problem]
    damage(root)
    done = run_cli(root, tmp_path / "raw")
    assert done.returncode == 0, done.stderr
    assert [ln for ln in done.stderr.splitlines() if "warning" in ln] == [f"pemma convert-hecktor: warning: {message}"]
    assert "Traceback" not in done.stderr
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["Dataset501_Bad"]


def test_a_running_conversion_keeps_a_second_one_off_its_id(tmp_path: Path) -> None:
    root = write_hecktor_2022(tmp_path / "in", ["CHUM-001"])
    lock = tmp_path / "raw" / ".Dataset501.lock"
    lock.parent.mkdir()
    lock.write_text(f"{os.getpid()}\n")  # this test process: alive
    done = run_cli(root, tmp_path / "raw")
    assert error_line(done) == (f"pemma convert-hecktor: error: dataset id 501 is being converted by process "
                                f"{os.getpid()} (lock file {lock}); wait for it to finish, or remove the lock file if "
                                f"process {os.getpid()} is not a conversion")
    assert "checking cases" not in done.stderr  # refused at once, before reading any case
    assert list(lock.parent.iterdir()) == [lock] and lock.read_text() == f"{os.getpid()}\n"


def test_an_unwritable_nnunet_raw_is_one_error(tmp_path: Path) -> None:
    root = write_hecktor_2022(tmp_path / "in", ["CHUM-001"])
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(InputDataError, match=re.escape(f"cannot create lock file {tmp_path / 'file' / 'raw'}/"
                                                       f".Dataset617.lock (NotADirectoryError: Not a directory)")):
        convert_hecktor(root, dataset_id=617, name="X", raw_root=tmp_path / "file" / "raw")


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_dead_conversions_lock_is_taken_over(tmp_path: Path) -> None:
    root = write_hecktor_2022(tmp_path / "in", ["CHUM-001"])
    raw = tmp_path / "raw"
    pid = _dead_pid()
    lock = raw / ".Dataset501.lock"
    leftover = raw / f".Dataset501_Bad.tmp-{pid}"
    (leftover / "imagesTr").mkdir(parents=True)
    (leftover / "imagesTr" / "CHUM-001_0000.nii.gz").write_bytes(b"half written")
    lock.write_text(f"{pid}\n")
    done = run_cli(root, raw)
    assert done.returncode == 0, done.stderr
    assert [ln for ln in done.stderr.splitlines() if "warning" in ln] == [
        f"pemma convert-hecktor: warning: took over lock file {lock} of process {pid}, which is no longer running "
        f"and removed its unfinished {leftover.name}"]
    assert [p.name for p in raw.iterdir()] == ["Dataset501_Bad"]  # lock released, leftover gone


@pytest.fixture(scope="module")
def many_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~100 phantom cases: a few seconds of writing, time to be interrupted."""
    out = tmp_path_factory.mktemp("phantom") / "hecktor"
    write_phantom(out, cases_per_center=15)
    return out


@pytest.mark.parametrize("signum, why", [(signal.SIGTERM, "terminated by signal 15"), (signal.SIGINT, "Ctrl-C")])
def test_a_signal_while_writing_leaves_nothing(many_cases: Path, tmp_path: Path, signum: int, why: str) -> None:
    """A cluster's job killer sends SIGTERM: the conversion unwinds as on Ctrl-C (temporary folder and lock removed)
    and says so in one line."""
    raw = tmp_path / "raw"
    raw.mkdir()
    with (tmp_path / "stderr.txt").open("w+") as stderr:
        proc = subprocess.Popen([str(BIN / "pemma"), "convert-hecktor", str(many_cases), "--dataset-id", "603",
                                 "--name", "Killed"], env={**os.environ, "nnUNet_raw": str(raw)},
                                stdout=subprocess.DEVNULL, stderr=stderr,
                                # a shell's background job ignores SIGINT, and Python then keeps ignoring it
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 300
        while not list(raw.glob(".Dataset603_Killed.tmp-*")):
            assert proc.poll() is None, "the conversion ended before it was writing"
            assert time.monotonic() < deadline, "the conversion never started writing"
            time.sleep(0.005)
        proc.send_signal(signum)
        assert_conversion_interrupted(proc, stderr, why, raw)
