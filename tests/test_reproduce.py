"""`pemma reproduce`'s parts that need no training: the protocol's job graph in both scopes, the scheduler (real
subprocesses, GPU and CPU slots), resuming, and Table 2's files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from nnunetv2_pemma.errors import PemmaError, PlansError
from nnunetv2_pemma.experiments.protocol import Protocol
from nnunetv2_pemma.experiments.scheduler import Job, Slot, cpu_slots, run_jobs
from nnunetv2_pemma.experiments.table2 import (ADAPTATION, BEFORE, INFER, METHODS, columns_of, table2_markdown,
                                               updated_on, write_table2)


def _trainings(protocol: Protocol) -> list[Job]:
    return [j for j in protocol.jobs.values() if j.uses_device]


def test_protocol_follows_table_1(tmp_path: Path) -> None:
    protocol = Protocol(tmp_path, tmp_path / "hecktor", "demo", "cpu")
    # CT base; PEMMA, early fusion, PET model on MDA; per new centre: PEMMA and early fusion with C and CP, and
    # late fusion's CT and PET models
    assert len(_trainings(protocol)) == 1 + 3 + 2 * 6
    for job in protocol.jobs.values():
        assert set(job.after) <= set(protocol.jobs), job.name
    convert = {j.argv[j.argv.index("--centers") + 1]: j for j in protocol.jobs.values() if "convert-hecktor" in j.argv}
    assert {"CHUM", "MDA", "HGJ", "HMR"} <= set(convert)
    pemma = protocol.jobs["train PEMMATrainer 3d_unetr_demo on 502"]
    assert "train UNETRTrainer 3d_unetr_demo_base on 501" in pemma.after, "the CT base trains on demo_base"
    assert str(protocol.checkpoint(501, "UNETRTrainer", "3d_unetr_demo_base")) in pemma.argv
    assert {(m.method, m.stage, m.train) for m in protocol.models} >= {
        ("PEMMA", ADAPTATION, "CP"), ("Early fusion", "New dataset 2", "C"),
        ("Late fusion", "New dataset 1", "CP"), ("PEMMA", "New dataset 2", BEFORE)}
    before = [m for m in protocol.models if m.train == BEFORE]
    assert {m.dataset for m in before if m.method != "Late fusion"} == {502}, "before = the adaptation-stage models"


def test_demo_scope_keeps_the_claims_jobs(tmp_path: Path) -> None:
    protocol = Protocol(tmp_path, tmp_path / "hecktor", "demo", "cpu", scope="demo")
    names = {j.name for j in _trainings(protocol)}
    assert names == {"train UNETRTrainer 3d_unetr_demo_base on 501", "train PEMMATrainer 3d_unetr_demo on 502",
                     "train EarlyFusionTrainer 3d_unetr_demo on 502", "train UNETRTrainer 3d_unetr_demo_base on 503",
                     "train PEMMAContinualTrainer 3d_unetr_demo on 511",
                     "train EarlyFusionTrainer 3d_unetr_demo on 511", "train UNETRTrainer 3d_unetr_demo on 511"}
    assert {m.stage for m in protocol.models} == {ADAPTATION, "New dataset 1"}
    assert {(m.method, m.train) for m in protocol.models if m.stage == "New dataset 1"} == {
        (m, t) for m in ("PEMMA", "Early fusion", "Late fusion") for t in (BEFORE, "C")}
    # every updated model is also scored on the adaptation centre, where it may have forgotten
    assert {(m.method, m.train, m.dataset, m.trainer) for m in protocol.models if m.stage == ADAPTATION
            and m.train != "CP"} == {("PEMMA", updated_on("New dataset 1", "C"), 511, "PEMMAContinualTrainer"),
                                     ("Early fusion", updated_on("New dataset 1", "C"), 511, "EarlyFusionTrainer"),
                                     ("Late fusion", updated_on("New dataset 1", "C"), 511, "UNETRTrainer")}
    # the CP images of HGJ are converted (they are the inputs of CP and P inference) but not preprocessed
    assert "convert 512 HNC_CTPET_HGJ" in protocol.jobs and "plans transfer 501->512" not in protocol.jobs


def test_a_unet_preset_reproduces_the_cnn_forms(tmp_path: Path) -> None:
    """`--preset unet_demo`: the same protocol on nnU-Net's U-Net, every form from one CT base of it."""
    protocol = Protocol(tmp_path, tmp_path / "hecktor", "unet_demo", "cpu", scope="demo")
    config = "3d_fullres_unet_demo"
    names = {j.name for j in _trainings(protocol)}
    assert names == {f"train {t} {config} on {d}" for t, d in (
        ("nnUNetPresetTrainer", 501), ("PEMMACNNTrainer", 502), ("EarlyFusionCNNTrainer", 502),
        ("nnUNetPresetTrainer", 503), ("PEMMACNNContinualTrainer", 511), ("EarlyFusionCNNTrainer", 511),
        ("nnUNetPresetTrainer", 511))}
    base = str(protocol.checkpoint(501, "nnUNetPresetTrainer", config))
    for trainer in ("PEMMACNNTrainer", "EarlyFusionCNNTrainer"):
        assert base in protocol.jobs[f"train {trainer} {config} on 502"].argv
    late = [m for m in protocol.models if m.method == "Late fusion"]
    assert late and all(m.trainer == m.pet_trainer == "nnUNetPresetTrainer" for m in late)
    with pytest.raises(PemmaError, match="UNETR forms"):
        Protocol(tmp_path, tmp_path / "hecktor", "unet_demo", "cpu", scope="demo", adapter_methods=["input_skip"])


