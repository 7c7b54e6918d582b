"""The `pemma` command: argument parsing only; every subcommand calls the library.

Library errors (`PemmaError`) are printed as one line on stderr with exit code 2, and `PemmaWarning`s as one line
each; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

from nnunetv2_pemma.errors import PemmaError, PemmaWarning


def _phantom(args: argparse.Namespace) -> None:
    from nnunetv2_pemma.data.phantom import write_phantom

    summary = write_phantom(Path(args.out), cases_per_center=args.cases_per_center, size=args.size, seed=args.seed,
                            test_cases_per_center=args.test_cases_per_center,
                            labelled_test_cases_per_center=args.labelled_test_cases_per_center,
                            misalign=tuple(args.misalign) if args.misalign else None)
    print(summary)


def _convert_hecktor(args: argparse.Namespace) -> None:
    from nnunetv2_pemma.data.hecktor import convert_hecktor
    from nnunetv2_pemma.data.registration import RegistrationLimits

    try:
        report = convert_hecktor(Path(args.input), dataset_id=args.dataset_id, name=args.name, centers=args.centers,
                                 modalities=args.modalities, crop=args.crop, crop_size_mm=tuple(args.crop_size_mm),
                                 edition=args.edition, skip_bad=args.skip_bad, with_outcomes=args.with_outcomes,
                                 register=args.register,
                                 limits=RegistrationLimits(args.max_shift_mm, args.max_rotation_deg),
                                 workers=_registration_workers(args))
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (the library turns it into KeyboardInterrupt)
        why = str(e) or "Ctrl-C"
        raise PemmaError(f"interrupted ({why}); the unfinished dataset and its lock were removed") from None
    print(report)


def _registration_workers(args: argparse.Namespace) -> int:
    """--workers as given, else one per core this process may use when registering (each registration runs on
    one thread), else 1."""
    if args.workers is not None:
        return args.workers
    return len(os.sched_getaffinity(0)) if args.register == "rigid" else 1


def _check_alignment(args: argparse.Namespace) -> None:
    from nnunetv2_pemma.data.alignment import check_alignment, format_rows, write_csv
    from nnunetv2_pemma.data.registration import RegistrationLimits

    rows = check_alignment(Path(args.input), edition=args.edition, centers=args.centers, crop=args.crop,
                           crop_size_mm=tuple(args.crop_size_mm), tolerance_mm=args.tolerance_mm,
                           tolerance_deg=args.tolerance_deg,
                           limits=RegistrationLimits(args.max_shift_mm, args.max_rotation_deg), quick=args.quick)
    print(format_rows(rows, args.tolerance_mm, args.tolerance_deg, quick=args.quick))
    if args.csv:
        write_csv(rows, Path(args.csv))
        print(f"wrote {args.csv}")


def _plans_add(args: argparse.Namespace) -> None:
    from nnunetv2_pemma.plans import add_preset

    print(add_preset(args.dataset, args.preset, plans_identifier=args.plans, num_processes=args.np,
                     overwrite=args.overwrite))


def _plans_transfer(args: argparse.Namespace) -> None:
    from nnunetv2_pemma.plans import transfer_plans

    print(transfer_plans(args.source, args.target, args.preset, plans_identifier=args.plans,
                         preprocess=not args.no_preprocess, num_processes=args.np, overwrite=args.overwrite))


def _predict(args: argparse.Namespace) -> None:
    from nnunetv2_pemma.inference.predictor import predict

    folds = [f if f == "all" else int(f) for f in args.f]
    written = predict(Path(args.i), Path(args.o), args.d, args.c, args.tr, folds, modalities=args.modalities,
                      plans_identifier=args.p, checkpoint_name=args.chk, device=args.device,
                      tta=not args.disable_tta, crop_records=Path(args.crop_records) if args.crop_records else None,
                      missing_modality=args.missing_modality, num_processes=args.np, overwrite=args.overwrite)
    print(f"{len(written)} predictions in {args.o}")


def _predict_risk(args: argparse.Namespace) -> None:
    from nnunetv2_pemma.inference.risk import predict_risk

    folds = [f if f == "all" else int(f) for f in args.f]
    frame = predict_risk(Path(args.i), Path(args.o), args.d, args.c, args.tr, folds, modalities=args.modalities,
                         outcomes=Path(args.outcomes) if args.outcomes else None, plans_identifier=args.p,
                         checkpoint_name=args.chk, device=args.device, overwrite=args.overwrite)
    print(f"risks of {len(frame)} cases ({frame['modalities'].iloc[0]}) in {args.o}")


def _predict_late_fusion(args: argparse.Namespace) -> None:
    from nnunetv2_pemma.inference.late_fusion import ModelRef, predict_late_fusion

    folds = tuple(f if f == "all" else int(f) for f in args.f)
    ct = ModelRef(*args.ct_model, folds=folds) if args.ct_model else None
    pet = ModelRef(*args.pet_model, folds=folds) if args.pet_model else None
    written = predict_late_fusion(Path(args.i), Path(args.o), args.modalities, ct, pet, w_ct=args.w_ct,
                                  device=args.device, tta=not args.disable_tta, overwrite=args.overwrite)
    print(f"{len(written)} late-fusion predictions in {args.o}")


def _apply_adapter(args: argparse.Namespace) -> None:
    from nnunetv2_pemma.adaptation.files import apply_adapter

    try:
        written = apply_adapter(Path(args.base), Path(args.adapter), Path(args.out), fold=args.fold,
                                force=args.force, overwrite=args.overwrite, experts=[Path(e) for e in args.experts])
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM while writing (the library turns it into KeyboardInterrupt)
        raise PemmaError(f"interrupted ({str(e) or 'Ctrl-C'}); model folder {args.out} left as it was") from None
    print(written)


def _reproduce(args: argparse.Namespace) -> None:
    hecktor = None if args.phantom else Path(args.hecktor)
    if args.prognosis:
        from nnunetv2_pemma.experiments.prognosis import run_prognosis

        print(run_prognosis(Path(args.out), args.preset or "prognosis", hecktor=hecktor,
                            phantom_cases=args.cases_per_center or 40, phantom_size=args.size, device=args.device,
                            gpus=args.gpus, seed=args.seed, cpu_jobs=args.cpu_jobs,
                            test_cases=args.labelled_test_cases_per_center))
        return
    from nnunetv2_pemma.experiments.reproduce import run_reproduce

    print(run_reproduce(Path(args.out), args.preset or "demo", hecktor=hecktor,
                        phantom_cases=args.cases_per_center or 30, phantom_size=args.size, device=args.device,
                        gpus=args.gpus, scope=args.scope, seed=args.seed, cpu_jobs=args.cpu_jobs,
                        adapter_methods=args.adapter_methods, test_cases=args.labelled_test_cases_per_center))


def _compare(args: argparse.Namespace) -> None:
    from nnunetv2_pemma.experiments.compare import markdown, run_compare

    rows, paths = run_compare(Path(args.out), args.preset, hecktor=None if args.phantom else Path(args.hecktor),
                              phantom_cases=args.cases_per_center, phantom_size=args.size, device=args.device,
                              gpus=args.gpus, seed=args.seed, cpu_jobs=args.cpu_jobs,
                              test_cases=args.labelled_test_cases_per_center)
    print(f"{markdown(rows)}\n\nPeer table: {paths['md']}, {paths['csv']}, {paths['png']}; "
          f"logs: {Path(args.out) / 'logs'}")


def _add_job_graph_options(p: argparse.ArgumentParser) -> None:
    """The data and machine options of the commands that run a job graph (reproduce, compare)."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hecktor", help="HECKTOR 2022 training folder")
    source.add_argument("--phantom", action="store_true", help="generate phantom data instead")
    p.add_argument("--size", choices=("small", "demo"), default="small", help="phantom size")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the phantom and every training (PEMMA_SEED): the same seed on the same "
                        "machine gives the same tables")
    p.add_argument("--labelled-test-cases-per-center", type=int, default=20,
                   help="phantom: labelled test cases per centre, in no split; every table scores them (default 20)")
    p.add_argument("--cpu-jobs", type=int, default=2,
                   help="on CPU, trainings that run side by side, sharing the cores (default 2); each takes "
                        "PEMMA_CPU_THREADS threads when it is set")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--gpus", nargs="+", default=None, metavar="ID",
                   help="run independent trainings in parallel, one per GPU id (sets CUDA_VISIBLE_DEVICES)")


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="PEMMA beside nnU-Net's U-Net, early fusion, H2ASeg and a 2.5D network "
                                       "(the peer table), resumable",
                       description="Trains every row on the adaptation centre's CT+PET data (fold 0; PEMMA and early "
                                   "fusion from the CT base of the pre-training centres; the 2.5D network also "
                                   "pre-trained on those centres' CT+PET and fine-tuned) through nnU-Net's commands, "
                                   "then scores CP (and C, P where a model takes them) on the fold-0 validation "
                                   "cases: Dice, HD95, precision, recall per class, parameters, inference time per "
                                   "case. Markdown, CSV and PNG. benchmarks/peer_table.py adds step time and memory.")
    _add_job_graph_options(p)
    p.add_argument("--preset", choices=("tiny", "demo", "paper"), default="demo",
                   help="the size of every row: demo (CPU; the peers' *_demo presets), paper, or tiny (the peers' "
                        "*_tiny presets: a check of the whole command in minutes, no usable scores)")
    p.add_argument("--out", required=True,
                   help="output folder (holds its own nnU-Net folders); may be a finished `pemma demo`/`reproduce` "
                        "run of the same preset, whose models it reuses")
    p.add_argument("--cases-per-center", type=int, default=30, help="phantom cases per centre")
    p.set_defaults(func=_compare)


