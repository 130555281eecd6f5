#include "engine.h"

#include <algorithm>
#include <utility>

namespace chopgrad {

namespace {

// The dtype gradients and loss values are summed in: fp32 for bf16 and fp16,
// a tensor's own dtype otherwise (float64 stays float64). Each backward call's
// contribution is already rounded to the tensor's own dtype, so summing a
// dozen of them in bf16 or fp16 would add one more rounding per step
// (parameters summed over many positions and steps lose the most); fp32 keeps
// one final rounding.
at::ScalarType accumulation_dtype(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  return (dtype == at::kBFloat16 || dtype == at::kHalf) ? at::kFloat : dtype;
}

State detach_state(const State& state) {
  State out;
  out.reserve(state.size());
  for (const auto& t : state) out.push_back(t.defined() ? t.detach() : at::Tensor());
  return out;
}

// Holds the detached states s_{g-capacity+1} .. s_g of the most recent steps,
// in a fixed number of slots: memory for states never grows with the video.
class StateRing {
 public:
  explicit StateRing(int64_t capacity) : slots_(static_cast<size_t>(capacity)), steps_(capacity, -1) {}

  void put(int64_t step, State state) {
    const size_t slot = static_cast<size_t>(step % capacity());
    slots_[slot] = std::move(state);
    steps_[slot] = step;
  }

  const State& get(int64_t step) const {
    const size_t slot = static_cast<size_t>(step % capacity());
    TORCH_CHECK(steps_[slot] == step, "chopgrad engine: state of step ", step,
                " is no longer buffered (ring capacity ", capacity(), ")");
    return slots_[slot];
  }

  int64_t held() const {
    return std::count_if(steps_.begin(), steps_.end(), [](int64_t s) { return s >= 0; });
  }

 private:
  int64_t capacity() const { return static_cast<int64_t>(slots_.size()); }
  std::vector<State> slots_;
  std::vector<int64_t> steps_;
};

}  // namespace

Schedule parse_schedule(const std::string& name) {
  if (name == "sliding") return Schedule::kSliding;
  if (name == "chunked") return Schedule::kChunked;
  if (name == "sliding_recompute") return Schedule::kSlidingRecompute;
  TORCH_CHECK_VALUE(false, "schedule must be 'sliding', 'chunked' or 'sliding_recompute', got '", name, "'");
}

int64_t Plan::last_supervised() const {
  for (int64_t g = num_steps() - 1; g >= 0; --g)
    if (supervised[static_cast<size_t>(g)]) return g;
  return -1;
}

void Plan::validate(const at::Tensor& latents) const {
  TORCH_CHECK_VALUE(latents.defined(), "latents must be a tensor");
  TORCH_CHECK_VALUE(time_dim >= 0 && time_dim < latents.dim(), "time_dim ", time_dim,
                    " is out of range for latents with ", latents.dim(), " dimensions");
  TORCH_CHECK_VALUE(static_cast<int64_t>(group_bounds.size()) == num_steps() + 1,
                    "group_bounds must have one entry more than supervised (", num_steps() + 1, "), got ",
                    group_bounds.size());
  TORCH_CHECK_VALUE(num_steps() > 0, "the plan has no decoder steps");
  TORCH_CHECK_VALUE(group_bounds.front() == 0 && group_bounds.back() == latents.size(time_dim),
                    "group_bounds must run from 0 to the latent frame count ", latents.size(time_dim));
  for (int64_t g = 0; g < num_steps(); ++g)
    TORCH_CHECK_VALUE(group_bounds[g] < group_bounds[g + 1], "group_bounds must be strictly increasing");
}

struct EngineCore {
  StepFn step;
  LossFn loss;
  Plan plan;
  State initial_state;
  std::shared_ptr<RunStats> stats;

  at::Tensor latent_group(const at::Tensor& latents, int64_t g) const {
    return latents.slice(plan.time_dim, plan.group_bounds[g], plan.group_bounds[g + 1]);
  }

  StepResult run_step(int64_t g, const at::Tensor& z, const State& state, bool with_grad) {
    at::AutoGradMode mode(with_grad);
    StepResult out = step(g, z, state);
    TORCH_CHECK(out.frames.defined(), "the step callback returned no frames for step ", g);
    stats->steps_run += 1;
    if (with_grad) stats->steps_run_with_grad += 1;
    return out;
  }

