# CUDA backend: builds the pybind11 module opcm_ext._cuda.
#
# Included by the top-level CMakeLists.txt (inside its CUDA branch) after
# pybind11 has been found. Inputs:
#   OPCM_CUDA_LIB_HINTS      directories to search first for libcusolver and
#                            libcublas (e.g. site-packages/nvidia/cu13/lib)
#   OPCM_CUDA_INCLUDE_HINTS  directories to search first for cusolverDn.h and
#                            cublas_v2.h (e.g. site-packages/nvidia/cu13/include)
#   OPCM_MODULE_OUTPUT_DIR   (optional) where to put the module; by default the
#                            LIBRARY_OUTPUT_DIRECTORY of the CPU module `_C`
#   CMAKE_CUDA_ARCHITECTURES (optional) default: sm_80 and sm_90 code plus
#                            compute_90 PTX (JIT-compiled on newer GPUs)
#   OPCM_CUDA_WERROR         (optional, OFF) warnings are errors (CI)
#   OPCM_CUDA_RPATH          (optional) extra run paths from the top-level file
# OPCM_CUSOLVER_LIBRARY & co. may already be set by the top-level file; the
# searches below then keep its results.
# The module links neither libtorch nor the static CUDA runtime: it uses the
# shared libcudart, which torch's CUDA wheels also load, so both share one
# runtime (and one set of primary contexts) in the process.

include_guard(GLOBAL)

# Must precede enable_language(CUDA), which would otherwise pick nvcc's default.
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
  set(CMAKE_CUDA_ARCHITECTURES "80-real;90-real;90-virtual")
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

option(OPCM_CUDA_WERROR "Treat warnings in the CUDA backend as errors" OFF)

# --- cuSOLVER / cuBLAS: headers and libraries from the same place, the hints
# (pip wheels) first, then the toolkit. The wheels ship only versioned
# sonames (libcusolver.so.12, libcublas.so.13) and no unversioned
# development symlink, so the versioned names are searched too; the file is
# then linked by its full path and the recorded DT_NEEDED is its soname.
set(_opcm_cuda_lib_dirs ${OPCM_CUDA_LIB_HINTS} ${CUDAToolkit_LIBRARY_DIR})
set(_opcm_cuda_inc_dirs ${OPCM_CUDA_INCLUDE_HINTS} ${CUDAToolkit_INCLUDE_DIRS})

find_path(OPCM_CUSOLVER_INCLUDE_DIR cusolverDn.h HINTS ${_opcm_cuda_inc_dirs})
find_path(OPCM_CUBLAS_INCLUDE_DIR cublas_v2.h HINTS ${_opcm_cuda_inc_dirs})
find_library(OPCM_CUSOLVER_LIBRARY
  NAMES cusolver libcusolver.so.13 libcusolver.so.12 libcusolver.so.11
  NAMES_PER_DIR HINTS ${_opcm_cuda_lib_dirs})
find_library(OPCM_CUBLAS_LIBRARY
  NAMES cublas libcublas.so.14 libcublas.so.13 libcublas.so.12
  NAMES_PER_DIR HINTS ${_opcm_cuda_lib_dirs})
foreach(_v OPCM_CUSOLVER_INCLUDE_DIR OPCM_CUBLAS_INCLUDE_DIR OPCM_CUSOLVER_LIBRARY
           OPCM_CUBLAS_LIBRARY)
  if(NOT ${_v})
    message(FATAL_ERROR
      "opcm-ext CUDA backend: ${_v} not found (searched ${_opcm_cuda_inc_dirs} "
      "${_opcm_cuda_lib_dirs}). Install the nvidia-cusolver and nvidia-cublas wheels "
      "or a CUDA toolkit with cuSOLVER/cuBLAS, or configure with -DOPCM_WITH_CUDA=OFF.")
  endif()
endforeach()

# cusolverDnXsyevBatched appeared in cuSOLVER 11.7; read the header we compile
# against rather than trusting a version number.
file(STRINGS "${OPCM_CUSOLVER_INCLUDE_DIR}/cusolverDn.h" _opcm_syev_batched
     REGEX "cusolverDnXsyevBatched[ \t]*\\(")
if(_opcm_syev_batched)
  set(OPCM_HAVE_XSYEVBATCHED 1)
else()
  set(OPCM_HAVE_XSYEVBATCHED 0)
endif()

message(STATUS "opcm-ext CUDA: nvcc ${CMAKE_CUDA_COMPILER_VERSION}, "
               "architectures ${CMAKE_CUDA_ARCHITECTURES}")
message(STATUS "opcm-ext CUDA: cuSOLVER ${OPCM_CUSOLVER_LIBRARY} "
               "(headers ${OPCM_CUSOLVER_INCLUDE_DIR}, XsyevBatched=${OPCM_HAVE_XSYEVBATCHED})")
message(STATUS "opcm-ext CUDA: cuBLAS ${OPCM_CUBLAS_LIBRARY} (headers ${OPCM_CUBLAS_INCLUDE_DIR})")

