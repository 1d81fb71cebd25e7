// The Krotov-Hopfield rank-update rule, many minibatches per launch (edgehebb's PyCUDA backend).
//
// One persistent kernel runs `nsteps` minibatch steps of the rule of edgehebb/hebbian.py
// (rank_update) back to back. Every block stays resident (the host launches at most one block per
// multiprocessor) and the blocks meet at grid-wide barriers, three per step:
//
//   A  patches -> winners      each warp cuts PW patches out of the uint8 NHWC images (no patch
//                              matrix), preprocesses them, computes the currents h = Mp . v for
//                              all K units against Mp held in shared memory, keeps the top RANK
//                              units per patch, and adds +v (winner) and -delta*v (rank-m unit)
//                              to the K x N accumulator `acc` with 64-bit fixed-point atomics.
//   -- grid barrier --
//   B  rows -> ds             one warp per unit row k: a = acc[k] / 2^32, c = Mp[k] . a
//                              (= sum over patches of g*h), ds[k] = a - c * M[k]; acc is zeroed
//                              for the next step and max|ds| goes to a global atomicMax.
//   -- grid barrier --
//   C  rows -> M              M[k] += ds[k] * eps / max(max|ds|, 1e-30); Mp (the Lebesgue power
//                              p weights, = M for p = 2) is rewritten transposed for phase A.
//   -- grid barrier --
//
// Ranking by cosine (RANK_COS = 1, hebbian.py's rank_by="cosine"): phase A ranks units by
// h_k / s_k with s_k = ||M_k||_p^(p-1) (the cosine for p = 2). Mp^T then holds Mp[k] / s_k, so phase A
// is unchanged and its "currents" are the scores. Phase C finds s_k by a warp reduction over the row
// it has just written (kept in registers: sum |m| |Mp| = ||M_k||_p^p, one fmaf chain per lane over
// n = lane + 32u, then the butterfly), floored at 1e-30 as in the oracle. The update still uses the
// true currents: phase B takes c from Mp[k] itself (M for p = 2; for p != 2 sign(m)|m|^(p-1)
// recomputed from M, not the scaled Mp^T), so ds is the rule's own.
//
// Residency: the barriers need every block of the grid running at once. If one never arrives (a GPU
// shared through MPS with an SM limit, a green context, another process's kernel holding SMs), the
// waiting blocks give up after GRID_TIMEOUT_NS, set the fault word barrier[1] and return; blocks that
// start later see it and return too. The host then raises instead of hanging. M is left as of the
// last step every block finished (phase C has no barrier inside it).
//
// Determinism: every sum has a fixed order that depends on no launch parameter. Currents are one
// fmaf chain over n = 0..N-1 per (patch, unit) in every tile shape; ties between units go to the
// lower unit index; the accumulator is integer (order-free) fixed point with 2^-32 resolution;
// row sums are warp butterflies over a fixed lane mapping. So M is bitwise the same for any grid
// size, block size or tile shape.
//
// Thread layout of phase A. A warp owns PW = LB * TB patches and all K units: lane = lb * LK + lk
// (LK = 32 / LB lanes per patch group). Lane (lb, lk) accumulates patches lb*TB .. lb*TB+TB-1 and
// the unit pairs k = 2 * (lk + LK * j) + {0, 1}, j < TK2, of each K chunk of KCH = 32 * TK2 / LB
// units: float2 reads of Mp from shared memory, conflict-free across lk and broadcast across lb.
// The top-RANK lists of the LK lanes of a group are merged with a butterfly of bitonic merges.
//
// Shared memory: Ms[NC][KCH] (a tile of Mp transposed: all of it when RESIDENT, i.e. for W=4,
// K=400: 80 KB) followed by each warp's patches vs[N][PW].
//
// Compile-time constants, all given with -D by edgehebb/learn_pycuda.py (kernel_plan):
//   K, N, CH, KW, STRIDE      filters, patch length C*W*W, channels, patch width, stride
//   RANK, RP                  the rank m of the anti-Hebbian unit, RP = next power of two >= m
//   PRE                       per-patch preprocessing: 0 none, 1 center, 2 unit, 3 center-unit
//   POW2                      1 when the Lebesgue power p is 2 (Mp = M, no pow)
//   RANK_COS                  1: rank units by h / ||M_k||_p^(p-1) (above); 0 (default): by h
//   NTHREADS, LB, TB, TK2     block size and the tile shape above
//   NKC, NC, NNC              number of K chunks, n per shared tile, number of n chunks
//   GRID_TIMEOUT_NS           optional: how long a grid barrier waits before it reports a fault

