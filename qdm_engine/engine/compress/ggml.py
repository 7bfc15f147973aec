"""llama.cpp's ggml quantizer through ctypes, for the GGUF k-quants that the `gguf` package cannot write.

`qdm-engine build-ggml` builds ggml's base library (the part with `ggml_quantize_chunk`, ~20 s with
cmake and a C/C++ compiler) from the llama.cpp sources that PyPI's llama-cpp-python source package
bundles, into the qdm-engine cache (`$QDM_CACHE/ggml/`, default `~/.cache/qdm-engine/ggml/`).
`QDM_GGML_LIB=/path/to/libggml-base.so` uses another build (e.g. one of your llama.cpp checkout).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

LLAMA_CPP_PYTHON = "0.3.36"  # its bundled llama.cpp is the ggml whose arithmetic we use
_LIB = None


def lib_path() -> Path:
    env = os.environ.get("QDM_GGML_LIB")
    if env:
        return Path(env).expanduser()
    from qdm_engine.engine.default import cache_root

    return cache_root() / "ggml" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}" / "libggml-base.so"


def ggml_status() -> str | None:
    """None when the ggml library loads, else what to do."""
    p = lib_path()
    if not p.is_file():
        return f"{p} not found; run `qdm-engine build-ggml` once (needs cmake and a C/C++ compiler)"
    try:
        _load()
    except OSError as exc:
        return f"cannot load {p} ({exc}); rebuild it with `qdm-engine build-ggml --force`"
    return None


def _load():
    global _LIB
    if _LIB is None:
        lib = ctypes.CDLL(str(lib_path()))
        f = lib.ggml_quantize_chunk
        f.restype = ctypes.c_size_t
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_int64, ctypes.c_void_p]
        _LIB = lib
    return _LIB


def ggml_quantize(w: np.ndarray, qtype: int, block: int, type_size: int) -> np.ndarray:
    """ggml_quantize_chunk over a float32 [rows, cols] array: uint8 [rows, cols / block * type_size]."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = w.shape
    if cols % block:
        raise ValueError(f"row length {cols} is not a multiple of the block size {block}")
    dst = np.zeros((rows, cols // block * type_size), dtype=np.uint8)
    n = _load().ggml_quantize_chunk(qtype, w.ctypes.data, dst.ctypes.data, 0, rows, cols, None)
    if n != dst.size:
        raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes, expected {dst.size}")
    return dst


def build_ggml(force: bool = False, log=print) -> Path:
    """Download llama-cpp-python's source package from PyPI and build ggml's base library from it."""
    dest = lib_path()
    if dest.is_file() and not force:
        log(f"ggml already built: {dest}")
        return dest
    for tool in ("cmake", "c++", "cc"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"building ggml needs {tool} on PATH (apt-get install cmake g++)")
    with tempfile.TemporaryDirectory() as tmp:
        log(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON} sources from PyPI ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/ggml/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            tar.extractall(tmp, members=members, filter="data")
        src = Path(tmp) / prefix
        (src / "ggml.pc.in").touch()  # the sdist leaves out the pkg-config template the CMake file expects
        build = src / "build"
        log("building ggml-base with cmake ...")
        cfg = ["cmake", "-S", str(src), "-B", str(build), "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF",
               "-DGGML_OPENMP=OFF", "-DGGML_BUILD_TESTS=OFF", "-DGGML_BUILD_EXAMPLES=OFF",
               "-DCMAKE_BUILD_TYPE=Release"]
        subprocess.run(cfg, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "--target", "ggml-base", "-j", str(os.cpu_count() or 2)],
                       check=True, stdout=subprocess.DEVNULL)
        built = (build / "src" / "libggml-base.so").resolve()
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_suffix(".so.part")
        shutil.copyfile(built, part)
        os.replace(part, dest)
    log(f"ggml built: {dest}")
    return dest