set(_opcm_cuda_dir "${CMAKE_CURRENT_LIST_DIR}")
pybind11_add_module(_cuda MODULE
  "${_opcm_cuda_dir}/bindings_cuda.cpp"
  "${_opcm_cuda_dir}/update/update.cu"
  "${_opcm_cuda_dir}/project/mask.cu"
  "${_opcm_cuda_dir}/svd/solver_context.cu"
  "${_opcm_cuda_dir}/svd/thin_svd.cu")

# The library headers must win over any older copies in the toolkit, which
# nvcc puts on its own include path.
target_include_directories(_cuda BEFORE PRIVATE
  "${OPCM_CUSOLVER_INCLUDE_DIR}" "${OPCM_CUBLAS_INCLUDE_DIR}")
target_include_directories(_cuda PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
target_compile_definitions(_cuda PRIVATE OPCM_HAVE_XSYEVBATCHED=${OPCM_HAVE_XSYEVBATCHED})
target_compile_features(_cuda PRIVATE cxx_std_17 cuda_std_17)
target_link_libraries(_cuda PRIVATE "${OPCM_CUSOLVER_LIBRARY}" "${OPCM_CUBLAS_LIBRARY}")

set(_opcm_cuda_warn -Wall -Wextra)
set(_opcm_nvcc_werror)
if(OPCM_CUDA_WERROR)
  list(APPEND _opcm_cuda_warn -Werror)
  set(_opcm_nvcc_werror --Werror all-warnings)
endif()
list(JOIN _opcm_cuda_warn "," _opcm_cuda_warn_csv)
target_compile_options(_cuda PRIVATE
  $<$<COMPILE_LANGUAGE:CXX>:${_opcm_cuda_warn}>
  $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=${_opcm_cuda_warn_csv}>
  $<$<COMPILE_LANGUAGE:CUDA>:${_opcm_nvcc_werror}>)

# libcusolver needs libcublasLt, libcusparse and libnvJitLink from the same
# directory at link time too (ld resolves the DT_NEEDED of shared inputs).
get_filename_component(_opcm_cusolver_dir "${OPCM_CUSOLVER_LIBRARY}" DIRECTORY)
get_filename_component(_opcm_cublas_dir "${OPCM_CUBLAS_LIBRARY}" DIRECTORY)
target_link_options(_cuda PRIVATE
  "LINKER:-rpath-link,${_opcm_cusolver_dir}" "LINKER:-rpath-link,${_opcm_cublas_dir}")

# Run-time search path: the installed module sits in site-packages/opcm_ext/,
# the NVIDIA wheels in site-packages/nvidia/ (CUDA 13: one cu13/lib; CUDA 12:
# one lib dir per component). The absolute directories found above come last,
# for builds used in place. opcm_ext/_native.py also preloads these libraries.
set(_opcm_cuda_rpath
  ${OPCM_CUDA_RPATH}  # the top-level CMakeLists.txt's list, when it provides one
  "$ORIGIN/../nvidia/cu13/lib"
  "$ORIGIN/../nvidia/cusolver/lib"
  "$ORIGIN/../nvidia/cublas/lib"
  "$ORIGIN/../nvidia/cusparse/lib"
  "$ORIGIN/../nvidia/nvjitlink/lib"
  "$ORIGIN/../nvidia/cuda_runtime/lib"
  "${_opcm_cusolver_dir}"
  "${_opcm_cublas_dir}")
list(REMOVE_DUPLICATES _opcm_cuda_rpath)

set_target_properties(_cuda PROPERTIES
  CUDA_RUNTIME_LIBRARY Shared
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
  CXX_STANDARD 17
  CXX_STANDARD_REQUIRED ON
  POSITION_INDEPENDENT_CODE ON
  # One run path for the build tree and the install: CMake then has nothing to
  # rewrite at install time and does not pad the build RUNPATH with ':' (an
  # empty entry, i.e. the current directory).
  BUILD_WITH_INSTALL_RPATH ON
  INSTALL_RPATH "${_opcm_cuda_rpath}")

# Same output directory as the CPU module, so both land in opcm_ext/.
if(DEFINED OPCM_MODULE_OUTPUT_DIR)
  set(_opcm_cuda_out "${OPCM_MODULE_OUTPUT_DIR}")
elseif(TARGET _C)
  get_target_property(_opcm_cuda_out _C LIBRARY_OUTPUT_DIRECTORY)
else()
  set(_opcm_cuda_out "")
endif()
if(_opcm_cuda_out)
  set_target_properties(_cuda PROPERTIES LIBRARY_OUTPUT_DIRECTORY "${_opcm_cuda_out}")
  foreach(_cfg Debug Release RelWithDebInfo MinSizeRel)
    string(TOUPPER "${_cfg}" _CFG)
    set_target_properties(_cuda PROPERTIES LIBRARY_OUTPUT_DIRECTORY_${_CFG} "${_opcm_cuda_out}")
  endforeach()
endif()
