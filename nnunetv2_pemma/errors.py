"""Errors a user can act on: the CLI prints their message and exits with code 2, without a traceback."""


class PemmaError(Exception):
    """Base class: the message names the file or case and what is wrong with it."""


class InputDataError(PemmaError):
    """Input images, labels or tables are missing, unreadable or inconsistent."""


class PlansError(PemmaError):
    """nnU-Net plans or presets are missing or incompatible."""


class CheckpointError(PemmaError):
    """A checkpoint or adapter file does not fit the network it should be loaded into."""


class PemmaWarning(UserWarning):
    """Suspicious but possible input (an all-zero PET, a constant CT): the `pemma` command prints it as one line."""


def warn(message: str) -> None:
    """Issue a PemmaWarning attributed to the caller's caller (the library function the user called)."""
    import warnings

    warnings.warn(message, PemmaWarning, stacklevel=3)
