// fp32 matrix products for XLA:CPU through OpenBLAS, called as an XLA FFI custom call.
//
// On the 2-core machines of docs/benchmarks.md, OpenBLAS's sgemm runs the 35M model's products
// at up to 1.6x the FLOP/s of the YNNPACK GEMMs that XLA:CPU uses for dots, and the training step
// is ~12% faster with its matmuls here. jaxtrain/cpu_gemm.py loads
// OpenBLAS (the `scipy-openblas32` wheel), hands this library its `cblas_sgemm` with
// `jaxtrain_cpu_gemm_set_sgemm`, and registers the handler `JaxtrainCpuGemm` for the CPU platform.
//
// The handler computes out[b] = op(a[b]) @ op(b[b]) for row-major operands of rank 3 (a leading
// batch dimension, 1 for a plain matrix product), op a transpose where `trans_a` / `trans_b` say.
// OpenBLAS runs single-threaded; the work is split into pieces (the batch, and for a single
// matrix product the rows or columns of the output) that the calling thread and tasks on XLA's own
// intra-op thread pool take from a shared counter. So a product uses the threads XLA has, no more,
// and when XLA keeps the other threads busy the calling thread does all pieces itself: nothing
// ever waits for a pool thread that has not started.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// cblas_sgemm's signature, with CBLAS's enum values (row-major 101, no transpose 111, transpose
// 112), so that no CBLAS header is needed at build time.
using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                         float, float*, int);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
// Rows (or columns) of a piece of a single product are a multiple of this.
constexpr int64_t kPieceAlign = 16;

// Rank-3 float32 buffers (a named type: the handler macro below would split a template's comma).
using Matrices = ffi::Buffer<ffi::F32, 3>;
using ResultMatrices = ffi::ResultBuffer<ffi::F32, 3>;

std::atomic<SgemmFn> g_sgemm{nullptr};

struct Product {
  SgemmFn sgemm;
  const float* a;
  const float* b;
  float* out;
  bool trans_a, trans_b;
  int64_t m, n, k;        // out[b] is m x n, the contraction k.
  int64_t lda, ldb;       // row lengths of a[b] and b[b] as stored.
  bool split_rows;        // pieces split the rows of out (else its columns).
  int64_t piece, pieces;  // rows or columns per piece; pieces per batch element.
  int64_t total;          // batch * pieces.
  std::atomic<int64_t> next{0}, finished{0};
  std::mutex mu;
  std::condition_variable all_done;

  void RunPiece(int64_t index) {
    int64_t batch = index / pieces, lo = (index % pieces) * piece;
    const float* a_b = a + batch * m * k;
    const float* b_b = b + batch * k * n;
    float* out_b = out + batch * m * n;
    int64_t rows = m, cols = n;
    if (split_rows) {
      rows = std::min(m, lo + piece) - lo;
      a_b += trans_a ? lo : lo * lda;
      out_b += lo * n;
    } else {
      cols = std::min(n, lo + piece) - lo;
      b_b += trans_b ? lo * ldb : lo;
      out_b += lo;
    }
    sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans,
          static_cast<int>(rows), static_cast<int>(cols), static_cast<int>(k), 1.0f, a_b,
          static_cast<int>(lda), b_b, static_cast<int>(ldb), 0.0f, out_b, static_cast<int>(n));
  }

  // Takes pieces until none is left; whoever finishes the last one wakes the caller.
  void Work() {
    for (int64_t i; (i = next.fetch_add(1)) < total;) {
      RunPiece(i);
      if (finished.fetch_add(1) + 1 == total) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }
};

ffi::Error Gemm(ffi::ThreadPool pool, Matrices a, Matrices b, ResultMatrices out, bool trans_a,
                bool trans_b) {
  SgemmFn sgemm = g_sgemm.load();
  if (sgemm == nullptr) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "jaxtrain cpu_gemm: OpenBLAS was not loaded (jaxtrain/cpu_gemm.py)");
  }
  auto ad = a.dimensions(), bd = b.dimensions(), od = out->dimensions();
  int64_t batch = ad[0], m = trans_a ? ad[2] : ad[1], k = trans_a ? ad[1] : ad[2];
  int64_t n = trans_b ? bd[1] : bd[2], kb = trans_b ? bd[2] : bd[1];
  if (bd[0] != batch || kb != k || od[0] != batch || od[1] != m || od[2] != n) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "jaxtrain cpu_gemm: operand shapes do not form a matrix product");
  }
  if (std::max({batch, m, n, k}) > INT32_MAX) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "jaxtrain cpu_gemm: a dimension exceeds 32-bit BLAS indexing");
  }
  if (batch * m * n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(out->typed_data(), 0, sizeof(float) * batch * m * n);
    return ffi::Error::Success();
  }
  auto p = std::make_shared<Product>();
  p->sgemm = sgemm;
  p->a = a.typed_data();
  p->b = b.typed_data();
  p->out = out->typed_data();
  p->trans_a = trans_a;
  p->trans_b = trans_b;
  p->m = m;
  p->n = n;
  p->k = k;
  p->lda = ad[2];
  p->ldb = bd[2];
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // A batch at least as large as the pool is split by batch element only; otherwise each
  // product is also cut into pieces along its larger output dimension.
  int64_t pieces = batch >= threads ? 1 : (threads + batch - 1) / batch;
  p->split_rows = m >= n;
  int64_t extent = p->split_rows ? m : n;
  p->piece = std::max<int64_t>(
      kPieceAlign, ((extent + pieces - 1) / pieces + kPieceAlign - 1) / kPieceAlign * kPieceAlign);
  p->pieces = (extent + p->piece - 1) / p->piece;
  p->total = batch * p->pieces;
  int64_t helpers = std::min(threads, p->total) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([p] { p->Work(); });
  p->Work();
  std::unique_lock<std::mutex> lock(p->mu);
  p->all_done.wait(lock, [&] { return p->finished.load() == p->total; });
  return ffi::Error::Success();
}

}  // namespace

extern "C" void jaxtrain_cpu_gemm_set_sgemm(void* fn) {
  g_sgemm.store(reinterpret_cast<SgemmFn>(fn));
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtrainCpuGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrices>()
                                  .Arg<Matrices>()
                                  .Ret<Matrices>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