def _demo(args: argparse.Namespace) -> None:
    from nnunetv2_pemma.experiments.reproduce import run_reproduce

    print(run_reproduce(Path(args.out), "demo", hecktor=None, phantom_cases=args.cases_per_center,
                        phantom_size="small", device="cpu", scope="demo", seed=args.seed,
                        test_cases=args.labelled_test_cases_per_center))


def _evaluate(args: argparse.Namespace) -> None:
    from nnunetv2_pemma.evaluation.metrics import evaluate_folders

    print(evaluate_folders(Path(args.pred), Path(args.gt), json_out=Path(args.json) if args.json else None,
                           allow_missing=args.allow_missing))


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice, HD95, volumes and HECKTOR's aggregated Dice of a prediction folder",
                       description="Per case and label (GTVp, GTVn): Dice, HD95 (mm), volumes; means over cases; "
                                   "HECKTOR 2022's aggregated Dice (DSCagg) per label and their mean.")
    p.add_argument("--pred", required=True, help="predicted masks (CASE.nii.gz)")
    p.add_argument("--gt", required=True, help="reference masks with the same geometry")
    p.add_argument("--json", default=None, help="write all numbers to this JSON file")
    p.add_argument("--allow-missing", action="store_true", help="score only cases present in both folders")
    p.set_defaults(func=_evaluate)


