// One NNL-CONV block in one kernel: patch norm, cosine, max-pool, clip and power (edgehebb's fused
// inference path; the semantics are those of ai.edgehebb::PatchNormPowReLU, export/OP_SPEC.md).
//
// The unfused graph writes every cosine of the (B, K, H', W') map to memory and reads it back to
// pool it (344 MB per batch of 256 for fig. 2 left). Here no cosine leaves the multiprocessor: a
// block of threads owns one image and KC filters, walks the image's patch positions in tiles of
// TPOS, computes the tile's cosines as a small matrix product in registers, and folds them into
// the pooled maxima in shared memory. Only the pooled map, HP x WP per filter, is written.
//
// Per block of threads (grid: x = image, y = chunk of KC filters):
//   1. the padded image (shifted by -0.5 when CENTER) and the chunk's filters Mc^T[N][KC] go to
//      shared memory; Mc are the centred unit filters (the host prepares them, as the op does).
//   2. per tile of TPOS positions: one thread per position computes its patch mean and squared
//      deviations in two passes over the patch (OP_SPEC's accuracy rule: no s2 - s1^2/N), and
//      notes the patch's offset in the image, 1 / (sqrt(|d|^2 + sigma^2) + eps) (sigma2 = sigma^2:
//      the op's semi-saturation; 0 adds nothing, exactly) and the pooled cells it falls in;
//      then the centred patches d = v - mean go to shared memory As[n][TPOS], NCH values of n at a
//      time (the offset of value n inside a patch comes from a table made once per block).
//   3. dot[p][k] = sum_n As[n][p] Mc[n][k]: each thread owns 8 positions x 8 filters (64
//      accumulators), with float4 reads of As and Mc (broadcast across the warp where they repeat).
//   4. cos = dot * (1 / (sqrt(|d|^2 + sigma2) + eps)), ReLU, and an atomicMax into the pooled cell(s) of the position,
//      skipped when the ReLU gives 0 (the cells start at 0). Non-negative floats order like their
//      bit patterns, so the maxima are unsigned integers.
//   Steps 2 and 4 work from the per-position notes so that the integer arithmetic of patch and cell
//   indexing is done once per position, not once per value or per filter.
//   5. after the last tile: Y = min(max, 1)^power, written to y[image * ystride + k * HP * WP + cell].
//
// Every output is a max of cosines each computed by one fixed-order fmaf chain: the result does not
// depend on KC, NTHREADS, NCH or the order the tiles run in.
//
// Compile-time constants, all given with -D by edgehebb/nnl_fused.py (fused_plan):
//   CH, KW, STRIDE, PAD, HIN, WIN     channels, filter width, conv stride, zero padding, input size
//   HO, WO, POOL, PSTRIDE, HP, WP     conv map, max-pool window and stride, pooled map
//   CENTER                            1: centred patches and filters (center-unit), 0: plain norm
//   KC, NTHREADS, NCH, KPAD           filters per block, threads, n per As chunk, row stride of Mc^T

#ifndef DYNAMIC_SHARED  // overridable so the kernel can run in a host emulation (tests/host_cuda)
#define DYNAMIC_SHARED(name) extern __shared__ float4 name[]
#endif

#define N (CH * KW * KW)
#define HPAD (HIN + 2 * PAD)
#define WPAD (WIN + 2 * PAD)
#define NPOS (HO * WO)
#define NCELL (HP * WP)
#define TX (KC / 8)                   // threads along filters
#define TY (NTHREADS / TX)            // threads along positions
#define TPOS (8 * TY)                 // positions per tile
#define IMG_FLOATS (((CH * HPAD * WPAD) + 3) / 4 * 4)
#define NO_CELL (-1)                  // a position outside every pooling window, or past the map

static_assert(KC % 8 == 0, "a thread owns 2 x 4 filters");
static_assert(NTHREADS % 32 == 0 && NTHREADS % TX == 0, "whole warps, whole rows of threads");
static_assert(NCH >= 1 && NCH <= N, "chunk of the patch tile");
static_assert(KPAD % KC == 0, "Mc^T is padded to whole chunks");
static_assert(HP < 128 && WP < 128, "pooled cell ranges pack into one int, 8 bits a bound");

