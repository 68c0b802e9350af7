#!/bin/bash
# Slurm job epilog: remove this job from the HPC job-mapping directory that prolog.sh wrote
# (see there). It does not resolve devices again: it removes the job id from every GPU file
# that holds it, so it clears exactly what the prolog wrote whatever the epilog's environment.
# A GPU file left without a job is removed. Never fails (exit 0); problems go to stderr.
set -u

JOB="${SLURM_JOB_ID:-}"
DIR="${STALLSCOPE_JOB_MAPPING_DIR:-${DCGM_HPC_JOB_MAPPING_DIR:-/var/lib/dcgm-exporter/job-mapping}}"
say() { echo "stallscope epilog: job ${JOB:-?}: $*" >&2; }

case "$JOB" in
    ''|*[!0-9]*) say "SLURM_JOB_ID '${JOB}' is not a job id; nothing removed"; exit 0 ;;
esac
[ -d "$DIR" ] || exit 0

exec 9<"$DIR"
flock -w 10 9 || say "no lock on $DIR after 10 s; removing anyway"
for f in "$DIR"/[0-9]*; do
    [ -f "$f" ] && grep -qxF "$JOB" "$f" || continue
    tmp="$DIR/.${f##*/}.$$"
    grep -vxF -e "$JOB" -e '' "$f" > "$tmp"
    if [ -s "$tmp" ]; then
        chmod 0644 "$tmp" && mv -f "$tmp" "$f" || { rm -f "$tmp"; say "cannot rewrite $f"; }
    else
        rm -f "$tmp" "$f" || say "cannot remove $f"
    fi
done
exit 0
