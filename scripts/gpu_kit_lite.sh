#!/usr/bin/env bash
# A GPU kit without TileLang, for commands that must also carry a run folder's state (the reproduction:
# docs/reproduction.md). Run on the development machine, from the project's root, after
# `bash ../shared/gpu/prepare.sh` has made .gpu/:
#
#     bash scripts/gpu_kit_lite.sh            # -> .gpu-lite/ (about 3.5 MiB instead of 38)
#
# and on the GPU machine start each command with `source .gpu-lite/setup.sh` (carry [".gpu-lite"]).
# Without TileLang, fla refuses its gated backward on Hopper with Triton 3.4-3.7.0 (fla issue #640);
# hybrid_distill.modeling.hybrid_ops then runs fla's Triton kernel with tiles that compile right there.
# .gpu-lite/kernel-cache.tar.gz, when present, is kept: save a pruned cache of the lite kit's own
# kernels there (`save_kernel_cache`, as the full kit's README says) so that later commands start warm.
set -euo pipefail
root="$(git rev-parse --show-toplevel)"
[ -d "$root/.gpu" ] || { echo "no .gpu/: run 'bash ../shared/gpu/prepare.sh' first" >&2; exit 1; }
mkdir -p "$root/.gpu-lite"
cp -u "$root"/.gpu/*.whl "$root/.gpu/prune_cache.py" "$root/.gpu-lite/"
# the full kit's starter cache holds Triton kernels at Qwen2.5-1.5B's shape (its TileLang builds go unused)
[ -f "$root/.gpu-lite/kernel-cache.tar.gz" ] || cp "$root/.gpu/kernel-cache.tar.gz" "$root/.gpu-lite/"
cat > "$root/.gpu-lite/setup.sh" <<'SETUP'
# Source at the start of every command on the GPU machine:  source .gpu-lite/setup.sh
_kit="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ ! -f /tmp/site-lite/.kit-ready ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-lite "$_kit"/*.whl
  touch /tmp/site-lite/.kit-ready
fi
export PYTHONPATH="/tmp/site-lite${PYTHONPATH:+:$PYTHONPATH}"
export KERNEL_CACHE=/tmp/kernel-cache-lite
export TRITON_CACHE_DIR="$KERNEL_CACHE/triton" TRITON_CACHE_AUTOTUNING=1 PYTHONUNBUFFERED=1
if [ ! -d "$KERNEL_CACHE" ]; then
  mkdir -p "$KERNEL_CACHE"
  [ -f "$_kit/kernel-cache.tar.gz" ] && tar xzf "$_kit/kernel-cache.tar.gz" -C "$KERNEL_CACHE"
fi
save_kernel_cache() { tar czf "$OUT/kernel-cache.tar.gz" -C "$KERNEL_CACHE" . ; }
SETUP
du -sh "$root/.gpu-lite"
