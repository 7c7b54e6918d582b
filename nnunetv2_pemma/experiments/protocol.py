"""The PEMMA paper's protocol (Table 1 split, Table 2 matrix) as a graph of nnU-Net commands, and the models it
trains, so that running them (`reproduce`) and scoring them (`scoring`) share one description.

Stages: CT base on the pre-training centres (CHUM, CHUP, CHUS, CHUV); multi-modal adaptation on MDA (CT+PET);
then new dataset 1 (HGJ) and new dataset 2 (HMR), each trained with CT alone (C) and with CT+PET (CP), each
starting from the adaptation-stage models. Methods: PEMMA, early fusion, late fusion. Every model is evaluated
with CP, C and P input on its stage's evaluation cases (labelled test cases; fold 0's validation cases where a
dataset has none), and so are the adaptation-stage models on each new centre's cases ("before the update": what
the update is measured against) and each updated model on the adaptation centre's cases (what it may have
forgotten there).

The demo scope keeps what the claims need within 15 minutes on two cores: the adaptation stage and new dataset
1's CT-only update (the forgetting test). Other adaptation methods (DoRA, context priors, a mixture of adapters)
join as further PEMMA rows, trained like PEMMA at every stage (`adapter_methods`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nnunetv2_pemma.data.centers import PAPER_STAGES
from nnunetv2_pemma.environment import NNUNET_FOLDERS, nnunet_variables
from nnunetv2_pemma.experiments.adapter_rows import ADAPTER_METHODS
from nnunetv2_pemma.errors import PemmaError
from nnunetv2_pemma.experiments.scheduler import Job, success_marker
from nnunetv2_pemma.experiments.table2 import ADAPTATION, BEFORE, updated_on
from nnunetv2_pemma.plans import load_preset, preset_names

PRETRAINING = PAPER_STAGES["pretraining"]
ADAPTATION_CENTRES = PAPER_STAGES["adaptation"]
# each new centre with the first of its dataset ids (C, CP, P datasets follow)
NEW_CENTRES = {"New dataset 1": (*PAPER_STAGES["new_dataset_1"], 510),
               "New dataset 2": (*PAPER_STAGES["new_dataset_2"], 520)}
# which new stages run, and with which training modalities
SCOPES: dict[str, dict[str, tuple[str, ...]]] = {
    "full": {"New dataset 1": ("C", "CP"), "New dataset 2": ("C", "CP")},
    "demo": {"New dataset 1": ("C",)},
    "adaptation": {},  # the adaptation stage only (`pemma compare`)
}


@dataclass(frozen=True)
class Trainers:
    """The trainers of the reproduction's forms on one backbone."""

    base: str  # the CT base, the PET model of late fusion and the CT model it fine-tunes
    pemma: str
    pemma_continual: str
    early_fusion: str  # adaptation and one-modality updates


UNETR_TRAINERS = Trainers("UNETRTrainer", "PEMMATrainer", "PEMMAContinualTrainer", "EarlyFusionTrainer")
CNN_TRAINERS = Trainers("nnUNetPresetTrainer", "PEMMACNNTrainer", "PEMMACNNContinualTrainer", "EarlyFusionCNNTrainer")
"""On nnU-Net's own U-Net (a preset of architecture "nnUNet", e.g. `--preset unet_demo`)."""


def trainers_of(preset: str) -> Trainers:
    return CNN_TRAINERS if load_preset(preset).model.architecture == "nnUNet" else UNETR_TRAINERS


@dataclass(frozen=True)
class Model:
    """One trained model of the Table 2 matrix: how to predict CP, C and P with it."""

    method: str
    stage: str
    train: str  # "CP", "C", BEFORE (the adaptation-stage model scored on a new centre) or `updated_on(...)` (an
    # updated model scored on the adaptation centre)
    dataset: int  # the trained dataset (for PEMMA/early fusion), or the CT model's (late fusion)
    trainer: str
    config: str
    pet_dataset: int | None = None  # late fusion: the PET model's dataset, configuration and trainer
    pet_config: str | None = None
    pet_trainer: str = "UNETRTrainer"