  // Steps [first, last] under no grad from `state`; returns s_{last+1}.
  State advance(const at::Tensor& latents, int64_t first, int64_t last, State state) {
    for (int64_t g = first; g <= last; ++g)
      state = detach_state(run_step(g, latent_group(latents, g).detach(), state, false).next_state);
    return state;
  }

  at::Tensor evaluate(const at::Tensor& latents) {
    at::NoGradGuard no_grad;
    const int64_t last = plan.last_supervised();
    at::Tensor total;
    State state = initial_state;
    for (int64_t g = 0; g <= last; ++g) {
      StepResult out = run_step(g, latent_group(latents, g), state, false);
      if (plan.supervised[static_cast<size_t>(g)]) {
        at::Tensor value = loss(g, out.frames, false).value.detach();
        value = value.to(accumulation_dtype(value));
        total = total.defined() ? total + value : value;
      }
      state = std::move(out.next_state);
    }
    if (!total.defined()) total = at::zeros({}, latents.options().dtype(accumulation_dtype(latents)));
    return total;
  }
};

namespace {

// Gradient destinations of one backward call: the latent groups that took
// part (as fresh leaves) and the parameters that require grad.
struct GradTargets {
  std::vector<int64_t> group_of_leaf;
  std::vector<at::Tensor> leaves;
};

at::Tensor zeros_for_accumulation(const at::Tensor& t) {
  return at::zeros_like(t, t.options().dtype(accumulation_dtype(t)), at::MemoryFormat::Contiguous);
}

class Accumulator {
 public:
  Accumulator(const at::Tensor& latents, const std::vector<at::Tensor>& params, const Plan& plan)
      : plan_(plan), latents_need_grad_(latents.requires_grad()) {
    if (latents_need_grad_) grad_latents_ = zeros_for_accumulation(latents);
    for (const auto& p : params) {
      if (p.requires_grad()) {
        trainable_.push_back(p);
        grad_params_.push_back(zeros_for_accumulation(p));
        param_index_.push_back(static_cast<int64_t>(grad_params_.size()) - 1);
      } else {
        param_index_.push_back(-1);
      }
    }
  }

  // The tensor a step consumes: a fresh leaf when latents need grad.
  at::Tensor leaf_for(const at::Tensor& group, int64_t g, GradTargets& targets) const {
    at::Tensor z = group.detach();
    if (!latents_need_grad_) return z;
    z.requires_grad_(true);
    targets.group_of_leaf.push_back(g);
    targets.leaves.push_back(z);
    return z;
  }

  bool anything_to_differentiate() const { return latents_need_grad_ || !trainable_.empty(); }

  // A latent group as the tensor a step consumes: a fresh leaf when latents need grad.
  at::Tensor leaf(const at::Tensor& group) const {
    at::Tensor z = group.detach();
    if (latents_need_grad_) z.requires_grad_(true);
    return z;
  }

  // One vector-Jacobian product through one step's graph: accumulates the
  // gradients of latent group g and of the parameters, and returns the
  // cotangents of `state_leaves` (undefined where a slot takes none).
  State step_vjp(const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& grad_outputs,
                 const at::Tensor& latent_leaf, int64_t g, const State& state_leaves, bool retain_graph,
                 RunStats& stats) {
    State cotangents(state_leaves.size());
    bool any_graph = false;
    for (const auto& o : outputs) any_graph = any_graph || o.requires_grad();
    if (!any_graph) return cotangents;
    std::vector<at::Tensor> inputs;
    const bool latent_input = latent_leaf.defined() && latent_leaf.requires_grad();
    if (latent_input) inputs.push_back(latent_leaf);
    std::vector<size_t> slot_of_input;
    for (size_t i = 0; i < state_leaves.size(); ++i) {
      if (state_leaves[i].defined() && state_leaves[i].requires_grad()) {
        inputs.push_back(state_leaves[i]);
        slot_of_input.push_back(i);
      }
    }
    const size_t first_param = inputs.size();
    inputs.insert(inputs.end(), trainable_.begin(), trainable_.end());
    if (inputs.empty()) return cotangents;
    std::vector<at::Tensor> grads = torch::autograd::grad(outputs, inputs, grad_outputs, retain_graph,
                                                          /*create_graph=*/false, /*allow_unused=*/true);
    stats.backward_calls += 1;
    if (latent_input && grads[0].defined())
      grad_latents_.slice(plan_.time_dim, plan_.group_bounds[g], plan_.group_bounds[g + 1]).add_(grads[0]);
    for (size_t j = 0; j < slot_of_input.size(); ++j)
      cotangents[slot_of_input[j]] = std::move(grads[(latent_input ? 1 : 0) + j]);
    for (size_t j = 0; j < trainable_.size(); ++j)
      if (grads[first_param + j].defined()) grad_params_[j].add_(grads[first_param + j]);
    return cotangents;
  }

