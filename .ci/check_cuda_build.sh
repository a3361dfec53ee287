#!/usr/bin/env bash
# Compile and link the CUDA backend (opcm_ext._cuda) on a machine that has nvcc
# but no GPU, then check the module: its PyInit symbol, that it links
# libcusolver and libcublas (and not libtorch), its run path, that every
# dependency resolves, that it carries sm_80/sm_90 code, and that Python can
# import it and read the loaded libraries' versions.
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

# CMake finds cuSOLVER/cuBLAS itself: the pip wheels of nvcc's CUDA major version
# (opcm_ext/_cuda_wheels.py), else the toolkit.
say "configure the project with OPCM_WITH_CUDA=ON in $BUILD"
cmake -S "$REPO" -B "$BUILD/cmake" "${GEN[@]}" "${ARCH[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$PYTHON")" \
  -Dpybind11_DIR="$PYBIND11_DIR" \
  -DOPCM_WITH_CUDA=ON \
  -DOPCM_CUDA_WERROR=ON \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$OUT" \
  || fail "CMake configure failed"
# The $ORIGIN-relative run path of this CUDA family's wheels, as CMake was told it.
FAMILY_RPATH="$(sed -n 's/^set(OPCM_WHEEL_RPATH "\([^;"]*\).*/\1/p' "$BUILD/cmake/opcm_wheels.cmake")"
[[ -n "$FAMILY_RPATH" ]] || fail "CMake did not record the wheels' run path (opcm_wheels.cmake)"

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
grep -qF "$FAMILY_RPATH" <<<"$DYN" || fail "RUNPATH lacks $FAMILY_RPATH"
# cusolverDnXsyevBatched is looked up at run time (older cuSOLVERs lack it), never linked.
if nm -D --undefined-only "$MOD" | grep -q 'cusolverDnXsyevBatched'; then
  fail "the module links cusolverDnXsyevBatched directly (it must load next to cuSOLVER < 11.7.2)"
fi
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
print("build_info:", c.build_info())
print("runtime_info:", c.runtime_info())  # versions of the libraries loaded; no GPU needed
names = ["deltas", "sigma_update", "finalize", "mask_projection", "sumsq", "svd_workspace_size",
         "batched_thin_svd", "init_handles", "build_info", "runtime_info", "_set_svd_path"]
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
