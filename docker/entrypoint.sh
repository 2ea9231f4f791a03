#!/usr/bin/env bash
# Container entrypoint: linepack-entrypoint ROLE [ARG...]
#
#   ROLE producer  ->  python -m producer run <flags from LINEPACK_*> ARG...
#   ROLE trainer   ->  python -m trainer      <flags from LINEPACK_*> ARG...
#   anything else  ->  run as a command (e.g. `python -m trainer.consume ...`, `bash`)
#
# Every exported LINEPACK_<NAME> variable becomes the flag --<name>: lower case, '_' -> '-'.
#   LINEPACK_BLOCK_SIZE=256      ->  --block-size 256
#   LINEPACK_SUPERVISE_SEP=true  ->  --supervise-sep      (true: the bare switch)
#   LINEPACK_SUPERVISE_SEP=false ->  nothing              (false or empty: left to the CLI default)
# ARG... come after the variables' flags, so on the command line they win (argparse keeps the last).
# A producer's id defaults to the container's hostname (its container id), so the replicas of
# `docker compose up --scale producer=N` get distinct ids and distinct streams; set
# LINEPACK_PRODUCER_ID (or pass --producer-id) for a stream that is the same in every run.
# LINEPACK_RESUME=auto (the compose default) becomes --resume when LINEPACK_OUT_DIR already holds
# a checkpoint, so a trainer restarted after a crash continues where it stopped.
set -euo pipefail

if [[ ${LINEPACK_RESUME:-} == auto ]]; then
    if [[ -f ${LINEPACK_OUT_DIR:-.}/ckpt.pt ]]; then LINEPACK_RESUME=true; else LINEPACK_RESUME=false; fi
fi

env_flags=()
while IFS= read -r name; do
    [[ -n $name ]] || continue
    value=${!name}
    flag=--$(tr 'A-Z_' 'a-z-' <<<"${name#LINEPACK_}")
    case $value in
        "" | false) ;;
        true) env_flags+=("$flag") ;;
        *) env_flags+=("$flag" "$value") ;;
    esac
done <<<"$(compgen -e | grep '^LINEPACK_' | sort || true)"

role=${1:-trainer}
shift || true
case $role in
    producer) exec python -m producer run --producer-id "$(hostname)" "${env_flags[@]}" "$@" ;;
    trainer) exec python -m trainer "${env_flags[@]}" "$@" ;;
    *) exec "$role" "$@" ;;
esac