  // One torch::autograd::grad over the pending losses; frees their graph.
  void backward(const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& grad_outputs,
                const GradTargets& targets, RunStats& stats) {
    if (outputs.empty()) return;
    std::vector<at::Tensor> inputs = targets.leaves;
    inputs.insert(inputs.end(), trainable_.begin(), trainable_.end());
    if (inputs.empty()) return;
    bool any_graph = false;
    for (const auto& o : outputs) any_graph = any_graph || o.requires_grad();
    if (!any_graph) return;
    std::vector<at::Tensor> grads =
        torch::autograd::grad(outputs, inputs, grad_outputs, /*retain_graph=*/false, /*create_graph=*/false,
                              /*allow_unused=*/true);
    stats.backward_calls += 1;
    const size_t n_leaves = targets.leaves.size();
    for (size_t i = 0; i < n_leaves; ++i) {
      if (!grads[i].defined()) continue;
      const int64_t g = targets.group_of_leaf[i];
      grad_latents_.slice(plan_.time_dim, plan_.group_bounds[g], plan_.group_bounds[g + 1]).add_(grads[i]);
    }
    for (size_t j = 0; j < trainable_.size(); ++j)
      if (grads[n_leaves + j].defined()) grad_params_[j].add_(grads[n_leaves + j]);
  }

  at::Tensor grad_latents() const { return grad_latents_; }
  // One entry per parameter passed in; undefined for those without grad.
  std::vector<at::Tensor> grad_params() const {
    std::vector<at::Tensor> out;
    for (int64_t idx : param_index_) out.push_back(idx >= 0 ? grad_params_[idx] : at::Tensor());
    return out;
  }