extern "C" __global__ void __launch_bounds__(NTHREADS, 2)
nnl_forward(const float* __restrict__ x,    // (B, CH, HIN, WIN) float32, [0, 1]
            const float* __restrict__ mct,  // (N, KPAD) centred unit filters, transposed, zero beyond K
            float* __restrict__ y,          // image b's K x HP x WP outputs start at y + b * ystride
            int K, int ystride, float power, float eps, float sigma2)
{
    DYNAMIC_SHARED(smem4);
    float* img = (float*)smem4;                       // [CH][HPAD][WPAD]
    float* ms = img + IMG_FLOATS;                     // [N][KC]
    float* as = ms + N * KC;                          // [NCH][TPOS]
    float* pmean = as + NCH * TPOS;                   // [TPOS]
    float* prden = pmean + TPOS;                      // [TPOS] 1 / (sqrt(|d|^2 + sigma2) + eps)
    int* pbase = (int*)(prden + TPOS);                // [TPOS] offset of the patch's first value in img
    int* pcell = pbase + TPOS;                        // [TPOS] pooled cells wi0 | wi1 << 8 | wj0 << 16 | wj1 << 24
    int* noff = pcell + TPOS;                         // [N] offset of value n inside a patch
    unsigned int* best = (unsigned int*)(noff + N);   // [NCELL][KC] pooled max cosine, as bits

    const int tid = threadIdx.x;
    const int tx = tid % TX, ty = tid / TX;
    const int b = blockIdx.x, k0 = blockIdx.y * KC;

    const float shift = CENTER ? 0.5f : 0.0f;  // padding pixels are zeros before the shift (black)
    const float* xb = x + (size_t)b * (CH * HIN * WIN);
    for (int e = tid; e < CH * HPAD * WPAD; e += NTHREADS) {
        const int c = e / (HPAD * WPAD), rem = e - c * (HPAD * WPAD);
        const int r = rem / WPAD - PAD, col = rem % WPAD - PAD;
        const bool inside = r >= 0 && r < HIN && col >= 0 && col < WIN;
        img[e] = (inside ? __ldg(xb + (c * HIN + r) * WIN + col) : 0.0f) - shift;
    }
    for (int e = tid; e < N * KC; e += NTHREADS) {
        const int n = e / KC, kk = e - n * KC;
        ms[e] = __ldg(mct + (size_t)n * KPAD + k0 + kk);
    }
    for (int e = tid; e < NCELL * KC; e += NTHREADS) best[e] = 0u;  // = 0.0f: ReLU's floor
    for (int n = tid; n < N; n += NTHREADS) {
        const int c = n / (KW * KW), ij = n - c * (KW * KW);
        const int di = ij / KW, dj = ij - di * KW;
        noff[n] = (c * HPAD + di) * WPAD + dj;
    }

    for (int p0 = 0; p0 < NPOS; p0 += TPOS) {
        __syncthreads();  // the image and tables are in / the last tile's epilogue is done with the notes
        // ---- 2a. patch statistics, one thread per position, two passes; the position's notes
        for (int lp = tid; lp < TPOS; lp += NTHREADS) {
            const int p = p0 + lp;
            float mean = 0.0f, rden = 0.0f;
            int at = 0, cells = NO_CELL;
            if (p < NPOS) {
                const int i = p / WO, j = p - (p / WO) * WO;
                at = i * STRIDE * WPAD + j * STRIDE;
                const float* base = img + at;
#if CENTER
                float s = 0.0f;
                for (int c = 0; c < CH; ++c)
                    for (int di = 0; di < KW; ++di)
#pragma unroll
                        for (int dj = 0; dj < KW; ++dj) s += base[(c * HPAD + di) * WPAD + dj];
                mean = s / (float)N;
#endif
                float ss = 0.0f;
                for (int c = 0; c < CH; ++c)
                    for (int di = 0; di < KW; ++di)
#pragma unroll
                        for (int dj = 0; dj < KW; ++dj) {
                            const float d = base[(c * HPAD + di) * WPAD + dj] - mean;
                            ss = fmaf(d, d, ss);
                        }
                rden = 1.0f / (sqrtf(ss + sigma2) + eps);
                // pooled cells whose window holds (i, j): w * PSTRIDE <= i < w * PSTRIDE + POOL
                const int wi0 = i >= POOL ? (i - POOL + PSTRIDE) / PSTRIDE : 0, wi1 = min(HP - 1, i / PSTRIDE);
                const int wj0 = j >= POOL ? (j - POOL + PSTRIDE) / PSTRIDE : 0, wj1 = min(WP - 1, j / PSTRIDE);
                if (wi0 <= wi1 && wj0 <= wj1) cells = wi0 | wi1 << 8 | wj0 << 16 | wj1 << 24;
            }
            pmean[lp] = mean;
            prden[lp] = rden;
            pbase[lp] = at;
            pcell[lp] = cells;
        }

        float acc[8][8];
#pragma unroll
        for (int r = 0; r < 8; ++r)
#pragma unroll
            for (int f = 0; f < 8; ++f) acc[r][f] = 0.0f;

        for (int n0 = 0; n0 < N; n0 += NCH) {
            const int nn = min(NCH, N - n0);
            __syncthreads();  // pmean is written / the last chunk's products are done with As
            // ---- 2b. centred patches of this chunk: As[q][lp] = v[n0 + q] - mean
            //         (positions past the map read the image's first patch; their products are never used)
            for (int e = tid; e < nn * TPOS; e += NTHREADS) {
                const int q = e / TPOS, lp = e - q * TPOS;
                as[e] = img[pbase[lp] + noff[n0 + q]] - pmean[lp];
            }
            __syncthreads();
            // ---- 3. the tile's dot products: positions ty*4 + {0..3} and TPOS/2 + ty*4 + {0..3},
            //         filters tx*4 + {0..3} and KC/2 + tx*4 + {0..3}
#pragma unroll 2
            for (int q = 0; q < nn; ++q) {
                const float4 a0 = ((const float4*)(as + q * TPOS))[ty];
                const float4 a1 = ((const float4*)(as + q * TPOS + TPOS / 2))[ty];
                const float4 m0 = ((const float4*)(ms + (n0 + q) * KC))[tx];
                const float4 m1 = ((const float4*)(ms + (n0 + q) * KC + KC / 2))[tx];
                const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
                const float mv[8] = {m0.x, m0.y, m0.z, m0.w, m1.x, m1.y, m1.z, m1.w};
#pragma unroll
                for (int r = 0; r < 8; ++r)
#pragma unroll
                    for (int f = 0; f < 8; ++f) acc[r][f] = fmaf(av[r], mv[f], acc[r][f]);
            }
        }

        // ---- 4. cosines into the pooled maxima
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            const int lp = (r < 4 ? 0 : TPOS / 2) + ty * 4 + (r & 3);
            const int cells = pcell[lp];
            if (cells == NO_CELL) continue;
            const int wi0 = cells & 255, wi1 = (cells >> 8) & 255, wj0 = (cells >> 16) & 255, wj1 = cells >> 24;
            const bool one = wi0 == wi1 && wj0 == wj1;  // most positions lie in a single window
            unsigned int* cell = best + (wi0 * WP + wj0) * KC + tx * 4;
            const float rden = prden[lp];
#pragma unroll
            for (int f = 0; f < 8; ++f) {
                const int kk = (f < 4 ? 0 : KC / 2) + (f & 3);  // + tx * 4, in cell
                const float c = acc[r][f] * rden;
                if (!(c > 0.0f)) continue;  // ReLU gives 0 (-0 and NaN too), which every cell already holds
                const unsigned int bits = __float_as_uint(c);
                if (one) {
                    atomicMax(cell + kk, bits);
                } else {
                    for (int wi = wi0; wi <= wi1; ++wi)
                        for (int wj = wj0; wj <= wj1; ++wj) atomicMax(cell + ((wi - wi0) * WP + wj - wj0) * KC + kk, bits);
                }
            }
        }
    }
    __syncthreads();

    // ---- 5. clip at 1 (rounding overshoot, which ^power would magnify), power, out
    float* yb = y + (size_t)b * ystride;
    for (int e = tid; e < KC * NCELL; e += NTHREADS) {
        const int kk = e / NCELL, cell = e - kk * NCELL;
        if (k0 + kk < K) {
            const float c = fminf(__uint_as_float(best[cell * KC + kk]), 1.0f);
            yb[(k0 + kk) * NCELL + cell] = c > 0.0f ? powf(c, power) : 0.0f;
        }
    }
}
