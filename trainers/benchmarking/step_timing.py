"""The measured trainers, unchanged, with a random batch in place of nnU-Net's data loader.

nnU-Net's own pattern (nnUNetTrainerBenchmark_5epochs_noDataLoading), with two differences: these also run on
CPU, and the caller drives single steps (benchmarks/speed_memory.py interleaves the steps of several trainers),
so each step is nnU-Net's ``train_step`` as the trainer defines it: forward, the loss of ``_build_loss``,
backward, gradient clipping, optimiser step, autocast and GradScaler on CUDA.
"""

from __future__ import annotations

from pathlib import Path

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.run.run_training import maybe_load_checkpoint
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

from nnunetv2_pemma.trainers.adaptation.context_priors import PEMMAPriorTokensTrainer, PEMMAPriorTrainer
from nnunetv2_pemma.trainers.adaptation.mixture_of_adapters import PEMMAMoATrainer
from nnunetv2_pemma.trainers.adaptation.pemma import PEMMAContinualTrainer, PEMMADoRATrainer, PEMMATrainer
from nnunetv2_pemma.networks.build import nnunet_unet
from nnunetv2_pemma.trainers.adaptation.pemma_cnn import PEMMACNNTrainer
from nnunetv2_pemma.trainers.baselines.early_fusion import EarlyFusionTrainer
from nnunetv2_pemma.trainers.baselines.early_fusion_cnn import EarlyFusionCNNTrainer
from nnunetv2_pemma.trainers.network_architecture.h2aseg import H2ASegTrainer
from nnunetv2_pemma.trainers.network_architecture.nnunet_unet import nnUNetChannelDropoutTrainer, nnUNetPresetTrainer
from nnunetv2_pemma.trainers.network_architecture.slice_interaction import SliceInteractionTrainer
from nnunetv2_pemma.trainers.network_architecture.transformers import UNETRTrainer

Batch = dict[str, torch.Tensor | list[torch.Tensor]]


class StepTiming:
    """Mixin for an nnU-Net trainer: started as `nnUNetv2_train` starts it, then stepped on one random batch."""

    batch: Batch

    @classmethod
    def started(cls, dataset: str | int, configuration: str, device: str,
                pretrained_weights: str | Path | None = None, plans_identifier: str = "nnUNetPlans",
                seed: int = 0) -> "StepTiming":
        """A trainer at its first training step, reached by `nnUNetv2_train`'s path: plans and dataset.json from
        nnUNet_preprocessed, `-pretrained_weights` loaded (``load_start``), ``on_train_start`` (where the
        adapting trainers freeze their network) and the first epoch's start hooks."""
        folder = Path(nnUNet_preprocessed.require()) / maybe_convert_to_dataset_name(dataset)
        plans = load_json(str(folder / f"{plans_identifier}.json"))
        plans["continue_training"] = False  # what get_trainer_from_args adds; the trainer pops it
        trainer = cls(plans, configuration, 0, load_json(str(folder / "dataset.json")), torch.device(device))
        if pretrained_weights is not None:
            trainer.load_start(Path(pretrained_weights))
        trainer.on_train_start()
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        trainer.batch = trainer.random_batch(seed)
        return trainer

    def load_start(self, pretrained_weights: Path) -> None:
        """`-pretrained_weights`: nnU-Net's own ``maybe_load_checkpoint``."""
        maybe_load_checkpoint(self, False, False, str(pretrained_weights))

    def get_dataloaders(self):
        """No data loading: the steps run on ``self.batch``."""
        return None, None

    def random_batch(self, seed: int = 0) -> Batch:
        """Normal-distributed input and uniform labels at the configuration's batch and patch size, on the
        trainer's device; with deep supervision one label map per output, as nnU-Net's data loader delivers."""
        generator = torch.Generator().manual_seed(seed)
        patch = [int(p) for p in self.configuration_manager.patch_size]
        labels = self.label_manager.all_labels

        def label_map(scale: list[float]) -> torch.Tensor:
            shape = (self.batch_size, 1, *[round(p * s) for p, s in zip(patch, scale)])
            return torch.randint(min(labels), max(labels) + 1, shape, generator=generator).float().to(self.device)

        data = torch.randn((self.batch_size, self.num_input_channels, *patch), generator=generator).to(self.device)
        cases = sorted(infer_dataset_class(self.preprocessed_dataset_folder).get_identifiers(
            self.preprocessed_dataset_folder))
        keys = [cases[i % len(cases)] for i in range(self.batch_size)]  # the case ids nnU-Net's loader delivers
        if self.enable_deep_supervision:
            return {"data": data, "target": [label_map(s) for s in self._get_deep_supervision_scales()], "keys": keys}
        return {"data": data, "target": label_map([1.0] * len(patch)), "keys": keys}

    def timed_step(self) -> dict:
        """One training step on ``self.batch``: the trainer's own ``train_step``."""
        return self.train_step(self.batch)


