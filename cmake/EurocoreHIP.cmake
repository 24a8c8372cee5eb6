# HIP helpers for CMakeLists.txt.
#
# eurocore_hip_prepare()
#   Call before check_language(HIP) or enable_language(HIP). HIP here means AMD (NVIDIA is the
#   CUDA build), so CMAKE_HIP_PLATFORM defaults to amd: CMake >= 3.28 would otherwise follow
#   `hipconfig --platform`, which says nvidia wherever nvcc is installed, as on the CI machine.
#   And it lets CMake's HIP language (enable_language(HIP), CMake >= 3.24) use the HIP that Debian
#   and Ubuntu package themselves (`apt-get install hipcc`: HIP 5.2 and clang 15 on Debian 12).
#   Their layout differs from AMD's /opt/rocm in ways CMake does not expect:
#     1. clang is named clang++-15, so CMake's search for `clang++` finds nothing;
#     2. that clang finds the HIP headers and the device libraries only when told
#        (--rocm-path, --hip-device-lib-path): hipcc passes them, CMake does not, so even
#        CMake's compiler identification fails;
#     3. the hip-lang CMake package lives in lib/<multiarch>/cmake, where CMake before 3.28
#        does not look, and its dependency amd_comgr is not found from the try_compile
#        projects CMake builds before it knows the library architecture;
#     4. that package puts /usr/include on the -isystem path, ahead of libstdc++'s headers,
#        where it breaks <cmath> (`#include_next <math.h>` finds nothing).
#   The fix takes clang, the ROCm path, the device-library path and the HIP version from hipcc
#   itself (HIPCC_VERBOSE=3 prints them), so nothing is hard-coded, and points CMake at a small
#   wrapper of the hip-lang package written into the build tree. It does nothing where CMake
#   finds ROCm by itself (AMD's /opt/rocm layout, as on LUMI), and a compiler chosen with
#   CMAKE_HIP_COMPILER or HIPCXX is kept.
#
# eurocore_hip_supported_archs(<out-var> <arch>...)
#   The architectures of the list that the HIP compiler can build a kernel for, in order.
#   Must be called after enable_language(HIP). The result of each probe is cached.

# Macros, not functions: the variables they set must reach enable_language(HIP).
macro(eurocore_hip_prepare)
  if(NOT DEFINED CMAKE_HIP_PLATFORM)
    set(CMAKE_HIP_PLATFORM amd)
  endif()
  # AUTO then HIP calls it twice in one configure; the flags must be added once.
  if(NOT _eurocore_hip_prepared)
    set(_eurocore_hip_prepared TRUE)
    _eurocore_hip_use_distro_packages()
  endif()
endmacro()

