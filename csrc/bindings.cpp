// Python bindings of the engine: callbacks are Python callables, states are
// Python lists whose None entries are empty slots.
#include <torch/extension.h>

#include "engine.h"

namespace py = pybind11;

namespace {

chopgrad::State state_from_python(const py::handle& obj, const char* what) {
  chopgrad::State state;
  if (obj.is_none()) return state;
  for (const py::handle& item : py::reinterpret_borrow<py::sequence>(obj)) {
    if (item.is_none()) {
      state.emplace_back();
    } else if (THPVariable_Check(item.ptr())) {
      state.push_back(THPVariable_Unpack(item.ptr()));
    } else {
      throw py::type_error(std::string(what) + " must be a sequence of tensors or None, got an item of type " +
                           std::string(py::str(py::type::of(item).attr("__name__"))));
    }
  }
  return state;
}

py::list state_to_python(const chopgrad::State& state) {
  py::list out;
  for (const auto& t : state) {
    if (t.defined())
      out.append(py::reinterpret_steal<py::object>(THPVariable_Wrap(t)));
    else
      out.append(py::none());
  }
  return out;
}

at::Tensor tensor_from_python(const py::handle& obj, const char* what) {
  if (obj.is_none()) return at::Tensor();
  if (!THPVariable_Check(obj.ptr()))
    throw py::type_error(std::string(what) + " must be a tensor or None");
  return THPVariable_Unpack(obj.ptr());
}

// Wraps Python callables; the engine runs with the GIL released (autograd may
// run Python-defined backward functions on other threads), so every callback
// takes the GIL back while it runs.
chopgrad::StepFn make_step(py::function fn) {
  auto holder = std::make_shared<py::function>(std::move(fn));
  return [holder](int64_t g, const at::Tensor& z, const chopgrad::State& state) {
    py::gil_scoped_acquire gil;
    py::object result = (*holder)(g, z, state_to_python(state));
    auto pair = result.cast<py::tuple>();
    if (pair.size() != 2) throw py::value_error("the step callback must return (frames, next_state)");
    chopgrad::StepResult out;
    out.frames = tensor_from_python(pair[0], "frames returned by the step callback");
    out.next_state = state_from_python(pair[1], "next_state returned by the step callback");
    return out;
  };
}

chopgrad::LossFn make_loss(py::function fn) {
  auto holder = std::make_shared<py::function>(std::move(fn));
  return [holder](int64_t g, const at::Tensor& frames, bool need_grad) {
    py::gil_scoped_acquire gil;
    py::object result = (*holder)(g, frames, need_grad);
    chopgrad::LossResult out;
    if (py::isinstance<py::tuple>(result)) {
      auto pair = result.cast<py::tuple>();
      if (pair.size() != 2) throw py::value_error("the loss callback must return a scalar or (value, grad_frames)");
      out.value = tensor_from_python(pair[0], "loss value");
      out.grad_frames = tensor_from_python(pair[1], "grad_frames returned by the loss callback");
    } else {
      out.value = tensor_from_python(result, "loss value");
    }
    return out;
  };
}

// Raises C++ errors as pybind11's own Python exceptions, from this module,
// with the message but no C++ backtrace. Leaving c10::Error to torch's
// translator crashed the interpreter (segfault) on torch 2.11+cu130 when
// engine.loss rejected a bad plan, while the same error from the constructor
// was raised correctly; this path does not depend on that translator.
template <typename Fn>
auto python_errors(const Fn& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const c10::ValueError& e) {
    throw py::value_error(e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    throw py::type_error(e.what_without_backtrace());
  } catch (const c10::IndexError& e) {
    throw py::index_error(e.what_without_backtrace());
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

// Runs `run` with the GIL released (the engine calls the autograd engine,
// which refuses to run under the GIL) and raises its exception only once the
// GIL is held again, so the Python error is made with the GIL held.
template <typename Run>
at::Tensor without_gil(const Run& run) {
  std::exception_ptr error;
  at::Tensor out;
  {
    py::gil_scoped_release no_gil;
    try {
      out = run();
    } catch (...) {
      error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
  return out;
}

struct PyEngine {
  chopgrad::Engine engine;

  // Bad input is rejected before the GIL is released.
  at::Tensor loss(const at::Tensor& latents, const std::vector<at::Tensor>& params) {
    return python_errors([&] {
      engine.validate(latents);
      return without_gil([&] { return engine.loss(latents, params); });
    });
  }
  at::Tensor evaluate(const at::Tensor& latents) {
    return python_errors([&] {
      engine.validate(latents);
      return without_gil([&] { return engine.evaluate(latents); });
    });
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "chopgrad C++ engine: truncated backpropagation through causal-cache decoders";
  py::class_<PyEngine>(m, "Engine")
      .def(py::init([](py::function step, py::function loss, std::vector<int64_t> group_bounds,
                       std::vector<bool> supervised, int64_t d_trunc, const std::string& schedule,
                       py::object initial_state, int64_t time_dim) {
             return python_errors([&] {
               chopgrad::Plan plan;
               plan.group_bounds = std::move(group_bounds);
               plan.supervised = std::move(supervised);
               plan.d_trunc = d_trunc;
               plan.schedule = chopgrad::parse_schedule(schedule);
               plan.time_dim = time_dim;
               return new PyEngine{chopgrad::Engine(make_step(std::move(step)), make_loss(std::move(loss)),
                                                    std::move(plan),
                                                    state_from_python(initial_state, "initial_state"))};
             });
           }),
           py::arg("step"), py::arg("loss"), py::arg("group_bounds"), py::arg("supervised"), py::arg("d_trunc"),
           py::arg("schedule"), py::arg("initial_state") = py::none(), py::arg("time_dim") = 2)
      .def("loss", &PyEngine::loss, py::arg("latents"), py::arg("params"),
           "Differentiable video loss (truncated gradient in backward).")
      .def("evaluate", &PyEngine::evaluate, py::arg("latents"), "Video loss value only.")
      .def_property_readonly("stats", [](const PyEngine& self) {
        const auto& s = self.engine.stats();
        py::dict d;
        d["steps_run"] = s.steps_run;
        d["steps_run_with_grad"] = s.steps_run_with_grad;
        d["backward_calls"] = s.backward_calls;
        d["max_states_held"] = s.max_states_held;
        d["max_steps_in_graph"] = s.max_steps_in_graph;
        return d;
      });
}
