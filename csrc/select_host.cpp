// Host-only driver of the selection logic in select.cuh, for tests on machines without a GPU.
//
// It runs exactly the functions the device kernels run, with one worker or with a 32-lane
// warp emulated by threads (`topk32`, `threshold32`: barriers for __syncwarp, a flag
// exchange for __ballot_sync; `lanes`: the sort network's lane partition), and mirrors the
// kernels' orchestration: per split, tiles of `bn` columns feed the top-k / threshold
// epilogue; the split results are merged as the merge kernels do.
//
// Protocol: `select_host COMMAND < input > output`, little-endian binary.
//   keys:      in  int32 n, float32 v[n], uint32 index[n]
//              out uint64 key[n], float32 value[n], uint32 index[n]
//   sort:      in  int32 n (power of two), uint64 key[n]       out uint64 key[n] (descending)
//   lanes:     as sort, with the compare-exchange steps spread over 32 emulated lanes
//   topk:      in  int32 rows, cols, k, bn, split_cols, has_thr; float32 v[rows*cols]; float32 thr[cols] if has_thr
//              out int64 idx[rows*k], float32 val[rows*k]
//   threshold: in  int32 rows, cols, cap, bn, split_cols; float32 v[rows*cols]; float32 thr[cols]
//              out int32 total[rows], int64 idx[rows*cap], float32 val[rows*cap]
//   topk32, threshold32: as topk, threshold, on an emulated 32-lane warp
//
// Streaming selection (stream.cuh, the chunked strategy): the matrix is cut into chunks of
// `chunk` columns, each copied into a [rows, width] buffer as the GEMM writes it, and folded
// row by row as the kernels do; `dtype` 0 float32 (values as float32), 1 float16, 2 bfloat16
// (values as uint16 bits); `vec` asks for 16-byte loads where the layout allows them.
//   stream_topk:      in  int32 rows, cols, k, chunk, dtype, has_bias, has_scale, vec; values;
//                         float32 bias[cols] if has_bias; float32 scale[cols] if has_scale
//                     out int64 idx[rows*k], float32 val[rows*k]
//   stream_threshold: in  int32 rows, cols, cap, chunk, dtype, has_bias, has_scale, vec; values;
//                         bias, scale as above; float32 thr[cols]
//                     out int32 total[rows], int64 idx[rows*cap], float32 val[rows*cap]
//   stream_topk32, stream_threshold32: the same on an emulated 32-lane warp

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "select.cuh"
#include "stream.cuh"

using namespace gradsae;

namespace {

struct NoSync {
  void operator()() const {}
};
struct OneLaneBallot {
  uint32_t operator()(bool p) const { return p ? 1u : 0u; }
};

// A 32-lane warp emulated with threads: sync() is a barrier, ballot() a barrier-fenced
// exchange of flags. Racy or lane-divergent code shows up as wrong results or a hang.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const int gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen != gen_; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0, gen_ = 0;
};

struct EmuSync {
  Barrier* bar;
  void operator()() const { bar->wait(); }
};
struct EmuBallot {
  Barrier* bar;
  int* flags;
  int lane;
  uint32_t operator()(bool p) const {
    flags[lane] = p;
    bar->wait();
    uint32_t m = 0;
    for (int i = 0; i < 32; ++i) m |= static_cast<uint32_t>(flags[i] != 0) << i;
    bar->wait();
    return m;
  }
};

// Run fn(lane, nlanes, sync, ballot) as one worker (nlanes = 1) or as an emulated warp.
template <class Fn>
void on_warp(int nlanes, Fn fn) {
  if (nlanes == 1) {
    fn(0, 1, NoSync{}, OneLaneBallot{});
    return;
  }
  Barrier bar(32);
  int flags[32] = {0};
  std::vector<std::thread> lanes;
  for (int lane = 0; lane < 32; ++lane)
    lanes.emplace_back([&, lane] { fn(lane, 32, EmuSync{&bar}, EmuBallot{&bar, flags, lane}); });
  for (auto& t : lanes) t.join();
}

template <typename T>
std::vector<T> read_n(size_t n) {
  std::vector<T> v(n);
  if (n && fread(v.data(), sizeof(T), n, stdin) != n) {
    fprintf(stderr, "select_host: short input\n");
    exit(2);
  }
  return v;
}

int32_t read_i32() { return read_n<int32_t>(1)[0]; }

template <typename T>
void write_all(const std::vector<T>& v) {
  if (!v.empty()) fwrite(v.data(), sizeof(T), v.size(), stdout);
}

