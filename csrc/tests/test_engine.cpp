// C++ test of the engine with a small causal convolutional decoder: the
// engine's gradients against plain autograd (exact) and against an explicit
// detach() oracle (truncated), plus the bounded-buffer counters.
#include <torch/torch.h>

#include <cmath>
#include <iostream>
#include <string>

#include "engine.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::cerr << "FAIL: " << what << "\n";
  } else {
    std::cout << "ok: " << what << "\n";
  }
}

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).norm().item<double>() / std::max(b.norm().item<double>(), 1e-30);
}

// A causal-cache decoder in miniature: each step takes one latent frame
// (B, C, 1, H, W), concatenates the cached previous feature frame in front
// (the cache), runs a temporal 2x3x3 conv + SiLU, and emits two pixel frames.
struct TinyDecoderImpl : torch::nn::Module {
  torch::nn::Conv3d conv_in{nullptr}, conv_t{nullptr}, conv_out{nullptr};
  TinyDecoderImpl() {
    conv_in = register_module("conv_in", torch::nn::Conv3d(torch::nn::Conv3dOptions(3, 6, 1)));
    conv_t = register_module("conv_t", torch::nn::Conv3d(torch::nn::Conv3dOptions(6, 6, {2, 3, 3}).padding({0, 1, 1})));
    conv_out = register_module("conv_out", torch::nn::Conv3d(torch::nn::Conv3dOptions(6, 2 * 2, 1)));
  }
  // Returns (frames (B, 2, 2, H, W), next cache).
  std::pair<at::Tensor, at::Tensor> step(const at::Tensor& z, const at::Tensor& cache) {
    at::Tensor h = conv_in->forward(z);
    at::Tensor prev = cache.defined() ? cache : torch::zeros_like(h);
    at::Tensor y = torch::silu(conv_t->forward(torch::cat({prev, h}, 2)));
    at::Tensor next_cache = y.clone();  // the cache carries the step's features forward
    at::Tensor out = conv_out->forward(y);  // (B, 4, 1, H, W) -> two frames of 2 channels
    auto s = out.sizes();
    at::Tensor frames = out.view({s[0], 2, 2, s[3], s[4]});
    return {frames, next_cache};
  }
};
TORCH_MODULE(TinyDecoder);

struct Problem {
  TinyDecoder dec;
  at::Tensor latents, target;
  int64_t steps;
};

chopgrad::Engine make_engine(Problem& p, int64_t d, chopgrad::Schedule schedule) {
  chopgrad::Plan plan;
  for (int64_t g = 0; g <= p.steps; ++g) plan.group_bounds.push_back(g);
  plan.supervised.assign(p.steps, true);
  plan.d_trunc = d;
  plan.schedule = schedule;
  auto step = [&p](int64_t, const at::Tensor& z, const chopgrad::State& s) {
    auto [frames, cache] = p.dec->step(z, s.empty() ? at::Tensor() : s[0]);
    return chopgrad::StepResult{frames, {cache}};
  };
  auto loss = [&p](int64_t g, const at::Tensor& frames, bool) {
    at::Tensor t = p.target.slice(2, 2 * g, 2 * g + 2);
    return chopgrad::LossResult{(frames - t).square().sum(), at::Tensor()};
  };
  return chopgrad::Engine(step, loss, plan, {at::Tensor()});
}

// Explicit detach() oracle: one backward per step, from the truncation point.
std::vector<at::Tensor> oracle(Problem& p, int64_t d, chopgrad::Schedule schedule) {
  auto params = p.dec->parameters();
  std::vector<at::Tensor> grads;
  grads.push_back(torch::zeros_like(p.latents));
  for (auto& w : params) grads.push_back(torch::zeros_like(w));
  for (int64_t g = 0; g < p.steps; ++g) {
    int64_t start = 0;
    const bool sliding = schedule != chopgrad::Schedule::kChunked;
    if (d >= 0) start = sliding ? std::max<int64_t>(0, g - d) : g - g % (d + 1);
    at::Tensor cache;
    {
      torch::NoGradGuard ng;
      for (int64_t k = 0; k < start; ++k) cache = p.dec->step(p.latents.slice(2, k, k + 1), cache).second;
    }
    if (cache.defined()) cache = cache.detach();
    at::Tensor z = p.latents.detach().clone().requires_grad_(true);
    at::Tensor frames;
    for (int64_t k = start; k <= g; ++k) std::tie(frames, cache) = p.dec->step(z.slice(2, k, k + 1), cache);
    at::Tensor l = (frames - p.target.slice(2, 2 * g, 2 * g + 2)).square().sum();
    std::vector<at::Tensor> inputs{z};
    inputs.insert(inputs.end(), params.begin(), params.end());
    auto out = torch::autograd::grad({l}, inputs, {}, false, false, true);
    for (size_t i = 0; i < out.size(); ++i)
      if (out[i].defined()) grads[i] += out[i];
  }
  return grads;
}

