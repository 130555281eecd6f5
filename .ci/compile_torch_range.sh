#!/usr/bin/env bash
# Builds chopgrad against the newest torch release in the range that pyproject.toml declares, in a
# throwaway venv (the pinned torch is built and tested by `make test`): the release build
# (`pip wheel --no-build-isolation --no-deps`, i.e. setup.py's build_ext through that torch's
# cpp_extension, with the C++ standard it chooses), the wheel installed there with its
# dependencies, .ci/smoke_installed.py and the engine's tests (tests/test_engine.py) run against it.
#
# The versions come from asking pip (the machine's pip configuration applies). The newest torch the
# index lists is printed too; one outside the declared range is reported and not built. To build
# against a given release, in the range or not: CHOPGRAD_NEWEST_TORCH="torch==X.Y.Z" .ci/compile_newest_torch.sh
#
# The CMake build is not repeated here: the torch wheels on PyPI are CUDA builds, whose
# TorchConfig.cmake needs a CUDA toolkit; `make ctest` builds it against the pinned CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/lib.sh
ROOT=$PWD
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
venv=$work/venv
pip=("$venv/bin/python" -m pip)

step "throwaway venv"
"$PYTHON" -m venv "$venv"
"${pip[@]}" install --quiet --upgrade pip 2>&1 | { grep -v "is ignored: it is neither" || true; }
spec=$("$venv/bin/python" - <<'PY'
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib
from pip._vendor.packaging.requirements import Requirement
with open("pyproject.toml", "rb") as f:
    lines = tomllib.load(f)["project"]["dependencies"]
line = next(line for line in lines if Requirement(line).name == "torch")
print(line.strip()[len("torch"):].strip())  # as written, e.g. >=2.13,<2.15
PY
)
newest_listed=$("${pip[@]}" index versions torch 2>/dev/null | sed -n 's/^torch (\(.*\))$/\1/p' | head -n 1)
requirement=${CHOPGRAD_NEWEST_TORCH:-torch$spec}
"${pip[@]}" download --quiet --no-deps -d "$work/download" "$requirement" 2>&1 | { grep -v "is ignored: it is neither" || true; }
torch_wheel=$(ls "$work"/download/torch-*.whl)
target=$(basename "$torch_wheel" | cut -d- -f2)
echo "   declared range: torch$spec"
echo "   newest torch the index lists: ${newest_listed:-unknown}"
echo "   newest torch pip offers for '$requirement': $target  <- building against this one"
# A newer release than the one built gets a note; one outside the declared range is not built.
"$venv/bin/python" - "$spec" "${newest_listed:-}" "$target" <<'PY'
import sys
from pip._vendor.packaging.specifiers import SpecifierSet
from pip._vendor.packaging.version import Version
spec, newest, target = sys.argv[1:]
if newest and Version(Version(newest).public) > Version(Version(target).public):
    if SpecifierSet(spec).contains(newest, prereleases=True):
        print(f"   note: torch {newest} is in the declared range but pip does not offer it here (a pip constraint?)")
    else:
        print(f"   NOTE: torch {newest} is listed on the index, outside the declared range torch{spec}: not built.")
        print(f"         To try it: CHOPGRAD_NEWEST_TORCH='torch=={newest}' bash .ci/compile_newest_torch.sh")
PY
took

step "install torch $target (with its dependencies), setuptools, ninja"
"${pip[@]}" install --quiet "$torch_wheel" "setuptools>=77" ninja 2>&1 | { grep -v "is ignored: it is neither" || true; }
installed=$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)
echo "   torch $installed in $venv"
took

step "build the wheel against torch $installed (pip wheel --no-build-isolation --no-deps)"
copy_source_tree "$work/src"
allow=0; [ -n "${CHOPGRAD_NEWEST_TORCH:-}" ] && allow=1
show_log_on_failure "$work/wheel.log" \
  env MAX_JOBS="${MAX_JOBS:-2}" CHOPGRAD_ALLOW_UNTESTED_TORCH=$allow \
  "${pip[@]}" wheel --no-build-isolation --no-deps -v "$work/src" -w "$work/dist"
wheel=$(ls "$work"/dist/chopgrad-*.whl)
echo "   compiled with: $(grep -o -- ' -std=[^ ]*' "$work/wheel.log" | sort -u | tr -d '\n')"
echo "   $(basename "$wheel")"
took

step "install the wheel with its dependencies"
"${pip[@]}" install --quiet "chopgrad[test] @ file://$wheel" 2>&1 | { grep -v "is ignored: it is neither" || true; }
took

step "smoke test and engine tests against torch $installed"
# From outside the source tree (the tests from a copy of tests/ alone; some run subprocesses in the
# folder above tests/), so that the installed chopgrad is the one imported.
mkdir "$work/installed" && cp -r "$work/src/tests" "$work/installed/tests"
cd "$work/installed"
"$venv/bin/python" "$ROOT/.ci/smoke_installed.py"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_engine.py
took
echo "newest-torch build OK: chopgrad built and its engine tests passed against torch $installed"
if [ -n "${CHOPGRAD_CI_TORCH_FILE:-}" ]; then echo "$installed" > "$CHOPGRAD_CI_TORCH_FILE"; fi
