"""What every trainer of this package does, as mixins of UNETRTrainer (the base of them all)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from batchgenerators.utilities.file_and_folder_operations import isfile, join
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from nnunetv2_pemma.errors import InputDataError, PemmaError

# what nnunetv2.run.run_training calls on a trainer; everything else (on_train_start, do_split, on_train_end, ...)
# runs inside one of these
NNUNET_ENTRY_POINTS = ("__init__", "initialize", "load_checkpoint", "run_training", "perform_actual_validation")

ERROR_PREFIX = "nnUNetv2_train: error: "
NNUNET_FOLDS = 5  # nnUNetTrainer.do_split: generate_crossval_split(..., n_splits=5)


def run_by_nnunetv2_train() -> bool:
    """Whether this process is nnU-Net's training command (its console script or `python -m`, also in DDP's
    spawned workers, which import the same main module)."""
    from nnunetv2.run.run_training import run_training_entry

    return getattr(sys.modules.get("__main__"), "run_training_entry", None) is run_training_entry


def run_by_nnunetv2_predict() -> bool:
    """Whether this process is nnU-Net's prediction command (`nnUNetv2_predict` or its model-folder form)."""
    from nnunetv2.inference import predict_from_raw_data as entry

    main = sys.modules.get("__main__")
    return any(getattr(main, name, None) is getattr(entry, name)
               for name in ("predict_entry_point", "predict_entry_point_modelfolder"))


def _one_line_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)  # keeps the signature, from which nnU-Net's __init__ records its init_args
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except PemmaError as e:
            if not run_by_nnunetv2_train():
                raise
            print(ERROR_PREFIX + str(e), file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    wrapper.one_line_errors = True
    return wrapper


class OneLineErrors:
    """A PemmaError from a trainer that nnUNetv2_train runs ends as `nnUNetv2_train: error: MESSAGE` on stderr with
    exit code 2, as errors of the `pemma` command, instead of a traceback that buries the message. nnU-Net's entry
    point cannot be changed, so the methods it calls convert the error; in any other program (tests, benchmarks)
    the PemmaError propagates. Other exceptions are bugs and keep their traceback.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in NNUNET_ENTRY_POINTS:
            method = getattr(cls, name, None)
            if method is not None and not getattr(method, "one_line_errors", False):
                setattr(cls, name, _one_line_errors(method))


class FewCasesNeedFoldAll:
    """nnU-Net's own 5-fold split fails inside scikit-learn on fewer than 5 cases ("Cannot have number of splits
    n_splits=5 greater than the number of samples"); say what to do instead. (A splits_final.json, which
    convert-hecktor writes from 5 cases on, is used as it is.)"""

    def do_split(self) -> tuple[list[str], list[str]]:
        if self.fold != "all" and not isfile(join(self.preprocessed_dataset_folder_base, "splits_final.json")):
            if self.dataset_class is None:
                self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
            cases = len(self.dataset_class.get_identifiers(self.preprocessed_dataset_folder))
            if cases < NNUNET_FOLDS:
                dataset = self.plans_manager.dataset_name
                raise InputDataError(
                    f"{dataset} has {cases} training case(s), too few for nnU-Net's {NNUNET_FOLDS}-fold "
                    f"cross-validation (and there is no splits_final.json in {self.preprocessed_dataset_folder_base}): "
                    f"train on all cases with fold `all` (nnUNetv2_train {dataset} {self.configuration_name} all "
                    f"-tr {type(self).__name__} ...) or add cases")
        return super().do_split()