macro(_eurocore_hip_use_distro_packages)
  find_program(EUROCORE_HIPCC hipcc)
  find_program(EUROCORE_HIPCONFIG hipconfig)
  mark_as_advanced(EUROCORE_HIPCC EUROCORE_HIPCONFIG)
  unset(_eurocore_hip_lang_dir)
  if(EUROCORE_HIPCC AND EUROCORE_HIPCONFIG)
    execute_process(COMMAND "${EUROCORE_HIPCONFIG}" --rocmpath
      OUTPUT_VARIABLE _eurocore_rocm_root OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(NOT EXISTS "${_eurocore_rocm_root}/lib/cmake/hip-lang/hip-lang-config.cmake"
       AND CMAKE_LIBRARY_ARCHITECTURE
       AND EXISTS "${_eurocore_rocm_root}/lib/${CMAKE_LIBRARY_ARCHITECTURE}/cmake/hip-lang/hip-lang-config.cmake")
      set(_eurocore_hip_lang_dir "${_eurocore_rocm_root}/lib/${CMAKE_LIBRARY_ARCHITECTURE}/cmake/hip-lang")
    endif()
  endif()
  if(DEFINED _eurocore_hip_lang_dir)
    # HIP_PLATFORM=amd: hipcc otherwise picks nvcc when it sees one. The --offload-arch keeps
    # hipcc from probing the (absent) GPU for a default architecture.
    execute_process(
      COMMAND "${CMAKE_COMMAND}" -E env HIP_PLATFORM=amd HIPCC_VERBOSE=3
              "${EUROCORE_HIPCC}" --offload-arch=gfx90a --version
      OUTPUT_VARIABLE _eurocore_hipcc_out ERROR_QUIET RESULT_VARIABLE _eurocore_hipcc_rc)
    if(NOT _eurocore_hipcc_rc EQUAL 0
       OR NOT _eurocore_hipcc_out MATCHES "hipcc-cmd: *([^ \n]+)")
      message(FATAL_ERROR "eurocore: '${EUROCORE_HIPCC}' (HIPCC_VERBOSE=3) did not print the clang it runs:\n${_eurocore_hipcc_out}")
    endif()
    set(_eurocore_hip_clang "${CMAKE_MATCH_1}")
    set(_eurocore_hip_flags "")
    if(_eurocore_hipcc_out MATCHES "\nROCM_PATH=([^\n]+)")
      string(APPEND _eurocore_hip_flags " --rocm-path=${CMAKE_MATCH_1}")
    endif()
    if(_eurocore_hipcc_out MATCHES "\nDEVICE_LIB_PATH=([^\n]+)")
      string(APPEND _eurocore_hip_flags " --hip-device-lib-path=${CMAKE_MATCH_1}")
    endif()
    # clang misreads Debian's share/hip/version (it reports 3.5.0); hipcc passes the version.
    if(_eurocore_hipcc_out MATCHES "--hip-version=([^ \n]+)")
      string(APPEND _eurocore_hip_flags " --hip-version=${CMAKE_MATCH_1}")
    endif()

    if(NOT DEFINED CMAKE_HIP_COMPILER AND "$ENV{HIPCXX}" STREQUAL "")
      set(CMAKE_HIP_COMPILER "${_eurocore_hip_clang}")
    endif()
    # Appended to the normal variable on every configure (never stored in the cache), so a
    # CMAKE_HIP_FLAGS given by the user is kept and nothing accumulates.
    string(APPEND CMAKE_HIP_FLAGS "${_eurocore_hip_flags}")

    # The wrapper package: CMake loads <root>/lib/cmake/hip-lang (CMake < 3.28: ROCM_ROOT;
    # later: ROCM_LIB); it includes Debian's package and removes /usr/include from its targets
    # (the compiler searches /usr/include anyway, after libstdc++).
    set(_eurocore_hip_root "${CMAKE_BINARY_DIR}/eurocore-hip-root")
    file(CONFIGURE OUTPUT "${_eurocore_hip_root}/lib/cmake/hip-lang/hip-lang-config.cmake"
      @ONLY CONTENT [=[
# Written by eurocore's cmake/EurocoreHIP.cmake: the distribution's hip-lang package, adjusted
# for CMake's HIP language (see there).
if(NOT CMAKE_LIBRARY_ARCHITECTURE)
  # CMake's compiler checks run before the library architecture is known; without it
  # find_package misses the dependencies under lib/<arch>/cmake.
  set(CMAKE_LIBRARY_ARCHITECTURE "@CMAKE_LIBRARY_ARCHITECTURE@")
endif()
include("@_eurocore_hip_lang_dir@/hip-lang-config.cmake")
foreach(_eurocore_target IN ITEMS hip-lang::device hip-lang::amdhip64)
  foreach(_eurocore_prop IN ITEMS INTERFACE_INCLUDE_DIRECTORIES INTERFACE_SYSTEM_INCLUDE_DIRECTORIES)
    get_target_property(_eurocore_dirs ${_eurocore_target} ${_eurocore_prop})
    if(_eurocore_dirs)
      # Entries sit inside $<$<COMPILE_LANGUAGE:HIP>:a;b>: drop each /usr/include entry and
      # the separator it leaves behind.
      set(_eurocore_before "")
      while(NOT _eurocore_dirs STREQUAL _eurocore_before)
        set(_eurocore_before "${_eurocore_dirs}")
        string(REGEX REPLACE "([:;])/usr/include/?([;>])" "\\1\\2" _eurocore_dirs "${_eurocore_dirs}")
      endwhile()
      string(REGEX REPLACE ";+" ";" _eurocore_dirs "${_eurocore_dirs}")
      string(REPLACE ":;" ":" _eurocore_dirs "${_eurocore_dirs}")
      string(REPLACE ";>" ">" _eurocore_dirs "${_eurocore_dirs}")
      set_target_properties(${_eurocore_target} PROPERTIES ${_eurocore_prop} "${_eurocore_dirs}")
    endif()
  endforeach()
endforeach()
]=])
    set(CMAKE_HIP_COMPILER_ROCM_ROOT "${_eurocore_hip_root}")
    set(CMAKE_HIP_COMPILER_ROCM_LIB "${_eurocore_hip_root}/lib")
    message(STATUS "eurocore: distribution HIP packages in ${_eurocore_rocm_root}: HIP compiler ${_eurocore_hip_clang},${_eurocore_hip_flags}")
  endif()
endmacro()

function(eurocore_hip_supported_archs out_var)
  include(CheckSourceCompiles)
  set(supported "")
  foreach(arch IN LISTS ARGN)
    # One architecture at a time: try_compile builds for CMAKE_HIP_ARCHITECTURES of this scope.
    set(CMAKE_HIP_ARCHITECTURES ${arch})
    set(CMAKE_TRY_COMPILE_TARGET_TYPE STATIC_LIBRARY)  # device code is built; no host link
    string(MAKE_C_IDENTIFIER "EUROCORE_HIP_HAS_${arch}" result_var)
    check_source_compiles(HIP [=[
#include <hip/hip_runtime.h>
__global__ void eurocore_probe(float* x) { x[threadIdx.x] = 1.0f; }
]=] ${result_var})
    if(${result_var})
      list(APPEND supported ${arch})
    endif()
  endforeach()
  set(${out_var} ${supported} PARENT_SCOPE)
endfunction()
