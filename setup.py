"""Build of the ``avme`` package: pure Python, plus the CUDA extension ``avme_ext._C`` when possible.

Project metadata lives in pyproject.toml; this file only decides whether to build the
extension and how.

The extension is built when a CUDA toolkit is found (``CUDA_HOME``/``CUDA_PATH``, or ``nvcc``
on ``PATH``) AND a CUDA build of torch is importable in the build environment, or when
``AVME_FORCE_CUDA=1`` (then any failure to build it is an error). Otherwise a message is
printed and the pure-Python package is installed (the modules then run the reference
implementation). Because torch is not a build requirement, the CUDA build needs
``--no-build-isolation``::

    CUDA_HOME=/usr/local/cuda pip install --no-build-isolation .

Environment:
    AVME_FORCE_CUDA=1       build the extension or fail.
    AVME_NO_CUDA=1          never build the extension.
    TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0" when no GPU is visible,
                            the visible GPUs' otherwise).
    MAX_JOBS                parallel compile jobs (ninja).
    CUDA_HOME               the CUDA toolkit (recommended: torch may otherwise derive a wrong
                            root from an nvcc wrapper script on PATH).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
FORCE = os.environ.get("AVME_FORCE_CUDA", "") == "1"
DISABLE = os.environ.get("AVME_NO_CUDA", "") == "1"


def _say(message: str) -> None:
    print(f"avme setup: {message}", file=sys.stderr, flush=True)


def _sources() -> list[str]:
    """The extension's sources, from csrc/sources.txt (shared with CMakeLists.txt)."""
    listing = os.path.join(ROOT, "csrc", "sources.txt")
    with open(listing, encoding="utf-8") as handle:
        names = [line.split("#", 1)[0].strip() for line in handle]
    return [f"csrc/{name}" for name in names if name]


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root, or None. Sets CUDA_HOME when derived from nvcc on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
        if home:
            _say(f"{var}={home} has no bin/nvcc; ignoring it")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # Follow symlinks and a one-line wrapper script ("exec /path/to/nvcc ...") to the real
    # toolkit, so that torch does not take e.g. /usr/local for the toolkit root.
    real = os.path.realpath(nvcc)
    try:
        with open(real, encoding="utf-8", errors="replace") as handle:
            head = handle.read(4096)
        if head.startswith("#!"):
            for token in head.split():
                if token.endswith("/bin/nvcc") and os.path.isfile(token):
                    real = os.path.realpath(token)
                    break
    except OSError:
        pass
    home = os.path.dirname(os.path.dirname(real))
    if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        os.environ.setdefault("CUDA_HOME", home)
        return home
    return None


def _extension_plan() -> tuple[list[Any], dict[str, type]]:
    """(ext_modules, cmdclass) for the CUDA build, or ([], {}) with a printed reason."""

    def skip(reason: str) -> tuple[list[Any], dict[str, type]]:
        if FORCE:
            raise RuntimeError(f"AVME_FORCE_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"building the pure-Python package WITHOUT the CUDA extension: {reason}.")
        _say("the modules will run the PyTorch reference implementation. For the CUDA build run:")
        _say("  CUDA_HOME=/usr/local/cuda pip install --no-build-isolation .")
        return [], {}

    if DISABLE and not FORCE:
        return skip("AVME_NO_CUDA=1")
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return skip("no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)")
    try:
        import torch
    except ImportError:
        return skip(
            "torch is not importable in the build environment (pip's build isolation hides "
            "it: use --no-build-isolation)"
        )
    if torch.version.cuda is None:
        return skip(f"the installed torch {torch.__version__} is a CPU-only build")

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    _say(
        f"building the CUDA extension avme_ext._C with CUDA_HOME={cuda_home}, torch "
        f"{torch.__version__} (CUDA {torch.version.cuda}), TORCH_CUDA_ARCH_LIST="
        f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPUs)')}, "
        f"MAX_JOBS={os.environ.get('MAX_JOBS', '(default)')}"
    )

    class Build(BuildExtension):
        """BuildExtension that falls back to pure Python on failure unless AVME_FORCE_CUDA=1."""

        def build_extension(self, ext: Any) -> None:
            try:
                super().build_extension(ext)
            except Exception as exc:
                if FORCE:
                    raise
                _say(f"building {ext.name} FAILED ({exc}); installing without it.")
                _say("set AVME_FORCE_CUDA=1 to make this an error.")

    extension = CUDAExtension(
        name="avme_ext._C",
        sources=_sources(),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3"],
            # No fast-math: the fp32 kernels must match the fp64 reference to 1e-4.
            "nvcc": ["-O3", "-lineinfo"],
        },
    )
    return [extension], {"build_ext": Build}


ext_modules, cmdclass = _extension_plan()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
