// memory3._C as a Python module: importing it registers the ops (static TORCH_LIBRARY
// initializers in this shared library) and exposes what was built.
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

#ifdef MEMORY3_WITH_CUDA
namespace memory3 { std::string cuda_compiled_arches(); }
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "memory3 compiled ops (torch.ops.memory3.*) and build information";
  m.def("build_info", []() {
    py::dict info;
    info["version"] = MEMORY3_VERSION;
#ifdef MEMORY3_WITH_CUDA
    info["has_cuda"] = true;
    info["cuda_arch_list"] = MEMORY3_CUDA_ARCH_LIST;
    info["cuda_compiled_arches"] = memory3::cuda_compiled_arches();
#else
    info["has_cuda"] = false;
    info["cuda_arch_list"] = "";
    info["cuda_compiled_arches"] = "";
#endif
    info["cpu_multiversion"] =
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
        "x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA), x86-64";
#else
        "baseline only";
#endif
    return info;
  }, "What this build of memory3._C contains: version, CUDA arches, CPU ISA variants.");
}
