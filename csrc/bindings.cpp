// pybind11 module gradsae._C: the CUDA kernels behind raw device pointers (ints), sizes,
// strides, dtype codes (0 float32, 1 float16, 2 bfloat16) and a stream handle (int). It does
// not link libtorch, so it builds against any torch; cudart is linked statically and nothing
// touches the device at import. The LatentStats tables travel as one sequence of pointers in
// the order of STATS_FIELDS (csrc/stats_fields.h).

#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "launch.h"
#include "select.cuh"
#include "stats_fields.h"

#if __has_include("gradsae_build_info.h")
#include "gradsae_build_info.h"  // GRADSAE_ARCHS, written by csrc/build.py
#endif

namespace py = pybind11;
using namespace gradsae;

namespace gradsae {

std::string compiled_archs() {
#ifdef GRADSAE_ARCHS
  return GRADSAE_ARCHS;
#else
  return "unknown";
#endif
}

int cuda_runtime_version() { return CUDART_VERSION; }

void register_stream(py::module_& m);  // stream_bindings.cpp

}  // namespace gradsae

template <typename T>
static T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// The table pointers of a STATS_FIELDS-ordered sequence (empty: no statistics).
static StatsTables stats_tables(const py::sequence& s, const char* fn) {
  StatsTables t{};
  if (py::len(s) == 0) return t;
  if (py::len(s) != kNumStatsFields)
    throw std::invalid_argument(std::string("gradsae._C.") + fn + ": stats needs " + std::to_string(kNumStatsFields) +
                                " table pointers in STATS_FIELDS order, got " + std::to_string(py::len(s)));
#define GRADSAE_STATS_FILL(name, type) t.name = ptr<type>(s[kStats_##name].cast<uintptr_t>());
  GRADSAE_STATS_FIELDS(GRADSAE_STATS_FILL)
#undef GRADSAE_STATS_FILL
  return t;
}

