#!/usr/bin/env bash
# One prepared device check: training-step time and peak memory of every method (benchmarks/speed_memory.py,
# nnU-Net's AMP on CUDA), a short CT-base and PEMMA training through nnU-Net's commands, and PEMMA's predictions
# from CT+PET, CT and PET, each timed; one Markdown results file naming the device, and a JSON file beside it.
#
#   bash benchmarks/gpu_check.sh [--device cuda|cpu] [--preset paper|tiny] [--out DIR] [--setups A,B,...]
#                                [--budget SECONDS]
#
# --setups: speed_memory's setups, comma-separated (default: all); --budget: the whole run's time, after which
# the stages left are skipped and the report is written (default: 480 on cuda, none on cpu).
#
# Order (logs in OUT/logs/, each stage's start, end and exit code in OUT/timings.tsv):
#   1. CPU, side by side: speed_memory.py --prepare-only (its one-case nnU-Net folders, in the background) and this
#      check's data with the README's commands: `pemma phantom` (2 cases per centre, 1 held-out test case per
#      test centre; paper: --size hecktor, 124x198x198 voxels after preprocessing, so the 96^3 patch fits; tiny:
#      --size small, ~48 voxels a side, padded to the 32^3 patch where shorter), `pemma convert-hecktor` (CT
#      base: CHUM CHUP CHUS CHUV, CT; adaptation: MDA, CT PET), `nnUNetv2_plan_and_preprocess`, `pemma plans
#      add/transfer` of a copy of the preset with a 10-iteration schedule (5 per epoch, 1 validation iteration;
#      OUT/<preset>_short.json);
#   2. device: `nnUNetv2_train` of the CT base (UNETRTrainer, fold 0: 6 of 8 cases) and of PEMMA (PEMMATrainer
#      -pretrained_weights the base's checkpoint_final.pth, fold `all`: MDA has 2 cases), then on MDA's held-out
#      case `nnUNetv2_predict` (CT+PET), `pemma predict --modalities CT` and `--modalities PET`;
#   3. device, alone: speed_memory.py measures in the folders of 1. (every setup: step time and peak memory,
#      inference per 192^3 case);
#   4. benchmarks/gpu_check_report.py writes OUT/gpu_check.md and OUT/gpu_check.json.
# A failed stage skips only the stages that need it; the report is written in any case. Exit code: 0, 1 when a
# stage failed or was skipped, 2 for bad options.
#
# Time. Measured on 2 shared AMD EPYC cores under a concurrent test suite (load ~5), so upper bounds for the CPU
# parts:
#   - tiny preset, this script as tests/test_gpu_check.py runs it (2 speed_memory setups, the small phantom;
#     2026-12-07): ~290 s; stage 1 121 s (data 107 s beside speed_memory's folders), trainings 32 and 19 s,
#     predictions 25-28 s, speed_memory 39 s (the demo-size phantom took 541 s: validation of 2 cases ~47 s);
#     2026-12-08, the commands forked from the test suite's warm process (no imports) and the CPU predictions
#     without worker processes, on an idle machine: ~85 s; stage 1 37 s, trainings 8 s each, predictions 2.4-3.2 s,
#     speed_memory 27 s;
#   - paper preset, the CPU-only stage 1: speed_memory's folders (all setups) 329 s (266 CPU s), this check's
#     hecktor-size data 204 s (phantom 71, planning 64, plans transfer 48); mostly process start-up: importing
#     torch and nnU-Net took 6.6 s a process here (~2-3 s on an idle core), ~25 processes;
#   - FLOPs of one training step at paper (forward + backward, batch 2, torch's FlopCounterMode): UNETR-B forms
#     0.77-0.88 TFLOP at 96^3, nnU-Net's U-Net 2.5 (96^3) and 6.0 (the CNN presets' 128^3), H2ASeg 1.3, 2.5D
#     0.39; 28 TFLOP a round of the 14 setups, 68x the tiny preset's round (27-180x per setup), whose steps
#     (4-94 GFLOP) took 80-1,550 ms on one CPU thread (7-90 GFLOP/s).
# Estimate for one H100 host (16 cores), ~7-7.5 min in all:
#   - stage 1 ~2 min (process start-ups ~2-3 s, the phantom ~35 s, planning with 4 processes ~30 s);
#   - a training step at an assumed effective 30-100 TFLOP/s with fp16 autocast (3D convolutions with 16-32
#     channels and instance norms stay far below the ~990 TFLOP/s peak): ~10-30 ms for UNETR-B, 60-200 ms for the
#     U-Net at 128^3, 0.3-1 s a round of the 14 setups;
#   - stage 2 ~3 min: a training ~1 min (start-up, 10 steps ~2 s, 2 checkpoints of ~1.1 GB, validation of 2
#     124x198x198 cases with 8x mirroring: 256 windows of 96^3 at 0.15-0.2 TFLOP, 5-10 s a case with export), a
#     prediction ~20 s;
#   - stage 3 ~2-2.5 min: 28 trainer builds (1-3 s each, measured at paper on CPU), 14 x 3 memory steps and
#     2 + 5 rounds, cudnn autotuning, 14 checkpoints (~6 GB), 7 networks x 2 passes over 192^3 (125 windows).
# --budget (480 s on cuda) caps each stage's limit so that the report is written in time; stage 2 leaves
# speed_memory 150 s of it.
set -euo pipefail

