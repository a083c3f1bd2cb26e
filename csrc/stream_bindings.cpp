// pybind11 functions of the streaming selection kernels (stream.cu), registered on gradsae._C
// by bindings.cpp. Same conventions: raw device pointers as ints (0 = null), a stream handle.

#include <pybind11/pybind11.h>

#include "select.cuh"
#include "stream.h"

namespace py = pybind11;

namespace gradsae {

template <typename T>
static T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void register_stream(py::module_& m) {
  m.def("stream_topk_smem_bytes", &stream_topk_smem_bytes, py::arg("kp"),
        "dynamic shared memory of one block of the streaming top-k fold");
  m.def(
      "stream_topk",
      [](int device, uintptr_t stream, uintptr_t p, int64_t p_stride, int dtype, int n, int ncols, int64_t c0,
         uintptr_t bias, uintptr_t scale, int k, int kp, uintptr_t best, bool vec) {
        StreamArgs a{};
        a.p = as_ptr<const void>(p);
        a.p_stride = p_stride;
        a.dtype = dtype;
        a.n = n;
        a.ncols = ncols;
        a.c0 = c0;
        a.bias = as_ptr<const float>(bias);
        a.scale = as_ptr<const float>(scale);
        a.k = k;
        a.kp = kp;
        a.best = as_ptr<uint64_t>(best);
        a.vec = vec;
        py::gil_scoped_release nogil;
        stream_topk(device, stream, a);
      },
      py::arg("device"), py::arg("stream"), py::arg("p"), py::arg("p_stride"), py::arg("dtype"), py::arg("n"),
      py::arg("ncols"), py::arg("c0"), py::arg("bias"), py::arg("scale"), py::arg("k"), py::arg("kp"),
      py::arg("best"), py::arg("vec"),
      "fold a chunk [n, ncols] of pre-activations (latents c0..) into the running top-k keys best [n, kp]");
  m.def(
      "stream_threshold",
      [](int device, uintptr_t stream, uintptr_t p, int64_t p_stride, int dtype, int n, int ncols, int64_t c0,
         uintptr_t bias, uintptr_t scale, uintptr_t thr, int cap, uintptr_t idx, uintptr_t val, uintptr_t counts,
         bool vec) {
        StreamArgs a{};
        a.p = as_ptr<const void>(p);
        a.p_stride = p_stride;
        a.dtype = dtype;
        a.n = n;
        a.ncols = ncols;
        a.c0 = c0;
        a.bias = as_ptr<const float>(bias);
        a.scale = as_ptr<const float>(scale);
        a.thr = as_ptr<const float>(thr);
        a.cap = cap;
        a.idx = as_ptr<int64_t>(idx);
        a.val = as_ptr<float>(val);
        a.counts = as_ptr<int>(counts);
        a.vec = vec;
        py::gil_scoped_release nogil;
        stream_threshold(device, stream, a);
      },
      py::arg("device"), py::arg("stream"), py::arg("p"), py::arg("p_stride"), py::arg("dtype"), py::arg("n"),
      py::arg("ncols"), py::arg("c0"), py::arg("bias"), py::arg("scale"), py::arg("thr"), py::arg("cap"),
      py::arg("idx"), py::arg("val"), py::arg("counts"), py::arg("vec"),
      "fold a chunk into per-row slots idx/val [n, cap] of latents with v > thr; counts [n] keep counting past cap");
}

}  // namespace gradsae