int cmd_keys() {
  int n = read_i32();
  auto v = read_n<float>(n);
  auto ix = read_n<uint32_t>(n);
  std::vector<uint64_t> keys(n);
  std::vector<float> back(n);
  std::vector<uint32_t> bix(n);
  for (int i = 0; i < n; ++i) {
    keys[i] = pack_key(v[i], ix[i]);
    back[i] = key_value(keys[i]);
    bix[i] = key_index(keys[i]);
  }
  write_all(keys);
  write_all(back);
  write_all(bix);
  return 0;
}

int cmd_sort(bool lanes) {
  int n = read_i32();
  if (!is_pow2(n)) return 3;
  auto a = read_n<uint64_t>(n);
  if (!lanes) {
    bitonic_sort_desc(a.data(), n, 0, 1, NoSync{});
  } else {
    // Every step's pairs are disjoint, so running the lanes one after another between two
    // synchronisation points is what a warp does in parallel.
    for (int size = 2; size <= n; size <<= 1)
      for (int stride = size / 2; stride > 0; stride >>= 1)
        for (int lane = 0; lane < 32; ++lane) bitonic_step_desc(a.data(), n, size, stride, lane, 32, NoSync{});
  }
  write_all(a);
  return 0;
}

int cmd_topk(int nlanes) {
  int rows = read_i32(), cols = read_i32(), k = read_i32(), bn = read_i32(), split_cols = read_i32();
  int has_thr = read_i32();
  auto v = read_n<float>((size_t)rows * cols);
  std::vector<float> thr = has_thr ? read_n<float>(cols) : std::vector<float>();
  const int kp = topk_pad(k), cp = kp > bn ? kp : bn;
  const int n_splits = (cols + split_cols - 1) / split_cols;
  std::vector<uint64_t> parts((size_t)rows * n_splits * kp), queue(cp), state(kp), scratch(kp);
  for (int r = 0; r < rows; ++r)
    for (int s = 0; s < n_splits; ++s) {
      std::fill(state.begin(), state.end(), kEmptyKey);
      std::fill(queue.begin(), queue.end(), 0xdeadbeefULL);  // garbage beyond the queue length
      const int c_end = (s + 1) * split_cols < cols ? (s + 1) * split_cols : cols;
      on_warp(nlanes, [&](int lane, int nl, auto sync, auto ballot) {
        int q = 0;  // every lane tracks the same queue length, as on the device
        for (int c0 = s * split_cols; c0 < c_end; c0 += bn) {
          int nc = c_end - c0 < bn ? c_end - c0 : bn;
          q = topk_tile_row(state.data(), queue.data(), q, &v[(size_t)r * cols + c0], has_thr ? &thr[c0] : nullptr,
                            (uint32_t)c0, nc, k, kp, cp, lane, nl, sync, ballot);
        }
        if (q > 0) topk_flush(state.data(), queue.data(), q, kp, cp, lane, nl, sync);
      });
      std::copy(state.begin(), state.end(), parts.begin() + ((size_t)r * n_splits + s) * kp);
    }
  std::vector<int64_t> idx((size_t)rows * k);
  std::vector<float> val((size_t)rows * k);
  for (int r = 0; r < rows; ++r)
    on_warp(nlanes, [&](int lane, int nl, auto sync, auto) {
      merge_split_topk(state.data(), scratch.data(), &parts[(size_t)r * n_splits * kp], n_splits, kp, lane, nl, sync);
      emit_topk_row(state.data(), k, &idx[(size_t)r * k], &val[(size_t)r * k], lane, nl);
    });
  write_all(idx);
  write_all(val);
  return 0;
}

