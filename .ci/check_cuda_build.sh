#!/usr/bin/env bash
# Compile and link the CUDA backend (opcm_ext._cuda) on a machine that has nvcc
# but no GPU, then check the module: its PyInit symbol, that it links
# libcusolver and libcublas (and not libtorch), that every dependency
# resolves, that it carries sm_80/sm_90 code, and that Python can import it.
#
# Usage: .ci/check_cuda_build.sh [build-dir]
# Env:   PYTHON (default python3), CMAKE_CUDA_ARCHITECTURES (default: the
#        project's 80-real;90-real;90-virtual), KEEP_BUILD=1 to keep the
#        temporary build directory.
# Warnings are errors here (-DOPCM_CUDA_WERROR=ON). Exits non-zero on any
# failure. Nothing is written into the source tree.
set -euo pipefail

say() { printf '\n==> %s\n' "$*"; }
fail() { printf '\nFAIL: %s\n' "$*" >&2; exit 1; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

say "tools"
command -v nvcc >/dev/null || fail "nvcc is not on PATH"
command -v cmake >/dev/null || fail "cmake is not on PATH"
nvcc --version | tail -n 2
cmake --version | head -n 1
"$PYTHON" --version

# The NVIDIA pip wheels (nvidia-cusolver, nvidia-cublas) carry the headers and
# libraries; a full CUDA toolkit works too (the hints are then just extra).
NV_HINTS="$("$PYTHON" - <<'EOF'
import os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
inc, lib = [], []
for root in nvidia.__path__:
    for sub in sorted(os.listdir(root)):
        d = os.path.join(root, sub)
        if os.path.isdir(os.path.join(d, "include")):
            inc.append(os.path.join(d, "include"))
        if os.path.isdir(os.path.join(d, "lib")):
            lib.append(os.path.join(d, "lib"))
print(";".join(inc) + "|" + ";".join(lib))
EOF
)"
INC_HINTS="${NV_HINTS%%|*}"
LIB_HINTS="${NV_HINTS##*|}"
echo "include hints: ${INC_HINTS:-<none>}"
echo "library hints: ${LIB_HINTS:-<none>}"
PYBIND11_DIR="$("$PYTHON" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  || fail "pybind11 is not installed for $PYTHON"

