/*
 * The in-site phases on the site's own library (HETCOMM_INTRA).
 *
 * The hierarchical allreduce (csrc/algo/hierarchical.c) is three phases:
 * reduce-scatter inside each site, allreduce of each shard across sites by
 * the ranks holding it, allgather inside each site. Here the first and last
 * run on a per-site c10d backend (nccl, hccl; gloo stands in on CPUs) and
 * the middle one on a hetcomm communicator of the j-th ranks of every site,
 * which keeps the codecs, streams and CURVE of the inter-site leg. Which
 * library carries a phase is a transport choice: the shards are the ones the
 * core's algorithm uses (local position j owns ring segment j+1, split as
 * hc_split does) and the column allreduce is the core's ring, so the sums are
 * taken in the same order. A broadcast crosses sites once, within the root's
 * column, then spreads inside each site from that column's rank.
 *
 * The phases run on a thread of this object's own (the caller never blocks;
 * some backends' Works have no future to chain on), one call after another
 * in issue order, so that every rank issues the same sequence on both
 * subgroups.
 */
#include <c10/util/Exception.h>

#include "hetcomm_torch.hpp"

namespace hetcomm_torch {

namespace {

// The core's split of `count` elements into `parts` segments (hc_split).
int64_t split_at(int64_t count, int parts, int i) {
  return static_cast<int64_t>(
      static_cast<unsigned __int128>(count) * static_cast<unsigned>(i) / static_cast<unsigned>(parts));
}

// A Work completed by the last phase of a composed call.
class ChainWork : public c10d::Work {
 public:
  ChainWork(int rank, c10d::OpType type, std::vector<at::Tensor> result)
      : c10d::Work(rank, type),
        result_(std::move(result)),
        future_(c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()))) {}
  void done(std::exception_ptr eptr) {
    if (eptr)
      future_->setError(eptr);
    else
      future_->markCompleted(c10::IValue(result_));
    finish(eptr);
  }
  std::vector<at::Tensor> result() override {
    return result_;
  }
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override {
    return future_;
  }

 private:
  std::vector<at::Tensor> result_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

bool composable(const at::Tensor& t) {
  return t.layout() == at::kStrided && !t.is_complex() && t.scalar_type() != at::kBool;
}

} // namespace

SiteSplit::SiteSplit(
    c10::intrusive_ptr<c10d::Backend> site,
    c10::intrusive_ptr<HcBackend> column,
    std::vector<int> site_of,
    std::vector<int> position_of)
    : site_(std::move(site)),
      column_(std::move(column)),
      site_of_(std::move(site_of)),
      position_of_(std::move(position_of)) {
  TORCH_CHECK(site_of_.size() == position_of_.size() && !site_of_.empty(), "hetcomm: bad site map");
  worker_ = std::thread([this] { run(); });
}

SiteSplit::~SiteSplit() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  worker_.join();
}

void SiteSplit::run() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] { return stop_ || !queued_.empty(); });
    if (queued_.empty())
      return;
    auto job = std::move(queued_.front());
    queued_.pop_front();
    lock.unlock();
    job();
    lock.lock();
  }
}

bool SiteSplit::handles_allreduce(const std::vector<at::Tensor>& ts, const c10d::AllreduceOptions& opts) const {
  return ts.size() == 1 && composable(ts[0]) && opts.reduceOp.op_ != c10d::ReduceOp::PREMUL_SUM;
}

void SiteSplit::enqueue(std::function<void()> job) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    queued_.push_back(std::move(job));
  }
  cv_.notify_all();
}

namespace {

// Runs `body` and completes `work` with its outcome.
void complete(const c10::intrusive_ptr<ChainWork>& work, const std::function<void()>& body) {
  std::exception_ptr eptr;
  try {
    body();
  } catch (...) {
    eptr = std::current_exception();
  }
  work->done(eptr);
}

void wait(const c10::intrusive_ptr<c10d::Work>& w) {
  w->wait();
}

} // namespace

c10::intrusive_ptr<c10d::Work> SiteSplit::allreduce(at::Tensor tensor, const c10d::AllreduceOptions& opts, int rank) {
  auto work = c10::make_intrusive<ChainWork>(rank, c10d::OpType::ALLREDUCE, std::vector<at::Tensor>{tensor});
  enqueue([this, work, tensor, opts] { complete(work, [&] { run_allreduce(tensor, opts); }); });
  return work;
}

