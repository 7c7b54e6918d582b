"""HECKTOR centres and the PEMMA paper's centre split (Table 1)."""

from __future__ import annotations

TRAINING_CENTERS_2022: tuple[str, ...] = ("CHUM", "CHUP", "CHUS", "CHUV", "HGJ", "HMR", "MDA")
TEST_CENTERS_2022: tuple[str, ...] = ("USZ", "CHB", "MDA")
CENTERS_2021: tuple[str, ...] = ("CHGJ", "CHMR", "CHUM", "CHUS", "CHUP", "CHUV")
KNOWN_CENTERS: frozenset[str] = frozenset(TRAINING_CENTERS_2022 + TEST_CENTERS_2022 + CENTERS_2021)

# Paper Table 1: which centres make up each stage of the protocol.
PAPER_STAGES: dict[str, tuple[str, ...]] = {
    "pretraining": ("CHUM", "CHUP", "CHUS", "CHUV"),
    "adaptation": ("MDA",),
    "new_dataset_1": ("HGJ",),
    "new_dataset_2": ("HMR",),
}

LABELS_2022: dict[str, int] = {"background": 0, "GTVp": 1, "GTVn": 2}
LABELS_2021: dict[str, int] = {"background": 0, "GTVp": 1}


def center_of(case_id: str) -> str:
    """Centre of a HECKTOR case id: the prefix before '-' or '_' (2022, 'CHUM-001') or the leading letters (2021, 'CHGJ007')."""
    for sep in ("-", "_"):
        if sep in case_id:
            return case_id.split(sep, 1)[0]
    letters = ""
    for ch in case_id:
        if not ch.isalpha():
            break
        letters += ch
    return letters