 private:
  const Plan& plan_;
  bool latents_need_grad_;
  at::Tensor grad_latents_;
  std::vector<at::Tensor> trainable_;
  std::vector<at::Tensor> grad_params_;
  std::vector<int64_t> param_index_;
};

// Registers the loss of step g as an output to differentiate.
at::Tensor add_loss(EngineCore& core, int64_t g, const at::Tensor& frames, std::vector<at::Tensor>& outputs,
                    std::vector<at::Tensor>& grad_outputs) {
  LossResult l = core.loss(g, frames, true);
  TORCH_CHECK(l.value.defined() && l.value.numel() == 1, "the loss callback must return a scalar for step ", g);
  if (l.grad_frames.defined()) {
    outputs.push_back(frames);
    grad_outputs.push_back(l.grad_frames);
  } else if (l.value.requires_grad()) {
    outputs.push_back(l.value.reshape({}));
    grad_outputs.push_back(at::ones({}, l.value.options()));
  }
  return l.value.detach().reshape({}).to(accumulation_dtype(l.value));
}

struct Totals {
  at::Tensor value;
  void add(const at::Tensor& v) { value = value.defined() ? value + v : v; }
};

// schedule="chunked" (and the exact case, as one chunk): the state is
// detached at each chunk start; all losses of a chunk share one backward.
void run_chunked(EngineCore& core, const at::Tensor& latents, Accumulator& acc, int64_t chunk_len, Totals& totals) {
  const Plan& plan = core.plan;
  RunStats& stats = *core.stats;
  const int64_t last = plan.last_supervised();
  State state = core.initial_state;
  stats.max_states_held = std::max<int64_t>(stats.max_states_held, 1);
  for (int64_t start = 0; start <= last; start += chunk_len) {
    const int64_t end = std::min(start + chunk_len, last + 1);  // exclusive
    int64_t last_sup = -1;
    for (int64_t g = start; g < end; ++g)
      if (plan.supervised[static_cast<size_t>(g)]) last_sup = g;
    if (last_sup < 0) {
      state = core.advance(latents, start, end - 1, std::move(state));
      continue;
    }
    GradTargets targets;
    std::vector<at::Tensor> outputs, grad_outputs;
    State s = detach_state(state);
    {
      at::AutoGradMode enable(true);
      for (int64_t g = start; g <= last_sup; ++g) {
        at::Tensor z = acc.leaf_for(core.latent_group(latents, g), g, targets);
        StepResult out = core.run_step(g, z, s, true);
        s = std::move(out.next_state);
        if (plan.supervised[static_cast<size_t>(g)]) totals.add(add_loss(core, g, out.frames, outputs, grad_outputs));
      }
      stats.max_steps_in_graph = std::max(stats.max_steps_in_graph, last_sup - start + 1);
    }
    state = detach_state(s);
    s.clear();
    acc.backward(outputs, grad_outputs, targets, stats);
    if (last_sup + 1 < end) state = core.advance(latents, last_sup + 1, end - 1, std::move(state));
  }
}

// Whether any step in [first, last] (clipped to the plan) is supervised.
bool any_supervised(const Plan& plan, int64_t first, int64_t last) {
  last = std::min(last, plan.num_steps() - 1);
  for (int64_t g = std::max<int64_t>(first, 0); g <= last; ++g)
    if (plan.supervised[static_cast<size_t>(g)]) return true;
  return false;
}

// The graph of one decoder step, kept alive until the last loss that reaches it.
struct StepGraph {
  int64_t step = -1;
  at::Tensor latent_leaf;   // undefined when the latents take no gradient
  State state_leaves;       // the step's input state; slots that take a gradient require grad
  State next_state;         // the step's output state, attached to its graph
  bool alive() const { return step >= 0; }
  void release() {
    step = -1;
    latent_leaf = at::Tensor();
    state_leaves.clear();
    next_state.clear();
  }
};

State state_leaves(const State& detached, bool with_grad) {
  State out;
  out.reserve(detached.size());
  for (const auto& t : detached) {
    if (with_grad && t.defined() && (t.is_floating_point() || t.is_complex())) {
      out.push_back(t.detach().requires_grad_(true));
    } else {
      out.push_back(t);
    }
  }
  return out;
}

// schedule="sliding": every step runs forward once, its input state a fresh
// leaf, and its graph stays alive while a loss within D steps can reach it.
// The loss of step g is backpropagated as a chain of one-step vector-Jacobian
// products: through step g into the leaves of its latent group and state,
// then through step g-1 with that state cotangent on its output state, and
// so on down to step g-D, whose state cotangent is not computed. A step's
// graph is freed by the backward of the last loss that uses it (the loss of
// step k+D, or the last supervised one before it), so at most D+1 step
// graphs are alive at once, and the gradient is the truncated gradient of
// docs/design.md section 2 at 1x forward compute.
void run_sliding(EngineCore& core, const at::Tensor& latents, Accumulator& acc, int64_t d, Totals& totals) {
  const Plan& plan = core.plan;
  RunStats& stats = *core.stats;
  const int64_t last = plan.last_supervised();
  std::vector<StepGraph> graphs(static_cast<size_t>(d + 1));
  auto graph_of = [&](int64_t k) -> StepGraph& { return graphs[static_cast<size_t>(k % (d + 1))]; };
  int64_t alive = 0;
  State state = detach_state(core.initial_state);
  stats.max_states_held = std::max<int64_t>(stats.max_states_held, 1);
  for (int64_t g = 0; g <= last; ++g) {
    if (!any_supervised(plan, g, g + d)) {  // no loss reaches this step: advance without a graph
      state = core.advance(latents, g, g, std::move(state));
      continue;
    }
    StepGraph& node = graph_of(g);
    TORCH_CHECK(!node.alive(), "chopgrad engine: the graph of step ", node.step, " outlived its last use");
    // The state cotangent of step g is wanted by the losses of steps g .. g+D-1 (they reach step g-1).
    const bool state_grad = g > 0 && d > 0 && any_supervised(plan, g, g + d - 1);
    at::Tensor frames;
    {
      at::AutoGradMode enable(true);
      node.step = g;
      node.latent_leaf = acc.leaf(core.latent_group(latents, g));
      node.state_leaves = state_leaves(state, state_grad);
      StepResult out = core.run_step(g, node.latent_leaf, node.state_leaves, true);
      frames = std::move(out.frames);
      node.next_state = std::move(out.next_state);
    }
    state = detach_state(node.next_state);
    stats.max_steps_in_graph = std::max(stats.max_steps_in_graph, ++alive);
    if (!plan.supervised[static_cast<size_t>(g)]) continue;
    std::vector<at::Tensor> outputs, grad_outputs;
    {
      at::AutoGradMode enable(true);
      totals.add(add_loss(core, g, frames, outputs, grad_outputs));
    }
    frames = at::Tensor();
    const int64_t lowest = std::max<int64_t>(0, g - d);
    for (int64_t k = g; k >= lowest && !outputs.empty(); --k) {
      StepGraph& link = graph_of(k);
      TORCH_CHECK(link.step == k, "chopgrad engine: the graph of step ", k, " is no longer alive");
      // Another loss reaches step k later when one of steps g+1 .. k+D is supervised.
      const bool retain = any_supervised(plan, g + 1, std::min(k + d, last));
      const bool wants_state = k > lowest;
      State cotangents = acc.step_vjp(outputs, grad_outputs, link.latent_leaf, k,
                                      wants_state ? link.state_leaves : State(), retain, stats);
      outputs.clear();
      grad_outputs.clear();
      if (!retain) {
        link.release();
        --alive;
      }
      if (!wants_state) break;
      const State& previous_outputs = graph_of(k - 1).next_state;
      for (size_t i = 0; i < cotangents.size() && i < previous_outputs.size(); ++i) {
        if (cotangents[i].defined() && previous_outputs[i].defined() && previous_outputs[i].requires_grad()) {
          outputs.push_back(previous_outputs[i]);
          grad_outputs.push_back(std::move(cotangents[i]));
        }
      }
    }
    // Steps below the chain whose last loss was this one (no later loss reaches them).
    for (int64_t k = lowest; k <= g; ++k) {
      StepGraph& link = graph_of(k);
      if (link.step == k && !any_supervised(plan, g + 1, std::min(k + d, last))) {
        link.release();
        --alive;
      }
    }
  }
}

// schedule="sliding_recompute": the loss of step g is backpropagated alone
// through a re-run of steps g-D .. g started from the detached state s_{g-D}.
// (D+1)x forward compute; between losses only states are held.
void run_sliding_recompute(EngineCore& core, const at::Tensor& latents, Accumulator& acc, int64_t d, Totals& totals) {
  const Plan& plan = core.plan;
  RunStats& stats = *core.stats;
  const int64_t last = plan.last_supervised();
  StateRing ring(d + 1);
  ring.put(0, detach_state(core.initial_state));
  for (int64_t g = 0; g <= last; ++g) {
    stats.max_states_held = std::max(stats.max_states_held, ring.held());
    if (!plan.supervised[static_cast<size_t>(g)]) {
      ring.put(g + 1, core.advance(latents, g, g, ring.get(g)));
      continue;
    }
    const int64_t first = std::max<int64_t>(0, g - d);
    GradTargets targets;
    std::vector<at::Tensor> outputs, grad_outputs;
    State s = ring.get(first);
    {
      at::AutoGradMode enable(true);
      at::Tensor frames;
      for (int64_t k = first; k <= g; ++k) {
        at::Tensor z = acc.leaf_for(core.latent_group(latents, k), k, targets);
        StepResult out = core.run_step(k, z, s, true);
        s = std::move(out.next_state);
        frames = std::move(out.frames);
      }
      stats.max_steps_in_graph = std::max(stats.max_steps_in_graph, g - first + 1);
      totals.add(add_loss(core, g, frames, outputs, grad_outputs));
    }
    State next = detach_state(s);
    s.clear();
    acc.backward(outputs, grad_outputs, targets, stats);
    // s_{g-D} is no longer needed: s_{g+1} takes its slot when the ring is full.
    ring.put(g + 1, std::move(next));
  }
}

class TruncatedLoss : public torch::autograd::Function<TruncatedLoss> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& latents, at::TensorList params,
                            std::shared_ptr<EngineCore> core) {
    const Plan& plan = core->plan;
    std::vector<at::Tensor> param_vec(params.begin(), params.end());
    Accumulator acc(latents, param_vec, plan);
    Totals totals;
    const int64_t last = plan.last_supervised();
    const bool exact = plan.d_trunc < 0 || plan.d_trunc >= last;
    if (exact) {
      // Truncation at distance >= the last supervised step cuts nothing: one
      // chunk gives the exact gradient at 1x compute for either schedule.
      run_chunked(*core, latents, acc, std::max<int64_t>(last + 1, 1), totals);
    } else if (plan.schedule == Schedule::kChunked) {
      run_chunked(*core, latents, acc, plan.d_trunc + 1, totals);
    } else if (plan.schedule == Schedule::kSlidingRecompute) {
      run_sliding_recompute(*core, latents, acc, plan.d_trunc, totals);
    } else {
      run_sliding(*core, latents, acc, plan.d_trunc, totals);
    }
    std::vector<at::Tensor> saved;
    saved.push_back(acc.grad_latents());
    for (const auto& gp : acc.grad_params()) saved.push_back(gp);
    ctx->save_for_backward(saved);
    // the gradients are summed in fp32 for bf16/fp16 inputs; backward hands each back in its input's dtype
    std::vector<int64_t> input_dtypes{static_cast<int64_t>(latents.scalar_type())};
    for (const auto& p : params) input_dtypes.push_back(static_cast<int64_t>(p.scalar_type()));
    ctx->saved_data["input_dtypes"] = input_dtypes;
    if (!totals.value.defined()) return at::zeros({}, latents.options().dtype(accumulation_dtype(latents)));
    return totals.value;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    // The gradient was computed during forward and has no graph of its own:
    // a second-order use would silently see a constant.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "chopgrad: double backward is not supported: the truncated gradient is computed during forward "
                "and carries no graph, so create_graph=True (e.g. a gradient penalty) would silently get zero "
                "second-order terms. Use create_graph=False.");
    auto saved = ctx->get_saved_variables();
    const auto input_dtypes = ctx->saved_data["input_dtypes"].toIntVector();
    const at::Tensor& go = grad_outputs[0];
    torch::autograd::variable_list result;
    result.reserve(saved.size() + 1);
    for (size_t i = 0; i < saved.size(); ++i) {
      const at::Tensor& g = saved[i];
      result.push_back(g.defined() ? (g * go.to(g.scalar_type())).to(static_cast<at::ScalarType>(input_dtypes[i]))
                                   : at::Tensor());
    }
    result.emplace_back();  // the engine core is not differentiable
    return result;
  }
};

}  // namespace

