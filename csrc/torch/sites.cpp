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
 * The phases of one call are chained through futures (no thread blocks), and
 * calls run one after another in issue order, so that every rank issues the
 * same sequence on every subgroup.
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

// Runs `next` once `work` has completed successfully; an error ends the chain.
using Step = std::function<void(std::exception_ptr)>;
void then(const c10::intrusive_ptr<c10d::Work>& work, Step next) {
  work->getFuture()->addCallback([next = std::move(next)](c10::ivalue::Future& f) {
    next(f.hasError() ? f.exception_ptr() : nullptr);
  });
}

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
}

bool SiteSplit::handles_allreduce(const std::vector<at::Tensor>& ts, const c10d::AllreduceOptions& opts) const {
  return ts.size() == 1 && composable(ts[0]) && opts.reduceOp.op_ != c10d::ReduceOp::PREMUL_SUM;
}

void SiteSplit::enqueue(std::function<void()> start) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (busy_) {
      queued_.push_back(std::move(start));
      return;
    }
    busy_ = true;
  }
  start();
}

void SiteSplit::finished() {
  std::function<void()> next;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (queued_.empty()) {
      busy_ = false;
      return;
    }
    next = std::move(queued_.front());
    queued_.pop_front();
  }
  next();
}

c10::intrusive_ptr<c10d::Work> SiteSplit::allreduce(at::Tensor tensor, const c10d::AllreduceOptions& opts, int rank) {
  auto work = c10::make_intrusive<ChainWork>(rank, c10d::OpType::ALLREDUCE, std::vector<at::Tensor>{tensor});
  auto self = shared_from_this();
  enqueue([self, work, tensor, opts]() mutable { self->run_allreduce(work, tensor, opts); });
  return work;
}

