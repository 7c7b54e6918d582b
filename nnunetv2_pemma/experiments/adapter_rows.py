"""PEMMA rows with adaptation methods besides LoRA in `pemma reproduce --adapter-methods` (a module without imports:
the command line reads it to list the choices)."""

ADAPTER_METHODS: dict[str, tuple[str, str, str]] = {
    "dora": ("PEMMA-DoRA", "PEMMADoRATrainer", "PEMMADoRAContinualTrainer"),
    "prior": ("PEMMA-priors", "PEMMAPriorTrainer", "PEMMAPriorContinualTrainer"),
    "moa": ("PEMMA-MoA", "PEMMAMoATrainer", "PEMMAMoAContinualTrainer"),
    # PEMMA's own adaptation; its updates also adapt the CT input skip (adaptation.input_skip_adapter)
    "input_skip": ("PEMMA-input-skip", "PEMMATrainer", "PEMMAContinualTrainer_inputSkip"),
}
"""Method name -> its Table 2 row name, adaptation trainer and continual trainer."""
