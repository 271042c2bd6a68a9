// Hopper (sm_90a) MLA decode for the DeepSeek shapes: head_dim 576 (or 512), head_dim_v 512.
//
// One thread block = one worker of the schedule x one KV head x one tile of 64 query rows.
// Three warpgroups, specialised (setmaxnreg moves registers to the consumers):
//   producer (warpgroup 0): walks the same (sequence piece, 64-token tile) sequence as the
//     consumers and fills a 2-stage KV ring. Page sizes that are multiples of 64: one warp, TMA
//     (a tile is 64 consecutive tokens of one page; 64-channel boxes land pre-swizzled; an
//     out-of-range block id is an out-of-bounds box, which TMA fills with zeros). Other page sizes:
//     all 128 threads gather the tile token by token with cp.async (zeros where masked; gather_issue),
//     each thread's copies completing on the full barrier, so two tiles can be in flight as with TMA.
//     full[stage] says a tile landed (seesaw: full[stage][slice], one per 64-channel slice),
//     empty[stage] that the consumers are done with it.
//   consumers (warpgroups 1, 2 = cw 0, 1), one of two schedules (kSeesaw; mla_cuda.cu picks):
//   seesaw (seesaw_consumers, below): each computes the whole S of every other tile. Split, per tile:
//     cw:  S_cw = Q K[32 cw : 32 cw + 32]^T                 (wgmma m64n32k16, K-major smem)
//     row max over both halves through shared memory; P = 2^(S*scale*log2e - m) -> sP
//     cw:  O[:, 256 cw : +256] += P V[:, 256 cw : +256]      (wgmma m64n256k16; V read in place
//          from the KV tile as an MN-major operand: its 64-channel atoms are 8 KiB apart)
//     and the online-softmax bookkeeping of the portable kernel (decode_portable.cuh), with a lazy
//     rescale (below: max_grew).
// Shared memory uses the 128-byte-swizzled K-major layout throughout: each 64-channel slice of a
// row is one 128-byte line, 8 lines form a 1024-byte swizzle atom, and slice c of a 64-row matrix
// starts at c * 8 KiB.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../schedule.h"
#include "decode_params.h"
#include "dtype.cuh"
#include "l2_policy.cuh"
#include "pdl.cuh"

