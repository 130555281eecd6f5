#!/usr/bin/env bash
# Builds chopgrad against one end of the torch range that pyproject.toml declares, in a throwaway venv (the
# pinned torch is built and tested by `make test`): the release build (`pip wheel --no-build-isolation
# --no-deps`, i.e. setup.py's build_ext through that torch's cpp_extension, with the C++ standard it chooses),
# the wheel installed there with its other dependencies (never replacing the torch under test),
# .ci/smoke_installed.py, and the engine's and the kernels' tests (the kernels through Triton's interpreter).
#
#   .ci/compile_torch_range.sh oldest|newest
#
# oldest: the newest patch release of the range's lower bound (e.g. >=2.6 -> torch==2.6.*); newest: the newest
# release pip offers in the range (the machine's pip configuration applies). The newest torch the index lists
# is printed too; one outside the declared range is reported and not built. To build against a given release,
# in the range or not: CHOPGRAD_TORCH="torch==X.Y.Z" .ci/compile_torch_range.sh newest
#
# The CMake build is not repeated here: the torch wheels on PyPI are CUDA builds, whose
# TorchConfig.cmake needs a CUDA toolkit; `make ctest` builds it against the pinned CPU torch.
set -euo pipefail
END=${1:?usage: compile_torch_range.sh oldest|newest}
case $END in oldest|newest) ;; *) echo "usage: compile_torch_range.sh oldest|newest" >&2; exit 2;; esac
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
if [ "$END" = oldest ]; then
  lower=$("$venv/bin/python" -c 'import sys; from pip._vendor.packaging.specifiers import SpecifierSet
print(next(s.version for s in SpecifierSet(sys.argv[1]) if s.operator == ">="))' "$spec")
  default_requirement="torch==$lower.*"
else
  default_requirement="torch$spec"
fi
requirement=${CHOPGRAD_TORCH:-$default_requirement}
"${pip[@]}" download --quiet --no-deps -d "$work/download" "$requirement" 2>&1 | { grep -v "is ignored: it is neither" || true; }
torch_wheel=$(ls "$work"/download/torch-*.whl)
target=$(basename "$torch_wheel" | cut -d- -f2)
echo "   declared range: torch$spec"
echo "   newest torch the index lists: ${newest_listed:-unknown}"
echo "   $END end: pip offers $target for '$requirement'  <- building against this one"
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
        print(f"         To try it: CHOPGRAD_TORCH='torch=={newest}' bash .ci/compile_torch_range.sh newest")
PY
took

step "install torch $target (with its dependencies), setuptools, ninja"
"${pip[@]}" install --quiet "$torch_wheel" "setuptools>=77" ninja 2>&1 | { grep -v "is ignored: it is neither" || true; }
installed=$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)
echo "   torch $installed in $venv"
took

step "build the wheel against torch $installed (pip wheel --no-build-isolation --no-deps)"
copy_source_tree "$work/src"
allow=0; [ -n "${CHOPGRAD_TORCH:-}" ] && allow=1
show_log_on_failure "$work/wheel.log" \
  env MAX_JOBS="${MAX_JOBS:-2}" CHOPGRAD_ALLOW_UNTESTED_TORCH=$allow \
  "${pip[@]}" wheel --no-build-isolation --no-deps -v "$work/src" -w "$work/dist"
wheel=$(ls "$work"/dist/chopgrad-*.whl)
echo "   compiled with: $(grep -o -- ' -std=[^ ]*' "$work/wheel.log" | sort -u | tr -d '\n')"
echo "   $(basename "$wheel")"
took

step "install the wheel and its other dependencies (torch $installed stays)"
# chopgrad's own torch requirement would let pip swap a torch outside the range for one inside it, and the
# tests would then run against a torch the wheel was not built for: the wheel goes in without dependencies,
# the rest of its requirements (torch left out) with torch pinned to the one under test.
"${pip[@]}" install --quiet --no-deps "$wheel" 2>&1 | { grep -v "is ignored: it is neither" || true; }
"$venv/bin/python" - "$wheel" > "$work/requirements.txt" <<'PY'
import sys, zipfile
from pip._vendor.packaging.requirements import Requirement
with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    lines = wheel.read(meta).decode().splitlines()
for line in lines:
    if line.startswith("Requires-Dist:"):
        req = Requirement(line.split(":", 1)[1].strip())
        wanted = req.marker is None or req.marker.evaluate({"extra": "test"}) or req.marker.evaluate({"extra": "triton"})
        if req.name != "torch" and wanted:
            print(str(req).split(";")[0].strip())
PY
# the distribution's version (2.6.0), which pip matches, not torch.__version__ (2.6.0+cu124)
dist_version() { "$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))'; }
pinned=$(dist_version)
echo "torch==$pinned" > "$work/constraints.txt"
"${pip[@]}" install --quiet -r "$work/requirements.txt" -c "$work/constraints.txt" 2>&1 \
  | { grep -v "is ignored: it is neither" || true; }
# triton 3.2 (torch 2.6's) runs its interpreter's loops over a scalar argument through int() of a one-element
# array, which numpy 2.3 and newer refuse; the interpreter is only how the kernels are tested without a GPU.
"$venv/bin/python" - <<'PY' && "${pip[@]}" install --quiet "numpy<2.3" -c "$work/constraints.txt" 2>&1 \
  | { grep -v "is ignored: it is neither" || true; }
import sys
from importlib.metadata import version
from pip._vendor.packaging.version import Version
sys.exit(0 if Version(version("triton")) < Version("3.3") else 1)
PY
now=$(dist_version)
[ "$now" = "$pinned" ] || { echo "FAILED: installing the dependencies replaced torch $pinned by $now" >&2; exit 1; }
took

step "smoke test, engine and kernel tests against torch $installed"
# From outside the source tree (the tests from a copy of tests/ alone; some run subprocesses in the
# folder above tests/), so that the installed chopgrad is the one imported.
mkdir "$work/installed" && cp -r "$work/src/tests" "$work/installed/tests"
cd "$work/installed"
"$venv/bin/python" "$ROOT/.ci/smoke_installed.py"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_kernels_*.py
took
echo "$END-torch build OK: chopgrad built and its engine and kernel tests passed against torch $installed"
if [ -n "${CHOPGRAD_CI_TORCH_FILE:-}" ]; then echo "$installed" > "$CHOPGRAD_CI_TORCH_FILE"; fi
