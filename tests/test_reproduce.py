"""`pemma reproduce`'s parts that need no training: the protocol's job graph, the scheduler (real
subprocesses), resuming, and Table 2's files."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from nnunetv2_pemma.errors import PemmaError
from nnunetv2_pemma.evaluation.reproduce import (INFER, METHODS, TABLE_COLUMNS, Job, Protocol, run_jobs,
                                                 table2_markdown, write_table2)


def test_protocol_follows_table_1(tmp_path: Path) -> None:
    protocol = Protocol(tmp_path, tmp_path / "hecktor", "tiny", "cpu")
    trainings = [j for j in protocol.jobs.values() if j.uses_device]
    # CT base; PEMMA, early fusion, PET model on MDA; per new centre: PEMMA and early fusion with C and CP, and
    # late fusion's CT and PET models
    assert len(trainings) == 1 + 3 + 2 * 6
    for job in protocol.jobs.values():
        assert set(job.after) <= set(protocol.jobs), job.name
    convert = {j.argv[j.argv.index("--centers") + 1]: j for j in protocol.jobs.values() if "convert-hecktor" in j.argv}
    assert {"CHUM", "MDA", "HGJ", "HMR"} <= set(convert)
    pemma = protocol.jobs["train PEMMATrainer 3d_unetr_tiny on 502"]
    assert "train UNETRTrainer 3d_unetr_tiny_base on 501" in pemma.after, "the CT base trains on tiny_base"
    assert str(protocol.checkpoint(501, "UNETRTrainer", "3d_unetr_tiny_base")) in pemma.argv
    assert {(m.method, m.stage, m.train) for m in protocol.models} >= {
        ("PEMMA", "Multimodal adaptation", "CP"), ("Early fusion", "New dataset 2", "C"),
        ("Late fusion", "New dataset 1", "CP")}


def _job(name: str, out: Path, after: list[str], code: str = "pass") -> Job:
    script = f"import pathlib, sys; {code}; pathlib.Path(r'{out / name}').write_text('done')"
    return Job(name, [Path(sys.executable).name, "-c", script], out / name, after)


def test_scheduler_respects_dependencies_and_resumes(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    check = f"assert pathlib.Path(r'{tmp_path / 'a'}').exists()"
    jobs = {"a": _job("a", tmp_path, []), "b": _job("b", tmp_path, ["a"], check),
            "c": _job("c", tmp_path, ["a"], check)}
    jobs["b"].uses_device = jobs["c"].uses_device = True
    timings = run_jobs(jobs, {}, logs, gpus=["0", "1"])
    assert set(timings) == {"a", "b", "c"} and all((tmp_path / n).exists() for n in "abc")
    (tmp_path / "c").unlink()
    assert set(run_jobs(jobs, {}, logs, gpus=None)) == {"c"}, "finished jobs must not run again"


def test_failed_job_names_its_log(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    jobs = {"bad": _job("bad", tmp_path, [], "sys.exit(3)"), "after": _job("after", tmp_path, ["bad"])}
    with pytest.raises(PemmaError, match=r"job 'bad' failed \(exit 3\).*bad\.log"):
        run_jobs(jobs, {}, logs, gpus=None)
    assert not (tmp_path / "after").exists()


def test_table2_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [{"method": m, "stage": s, "train": t, "infer": i, "cases": 2, "Tumor": rng.random(),
             "Lymph": rng.random(), "Avg": 0.5, "DSCagg": 0.5}
            for m in METHODS for s, t in TABLE_COLUMNS for i in INFER]
    paths = write_table2(rows, tmp_path)
    markdown = paths["md"].read_text()
    assert markdown == table2_markdown(rows) + "\n"
    first = rows[0]
    assert f"| {first['method']} | Tumor | {first['Tumor']:.2f} |" in markdown
    assert paths["csv"].read_text().count("\n") == len(rows) + 1
    assert paths["png"].stat().st_size > 10_000