def _evaluate_survival(args: argparse.Namespace) -> None:
    from nnunetv2_pemma.evaluation.survival import evaluate_survival

    print(evaluate_survival(Path(args.risks_csv), Path(args.outcomes), Path(args.out), n_resamples=args.bootstrap))


def _add_evaluate_survival(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate-survival", help="C-index, bootstrap interval and Kaplan-Meier log-rank test of "
                                                 "predicted risks against relapse-free survival",
                       description="Harrell's C-index (higher risk = earlier relapse) with its 95% percentile "
                                   "bootstrap interval, per-centre C-index, and Kaplan-Meier curves of the low- and "
                                   "high-risk halves with their log-rank p-value. Writes survival.json and "
                                   "kaplan_meier.png to --out.")
    p.add_argument("risks_csv", metavar="RISKS_CSV", help="CSV with columns case,risk (pemma predict-risk)")
    p.add_argument("--outcomes", required=True, metavar="PATH",
                   help="outcomes.json, or the nnU-Net raw dataset folder holding it")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for survival.json and kaplan_meier.png")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    p.set_defaults(func=_evaluate_survival)


def _parameters(args: argparse.Namespace) -> None:
    from nnunetv2_pemma.evaluation.parameters import format_parameter_table, measure

    print(format_parameter_table(measure(args.preset)))


