"""PEMMA on nnU-Net's own U-Nets: CT model -> CT+PET (a PET slot and conv adapters), then adapter-only updates."""

from __future__ import annotations

from typing import Any

from torch import nn

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from nnunetv2_pemma.adaptation.methods import added_by
from nnunetv2_pemma.config import PemmaBlock

from nnunetv2_pemma.networks.build import build_pemma_unet, nnunet_unet
from nnunetv2_pemma.trainers.adaptation.pemma import PEMMAContinualTrainer, PEMMATrainer
from nnunetv2_pemma.trainers.network_architecture.nnunet_unet import NNUNetNetwork
from nnunetv2_pemma.training.checkpoints import check_unet_checkpoint, load_checkpoint_file


class WholeCheckpoint:
    """Mixin for trainers that adapt an nnU-Net U-Net and keep all of it: nnU-Net's `-pretrained_weights` leaves
    the segmentation heads out (fine-tuning trains new ones), so they are loaded from the file too, before the
    base is fingerprinted and converted."""

    def start_from(self, loaded: nn.Module, path: str) -> None:
        loaded.load_state_dict(load_checkpoint_file(path)["network_weights"])
        super().start_from(loaded, path)


class PEMMACNNTrainer(WholeCheckpoint, NNUNetNetwork, PEMMATrainer):
    """nnU-Net CT model -> CT+PET on nnU-Net's U-Net (PlainConvUNet, ResidualEncoderUNet): a PET slot beside the
    input stage and conv LoRA (and, with ``adaptation.train_norms``, norm shifts) train; the CT model stays frozen.

    Start it with `-pretrained_weights <any nnU-Net CT model's checkpoint_final.pth>` after `pemma plans transfer
    CT_DATASET THIS_DATASET --preset <an nnUNet preset>`: the base must hold this configuration's network,
    spacing and CT normalisation. It writes adapter_final.safetensors as PEMMATrainer does.
    """

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build_pemma_unet(configuration_manager, num_output_channels, enable_deep_supervision)

    @classmethod
    def check_pretrained(cls, path: str, expect: str, block: PemmaBlock, plans_manager: PlansManager,
                         configuration_manager: ConfigurationManager) -> dict[str, Any]:
        return check_unet_checkpoint(path, plans_manager.plans, configuration_manager, expect=expect)

    def network_to_load(self, expect: str) -> nn.Module | None:
        """The plain one-channel U-Net of this configuration, which the CT checkpoint loads into."""
        return nnunet_unet(self.configuration_manager, 1, self.label_manager.num_segmentation_heads,
                           self.enable_deep_supervision)


class PEMMACNNContinualTrainer(WholeCheckpoint, NNUNetNetwork, PEMMAContinualTrainer):
    """Updates a PEMMA CNN model on a dataset with both or only one modality: only the conv adapters (and norm
    shifts, when the model has them) train; the CT model and the PET slot stay bit-identical. With
    ``adaptation.ct_only_adapters`` (the ``unet*`` presets), an update on CT alone trains the CT-only pair and
    leaves every CT+PET and PET output bit-identical; an update on data with PET trains the PET pair.

    Start it with `-pretrained_weights <PEMMACNNTrainer checkpoint_final.pth>`; an absent modality's slot is left
    out."""

    build_network_architecture = staticmethod(PEMMACNNTrainer.build_network_architecture)

    @classmethod
    def check_pretrained(cls, path: str, expect: str, block: PemmaBlock, plans_manager: PlansManager,
                         configuration_manager: ConfigurationManager) -> dict[str, Any]:
        return check_unet_checkpoint(path, plans_manager.plans, configuration_manager, expect=expect)

    def network_to_load(self, expect: str) -> nn.Module | None:
        return None

    def freeze(self, network: nn.Module) -> None:
        trained = network.trained_in_update()
        for name, parameter in network.named_parameters():
            parameter.requires_grad_(added_by(name) in trained)
