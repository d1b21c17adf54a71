"""The GPU check's wheels: slim bitsandbytes to the libraries the image uses, and check that the set
is complete (every requirement of every wheel is carried or already in the image).

    python bench/gpu_check/wheels.py slim .whl --keep libbitsandbytes_cuda130.so --keep libbitsandbytes_cpu.so
    python bench/gpu_check/wheels.py check .whl bench/gpu_check/wheels.txt

Why `check`: run.sh installs with --no-deps (pip cannot see the image's packages from here, and
there is no network there), so a missing dependency would only show as an ImportError on the GPU,
in device time. Requirements are evaluated for CPython 3.12 on Linux x86_64, extras left out.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).parent
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def slim(folder: Path, keep: list[str]) -> None:
    """Rewrite bitsandbytes' wheel without the native libraries not in `keep` (and their RECORD lines)."""
    for wheel in folder.glob("bitsandbytes-*.whl"):
        tmp = wheel.with_suffix(".slim")
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            dropped = {n for n in src.namelist() if n.endswith(".so") and Path(n).name not in keep}
            for item in src.infolist():
                if item.filename in dropped:
                    continue
                data = src.read(item.filename)
                if item.filename.endswith(".dist-info/RECORD"):
                    data = b"\n".join(line for line in data.splitlines()
                                      if line.split(b",")[0].decode() not in dropped) + b"\n"
                dst.writestr(item, data)
        tmp.replace(wheel)
        print(f"{wheel.name}: kept {', '.join(keep)}; dropped {len(dropped)} libraries")


def requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(TARGET):
                out.append(req)
    return out


def image_packages() -> set[str]:
    words = [w for line in (HERE / "image.txt").read_text().splitlines() if not line.startswith("#")
             for w in line.split()]
    return {canonicalize_name(w) for w in words}


def check(folder: Path, listed: Path) -> int:
    wheels = sorted(folder.glob("*.whl"))
    carried = {canonicalize_name(w.name.split("-")[0]): w.name.split("-")[1] for w in wheels}
    wanted = {canonicalize_name(Requirement(line).name) for line in listed.read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    problems = [f"listed but not downloaded: {n}" for n in sorted(wanted - set(carried))]
    problems += [f"two versions of {n}" for n in carried if sum(canonicalize_name(w.name.split('-')[0]) == n
                                                                 for w in wheels) > 1]
    present = image_packages() | set(carried)
    for wheel in wheels:
        for req in requirements(wheel):
            name = canonicalize_name(req.name)
            if name not in present:
                problems.append(f"{wheel.name} needs {req}, which is neither carried nor in the image")
            elif name in carried and carried[name] not in req.specifier:
                problems.append(f"{wheel.name} needs {req}, but {name} {carried[name]} is carried")
    for p in problems:
        print(p)
    total = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {total:.1f} MiB: " + ("complete" if not problems else f"{len(problems)} problems"))
    return 1 if problems else 0


def main() -> None:
    command, folder = sys.argv[1], Path(sys.argv[2])
    if command == "slim":
        slim(folder, [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "--keep"])
    else:
        sys.exit(check(folder, Path(sys.argv[3])))


if __name__ == "__main__":
    main()