def _add_parameters(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("parameters", help="trainable/total parameters of each method at a preset's size")
    p.add_argument("--preset", default="paper")
    p.set_defaults(func=_parameters)


def _add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="write synthetic PET/CT cases in the HECKTOR 2022 layout",
                       description="Synthetic head-and-neck PET/CT in the HECKTOR 2022 layout (CT in HU, PET in SUV "
                                   "on its own grid, GTVp/GTVn labels, clinical and endpoint tables).")
    p.add_argument("out", help="output folder (HECKTOR layout: imagesTr/, labelsTr/, CSV tables)")
    p.add_argument("--cases-per-center", type=int, default=5, help="training cases for each of the 7 centres")
    p.add_argument("--test-cases-per-center", type=int, default=0,
                   help="unlabelled cases in imagesTs/ for each test centre (USZ, CHB, MDA)")
    p.add_argument("--labelled-test-cases-per-center", type=int, default=0,
                   help="labelled test cases for each of the 7 training centres, in imagesTs/ with labels in "
                        "labelsTs/ (ids from 401): converted to the dataset's imagesTs/labelsTs, never in a split")
    p.add_argument("--size", choices=("small", "demo", "hecktor"), default="small",
                   help="small: ~48 voxels a side (tests); demo: 96 (the demo's training data); hecktor: HECKTOR's "
                        "200 x 200 x 310 mm head-and-neck region at ~1 mm (for timing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--misalign", nargs=2, type=float, metavar=("MM", "DEG"), default=None,
                   help="move each patient between CT and PET by MM mm and DEG degrees in random directions (truth "
                        "in phantom_misalignment.json), to measure registration")
    p.set_defaults(func=_phantom)


def _add_registration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-shift-mm", type=float, default=20.0,
                   help="plausibility limit: largest move of the CT body's centre a registration may make (mm)")
    p.add_argument("--max-rotation-deg", type=float, default=10.0,
                   help="plausibility limit: largest rotation a registration may make (degrees)")


def _add_check_alignment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-alignment", help="flag HECKTOR cases whose PET and CT are out of register",
                       description="Measure each case's PET and CT body-outline distance and estimate its "
                                   "PET-to-CT misalignment with the rigid registration of `convert-hecktor --register "
                                   "rigid`, without writing a dataset, and flag the cases beyond the tolerances.")
    p.add_argument("input", help="HECKTOR folder (2022: imagesTr/, labelsTr/; 2021: flat files + bbox CSV)")
    p.add_argument("--edition", type=int, choices=(2022, 2021), default=2022)
    p.add_argument("--centers", nargs="+", default=None, help="centres to check (default: all)")
    p.add_argument("--crop", choices=("headneck", "none"), default="headneck",
                   help="region compared, as the conversion would crop it")
    p.add_argument("--crop-size-mm", nargs=3, type=float, default=(200.0, 200.0, 310.0), metavar=("X", "Y", "Z"))
    p.add_argument("--tolerance-mm", type=float, default=4.0, help="flag shifts above this (default: a PET voxel)")
    p.add_argument("--tolerance-deg", type=float, default=2.0, help="flag rotations above this")
    _add_registration_options(p)
    p.add_argument("--quick", action="store_true",
                   help="no registration: flag by the PET and CT body outlines only (a fraction of a second per "
                        "case; blind to motion along the neck)")
    p.add_argument("--csv", default=None, help="also write the table as CSV here")
    p.set_defaults(func=_check_alignment)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-hecktor", help="convert a HECKTOR 2022/2021 folder to an nnU-Net raw dataset",
                       description="Validate every case (each file decoded whole by SimpleITK and nibabel, which "
                                   "must agree; header geometry; label values), resample PET onto the CT grid "
                                   "(physical coordinates), optionally crop the head and neck, and write "
                                   "$nnUNet_raw/DatasetNNN_NAME atomically: nothing on an error, Ctrl-C or SIGTERM. "
                                   "A lock file, .DatasetNNN.lock, keeps a second conversion off the same id.")
    p.add_argument("input", help="HECKTOR folder (2022: imagesTr/, labelsTr/; 2021: flat files + bbox CSV)")
    p.add_argument("--dataset-id", type=int, required=True)
    p.add_argument("--name", required=True, help="dataset name, e.g. HNC_CT")
    p.add_argument("--centers", nargs="+", default=None, help="centres to keep (default: all)")
    p.add_argument("--modalities", nargs="+", default=["CT", "PET"], choices=("CT", "PET"),
                   help="channels to write, in this order")
    p.add_argument("--crop", choices=("headneck", "none"), default="headneck")
    p.add_argument("--crop-size-mm", nargs=3, type=float, default=(200.0, 200.0, 310.0), metavar=("X", "Y", "Z"),
                   help="head-and-neck box size in mm (default 200 200 310)")
    p.add_argument("--edition", type=int, choices=(2022, 2021), default=2022)
    p.add_argument("--skip-bad", action="store_true", help="convert the valid cases and list the skipped ones")
    p.add_argument("--register", choices=("none", "rigid"), default="none",
                   help="rigid: register each PET to its CT (SimpleITK, mutual information) before resampling; the "
                        "transform and its quality go into pemma_crops.json (default none: trust the headers)")
    _add_registration_options(p)
    p.add_argument("--workers", type=int, default=None,
                   help="with --register rigid: register this many cases at a time, one process and one thread "
                        "each (default: this machine's cores); the results are the same for any number")
    p.add_argument("--with-outcomes", action="store_true",
                   help="also validate HECKTOR 2022's clinical and endpoint tables and write them as outcomes.json "
                        "(encoded clinical vector with missing indicators, relapse, RFS) for prognosis")
    p.set_defaults(func=_convert_hecktor)