#ifndef DYNAMIC_SHARED  // overridable so the kernel can be exercised by a host emulation
#define DYNAMIC_SHARED(name) extern __shared__ float4 name[]
#endif

#ifndef RANK_COS
#define RANK_COS 0
#endif

#ifndef GRID_TIMEOUT_NS
#define GRID_TIMEOUT_NS 10000000000ull  // 10 s: far above any step's phase, short of a user giving up
#endif

#define NWARPS (NTHREADS / 32)
#define LK (32 / LB)
#define PW (LB * TB)
#define TK (2 * TK2)
#define KCH (LK * TK)
#define KP (KCH * NKC)
#define NPL ((N + 31) / 32)
#define RESIDENT (NKC == 1 && NNC == 1)
#define FULL_MASK 0xffffffffu
#define FIX_ONE 4294967296.0f               // 2^32: fixed-point scale of the accumulator
#define FIX_INV 2.3283064365386963e-10f     // 2^-32
#define NO_UNIT 0x7fffffff

static_assert(NTHREADS % 32 == 0, "whole warps");
static_assert(LB == 1 || LB == 2 || LB == 4, "LB divides 32");
static_assert(TB == 1 || TB == 2 || TB == 4, "TB in {1, 2, 4}");
static_assert((RP & (RP - 1)) == 0 && RP >= RANK, "RP is a power of two >= RANK");
static_assert(NC * NNC >= N, "n chunks cover N");

// ------------------------------------------------------------------------------------------------
// top-RANK lists: RP (value, unit) pairs in descending order; ties go to the lower unit index

struct Top {
    float v[RP];
    int i[RP];
};

__device__ __forceinline__ bool better(float av, int ai, float bv, int bi) {
    return av > bv || (av == bv && ai < bi);
}

__device__ __forceinline__ void top_init(Top& t) {
#pragma unroll
    for (int r = 0; r < RP; ++r) {
        t.v[r] = -INFINITY;
        t.i[r] = NO_UNIT;
    }
}

// Insert a candidate of this lane. A lane meets its units in increasing index order, so an equal
// value never displaces an entry (that entry has the lower index): a strict > is the tie rule here.
__device__ __forceinline__ void top_insert(Top& t, float cv, int ci) {
#pragma unroll
    for (int r = 0; r < RP; ++r) {
        const bool s = cv > t.v[r];
        const float ov = t.v[r];
        const int oi = t.i[r];
        t.v[r] = s ? cv : ov;
        t.i[r] = s ? ci : oi;
        cv = s ? ov : cv;
        ci = s ? oi : ci;
    }
}

