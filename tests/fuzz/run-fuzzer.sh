#!/bin/sh
# run-fuzzer.sh FUZZER SEEDS WORKDIR SECONDS: runs a libFuzzer target for SECONDS with bounded
# memory, writing new inputs and any crash into WORKDIR (never into the source tree).
set -eu
fuzzer=$1 seeds=$2 work=$3 seconds=$4
mkdir -p "$work/corpus"
exec "$fuzzer" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=512 -malloc_limit_mb=128 \
        -print_final_stats=1 -artifact_prefix="$work/" "$work/corpus" "$seeds"