usage="usage: bash benchmarks/gpu_check.sh [--device cuda|cpu] [--preset paper|tiny] [--out DIR] [--setups A,B,...]\
 [--budget SECONDS]"
die() { echo "gpu_check.sh: error: $1 ($usage)" >&2; exit 2; }

ARGS=$* DEVICE=cuda PRESET=paper OUT=gpu_check_results SETUPS="" BUDGET=""
while (($#)); do
    case $1 in
        --device) [[ ${2:-} =~ ^(cuda|cpu)$ ]] || die "--device takes cuda or cpu"; DEVICE=$2; shift 2 ;;
        --preset) [[ ${2:-} =~ ^(paper|tiny)$ ]] || die "--preset takes paper or tiny"; PRESET=$2; shift 2 ;;
        --out) [[ -n ${2:-} ]] || die "--out takes a folder"; OUT=$2; shift 2 ;;
        --setups) [[ ${2:-} =~ ^[a-z0-9_]+(,[a-z0-9_]+)*$ ]] || die "--setups takes setup names, comma-separated"
                  SETUPS=$2; shift 2 ;;
        --budget) [[ ${2:-} =~ ^[0-9]+$ ]] || die "--budget takes seconds"; BUDGET=$2; shift 2 ;;
        -h|--help) echo "$usage"; exit 0 ;;
        *) die "unknown option '$1'" ;;
    esac
done
[[ -n $BUDGET ]] || BUDGET=$([[ $DEVICE == cuda ]] && echo 480 || echo 86400)
END=$((EPOCHSECONDS + BUDGET - 20))  # the report's 20 s
DEADLINE=$END  # of the stages started now: stage 2 leaves speed_memory its share

[[ ! -e $OUT/timings.tsv ]] || die "$OUT holds an earlier run; pick another --out"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
TIMINGS=$OUT/timings.tsv LOGS=$OUT/logs
: >"$TIMINGS"

# stage NAME LIMIT_S COMMAND...: COMMAND under a time limit (cuda: LIMIT_S; cpu: 30 min; never past DEADLINE),
# its output in logs/NAME.log, its start, end and exit code in timings.tsv (124: over the limit; -1: not started)
stage() {
    local name=$1 limit=$2 start rc=0
    shift 2
    [[ $DEVICE == cuda ]] || limit=1800
    ((limit <= DEADLINE - EPOCHSECONDS)) || limit=$((DEADLINE - EPOCHSECONDS))
    start=$EPOCHREALTIME
    if ((limit < 5)); then
        echo "[gpu_check] $name: not started, the --budget of $BUDGET s is spent (or kept for speed_memory)" |
            tee "$LOGS/$name.log" >&2
        printf '%s\t%s\t%s\t-1\n' "$name" "$start" "$EPOCHREALTIME" >>"$TIMINGS"
        return 124
    fi
    echo "[gpu_check] $name (at most $limit s)" >&2
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$start" "$EPOCHREALTIME" "$rc" >>"$TIMINGS"
    if ((rc)); then
        echo "[gpu_check] $name failed (exit $rc); last lines of $LOGS/$name.log:" >&2
        tail -n 15 "$LOGS/$name.log" >&2
    fi
    return $rc
}

# nnU-Net's folders for this check, this package's trainers, no torch.compile (minutes for 10 iterations)
eval "$(pemma env --root "$OUT/nnUNet_data")"
export nnUNet_compile=false PYTHONUNBUFFERED=1
[[ $DEVICE == cuda ]] || export nnUNet_def_n_proc=1 nnUNet_n_proc_DA=0
NP=$([[ $DEVICE == cuda ]] && echo 4 || echo 1)  # preprocessing processes
# the predictions' preprocessing and export workers: none on CPU, where each would import torch and nnU-Net again
# (~6 s) to handle one case
NPRED=$([[ $DEVICE == cuda ]] && echo 1 || echo 0)
SIZE=$([[ $PRESET == paper ]] && echo hecktor || echo small)
data=$OUT/phantom raw=$nnUNet_raw results=$nnUNet_results

