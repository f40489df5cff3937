# CUDA settings for memory3._C: architectures, nvcc flags, CUTLASS/CuTe headers.
#
# Architectures: sm_80 (Ampere) and sm_90a (Hopper, needed for wgmma/setmaxnreg). The
# gencode form is used because `-arch=sm_90a` also runs a plain sm_90 pass.
set(MEMORY3_CUDA_GENCODE
    "-gencode=arch=compute_80,code=sm_80"
    "-gencode=arch=compute_90a,code=sm_90a"
    CACHE STRING "nvcc -gencode flags for the memory3 CUDA kernels")
set(MEMORY3_CUDA_ARCH_LIST "sm_80,sm_90a" CACHE STRING "Targets as text, reported by memory3._C (no semicolons)")
# MEMORY3_CUDA_ARCHS=90a (environment, e.g. bench/gpu.sh on an H100/H200) builds those
# architectures only: a third of the compile time of the default pair.
if(DEFINED ENV{MEMORY3_CUDA_ARCHS})
  set(MEMORY3_CUDA_GENCODE "")
  set(MEMORY3_CUDA_ARCH_LIST "")
  string(REPLACE "," ";" _archs "$ENV{MEMORY3_CUDA_ARCHS}")
  foreach(_arch IN LISTS _archs)
    list(APPEND MEMORY3_CUDA_GENCODE "-gencode=arch=compute_${_arch},code=sm_${_arch}")
    string(APPEND MEMORY3_CUDA_ARCH_LIST "sm_${_arch},")
  endforeach()
  string(REGEX REPLACE ",$" "" MEMORY3_CUDA_ARCH_LIST "${MEMORY3_CUDA_ARCH_LIST}")
endif()

# CUTLASS/CuTe headers come from the `nvidia-cutlass` wheel (see third_party/README.md);
# MEMORY3_CUTLASS_DIR overrides with any folder that holds include/cutlass/cutlass.h.
if(NOT MEMORY3_CUTLASS_DIR)
  execute_process(
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_SOURCE_DIR}/third_party/find_cutlass.py
    OUTPUT_VARIABLE MEMORY3_CUTLASS_DIR OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _cutlass_rc)
endif()
if(MEMORY3_CUTLASS_DIR AND EXISTS "${MEMORY3_CUTLASS_DIR}/include/cutlass/cutlass.h")
  message(STATUS "memory3: CUTLASS headers from ${MEMORY3_CUTLASS_DIR}")
  set(MEMORY3_HAVE_CUTLASS ON)
else()
  message(STATUS "memory3: CUTLASS not found (pip install nvidia-cutlass); kernels that need it are off")
  set(MEMORY3_HAVE_CUTLASS OFF)
endif()

function(memory3_configure_cuda target)
  set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES OFF CUDA_STANDARD 17)
  # The launchers include torch: the C++ ABI flag torch was built with applies to them too.
  separate_arguments(_torch_cuda_flags UNIX_COMMAND "${TORCH_CXX_FLAGS}")
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:${MEMORY3_CUDA_GENCODE} -O3 --use_fast_math
      --expt-relaxed-constexpr -lineinfo ${_torch_cuda_flags} -diag-suppress=3306>)
  target_compile_definitions(${target} PRIVATE
    MEMORY3_CUDA_ARCH_LIST="${MEMORY3_CUDA_ARCH_LIST}")
  if(MEMORY3_HAVE_CUTLASS)
    target_include_directories(${target} PRIVATE ${MEMORY3_CUTLASS_DIR}/include)
    target_compile_definitions(${target} PRIVATE MEMORY3_HAVE_CUTLASS)
  endif()
endfunction()