def _add_plans(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plans", help="add transformer configurations to nnU-Net plans")
    psub = p.add_subparsers(dest="plans_command", required=True)
    add = psub.add_parser("add", help="add a preset's configuration to DATASET's plans (inherits 3d_fullres)")
    add.add_argument("dataset", help="dataset id or name")
    add.add_argument("--preset", required=True, help="preset name in plans/ (paper, tiny) or a JSON file")
    add.add_argument("--plans", default="nnUNetPlans", help="plans identifier")
    add.add_argument("--np", type=int, default=1, help="preprocessing processes (datasets with PET only)")
    add.add_argument("--overwrite", action="store_true",
                     help="replace a configuration of the preset's name that differs from the preset")
    add.set_defaults(func=_plans_add)
    tr = psub.add_parser("transfer", help="give TARGET the SOURCE configuration (spacing, patch, CT statistics) "
                                          "plus TARGET's own PET statistics, then preprocess TARGET")
    tr.add_argument("source", help="dataset the base model was trained on")
    tr.add_argument("target", help="dataset to adapt or update on")
    tr.add_argument("--preset", required=True)
    tr.add_argument("--plans", default="nnUNetPlans", help="plans identifier")
    tr.add_argument("--np", type=int, default=1, help="preprocessing processes")
    tr.add_argument("--no-preprocess", action="store_true", help="write the plans only")
    tr.add_argument("--overwrite", action="store_true", help="replace plans transferred from another source")
    tr.set_defaults(func=_plans_transfer)


def _model_arguments(p: argparse.ArgumentParser, output: str, configuration: str, trainer: str, folds: str) -> None:
    """nnUNetv2_predict's options for input, output and the trained model, and --modalities."""
    p.add_argument("-i", required=True, help="input folder (nnU-Net naming: CASE_0000.nii.gz, ...)")
    p.add_argument("-o", required=True, help=output)
    p.add_argument("-d", required=True, help="dataset the model was trained on (id or name)")
    p.add_argument("-c", required=True, help=f"configuration, e.g. {configuration}")
    p.add_argument("-tr", required=True, help=f"trainer, e.g. {trainer}")
    p.add_argument("-f", nargs="+", default=["0"], help=folds)
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-chk", default="checkpoint_final.pth")
    p.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"))
    p.add_argument("--modalities", nargs="+", default=None, type=str.upper,
                   help="modalities of the input channels in order, e.g. PET or CT PET (default: as trained)")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="nnUNetv2_predict with a choice of input modalities and crop restoration",
                       description="Predict with a trained model. --modalities says which modalities the input "
                                   "files hold (file _0000 is the first); a PEMMA model takes any subset of CT, "
                                   "PET. --crop-records puts masks back into the original CT grid.")
    _model_arguments(p, output="output folder", configuration="3d_unetr", trainer="PEMMATrainer", folds="folds")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring at test time")
    p.add_argument("-np", type=int, default=3,
                   help="preprocessing and export worker processes (0: all in this process, quicker for few cases)")
    p.add_argument("--missing-modality", choices=("zero", "drop"), default=None,
                   help="how a PEMMA model fills an absent modality (default: as trained; the paper: zero)")
    p.add_argument("--crop-records", default=None,
                   help="pemma_crops.json (or the converted raw dataset folder holding it) of the input cases")
    p.add_argument("--overwrite", action="store_true", help="replace predictions already in the output folder")
    p.set_defaults(func=_predict)


