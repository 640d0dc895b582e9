// Just enough of the CUDA execution model, on the CPU, to run the kernels of models/ops/src/cuda
// without a GPU (tests/test_ms_deform_attn.py). A launch runs block by block; inside a block the
// threads of one warp run as 32 std::threads so that __shfl_down_sync exchanges values as on a
// GPU, and a shuffle that not all 32 lanes reach is reported instead of hanging.
#pragma once

#include <chrono>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline

using std::floor;

struct dim3 {
  unsigned int x = 0, y = 0, z = 0;
};

// Each emulated CUDA thread is one host thread (or one iteration of a loop), so these are
// thread_local.
inline thread_local dim3 blockIdx, threadIdx, blockDim;

namespace cuda_host {

constexpr int kLanes = 32;

// Lanes meet here at every shuffle. A lane that never arrives (divergence, an early return of
// part of a warp) makes the others time out, which marks the launch as failed.
class WarpBarrier {
 public:
  bool arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == kLanes) {
      arrived_ = 0;
      ++generation_;
      released_.notify_all();
      return true;
    }
    return released_.wait_for(lock, std::chrono::seconds(5),
                              [&] { return generation_ != generation; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
};

struct Warp {
  WarpBarrier barrier;
  double slots[kLanes];
};

inline Warp* current_warp = nullptr;  // warps run one at a time
inline std::atomic<bool> diverged{false};
inline std::mutex atomic_mutex;

inline int lane_id() { return static_cast<int>(threadIdx.x) % kLanes; }

// Runs kernel() once per thread of a 1-D grid, one thread at a time: for kernels without warp
// intrinsics.
template <typename Kernel>
void launch_threads_in_turn(unsigned int blocks, unsigned int threads_per_block, Kernel kernel) {
  for (unsigned int b = 0; b < blocks; ++b) {
    for (unsigned int t = 0; t < threads_per_block; ++t) {
      blockIdx.x = b;
      threadIdx.x = t;
      blockDim.x = threads_per_block;
      kernel();
    }
  }
}

// Runs kernel() with the 32 lanes of each warp concurrently, one warp at a time; returns false
// when the lanes of a warp did not all take part in the same shuffles.
template <typename Kernel>
bool launch_warps_in_turn(unsigned int blocks, unsigned int threads_per_block, Kernel kernel) {
  diverged = false;
  for (unsigned int b = 0; b < blocks; ++b) {
    for (unsigned int w = 0; w < threads_per_block / kLanes; ++w) {
      Warp warp;
      current_warp = &warp;
      std::vector<std::thread> lanes;
      for (int lane = 0; lane < kLanes; ++lane) {
        lanes.emplace_back([=] {
          blockIdx.x = b;
          threadIdx.x = w * kLanes + lane;
          blockDim.x = threads_per_block;
          kernel();
        });
      }
      for (auto& t : lanes) t.join();
      current_warp = nullptr;
    }
  }
  return !diverged;
}

}  // namespace cuda_host

template <typename T>
T __shfl_down_sync(unsigned int mask, T value, int offset) {
  using namespace cuda_host;
  if (mask != 0xffffffffu) diverged = true;  // the kernels only shuffle across full warps
  if (diverged) return value;
  const int lane = lane_id();
  current_warp->slots[lane] = static_cast<double>(value);
  if (!current_warp->barrier.arrive_and_wait()) diverged = true;
  const T result = lane + offset < kLanes ? static_cast<T>(current_warp->slots[lane + offset]) : value;
  if (!current_warp->barrier.arrive_and_wait()) diverged = true;  // slots are reused next time
  return result;
}

template <typename T>
T gpuAtomicAdd(T* address, T value) {
  std::lock_guard<std::mutex> lock(cuda_host::atomic_mutex);
  const T old = *address;
  *address = old + value;
  return old;
}
