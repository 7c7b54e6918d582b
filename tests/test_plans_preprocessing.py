"""`pemma plans transfer` with one process runs nnU-Net's dataset check, fingerprint and preprocessing in a thread
(worker_pools) and writes what nnU-Net's spawned workers write; a second preset reuses the target's fingerprint
until the raw dataset changes."""

from __future__ import annotations

import os
from pathlib import Path

import blosc2
import numpy as np
import pytest

from conftest import run_ok

pytestmark = pytest.mark.slow

TARGET = "Dataset502_HNC_CTPET_MDA"


def preprocessed(env: dict[str, str]) -> tuple[bytes, dict[str, np.ndarray | bytes]]:
    """The target's fingerprint file, and its preprocessed arrays (decompressed) and case properties."""
    folder = Path(env["nnUNet_preprocessed"]) / TARGET
    files = {}
    for f in sorted((folder / "nnUNetPlans_3d_fullres").iterdir()):
        files[f.name] = blosc2.open(str(f), mode="r")[:] if f.suffix == ".b2nd" else f.read_bytes()
    return (folder / "dataset_fingerprint.json").read_bytes(), files


def touch_raw(env: dict[str, str]) -> None:
    """Mark the raw dataset as changed after the fingerprint was written (one image, as a re-conversion would)."""
    image = sorted((Path(env["nnUNet_raw"]) / TARGET / "imagesTr").iterdir())[0]
    later = (Path(env["nnUNet_preprocessed"]) / TARGET / "dataset_fingerprint.json").stat().st_mtime + 5
    os.utime(image, (later, later))


def test_threads_write_what_spawned_processes_write(own_workflow: dict) -> None:
    env = own_workflow["env"]
    touch_raw(env)
    run_ok(["pemma", "plans", "transfer", "501", "502", "--preset", "tiny", "--overwrite", "--np", "1"], env)
    fingerprint, files = preprocessed(env)
    touch_raw(env)
    run_ok(["pemma", "plans", "transfer", "501", "502", "--preset", "tiny", "--overwrite", "--np", "2"], env)
    fingerprint2, files2 = preprocessed(env)
    assert fingerprint == fingerprint2
    assert files.keys() == files2.keys() and len(files) == 15  # 5 MDA cases: image, segmentation, properties
    for name, content in files.items():
        if isinstance(content, bytes):
            assert content == files2[name], name
        else:
            assert content.dtype == files2[name].dtype and np.array_equal(content, files2[name]), name


def test_a_second_preset_reuses_the_fingerprint_until_the_raw_dataset_changes(own_workflow: dict) -> None:
    env = own_workflow["env"]
    fingerprint = Path(env["nnUNet_preprocessed"]) / TARGET / "dataset_fingerprint.json"
    written = fingerprint.stat().st_mtime_ns
    run_ok(["pemma", "plans", "transfer", "501", "502", "--preset", "unet_tiny", "--overwrite"], env)
    assert fingerprint.stat().st_mtime_ns == written
    touch_raw(env)
    run_ok(["pemma", "plans", "transfer", "501", "502", "--preset", "unet_tiny", "--overwrite"], env)
    assert fingerprint.stat().st_mtime_ns > written
