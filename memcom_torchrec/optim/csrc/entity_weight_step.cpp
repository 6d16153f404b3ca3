// memcom::entity_weight_step_: MEmCom's w trained in one pass (gradient, duplicate coalescing, update).
//
// A MEmCom bag is sum_j w[p_j] * U[r_j], so the gradient of one looked-up w[p_j] is
// <U[r_j], grad_bag>, with U's values from before the step's update. This op takes, per feature
// of one table, the pooled output gradient (B x D, rows may be strided), the rows r_j of U its ids
// read, the bags' offsets into them, and the positions p_j in the flat w; it computes every
// grad_w[j], sums the duplicates of each position (FBGEMM's EXACT_* semantics) and applies one
// optimizer step to each touched position of w and its states, in place. Python reference and
// fallback: memcom_torchrec/optim/fused_step.py (ATen's per-sample-weight gradient, then
// sparse_update_).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace memcom {
namespace {

// The update rule: the family of the table's FBGEMM optimizer (row-wise Adagrad of a scalar row
// is Adagrad, partial row-wise Adam of a scalar row is Adam).
constexpr int64_t kSGD = 0;
constexpr int64_t kAdagrad = 1;
constexpr int64_t kAdam = 2;

void check_float_vector(const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu(), "entity_weight_step_: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "entity_weight_step_: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "entity_weight_step_: ", name,
              " must be a contiguous 1-D tensor, got shape ", t.sizes());
  TORCH_CHECK(numel < 0 || t.numel() == numel, "entity_weight_step_: ", name, " has ", t.numel(),
              " entries, expected ", numel);
}

void check_index(const at::Tensor& t, const char* name, int64_t feature) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(),
              "entity_weight_step_: ", name, "[", feature, "] must be a contiguous 1-D int64 CPU tensor, got ",
              t.scalar_type(), " of shape ", t.sizes());
}

// Every check reads only the inputs' metadata and index values: nothing is written before all pass.
void check_inputs(const at::Tensor& w, at::TensorList states, at::TensorList grads, const at::Tensor& U,
                  at::TensorList rows, at::TensorList bag_offsets, at::TensorList positions, int64_t rule) {
  check_float_vector(w, "w", -1);
  TORCH_CHECK(rule == kSGD || rule == kAdagrad || rule == kAdam, "entity_weight_step_: unknown rule ", rule,
              " (0 SGD, 1 Adagrad, 2 Adam)");
  const size_t num_states = rule == kSGD ? 0 : rule == kAdagrad ? 1 : 2;
  TORCH_CHECK(states.size() == num_states, "entity_weight_step_: rule ", rule, " takes ", num_states,
              " state tensor(s), got ", states.size());
  for (const auto& s : states) {
    check_float_vector(s, "a state", w.numel());
  }
  TORCH_CHECK(U.device().is_cpu() && U.scalar_type() == at::kFloat && U.dim() == 2 && U.stride(1) == 1,
              "entity_weight_step_: U must be a float32 CPU matrix with contiguous rows, got ", U.scalar_type(),
              " of shape ", U.sizes());
  const size_t F = grads.size();
  TORCH_CHECK(rows.size() == F && bag_offsets.size() == F && positions.size() == F,
              "entity_weight_step_: grads, rows, bag_offsets and positions must have one entry per feature, got ",
              F, ", ", rows.size(), ", ", bag_offsets.size(), ", ", positions.size());
  const int64_t num_rows = U.size(0), n = w.numel();
  for (size_t f = 0; f < F; ++f) {
    const auto& g = grads[f];
    TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == at::kFloat && g.dim() == 2 && g.stride(1) == 1 &&
                    g.size(1) == U.size(1),
                "entity_weight_step_: grads[", f, "] must be a float32 CPU B x ", U.size(1),
                " matrix with contiguous rows, got ", g.scalar_type(), " of shape ", g.sizes());
    check_index(rows[f], "rows", f);
    check_index(bag_offsets[f], "bag_offsets", f);
    check_index(positions[f], "positions", f);
    const int64_t k = rows[f].numel();
    TORCH_CHECK(positions[f].numel() == k, "entity_weight_step_: positions[", f, "] has ", positions[f].numel(),
                " entries, rows[", f, "] has ", k);
    TORCH_CHECK(bag_offsets[f].numel() == g.size(0) + 1, "entity_weight_step_: bag_offsets[", f, "] has ",
                bag_offsets[f].numel(), " entries for ", g.size(0), " bags (expected B + 1)");
    const int64_t* off = bag_offsets[f].data_ptr<int64_t>();
    TORCH_CHECK(off[0] == 0 && off[g.size(0)] == k, "entity_weight_step_: bag_offsets[", f,
                "] must start at 0 and end at ", k, ", got ", off[0], " and ", off[g.size(0)]);
    for (int64_t b = 0; b < g.size(0); ++b) {
      TORCH_CHECK(off[b] <= off[b + 1], "entity_weight_step_: bag_offsets[", f, "] decreases at bag ", b);
    }
    const int64_t* r = rows[f].data_ptr<int64_t>();
    const int64_t* p = positions[f].data_ptr<int64_t>();
    for (int64_t j = 0; j < k; ++j) {
      TORCH_CHECK(r[j] >= 0 && r[j] < num_rows, "entity_weight_step_: rows[", f, "][", j, "] = ", r[j],
                  " is outside U's ", num_rows, " rows");
      TORCH_CHECK(p[j] >= 0 && p[j] < n, "entity_weight_step_: positions[", f, "][", j, "] = ", p[j],
                  " is outside w's ", n, " entries");
    }
  }
}

