/*
 * "hcdev": a test-only PrivateUse1 device for hetcomm's staging path.
 *
 * Its memory is host memory, but it behaves like an accelerator where that
 * matters to a communication library: every copy runs on a stream (one
 * worker thread per stream, in issue order), a non-blocking copy returns
 * before the data has moved, events order streams against each other, and
 * only event/stream synchronisation makes a copy's result visible to the
 * host. Compute falls back to CPU kernels through blocking copies, so it is
 * ordered behind everything queued on the current stream.
 *
 * Counters (async/blocking copies by direction, synchronisations, pinned
 * host allocations) let tests assert how the staging path uses the device.
 * An optional per-copy delay makes a missing synchronisation show up as
 * wrong data instead of passing by luck.
 */
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <ATen/native/CPUFallback.h>
#include <ATen/native/Resize.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/extension.h>
#include <torch/library.h>

namespace hcdev {

constexpr c10::DeviceType kDev = c10::DeviceType::PrivateUse1;
constexpr int kPoolStreams = 4;  // stream ids 1..kPoolStreams; 0 is the default stream

// ---- counters --------------------------------------------------------------

std::atomic<int64_t> g_copy_h2d_async{0}, g_copy_h2d_sync{0}, g_copy_d2h_async{0}, g_copy_d2h_sync{0},
    g_copy_d2d{0}, g_event_syncs{0}, g_stream_syncs{0}, g_device_syncs{0}, g_pinned_allocs{0},
    g_delay_us{0};

// ---- streams: one FIFO worker thread each ---------------------------------

// Runs a blocking wait with the GIL released when the caller holds it. A
// stream's worker drops a finished job's tensors, and dropping the last C++
// reference to a Python-owned tensor takes the GIL; a caller waiting on the
// stream with the GIL held (Storage.resize_ from Python, which FSDP2 calls
// to free and regrow parameters) would wait for a worker that waits for it.
template <typename Wait>
void wait_without_gil(Wait&& wait) {
  if (Py_IsInitialized() && PyGILState_Check()) {
    pybind11::gil_scoped_release no_gil;
    wait();
  } else {
    wait();
  }
}

class Queue {
 public:
  Queue() : worker_([this] { run(); }) {}
  ~Queue() {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    worker_.join();
  }
  void push(std::function<void()> fn) {
    {
      std::lock_guard<std::mutex> g(mu_);
      jobs_.push_back(std::move(fn));
      ++queued_;
    }
    cv_.notify_all();
  }
  void drain() {
    wait_without_gil([this] {
      std::unique_lock<std::mutex> g(mu_);
      uint64_t target = queued_;
      cv_.wait(g, [&] { return done_ >= target; });
    });
  }
  bool idle() {
    std::lock_guard<std::mutex> g(mu_);
    return done_ == queued_;
  }
  std::pair<uint64_t, uint64_t> state() {
    std::lock_guard<std::mutex> g(mu_);
    return {queued_, done_};
  }

