// privimage native CPU ops: per-sample gradient norms and clipped sums for CPU-only users (C++ / OpenMP).
//
// The same maths as privimage.kernels (Triton on GPU), registered with torch.library under the namespace
// `privimage_native` and loaded from Python by privimage.kernels.native when the library has been built
// (csrc/build.sh). Every op is checked against the torch references in tests/kernels/test_native.py.
//
//   norm_affine_grads: bias / GroupNorm / LayerNorm affine per-sample gradients (statistics, x̂ and the
//     reductions in one pass over each (row, group) block held in cache), summed into each row's target
//     slot with its scale (per-sample norms: target = sample, scale 1; clipped sums: target 0, scale c).
//     privimage dispatches only GroupNorm here: for the per-position layouts (LayerNorm, Linear bias) the
//     inner loop has length 1 and the torch reference measured faster (privimage/kernels/native.py).
//   per_sample_sq_norms: ‖Σ_{r∈s} G_rᵀ A_r‖² for a Conv2d (Linear = 1×1): each thread takes whole samples,
//     forms one row's im2col block (K × T) in a thread-local buffer, one GEMM per group into a (P × K)
//     buffer reused across rows, then squares and sums it. No R·P·K per-sample gradient tensor is written.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBiasLast = 0, kBiasFirst = 1, kGroupNorm = 2, kLayerNorm = 3;

// (R, NG, CG, L) view sizes of the data, as privimage/kernels/norm_affine.py::_view.
struct AffineView {
  int64_t R, NG, CG, L, P;
};

AffineView affine_view(const at::Tensor& go, int64_t kind, int64_t num_groups, int64_t norm_ndim) {
  AffineView v;
  v.R = go.size(0);
  if (kind == kBiasFirst || kind == kGroupNorm) {
    int64_t C = go.size(1);
    v.NG = kind == kGroupNorm ? num_groups : 1;
    v.CG = C / v.NG;
    v.L = 1;
    for (int64_t d = 2; d < go.dim(); ++d) v.L *= go.size(d);
    v.P = C;
  } else {
    int64_t n = 1;
    for (int64_t d = go.dim() - norm_ndim; d < go.dim(); ++d) n *= go.size(d);
    int64_t T = 1;
    for (int64_t d = 1; d < go.dim() - norm_ndim; ++d) T *= go.size(d);
    v.NG = T;
    v.CG = n;
    v.L = 1;
    v.P = n;
  }
  return v;
}

at::Tensor norm_affine_grads(const std::optional<at::Tensor>& x_opt, const at::Tensor& go_in,
                             const at::Tensor& target_in, const at::Tensor& scale_in,
                             const std::optional<at::Tensor>& pad_opt, int64_t out_rows, int64_t kind,
                             int64_t num_groups, int64_t norm_ndim, double eps) {
  TORCH_CHECK(go_in.device().is_cpu(), "privimage_native.norm_affine_grads: CPU tensors only");
  TORCH_CHECK(kind >= kBiasLast && kind <= kLayerNorm, "privimage_native.norm_affine_grads: bad kind ", kind);
  const bool has_x = x_opt.has_value();
  const AffineView v = affine_view(go_in, kind, num_groups, norm_ndim);
  at::Tensor out = at::zeros({out_rows, 2, v.P}, go_in.options().dtype(at::kFloat));
  if (v.R == 0 || out_rows == 0) return out;
  at::Tensor go = go_in.to(at::kFloat).contiguous();
  at::Tensor x = has_x ? x_opt->to(at::kFloat).contiguous() : go;
  at::Tensor target = target_in.to(at::kLong).contiguous();
  at::Tensor scale = scale_in.to(at::kFloat).contiguous();
  at::Tensor pad = pad_opt.has_value() ? pad_opt->to(at::kBool).contiguous()
                                       : at::zeros({v.R}, go_in.options().dtype(at::kBool));
  const float* gp = go.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const bool* padp = pad.data_ptr<bool>();
  const float* sp = scale.data_ptr<float>();
  const int64_t* tp = target.data_ptr<int64_t>();
  const bool per_position = kind == kBiasLast || kind == kLayerNorm;
  const int64_t block = v.CG * v.L;
  // Per-row (weight, bias) gradients first, in parallel over rows; rows may share a target, so the
  // scatter into `out` is a serial pass over R·2·P numbers afterwards.
  std::vector<float> rows(static_cast<size_t>(v.R * 2 * v.P), 0.f);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(v.NG * block, 1));
  at::parallel_for(0, v.R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (padp[r] || sp[r] == 0.f) continue;  // never read: padding, or a zero clip factor
      float* gw = rows.data() + r * 2 * v.P;
      float* gb = gw + v.P;
      for (int64_t ng = 0; ng < v.NG; ++ng) {
        const float* g = gp + (r * v.NG + ng) * block;
        const float* xx = xp + (r * v.NG + ng) * block;
        float mean = 0.f, rstd = 0.f;
        if (has_x) {
          // fp32 partial sums in SIMD lanes (vectorised)
          float total = 0.f;
#pragma omp simd reduction(+ : total)
          for (int64_t i = 0; i < block; ++i) total += xx[i];
          mean = static_cast<float>(static_cast<double>(total) / block);
          float sq = 0.f;  // two passes: E[x²] − E[x]² cancels badly for large means
#pragma omp simd reduction(+ : sq)
          for (int64_t i = 0; i < block; ++i) sq += (xx[i] - mean) * (xx[i] - mean);
          rstd = static_cast<float>(1.0 / std::sqrt(static_cast<double>(sq) / block + eps));
        }
        for (int64_t c = 0; c < v.CG; ++c) {
          const int64_t ch = per_position ? c : ng * v.CG + c;
          float sw = 0.f, sb = 0.f;
          const float* gc = g + c * v.L;
          const float* xc = xx + c * v.L;
          if (has_x) {
#pragma omp simd reduction(+ : sw, sb)
            for (int64_t l = 0; l < v.L; ++l) {
              sb += gc[l];
              sw += gc[l] * (xc[l] - mean);
            }
            sw *= rstd;
          } else {
#pragma omp simd reduction(+ : sb)
            for (int64_t l = 0; l < v.L; ++l) sb += gc[l];
          }
          gw[ch] += sw;
          gb[ch] += sb;
        }
      }
    }
  });
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < v.R; ++r) {
    if (padp[r] || sp[r] == 0.f) continue;
    float* dst = op + tp[r] * 2 * v.P;
    const float* src = rows.data() + r * 2 * v.P;
    for (int64_t i = 0; i < 2 * v.P; ++i) dst[i] += sp[r] * src[i];
  }
  return out;
}

