#!/usr/bin/env bash
# Container entrypoint: linepack-entrypoint ROLE [ARG...]
#
#   ROLE producer  ->  python -m producer run ARG...
#   ROLE trainer   ->  python -m trainer ARG...
#   anything else  ->  run as a command (e.g. `python -m trainer.consume ...`, `bash`)
#
# Configuration is LINEPACK_* environment variables, which every Linepack CLI reads itself:
# each flag --some-name is the variable LINEPACK_SOME_NAME (LINEPACK_BLOCK_SIZE=256 is
# --block-size 256; switches take true/false; empty means the CLI's default); ARG... on the
# command line win. A producer's id defaults to the container's hostname (its container id),
# so the replicas of `docker compose up --scale producer=N` get distinct ids and distinct
# streams; set LINEPACK_PRODUCER_ID for a stream that is the same in every run.
set -euo pipefail

role=${1:-trainer}
shift || true
case $role in
    producer)
        if [[ -z ${LINEPACK_PRODUCER_ID:-} ]]; then
            exec python -m producer run --producer-id "$(hostname)" "$@"
        fi
        exec python -m producer run "$@"
        ;;
    trainer) exec python -m trainer "$@" ;;
    *) exec "$role" "$@" ;;
esac