 private:
  void run() {
    std::unique_lock<std::mutex> g(mu_);
    for (;;) {
      cv_.wait(g, [&] { return stop_ || !jobs_.empty(); });
      if (jobs_.empty())
        return;
      auto fn = std::move(jobs_.front());
      jobs_.pop_front();
      g.unlock();
      fn();
      // The job's tensors are released before it counts as done, so that a
      // synchronised stream holds no reference to them any more.
      fn = nullptr;
      g.lock();
      ++done_;
      cv_.notify_all();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  uint64_t queued_ = 0, done_ = 0;
  bool stop_ = false;
  std::thread worker_;
};

Queue& queue(c10::StreamId id) {
  // Leaked on purpose: streams live as long as the process.
  static auto* queues = [] {
    auto* q = new std::vector<Queue*>();
    for (int i = 0; i <= kPoolStreams; i++)
      q->push_back(new Queue());
    return q;
  }();
  TORCH_CHECK(id >= 0 && id <= kPoolStreams, "hcdev: no stream ", id);
  return *(*queues)[static_cast<size_t>(id)];
}

thread_local c10::StreamId t_current = 0;
std::atomic<int> g_next_pool{0};

// An event: versions recorded (enqueued) and reached (run by the stream).
// Jobs hold it by shared pointer: a stream may wait on an event whose
// c10::Event is already gone (as cudaStreamWaitEvent allows).
struct Event {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t recorded = 0, reached = 0;
  void wait_for(uint64_t v) {
    wait_without_gil([&] {
      std::unique_lock<std::mutex> g(mu);
      cv.wait(g, [&] { return reached >= v; });
    });
  }
};
using EventRef = std::shared_ptr<Event>;

// The handle c10 stores in its event_ slot.
EventRef& ref(void* handle) {
  return *static_cast<EventRef*>(handle);
}

struct GuardImpl final : c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return kDev; }
  c10::Device exchangeDevice(c10::Device) const override { return c10::Device(kDev, 0); }
  c10::Device getDevice() const override { return c10::Device(kDev, 0); }
  void setDevice(c10::Device d) const override { TORCH_CHECK(d.index() <= 0, "hcdev: one device only"); }
  void uncheckedSetDevice(c10::Device) const noexcept override {}
  c10::Stream getStream(c10::Device d) const override {
    return c10::Stream(c10::Stream::UNSAFE, c10::Device(kDev, 0), t_current);
  }
  c10::Stream getDefaultStream(c10::Device) const override {
    return c10::Stream(c10::Stream::UNSAFE, c10::Device(kDev, 0), 0);
  }
  c10::Stream getStreamFromGlobalPool(c10::Device, bool) const override {
    return c10::Stream(c10::Stream::UNSAFE, c10::Device(kDev, 0), 1 + (g_next_pool++ % kPoolStreams));
  }
  c10::Stream getNewStream(c10::Device d, int) const override { return getStreamFromGlobalPool(d, false); }
  c10::Stream exchangeStream(c10::Stream s) const override {
    auto old = t_current;
    t_current = s.id();
    return c10::Stream(c10::Stream::UNSAFE, c10::Device(kDev, 0), old);
  }
  c10::DeviceIndex deviceCount() const noexcept override { return 1; }
  void record(void** event, const c10::Stream& stream, const c10::DeviceIndex, const c10::EventFlag) const override {
    if (!*event)
      *event = new EventRef(std::make_shared<Event>());
    EventRef e = ref(*event);
    uint64_t v;
    {
      std::lock_guard<std::mutex> g(e->mu);
      v = ++e->recorded;
    }
    queue(stream.id()).push([e, v] {
      std::lock_guard<std::mutex> g(e->mu);
      if (e->reached < v)
        e->reached = v;
      e->cv.notify_all();
    });
  }
  void block(void* event, const c10::Stream& stream) const override {
    if (!event)
      return;
    EventRef e = ref(event);
    uint64_t v;
    {
      std::lock_guard<std::mutex> g(e->mu);
      v = e->recorded;
    }
    queue(stream.id()).push([e, v] { e->wait_for(v); });
  }
  bool queryEvent(void* event) const override {
    if (!event)
      return true;
    EventRef& e = ref(event);
    std::lock_guard<std::mutex> g(e->mu);
    return e->reached >= e->recorded;
  }
  void destroyEvent(void* event, const c10::DeviceIndex) const noexcept override {
    delete static_cast<EventRef*>(event);
  }
  void synchronizeEvent(void* event) const override {
    ++g_event_syncs;
    if (!event)
      return;
    EventRef& e = ref(event);
    uint64_t v;
    {
      std::lock_guard<std::mutex> g(e->mu);
      v = e->recorded;
    }
    e->wait_for(v);
  }
  bool queryStream(const c10::Stream& s) const override { return queue(s.id()).idle(); }
  void synchronizeStream(const c10::Stream& s) const override {
    ++g_stream_syncs;
    queue(s.id()).drain();
  }
  void synchronizeDevice(const c10::DeviceIndex) const override {
    ++g_device_syncs;
    for (int i = 0; i <= kPoolStreams; i++)
      queue(i).drain();
  }
  void recordDataPtrOnStream(const c10::DataPtr&, const c10::Stream&) const override {}
};

C10_REGISTER_GUARD_IMPL(PrivateUse1, GuardImpl);

// ---- memory --------------------------------------------------------------

void free_block(void* p) { std::free(p); }

struct DeviceAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* p = n ? std::malloc(n) : nullptr;
    TORCH_CHECK(!n || p, "hcdev: out of memory allocating ", n, " bytes");
    return {p, p, &free_block, c10::Device(kDev, 0)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_block; }
  void copy_data(void* dst, const void* src, std::size_t n) const override { std::memcpy(dst, src, n); }
};
DeviceAllocator g_device_alloc;
REGISTER_ALLOCATOR(c10::DeviceType::PrivateUse1, &g_device_alloc);

