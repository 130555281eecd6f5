// ChopGrad engine: truncated backpropagation through a causal-cache decoder.
//
// The engine runs a decoder one step at a time through callbacks and never
// looks inside the decoder: a step maps (latent group, state) to (frames,
// next state), and a loss maps the frames of one step to a scalar (or to a
// value plus the gradient with respect to the frames, for fused
// value-and-grad losses). Gradients are taken inside forward with
// torch::autograd::grad, step by step, into preallocated buffers, so the
// memory held at any time is bounded by the truncation distance, not by the
// number of steps. See docs/design.md section 2 for the exact gradient contract.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace chopgrad {

// A decoder state is a flat list of tensors. An undefined tensor is an empty
// slot; what the slots mean is the adapter's business.
using State = std::vector<at::Tensor>;

struct StepResult {
  at::Tensor frames;
  State next_state;
};

// What a loss callback returns for one supervised step.
//  - grad_frames undefined: `value` is a 0-dim tensor attached to the graph
//    of `frames` (or a constant); the engine differentiates `value`.
//  - grad_frames defined: `value` is a plain number (no graph) and
//    grad_frames is d value / d frames; the engine backpropagates it from
//    `frames`. grad_frames may alias the storage of `frames`: the engine only
//    uses `frames` for its graph after the loss returns.
struct LossResult {
  at::Tensor value;
  at::Tensor grad_frames;
};

using StepFn = std::function<StepResult(int64_t step, const at::Tensor& latent_group, const State& state)>;
// need_grad is false when only the value is wanted (evaluation).
using LossFn = std::function<LossResult(int64_t step, const at::Tensor& frames, bool need_grad)>;

enum class Schedule { kSliding, kChunked, kSlidingRecompute };

Schedule parse_schedule(const std::string& name);

struct Plan {
  // Latent frame offsets of the decoder steps along `time_dim`:
  // step g consumes latents[..., group_bounds[g]:group_bounds[g+1], ...].
  std::vector<int64_t> group_bounds;
  // supervised[g]: whether the loss of step g is part of the video loss.
  std::vector<bool> supervised;
  // Truncation distance D; a negative value means no truncation (exact).
  int64_t d_trunc = 1;
  Schedule schedule = Schedule::kSliding;
  int64_t time_dim = 2;

  int64_t num_steps() const { return static_cast<int64_t>(supervised.size()); }
  // Index of the last supervised step, or -1 when none is supervised.
  int64_t last_supervised() const;
  // Validates the plan against the latent tensor; throws c10::ValueError.
  void validate(const at::Tensor& latents) const;
};

// Counters that tests and benchmarks use to check the bounded-buffer claims.
struct RunStats {
  int64_t steps_run = 0;            // decoder steps executed (with or without grad)
  int64_t steps_run_with_grad = 0;  // of those, executed with a graph
  int64_t backward_calls = 0;       // torch::autograd::grad invocations
  int64_t max_states_held = 0;      // peak number of detached states buffered
  int64_t max_steps_in_graph = 0;   // peak number of steps whose graph is alive at once
};

class Engine {
 public:
  Engine(StepFn step, LossFn loss, Plan plan, State initial_state);

  // Differentiable video loss: a 0-dim tensor whose backward delivers the
  // truncated gradient to `latents` and to every tensor in `params` that
  // requires grad (scaled by the incoming gradient). Double backward
  // (create_graph=True) raises: the gradient is computed here and has no graph.
  at::Tensor loss(const at::Tensor& latents, const std::vector<at::Tensor>& params);

  // The same loss value with no graph and no gradient work.
  at::Tensor evaluate(const at::Tensor& latents);

  // Checks `latents` against the plan (what loss() and evaluate() check
  // first); raises c10::ValueError naming the mismatch.
  void validate(const at::Tensor& latents) const;

  const RunStats& stats() const { return *stats_; }

 private:
  std::shared_ptr<struct EngineCore> core_;
  std::shared_ptr<RunStats> stats_;
};

}  // namespace chopgrad
