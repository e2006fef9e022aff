#!/bin/bash
# MoE-LLaVA's MoE-Tuning as one chain of Slurm jobs: stage 1 -> stage 2 -> upcycle ->
# stage 3, each job starting only once the previous one has succeeded (afterok).
#   slurm/moe_llava.sh [--root DIR] [--configs PREFIX] [SBATCH_OPTION ...] [-- key.sub=value ...]
#   slurm/moe_llava.sh --root /scratch/$USER/moe_llava -N 4 --time=1-00:00:00 -p gpu
# --root (default runs/moe_llava): stage<N>/checkpoints, stage<N>/tensorboard, upcycled/,
#   and the jobs' logs in logs/; each stage reads the previous one's output from there.
# --configs (default examples/configs/moe_llava/stage): ${PREFIX}1.yaml .. ${PREFIX}3.yaml
#   (examples/configs/moe_llava/tiny_stage for the tiny chain).
# SBATCH options go to every job (the upcycling job runs one task on one node); overrides
# after -- go to every training stage. Prints the job ids.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=runs/moe_llava
configs=$(dirname "$here")/examples/configs/moe_llava/stage
sbatch_args=()
overrides=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --root) root=$2; shift 2 ;;
        --configs) configs=$2; shift 2 ;;
        --) shift; overrides=("$@"); break ;;
        *) sbatch_args+=("$1"); shift ;;
    esac
done
mkdir -p "$root/logs"
root=$(cd "$root" && pwd)

if [[ -n ${MEGAMOD_VENV:-} ]]; then
    # shellcheck disable=SC1091
    source "$MEGAMOD_VENV/bin/activate"
fi
python=$(command -v python || command -v python3)

# sbatch with the common options; prints the job id.
submit() {
    local id
    id=$(sbatch --parsable "${sbatch_args[@]}" --output="$root/logs/%x-%j.out" "$@")
    echo "${id%%;*}"  # "id;cluster" on a multi-cluster setup
}

stage() {  # stage N [dependency] [overrides ...]
    local n=$1 after=$2
    shift 2
    local dependency=()
    [[ -n $after ]] && dependency=(--dependency="afterok:$after" --kill-on-invalid-dep=yes)
    submit --job-name="moe_llava-stage$n" "${dependency[@]}" "$here/train.sbatch" \
        "$configs$n.yaml" "checkpoint.save_dir=$root/stage$n/checkpoints" \
        "logging.tensorboard_dir=$root/stage$n/tensorboard" "$@" "${overrides[@]}"
}

stage1=$(stage 1 "")
stage2=$(stage 2 "$stage1" "checkpoint.load=$root/stage1/checkpoints" checkpoint.finetune=true)
# Every other FFN copied into 4 experts, as stage 3's moe section expects. A chain run
# again keeps an existing upcycled checkpoint (delete it to upcycle anew).
upcycle=$(printf '%q ' "$python" -m megamod upcycle --input "$root/stage2/checkpoints" \
    --output "$root/upcycled" --num-experts 4 --layer-freq 2)
upcycled=$(submit --job-name=moe_llava-upcycle --dependency="afterok:$stage2" \
    --kill-on-invalid-dep=yes --nodes=1 --ntasks=1 --ntasks-per-node=1 \
    --wrap="test -f $(printf %q "$root/upcycled/latest_checkpointed_iteration.txt") || $upcycle")
stage3=$(stage 3 "$upcycled" "checkpoint.load=$root/upcycled" checkpoint.finetune=true)

echo "stage 1: job $stage1"
echo "stage 2: job $stage2 (after $stage1)"
echo "upcycle: job $upcycled (after $stage2)"
echo "stage 3: job $stage3 (after $upcycled)"
echo "outputs in $root; job logs in $root/logs"