def test_unknown_scope(tmp_path: Path) -> None:
    with pytest.raises(PemmaError, match="scope 'all'"):
        Protocol(tmp_path, tmp_path / "hecktor", "demo", "cpu", scope="all")


def _job(name: str, out: Path, after: list[str], code: str = "pass") -> Job:
    script = f"import pathlib, sys, os; {code}; pathlib.Path(r'{out / name}').write_text('done')"
    return Job(name, [Path(sys.executable).name, "-c", script], out / name, after)


def test_scheduler_respects_dependencies_and_resumes(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    check = f"assert pathlib.Path(r'{tmp_path / 'a'}').exists()"
    jobs = {"a": _job("a", tmp_path, []), "b": _job("b", tmp_path, ["a"], check),
            "c": _job("c", tmp_path, ["a"], check)}
    jobs["b"].uses_device = jobs["c"].uses_device = True
    timings = run_jobs(jobs, {}, logs, [Slot(gpu="0"), Slot(gpu="1")])
    assert set(timings) == {"a", "b", "c"} and all((tmp_path / n).exists() for n in "abc")
    (tmp_path / "c").unlink()
    assert set(run_jobs(jobs, {}, logs, [])) == {"c"}, "finished jobs must not run again"


def test_cpu_slots_share_the_cores(tmp_path: Path) -> None:
    """Each training on a CPU slot is told its thread count (read by the trainers), GPU slots their device."""
    logs = tmp_path / "logs"
    logs.mkdir()
    record = "pathlib.Path(r'{}').write_text(os.environ.get('PEMMA_CPU_THREADS', '') + '|' + " \
             "os.environ.get('CUDA_VISIBLE_DEVICES', ''))"
    jobs = {n: _job(n, tmp_path, [], record.format(tmp_path / f"{n}.env")) for n in ("x", "y")}
    for job in jobs.values():
        job.uses_device = True
    slots = cpu_slots(2)
    run_jobs(jobs, {}, logs, slots)
    assert {(tmp_path / f"{n}.env").read_text() for n in jobs} == {f"{slots[0].cpu_threads}|"}
    assert slots[0].cpu_threads >= 1
    for n in jobs:
        (tmp_path / n).unlink()
    run_jobs(jobs, {}, logs, [Slot(gpu="3")])
    assert {(tmp_path / f"{n}.env").read_text() for n in jobs} == {"|3"}


def test_a_users_thread_count_wins_over_the_cores_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """PEMMA_CPU_THREADS, set by whoever runs reproduce beside other work, is each slot's thread count."""
    monkeypatch.delenv("PEMMA_CPU_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert [s.cpu_threads for s in cpu_slots(1)] == [cores]
    monkeypatch.setenv("PEMMA_CPU_THREADS", "1")
    assert [s.cpu_threads for s in cpu_slots(1)] == [1] and [s.cpu_threads for s in cpu_slots(2)] == [1, 1]
    monkeypatch.setenv("PEMMA_CPU_THREADS", "two")
    with pytest.raises(PlansError, match="PEMMA_CPU_THREADS='two': expected a positive number of threads"):
        cpu_slots(1)


def test_failed_job_names_its_log(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    jobs = {"bad": _job("bad", tmp_path, [], "sys.exit(3)"), "after": _job("after", tmp_path, ["bad"])}
    with pytest.raises(PemmaError, match=r"job 'bad' failed \(exit 3\).*bad\.log"):
        run_jobs(jobs, {}, logs, [])
    assert not (tmp_path / "after").exists()


def test_table2_files(tmp_path: Path) -> None:
    from nnunetv2_pemma.experiments.scoring import interval_columns

    rng = np.random.default_rng(0)
    updated = updated_on("New dataset 1", "C")
    columns = [(ADAPTATION, "CP"), (ADAPTATION, updated), ("New dataset 1", BEFORE), ("New dataset 1", "C")]
    rows = []
    for m in METHODS:
        for s, t in reversed(columns):
            for i in INFER:
                per_case = {f"HGJ-{k:03d}": {"Tumor": rng.random(), "Lymph": rng.random(), "Avg": 0.5}
                            for k in range(5)}
                rows.append({"method": m, "stage": s, "train": t, "infer": i, "scored_on": "labelled test cases",
                             "cases": 5, **interval_columns(per_case), "DSCagg": 0.5, "per_case": per_case})
    assert columns_of(rows) == columns, "adaptation first (its own models, then the updated ones), before, C"
    paths = write_table2(rows, tmp_path)
    markdown = paths["md"].read_text()
    assert markdown == table2_markdown(rows) + "\n"
    first = next(r for r in rows if (r["stage"], r["train"], r["infer"]) == (ADAPTATION, "CP", "CP"))
    assert (f"| {ADAPTATION} | train CP | CP | 5 labelled test cases | {first['Tumor']:.2f} "
            f"[{first['Tumor_low']:.2f}, {first['Tumor_high']:.2f}] |") in markdown
    assert first["Tumor_low"] <= first["Tumor"] <= first["Tumor_high"]
    assert f"| {ADAPTATION} | model {updated} | P |" in markdown
    assert "| New dataset 1 | adaptation-stage model, before the update | P |" in markdown
    assert "Lymph-node (GTVn) Dice" in markdown
    csv_lines = paths["csv"].read_text().splitlines()
    assert len(csv_lines) == len(rows) + 1 and "per_case" not in csv_lines[0] and "Tumor_high" in csv_lines[0]
    assert paths["cases"].read_text().count("\n") == 5 * len(rows) + 1
    assert paths["png"].stat().st_size > 10_000


def test_prognosis_protocol_chains_each_method_from_the_shared_ct_base(tmp_path: Path) -> None:
    from nnunetv2_pemma.experiments.prognosis import (BASE_TRAINER, CT_DATASET, CTPET_DATASET, TRAINERS,
                                                      PrognosisProtocol, models, trainable_parameters)

    protocol = PrognosisProtocol(tmp_path, tmp_path / "hecktor", "prognosis", "cpu")
    trainings = {j.name: j for j in _trainings(protocol)}
    assert len(trainings) == 1 + 2 * len(TRAINERS)
    for job in protocol.jobs.values():
        assert set(job.after) <= set(protocol.jobs), job.name
    converts = [j for j in protocol.jobs.values() if "convert-hecktor" in j.argv]
    assert all("--with-outcomes" in j.argv for j in converts) and len(converts) == 2
    base = str(protocol.checkpoint(CT_DATASET, BASE_TRAINER))
    assert "3d_unetr_prognosis_base" in trainings[f"train {BASE_TRAINER} on {CT_DATASET}"].argv, "a longer base"
    for cp, cpt in TRAINERS.values():
        assert base in trainings[f"train {cp} on {CTPET_DATASET}"].argv
        second = trainings[f"train {cpt} on {CTPET_DATASET}"]
        assert str(protocol.checkpoint(CTPET_DATASET, cp)) in second.argv
        assert f"train {cp} on {CTPET_DATASET}" in second.after
    # trainable parameters per stage: PEMMA trains a few percent, early fusion everything
    counts = {(m.method, m.inputs): trainable_parameters("prognosis", m) for m in models()}
    assert counts[("PEMMA (LoRA)", "CP")] < counts[("Early fusion", "CP")] / 5
    # the clinical stage: LoRA on Q and V of 12 blocks (rank 4, hidden 48) and the clinical token (18 -> 48, + position)
    assert counts[("PEMMA (LoRA)", "CPT")] == 12 * 2 * 4 * (48 + 48) + (18 + 1 + 1) * 48
    assert counts[("PEMMA (DoRA)", "CP")] > counts[("PEMMA (LoRA)", "CP")]  # DoRA adds the magnitudes
    assert counts[("Early fusion", "CPT")] == counts[("Early fusion", "CP")] + 18


def test_negative_seed_is_a_one_line_error(tmp_path: Path) -> None:
    proc = run_cli(["pemma", "reproduce", "--phantom", "--scope", "demo", "--seed", "-1", "--out",
                    str(tmp_path / "run")], dict(os.environ))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("--seed must be a non-negative integer, got -1")
    assert not (tmp_path / "run").exists()


def test_a_bad_thread_count_is_a_one_line_error_before_anything_is_written(tmp_path: Path) -> None:
    proc = run_cli(["pemma", "reproduce", "--phantom", "--scope", "demo", "--out", str(tmp_path / "run")],
                   {**os.environ, "PEMMA_CPU_THREADS": "0"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("PEMMA_CPU_THREADS='0': expected a positive number of "
                                                         "threads")
    assert not (tmp_path / "run").exists()


def test_scoring_inputs_link_once_and_only_the_channels_a_dataset_has(tmp_path: Path) -> None:
    """A resumed run links again over the links it left; the CT base's CT-only dataset gets C inputs only (a CP
    folder would hold links to PET files that do not exist, and a resumed run stopped on them)."""
    from nnunetv2_pemma.experiments.evaluation_cases import TEST, EvaluationCases
    from nnunetv2_pemma.experiments.scoring import link_inputs

    images, labels = tmp_path / "imagesTs", tmp_path / "labelsTs"
    images.mkdir()
    labels.mkdir()
    for case in ("CHUM-401", "CHUM-402"):
        (images / f"{case}_0000.nii.gz").write_bytes(b"ct")
        (labels / f"{case}.nii.gz").write_bytes(b"label")
    scored = EvaluationCases(TEST, ("CHUM-401", "CHUM-402"), images, labels)
    for _ in range(2):
        folders = link_inputs(tmp_path / "eval", scored, ("C",))
    assert set(folders) == {"C", "gt"} and not (tmp_path / "eval" / "inputs_CP").exists()
    assert sorted(p.name for p in folders["C"].iterdir()) == ["CHUM-401_0000.nii.gz", "CHUM-402_0000.nii.gz"]
    assert (folders["C"] / "CHUM-402_0000.nii.gz").read_bytes() == b"ct"
    assert (folders["gt"] / "CHUM-401.nii.gz").read_bytes() == b"label"
    (images / "CHUM-401_0001.nii.gz").write_bytes(b"pet")
    both = link_inputs(tmp_path / "eval", EvaluationCases(TEST, ("CHUM-401",), images, labels))
    assert (both["P"] / "CHUM-401_0000.nii.gz").read_bytes() == b"pet"
    assert (both["CP"] / "CHUM-401_0001.nii.gz").read_bytes() == b"pet"
