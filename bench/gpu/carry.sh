#!/usr/bin/env bash
# Carry files bigger than one device call's 64 MiB to the lent GPU, in pieces, over one warm
# machine (the calls back to back: it is given back after ~30 s idle and its files are lost).
#   here:               bash bench/gpu/carry.sh pack FOLDER...      -> .gpu/1 .. .gpu/N
#   there, call k:      bash bench/gpu/carry.sh add .gpu/k/chunk    (carry [".gpu/k"])
#   there, after the last add: bash bench/gpu/carry.sh unpack
# `unpack` puts the folders' files in /root/g and installs any wheels among them under
# /root/site (use PYTHONPATH=/root/site).
set -euo pipefail
PIECE=${PIECE:-56m}
case "${1:-}" in
  pack)
    shift
    root=$(git rev-parse --show-toplevel)
    rm -rf "$root/.gpu"/[0-9]*
    work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
    members=(); for folder in "$@"; do members+=(-C "$(realpath "$folder")" .); done
    tar cf - "${members[@]}" | split -b "$PIECE" -d -a 1 - "$work/chunk"
    n=0; for c in "$work"/chunk*; do n=$((n + 1)); mkdir -p "$root/.gpu/$n"; mv "$c" "$root/.gpu/$n/chunk"; done
    grep -qx '/.gpu/' "$root/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >> "$root/.git/info/exclude"
    echo "packed into $n pieces: carry .gpu/1 .. .gpu/$n, one per call";;
  add)
    mkdir -p /root/g/pieces
    k=$(basename "$(dirname "$2")")  # .gpu/k/chunk: the k-th piece
    cp "$2" "/root/g/pieces/piece$(printf %02d "$k")"
    echo "have pieces: $(ls /root/g/pieces | tr '\n' ' ')";;
  unpack)
    cat /root/g/pieces/piece* | tar xf - -C /root/g
    if compgen -G '/root/g/*.whl' > /dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /root/site \
        /root/g/*.whl
    fi
    ls /root/g;;
  *) echo "usage: $0 pack FOLDER... | add PIECE | unpack" >&2; exit 2;;
esac