class Protocol:
    """The jobs and models of one reproduction run in OUT (nnU-Net folders under OUT/nnUNet_*)."""

    def __init__(self, out: Path, data: Path, preset: str, device: str, scope: str = "full",
                 adapter_methods: Sequence[str] = ()) -> None:
        if scope not in SCOPES:
            raise PemmaError(f"reproduce: scope {scope!r} is not one of {sorted(SCOPES)}")
        unknown = sorted(set(adapter_methods) - set(ADAPTER_METHODS))
        if unknown:
            raise PemmaError(f"reproduce: adapter methods {unknown} are not among {sorted(ADAPTER_METHODS)}")
        self.out, self.data, self.preset_name, self.device, self.scope = out, data, preset, device, scope
        self.adapter_methods = tuple(adapter_methods)
        self.trainers = trainers_of(preset)
        if self.adapter_methods and self.trainers is CNN_TRAINERS:
            raise PemmaError(f"reproduce: --adapter-methods are UNETR forms; preset {preset} is nnU-Net's U-Net")
        self.config = load_preset(preset).configuration
        # models trained from scratch (CT base, PET model) may have a longer preset of the same network
        self.base_preset = f"{preset}_base" if f"{preset}_base" in preset_names() else preset
        self.base_config = load_preset(self.base_preset).configuration
        self.jobs: dict[str, Job] = {}
        self.models: list[Model] = []
        self._names: dict[int, str] = {}
        self._build()

    # --- paths ------------------------------------------------------------------------------------------------
    def dataset_name(self, dataset_id: int) -> str:
        return self._names[dataset_id]

    def checkpoint(self, dataset_id: int, trainer: str, config: str | None = None) -> Path:
        return self.model_folder(dataset_id, trainer, config) / "fold_0" / "checkpoint_final.pth"

    def model_folder(self, dataset_id: int, trainer: str, config: str | None = None) -> Path:
        return (self.out / "nnUNet_results" / self.dataset_name(dataset_id)
                / f"{trainer}__nnUNetPlans__{config or self.config}")

    # --- job construction -------------------------------------------------------------------------------------
    def _add(self, job: Job) -> str:
        self.jobs[job.name] = job
        return job.name

    def _convert(self, dataset_id: int, name: str, centres: Sequence[str], modalities: Sequence[str],
                 after: list[str]) -> str:
        self._names[dataset_id] = f"Dataset{dataset_id:03d}_{name}"
        return self._add(Job(f"convert {dataset_id} {name}",
                             ["pemma", "convert-hecktor", str(self.data), "--dataset-id", str(dataset_id), "--name",
                              name, "--centers", *centres, "--modalities", *modalities],
                             self.out / "nnUNet_raw" / self._names[dataset_id] / "dataset.json", after))

    def _transfer(self, target: int, after: list[str]) -> str:
        return self._add(Job(f"plans transfer 501->{target}",
                             ["pemma", "plans", "transfer", "501", str(target), "--preset", self.preset_name],
                             self.out / "nnUNet_preprocessed" / self.dataset_name(target) / "splits_final.json",
                             after))

    def _train(self, dataset_id: int, trainer: str, after: list[str], pretrained: Path | None = None,
               config: str | None = None) -> str:
        config = config or self.config
        argv = ["nnUNetv2_train", str(dataset_id), config, "0", "-tr", trainer, "-device", self.device]
        if pretrained is not None:
            argv += ["-pretrained_weights", str(pretrained)]
        return self._add(Job(f"train {trainer} {config} on {dataset_id}", argv,
                             self.checkpoint(dataset_id, trainer, config), after, uses_device=True))

    def _build(self) -> None:
        pre = self.out / "nnUNet_preprocessed"
        c501 = self._convert(501, "HNC_CT_pretraining", PRETRAINING, ["CT"], [])
        plan = self._add(Job("plan and preprocess 501", ["nnUNetv2_plan_and_preprocess", "-d", "501", "-c",
                                                         "3d_fullres", "--verify_dataset_integrity", "-np", "1",
                                                         "-npfp", "1"],
                             pre / self._names[501] / "nnUNetPlans_3d_fullres", [c501]))
        add_base = self._add(Job("plans add 501 base", ["pemma", "plans", "add", "501", "--preset", self.base_preset],
                                 success_marker(self.out / "logs", "plans add 501 base"), [plan]))
        add = self._add(Job("plans add 501", ["pemma", "plans", "add", "501", "--preset", self.preset_name],
                            success_marker(self.out / "logs", "plans add 501"), [add_base]))
        t = self.trainers
        base_job = self._train(501, t.base, [add], config=self.base_config)
        base = self.checkpoint(501, t.base, self.base_config)

        cp = self._transfer(502, [self._convert(502, "HNC_CTPET_MDA", ADAPTATION_CENTRES, ["CT", "PET"], [add])])
        p = self._transfer(503, [self._convert(503, "HNC_PET_MDA", ADAPTATION_CENTRES, ["PET"], [add])])
        pemma = self._train(502, t.pemma, [cp, base_job], base)
        early = self._train(502, t.early_fusion, [cp, base_job], base)
        pet_model = self._train(503, t.base, [p], config=self.base_config)
        cfg, base_cfg = self.config, self.base_config
        adapted = [Model("Late fusion", ADAPTATION, "CP", 501, t.base, base_cfg, 503, base_cfg, t.base),
                   Model("Early fusion", ADAPTATION, "CP", 502, t.early_fusion, cfg),
                   Model("PEMMA", ADAPTATION, "CP", 502, t.pemma, cfg)]
        # PEMMA with another adaptation method: (row name, its adaptation job, its continual trainer)
        others = []
        for method in self.adapter_methods:
            name, adapting, continual = ADAPTER_METHODS[method]
            others.append((name, self._train(502, adapting, [cp, base_job], base), continual, adapting))
            adapted.append(Model(name, ADAPTATION, "CP", 502, adapting, cfg))
        self.models += adapted

        for stage, trained in SCOPES[self.scope].items():
            centre, first_id = NEW_CENTRES[stage]
            c_id, cp_id, p_id = first_id + 1, first_id + 2, first_id + 3
            # the CP dataset's raw images are the inputs every model of the stage is scored on
            convert_cp = self._convert(cp_id, f"HNC_CTPET_{centre}", [centre], ["CT", "PET"], [add])
            self.jobs[convert_cp].after.append(c501)
            self.models += [Model(m.method, stage, BEFORE, m.dataset, m.trainer, m.config, m.pet_dataset,
                                  m.pet_config, m.pet_trainer) for m in adapted]
            ready = {}
            if "C" in trained:
                ready["C"] = self._transfer(c_id, [self._convert(c_id, f"HNC_CT_{centre}", [centre], ["CT"], [add])])
            if "CP" in trained:
                ready["CP"] = self._transfer(cp_id, [convert_cp])
            for train, dataset_id in (("C", c_id), ("CP", cp_id)):
                if train not in ready:
                    continue
                self._train(dataset_id, t.pemma_continual, [ready[train], pemma],
                            self.checkpoint(502, t.pemma))
                self._train(dataset_id, t.early_fusion, [ready[train], early],
                            self.checkpoint(502, t.early_fusion))
                updated = [Model("PEMMA", stage, train, dataset_id, t.pemma_continual, cfg),
                           Model("Early fusion", stage, train, dataset_id, t.early_fusion, cfg)]
                for name, adapting_job, continual, adapting in others:
                    self._train(dataset_id, continual, [ready[train], adapting_job], self.checkpoint(502, adapting))
                    updated.append(Model(name, stage, train, dataset_id, continual, cfg))
                self._add_updated(updated)
            # late fusion: the CT model is fine-tuned on the new CT data; with CP data the PET model is too
            self._train(c_id, t.base, [ready.get("C") or self._transfer(c_id, [self._convert(
                c_id, f"HNC_CT_{centre}", [centre], ["CT"], [add])]), base_job], base)
            self._add_updated([Model("Late fusion", stage, "C", c_id, t.base, cfg, 503, base_cfg, t.base)])
            if "CP" in trained:
                pj = self._transfer(p_id, [self._convert(p_id, f"HNC_PET_{centre}", [centre], ["PET"], [add])])
                self._train(p_id, t.base, [pj, pet_model], self.checkpoint(503, t.base, base_cfg))
                self._add_updated([Model("Late fusion", stage, "CP", c_id, t.base, cfg, p_id, cfg, t.base)])

    def _add_updated(self, updated: list[Model]) -> None:
        """Models trained on a new centre: scored there, and on the adaptation centre's cases."""
        self.models += updated
        self.models += [dataclasses.replace(m, stage=ADAPTATION, train=updated_on(m.stage, m.train)) for m in updated]

    def evaluation_dataset(self, stage: str) -> int:
        """The CT+PET dataset whose fold-0 validation cases score a stage's models."""
        return 502 if stage == ADAPTATION else NEW_CENTRES[stage][1] + 2


def nnunet_environment(out: Path, device: str) -> dict[str, str]:
    """The environment of a run's jobs and its in-process inference: nnU-Net's folders under OUT (created), and
    on CPU one process where nnU-Net would start worker pools."""
    env = {**os.environ, **nnunet_variables(out)}
    for name in NNUNET_FOLDERS:
        Path(env[name]).mkdir(parents=True, exist_ok=True)
    if device == "cpu":  # nnU-Net's defaults spawn 8 export and 12 augmentation workers
        env.setdefault("nnUNet_def_n_proc", "1")
        env.setdefault("nnUNet_n_proc_DA", "0")
        env.setdefault("nnUNet_compile", "false")
    return env