class FromCTBase(StepTiming):
    """Mixin for an adapting trainer whose start is a CT base checkpoint (PEMMA, early fusion).

    The trainers recognise a CT base only on `nnUNetv2_train`'s command line; in-process this does what they
    do with it: the CT UNETR rebuilt by UNETRTrainer from this configuration, loaded by nnU-Net's
    ``load_pretrained_weights``, converted to this trainer's network (``convert``), frozen, a new optimiser
    (``_adapt``).
    """

    def load_start(self, pretrained_weights: Path) -> None:
        if not self.was_initialized:
            self.initialize()
        ct_base = UNETRTrainer.build_network_architecture(self.plans_manager, self.configuration_manager, 1,
                                                          self.label_manager.num_segmentation_heads, False)
        load_pretrained_weights(ct_base, str(pretrained_weights))
        self.network = self.convert(ct_base.to(self.device))
        self._adapt()


class FromCNNBase(StepTiming):
    """Mixin for an adapting trainer whose start is a CT model of nnU-Net's U-Net (PEMMA and early fusion on the
    CNN): in-process what `nnUNetv2_train -pretrained_weights` does with it, the whole file loaded into nnU-Net's
    one-channel U-Net of this configuration, converted, frozen, a new optimiser."""

    def load_start(self, pretrained_weights: Path) -> None:
        if not self.was_initialized:
            self.initialize()
        self._pretrained = str(pretrained_weights)
        ct_base = nnunet_unet(self.configuration_manager, 1, self.label_manager.num_segmentation_heads,
                              self.enable_deep_supervision)
        self.start_from(ct_base, str(pretrained_weights))
        self.network = self.convert(ct_base.to(self.device))
        self._adapt()


class UNETRTrainer_stepTiming(StepTiming, UNETRTrainer):
    """The CT UNETR (CT base): everything trains."""


class PEMMATrainer_stepTiming(FromCTBase, PEMMATrainer):
    """PEMMA adaptation from a CT base (`pretrained_weights`): PET modules and LoRA train, the CT base is frozen."""


class PEMMADoRATrainer_stepTiming(FromCTBase, PEMMADoRATrainer):
    """PEMMA adaptation with DoRA in place of LoRA."""


class PEMMAPriorTrainer_stepTiming(FromCTBase, PEMMAPriorTrainer):
    """PEMMA adaptation with context priors entering through Hermes-style two-way fusion, and LoRA."""


class PEMMAPriorTokensTrainer_stepTiming(FromCTBase, PEMMAPriorTokensTrainer):
    """PEMMA adaptation with context priors entering as tokens at every block, and LoRA."""


class PEMMAMoATrainer_stepTiming(FromCTBase, PEMMAMoATrainer):
    """PEMMA adaptation with a mixture of LoRA experts, one per centre of the dataset."""


class PEMMAContinualTrainer_stepTiming(StepTiming, PEMMAContinualTrainer):
    """PEMMA continual update from a PEMMA checkpoint (`pretrained_weights`): only LoRA trains."""


class EarlyFusionTrainer_stepTiming(FromCTBase, EarlyFusionTrainer):
    """Early fusion from a CT base (`pretrained_weights`): input layers widened to CT+PET, everything trains."""


class nnUNetTrainer_stepTiming(StepTiming, nnUNetTrainer):
    """nnU-Net's own trainer and U-Net (a 3d_fullres configuration): deep supervision, SGD."""


class nnUNetPresetTrainer_stepTiming(StepTiming, nnUNetPresetTrainer):
    """nnU-Net's U-Net under a preset (the CT base of the CNN forms): everything trains."""


class nnUNetChannelDropoutTrainer_stepTiming(StepTiming, nnUNetChannelDropoutTrainer):
    """nnU-Net's U-Net from scratch on CT+PET with channel dropout."""


class PEMMACNNTrainer_stepTiming(FromCNNBase, PEMMACNNTrainer):
    """PEMMA on nnU-Net's U-Net from its CT base: the PET slot and the conv adapters train."""


class EarlyFusionCNNTrainer_stepTiming(FromCNNBase, EarlyFusionCNNTrainer):
    """Early fusion on nnU-Net's U-Net from its CT base: first convolution widened, everything trains."""


class H2ASegTrainer_stepTiming(StepTiming, H2ASegTrainer):
    """H2ASeg from scratch on CT+PET: deep supervision at every level with the paper's weights, Adam."""


class SliceInteractionTrainer_stepTiming(StepTiming, SliceInteractionTrainer):
    """The 2.5D network from scratch: one batch of slice patches with k neighbouring slices of each modality."""

    def random_batch(self, seed: int = 0) -> Batch:
        """As nnU-Net's loader delivers it through the stacked-slice datasets: k channels per dataset channel."""
        batch = super().random_batch(seed)
        batch["data"] = batch["data"].repeat_interleave(self.pemma.model.slices, dim=1)
        return batch
