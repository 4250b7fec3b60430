#!/usr/bin/env bash
# Runs idem's fuzz targets one after the other (cargo-fuzz, nightly; not run by CI).
#
#   fuzz/run.sh                 # every target, 600 s each
#   fuzz/run.sh 60              # every target, 60 s each
#   fuzz/run.sh 600 key_header  # one target
#
# Needs `cargo install cargo-fuzz` and a nightly toolchain (`rustup toolchain install nightly`).
# New corpus entries land in fuzz/corpus/<target>/; crashes in fuzz/artifacts/<target>/, and
# `cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>` replays one.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(codec_open key_header fingerprint_json parse_duration redis_record)
fi
for t in "${targets[@]}"; do
  echo "== $t: ${secs}s"
  mkdir -p "corpus/$t"
  # -rss_limit_mb: an allocation blow-up is a failure; -timeout: so is a hang (5 s per input).
  cargo +nightly fuzz run "$t" "corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=1024 -malloc_limit_mb=512 -timeout=5 -print_final_stats=1
done