// Merge with the list held by lane ^ mask; both lanes end with the same list. All 32 lanes call.
__device__ __forceinline__ void top_merge_xor(Top& t, int mask) {
    float ov[RP];
    int oi[RP];
#pragma unroll
    for (int r = 0; r < RP; ++r) {
        ov[r] = __shfl_xor_sync(FULL_MASK, t.v[r], mask);
        oi[r] = __shfl_xor_sync(FULL_MASK, t.i[r], mask);
    }
    // the better of mine[r] and theirs[RP-1-r]: the top RP of both lists, as a bitonic sequence
#pragma unroll
    for (int r = 0; r < RP; ++r) {
        const int q = RP - 1 - r;
        const bool s = better(ov[q], oi[q], t.v[r], t.i[r]);
        t.v[r] = s ? ov[q] : t.v[r];
        t.i[r] = s ? oi[q] : t.i[r];
    }
    // bitonic clean into descending order
#pragma unroll
    for (int s = RP / 2; s > 0; s >>= 1) {
#pragma unroll
        for (int r = 0; r < RP; ++r) {
            if ((r & s) == 0) {
                const int q = r + s;
                const bool sw = better(t.v[q], t.i[q], t.v[r], t.i[r]);
                const float av = t.v[r], bv = t.v[q];
                const int ai = t.i[r], bi = t.i[q];
                t.v[r] = sw ? bv : av;
                t.i[r] = sw ? bi : ai;
                t.v[q] = sw ? av : bv;
                t.i[q] = sw ? ai : bi;
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// small helpers

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_MASK, x, o);
    return x;  // the same bits in every lane: each butterfly step is symmetric
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, o));
    return x;
}

__device__ __forceinline__ unsigned long long to_fix(float x) {
    return (unsigned long long)__float2ll_rn(x * FIX_ONE);  // two's complement: adds as signed
}

__device__ __forceinline__ float lebesgue(float m, float power) {
    // sign(m) |m|^(p-1), with sign(0) = 0 as in torch
    return m == 0.0f ? 0.0f : copysignf(powf(fabsf(m), power - 1.0f), m);
}

__device__ __forceinline__ unsigned long long now_ns() {
#if defined(__CUDA_ARCH__)
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
#else
    return host_now_ns();  // tests/host_cuda/cuda_host.h
#endif
}

// Grid-wide barrier for a grid whose blocks are all resident (cooperative groups' algorithm):
// block 0 adds 2^31 - (G - 1) to the counter barrier[0], every other block 1, so its top bit flips
// once all G blocks have arrived and the counter needs no reset. The fences make every write before
// the barrier visible to every read after it; cross-block data is read with __ldcg (L2) regardless.
// Returns false, in every thread of the block, when the grid has faulted (see "Residency" above):
// the counter and the fault word are read together in one 8-byte load per spin.
__device__ __forceinline__ bool grid_sync(unsigned int* barrier) {
    __syncthreads();
    int failed = 0;
    if (threadIdx.x == 0) {
        volatile unsigned long long* words = (volatile unsigned long long*)barrier;  // [counter, fault]
        if ((*words >> 32) != 0ull) {
            failed = 1;
        } else {
            const unsigned int add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1u) : 1u;
            __threadfence();
            const unsigned int old = atomicAdd(barrier, add);
            const unsigned long long t0 = now_ns();
            for (;;) {
                const unsigned long long w = *words;
                if ((((unsigned int)w ^ old) & 0x80000000u) != 0u) break;
                if ((w >> 32) != 0ull || now_ns() - t0 > GRID_TIMEOUT_NS) {
                    atomicExch(barrier + 1, 1u);
                    failed = 1;
                    break;
                }
            }
            __threadfence();
        }
    }
    return __syncthreads_or(failed) == 0;
}

// Start copying Mp^T[n0 : n0 + nn][k0 : k0 + KCH] (global, row stride KP) into Ms[nn][KCH]:
// 16-byte cp.async copies, all in flight at once; tile_wait() completes them (then __syncthreads).
__device__ __forceinline__ void tile_issue(float* Ms, const float* MpT, int k0, int n0, int nn) {
    const int row4 = KCH / 4;
    const int total = nn * row4;
    const float4* src = (const float4*)(MpT + (size_t)n0 * KP + k0);
    float4* dst = (float4*)Ms;
    for (int x = threadIdx.x; x < total; x += NTHREADS) {
        const int n = x / row4, c = x - n * row4;
#if defined(__CUDA_ARCH__)
        const unsigned int to = (unsigned int)__cvta_generic_to_shared(dst + x);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(to), "l"(src + (size_t)n * (KP / 4) + c)
                     : "memory");
#else
        dst[x] = __ldcg(src + (size_t)n * (KP / 4) + c);
#endif
    }
}