int cmd_threshold(int nlanes) {
  int rows = read_i32(), cols = read_i32(), cap = read_i32(), bn = read_i32(), split_cols = read_i32();
  auto v = read_n<float>((size_t)rows * cols);
  auto thr = read_n<float>(cols);
  const int n_splits = (cols + split_cols - 1) / split_cols;
  std::vector<uint64_t> parts((size_t)rows * n_splits * cap, 0xdeadbeefULL);  // garbage beyond counts
  std::vector<int> counts((size_t)rows * n_splits);
  for (int r = 0; r < rows; ++r)
    for (int s = 0; s < n_splits; ++s) {
      const int c_end = (s + 1) * split_cols < cols ? (s + 1) * split_cols : cols;
      on_warp(nlanes, [&](int lane, int nl, auto, auto ballot) {
        int count = 0;
        for (int c0 = s * split_cols; c0 < c_end; c0 += bn) {
          int nc = c_end - c0 < bn ? c_end - c0 : bn;
          count = threshold_tile_row(&parts[((size_t)r * n_splits + s) * cap], count, cap, &v[(size_t)r * cols + c0],
                                     &thr[c0], (uint32_t)c0, nc, lane, nl, ballot);
        }
        if (lane == 0) counts[(size_t)r * n_splits + s] = count;
      });
    }
  std::vector<int32_t> total(rows);
  std::vector<int64_t> idx((size_t)rows * cap, 12345);
  std::vector<float> val((size_t)rows * cap, 12345.0f);
  for (int r = 0; r < rows; ++r)
    on_warp(nlanes, [&](int lane, int nl, auto, auto) {
      int t = merge_split_threshold(&parts[(size_t)r * n_splits * cap], &counts[(size_t)r * n_splits], n_splits, cap,
                                    cap, &idx[(size_t)r * cap], &val[(size_t)r * cap], lane, nl);
      if (lane == 0) total[r] = t;
    });
  write_all(total);
  write_all(idx);
  write_all(val);
  return 0;
}

// 16-byte aligned storage (vector loads need it, as device allocations give it)
struct alignas(16) Block16 {
  unsigned char b[16];
};

struct StreamInput {
  int rows, cols, chunk, dtype, vec;
  std::vector<Block16> values;  // rows * cols elements of `dtype`
  std::vector<float> bias, scale;
  int elem() const { return dtype == kStreamF32 ? 4 : 2; }
};

StreamInput read_stream_input(int& k_or_cap) {
  StreamInput in;
  in.rows = read_i32();
  in.cols = read_i32();
  k_or_cap = read_i32();
  in.chunk = read_i32();
  in.dtype = read_i32();
  const int has_bias = read_i32(), has_scale = read_i32();
  in.vec = read_i32();
  const size_t bytes = (size_t)in.rows * in.cols * in.elem();
  in.values.resize((bytes + 15) / 16);
  if (bytes && fread(in.values.data(), 1, bytes, stdin) != bytes) {
    fprintf(stderr, "select_host: short input\n");
    exit(2);
  }
  if (has_bias) in.bias = read_n<float>(in.cols);
  if (has_scale) in.scale = read_n<float>(in.cols);
  return in;
}

// Chunk [c0, c0 + width) copied into a [rows, width] buffer (the GEMM's output layout), and
// whether 16-byte loads are legal in it (the kernels' condition).
std::vector<Block16> copy_chunk(const StreamInput& in, int c0, int width, bool& vec) {
  const int e = in.elem();
  std::vector<Block16> buf(((size_t)in.rows * width * e + 15) / 16);
  auto* dst = reinterpret_cast<unsigned char*>(buf.data());
  const auto* src = reinterpret_cast<const unsigned char*>(in.values.data());
  for (int r = 0; r < in.rows; ++r)
    memcpy(dst + (size_t)r * width * e, src + ((size_t)r * in.cols + c0) * e, (size_t)width * e);
  vec = in.vec && (width * e) % 16 == 0 && c0 % 8 == 0;
  return buf;
}

template <int DT>
ChunkRow<DT> row_loader(const StreamInput& in, const std::vector<Block16>& buf, int r, int c0, int width, bool vec) {
  ChunkRow<DT> ld;
  ld.row = reinterpret_cast<const unsigned char*>(buf.data()) + (size_t)r * width * in.elem();
  ld.bias = in.bias.empty() ? nullptr : in.bias.data();
  ld.scale = in.scale.empty() ? nullptr : in.scale.data();
  ld.c0 = c0;
  ld.ncols = width;
  ld.vec = vec;
  return ld;
}

template <int DT>
void stream_topk_chunks(const StreamInput& in, int k, int nlanes, std::vector<uint64_t>& best) {
  const int kp = topk_pad(k), cp = stream_queue_keys(kp);
  std::vector<uint64_t> state(kp), queue(cp);
  for (int c0 = 0; c0 < in.cols; c0 += in.chunk) {
    const int width = in.cols - c0 < in.chunk ? in.cols - c0 : in.chunk;
    bool vec;
    auto buf = copy_chunk(in, c0, width, vec);
    for (int r = 0; r < in.rows; ++r) {
      std::copy(best.begin() + (size_t)r * kp, best.begin() + (size_t)(r + 1) * kp, state.begin());
      std::fill(queue.begin(), queue.end(), 0xdeadbeefULL);
      const ChunkRow<DT> ld = row_loader<DT>(in, buf, r, c0, width, vec);
      on_warp(nlanes, [&](int lane, int nl, auto sync, auto ballot) {
        float bar = kth_bar(state.data(), k);  // every lane holds the bar, as on the device
        stream_topk_row(state.data(), queue.data(), bar, ld, k, kp, lane, nl, sync, ballot);
      });
      std::copy(state.begin(), state.end(), best.begin() + (size_t)r * kp);
    }
  }
}