static py::tuple stats_field_names() {
  py::list names;
#define GRADSAE_STATS_NAME(name, type) names.append(#name);
  GRADSAE_STATS_FIELDS(GRADSAE_STATS_NAME)
#undef GRADSAE_STATS_NAME
  return py::tuple(names);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "gradsae CUDA kernels: fused encode + selection, split merge, gather-dot, LatentStats accumulation";
  m.attr("MAX_K") = kMaxK;
  m.attr("TILE_COLS") = encode_tile_cols();
  m.attr("FLOAT32") = static_cast<int>(kFloat32);
  m.attr("FLOAT16") = static_cast<int>(kFloat16);
  m.attr("BFLOAT16") = static_cast<int>(kBFloat16);
  m.attr("STATS_FIELDS") = stats_field_names();

  m.def("compiled_archs", &compiled_archs, "GPU architectures compiled in (SASS sm_XX, PTX compute_XX)");
  m.def("cuda_runtime_version", &cuda_runtime_version, "CUDA runtime version the module was built with (e.g. 13000)");
  m.def("topk_pad", [](int k) { return topk_pad(k); }, "keys kept per row for a top-k of k");
  m.def("encode_smem_bytes", &encode_smem_bytes, py::arg("dtype"), py::arg("mode"), py::arg("kp"),
        py::arg("tile_rows"), "dynamic shared memory one encode CTA of tile_rows (32 or 64) rows needs");

  m.def(
      "encode_select",
      [](int device, uintptr_t stream, uintptr_t x, int64_t x_stride, uintptr_t w, int64_t w_stride, uintptr_t bias,
         uintptr_t scale, uintptr_t thr, int dtype, int n, int d_in, int d_sae, int mode, int k, int kp, int cap,
         int split_cols, int n_splits, int tile_rows, uintptr_t parts, uintptr_t counts, bool vec) {
        EncodeArgs a{ptr<const void>(x), x_stride, ptr<const void>(w), w_stride, ptr<const void>(bias),
                     ptr<const float>(scale), ptr<const float>(thr), dtype, n, d_in, d_sae, mode, k, kp, cap,
                     split_cols, n_splits, tile_rows, ptr<uint64_t>(parts), ptr<int>(counts), vec};
        py::gil_scoped_release nogil;
        encode_select(device, stream, a);
      },
      py::arg("device"), py::arg("stream"), py::arg("x"), py::arg("x_stride"), py::arg("w"), py::arg("w_stride"),
      py::arg("bias"), py::arg("scale"), py::arg("thr"), py::arg("dtype"), py::arg("n"), py::arg("d_in"),
      py::arg("d_sae"), py::arg("mode"), py::arg("k"), py::arg("kp"), py::arg("cap"), py::arg("split_cols"),
      py::arg("n_splits"), py::arg("tile_rows"), py::arg("parts"), py::arg("counts"), py::arg("vec"),
      "fused encode GEMM + per-split selection (mode 0 top-k, 1 threshold) into parts/counts");

  m.def(
      "merge_topk",
      [](int device, uintptr_t stream, uintptr_t parts, int n, int n_splits, int k, int kp, uintptr_t idx,
         uintptr_t acts) {
        py::gil_scoped_release nogil;
        merge_topk(device, stream, ptr<const uint64_t>(parts), n, n_splits, k, kp, ptr<int64_t>(idx), ptr<float>(acts));
      },
      py::arg("device"), py::arg("stream"), py::arg("parts"), py::arg("n"), py::arg("n_splits"), py::arg("k"),
      py::arg("kp"), py::arg("idx"), py::arg("acts"), "merge per-split top-kp keys into [n, k] indices and values");

  m.def(
      "merge_threshold",
      [](int device, uintptr_t stream, uintptr_t parts, uintptr_t counts, int n, int n_splits, int cap, int cap_out,
         uintptr_t idx, uintptr_t acts, uintptr_t row_counts) {
        py::gil_scoped_release nogil;
        merge_threshold(device, stream, ptr<const uint64_t>(parts), ptr<const int>(counts), n, n_splits, cap, cap_out,
                        ptr<int64_t>(idx), ptr<float>(acts), ptr<int>(row_counts));
      },
      py::arg("device"), py::arg("stream"), py::arg("parts"), py::arg("counts"), py::arg("n"), py::arg("n_splits"),
      py::arg("cap"), py::arg("cap_out"), py::arg("idx"), py::arg("acts"), py::arg("row_counts"),
      "concatenate per-split compacted lists into [n, cap_out] slots; row_counts gets each row's total");

  m.def(
      "gather_dot",
      [](int device, uintptr_t stream, uintptr_t w, int64_t w_stride, int w_dtype, uintptr_t d, int64_t d_stride,
         int d_dtype, uintptr_t idx, int64_t n, int K, int d_in, uintptr_t row_scale, uintptr_t col_scale,
         uintptr_t out, bool vec, uintptr_t acts, uintptr_t mask, const py::sequence& stats) {
        GatherArgs a{ptr<const void>(w), w_stride, w_dtype, ptr<const void>(d), d_stride, d_dtype,
                     ptr<const int64_t>(idx), n, K, d_in, ptr<const float>(row_scale), ptr<const float>(col_scale),
                     ptr<float>(out), vec, ptr<const float>(acts), ptr<const bool>(mask),
                     stats_tables(stats, "gather_dot")};
        py::gil_scoped_release nogil;
        gather_dot(device, stream, a);
      },
      py::arg("device"), py::arg("stream"), py::arg("w"), py::arg("w_stride"), py::arg("w_dtype"), py::arg("d"),
      py::arg("d_stride"), py::arg("d_dtype"), py::arg("idx"), py::arg("n"), py::arg("K"), py::arg("d_in"),
      py::arg("row_scale") = 0, py::arg("col_scale") = 0, py::arg("out") = 0, py::arg("vec") = false,
      py::arg("acts") = 0, py::arg("mask") = 0, py::arg("stats") = py::tuple(),
      "gather-dot of W rows with D rows (0 = null pointer); with stats (table pointers in STATS_FIELDS "
      "order), fused LatentStats atomics");

  m.def(
      "segment_stats",
      [](int device, uintptr_t stream, uintptr_t j, uintptr_t acts, uintptr_t scores, int64_t m_,
         const py::sequence& stats) {
        StatsTables t = stats_tables(stats, "segment_stats");
        py::gil_scoped_release nogil;
        segment_stats(device, stream, ptr<const int64_t>(j), ptr<const float>(acts), ptr<const float>(scores), m_, t);
      },
      py::arg("device"), py::arg("stream"), py::arg("j"), py::arg("acts"), py::arg("scores"), py::arg("m"),
      py::arg("stats"),
      "deterministic LatentStats update from entries sorted by latent (stats: table pointers in STATS_FIELDS order)");

  register_stream(m);
}