Engine::Engine(StepFn step, LossFn loss, Plan plan, State initial_state)
    : core_(std::make_shared<EngineCore>()), stats_(std::make_shared<RunStats>()) {
  TORCH_CHECK_VALUE(static_cast<bool>(step), "a step callback is required");
  TORCH_CHECK_VALUE(static_cast<bool>(loss), "a loss callback is required");
  TORCH_CHECK_VALUE(plan.d_trunc >= -1, "d_trunc must be >= 0 (or -1 for no truncation), got ", plan.d_trunc);
  core_->step = std::move(step);
  core_->loss = std::move(loss);
  core_->plan = std::move(plan);
  core_->initial_state = std::move(initial_state);
  core_->stats = stats_;
}

void Engine::validate(const at::Tensor& latents) const { core_->plan.validate(latents); }

at::Tensor Engine::loss(const at::Tensor& latents, const std::vector<at::Tensor>& params) {
  core_->plan.validate(latents);
  *stats_ = RunStats{};
  bool any_grad = latents.requires_grad();
  for (const auto& p : params) any_grad = any_grad || p.requires_grad();
  if (!any_grad || !at::GradMode::is_enabled()) return core_->evaluate(latents);
  return TruncatedLoss::apply(latents, at::TensorList(params), core_);
}

at::Tensor Engine::evaluate(const at::Tensor& latents) {
  core_->plan.validate(latents);
  *stats_ = RunStats{};
  return core_->evaluate(latents);
}

}  // namespace chopgrad