# the preset with a 10-iteration schedule (same configuration name)
SHORT=$OUT/${PRESET}_short.json
python - "$PRESET" "$SHORT" <<'EOF'
import json, sys
from nnunetv2_pemma.environment import preset_folder
preset = json.loads((preset_folder() / f"{sys.argv[1]}.json").read_text())
preset["description"] = f"the {sys.argv[1]} preset with 10 iterations (benchmarks/gpu_check.sh)"
preset["schedule"].update(num_iterations=10, num_iterations_per_epoch=5, num_val_iterations_per_epoch=1)
open(sys.argv[2], "w").write(json.dumps(preset, indent=2) + "\n")
EOF
CONFIG=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["configuration"])' "$SHORT")
ok=true

# 1. CPU: speed_memory's folders in the background, this check's data meanwhile
SPEED=(python "$HERE/speed_memory.py" --preset "$PRESET" --device "$DEVICE" --workspace "$OUT/speed_memory_workspace")
[[ -z $SETUPS ]] || SPEED+=(--setups ${SETUPS//,/ })
stage speed_memory_prepare 400 "${SPEED[@]}" --prepare-only &
speed_prepare=$!
prepare_data() {
    stage phantom 150 pemma phantom "$data" --cases-per-center 2 --test-cases-per-center 1 --size "$SIZE" &&
    stage convert_ct 60 pemma convert-hecktor "$data" --dataset-id 501 --name CT --centers CHUM CHUP CHUS CHUV \
        --modalities CT &&
    # nnUNetv2_plan_and_preprocess hands nnUNet_n_proc_DA to torch.set_num_threads, which rejects 0
    stage plan_ct 180 env -u nnUNet_n_proc_DA nnUNetv2_plan_and_preprocess -d 501 -c 3d_fullres -np "$NP" -npfp "$NP" &&
    stage plans_add 60 pemma plans add 501 --preset "$SHORT" --np "$NP" &&
    stage convert_ctpet 60 pemma convert-hecktor "$data" --dataset-id 502 --name CTPET --centers MDA \
        --modalities CT PET &&
    stage plans_transfer 120 pemma plans transfer 501 502 --preset "$SHORT" --np "$NP"
}

# 2. device: the short trainings and the predictions, leaving speed_memory (item 1 of the check) 150 s of the budget
base=$results/Dataset501_CT/UNETRTrainer__nnUNetPlans__$CONFIG/fold_0/checkpoint_final.pth
predict=(-d 502 -c "$CONFIG" -tr PEMMATrainer -f all -device "$DEVICE")
inputs() {  # inputs FOLDER CHANNEL...: dataset 502's held-out MDA case, those channels renumbered from _0000
    local case i=0 c
    case=$(basename "$(ls "$raw"/Dataset502_CTPET/imagesTs/*_0000.nii.gz | head -n 1)" _0000.nii.gz)
    mkdir -p "$1"
    for c in "${@:2}"; do cp "$raw/Dataset502_CTPET/imagesTs/${case}_000$c.nii.gz" "$1/${case}_000$((i++)).nii.gz"; done
}
prepare_data && data_ok=true || data_ok=false
DEADLINE=$((END - 150))
if $data_ok &&
    stage train_ct_base 150 nnUNetv2_train 501 "$CONFIG" 0 -tr UNETRTrainer -device "$DEVICE" &&
    stage train_pemma 150 nnUNetv2_train 502 "$CONFIG" all -tr PEMMATrainer -device "$DEVICE" \
        -pretrained_weights "$base" &&
    inputs "$OUT/inputs/ctpet" 0 1 && inputs "$OUT/inputs/ct" 0 && inputs "$OUT/inputs/pet" 1; then
    stage predict_ctpet 90 nnUNetv2_predict -i "$OUT/inputs/ctpet" -o "$OUT/predictions/ctpet" "${predict[@]}" \
        -npp "$NPRED" -nps "$NPRED" || ok=false
    stage predict_ct 90 pemma predict -i "$OUT/inputs/ct" -o "$OUT/predictions/ct" "${predict[@]}" -np "$NPRED" \
        --modalities CT || ok=false
    stage predict_pet 90 pemma predict -i "$OUT/inputs/pet" -o "$OUT/predictions/pet" "${predict[@]}" -np "$NPRED" \
        --modalities PET || ok=false
else ok=false; fi

# 3. device, alone: speed and memory of every setup
DEADLINE=$END
if wait "$speed_prepare"; then
    if [[ $DEVICE == cuda ]]; then steps=(--warmup 2 --steps 5); else steps=(--warmup 1 --steps 2); fi
    stage speed_memory 240 "${SPEED[@]}" "${steps[@]}" --cases 1 --json "$OUT/speed_memory.json" \
        --markdown "$OUT/speed_memory.md" || ok=false
else ok=false; fi

# 4. the report
python "$HERE/gpu_check_report.py" --out "$OUT" --device "$DEVICE" --preset "$PRESET" --configuration "$CONFIG" \
    --command "bash benchmarks/gpu_check.sh $ARGS"
$ok || echo "gpu_check.sh: some stages failed or were skipped (see $OUT/gpu_check.md and $LOGS)" >&2
echo "$OUT/gpu_check.md"
$ok
