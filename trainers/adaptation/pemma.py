"""PEMMA: CT base -> CT+PET adaptation (LoRA or DoRA, PET tokens and skip), then adapter-only updates."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from nnunetv2_pemma.adaptation.files import ADAPTER_FILE, save_adapter
from nnunetv2_pemma.adaptation.methods import Stage, added_by, train_only
from nnunetv2_pemma.adaptation.provenance import BASE_FILE_KEY, FINGERPRINT_KEY, PEMMA_BASE_KEY, base_fingerprint
from nnunetv2_pemma.config import Adaptation, PemmaBlock
from nnunetv2_pemma.errors import CheckpointError
from nnunetv2_pemma.networks.build import build_pemma_network
from nnunetv2_pemma.trainers.adaptation.adapting import AdaptingTrainer, unwrap
from nnunetv2_pemma.training.checkpoints import checkpoint_pemma_block, load_checkpoint_file


class PEMMATrainer(AdaptingTrainer):
    """CT network -> CT+PET: PET tokens, a PET input skip and LoRA on Q/V train; the CT base stays frozen.

    Start it with `-pretrained_weights <UNETRTrainer checkpoint_final.pth>`. Next to checkpoint_final.pth it
    writes the trained weights alone (adapter_final.safetensors). Both record the CT base (its fingerprint and
    file) in `init_args["pemma_base"]` and the adapter's metadata: an adapter only makes sense on that base.
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

    def start_from(self, loaded: nn.Module, path: str) -> None:
        """Record the loaded CT base in my_init_kwargs, which nnU-Net saves as every checkpoint's init_args and
        restores on load_checkpoint (so resumed and validated runs keep it)."""
        self.my_init_kwargs[PEMMA_BASE_KEY] = {FINGERPRINT_KEY: base_fingerprint(loaded.state_dict()),
                                               BASE_FILE_KEY: str(Path(path).resolve())}

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0:
            save_adapter(unwrap(self.network).state_dict(), Path(self.output_folder) / ADAPTER_FILE,
                         trainer_name=type(self).__name__, configuration=self.configuration_name,
                         plans=self.plans_manager.plans, dataset_json=self.dataset_json,
                         mirroring_axes=self.inference_allowed_mirroring_axes,
                         base_file=self.my_init_kwargs.get(PEMMA_BASE_KEY, {}).get(BASE_FILE_KEY))


class PEMMAContinualTrainer(PEMMATrainer):
    """Updates a PEMMA model on a dataset with both or only one modality: only the LoRA matrices train (with the
    preset's `adaptation.input_skip_adapter`, also a conv LoRA on the CT input skip, added on the first update).

    Start it with `-pretrained_weights <PEMMATrainer checkpoint_final.pth>`; a missing modality is zero. Its
    checkpoint and adapter record the CT base that checkpoint records: the base stays frozen throughout.
    """

    stage: Stage = "continual"
    _loaded_input_skip_adapter = False  # whether the -pretrained_weights model holds the input-skip adapter

    @classmethod
    def expected_checkpoint(cls, path: str) -> str:
        return "pemma"

    def network_to_load(self, expect: str) -> nn.Module | None:
        """A model without the input-skip adapter this update adds: load it as it is, add the adapter in `convert`."""
        if not self.pemma.adaptation.input_skip_adapter or self._loaded_input_skip_adapter:
            return None
        without = dataclasses.replace(self.pemma.adaptation, input_skip_adapter=False)
        return build_pemma_network(dataclasses.replace(self.pemma, adaptation=without),
                                   self.label_manager.num_segmentation_heads, self.configuration_manager.patch_size)

    def convert(self, loaded: nn.Module) -> nn.Module:
        """The loaded model with a fresh input-skip adapter (B = 0: it starts as the loaded model)."""
        adapted = self._adapted_network()
        missing, unexpected = adapted.load_state_dict(loaded.state_dict(), strict=False)
        assert not unexpected and all(added_by(k) == "conv_lora_" for k in missing), (missing, unexpected)
        return adapted

    def _with_method_options_of(self, block: PemmaBlock, theirs: dict[str, Any] | None) -> PemmaBlock:
        """`block` with the network-shaping options of the model whose block is `theirs` (an input-skip adapter
        it holds stays, whatever this dataset's preset says)."""
        if theirs is None:
            return block
        their_adaptation = Adaptation.parse(theirs["adaptation"])
        adaptation = block.adaptation.with_method_options(their_adaptation)
        if their_adaptation.input_skip_adapter:
            adaptation = dataclasses.replace(adaptation, input_skip_adapter=True)
        return dataclasses.replace(block, adaptation=adaptation)

    def inherit(self, theirs: dict[str, Any]) -> PemmaBlock:
        """Also the method options of the model it updates (prior tokens, the mixture's routing and experts),
        whatever this dataset's plans say: they shape the network its weights fit. An input-skip adapter the
        model holds is kept (and trained) even if this dataset's preset does not ask for one."""
        self._loaded_input_skip_adapter = bool(theirs["adaptation"].get("input_skip_adapter", False))
        return self._with_method_options_of(super().inherit(theirs), theirs)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """A resumed (`--c`) or validated (`--val`) run takes the method options its own checkpoint records."""
        if not self.was_initialized:
            checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
                load_checkpoint_file(filename_or_checkpoint)
            self._set_pemma(self._with_method_options_of(self.pemma, checkpoint_pemma_block(checkpoint)))
        super().load_checkpoint(filename_or_checkpoint)

    def start_from(self, loaded: nn.Module, path: str) -> None:
        """Carry over the CT base record of the PEMMA checkpoint, once its base tensors are checked against it."""
        fingerprint = base_fingerprint(loaded.state_dict())
        record = load_checkpoint_file(path)["init_args"].get(PEMMA_BASE_KEY)
        if record is None:
            # written by release 0.2, which kept no record: the base is this checkpoint's own base tensors
            record = {FINGERPRINT_KEY: fingerprint, BASE_FILE_KEY: str(Path(path).resolve())}
        elif record[FINGERPRINT_KEY] != fingerprint:
            raise CheckpointError(
                f"{path}: its base tensors differ from the CT base it was adapted from ({record[BASE_FILE_KEY]}, "
                f"fingerprint {record[FINGERPRINT_KEY][:12]}...), so its adapters no longer fit them; continue from "
                f"the checkpoint PEMMATrainer wrote, or adapt that CT base again")
        self.my_init_kwargs[PEMMA_BASE_KEY] = record


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