__device__ __forceinline__ void tile_wait() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void load_v(float (&v)[TB], const float* p) {
#if TB == 4
    const float4 q = *(const float4*)p;
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
#elif TB == 2
    const float2 q = *(const float2*)p;
    v[0] = q.x; v[1] = q.y;
#else
    v[0] = *p;
#endif
}

// Patches are cut in two halves so that the loads of the next tile overlap the current tile's
// arithmetic: fetch_patches() loads the PW * N bytes of a tile into registers (packed four to a
// register; RAW_R bytes per lane, element e = lane + 32 r), store_patches() turns them into floats in
// vs[N][PW] and preprocesses them. Batch positions >= b1 give zero patches.
#define RAW_R ((PW * N + 31) / 32)
#define RAW_W ((RAW_R + 3) / 4)

struct Raw {
    unsigned int w[RAW_W];
};

__device__ __forceinline__ void fetch_patches(Raw& raw, const unsigned char* __restrict__ images,
                                              const int* __restrict__ ord, int tile0, int b1,
                                              int H, int Wd, int nx, int per_image, int lane) {
    // lane p < PW finds the flat offset of patch p's top-left element
    long long corner = -1;
    if (lane < PW && tile0 + lane < b1) {
        const int idx = __ldg(ord + tile0 + lane);
        const int img = idx / per_image, rem = idx - img * per_image;
        const int row = rem / nx, col = rem - row * nx;
        corner = (((long long)img * H + row * STRIDE) * Wd + col * STRIDE) * CH;
    }
#pragma unroll
    for (int w = 0; w < RAW_W; ++w) raw.w[w] = 0u;
#pragma unroll
    for (int r = 0; r < RAW_R; ++r) {
        const int e = lane + 32 * r;
        const int p = e / N, q = e - p * N;
        const long long at = __shfl_sync(FULL_MASK, corner, p & 31);
        if (e < PW * N && at >= 0) {
            const int c = q / (KW * KW), ij = q - c * (KW * KW);
            const int i = ij / KW, j = ij - i * KW;
            const unsigned int u = __ldg(images + at + ((long long)i * Wd + j) * CH + c);
            raw.w[r / 4] |= u << (8 * (r % 4));
        }
    }
}

template <class T>
__device__ __forceinline__ T quad_sum(T x) {
    x += __shfl_xor_sync(FULL_MASK, x, 1);
    return x + __shfl_xor_sync(FULL_MASK, x, 2);  // (x0 + x1) + (x2 + x3) in all four lanes
}

__device__ __forceinline__ void store_patches(float* vs, const Raw& raw, int lane) {
    __syncwarp();  // every lane is done reading the previous tile's patches
#pragma unroll
    for (int r = 0; r < RAW_R; ++r) {
        const int e = lane + 32 * r;
        if (e < PW * N) {
            const int p = e / N, q = e - p * N;
            vs[q * PW + p] = __fdiv_rn((float)((raw.w[r / 4] >> (8 * (r % 4))) & 0xffu), 255.0f);
        }
    }
    __syncwarp();
#if PRE != 0
    // lanes 4p .. 4p+3 preprocess patch p: each sums the elements q = s (mod 4) in order, and the
    // four partial sums combine in a fixed order, for every tile shape
    const int p = lane >> 2, s = lane & 3;
    const bool mine = p < PW;
    float* col = vs + (mine ? p : 0);
#if PRE & 1
    // the mean of edgehebb/patches.py: a float64 sum (exact for values k/255, so its order does not
    // matter and a flat patch centres to exactly zero), divided by N, rounded once to float
    double sum = 0.0;
    if (mine)
        for (int q = s; q < N; q += 4) sum += (double)col[q * PW];
    const float mean = (float)(quad_sum(sum) / (double)N);
    if (mine)
        for (int q = s; q < N; q += 4) col[q * PW] -= mean;
#endif
#if PRE & 2
    float ss = 0.0f;
    if (mine)
        for (int q = s; q < N; q += 4) ss = fmaf(col[q * PW], col[q * PW], ss);
    const float d = sqrtf(quad_sum(ss)) + 1e-8f;
    if (mine)
        for (int q = s; q < N; q += 4) col[q * PW] = __fdiv_rn(col[q * PW], d);
#endif
    __syncwarp();
#endif
}