// "Pinned" host memory: plain malloc, remembered so that isPinnedPtr works,
// and counted so that tests see how often staging allocates.
std::mutex g_pinned_mu;
std::set<const void*> g_pinned;

void free_pinned(void* p) {
  {
    std::lock_guard<std::mutex> g(g_pinned_mu);
    g_pinned.erase(p);
  }
  std::free(p);
}

struct PinnedAllocator final : at::HostAllocator {
  c10::DataPtr allocate(size_t n) override {
    ++g_pinned_allocs;
    void* p = std::malloc(n ? n : 1);
    TORCH_CHECK(p, "hcdev: out of host memory allocating ", n, " bytes");
    {
      std::lock_guard<std::mutex> g(g_pinned_mu);
      g_pinned.insert(p);
    }
    return {p, p, &free_pinned, c10::Device(c10::kCPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_pinned; }
  void copy_data(void* dst, const void* src, std::size_t n) const override { std::memcpy(dst, src, n); }
  bool record_event(void*, void*, c10::Stream) override { return true; }
  void empty_cache() override {}
  at::HostStats get_stats() override { return {}; }
  void reset_accumulated_stats() override {}
  void reset_peak_stats() override {}
};
PinnedAllocator g_pinned_alloc;
REGISTER_HOST_ALLOCATOR(at::kPrivateUse1, &g_pinned_alloc);

struct Hooks final : at::PrivateUse1HooksInterface {
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  void setCurrentDevice(c10::DeviceIndex) const override {}
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex) const override { return 0; }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex) const override { return 0; }
  at::Device getDeviceFromPtr(void*) const override { return c10::Device(kDev, 0); }
  bool isPinnedPtr(const void* p) const override {
    std::lock_guard<std::mutex> g(g_pinned_mu);
    return g_pinned.count(p) > 0;
  }
  at::Allocator* getPinnedMemoryAllocator() const override { return &g_pinned_alloc; }
  // Storage.resize_ (FSDP2 frees and regrows parameter storage with it).
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t bytes) const override {
    for (int i = 0; i <= kPoolStreams; i++)
      queue(i).drain();  // queued copies may still touch the old memory
    auto* impl = storage.unsafeGetStorageImpl();
    at::DataPtr fresh = g_device_alloc.allocate(bytes);
    size_t keep = std::min(bytes, impl->nbytes());
    if (keep)
      std::memcpy(fresh.get(), impl->data(), keep);
    impl->set_data_ptr_noswap(std::move(fresh));
    impl->set_nbytes(bytes);
  }
  const at::Generator& getDefaultGenerator(c10::DeviceIndex) const override {
    static auto gen = at::detail::createCPUGenerator();
    return gen;
  }
};

// ---- kernels -------------------------------------------------------------------

// The same memory seen as a CPU tensor (the device's memory is host memory).
at::Tensor host_view(const at::Tensor& t) {
  if (t.device().is_cpu())
    return t;
  return at::from_blob(
      t.data_ptr(), t.sizes(), t.strides(), at::TensorOptions().dtype(t.scalar_type()).device(at::kCPU));
}

at::Tensor empty_memory_format(
    c10::IntArrayRef size,
    std::optional<at::ScalarType> dtype,
    std::optional<at::Layout>,
    std::optional<at::Device>,
    std::optional<bool>,
    std::optional<at::MemoryFormat> memory_format) {
  return at::detail::empty_generic(
      size, &g_device_alloc, c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
      c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided(
    c10::IntArrayRef size,
    c10::IntArrayRef stride,
    std::optional<at::ScalarType> dtype,
    std::optional<at::Layout>,
    std::optional<at::Device>,
    std::optional<bool>) {
  return at::detail::empty_strided_generic(
      size, stride, &g_device_alloc, c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
      c10::dtype_or_default(dtype));
}

at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool non_blocking) {
  bool h2d = self.device().is_cpu();
  bool d2h = dst.device().is_cpu();
  if (!h2d && !d2h)
    ++g_copy_d2d;
  else if (h2d)
    ++(non_blocking ? g_copy_h2d_async : g_copy_h2d_sync);
  else
    ++(non_blocking ? g_copy_d2h_async : g_copy_d2h_sync);
  // The job owns its tensors: the caller may drop them before it runs.
  at::Tensor src_h = host_view(self), dst_h = host_view(dst), src_keep = self, dst_keep = dst;
  int64_t delay = g_delay_us.load();
  auto& q = queue(t_current);
  q.push([src_h, dst_h, src_keep, dst_keep, delay]() mutable {
    if (delay > 0)
      std::this_thread::sleep_for(std::chrono::microseconds(delay));
    dst_h.copy_(src_h);
  });
  if (!non_blocking)
    q.drain();
  return dst;
}

at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  at::native::resize_(dst, self.sizes(), std::nullopt);
  return copy_from(self, dst, false);
}