std::vector<at::Tensor> engine_grads(Problem& p, int64_t d, chopgrad::Schedule schedule, double* value,
                                     chopgrad::RunStats* stats) {
  auto params = p.dec->parameters();
  for (auto& w : params) w.mutable_grad() = at::Tensor();
  at::Tensor z = p.latents.clone().requires_grad_(true);
  chopgrad::Engine engine = make_engine(p, d, schedule);
  at::Tensor loss = engine.loss(z, params);
  *value = loss.item<double>();
  *stats = engine.stats();
  loss.backward();
  std::vector<at::Tensor> grads{z.grad()};
  for (auto& w : params) grads.push_back(w.grad());
  return grads;
}

}  // namespace

int main() {
  torch::manual_seed(0);
  Problem p{TinyDecoder(), torch::randn({2, 3, 7, 5, 6}), torch::randn({2, 2, 14, 5, 6}), 7};
  double full_value = 0;
  // Exact reference: plain autograd through the whole recurrence.
  std::vector<at::Tensor> full;
  {
    at::Tensor z = p.latents.clone().requires_grad_(true);
    at::Tensor cache, loss = torch::zeros({});
    for (int64_t g = 0; g < p.steps; ++g) {
      at::Tensor frames;
      std::tie(frames, cache) = p.dec->step(z.slice(2, g, g + 1), cache);
      loss = loss + (frames - p.target.slice(2, 2 * g, 2 * g + 2)).square().sum();
    }
    full_value = loss.item<double>();
    auto params = p.dec->parameters();
    std::vector<at::Tensor> inputs{z};
    inputs.insert(inputs.end(), params.begin(), params.end());
    full = torch::autograd::grad({loss}, inputs);
  }
  for (auto schedule : {chopgrad::Schedule::kSliding, chopgrad::Schedule::kChunked,
                        chopgrad::Schedule::kSlidingRecompute}) {
    const std::string name = schedule == chopgrad::Schedule::kSliding   ? "sliding"
                             : schedule == chopgrad::Schedule::kChunked ? "chunked"
                                                                        : "sliding_recompute";
    for (int64_t d : {-1, 6}) {
      double value;
      chopgrad::RunStats stats;
      auto grads = engine_grads(p, d, schedule, &value, &stats);
      double worst = 0;
      for (size_t i = 0; i < grads.size(); ++i) worst = std::max(worst, rel_err(grads[i], full[i]));
      check(std::abs(value - full_value) <= 1e-5 * std::abs(full_value), name + " d=" + std::to_string(d) + " value");
      check(worst <= 1e-5, name + " d=" + std::to_string(d) + " exact gradient (rel err " + std::to_string(worst) + ")");
    }
    for (int64_t d : {0, 1, 2}) {
      double value;
      chopgrad::RunStats stats;
      auto grads = engine_grads(p, d, schedule, &value, &stats);
      auto ref = oracle(p, d, schedule);
      double worst = 0;
      for (size_t i = 0; i < grads.size(); ++i) worst = std::max(worst, rel_err(grads[i], ref[i]));
      const std::string tag = name + " d=" + std::to_string(d);
      check(std::abs(value - full_value) <= 1e-5 * std::abs(full_value), tag + " forward value unchanged");
      check(worst <= 1e-5, tag + " truncated gradient vs detach oracle (rel err " + std::to_string(worst) + ")");
      check(rel_err(grads[0], full[0]) > 1e-4, tag + " truncation changes the gradient");
      const int64_t max_states = schedule == chopgrad::Schedule::kSlidingRecompute ? d + 1 : 1;
      check(stats.max_states_held <= max_states, tag + " state buffer bounded");
      check(stats.max_steps_in_graph == d + 1, tag + " at most d+1 steps in a graph");
    }
  }
  {
    chopgrad::Plan plan;
    plan.group_bounds = {0, 2};
    plan.supervised = {true};
    bool threw = false;
    try {
      plan.validate(torch::zeros({1, 3, 3, 2, 2}));
    } catch (const c10::ValueError&) {
      threw = true;
    }
    check(threw, "a plan that does not cover the latents is rejected");
  }
  std::cout << (failures == 0 ? "all engine checks passed" : "engine checks FAILED") << "\n";
  return failures == 0 ? 0 : 1;
}
