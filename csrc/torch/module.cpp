/*
 * Python binding of the shim: one class, made from the addresses of the
 * core's function table and of a connected communicator (both handed over by
 * hetcomm/torch/backend.py), plus the exit hook.
 */
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#include <torch/python.h>

#include "hetcomm_torch.hpp"

namespace py = pybind11;

namespace {

// Holder that releases the GIL while the backend is destroyed (closing the
// communicator waits for its worker thread), as torch's own backends do.
template <typename T>
class NoGilHolder {
  c10::intrusive_ptr<T> impl_{};

 public:
  NoGilHolder() = default;
  NoGilHolder(const NoGilHolder&) = default;
  NoGilHolder(NoGilHolder&&) noexcept = default;
  NoGilHolder& operator=(const NoGilHolder&) = default;
  NoGilHolder& operator=(NoGilHolder&&) noexcept = default;
  /* implicit */ NoGilHolder(c10::intrusive_ptr<T> impl) : impl_(std::move(impl)) {}
  explicit NoGilHolder(T* impl) : impl_(c10::intrusive_ptr<T>::unsafe_steal_from_new(impl)) {}
  ~NoGilHolder() {
    if (impl_) {
      if (PyGILState_Check()) {
        py::gil_scoped_release release;
        impl_.reset();
      } else {
        impl_.reset();
      }
    }
  }
  T& operator*() const noexcept {
    return *impl_;
  }
  T* operator->() const noexcept {
    return impl_.get();
  }
  [[nodiscard]] T* get() const noexcept {
    return impl_.get();
  }
  void reset() noexcept {
    impl_.reset();
  }
  operator bool() const noexcept {
    return impl_;
  }
};

} // namespace

PYBIND11_DECLARE_HOLDER_TYPE(T, NoGilHolder<T>, true)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using hetcomm_torch::HcBackend;
  m.doc() = "hetcomm's c10d backend (built against the installed torch)";
  py::module_::import("torch.distributed");
  auto base = py::module_::import("torch._C._distributed_c10d").attr("Backend");
  py::class_<HcBackend, NoGilHolder<HcBackend>>(m, "HetcommBackend", base)
      .def(
          py::init([](uintptr_t api, uintptr_t comm, int rank, int size, double timeout_s, std::string name) {
            auto ms = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000.0));
            return NoGilHolder<HcBackend>(HcBackend::create(
                reinterpret_cast<const hc_api*>(api),
                reinterpret_cast<hc_comm*>(comm),
                rank,
                size,
                ms,
                std::move(name)));
          }),
          py::arg("api"),
          py::arg("comm"),
          py::arg("rank"),
          py::arg("size"),
          py::arg("timeout_s"),
          py::arg("name"),
          "Takes ownership of a connected hc_comm (closed by shutdown(), abort() or the destructor).")
      .def_property_readonly("comm_name", &HcBackend::name, "The communicator's name (shown in errors).")
      .def_property_readonly("comm_status", &HcBackend::comm_status, "The core's status code (0: healthy).")
      .def_property_readonly("comm_error", &HcBackend::comm_error, "What broke the communicator, if anything.")
      .def_property_readonly("inflight", &HcBackend::inflight, "Core ops issued and not completed yet.")
      .def_property_readonly("timeout", &HcBackend::timeout)
      .def_property_readonly(
          "has_site_split", &HcBackend::has_site_split, "Whether in-site phases run on another library.")
      .def(
          "set_site_split",
          [](HcBackend& self, c10::intrusive_ptr<c10d::Backend> site, NoGilHolder<HcBackend> column,
             std::vector<int> site_of, std::vector<int> position_of) {
            self.set_site_split(std::make_shared<hetcomm_torch::SiteSplit>(
                std::move(site), c10::intrusive_ptr<HcBackend>::reclaim_copy(column.get()), std::move(site_of),
                std::move(position_of)));
          },
          py::arg("site"),
          py::arg("column"),
          py::arg("site_of"),
          py::arg("position_of"),
          "Runs the in-site phases of allreduce and broadcast on `site` (this site's group of another "
          "c10d backend) and the inter-site phase on `column` (a hetcomm backend of the ranks at this "
          "rank's position in every site). site_of/position_of: every rank's site index and position.")
      .def(
          "failed_ranks",
          [](HcBackend& self, double timeout_s) {
            return self.failed_ranks(timeout_s < 0 ? -1 : static_cast<int>(timeout_s * 1000.0));
          },
          py::arg("timeout_s"),
          py::call_guard<py::gil_scoped_release>(),
          "The group ranks the survivors agreed are lost (waits up to timeout_s for the agreement; "
          "negative: forever).")
      .def_property(
          "settings",
          &HcBackend::settings,
          &HcBackend::set_settings,
          "The hetcomm settings (JSON) the group was made with; groups shrunk from it inherit them.")
      .def_property_readonly(
          "comm_address",
          &HcBackend::comm_address,
          "Address of the core communicator, borrowed: valid until the backend is shut down.")
      .def(
          "allreduce_compressed",
          &HcBackend::allreduce_compressed,
          py::arg("tensor"),
          py::arg("codec"),
          py::arg("residual_key") = 0,
          py::arg("sr_seed") = 0,
          py::arg("redop") = static_cast<int>(HC_SUM),
          py::arg("tensor_future") = false,
          py::call_guard<py::gil_scoped_release>(),
          "Allreduce with a codec (hetcomm.config.CODECS index), error feedback under residual_key (0: off) "
          "and stochastic rounding seeded by sr_seed (0: off). Returns a c10d Work; with tensor_future its "
          "future's value is the tensor itself (what a DDP comm hook returns), not a list.");
  m.def(
      "register_ddp_hook",
      [](py::object reducer, py::object group, int codec, bool error_feedback, bool stochastic_rounding,
         uint64_t seed, uint64_t key_base) {
        hetcomm_torch::DdpHookConfig cfg{codec, error_feedback, stochastic_rounding, seed, key_base};
        hetcomm_torch::register_ddp_hook(reducer.cast<c10d::Reducer&>(), group.cast<c10d::ProcessGroup&>(), cfg);
      },
      py::arg("reducer"),
      py::arg("group"),
      py::arg("codec"),
      py::arg("error_feedback"),
      py::arg("stochastic_rounding"),
      py::arg("seed"),
      py::arg("key_base"),
      "Registers hetcomm's C++ DDP comm hook (compressed allreduce, no Python per bucket) on a DDP reducer.");
  m.def(
      "staging_stats",
      [] {
        auto s = hetcomm_torch::HostPool::instance().stats();
        return py::dict(py::arg("allocations") = s.allocations, py::arg("reuses") = s.reuses,
                        py::arg("free_bytes") = s.free_bytes);
      },
      "The host staging pool: blocks allocated, blocks lent again, bytes held free.");
  m.def(
      "staging_clear",
      [] { hetcomm_torch::HostPool::instance().clear(); },
      "Frees the staging pool's idle blocks.");
  m.def(
      "shutdown_all",
      &HcBackend::shutdown_all,
      py::call_guard<py::gil_scoped_release>(),
      "Closes every live backend (aborting those with ops in flight).");
}
