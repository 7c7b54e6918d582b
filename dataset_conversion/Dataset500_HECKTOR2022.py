"""HECKTOR 2022 -> nnU-Net raw Dataset500_HECKTOR2022 (CT+PET, head-and-neck crop), like nnU-Net's own
`nnunetv2/dataset_conversion/*.py` scripts.

A thin wrapper over `nnunetv2_pemma.data.hecktor.convert_hecktor` (the library behind `pemma convert-hecktor`, which
has every option): validates all cases, resamples PET onto the CT grid, crops the head and neck, and writes
$nnUNet_raw/Dataset500_HECKTOR2022 with dataset.json, pemma_crops.json and centre-stratified splits_final.json.

    python dataset_conversion/Dataset500_HECKTOR2022.py /data/hecktor2022 [-d 500] [--modalities CT PET]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnunetv2_pemma.data.hecktor import ConversionReport, convert_hecktor
from nnunetv2_pemma.errors import PemmaError


def convert(hecktor_dir: Path, dataset_id: int = 500, modalities: tuple[str, ...] = ("CT", "PET")) -> ConversionReport:
    return convert_hecktor(hecktor_dir, dataset_id=dataset_id, name="HECKTOR2022", modalities=list(modalities))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input_folder", type=Path, help="HECKTOR 2022 training folder (imagesTr/, labelsTr/)")
    parser.add_argument("-d", type=int, default=500, help="nnU-Net dataset id, default: 500")
    parser.add_argument("--modalities", nargs="+", default=["CT", "PET"], choices=("CT", "PET"))
    args = parser.parse_args()
    try:
        print(convert(args.input_folder, args.d, tuple(args.modalities)))
    except PemmaError as e:
        sys.exit(f"Dataset500_HECKTOR2022: error: {e}")