def _add_predict_risk(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict-risk", help="relapse risk of each case from a prognosis model, as a CSV",
                       description="Score every case of a folder with a prognosis model (log relative hazard, "
                                   "higher = earlier relapse): CSV columns case, risk, modalities, clinical. "
                                   "--modalities picks the input modalities as for `pemma predict`.")
    _model_arguments(p, output="output CSV", configuration="3d_unetr_prognosis", trainer="PEMMAClinicalTrainer",
                     folds="folds (their risks are averaged)")
    p.add_argument("--outcomes", default=None,
                   help="outcomes.json (or the raw dataset folder holding it) with the cases' clinical rows, for "
                        "models that take clinical data (default: the model's dataset's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output CSV")
    p.set_defaults(func=_predict_risk)


def _add_predict_late_fusion(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict-late-fusion", help="late-fusion baseline: CT model and PET model, softmax averaged",
                       description="M_CP = w_C * M_C + (1 - w_C) * M_P (PEMMA paper, eq. 1); with one modality the "
                                   "available model alone.")
    p.add_argument("-i", required=True, help="input folder (CASE_0000.nii.gz, ... in the order of --modalities)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("--modalities", nargs="+", required=True, type=str.upper, help="e.g. CT PET, CT or PET")
    model = ("DATASET", "TRAINER", "CONFIGURATION")
    p.add_argument("--ct-model", nargs=3, metavar=model, help="the CT model, e.g. 501 UNETRTrainer 3d_unetr")
    p.add_argument("--pet-model", nargs=3, metavar=model, help="the PET model, e.g. 505 UNETRTrainer 3d_unetr")
    p.add_argument("--w-ct", type=float, default=0.5, help="weight w_C of the CT model (default 0.5)")
    p.add_argument("-f", nargs="+", default=["0"], help="folds of both models")
    p.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"))
    p.add_argument("--disable_tta", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace predictions already in the output folder")
    p.set_defaults(func=_predict_late_fusion)


def _add_apply_adapter(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apply-adapter", help="CT checkpoint + adapter (safetensors) -> full nnU-Net model folder")
    p.add_argument("--base", required=True, help="checkpoint_final.pth of the CT UNETR")
    p.add_argument("--adapter", required=True, help="adapter_final.safetensors written next to a PEMMA checkpoint")
    p.add_argument("--experts", nargs="+", default=[], metavar="FILE",
                   help="expert files (experts/<centre>.safetensors) of a centre-routed mixture of adapters to add")
    p.add_argument("--out", required=True, help="model folder to write (plans.json, dataset.json, fold_F/)")
    p.add_argument("--fold", default=0, type=lambda f: f if f == "all" else int(f))
    p.add_argument("--force", action="store_true",
                   help="apply the adapter although --base is not the CT base it was trained on (a warning)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder as a whole")
    p.set_defaults(func=_apply_adapter)


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    from nnunetv2_pemma.experiments.adapter_rows import ADAPTER_METHODS

    p = sub.add_parser("reproduce", help="the PEMMA paper's protocol (Table 1 split, Table 2 matrix), resumable",
                       description="CT base -> MDA adaptation -> HGJ and HMR updates (C and CP) for PEMMA, early "
                                   "and late fusion through nnU-Net's commands; CP/C/P inference on each stage's "
                                   "validation cases; Table 2 as Markdown, CSV and PNG. A finished job is not redone.")
    _add_job_graph_options(p)
    p.add_argument("--prognosis", action="store_true",
                   help="the extended paper's prognosis table instead (C, CP, CPT; PEMMA LoRA/DoRA vs early fusion; "
                        "C-index on fold 0's validation cases of all training centres)")
    p.add_argument("--preset", default=None,
                   help="demo (default; CPU; its from-scratch models use demo_base) or paper; with --prognosis: "
                        "prognosis (default)")
    p.add_argument("--out", required=True, help="output folder (holds its own nnU-Net folders)")
    p.add_argument("--cases-per-center", type=int, default=None,
                   help="phantom cases per centre (default 30: 6 fold-0 validation cases per stage; with "
                        "--prognosis 40: 56 validation cases)")
    p.add_argument("--scope", choices=("full", "demo"), default="full",
                   help="full: both new centres, each trained with C and with CP; demo: the adaptation stage and "
                        "new dataset 1's CT-only update")
    p.add_argument("--adapter-methods", nargs="*", choices=sorted(ADAPTER_METHODS), default=[],
                   metavar="METHOD",
                   help=f"also PEMMA with these adaptation methods ({', '.join(sorted(ADAPTER_METHODS))}), as extra "
                        f"Table 2 rows trained at every stage (segmentation protocol only)")
    p.set_defaults(func=_reproduce)


def _env(args: argparse.Namespace) -> None:
    from nnunetv2_pemma.environment import export_lines

    print(export_lines(Path(args.root)))


def _add_env(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="print the exports nnU-Net needs: its folders under ROOT and this package's "
                                   "trainers (eval \"$(pemma env --root ROOT)\")",
                       description="Prints nnUNet_raw, nnUNet_preprocessed and nnUNet_results under ROOT, and "
                                   "nnUNet_extTrainer pointing at the installed trainers (kept in front of any "
                                   "folders it already lists). Use: eval \"$(pemma env --root nnUNet_data)\"")
    p.add_argument("--root", default="nnUNet_data", help="folder for nnU-Net's raw, preprocessed and results data")
    p.set_defaults(func=_env)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="main job: `pemma reproduce --phantom --preset demo --scope demo` on 2 CPU "
                                    "cores (about 15 minutes)",
                       description="The paper's protocol on built-in phantom data with the demo presets, on CPU: the "
                                   "CT base, the adaptation to CT+PET and one CT-only update on a new centre. "
                                   "Resumable; ends with Table 2 and a line per claim on screen.")
    p.add_argument("--out", default="pemma_demo", help="output folder")
    p.add_argument("--cases-per-center", type=int, default=30)
    p.add_argument("--labelled-test-cases-per-center", type=int, default=20,
                   help="labelled test cases per centre, in no split: the cases of each Table 2 cell")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the phantom and every training (PEMMA_SEED): the same seed on the same "
                        "machine gives the same tables")
    p.set_defaults(func=_demo)


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_demo, _add_env, _add_reproduce, _add_compare, _add_phantom, _add_convert, _add_check_alignment, _add_plans,
    _add_predict,
    _add_predict_risk, _add_predict_late_fusion, _add_apply_adapter, _add_evaluate, _add_evaluate_survival,
    _add_parameters)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pemma", description="Parameter-efficient multi-modal adaptation for "
                                                               "nnU-Net v2 (PEMMA).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _one_line_warnings(command: str) -> None:
    """Show PemmaWarnings as `pemma COMMAND: warning: ...` (no source line); other warnings as Python shows them."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, PemmaWarning):
            print(f"pemma {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", PemmaWarning)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _one_line_warnings(args.command)
    try:
        args.func(args)
    except PemmaError as e:
        print(f"pemma {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
