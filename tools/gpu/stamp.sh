#!/bin/bash
# Run HERE (not on the GPU machine) before a GPU call: writes tools/gpu/stamp.env with the
# commit and whether the tree is dirty, which the scripts read there (the copy of the working
# tree that travels has no .git). Name tools/gpu/stamp.env in the call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
commit=$(git rev-parse HEAD)
if [ -n "$(git status --porcelain)" ]; then dirty=1; else dirty=0; fi
printf 'AVME_GIT_COMMIT=%s\nAVME_GIT_DIRTY=%s\n' "$commit" "$dirty" > tools/gpu/stamp.env
echo "tools/gpu/stamp.env: commit $commit, dirty=$dirty"
[ "$dirty" = 0 ] || git status --short
