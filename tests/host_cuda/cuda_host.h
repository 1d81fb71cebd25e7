// Host emulation of the CUDA features edgehebb's kernels use, so that the .cu files compile with g++
// and run on a CPU (tests/host_cuda/__init__.py builds them). Every CUDA thread is an OS thread:
// __syncthreads is a std::barrier per thread block, warp shuffles go through a per-warp exchange
// buffer between two barrier phases, atomics are std::atomic_ref, and the dynamic shared memory is a
// 16-byte aligned buffer per block. The arithmetic is the GPU's: fmaf, sqrtf and division are
// correctly rounded on both (compiled without -ffast-math), powf may differ by an ulp.
//
// What this checks: indexing, tiling, pooling windows, barrier placement (a missing barrier shows up
// as a wrong or non-deterministic result under OS scheduling), the arithmetic and its order. What it
// cannot: speed, coalescing, bank conflicts, register or shared-memory limits, real warp timing.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define DYNAMIC_SHARED(name) float4* name = (float4*)host_cuda::shared_base

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct uint3_ { unsigned int x, y, z; };

using std::max;
using std::min;

namespace host_cuda {
struct Warp {
    explicit Warp() : sync(32) {}
    std::barrier<> sync;
    unsigned char slot[32][8];
};
struct Block {
    Block(int threads, size_t shared) : sync(threads), warps(threads / 32), memory(shared / 16 + 1) {}
    std::barrier<> sync;
    std::vector<Warp> warps;
    std::vector<float4> memory;
    std::atomic<int> vote{0};  // __syncthreads_or
};
inline thread_local Block* block = nullptr;
inline thread_local void* shared_base = nullptr;
inline thread_local uint3_ thread_index{0, 0, 0}, block_index{0, 0, 0};
inline uint3_ grid_dim{1, 1, 1}, block_dim{1, 1, 1};

// Runs body() in grid.x * grid.y blocks of `threads` OS threads. Blocks run one after another, or all
// at once with `concurrent` (kernels with grid-wide barriers need every block resident). With
// `resident` >= 0 (and `concurrent`), only the first `resident` blocks run at once and the rest start
// when those have finished, as on a GPU that has room for only `resident` of them.
inline void launch(int gx, int gy, int threads, size_t shared, bool concurrent, const std::function<void()>& body,
                   int resident = -1) {
    grid_dim = {(unsigned)gx, (unsigned)gy, 1u};
    block_dim = {(unsigned)threads, 1u, 1u};
    std::vector<std::unique_ptr<Block>> blocks;
    std::vector<std::thread> pool;
    auto start = [&](int bx, int by) {
        blocks.push_back(std::make_unique<Block>(threads, shared));
        Block* b = blocks.back().get();
        for (int t = 0; t < threads; ++t)
            pool.emplace_back([=, &body] {
                block = b;
                shared_base = b->memory.data();
                thread_index = {(unsigned)t, 0u, 0u};
                block_index = {(unsigned)bx, (unsigned)by, 0u};
                body();
            });
    };
    auto finish = [&] {
        for (auto& th : pool) th.join();
        pool.clear();
        blocks.clear();
    };
    int running = 0;
    for (int by = 0; by < gy; ++by)
        for (int bx = 0; bx < gx; ++bx) {
            if (concurrent && resident >= 0 && running == resident) {
                finish();
                running = 0;
            }
            start(bx, by);
            ++running;
            if (!concurrent) finish();
        }
    finish();
}

inline unsigned long long now_ns() {
    return (unsigned long long)std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <class T>
inline T exchange(T v, int src) {  // every lane of the warp calls; returns lane src's v
    static_assert(sizeof(T) <= 8, "8-byte slots");
    Warp& w = block->warps[thread_index.x / 32];
    const int lane = thread_index.x % 32;
    std::memcpy(w.slot[lane], &v, sizeof(T));
    w.sync.arrive_and_wait();
    T out;
    std::memcpy(&out, w.slot[src & 31], sizeof(T));
    w.sync.arrive_and_wait();
    return out;
}
}  // namespace host_cuda

#define threadIdx host_cuda::thread_index
#define blockIdx host_cuda::block_index
#define gridDim host_cuda::grid_dim
#define blockDim host_cuda::block_dim

inline void __syncthreads() { host_cuda::block->sync.arrive_and_wait(); }
inline void __syncwarp(unsigned int = 0xffffffffu) { host_cuda::block->warps[threadIdx.x / 32].sync.arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int __syncthreads_or(int predicate) {
    host_cuda::Block* b = host_cuda::block;
    b->sync.arrive_and_wait();  // every thread has read the previous vote
    if (threadIdx.x == 0) b->vote.store(0);
    b->sync.arrive_and_wait();
    if (predicate) b->vote.store(1);
    b->sync.arrive_and_wait();
    return b->vote.load();
}
inline unsigned long long host_now_ns() { return host_cuda::now_ns(); }

template <class T>
inline T __shfl_sync(unsigned int, T v, int src) { return host_cuda::exchange(v, src); }
template <class T>
inline T __shfl_xor_sync(unsigned int, T v, int mask) { return host_cuda::exchange(v, (int)(threadIdx.x % 32) ^ mask); }

template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline T __ldcg(const T* p) {
    return std::atomic_ref<T>(*const_cast<T*>(p)).load();  // cross-block data: read what others wrote
}
inline float4 __ldcg(const float4* p) { return *p; }  // tiles of data written before a grid barrier

inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return std::atomic_ref<unsigned int>(*p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
inline unsigned int atomicExch(unsigned int* p, unsigned int v) { return std::atomic_ref<unsigned int>(*p).exchange(v); }
inline unsigned int atomicMax(unsigned int* p, unsigned int v) {
    std::atomic_ref<unsigned int> a(*p);
    unsigned int old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}

inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline long long __float2ll_rn(float x) { return std::llrint(x); }  // round to nearest even (default mode)
inline float __ll2float_rn(long long x) { return (float)x; }