const at::Tensor& resize_(const at::Tensor& self, c10::IntArrayRef size, std::optional<at::MemoryFormat> fmt) {
  return at::native::resize_(self, size, fmt);
}

at::Tensor& set_storage(at::Tensor& self, c10::Storage src, c10::SymInt offset, c10::SymIntArrayRef size,
                        c10::SymIntArrayRef stride) {
  return at::native::set_storage_cpu_(self, src, offset.expect_int(), c10::asIntArrayRefUnchecked(size),
                                      c10::asIntArrayRefUnchecked(stride));
}

at::Tensor& set_source(at::Tensor& self, c10::Storage src) {
  int64_t n = static_cast<int64_t>(src.nbytes() / self.dtype().itemsize());
  return at::native::set_storage_cpu_(self, src, 0, {n}, {});
}

void fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  at::native::cpu_fallback(op, stack);
}

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", empty_memory_format);
  m.impl("empty_strided", empty_strided);
  m.impl("_copy_from", copy_from);
  m.impl("_copy_from_and_resize", copy_from_and_resize);
  m.impl("resize_", resize_);
  m.impl("set_.source_Storage_storage_offset", set_storage);
  m.impl("set_.source_Storage", set_source);
  m.impl("as_strided", at::native::as_strided_tensorimpl);
  m.impl("view", at::native::view);
  m.impl("_reshape_alias", at::native::_reshape_alias);
  m.impl("unfold", at::native::unfold);
  m.impl("alias", at::native::alias);
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

// Autograd on this device is the CPU's.
TORCH_LIBRARY_IMPL(_, AutogradPrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFallthrough());
}

void init_hooks() {
  static Hooks hooks;
  static bool done = [] {
    at::RegisterPrivateUse1HooksInterface(&hooks);
    return true;
  }();
  (void)done;
}

} // namespace hcdev

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  hcdev::init_hooks();
  m.def("counters", [] {
    return std::map<std::string, int64_t>{
        {"copy_h2d_async", hcdev::g_copy_h2d_async.load()},
        {"copy_h2d_sync", hcdev::g_copy_h2d_sync.load()},
        {"copy_d2h_async", hcdev::g_copy_d2h_async.load()},
        {"copy_d2h_sync", hcdev::g_copy_d2h_sync.load()},
        {"copy_d2d", hcdev::g_copy_d2d.load()},
        {"event_syncs", hcdev::g_event_syncs.load()},
        {"stream_syncs", hcdev::g_stream_syncs.load()},
        {"device_syncs", hcdev::g_device_syncs.load()},
        {"pinned_allocs", hcdev::g_pinned_allocs.load()},
    };
  });
  m.def("reset_counters", [] {
    for (auto* c : {&hcdev::g_copy_h2d_async, &hcdev::g_copy_h2d_sync, &hcdev::g_copy_d2h_async,
                    &hcdev::g_copy_d2h_sync, &hcdev::g_copy_d2d, &hcdev::g_event_syncs, &hcdev::g_stream_syncs,
                    &hcdev::g_device_syncs, &hcdev::g_pinned_allocs})
      c->store(0);
  });
  m.def("set_copy_delay_us", [](int64_t us) { hcdev::g_delay_us.store(us); });
  m.def(
      "synchronize", [] { hcdev::GuardImpl().synchronizeDevice(0); }, py::call_guard<py::gil_scoped_release>());
  m.def("queue_state", [] {
    std::vector<std::pair<uint64_t, uint64_t>> out;
    for (int i = 0; i <= hcdev::kPoolStreams; i++)
      out.push_back(hcdev::queue(i).state());
    return out;
  });
  m.def("current_stream_id", [] { return static_cast<int64_t>(hcdev::t_current); });
}