// acc[i][2j+e] += sum over n in [n0, n0+nn) of v[patch i][n] * Ms[n - n0][unit pair j, e]
__device__ __forceinline__ void accumulate(float (&acc)[TB][TK], const float* Ms, const float* vs,
                                           int n0, int nn, int lb, int lk) {
#pragma unroll 2
    for (int n = 0; n < nn; ++n) {
        float v[TB];
        load_v(v, vs + (n0 + n) * PW + lb * TB);
        float2 m[TK2];
#pragma unroll
        for (int j = 0; j < TK2; ++j) m[j] = *(const float2*)(Ms + n * KCH + 2 * (lk + LK * j));
#pragma unroll
        for (int i = 0; i < TB; ++i) {
#pragma unroll
            for (int j = 0; j < TK2; ++j) {
                acc[i][2 * j] = fmaf(v[i], m[j].x, acc[i][2 * j]);
                acc[i][2 * j + 1] = fmaf(v[i], m[j].y, acc[i][2 * j + 1]);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
hebbian_run(const unsigned char* __restrict__ images,  // (n_images, H, Wd, CH) uint8
            int H, int Wd, int nx, int per_image,        // per_image = ny * nx patch positions
            const int* __restrict__ order,               // nsteps * B patch indices
            int B, int nsteps, float eps, float power, float delta,
            float* M,                     // K x N weights, row-major
            float* MpT,                   // N x KP: sign(M)|M|^(p-1) transposed (/ s_k if RANK_COS), zero for k >= K
            float* ds,                    // K x N scratch
            unsigned long long* acc,      // K x N fixed-point sums, zero between steps
            unsigned int* scale_bits,     // [2] max|ds| of the step (t & 1) as float bits, zeroed by the host
            unsigned int* wins,           // K win counts, accumulated
            unsigned int* barrier,        // [2]: grid barrier counter, fault word (both zero at the start)
            int* dbg_win, int* dbg_rank)  // nsteps * B winners and rank-m units, or null
{
    DYNAMIC_SHARED(smem4);
    float* Ms = (float*)smem4;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int lb = lane / LK, lk = lane % LK;
    // an earlier launch (or this one, before this block started) faulted: do nothing. Block-uniform,
    // since the word may change while the threads read it.
    if (__syncthreads_or(threadIdx.x == 0 && *(volatile unsigned int*)(barrier + 1) != 0u)) return;
    float* vs = Ms + NC * KCH + warp * (N * PW);

    // this block's contiguous share of each minibatch, whole warp tiles
    const int G = gridDim.x;
    const int per_block = ((B + G - 1) / G + PW - 1) / PW * PW;
    const int b0 = blockIdx.x * per_block;
    const int b1 = min(B, b0 + per_block);
    const int rounds = b1 > b0 ? (b1 - b0 + NWARPS * PW - 1) / (NWARPS * PW) : 0;

    const int gw = blockIdx.x * NWARPS + warp, nw = G * NWARPS;  // global warp, for phases B, C

    // the first tile of each warp is fetched ahead; afterwards every tile is fetched while the
    // previous one is being computed (the patches do not depend on M)
    Raw raw;
    if (nsteps > 0 && b0 + warp * PW < b1)
        fetch_patches(raw, images, order, b0 + warp * PW, b1, H, Wd, nx, per_image, lane);

    for (int t = 0; t < nsteps; ++t) {
        // ---- phase A: winners of this block's patches, accumulated into acc
#if RESIDENT
        if (rounds > 0) tile_issue(Ms, MpT, 0, 0, N);
#endif
        for (int r = 0; r < rounds; ++r) {
            const int tile0 = b0 + (r * NWARPS + warp) * PW;
            const bool active = tile0 < b1;  // warp-uniform; the active rounds of a warp are a prefix
            if (active) {
                store_patches(vs, raw, lane);
                int nt = t, next0 = b0 + ((r + 1) * NWARPS + warp) * PW;
                if (r + 1 >= rounds || next0 >= b1) {
                    nt = t + 1;
                    next0 = b0 + warp * PW;
                }
                if (nt < nsteps)
                    fetch_patches(raw, images, order + (size_t)nt * B, next0, b1, H, Wd, nx, per_image, lane);
            }
#if RESIDENT
            if (r == 0) {
                tile_wait();
                __syncthreads();
            }
#endif

            Top top[TB];
#pragma unroll
            for (int i = 0; i < TB; ++i) top_init(top[i]);

            for (int kc = 0; kc < NKC; ++kc) {
                float a[TB][TK];
#pragma unroll
                for (int i = 0; i < TB; ++i)
#pragma unroll
                    for (int j = 0; j < TK; ++j) a[i][j] = 0.0f;
                for (int nc = 0; nc < NNC; ++nc) {
                    const int n0 = nc * NC, nn = min(NC, N - n0);
#if !RESIDENT
                    __syncthreads();
                    tile_issue(Ms, MpT, kc * KCH, n0, nn);
                    tile_wait();
                    __syncthreads();
#endif
                    if (active) accumulate(a, Ms, vs, n0, nn, lb, lk);
                }
                if (active) {
#pragma unroll
                    for (int j = 0; j < TK2; ++j) {
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int k = kc * KCH + 2 * (lk + LK * j) + e;
                            if (k < K) {
#pragma unroll
                                for (int i = 0; i < TB; ++i) top_insert(top[i], a[i][2 * j + e], k);
                            }
                        }
                    }
                }
            }
            if (!active) continue;

#pragma unroll
            for (int o = LK / 2; o > 0; o >>= 1)
#pragma unroll
                for (int i = 0; i < TB; ++i) top_merge_xor(top[i], o);

#pragma unroll
            for (int i = 0; i < TB; ++i) {
                const int b = tile0 + lb * TB + i;
                if (lk == 0 && b < b1) {
                    const int w = top[i].i[0], m = top[i].i[RANK - 1];
                    if (w < K) atomicAdd(wins + w, 1u);
                    if (dbg_win != 0) {
                        dbg_win[(size_t)t * B + b] = w;
                        dbg_rank[(size_t)t * B + b] = m;
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < LB; ++g) {
#pragma unroll
                for (int i = 0; i < TB; ++i) {
                    const int w = __shfl_sync(FULL_MASK, top[i].i[0], g * LK);
                    const int m = __shfl_sync(FULL_MASK, top[i].i[RANK - 1], g * LK);
                    const int p = g * TB + i;
                    if (tile0 + p < b1 && w < K && m < K) {
                        for (int n = lane; n < N; n += 32) {
                            const float x = vs[n * PW + p];
                            atomicAdd(acc + (size_t)w * N + n, to_fix(x));
                            atomicAdd(acc + (size_t)m * N + n, to_fix(-delta * x));
                        }
                    }
                }
            }
        }
        if (!grid_sync(barrier)) return;

        // ---- phase B: ds = a - (Mp . a) M per row, max|ds|
        float mx = 0.0f;
        for (int k = gw; k < K; k += nw) {
            long long q[NPL];
            float m[NPL], mp[NPL];
#pragma unroll
            for (int u = 0; u < NPL; ++u) {  // every load in flight before the first use
                const int n = lane + 32 * u;
                q[u] = 0;
                m[u] = mp[u] = 0.0f;
                if (n < N) {
                    q[u] = (long long)__ldcg(acc + (size_t)k * N + n);
                    m[u] = __ldcg(M + (size_t)k * N + n);
                    // Mp[k]; with RANK_COS, Mp^T is scaled for the ranking, so from M itself
                    mp[u] = POW2 ? m[u] : RANK_COS ? lebesgue(m[u], power) : __ldcg(MpT + (size_t)n * KP + k);
                }
            }
            float a[NPL];
            float c = 0.0f;
#pragma unroll
            for (int u = 0; u < NPL; ++u) {
                const int n = lane + 32 * u;
                a[u] = __ll2float_rn(q[u]) * FIX_INV;
                c = fmaf(mp[u], a[u], c);
                if (n < N) acc[(size_t)k * N + n] = 0ull;
            }
            c = warp_sum(c);
#pragma unroll
            for (int u = 0; u < NPL; ++u) {
                const int n = lane + 32 * u;
                if (n < N) {
                    const float d = a[u] - c * m[u];
                    ds[(size_t)k * N + n] = d;
                    mx = fmaxf(mx, fabsf(d));
                }
            }
        }
        mx = warp_max(mx);
        if (lane == 0 && mx > 0.0f) atomicMax(scale_bits + (t & 1), __float_as_uint(mx));
        if (blockIdx.x == 0 && threadIdx.x == 0) scale_bits[(t + 1) & 1] = 0u;  // used by step t+1
        if (!grid_sync(barrier)) return;

        // ---- phase C: M += ds * eps / max(max|ds|, 1e-30), Mp rewritten (scaled for the ranking if RANK_COS)
        const float scale = __uint_as_float(*(volatile unsigned int*)(scale_bits + (t & 1)));
        const float f = eps / fmaxf(scale, 1e-30f);
        for (int k = gw; k < K; k += nw) {
#if RANK_COS
            // Mp^T = Mp / s_k, s_k = max(||M_k||_p^(p-1), 1e-30): the row's Mp stays in registers
            // while its sum |m|^p is reduced (fixed lane mapping: the same bits for any grid)
            float mp[NPL];
            float ss = 0.0f;
#pragma unroll
            for (int u = 0; u < NPL; ++u) {
                const int n = lane + 32 * u;
                mp[u] = 0.0f;
                if (n < N) {
                    const size_t at = (size_t)k * N + n;
                    const float m = __fadd_rn(__ldcg(M + at), __fmul_rn(__ldcg(ds + at), f));
                    M[at] = m;
                    mp[u] = POW2 ? m : lebesgue(m, power);
                    ss = fmaf(fabsf(m), fabsf(mp[u]), ss);
                }
            }
            ss = warp_sum(ss);
            const float s = fmaxf(POW2 ? sqrtf(ss) : powf(ss, (power - 1.0f) / power), 1e-30f);
#pragma unroll
            for (int u = 0; u < NPL; ++u) {
                const int n = lane + 32 * u;
                if (n < N) MpT[(size_t)n * KP + k] = __fdiv_rn(mp[u], s);
            }
#else
            for (int n = lane; n < N; n += 32) {
                const size_t at = (size_t)k * N + n;
                const float m = __fadd_rn(__ldcg(M + at), __fmul_rn(__ldcg(ds + at), f));
                M[at] = m;
#if POW2
                MpT[(size_t)n * KP + k] = m;
#else
                MpT[(size_t)n * KP + k] = lebesgue(m, power);
#endif
            }
#endif
        }
        if (!grid_sync(barrier)) return;
    }
}

// Grid barriers back to back: their cost bounds the time of a step at small B
// (edgehebb.learn_pycuda.grid_barrier_seconds, tools/bench_learn.py).
extern "C" __global__ void __launch_bounds__(NTHREADS, 1) grid_sync_bench(unsigned int* barrier, int iters) {
    for (int i = 0; i < iters; ++i)
        if (!grid_sync(barrier)) return;
}
