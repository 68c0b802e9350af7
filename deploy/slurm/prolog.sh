#!/bin/bash
# Slurm job prolog: record which GPUs this job holds, in the HPC job-mapping directory that
# DCGM exporter reads (--hpc-job-mapping-dir / DCGM_HPC_JOB_MAPPING_DIR) and stallscope's
# tracer reads too (STALLSCOPE_JOB_MAPPING_DIR), so both name the same job for a GPU.
#
# Layout: one file per GPU, named by its index, holding the ids of the jobs on that GPU, one
# per line (a GPU shared by several jobs lists each). epilog.sh removes the job again.
#
# slurm.conf:  Prolog=/etc/slurm/stallscope-prolog.sh
#              Epilog=/etc/slurm/stallscope-epilog.sh
#              PrologFlags=Alloc      # map at allocation time, before any step (salloc)
# GPUs come from SLURM_JOB_GPUS (the job's GPU indexes, set for the job prolog), else
# SLURM_STEP_GPUS, CUDA_VISIBLE_DEVICES, GPU_DEVICE_ORDINAL. Entries may be indexes, ranges
# (4-7) or GPU UUIDs (resolved to indexes with nvidia-smi).
#
# Never fails the job: a prolog that exits non-zero drains the node, so every problem is
# one line on stderr (slurmd's log) and the exit status is 0.
set -u

JOB="${SLURM_JOB_ID:-}"
DIR="${STALLSCOPE_JOB_MAPPING_DIR:-${DCGM_HPC_JOB_MAPPING_DIR:-/var/lib/dcgm-exporter/job-mapping}}"
say() { echo "stallscope prolog: job ${JOB:-?}: $*" >&2; }

case "$JOB" in
    ''|*[!0-9]*) say "SLURM_JOB_ID '${JOB}' is not a job id; nothing mapped"; exit 0 ;;
esac
GPUS="${SLURM_JOB_GPUS:-${SLURM_STEP_GPUS:-${CUDA_VISIBLE_DEVICES:-${GPU_DEVICE_ORDINAL:-}}}}"
[ -n "$GPUS" ] || exit 0                    # a job without GPUs: nothing to map

if ! mkdir -p "$DIR" 2>/dev/null; then
    say "cannot create $DIR; nothing mapped"
    exit 0
fi
chmod 0755 "$DIR" 2>/dev/null

# index of a GPU UUID, from nvidia-smi (only asked when an entry is a UUID)
uuid_index() {
    command -v nvidia-smi >/dev/null 2>&1 || return 1
    nvidia-smi --query-gpu=index,uuid --format=csv,noheader 2>/dev/null |
        awk -F', *' -v u="$1" '$2 == u { print $1; found = 1 } END { exit !found }'
}

indexes=()
IFS=',' read -r -a entries <<< "$GPUS"
for e in "${entries[@]}"; do
    e="${e// /}"
    if [[ "$e" =~ ^[0-9]+$ ]]; then
        indexes+=("$e")
    elif [[ "$e" =~ ^([0-9]+)-([0-9]+)$ ]]; then
        for ((i = BASH_REMATCH[1]; i <= BASH_REMATCH[2]; i++)); do indexes+=("$i"); done
    elif [[ "$e" == GPU-* ]] && idx=$(uuid_index "$e"); then
        indexes+=("$idx")
    elif [ -n "$e" ]; then
        say "GPU entry '$e' is not an index, a range or a known GPU UUID; skipped"
    fi
done

# one writer at a time (jobs may share a GPU): an exclusive lock on the directory itself,
# so the directory holds nothing but mapping files
exec 9<"$DIR"
flock -w 10 9 || say "no lock on $DIR after 10 s; writing anyway"
for idx in "${indexes[@]}"; do
    f="$DIR/$idx"
    tmp="$DIR/.$idx.$$"
    {
        [ -f "$f" ] && grep -vxF -e "$JOB" -e 0 -e '' "$f"
        echo "$JOB"
    } > "$tmp" && chmod 0644 "$tmp" && mv -f "$tmp" "$f" || { rm -f "$tmp"; say "cannot write $f"; }
done
exit 0