namespace flashmla {
namespace sm90 {

constexpr int kRows = 64;    // query rows per block (wgmma M)
constexpr int kTokens = 64;  // tokens per tile
constexpr int kDimV = 512;   // output channels
constexpr int kStages = 2;
constexpr int kConsumerThreads = 256;
constexpr int kThreads = 128 + kConsumerThreads;
constexpr int kSliceBytes = 64 * 128;  // one 64-channel slice of a 64-row matrix
constexpr float kLn2 = 0.6931471805599453f;

struct Args {
  CUtensorMap kv_map;  // 4-D (channel, token in page, kv head, block) view of k_cache; TMA mode only
  DecodeParams p;
};

// kSeesaw: the schedule of the consumers (below, seesaw_consumers). Its P tiles live in the dead rope
// slice of their KV stage when D = 576 (channels 512..575 are K only: no P V reads them), else in two
// slices of their own; it exchanges four per-row values instead of two.
template <int D, bool kSeesaw>
struct Smem {
  static constexpr int kSlices = D / 64;
  static constexpr int q_bytes = kSlices * kSliceBytes;
  static constexpr int stage_bytes = kSlices * kSliceBytes;
  static constexpr int p_bytes = !kSeesaw ? kSliceBytes : (D > kDimV ? 0 : kStages * kSliceBytes);
  static constexpr int stats_bytes = (kSeesaw ? 4 : 2) * kRows * sizeof(float);
  static constexpr int valid_bytes = kStages * kTokens;
  // Full barriers per stage: the seesaw has one per 64-channel slice (its S wgmma starts on the first
  // slice that lands), the split schedule one per stage.
  static constexpr int full_per_stage = kSeesaw ? kSlices : 1;
  static constexpr int barrier_bytes = (full_per_stage + 1) * kStages * 8;
  static constexpr int total = q_bytes + kStages * stage_bytes + p_bytes + stats_bytes + valid_bytes + barrier_bytes +
                               1024;  // slack to align the start to 1024 bytes
};

// Lazy rescale of the online softmax. Each row keeps a reference maximum m (log2 domain), P = 2^(s - m),
// and O and l in units of 2^m. Moving m to a larger tile maximum costs a multiply of all 128 O
// accumulators per thread, on the way to the next P V wgmma. m moves only when some row of the warp
// grew by more than p.rescale_threshold over its m (a uniform branch); otherwise m stays and
// P <= 2^threshold. out = O / l and lse = (m + log2 l) ln 2 hold for any reference m, so the result
// is the same softmax to rounding (threshold <= 15, checked on the host: P <= 2^15 is finite in fp16). Threshold 0
// moves m whenever the maximum grows: the eager rescale, bitwise (a skipped factor is 1). Measured on the H100
// (docs/KERNEL_NOTES.md): 2-8% faster on rows of >= 128 query rows, neutral on the rest. The portable kernel keeps the
// eager rescale (the same change measured no net gain there). A row that has seen nothing has m = -inf and moves as
// soon as it sees a token.
__device__ __forceinline__ bool max_grew(float m_new, float m, float threshold) { return m_new > m + threshold; }

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` inside a swizzled slice.
__device__ __forceinline__ int swizzled(int row, int chunk) { return row * 128 + ((chunk ^ (row % 8)) * 16); }

// wgmma shared-memory descriptor with 128-byte swizzle. Offsets in bytes.
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lead_bytes, uint32_t stride_bytes) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t((lead_bytes >> 4) & 0x3FFF) << 16) |
         (uint64_t((stride_bytes >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Barrier 1: the 256 consumer threads only (the producer never waits on it).
__device__ __forceinline__ void consumer_sync() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerThreads) : "memory");
}
// Seesaw handshake (seesaw_consumers): barrier 2 = "tile A's P and m are published" (warpgroup 0
// arrives, 1 waits), barrier 3 = the same for tile B (1 arrives, 0 waits); 4 + cw = one warpgroup.
constexpr int kBarTileA = 2, kBarTileB = 3, kBarWarpgroup = 4;
template <int kId>
__device__ __forceinline__ void named_arrive(int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"n"(kId), "r"(threads) : "memory");
}
template <int kId>
__device__ __forceinline__ void named_sync(int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"n"(kId), "r"(threads) : "memory");
}

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes, uint64_t l2_policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes), "l"(l2_policy)
               : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// The mbarrier gets one arrival when all of this thread's earlier cp.async copies have landed (.noinc:
// that arrival is one of the barrier's expected count, set at init).
__device__ __forceinline__ void cp_async_arrive_noinc(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                            uint32_t bar, uint64_t l2_policy) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, %3, "
      "%4, %5}], [%6], %7;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar), "l"(l2_policy)
      : "memory");
}

// Four 8 x 8 matrices of 16-bit values to shared memory: thread t holds row t / 4, columns 2 (t % 4) + {0, 1}
// of matrix i in r_i (the mma accumulator layout, packed); thread t gives the address of row t % 8 of
// matrix t / 8 (16 contiguous bytes).
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
}

// S (64 x 32, fp32) += A (64 x 16, K-major smem) * B (32 x 16, K-major smem)^T
template <typename T>
__device__ __forceinline__ void wgmma_m64n32k16(float (&d)[16], uint64_t da, uint64_t db) {
#define FLASHMLA_WGMMA_N32(TY)                                                                                      \
  asm volatile(                                                                                                     \
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                                                    \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY                                                       \
      " "                                                                                                           \
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, p, 1, 1, 0, 0;\n}\n"                      \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), \
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])                    \
      : "l"(da), "l"(db))
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    FLASHMLA_WGMMA_N32("bf16");
  else
    FLASHMLA_WGMMA_N32("f16");
#undef FLASHMLA_WGMMA_N32
}

// O (64 x 256, fp32) += A (64 x 16, K-major smem) * B (16 x 256, MN-major smem)
template <typename T>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t da, uint64_t db) {
#define FLASHMLA_WGMMA_N256(TY)                                                                                      \
  asm volatile(                                                                                                      \
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                                                     \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY                                                       \
      " "                                                                                                            \
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,"      \
      "%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,"     \
      "%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,"     \
      "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,"    \
      "%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,"    \
      "%126,%127}, %128, %129, p, 1, 1, 0, 1;\n}\n"                                                                  \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),  \
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),       \
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),      \
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),      \
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),      \
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),      \
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),      \
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]),      \
        "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]),      \
        "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]),      \
        "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]),      \
        "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]),      \
        "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), \
        "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),            \
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]),            \
        "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]),            \
        "+f"(d[126]), "+f"(d[127])                                                                                   \
      : "l"(da), "l"(db))
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    FLASHMLA_WGMMA_N256("bf16");
  else
    FLASHMLA_WGMMA_N256("f16");
#undef FLASHMLA_WGMMA_N256
}

// S (64 x 64, fp32) += A (64 x 16, K-major smem) * B (64 x 16, K-major smem)^T
template <typename T>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], uint64_t da, uint64_t db) {
#define FLASHMLA_WGMMA_N64(TY)                                                                                       \
  asm volatile(                                                                                                      \
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                                                     \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY                                                        \
      " "                                                                                                            \
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%" \
      "29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                                                   \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),  \
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),       \
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),      \
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                    \
      : "l"(da), "l"(db))
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    FLASHMLA_WGMMA_N64("bf16");
  else
    FLASHMLA_WGMMA_N64("f16");
#undef FLASHMLA_WGMMA_N64
}

// O (64 x 256, fp32) += A (64 x 16, registers: the m64 accumulator layout packed to 16-bit pairs)
//                       * B (16 x 256, MN-major smem)
template <typename T>
__device__ __forceinline__ void wgmma_m64n256k16_rs(float (&d)[128], const uint32_t (&a)[4], uint64_t db) {
#define FLASHMLA_WGMMA_N256_RS(TY)                                                                                   \
  asm volatile(                                                                                                      \
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                                                     \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY                                                       \
      " "                                                                                                            \
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%" \
      "29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%" \
      "56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%" \
      "83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%" \
      "108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, {%128, " \
      "%129, %130, %131}, %132, p, 1, 1, 1;\n}\n"                                                                    \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),  \
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),       \
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),      \
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),      \
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),      \
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),      \
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),      \
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]),      \
        "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]),      \
        "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]),      \
        "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]),      \
        "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]),      \
        "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), \
        "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),            \
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]),            \
        "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]),            \
        "+f"(d[126]), "+f"(d[127])                                                                                   \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db))
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    FLASHMLA_WGMMA_N256_RS("bf16");
  else
    FLASHMLA_WGMMA_N256_RS("f16");
#undef FLASHMLA_WGMMA_N256_RS
}

// One (sequence, worker) piece of the schedule, clamped so that metadata built for other lengths
// can never index outside the tensors (csrc/schedule.h).
struct Piece {
  int seqlen, t_begin, t_end, split_row;
  bool whole;
  __device__ int num_tiles() const { return (t_end - t_begin + kTokens - 1) / kTokens; }
};

__device__ __forceinline__ Piece piece_of(const DecodeParams& p, const int* md, int b) {
  Piece pc;
  const int capacity = p.max_blocks_per_seq * p.page_block_size;
  pc.seqlen = min(max(p.seqlens[b], 0), capacity);
  pc.t_begin = min(max(b == md[0] ? md[1] : 0, 0), pc.seqlen);
  pc.t_end = max(min(b == md[2] ? md[3] : pc.seqlen, pc.seqlen), pc.t_begin);
  const int split_first = p.num_splits[b];
  pc.whole = p.num_splits[b + 1] - split_first == 1;
  pc.split_row = min(max(split_first + (b == md[0] ? md[4] : 0), 0), p.partial_rows - 1);
  return pc;
}

// A tile of TMA mode that needs no per-token mask: inside the piece, on a valid block (one page per tile,
// so valid[0] says it for every token) and wholly before both of the thread's rows' causal limits
// (KERNEL_NOTES v9b: seesaw 1.00-1.06x; v10: split about 1.005x).
template <bool kTma>
__device__ __forceinline__ bool whole_visible_tile(const Piece& pc, int t0, const unsigned char* valid,
                                                   const int (&last_visible)[2]) {
  return kTma && t0 + kTokens <= pc.t_end && valid[0] && t0 + kTokens - 1 <= min(last_visible[0], last_visible[1]);
}

// Copies 64 rows of D channels into a swizzled matrix with `threads` threads (8 per row);
// row r from src_of(r), nullptr = zeros.
template <int D, int THREADS, typename T, typename SrcOf>
__device__ __forceinline__ void gather_rows(uint32_t dst, int tid, const T* any_valid_ptr, uint64_t l2_policy,
                                            SrcOf src_of) {
  constexpr int kChunks = D / 8;
  constexpr int kRowsPerPass = THREADS / 8;
#pragma unroll 1
  for (int r0 = 0; r0 < kRows; r0 += kRowsPerPass) {
    const int r = r0 + tid / 8;
    const T* src = src_of(r);
#pragma unroll
    for (int c = tid % 8; c < kChunks; c += 8) {
      cp_async_16(dst + (c / 8) * kSliceBytes + swizzled(r, c % 8), src != nullptr ? src + c * 8 : any_valid_ptr,
                  src != nullptr ? 16 : 0, l2_policy);
    }
  }
}

// The cp.async gather of one KV tile (page sizes that are not a multiple of 64) by the 128 producer
// threads, completed through the stage's full barrier(s) so that the producer moves on to the next tile
// while this one is in flight (KERNEL_NOTES v14: 1.21-1.30x against waiting for each tile). Thread tid
// copies chunk tid % 8 of every 64-channel slice of the tile's rows tid / 8 + 16 r (r < kGatherRows); a row
// past the piece or on an invalid block is zero-filled (src-size 0) and marked invalid. Arrivals per full barrier
// (kGatherArrivals): each thread's noinc arrival once its copies of the barrier's slices have landed, and an
// ordinary one (release: the valid flags) from each of the 16 threads that write valid flags. The copies are
// generic-proxy writes that wgmma reads through the async proxy: the consumers fence after their wait.
constexpr int kGatherRows = kTokens / 16;
constexpr int kGatherArrivals = 128 + 16;

// The thread's rows of one tile: source row r (any_valid_ptr where the row is masked: with src-size 0
// nothing is read) and bit r of `live` set where the row exists.
template <typename T>
struct GatherRows {
  const T* src[kGatherRows];
  int live;
};

// Looks up the thread's tokens t0 + tid / 8 + 16 r. Registers only, so it may run before the stage is free.
template <typename T>
__device__ __forceinline__ GatherRows<T> gather_lookup(const DecodeParams& p, const Piece& pc, const int* table, int t0,
                                                       int hk, int tid) {
  const T* kv = static_cast<const T*>(p.k_cache);
  GatherRows<T> g;
  g.live = 0;
#pragma unroll
  for (int r = 0; r < kGatherRows; ++r) {
    const int t = t0 + tid / 8 + 16 * r;
    g.src[r] = kv;
    if (t < pc.t_end) {
      const int block = table[t / p.page_block_size];
      if (block >= 0 && block < p.num_blocks) {
        g.src[r] =
            kv + int64_t(block) * p.k_stride_block + (t % p.page_block_size) * p.k_stride_token + hk * p.k_stride_head;
        g.live |= 1 << r;
      }
    }
  }
  return g;
}

// Issues the copies of the rows gather_lookup found into stage `dst` (valid flags `valid`, full barriers
// from `stage_full`, kBars of them: one per slice, or one for the whole tile).
template <int D, int kBars, typename T>
__device__ __forceinline__ void gather_issue(uint32_t dst, unsigned char* valid, uint32_t stage_full, int tid,
                                             const GatherRows<T>& g, uint64_t l2_policy) {
  if (tid % 8 == 0) {
#pragma unroll
    for (int r = 0; r < kGatherRows; ++r) valid[tid / 8 + 16 * r] = (g.live >> r) & 1;
#pragma unroll
    for (int f = 0; f < kBars; ++f) mbar_arrive(stage_full + 8 * f);
  }
  // Row r of this thread: tile row tid / 8 + 16 r, whose swizzle (row % 8) is the same for every r.
  const uint32_t row_dst = dst + swizzled(tid / 8, tid % 8);
  auto copy = [&](int r, int slice) {
    cp_async_16(row_dst + slice * kSliceBytes + r * 16 * 128, g.src[r] + slice * 64 + (tid % 8) * 8,
                (g.live >> r) & 1 ? 16 : 0, l2_policy);
  };
  if constexpr (kBars == 1) {
    // One barrier: row by row, so that a token's D / 64 lines (one run of D * 2 bytes in k_cache) are
    // requested back to back (on 1-token pages every row is somewhere else).
#pragma unroll
    for (int r = 0; r < kGatherRows; ++r)
#pragma unroll
      for (int slice = 0; slice < D / 64; ++slice) copy(r, slice);
    cp_async_arrive_noinc(stage_full);
  } else {
    // A barrier per slice (seesaw): slice by slice, each slice's copies then its barrier's arrival.
#pragma unroll
    for (int slice = 0; slice < D / 64; ++slice) {
#pragma unroll
      for (int r = 0; r < kGatherRows; ++r) copy(r, slice);
      cp_async_arrive_noinc(stage_full + 8 * slice);
    }
  }
}

// Q rows [row_base, row_base + 64) of sequence b for KV head hk -> sQ (swizzled), gathered by the 256
// consumer threads; the caller waits for it (cp_async_wait_all, fence_proxy_async, consumer_sync).
template <int D, typename T>
__device__ __forceinline__ void load_q(const DecodeParams& p, uint32_t sq, int ctid, int b, int hk, int row_base,
                                       uint64_t l2_policy) {
  const int g = p.num_heads_per_head_k;
  gather_rows<D, kConsumerThreads>(sq, ctid, static_cast<const T*>(p.q), l2_policy, [&](int r) -> const T* {
    const int row = row_base + r;
    if (row >= p.rows_per_head_k) return nullptr;
    return static_cast<const T*>(p.q) + b * p.q_stride_b + (row / g) * p.q_stride_s + (hk * g + row % g) * p.q_stride_h;
  });
}

// TMA brings whole pages: zero the V rows [first_dead, 64) of a KV stage (tokens past the piece may
// hold NaN, and P = 0 times NaN is NaN), by `threads` threads (t = 0..threads-1). Channels past 512
// only meet masked scores. The caller fences (fence_proxy_async) and syncs before any P V reads it.
__device__ __forceinline__ void clear_dead_v(unsigned char* stage_ptr, int first_dead, int t, int threads) {
  for (int idx = t; idx < (kTokens - first_dead) * (kDimV / 8); idx += threads) {
    const int r = first_dead + idx / (kDimV / 8), c = idx % (kDimV / 8);
    *reinterpret_cast<uint4*>(stage_ptr + (c / 8) * kSliceBytes + swizzled(r, c % 8)) = make_uint4(0, 0, 0, 0);
  }
}

// Maximum over the 4 lanes (lane % 4) that hold one accumulator row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}

// Scales this thread's scores of a tile to the log2 domain, masks the tokens it may not see (-inf) and
// takes their row maxima over the quad. s[4 j + e] is token first_token + 8 j + 2 (lane % 4) + (e & 1) of
// the tile (t0 ..), row half e / 2; N / 4 groups of 8 tokens. A whole visible tile skips the mask.
template <bool kTma, int N>
__device__ __forceinline__ void mask_scale_rowmax(float (&s)[N], float (&tile_max)[2], const Args& args,
                                                  const Piece& pc, int t0, const unsigned char* valid, int first_token,
                                                  const int (&last_visible)[2], int lane) {
  const float scale = args.p.scale_log2;
  tile_max[0] = tile_max[1] = -INFINITY;
  if (whole_visible_tile<kTma>(pc, t0, valid, last_visible)) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      s[i] *= scale;
      tile_max[(i % 4) / 2] = fmaxf(tile_max[(i % 4) / 2], s[i]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N / 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int jt = first_token + j * 8 + (lane % 4) * 2 + (e & 1);
        const int h = e / 2;
        const bool ok = valid[jt] && t0 + jt <= last_visible[h];
        s[4 * j + e] = ok ? s[4 * j + e] * scale : -INFINITY;
        tile_max[h] = fmaxf(tile_max[h], s[4 * j + e]);
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) tile_max[h] = quad_max(tile_max[h]);
}

// The reference maximum a row's P is taken against: a row that has seen nothing (m = -inf) keeps P = 0.
__device__ __forceinline__ float ref_base(float m) { return m == -INFINITY ? 0.f : m; }

// O (this thread's 128 accumulators, rows row_lo and row_lo + 8) *= factor of its row.
__device__ __forceinline__ void rescale_o(float (&o)[128], const float (&factor)[2]) {
#pragma unroll
  for (int i = 0; i < 128; i += 4) {
    o[i] *= factor[0];
    o[i + 1] *= factor[0];
    o[i + 2] *= factor[1];
    o[i + 3] *= factor[1];
  }
}

// Writes this thread's rows row_lo, row_lo + 8 of the tile: O[:, 256 cw : +256] / total and the LSE
// (total = the row's sum of P, in units of 2^row_max), into out / lse for a whole sequence, else into
// the partial buffers of its split row.
template <typename T>
__device__ __forceinline__ void store_rows(const DecodeParams& p, const Piece& pc, int b, int hk, int row_base,
                                           int row_lo, int cw, int lane, const float (&o)[128],
                                           const float (&row_max)[2], const float (&total)[2]) {
  using DT = Dtype<T>;
  const int g = p.num_heads_per_head_k;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row_lo + 8 * h;
    const int row = row_base + r;
    if (row >= p.rows_per_head_k) continue;
    const bool empty = total[h] == 0.f;
    const float inv = empty ? 0.f : 1.f / total[h];
    const float lse = empty ? (pc.whole ? INFINITY : -INFINITY) : (row_max[h] + log2f(total[h])) * kLn2;
    const int qi = row / g, head = hk * g + row % g;
    // o[4 j + 2 h + {0,1}] holds channels 256 cw + 8 j + 2 (lane % 4) + {0,1}.
    const int col0 = cw * 256 + (lane % 4) * 2;
    if (pc.whole) {
      T* dst = static_cast<T*>(p.out) + ((int64_t(b) * p.seqlen_q + qi) * p.num_heads_q + head) * kDimV + col0;
#pragma unroll
      for (int j = 0; j < 32; ++j)
        *reinterpret_cast<typename DT::pair*>(dst + 8 * j) =
            DT::make_pair(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
      if (cw == 0 && lane % 4 == 0) p.lse[(int64_t(b) * p.num_heads_q + head) * p.seqlen_q + qi] = lse;
    } else {
      const int64_t prow = (int64_t(pc.split_row) * p.num_heads_k + hk) * p.rows_per_head_k + row;
      float* dst = p.partial_out + prow * kDimV + col0;
      const uint64_t policy = partials_l2_policy(p.partials_in_l2);
#pragma unroll
      for (int j = 0; j < 32; ++j)
        store_float2_policy(dst + 8 * j, o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv, policy);
      if (cw == 0 && lane % 4 == 0) p.partial_lse[prow] = lse;
    }
  }
}

// Shared-memory regions of one block (Smem gives their sizes).
struct SmemRegions {
  unsigned char* q;              // 64 query rows, swizzled slices
  unsigned char* kv;             // kStages KV stages
  unsigned char* p;              // P tile(s), where they have a region of their own
  float* stats;                  // per-row values exchanged between the consumer warpgroups
  unsigned char* valid;          // [stage][token]: the token exists (written by the producer)
  uint32_t full_bar, empty_bar;  // kStages x Smem::full_per_stage, kStages mbarriers
};

// Packs P values (fp32, this thread's accumulator layout) into a 16-bit pair register.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  const typename Dtype<T>::pair v = Dtype<T>::make_pair(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Seesaw consumers. The 64-token tiles of a piece go in pairs (A = tile 2k in stage 0, B = tile 2k + 1
// in stage 1). Warpgroup cw computes the whole S of its own tile (A for cw 0, B for cw 1: 64 x 64,
// wgmma m64n64k16) and its softmax; both accumulate their half of O (channels 256 cw ..) over both
// tiles: the own tile's P from registers, the other's from shared memory. The online softmax runs
// as a chain A -> B, with reference maxima m (log2 units, lazy rescale as max_grew):
//   cw 0:  S_A, m_A = move(m, rowmax S_A), P_A = 2^(S_A - m_A)  -> publish P_A, m_A    (barrier A)
//          O_L = O_L 2^(m - m_A) + P_A V_A,L            | wait for P_B, m_B           (barrier B)
//          O_L = O_L 2^(m_A - m_B) + P_B V_B,L
//   cw 1:  S_B (while cw 0 runs its softmax)             | wait for P_A, m_A           (barrier A)
//          O_R = O_R 2^(m - m_A) + P_A V_A,R  (in flight while:) m_B = move(m_A, rowmax S_B),
//          P_B = 2^(S_B - m_B) -> publish P_B, m_B (barrier B); O_R = O_R 2^(m_A - m_B) + P_B V_B,R
// so one warpgroup's softmax overlaps the other's tensor-core work. l (row sums of P) is kept per
// warpgroup in the same units and added at the end. The producer fills stage (tile % 2) and counts
// the fills of each stage (a piece with an odd tile count leaves stage 1 out of its last pair).
template <typename T, int D, bool kTma>
__device__ __forceinline__ void seesaw_consumers(const Args& args, const SmemRegions& sm, int tid, const int* md,
                                                 int begin_batch, int end_batch, int hk, int row_base,
                                                 uint64_t l2_policy) {
  using S = Smem<D, true>;
  const DecodeParams& p = args.p;
  const int ctid = tid - 128;  // 0..255
  const int cw = ctid / 128;
  const int lane = tid % 32;
  const int row_lo = ((ctid % 128) / 32) * 16 + lane / 4;  // accumulator rows row_lo, row_lo + 8
  float* sM = sm.stats;              // [tile A, tile B][64 rows]: reference maxima after each tile
  float* sL = sm.stats + 2 * kRows;  // [warpgroup][64 rows]: row sums at the end of a piece
  const uint32_t q_addr = smem_u32(sm.q);
  const uint32_t kv_base = smem_u32(sm.kv);  // stage st at kv_base + st * S::stage_bytes
  // P of the tile in stage st: the dead rope slice of that stage (D = 576), else a slice of its own.
  auto p_slot = [&](int st) -> unsigned char* {
    return D > kDimV ? sm.kv + st * S::stage_bytes + kDimV / 64 * kSliceBytes : sm.p + st * kSliceBytes;
  };
  int uses0 = 0, uses1 = 0;  // fills of stage 0 / 1 consumed so far (the producer counts alike)
  for (int b = begin_batch; b <= end_batch; ++b) {
    const Piece pc = piece_of(p, md, b);
    const int num_tiles = pc.num_tiles();
    if (num_tiles > 0) {
      load_q<D, T>(p, q_addr, ctid, b, hk, row_base, l2_policy);
      cp_async_wait_all();
      fence_proxy_async();
      consumer_sync();
    }
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    int last_visible[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) last_visible[h] = p.last_visible(pc.seqlen, row_base + row_lo + 8 * h);

    for (int t2 = 0; t2 < num_tiles; t2 += 2) {
      const bool has_b = t2 + 1 < num_tiles;
      const int use_a = uses0++;
      const int use_b = has_b ? uses1++ : 0;
      // This warpgroup's own tile (t2 + cw, in stage cw): S, mask, row maxima.
      float s[32];
      float tile_max[2] = {-INFINITY, -INFINITY};
      if (cw == 0 || has_b) {
        const int t0 = pc.t_begin + (t2 + cw) * kTokens;
        const uint32_t parity = (cw == 0 ? use_a : use_b) & 1;
#pragma unroll
        for (int i = 0; i < 32; ++i) s[i] = 0.f;
#pragma unroll
        for (int slice = 0; slice < S::kSlices; ++slice) {
          mbar_wait(sm.full_bar + 8 * (cw * S::full_per_stage + slice), parity);
          if constexpr (!kTma) fence_proxy_async();  // gather_issue: generic writes -> wgmma
          wgmma_fence();  // after each wait: else ptxas serializes the wgmmas (C7520, the wait is a branch)
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) {
            const uint64_t da = make_desc(q_addr + slice * kSliceBytes + kk * 32, 16, 1024);
            const uint64_t db = make_desc(kv_base + cw * S::stage_bytes + slice * kSliceBytes + kk * 32, 16, 1024);
            wgmma_m64n64k16<T>(s, da, db);
          }
        }
        wgmma_commit();
        wgmma_wait<0>();
        if (kTma && t0 + kTokens > pc.t_end) {
          // Every slice has landed. The other warpgroup reads these V rows only after this one's
          // handshake barrier.
          clear_dead_v(sm.kv + cw * S::stage_bytes, pc.t_end - t0, ctid % 128, 128);
          fence_proxy_async();
          if (cw == 0)
            named_sync<kBarWarpgroup>(128);
          else
            named_sync<kBarWarpgroup + 1>(128);
        }
        // s[4j + e]: token 8 j + 2 (lane % 4) + (e & 1), row row_lo + 8 (e / 2).
        mask_scale_rowmax<kTma>(s, tile_max, args, pc, t0, sm.valid + cw * kTokens, 0, last_visible, lane);
      }
      // The own tile's softmax against the current m: moves m (lazily, warp-uniform), writes P to
      // registers (wgmma A fragments) and to this stage's P slot, publishes the new m, adds to l.
      uint32_t pf[16];  // [k16 step kt][4]: rows row_lo / row_lo + 8, tokens 16 kt + 2 (lane % 4) + {0, 1, 8, 9}
      float step[2];    // factor O and l take on this step: 2^(m_old - m_new)
      auto own_softmax = [&](float* sm_row) {
        float m_new[2];
        bool grew = false;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          m_new[h] = fmaxf(m[h], tile_max[h]);
          grew |= max_grew(m_new[h], m[h], p.rescale_threshold);
        }
        const bool move = __any_sync(0xffffffff, grew);
        float psum[2] = {0.f, 0.f};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (!move) m_new[h] = m[h];
          step[h] = exp2f(m[h] - ref_base(m_new[h]));
          m[h] = m_new[h];
        }
        unsigned char* slot = p_slot(cw);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float base = ref_base(m[h]);
            const float p0 = exp2f(s[4 * j + 2 * h] - base), p1 = exp2f(s[4 * j + 2 * h + 1] - base);
            psum[h] += p0 + p1;
            pf[(j / 2) * 4 + (j % 2) * 2 + h] = pack_pair<T>(p0, p1);
          }
        }
        // P -> the slot by stmatrix (KERNEL_NOTES v10: 4 instructions instead of 16 shared stores;
        // 1.00-1.02x in the decode kernel's A/B, neutral end to end): call q stores the 8 x 8 matrices i = 0..3 of this
        // warp's 16 rows with token group 2q + i / 2 and row half i % 2, whose registers are pf[4q + i].
        {
          const int mi = lane / 8;
          const int r = ((ctid % 128) / 32) * 16 + 8 * (mi % 2) + lane % 8;
          const uint32_t slot_addr = smem_u32(slot);
#pragma unroll
          for (int q = 0; q < 4; ++q)
            stmatrix_x4(slot_addr + swizzled(r, 2 * q + mi / 2), pf[4 * q], pf[4 * q + 1], pf[4 * q + 2],
                        pf[4 * q + 3]);
        }
        if (lane % 4 == 0) {
          sm_row[row_lo] = m[0];
          sm_row[row_lo + 8] = m[1];
        }
        fence_proxy_async();  // generic stores to the P slot -> the other warpgroup's wgmma reads
#pragma unroll
        for (int h = 0; h < 2; ++h) l[h] = l[h] * step[h] + psum[h];
        return move;
      };
      // The other warpgroup's published m for this step: moves m, rescales O and l.
      auto follow = [&](const float* sm_row) {
        bool any = false;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float m_new = sm_row[row_lo + 8 * h];
          step[h] = exp2f(m[h] - ref_base(m_new));
          any |= step[h] != 1.f;
          m[h] = m_new;
          l[h] *= step[h];
        }
        return __any_sync(0xffffffff, any);
      };
      // O[:, 256 cw : +256] += P V of stage st, P from registers (pf) or from the stage's P slot.
      auto pv = [&](int st, bool p_in_registers) {
        wgmma_fence();
#pragma unroll
        for (int kt = 0; kt < kTokens / 16; ++kt) {
          const uint64_t db =
              make_desc(kv_base + st * S::stage_bytes + (4 * cw) * kSliceBytes + kt * 16 * 128, kSliceBytes, 1024);
          if (p_in_registers) {
            const uint32_t a[4] = {pf[4 * kt], pf[4 * kt + 1], pf[4 * kt + 2], pf[4 * kt + 3]};
            wgmma_m64n256k16_rs<T>(o, a, db);
          } else {
            wgmma_m64n256k16<T>(o, make_desc(smem_u32(p_slot(st)) + kt * 32, 16, 1024), db);
          }
        }
        wgmma_commit();
      };
      auto release = [&](int st) {
        wgmma_wait<0>();
        if (lane == 0) mbar_arrive(sm.empty_bar + 8 * st);  // this warp is done with the stage
      };

      if (cw == 0) {
        const bool rescale = own_softmax(sM);
        named_arrive<kBarTileA>(kConsumerThreads);
        if (rescale) rescale_o(o, step);
        pv(0, true);
        release(0);  // before waiting for tile B: the producer refills stage 0 sooner
        named_sync<kBarTileB>(kConsumerThreads);
        if (has_b) {
          if (follow(sM + kRows)) rescale_o(o, step);
          pv(1, false);
          release(1);
        }
      } else {
        named_sync<kBarTileA>(kConsumerThreads);
        if (follow(sM)) rescale_o(o, step);
        pv(0, false);
        if (has_b) {
          const bool rescale = own_softmax(sM + kRows);
          named_arrive<kBarTileB>(kConsumerThreads);
          release(0);
          if (rescale) rescale_o(o, step);
          pv(1, true);
          release(1);
        } else {
          named_arrive<kBarTileB>(kConsumerThreads);
          release(0);
        }
      }
    }

    // Row sums: add the lanes' and the two warpgroups' shares, then write.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l[h] += __shfl_xor_sync(0xffffffff, l[h], 1);
      l[h] += __shfl_xor_sync(0xffffffff, l[h], 2);
    }
    if (lane % 4 == 0) {
      sL[cw * kRows + row_lo] = l[0];
      sL[cw * kRows + row_lo + 8] = l[1];
    }
    consumer_sync();
    const float total[2] = {sL[row_lo] + sL[kRows + row_lo], sL[row_lo + 8] + sL[kRows + row_lo + 8]};
    store_rows<T>(p, pc, b, hk, row_base, row_lo, cw, lane, o, m, total);
    consumer_sync();  // sQ and the stats are reused by the next sequence
  }
}

// kTma: the page size is a multiple of 64 (one TMA box per slice of a tile), else the cp.async gather.
template <typename T, int D, bool kSeesaw, bool kTma>
__global__ void __launch_bounds__(kThreads, 1) mla_decode_sm90_kernel(const __grid_constant__ Args args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // wgmma exists only in the sm_90a pass of the build
  using S = Smem<D, kSeesaw>;
  using DT = Dtype<T>;
  const DecodeParams& p = args.p;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // Aligned by pointer arithmetic on the __shared__ array, not through an integer, so that the compiler
  // knows every pointer derived from it is shared memory: LDS/STS with 32-bit addresses. Through an
  // integer they were generic accesses with 64-bit addresses, whose registers spilled in the seesaw
  // loop (docs/KERNEL_NOTES.md v9: 1.00-1.06x end to end).
  unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  unsigned char* sQ = smem;
  unsigned char* sKV = sQ + S::q_bytes;  // kStages stages
  unsigned char* sP = sKV + kStages * S::stage_bytes;
  float* sStats = reinterpret_cast<float*>(sP + S::p_bytes);                          // [2 consumers][64 rows]
  unsigned char* sValid = reinterpret_cast<unsigned char*>(sStats) + S::stats_bytes;  // [stage][token]
  const uint32_t full_bar = smem_u32(sValid + S::valid_bytes);  // [stage][S::full_per_stage], 8 bytes each
  const uint32_t empty_bar = full_bar + kStages * S::full_per_stage * 8;
  const SmemRegions regions{sQ, sKV, sP, sStats, sValid, full_bar, empty_bar};

  pdl_allow_dependents();  // the combine kernel may launch now; it waits for this grid (pdl.cuh)
  const int tid = threadIdx.x;
  const int part = blockIdx.x;
  const int m_blocks = (p.rows_per_head_k + kRows - 1) / kRows;
  const int hk = blockIdx.y / m_blocks;
  const int row_base = (blockIdx.y % m_blocks) * kRows;
  const int* md = p.metadata + part * kMetadataWidth;
  const int begin_batch = max(md[0], 0), end_batch = min(md[2], p.batch - 1);
  const uint64_t l2_policy = kv_l2_policy(p.kv_evict_first);

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      for (int f = 0; f < S::full_per_stage; ++f)
        mbar_init(full_bar + 8 * (s * S::full_per_stage + f), kTma ? 1 : kGatherArrivals);
      mbar_init(empty_bar + 8 * s, kConsumerThreads / 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  // Roles are the two branches of one if/else, so that setmaxnreg applies (see HOPPER.md).
  if (tid < 128) {
    // ----------------------------------------------------------------------------- producer
    // Seesaw consumers hold S (32) and P (16) beside O (128): 40 / 232 (128 x 40 + 256 x 232 <= 64 Ki).
    if constexpr (kSeesaw)
      asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    else
      asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n");
    if (kTma && tid >= 32) return;
    int it = 0;
    int uses0 = 0, uses1 = 0;  // seesaw: fills of stage 0 / 1 so far
    for (int b = begin_batch; b <= end_batch; ++b) {
      const Piece pc = piece_of(p, md, b);
      const int* table = p.block_table + int64_t(b) * p.block_table_stride;
      for (int tile = 0; tile < pc.num_tiles(); ++tile, ++it) {
        // Split schedule: the ring runs on across pieces. Seesaw: tile 2k in stage 0, 2k + 1 in stage 1.
        const int stage = kSeesaw ? tile % kStages : it % kStages;
        const int use = !kSeesaw ? it / kStages : stage == 0 ? uses0++ : uses1++;
        const int t0 = pc.t_begin + tile * kTokens;
        GatherRows<T> rows;
        if constexpr (!kTma) rows = gather_lookup<T>(p, pc, table, t0, hk, tid);
        if (use >= 1) mbar_wait(empty_bar + 8 * stage, (use + 1) & 1);
        const uint32_t dst = smem_u32(sKV + stage * S::stage_bytes);
        unsigned char* valid = sValid + stage * kTokens;
        if constexpr (!kTma) {
          gather_issue<D, S::full_per_stage, T>(dst, valid, full_bar + 8 * stage * S::full_per_stage, tid, rows,
                                                l2_policy);
        } else {
          // The tile is tokens [t0, t0 + 64) of one page (page_block_size % 64 == 0, t0 % 64 == 0).
          const int block = table[t0 / p.page_block_size];
          const bool block_ok = block >= 0 && block < p.num_blocks;
          valid[tid] = block_ok && t0 + tid < pc.t_end;
          valid[tid + 32] = block_ok && t0 + tid + 32 < pc.t_end;
          __syncwarp();
          if (tid == 0) {
            const uint32_t stage_full = full_bar + 8 * stage * S::full_per_stage;
            if constexpr (!kSeesaw) mbar_arrive_expect_tx(stage_full, S::stage_bytes);
            // Out-of-range ids become an out-of-bounds box: zeros, no fault.
            const int block_coord = block_ok ? block : p.num_blocks;
#pragma unroll
            for (int slice = 0; slice < S::kSlices; ++slice) {
              const uint32_t bar = kSeesaw ? stage_full + 8 * slice : stage_full;
              if constexpr (kSeesaw) mbar_arrive_expect_tx(bar, kSliceBytes);
              tma_load_4d(dst + slice * kSliceBytes, &args.kv_map, slice * 64, t0 % p.page_block_size, hk, block_coord,
                          bar, l2_policy);
            }
          }
        }
      }
    }
    if constexpr (!kTma) cp_async_wait_all();  // no thread exits with copies in flight
  } else {
    // ----------------------------------------------------------------------------- consumers
    if constexpr (kSeesaw) {
      asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
      seesaw_consumers<T, D, kTma>(args, regions, tid, md, begin_batch, end_batch, hk, row_base, l2_policy);
    } else {
      asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n");
      const int ctid = tid - 128;  // 0..255
      const int cw = ctid / 128;   // consumer warpgroup: token half for S, channel half for O
      const int lane = tid % 32;
      const int row_lo = ((ctid % 128) / 32) * 16 + lane / 4;  // accumulator rows row_lo, row_lo + 8
      int it = 0;
      for (int b = begin_batch; b <= end_batch; ++b) {
        const Piece pc = piece_of(p, md, b);
        const int num_tiles = pc.num_tiles();
        if (num_tiles > 0) {
          load_q<D, T>(p, smem_u32(sQ), ctid, b, hk, row_base, l2_policy);
          cp_async_wait_all();
          fence_proxy_async();
          consumer_sync();
        }
        float o[128];
#pragma unroll
        for (int i = 0; i < 128; ++i) o[i] = 0.f;
        float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
        int last_visible[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) last_visible[h] = p.last_visible(pc.seqlen, row_base + row_lo + 8 * h);

        for (int tile = 0; tile < num_tiles; ++tile, ++it) {
          const int stage = it % kStages;
          const int t0 = pc.t_begin + tile * kTokens;
          unsigned char* stage_ptr = sKV + stage * S::stage_bytes;
          const uint32_t kv_addr = smem_u32(stage_ptr);
          const unsigned char* valid = sValid + stage * kTokens;
          mbar_wait(full_bar + 8 * stage * S::full_per_stage, (it / kStages) & 1);
          if constexpr (!kTma) fence_proxy_async();  // gather_issue: generic writes -> wgmma
          if (kTma && t0 + kTokens > pc.t_end) {
            clear_dead_v(stage_ptr, pc.t_end - t0, ctid, kConsumerThreads);
            fence_proxy_async();
            consumer_sync();
          }

          // S = Q K^T for tokens [32 cw, 32 cw + 32).
          float s[16];
#pragma unroll
          for (int i = 0; i < 16; ++i) s[i] = 0.f;
          wgmma_fence();
#pragma unroll
          for (int slice = 0; slice < S::kSlices; ++slice) {
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
              const uint64_t da = make_desc(smem_u32(sQ) + slice * kSliceBytes + kk * 32, 16, 1024);
              const uint64_t db = make_desc(kv_addr + slice * kSliceBytes + cw * 32 * 128 + kk * 32, 16, 1024);
              wgmma_m64n32k16<T>(s, da, db);
            }
          }
          wgmma_commit();
          wgmma_wait<0>();

          // Mask and scale. s[4j + e]: token 32 cw + 8 j + 2 (lane % 4) + (e & 1), row row_lo + 8 (e / 2).
          float tile_max[2];
          mask_scale_rowmax<kTma>(s, tile_max, args, pc, t0, valid, cw * 32, last_visible, lane);
          if (lane % 4 == 0) {
            sStats[cw * kRows + row_lo] = tile_max[0];
            sStats[cw * kRows + row_lo + 8] = tile_max[1];
          }
          consumer_sync();
          // Lazy rescale (max_grew): warp w of both warpgroups holds the same rows and reads the same
          // sStats, so both decide alike.
          float m_new[2];
          bool grew = false;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            m_new[h] = fmaxf(row_max[h], fmaxf(sStats[row_lo + 8 * h], sStats[kRows + row_lo + 8 * h]));
            grew |= max_grew(m_new[h], row_max[h], p.rescale_threshold);
          }
          const bool any_grew = __any_sync(0xffffffff, grew);
          float rescale[2];
          if (any_grew) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              rescale[h] = exp2f(row_max[h] - ref_base(m_new[h]));
              row_max[h] = m_new[h];
              row_sum[h] *= rescale[h];
            }
          }
          // P -> sP (swizzled K-major 64 x 64), and this warpgroup's share of the row sums.
#pragma unroll
          for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const float base = ref_base(row_max[h]);
              const float p0 = exp2f(s[4 * j + 2 * h] - base), p1 = exp2f(s[4 * j + 2 * h + 1] - base);
              row_sum[h] += p0 + p1;
              const int r = row_lo + 8 * h;
              const int t = cw * 32 + j * 8 + (lane % 4) * 2;
              *reinterpret_cast<typename DT::pair*>(sP + swizzled(r, t / 8) + (t % 8) * 2) = DT::make_pair(p0, p1);
            }
          }
          if (any_grew) rescale_o(o, rescale);
          fence_proxy_async();  // generic stores to sP -> wgmma reads
          consumer_sync();
          // O[:, 256 cw : +256] += P V. V channels 256 cw.. = slices 4 cw..4 cw+3 (8 KiB apart: the
          // MN-major atom stride); tokens 16 kt..+16 = two 8-row groups 1024 bytes apart.
          wgmma_fence();
#pragma unroll
          for (int kt = 0; kt < kTokens / 16; ++kt) {
            const uint64_t da = make_desc(smem_u32(sP) + kt * 32, 16, 1024);
            const uint64_t db = make_desc(kv_addr + (4 * cw) * kSliceBytes + kt * 16 * 128, kSliceBytes, 1024);
            wgmma_m64n256k16<T>(o, da, db);
          }
          wgmma_commit();
          wgmma_wait<0>();
          if (lane == 0) mbar_arrive(empty_bar + 8 * stage);  // this warp is done with the stage
        }

        // Row sums: add the two warpgroups' shares, then write.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          row_sum[h] += __shfl_xor_sync(0xffffffff, row_sum[h], 1);
          row_sum[h] += __shfl_xor_sync(0xffffffff, row_sum[h], 2);
        }
        if (lane % 4 == 0) {
          sStats[cw * kRows + row_lo] = row_sum[0];
          sStats[cw * kRows + row_lo + 8] = row_sum[1];
        }
        consumer_sync();
        const float total[2] = {sStats[row_lo] + sStats[kRows + row_lo],
                                sStats[row_lo + 8] + sStats[kRows + row_lo + 8]};
        store_rows<T>(p, pc, b, hk, row_base, row_lo, cw, lane, o, row_max, total);
        consumer_sync();  // sQ and sStats are reused by the next sequence
      }
    }
  }
#endif
}

}  // namespace sm90
}  // namespace flashmla