inline float dot(const float* a, const float* b, int64_t d) {
  // Eight partial sums: the compiler vectorises this without -ffast-math.
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    for (int u = 0; u < 8; ++u) {
      acc[u] += a[i + u] * b[i + u];
    }
  }
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < d; ++i) {
    s += a[i] * b[i];
  }
  return s;
}

void entity_weight_step_(const at::Tensor& w, at::TensorList states, at::TensorList grads, const at::Tensor& U,
                         at::TensorList rows, at::TensorList bag_offsets, at::TensorList positions, int64_t rule,
                         double lr, double eps, double beta1, double beta2, double weight_decay, double step) {
  check_inputs(w, states, grads, U, rows, bag_offsets, positions, rule);
  const int64_t d = U.size(1);
  const float* u = U.data_ptr<float>();
  const int64_t u_stride = U.stride(0);

  // 1. grad_w of every looked-up id, bags in parallel.
  int64_t total = 0;
  std::vector<int64_t> base(grads.size() + 1, 0);
  for (size_t f = 0; f < grads.size(); ++f) {
    base[f + 1] = base[f] + rows[f].numel();
  }
  total = base.back();
  if (total == 0) {
    return;
  }
  std::vector<float> g(total);
  for (size_t f = 0; f < grads.size(); ++f) {
    const float* go = grads[f].data_ptr<float>();
    const int64_t go_stride = grads[f].stride(0);
    const int64_t* off = bag_offsets[f].data_ptr<int64_t>();
    const int64_t* r = rows[f].data_ptr<int64_t>();
    float* gf = g.data() + base[f];
    at::parallel_for(0, grads[f].size(0), 64, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const float* gb = go + b * go_stride;
        for (int64_t j = off[b]; j < off[b + 1]; ++j) {
          gf[j] = dot(u + r[j] * u_stride, gb, d);
        }
      }
    });
  }

  // 2. Duplicates summed: an open-addressing table of the touched positions (O(ids), no sort).
  int64_t capacity = 16;
  while (capacity < 2 * total) {
    capacity <<= 1;
  }
  const int64_t mask = capacity - 1;
  std::vector<int64_t> keys(capacity, -1);
  std::vector<int64_t> slot_of(capacity);
  std::vector<int64_t> unique_pos;
  std::vector<float> unique_grad;
  unique_pos.reserve(total);
  unique_grad.reserve(total);
  for (size_t f = 0; f < grads.size(); ++f) {
    const int64_t* p = positions[f].data_ptr<int64_t>();
    const float* gf = g.data() + base[f];
    for (int64_t j = 0; j < rows[f].numel(); ++j) {
      const int64_t key = p[j];
      int64_t h = static_cast<int64_t>((static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ULL) >> 20) & mask;
      while (keys[h] != -1 && keys[h] != key) {
        h = (h + 1) & mask;
      }
      if (keys[h] == -1) {
        keys[h] = key;
        slot_of[h] = static_cast<int64_t>(unique_pos.size());
        unique_pos.push_back(key);
        unique_grad.push_back(gf[j]);
      } else {
        unique_grad[slot_of[h]] += gf[j];
      }
    }
  }

  // 3. One optimizer step per touched position (distinct positions: no two threads share one).
  float* wp = w.data_ptr<float>();
  float* s1 = states.size() > 0 ? states[0].data_ptr<float>() : nullptr;
  float* s2 = states.size() > 1 ? states[1].data_ptr<float>() : nullptr;
  const float flr = static_cast<float>(lr), feps = static_cast<float>(eps), fwd = static_cast<float>(weight_decay);
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float c1 = rule == kAdam ? static_cast<float>(1.0 - std::pow(beta1, step)) : 1.0f;
  const float c2 = rule == kAdam ? static_cast<float>(1.0 - std::pow(beta2, step)) : 1.0f;
  const int64_t num_unique = static_cast<int64_t>(unique_pos.size());
  at::parallel_for(0, num_unique, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t i = unique_pos[q];
      float gi = unique_grad[q];
      const float wi = wp[i];
      if (rule == kSGD) {
        wp[i] = wi - flr * (gi + fwd * wi);
      } else if (rule == kAdagrad) {
        gi += fwd * wi;
        const float acc = s1[i] + gi * gi;
        s1[i] = acc;
        wp[i] = wi - flr * gi / (std::sqrt(acc) + feps);
      } else {
        const float m1 = s1[i] * b1 + (1.0f - b1) * gi;
        const float m2 = s2[i] * b2 + (1.0f - b2) * gi * gi;
        s1[i] = m1;
        s2[i] = m2;
        const float update = (m1 / c1) / (std::sqrt(m2 / c2) + feps);
        wp[i] = wi - flr * (update + fwd * wi);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(memcom, m) {
  m.def(
      "entity_weight_step_(Tensor(a!) w, Tensor(b!)[] states, Tensor[] grads, Tensor U, Tensor[] rows, "
      "Tensor[] bag_offsets, Tensor[] positions, int rule, float lr, float eps, float beta1, float beta2, "
      "float weight_decay, float step) -> ()");
}

TORCH_LIBRARY_IMPL(memcom, CPU, m) {
  m.impl("entity_weight_step_", &entity_weight_step_);
}

}  // namespace memcom