void SiteSplit::run_allreduce(const at::Tensor& tensor, const c10d::AllreduceOptions& opts) {
  const int m = site_->getSize(), j = site_->getRank();
  const int world = static_cast<int>(site_of_.size());
  const bool average = opts.reduceOp.op_ == c10d::ReduceOp::AVG;
  c10d::ReduceOp op = average ? c10d::ReduceOp(c10d::ReduceOp::SUM) : opts.reduceOp;
  at::Tensor flat = tensor.is_contiguous() ? tensor.view({-1}) : tensor.contiguous().view({-1});
  const int64_t count = flat.numel();
  // Position q's shard: ring segment q+1 of its site, as the core's algorithm has it.
  auto seg_lo = [&](int q) { return split_at(count, m, (q + 1) % m); };
  auto seg_len = [&](int q) { return split_at(count, m, (q + 1) % m + 1) - seg_lo(q); };
  int64_t width = 0;
  bool even = true;
  for (int q = 0; q < m; q++)
    width = std::max(width, seg_len(q));
  for (int q = 0; q < m; q++)
    even = even && seg_len(q) == width;
  // Shards of unequal length travel padded to the longest (torch's list
  // collectives want equal sizes); the padding is never summed into data.
  std::vector<at::Tensor> pieces;
  for (int q = 0; q < m && m > 1; q++) {
    auto view = flat.narrow(0, seg_lo(q), seg_len(q));
    if (even) {
      pieces.push_back(view);
    } else {
      auto padded = at::zeros({width}, flat.options());
      padded.narrow(0, 0, seg_len(q)).copy_(view);
      pieces.push_back(padded);
    }
  }
  at::Tensor shard = m > 1 ? at::empty({width}, flat.options()) : flat;
  at::Tensor mine = shard.narrow(0, 0, m > 1 ? seg_len(j) : count);
  if (m > 1) {
    std::vector<at::Tensor> outs{shard};
    std::vector<std::vector<at::Tensor>> ins{pieces};
    c10d::ReduceScatterOptions rs;
    rs.reduceOp = op;
    wait(site_->reduce_scatter(outs, ins, rs));
  }
  {
    std::vector<at::Tensor> ts{mine};
    c10d::AllreduceOptions o;
    o.reduceOp = op;
    wait(column_->allreduce(ts, o));
  }
  if (average) {
    // The core's AVG: the full sum, then one true division (truncating for integers).
    if (mine.is_floating_point())
      mine.div_(world);
    else
      mine.div_(world, "trunc");
  }
  if (m > 1) {
    std::vector<std::vector<at::Tensor>> outs{pieces};
    std::vector<at::Tensor> in{shard};
    wait(site_->allgather(outs, in, c10d::AllgatherOptions()));
    if (!even)
      for (int q = 0; q < m; q++)
        flat.narrow(0, seg_lo(q), seg_len(q)).copy_(pieces[static_cast<size_t>(q)].narrow(0, 0, seg_len(q)));
  }
  if (!tensor.is_contiguous())
    tensor.copy_(flat.view(tensor.sizes()));
}

c10::intrusive_ptr<c10d::Work> SiteSplit::broadcast(at::Tensor tensor, int root, int rank) {
  auto work = c10::make_intrusive<ChainWork>(rank, c10d::OpType::BROADCAST, std::vector<at::Tensor>{tensor});
  enqueue([this, work, tensor, root, rank] {
    complete(work, [&] {
      const int root_site = site_of_[static_cast<size_t>(root)];
      const int root_pos = position_of_[static_cast<size_t>(root)];
      std::vector<at::Tensor> ts{tensor};
      // Across sites once, inside the root's column (column rank = site) ...
      if (position_of_[static_cast<size_t>(rank)] == root_pos && column_->getSize() > 1) {
        c10d::BroadcastOptions o;
        o.rootRank = root_site;
        wait(column_->broadcast(ts, o));
      }
      // ... then inside every site from that column's rank.
      if (site_->getSize() > 1) {
        c10d::BroadcastOptions o;
        o.rootRank = root_pos;
        wait(site_->broadcast(ts, o));
      }
    });
  });
  return work;
}

} // namespace hetcomm_torch
