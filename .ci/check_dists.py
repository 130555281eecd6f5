"""Checks the contents of a built sdist and wheel of chopgrad.

    python .ci/check_dists.py SDIST WHEEL

The sdist must carry everything the build needs (sources, headers, LICENSE); the wheel must carry
LICENSE (and say so in its metadata), the compiled engine without debug info, the fused kernels
(every chopgrad/kernels/*.py of the source tree) and the default model's weights.
"""
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
problems = []


def need(ok, what):
    if not ok:
        problems.append(what)


def check_sdist(path):
    with tarfile.open(path) as tar:
        names = {str(PurePosixPath(*PurePosixPath(n).parts[1:])) for n in tar.getnames()}
    for required in ["LICENSE", "README.md", "pyproject.toml", "setup.py", "csrc/engine.h", "csrc/engine.cpp",
                     "csrc/bindings.cpp", "chopgrad/models/default_vae.safetensors"]:
        need(required in names, f"sdist lacks {required}")
    for source in sorted((ROOT / "chopgrad" / "kernels").glob("*.py")):
        need(f"chopgrad/kernels/{source.name}" in names, f"sdist lacks chopgrad/kernels/{source.name}")
    print(f"sdist {Path(path).name}: {len(names)} entries")


def check_wheel(path):
    with zipfile.ZipFile(path) as whl:
        names = set(whl.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        metadata = Parser().parsestr(whl.read(f"{dist_info}/METADATA").decode())
        engines = [n for n in names if n.startswith("chopgrad/_C") and n.endswith(".so")]
        need(len(engines) == 1, f"wheel has {len(engines)} chopgrad/_C*.so files")
        engine_size = None
        if engines:
            engine_size = whl.getinfo(engines[0]).file_size
            out = Path(path).with_suffix(".engine.so")
            out.write_bytes(whl.read(engines[0]))
            sections = subprocess.run(["readelf", "-SW", str(out)], check=True, capture_output=True,
                                      text=True).stdout
            out.unlink()
            debug = sorted({w for w in sections.split() if w.startswith(".debug")})
            need(not debug, f"{engines[0]} has debug sections {debug}")
    need(f"{dist_info}/licenses/LICENSE" in names, f"wheel lacks {dist_info}/licenses/LICENSE")
    need(metadata.get("License-Expression") == "Apache-2.0",
         f"wheel metadata License-Expression is {metadata.get('License-Expression')!r}")
    need("LICENSE" in (metadata.get_all("License-File") or []), "wheel metadata names no License-File LICENSE")
    for source in sorted((ROOT / "chopgrad" / "kernels").glob("*.py")):
        need(f"chopgrad/kernels/{source.name}" in names, f"wheel lacks chopgrad/kernels/{source.name}")
    for model in ["chopgrad/models/default_vae.safetensors", "chopgrad/models/default_vae_config.json"]:
        need(model in names, f"wheel lacks {model}")
    size = f", {engines[0]} {engine_size / 2**20:.2f} MiB" if engine_size else ""
    print(f"wheel {Path(path).name}: {len(names)} files{size}, torch requirement "
          f"{[r for r in metadata.get_all('Requires-Dist') if r.startswith('torch')]}")


if __name__ == "__main__":
    sdist, wheel = sys.argv[1:3]
    check_sdist(sdist)
    check_wheel(wheel)
    if problems:
        sys.exit("dist check failed:\n  " + "\n  ".join(problems))
    print("dist check OK: sdist and wheel contents")