void SiteSplit::run_allreduce(
    const c10::intrusive_ptr<c10d::Work>& work,
    at::Tensor tensor,
    c10d::AllreduceOptions opts) {
  auto self = shared_from_this();
  auto chain = c10::static_intrusive_pointer_cast<ChainWork>(work);
  auto end = [self, chain](std::exception_ptr e) {
    chain->done(e);
    self->finished();
  };
  try {
    const int m = site_->getSize(), j = site_->getRank();
    const int world = static_cast<int>(site_of_.size());
    const bool average = opts.reduceOp.op_ == c10d::ReduceOp::AVG;
    c10d::ReduceOp sum_or_op = average ? c10d::ReduceOp(c10d::ReduceOp::SUM) : opts.reduceOp;
    at::Tensor flat = tensor.is_contiguous() ? tensor.view({-1}) : tensor.contiguous().view({-1});
    const int64_t count = flat.numel();
    // This rank's shard: ring segment j+1 of its site, as the core's algorithm has it.
    auto seg_lo = [&](int q) { return split_at(count, m, (q + 1) % m); };
    auto seg_len = [&](int q) { return split_at(count, m, (q + 1) % m + 1) - seg_lo(q); };
    int64_t width = 0;
    for (int q = 0; q < m; q++)
      width = std::max(width, seg_len(q));
    bool even = true;
    for (int q = 0; q < m; q++)
      even = even && seg_len(q) == width;
    // Shards of unequal length travel padded to the longest (torch's list
    // collectives want equal sizes); the padding is never summed into data.
    std::vector<at::Tensor> pieces;
    for (int q = 0; q < m; q++) {
      auto view = flat.narrow(0, seg_lo(q), seg_len(q));
      if (even) {
        pieces.push_back(view);
      } else {
        auto p = at::zeros({width}, flat.options());
        p.narrow(0, 0, seg_len(q)).copy_(view);
        pieces.push_back(p);
      }
    }
    at::Tensor shard = m > 1 ? at::empty({width}, flat.options()) : flat;
    at::Tensor mine = shard.narrow(0, 0, m > 1 ? seg_len(j) : count);

    auto finish_copy = [tensor, flat, pieces, even, m, seg_lo, seg_len]() {
      if (!even)
        for (int q = 0; q < m; q++)
          flat.narrow(0, seg_lo(q), seg_len(q)).copy_(pieces[static_cast<size_t>(q)].narrow(0, 0, seg_len(q)));
      if (!tensor.is_contiguous())
        tensor.copy_(flat.view(tensor.sizes()));
    };
    auto gather = [self, end, shard, pieces, m, finish_copy](std::exception_ptr e) mutable {
      if (e)
        return end(e);
      try {
        if (m == 1) {
          finish_copy();
          return end(nullptr);
        }
        std::vector<std::vector<at::Tensor>> outs{pieces};
        std::vector<at::Tensor> in{shard};
        auto w = self->site_->allgather(outs, in, c10d::AllgatherOptions());
        then(w, [end, finish_copy](std::exception_ptr e2) {
          if (!e2) {
            try {
              finish_copy();
            } catch (...) {
              e2 = std::current_exception();
            }
          }
          end(e2);
        });
      } catch (...) {
        end(std::current_exception());
      }
    };
    auto across = [self, end, mine, sum_or_op, average, world, gather](std::exception_ptr e) mutable {
      if (e)
        return end(e);
      try {
        std::vector<at::Tensor> ts{mine};
        c10d::AllreduceOptions o;
        o.reduceOp = sum_or_op;
        auto w = self->column_->allreduce(ts, o);
        then(w, [mine, average, world, gather](std::exception_ptr e2) mutable {
          if (!e2 && average) {
            // The core's AVG: the full sum, then one true division (truncating for integers).
            try {
              if (mine.is_floating_point())
                mine.div_(world);
              else
                mine.div_(world, "trunc");
            } catch (...) {
              e2 = std::current_exception();
            }
          }
          gather(e2);
        });
      } catch (...) {
        end(std::current_exception());
      }
    };
    if (m == 1)
      return across(nullptr);
    std::vector<at::Tensor> outs{shard};
    std::vector<std::vector<at::Tensor>> ins{pieces};
    c10d::ReduceScatterOptions rs;
    rs.reduceOp = sum_or_op;
    auto w = site_->reduce_scatter(outs, ins, rs);
    then(w, across);
  } catch (...) {
    end(std::current_exception());
  }
}

c10::intrusive_ptr<c10d::Work> SiteSplit::broadcast(at::Tensor tensor, int root, int rank) {
  auto work = c10::make_intrusive<ChainWork>(rank, c10d::OpType::BROADCAST, std::vector<at::Tensor>{tensor});
  auto self = shared_from_this();
  enqueue([self, work, tensor, root, rank]() mutable {
    auto chain = c10::static_intrusive_pointer_cast<ChainWork>(work);
    auto end = [self, chain](std::exception_ptr e) {
      chain->done(e);
      self->finished();
    };
    try {
      const int root_site = self->site_of_[static_cast<size_t>(root)];
      const int root_pos = self->position_of_[static_cast<size_t>(root)];
      auto inside = [self, end, tensor, root_pos](std::exception_ptr e) {
        if (e)
          return end(e);
        try {
          if (self->site_->getSize() == 1)
            return end(nullptr);
          std::vector<at::Tensor> ts{tensor};
          c10d::BroadcastOptions o;
          o.rootRank = root_pos;
          then(self->site_->broadcast(ts, o), end);
        } catch (...) {
          end(std::current_exception());
        }
      };
      // Across sites once, inside the root's column (column rank = site).
      if (self->position_of_[static_cast<size_t>(rank)] != root_pos || self->column_->getSize() == 1)
        return inside(nullptr);
      std::vector<at::Tensor> ts{tensor};
      c10d::BroadcastOptions o;
      o.rootRank = root_site;
      then(self->column_->broadcast(ts, o), inside);
    } catch (...) {
      end(std::current_exception());
    }
  });
  return work;
}

} // namespace hetcomm_torch