if [[ $# -ge 1 ]]; then
  BUILD="$1"
  mkdir -p "$BUILD"
else
  BUILD="$(mktemp -d -t opcm-cuda-build.XXXXXX)"
  if [[ "${KEEP_BUILD:-0}" != 1 ]]; then trap 'rm -rf "$BUILD"' EXIT; fi
fi
OUT="$BUILD/pkg/opcm_ext"
mkdir -p "$OUT"

GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
ARCH=()
[[ -n "${CMAKE_CUDA_ARCHITECTURES:-}" ]] && ARCH=(-DCMAKE_CUDA_ARCHITECTURES="$CMAKE_CUDA_ARCHITECTURES")

# The project's own CMakeLists.txt when it exists (the real integration);
# otherwise a minimal wrapper that includes csrc/cuda.cmake the same way.
if [[ -f "$REPO/CMakeLists.txt" ]]; then
  SRC="$REPO"
  say "configure the project ($SRC) with OPCM_WITH_CUDA=ON in $BUILD"
else
  SRC="$BUILD/wrapper"
  mkdir -p "$SRC"
  cat >"$SRC/CMakeLists.txt" <<EOF
cmake_minimum_required(VERSION 3.26)
project(opcm_cuda_check LANGUAGES CXX)
find_package(Python 3.10 REQUIRED COMPONENTS Interpreter Development.Module)
find_package(pybind11 CONFIG REQUIRED)
include("$REPO/csrc/cuda.cmake")
EOF
  say "no top-level CMakeLists.txt yet: configure a wrapper including csrc/cuda.cmake in $BUILD"
fi

cmake -S "$SRC" -B "$BUILD/cmake" "${GEN[@]}" "${ARCH[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$PYTHON")" \
  -Dpybind11_DIR="$PYBIND11_DIR" \
  -DOPCM_WITH_CUDA=ON \
  -DOPCM_CUDA_WERROR=ON \
  -DOPCM_CUDA_INCLUDE_HINTS="$INC_HINTS" \
  -DOPCM_CUDA_LIB_HINTS="$LIB_HINTS" \
  -DOPCM_MODULE_OUTPUT_DIR="$OUT" \
  || fail "CMake configure failed"

say "build (warnings are errors)"
cmake --build "$BUILD/cmake" --target _cuda --parallel "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  || fail "build failed"

MOD="$(find "$OUT" "$BUILD/cmake" -name '_cuda*.so' -print -quit)"
[[ -n "$MOD" ]] || fail "no _cuda*.so was produced"
echo "module: $MOD ($(du -h "$MOD" | cut -f1))"

say "exported symbols (nm -D)"
nm -D --defined-only "$MOD" | grep -w 'PyInit__cuda' || fail "PyInit__cuda is not exported"

say "dynamic dependencies (readelf -d)"
NEEDED="$(readelf -d "$MOD" | awk '/NEEDED/ {gsub(/[\[\]]/, "", $5); print $5}')"
echo "$NEEDED"
grep -q '^libcusolver\.so' <<<"$NEEDED" || fail "the module does not link libcusolver"
grep -q '^libcublas\.so' <<<"$NEEDED" || fail "the module does not link libcublas"
grep -q '^libcudart\.so' <<<"$NEEDED" || fail "the module does not link the shared libcudart"
if grep -Eq '^lib(torch|c10)' <<<"$NEEDED"; then fail "the module links libtorch"; fi
DYN="$(readelf -d "$MOD")"
grep -E 'RUNPATH|RPATH' <<<"$DYN" || fail "the module has no RUNPATH"
grep -q 'ORIGIN/../nvidia/cu13/lib' <<<"$DYN" || fail "RUNPATH lacks \$ORIGIN/../nvidia/cu13/lib"
if grep -Eq 'path: \[:|::|:\]' <<<"$DYN"; then
  fail "RUNPATH has an empty entry (the current directory)"
fi

say "every dependency resolves (ldd)"
LDD="$(ldd "$MOD")"
echo "$LDD"
if grep -q 'not found' <<<"$LDD"; then fail "unresolved shared libraries"; fi
grep -q 'libcusolver\.so.* => /' <<<"$LDD" || fail "ldd does not resolve libcusolver"
grep -q 'libcublas\.so.* => /' <<<"$LDD" || fail "ldd does not resolve libcublas"

say "device code"
CUOBJDUMP="$(command -v cuobjdump || true)"
[[ -z "$CUOBJDUMP" && -x "$(dirname "$(readlink -f "$(command -v nvcc)")")/cuobjdump" ]] \
  && CUOBJDUMP="$(dirname "$(readlink -f "$(command -v nvcc)")")/cuobjdump"
if [[ -n "$CUOBJDUMP" ]]; then
  ELF="$("$CUOBJDUMP" --list-elf "$MOD")"
  echo "$ELF"
  if [[ -z "${CMAKE_CUDA_ARCHITECTURES:-}" ]]; then
    grep -q 'sm_80' <<<"$ELF" || fail "no sm_80 code in the module"
    grep -q 'sm_90' <<<"$ELF" || fail "no sm_90 code in the module"
    PTX="$("$CUOBJDUMP" --list-ptx "$MOD")"
    grep -q 'sm_90' <<<"$PTX" || fail "no compute_90 PTX in the module"
  fi
else
  # No cuobjdump: the fatbinary keeps, uncompressed, the ptxas options of each
  # SASS image ("-arch sm_80") and the PTX's ".target" line.
  STRS="$(strings -a "$MOD")"
  if [[ -z "${CMAKE_CUDA_ARCHITECTURES:-}" ]]; then
    grep -q -- '-arch sm_80' <<<"$STRS" || fail "no sm_80 code in the module"
    grep -q -- '-arch sm_90' <<<"$STRS" || fail "no sm_90 code in the module"
    grep -q '\.target sm_90' <<<"$STRS" || fail "no compute_90 PTX in the module"
  fi
  echo "cuobjdump not found; the fatbinary holds sm_80 and sm_90 SASS and sm_90 PTX"
fi

say "import without a GPU"
"$PYTHON" - "$MOD" <<'EOF' || fail "importing the module failed"
import importlib.util, sys
# Load this very file (an installed opcm_ext elsewhere on sys.path must not win).
spec = importlib.util.spec_from_file_location("_cuda", sys.argv[1])
c = importlib.util.module_from_spec(spec)
spec.loader.exec_module(c)
info = c.build_info()
print("build_info:", info)
names = ["deltas", "sigma_update", "finalize", "mask_projection", "sumsq",
         "svd_workspace_size", "batched_thin_svd", "build_info"]
missing = [n for n in names if not hasattr(c, n)]
if missing:
    sys.exit(f"missing functions: {missing}")
try:  # argument validation runs before any CUDA call
    c.sumsq(2, 7, 1, 8, 0)
except ValueError as e:
    print("argument check:", e)
else:
    sys.exit("a bad dtype code was accepted")
EOF

say "OK: opcm_ext._cuda compiles, links libcusolver and libcublas, and imports"
