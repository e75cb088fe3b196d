// The bf16-screened nearest-code search of the native CPU lookup and quantize (docs/design.md §2.1):
// a bfloat16 pass (VDPBF16PS, AVX512_BF16, float32 accumulation) bounds every code's distance, and
// only the codes within a rigorous error bound of each row's screened minimum are re-scored with the
// exact float32 arithmetic of tile_6x16: codes and distances are bit-identical to the exact search.
// Definitions, the error bound and its derivation: cpu_bf16_screen.cpp.
//
// Which search runs: env VQDNA_NATIVE_SEARCH = "auto" (default: screened where the CPU has AVX512_BF16
// and the problem is large enough for it to pay, exact elsewhere) | "exact" | "bf16" (screened
// wherever it can run; an error on a CPU without AVX512_BF16). A codebook with a non-finite value or
// sqnorm is always searched exactly, and so are the rows of z it cannot bound (non-finite, or so large
// that the bound could overflow). search_stats() tells what the last call did.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

namespace vqdna::cpu {

struct PackedCodebook;
struct ScreenedCodebook;
struct ScreenScratch;

struct ScreenedCodebookDeleter {
  void operator()(ScreenedCodebook* p) const;
};
struct ScreenScratchDeleter {
  void operator()(ScreenScratch* p) const;
};
using ScreenedCodebookPtr = std::unique_ptr<ScreenedCodebook, ScreenedCodebookDeleter>;
using ScreenScratchPtr = std::unique_ptr<ScreenScratch, ScreenScratchDeleter>;

// What the last lookup_native / quantize_native call did (a diagnostic: calls from several threads
// at once mix their counts). rows_*: rows of z searched by the screen with a re-check of its
// candidates, or exactly (unbounded rows, candidate lists that overflowed, or the exact path).
struct SearchStats {
  std::atomic<int> screened{0};  // 1: the call ran the bf16 screen, 0: the exact search only
  std::atomic<int64_t> rows_screened{0}, rows_exact{0}, candidates{0};
};
SearchStats& search_stats();

// True when this CPU (and OS) runs AVX512_BF16 and the build has the screened kernel.
bool bf16_screen_supported();

// Decides the search for one call (env VQDNA_NATIVE_SEARCH, the CPU, the codebook's finiteness, the
// size: n_rows rows of z) and resets search_stats(). nullptr: search exactly. `op` names the caller in errors.
ScreenedCodebookPtr make_screen(const char* op, const PackedCodebook& cb, int64_t n_rows);

// Per-thread working memory for blocks of up to `mb` rows.
ScreenScratchPtr make_screen_scratch(const ScreenedCodebook& sc, int64_t mb);

// The screened replacement of search_block: the same outputs (best[r] = min_k of the exact float32
// ||e_k||^2 - 2 z.e_k, best_idx[r] its lowest code) for the `rows` rows of the packed block `apack`
// (row_panels panels of kMR rows, float32 [D][kMR] each), znorm[r] = ||z_r||^2 as packed.
void screened_search_block(const float* apack, int64_t rows, const float* znorm, const PackedCodebook& cb,
                           const ScreenedCodebook& sc, ScreenScratch& scratch, float* best, int32_t* best_idx,
                           const char* prefetch, int64_t prefetch_lines);

// After a screened block: false when, in "auto" mode, this thread's blocks so far kept too many
// candidates (or overflowed too often) for the screen to beat the exact search (a codebook of
// near-equidistant codes, e.g. EMA-trained means): the caller then searches its remaining blocks exactly.
bool screen_pays(const ScreenedCodebook& sc, const ScreenScratch& scratch);
// Counts rows a thread searched exactly after the screen stopped paying (search_stats()).
void count_exact_rows(ScreenScratch& scratch, int64_t rows);

}  // namespace vqdna::cpu
