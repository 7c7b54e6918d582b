"""PEMMA: CT base -> CT+PET adaptation (LoRA or DoRA, PET tokens and skip), then adapter-only updates."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from nnunetv2_pemma.adaptation.files import ADAPTER_FILE, save_adapter
from nnunetv2_pemma.adaptation.methods import Stage, train_only
from nnunetv2_pemma.config import PemmaBlock
from nnunetv2_pemma.networks.build import build_pemma_network
from nnunetv2_pemma.trainers.adaptation.adapting import AdaptingTrainer, unwrap


class PEMMATrainer(AdaptingTrainer):
    """CT network -> CT+PET: PET tokens, a PET input skip and LoRA on Q/V train; the CT base stays frozen.

    Start it with `-pretrained_weights <UNETRTrainer checkpoint_final.pth>`. Next to checkpoint_final.pth it
    writes the trained weights alone (adapter_final.safetensors).
    """

    stage: Stage = "adaptation"

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_pemma_network(PemmaBlock.of(configuration_manager), num_output_channels,
                                   configuration_manager.patch_size)

    def convert(self, ct_base: nn.Module) -> nn.Module:
        adapted = self._adapted_network()
        adapted.load_base_state_dict(ct_base.state_dict())
        return adapted

    def freeze(self, network: nn.Module) -> None:
        train_only(network, self.stage)

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0:
            save_adapter(unwrap(self.network).state_dict(), Path(self.output_folder) / ADAPTER_FILE,
                         trainer_name=type(self).__name__, configuration=self.configuration_name,
                         plans=self.plans_manager.plans, dataset_json=self.dataset_json,
                         mirroring_axes=self.inference_allowed_mirroring_axes)


class PEMMAContinualTrainer(PEMMATrainer):
    """Updates a PEMMA model on a dataset with both or only one modality: only the LoRA matrices train.

    Start it with `-pretrained_weights <PEMMATrainer checkpoint_final.pth>`; a missing modality is zero.
    """

    stage: Stage = "continual"

    def expected_checkpoint(self, path: str) -> str:
        return "pemma"


class PEMMADoRATrainer(PEMMATrainer):
    """PEMMA with DoRA (weight-decomposed low-rank adaptation) on Q and V instead of LoRA."""

    adaptation_overrides = {"method": "dora"}


class PEMMADoRAContinualTrainer(PEMMAContinualTrainer):
    """Continual update of a PEMMA-DoRA model: only the DoRA matrices and magnitudes train."""

    adaptation_overrides = {"method": "dora"}


class PEMMASwinTrainer(PEMMATrainer):
    """PEMMA on SwinUNETR: a PET patch embedding fused with CT's by a 1x1x1 convolution before the Swin stages,
    a PET input skip and LoRA/DoRA (the preset's adaptation.method) on every window attention's qkv."""

    architecture = "SwinUNETR"


class PEMMASwinContinualTrainer(PEMMAContinualTrainer):
    """Continual update of a PEMMA SwinUNETR: only the LoRA/DoRA parameters train."""

    architecture = "SwinUNETR"