int cmd_stream_topk(int nlanes) {
  int k;
  StreamInput in = read_stream_input(k);
  const int kp = topk_pad(k);
  std::vector<uint64_t> best((size_t)in.rows * kp, kEmptyKey);
  if (in.dtype == kStreamF32) stream_topk_chunks<kStreamF32>(in, k, nlanes, best);
  else if (in.dtype == kStreamF16) stream_topk_chunks<kStreamF16>(in, k, nlanes, best);
  else stream_topk_chunks<kStreamBF16>(in, k, nlanes, best);
  std::vector<int64_t> idx((size_t)in.rows * k);
  std::vector<float> val((size_t)in.rows * k);
  for (int r = 0; r < in.rows; ++r) emit_topk_row(&best[(size_t)r * kp], k, &idx[(size_t)r * k], &val[(size_t)r * k], 0, 1);
  write_all(idx);
  write_all(val);
  return 0;
}

template <int DT>
void stream_threshold_chunks(const StreamInput& in, int cap, const std::vector<float>& thr, int nlanes,
                             std::vector<int32_t>& count, std::vector<int64_t>& idx, std::vector<float>& val) {
  for (int c0 = 0; c0 < in.cols; c0 += in.chunk) {
    const int width = in.cols - c0 < in.chunk ? in.cols - c0 : in.chunk;
    bool vec;
    auto buf = copy_chunk(in, c0, width, vec);
    for (int r = 0; r < in.rows; ++r) {
      const ChunkRow<DT> ld = row_loader<DT>(in, buf, r, c0, width, vec);
      on_warp(nlanes, [&](int lane, int nl, auto, auto ballot) {
        int c = stream_threshold_row(&idx[(size_t)r * cap], &val[(size_t)r * cap], count[r], cap, thr.data(), ld,
                                     lane, nl, ballot);
        if (lane == 0) count[r] = c;
      });
    }
  }
}

int cmd_stream_threshold(int nlanes) {
  int cap;
  StreamInput in = read_stream_input(cap);
  auto thr = read_n<float>(in.cols);
  std::vector<int32_t> count(in.rows, 0);
  std::vector<int64_t> idx((size_t)in.rows * cap, -1);
  std::vector<float> val((size_t)in.rows * cap, 0.0f);
  if (in.dtype == kStreamF32) stream_threshold_chunks<kStreamF32>(in, cap, thr, nlanes, count, idx, val);
  else if (in.dtype == kStreamF16) stream_threshold_chunks<kStreamF16>(in, cap, thr, nlanes, count, idx, val);
  else stream_threshold_chunks<kStreamBF16>(in, cap, thr, nlanes, count, idx, val);
  write_all(count);
  write_all(idx);
  write_all(val);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr,
            "usage: select_host keys|sort|lanes|topk|threshold|topk32|threshold32|stream_topk|stream_threshold|"
            "stream_topk32|stream_threshold32 < input > output\n");
    return 1;
  }
  const char* c = argv[1];
  if (!strcmp(c, "keys")) return cmd_keys();
  if (!strcmp(c, "sort")) return cmd_sort(false);
  if (!strcmp(c, "lanes")) return cmd_sort(true);
  if (!strcmp(c, "topk")) return cmd_topk(1);
  if (!strcmp(c, "threshold")) return cmd_threshold(1);
  if (!strcmp(c, "topk32")) return cmd_topk(32);
  if (!strcmp(c, "threshold32")) return cmd_threshold(32);
  if (!strcmp(c, "stream_topk")) return cmd_stream_topk(1);
  if (!strcmp(c, "stream_topk32")) return cmd_stream_topk(32);
  if (!strcmp(c, "stream_threshold")) return cmd_stream_threshold(1);
  if (!strcmp(c, "stream_threshold32")) return cmd_stream_threshold(32);
  fprintf(stderr, "select_host: unknown command %s\n", c);
  return 1;
}
