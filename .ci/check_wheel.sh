#!/usr/bin/env bash
# The release build against the pinned torch of .venv (`make install` sets it up): an sdist, then a
# wheel built from it with `pip wheel --no-build-isolation --no-deps`, their contents checked
# (.ci/check_dists.py), then the wheel installed into a throwaway venv that reaches .venv's torch
# and dependencies, where .ci/smoke_installed.py imports it and runs the engine.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/lib.sh
make --no-print-directory install
ROOT=$PWD
PY=$ROOT/.venv/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "wheel check against the pinned torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"

step "sdist"
copy_source_tree "$work/src"
show_log_on_failure "$work/sdist.log" \
  bash -c "cd '$work/src' && '$PY' -c 'from setuptools import build_meta; build_meta.build_sdist(\"$work/dist\")'"
sdist=$(ls "$work"/dist/chopgrad-*.tar.gz)
took

step "wheel from the sdist (pip wheel --no-build-isolation --no-deps)"
show_log_on_failure "$work/wheel.log" \
  env MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip wheel --no-build-isolation --no-deps -v "$sdist" -w "$work/dist"
wheel=$(ls "$work"/dist/chopgrad-*.whl)
echo "   compiled with: $(grep -o -- ' -std=[^ ]*' "$work/wheel.log" | sort -u | tr -d '\n')"
took

step "contents"
"$PY" .ci/check_dists.py "$sdist" "$wheel"

step "install into a throwaway venv"
"$PY" -m venv --without-pip "$work/venv"
purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
# .venv's site-packages after the venv's own: the pinned torch and the dependencies, while the
# chopgrad imported is the one the wheel installs (.venv's editable install is not activated there).
purelib "$PY" > "$(purelib "$work/venv/bin/python")/pinned-venv.pth"
"$PY" -m pip --python "$work/venv/bin/python" install --quiet --no-deps --ignore-installed "$wheel"
(cd "$work" && "$work/venv/bin/python" "$ROOT/.ci/smoke_installed.py")
took