at::Tensor per_sample_sq_norms(const at::Tensor& x_in, const at::Tensor& go_in,
                               const std::optional<at::Tensor>& sample_index,
                               const std::optional<at::Tensor>& pad_opt, int64_t num_samples,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x_in.device().is_cpu(), "privimage_native.per_sample_sq_norms: CPU tensors only");
  TORCH_CHECK(x_in.dim() == 4 && go_in.dim() == 4, "privimage_native.per_sample_sq_norms: 4-D x and grad_out");
  const int64_t R = x_in.size(0), C_in = x_in.size(1), C_out = go_in.size(1);
  const int64_t T = go_in.size(2) * go_in.size(3);
  const int64_t P = C_out / groups, K = C_in / groups * kernel_size[0] * kernel_size[1];
  at::Tensor out = at::zeros({num_samples}, x_in.options().dtype(at::kFloat));
  if (R == 0 || num_samples == 0 || T == 0) return out;
  at::Tensor x = x_in.to(at::kFloat).contiguous();
  at::Tensor go = go_in.to(at::kFloat).contiguous();
  at::Tensor sid = sample_index.has_value() ? sample_index->to(at::kLong).contiguous() : at::arange(R);
  at::Tensor pad = pad_opt.has_value() ? pad_opt->to(at::kBool).contiguous() : at::zeros({R}, at::kBool);
  // rows of each sample, in order (the CSR index of privimage/kernels/_common.py::sample_csr)
  std::vector<std::vector<int64_t>> members(static_cast<size_t>(num_samples));
  const int64_t* sidp = sid.data_ptr<int64_t>();
  const bool* padp = pad.data_ptr<bool>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(sidp[r] >= 0 && sidp[r] < num_samples, "privimage_native: sample_index out of range");
    if (!padp[r]) members[sidp[r]].push_back(r);
  }
  const bool is_1x1 = kernel_size[0] == 1 && kernel_size[1] == 1 && stride[0] == 1 && stride[1] == 1 &&
                      padding[0] == 0 && padding[1] == 0;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, num_samples, 1, [&](int64_t begin, int64_t end) {
    at::Tensor acc = at::empty({groups, P, K}, at::kFloat);
    for (int64_t s = begin; s < end; ++s) {
      if (members[s].empty()) continue;
      acc.zero_();
      for (int64_t r : members[s]) {
        at::Tensor xr = x.select(0, r).unsqueeze(0);
        // (C_in·kh·kw, T): the row's im2col block, one row at a time (never the whole batch's unfold)
        at::Tensor cols = is_1x1 ? xr.reshape({C_in, T})
                                 : at::im2col(xr, kernel_size, dilation, padding, stride).reshape({C_in * kernel_size[0] * kernel_size[1], T});
        at::Tensor g = go.select(0, r).reshape({groups, P, T});
        acc.baddbmm_(g, cols.reshape({groups, K, T}).transpose(1, 2));
      }
      op[s] = acc.square().sum().item<float>();
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(privimage_native, m) {
  m.def("norm_affine_grads(Tensor? x, Tensor go, Tensor target, Tensor scale, Tensor? is_padding, int out_rows, "
        "int kind, int num_groups, int norm_ndim, float eps) -> Tensor");
  m.def("per_sample_sq_norms(Tensor x, Tensor go, Tensor? sample_index, Tensor? is_padding, int num_samples, "
        "int[] kernel_size, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(privimage_native, CPU, m) {
  m.impl("norm_affine_grads", &norm_affine_grads);
  m.impl("per_sample_sq_norms", &per_sample_sq_norms);
}
