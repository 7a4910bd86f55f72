//! Prompt products on AMX int8 tiles (issue #17, item 5), for every weight format of ours
//! (the 32-value ones Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the k-quants Q4_K, Q5_K, Q6_K),
//! where the CPU has them and the node asks for them (`shoal --amx`, which sets
//! `SHOAL_AMX=1`).
//!
//! Intel's AMX (Sapphire Rapids and later) multiplies a tile of up to 16 rows × 64 bytes
//! of int8 by another in one instruction (`tdpbssd` signed × signed, `tdpbsud` signed ×
//! unsigned), into 16 × 16 int32. A product maps onto it one block at a time: A is 16
//! activation rows × 32 bytes (a [`Q8Tile`]'s block, already laid out so), B the block of
//! 16 weight rows, repacked once into AMX's layout (8 rows of 64 bytes: four consecutive
//! values of each weight row side by side), and C their 16 × 16 exact integer sums, which
//! AVX-512 scales by each pair's `d_w * d_a` into f32 accumulators (plus `m_w * s_a` for
//! the formats with a minimum), block after block. The k-quants take the same tiles per
//! sub-block (32 values; Q6_K's 16, with a half-width A and B), their sums times the
//! sub-block's integer scale added over the super-block (in f32, where llama.cpp adds them
//! in int32: each term is exact, the sum rounds once past 2^24), then scaled by `d` once
//! per super-block, as llama.cpp's k-quant dot products are; the minimums' term (Q4_K,
//! Q5_K) is exact in integers (`vpdpwssd` of the minimums and the activations' sums).
//!
//! Not the default, because of what it changes: every entry of the engine's other tiles is
//! bit for bit the single-row `vec_dot` of its pair, and so llama.cpp's (built without
//! AMX). AMX sums a block whole where those kernels sum eight lanes and add them at the
//! end: the same exact integers, but f32 steps in another order, so products differ in the
//! last bits and a greedy answer can differ from llama.cpp's where two tokens are nearly
//! tied. What stays exact: a row's numbers do not depend on its tile, its neighbours or
//! the threads, and only rows of products of at least [`MIN_ROWS`] rows take this path —
//! the same shape rule Q6_K's llama.cpp order already has, which the prefix cache, batches
//! and speculation allow for — so prompts in chunks, cached prompts, recovery replays and
//! rings still give what one process gives (when every node uses the tiles). It costs
//! memory: the repacked weights, one byte per weight and an f32 scale (and minimum) per
//! block — 1.125 bytes per weight, 1.25 with minimums; 1.08 (Q6_K) to 1.125 (Q4_K, Q5_K)
//! for the k-quants, whose sub-block scales stay bytes — kept beside the file's for the
//! decode kernels, made at a matrix's first long product (an LM head's only where a prompt
//! asks for every row's logits).

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::{pool, scalar, Format, OutPtr, Q8Tile, QuantMatrix, QK, QK_K};

/// Weight rows per panel, activation rows per tile: AMX's 16 rows.
pub(super) const ROWS: usize = 16;
/// Products with fewer rows than this (decode, a verification's single rows, a prompt's
/// short last chunk) keep the engine's other kernels: the row count where llama.cpp's
/// Q6_K order changes too (kquant.rs) and the prefix cache's shortest reusable chunk.
pub(super) const MIN_ROWS: usize = crate::prefix_cache::MIN_CHUNK_ROWS;
/// Bytes per row of a B tile: four consecutive values of each of the 16 weight rows.
const B_ROW_BYTES: usize = ROWS * 4;
/// Bytes per row of a C tile: 16 int32 sums.
const C_ROW_BYTES: usize = ROWS * std::mem::size_of::<i32>();

/// Whether prompt products take AMX tiles: asked for (`SHOAL_AMX=1`), and the CPU and OS
/// offer them.
pub(super) fn enabled() -> bool {
    // The crate's unit tests check the other kernels bit for bit (an exported SHOAL_AMX
    // must not change them); this file's tests call the tiles themselves.
    if cfg!(test) {
        return false;
    }
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let asked = std::env::var("SHOAL_AMX").is_ok_and(|v| v == "1");
        let on = asked && available();
        if on {
            tracing::info!("prompt products on AMX int8 tiles");
        } else if asked {
            tracing::warn!("AMX tiles asked for, but this CPU or OS does not offer them");
        }
        on
    })
}

/// Whether this CPU has AMX-TILE and AMX-INT8 (and the AVX-512 the scaling uses), and
/// Linux lets this process use the tile registers (a process must ask for them once).
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| cpu_has_amx_int8() && super::avx512::available() && ask_for_tiles())
}

/// Whether products of `w` can run on the tiles: whole panels (every format of ours has
/// a repacking).
pub(super) fn supports(w: &QuantMatrix) -> bool {
    w.rows.is_multiple_of(ROWS)
}

fn cpu_has_amx_int8() -> bool {
    // CPUID leaf 7, sub-leaf 0: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8.
    #[allow(unused_unsafe)]
    // Safety: CPUID is on every x86-64 CPU.
    let (max_leaf, leaf) = unsafe { (__get_cpuid_max(0).0, __cpuid_count(7, 0)) };
    if max_leaf < 7 {
        return false;
    }
    leaf.edx & (1 << 24) != 0 && leaf.edx & (1 << 25) != 0
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: Linux (5.16 and later) gives a
/// process the tiles' 8 KiB of state only when asked; without it the first tile
/// instruction kills the process.
#[cfg(target_os = "linux")]
fn ask_for_tiles() -> bool {
    const SYS_ARCH_PRCTL: isize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // Safety: a plain system call; it changes only this process's permissions.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn ask_for_tiles() -> bool {
    false
}

/// A matrix repacked for the tiles, by panels of 16 weight rows.
pub(super) struct Packed {
    rows: usize,
    /// Values per tile product: 32, or 16 for Q6_K (whose scales change every 16).
    block_len: usize,
    /// Tile products per row: `cols / block_len`.
    blocks: usize,
    /// Whether the weights are unsigned (`tdpbsud`): the formats with a minimum.
    unsigned: bool,
    panels: Vec<Panel>,
}

/// 16 weight rows repacked: per block (32 values, or a Q6_K sub-block of 16) its B tile
/// (`tiles[block * 16 * block_len..]`), and the scales (and minimums) that turn the
/// tiles' integer sums into the products.
#[derive(Default)]
struct Panel {
    tiles: Vec<u8>,
    scales: Scales,
}

/// How a panel scales its tiles' sums: per block (or super-block) and weight row,
/// `[block * 16 + row]`.
enum Scales {
    /// The 32-value formats: each block's `d`, and (Q4_1, Q5_1) its minimum `m` (else
    /// empty). Each block's sums are scaled into f32 at once.
    Blocks { d: Vec<f32>, m: Vec<f32> },
    /// The k-quants: each sub-block's integer scale `sc`, each super-block's `d` and
    /// (Q4_K, Q5_K) `dmin` and minimums, in pairs of sub-blocks as two i16 in an i32
    /// (`min_pairs[(super_block * 4 + pair) * 16 + row]`, for `vpdpwssd`; empty without
    /// minimums). As llama.cpp's dot products, a super-block at a time: its sub-blocks'
    /// sums times their scales, and its minimums times the activations' sums (exactly, in
    /// integers), scaled by `d` and `dmin` once.
    KQuant {
        sc: Vec<i8>,
        d: Vec<f32>,
        dmin: Vec<f32>,
        min_pairs: Vec<i32>,
    },
}

impl Default for Scales {
    fn default() -> Self {
        Scales::Blocks {
            d: Vec::new(),
            m: Vec::new(),
        }
    }
}

impl Packed {
    /// Repacks `w`, which [`supports`] takes, on the pool's threads (a few seconds of one
    /// core for a 1.5B model's matrices, at each matrix's first long product).
    pub(super) fn new(w: &QuantMatrix) -> Packed {
        assert!(supports(w));
        let block_len = if w.format == Format::Q6K { 16 } else { QK };
        let mut p = Packed {
            rows: w.rows,
            block_len,
            blocks: w.cols / block_len,
            unsigned: matches!(
                w.format,
                Format::Q4_1 | Format::Q5_1 | Format::Q4K | Format::Q5K
            ),
            panels: Vec::new(),
        };
        let mut panels: Vec<Panel> = (0..w.rows / ROWS).map(|_| Panel::default()).collect();
        pool::for_each_chunk_mut(&mut panels, 1, |i, panel| panel[0] = p.panel(w, i));
        p.panels = panels;
        p
    }

    /// Panel `i` of `w`, repacked.
    fn panel(&self, w: &QuantMatrix, i: usize) -> Panel {
        let (block_len, blocks) = (self.block_len, self.blocks);
        let k_quant = w.format.block_len() == QK_K;
        let supers = if k_quant { w.cols / QK_K } else { 0 };
        let with_min = self.unsigned;
        let mut p = Panel {
            tiles: vec![0; ROWS * w.cols],
            scales: if k_quant {
                Scales::KQuant {
                    sc: vec![0; ROWS * blocks],
                    d: vec![0.0; ROWS * supers],
                    dmin: vec![0.0; if with_min { ROWS * supers } else { 0 }],
                    min_pairs: vec![0; if with_min { ROWS * supers * 4 } else { 0 }],
                }
            } else {
                Scales::Blocks {
                    d: vec![0.0; ROWS * blocks],
                    m: vec![0.0; if with_min { ROWS * blocks } else { 0 }],
                }
            },
        };
        let b_tile = ROWS * block_len;
        let (row_bytes, block_bytes) = (w.row_bytes(), w.format.block_bytes());
        for n in 0..ROWS {
            let row = &w.data[(i * ROWS + n) * row_bytes..][..row_bytes];
            // Each block's values into its B tile: four consecutive values of each weight
            // row side by side; signed values as two's complement bytes.
            let mut put = |b: usize, values: &[i32]| {
                let tile = &mut p.tiles[b * b_tile..][..b_tile];
                for (k, &v) in values.iter().enumerate() {
                    tile[(k / 4) * B_ROW_BYTES + n * 4 + k % 4] = v as u8;
                }
            };
            for (sb, block) in row.chunks_exact(block_bytes).enumerate() {
                if let Some((values, d, m)) = scalar::block_values(w.format, block) {
                    put(sb, &values);
                    if let Scales::Blocks { d: ds, m: ms } = &mut p.scales {
                        ds[sb * ROWS + n] = d;
                        if with_min {
                            ms[sb * ROWS + n] = m;
                        }
                    }
                    continue;
                }
                let Some(s) = scalar::super_block(w.format, block) else {
                    unreachable!("every format is a 32-value format or a k-quant")
                };
                let subs = QK_K / block_len;
                for j in 0..subs {
                    let b = sb * subs + j;
                    put(b, &s.values[j * block_len..][..block_len]);
                    if let Scales::KQuant { sc, .. } = &mut p.scales {
                        sc[b * ROWS + n] = s.scales[j];
                    }
                }
                if let Scales::KQuant {
                    d, dmin, min_pairs, ..
                } = &mut p.scales
                {
                    d[sb * ROWS + n] = s.d;
                    if with_min {
                        dmin[sb * ROWS + n] = s.dmin;
                        for (pair, m) in s.mins.chunks_exact(2).enumerate() {
                            let (lo, hi) = (i32::from(m[0]), i32::from(m[1]));
                            min_pairs[(sb * 4 + pair) * ROWS + n] = (lo & 0xffff) | (hi << 16);
                        }
                    }
                }
            }
        }
        p
    }

    /// The products of the activation `tiles` (16 rows each, quantized for this format)
    /// with these weights: tile `g`'s first `placement[g].1` rows into the rows of `out`
    /// (`[.., rows]`) from `placement[g].0` on. Over the pool's threads by panels.
    pub(super) fn matmul(&self, tiles: &[Q8Tile], placement: &[(usize, usize)], out: &mut [f32]) {
        assert!(tiles.iter().all(|t| t.rows == ROWS) && tiles.len() == placement.len());
        let n = self.rows;
        assert!(placement
            .iter()
            .all(|&(at, rows)| rows <= ROWS && (at + rows) * n <= out.len()));
        assert!(available());
        let out_ptr = OutPtr(out.as_mut_ptr());
        pool::for_each(n / ROWS, |panel| {
            let mut block_out = [0f32; ROWS * ROWS];
            for (tile, &(at, rows)) in tiles.iter().zip(placement) {
                // Safety: `available()` confirmed AMX-INT8 and AVX-512; the tile's sizes
                // are checked inside.
                unsafe { self.panel_times_tile(panel, tile, &mut block_out) };
                for (r, row) in block_out.chunks_exact(ROWS).take(rows).enumerate() {
                    // Safety: panel `panel` owns columns `panel * 16 ..` of every output
                    // row, which no other panel writes; the rows are inside `out` (checked
                    // above), which outlives the loop.
                    unsafe {
                        let dst = out_ptr.get().add((at + r) * n + panel * ROWS);
                        std::ptr::copy_nonoverlapping(row.as_ptr(), dst, ROWS);
                    }
                }
            }
        });
    }

    /// One panel of 16 weight rows times one tile of 16 activation rows, into
    /// `out[activation row * 16 + weight row]`.
    ///
    /// # Safety
    /// The CPU has AMX-INT8 and AVX-512 ([`available`]).
    unsafe fn panel_times_tile(&self, panel: usize, t: &Q8Tile, out: &mut [f32; ROWS * ROWS]) {
        assert!(t.rows == ROWS && panel < self.rows / ROWS);
        assert!(t.qs.len() >= self.blocks * self.block_len * ROWS);
        let p = &self.panels[panel];
        assert!(p.tiles.len() == self.blocks * self.block_len * ROWS);
        // Every scale the kernels read (16 at a time, by raw pointers) is there.
        let supers = self.blocks * self.block_len / QK_K;
        match &p.scales {
            Scales::Blocks { d, m } => {
                assert!(d.len() == self.blocks * ROWS && (m.is_empty() || m.len() == d.len()))
            }
            Scales::KQuant {
                sc,
                d,
                dmin,
                min_pairs,
            } => assert!(
                sc.len() == self.blocks * ROWS
                    && d.len() == supers * ROWS
                    && (min_pairs.is_empty()
                        || (dmin.len() == supers * ROWS && min_pairs.len() == supers * 4 * ROWS))
            ),
        }
        match &p.scales {
            Scales::Blocks { d, m } => self.panel_blocks(&p.tiles, t, d, m, out),
            Scales::KQuant {
                sc,
                d,
                dmin,
                min_pairs,
            } => self.panel_k_quant(&p.tiles, t, sc, (d, dmin, min_pairs), out),
        }
    }

    /// The 32-value formats: each entry, for every block in order,
    /// `acc = fma(sum, d_w * d_a, acc)`, then `acc = fma(m_w, s_a, acc)` for the formats
    /// with a minimum.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq")]
    unsafe fn panel_blocks(
        &self,
        tiles: &[u8],
        t: &Q8Tile,
        d: &[f32],
        m: &[f32],
        out: &mut [f32; ROWS * ROWS],
    ) {
        assert!(t.d.len() >= self.blocks * ROWS);
        assert!(m.is_empty() || t.s.len() >= self.blocks * ROWS);
        let config = TileConfig::new(self.block_len);
        let mut sums = Sums([0; ROWS * ROWS]);
        let mut acc = [_mm512_setzero_ps(); ROWS];
        asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
        for b in 0..self.blocks {
            self.tile_product(tiles, b, t, &mut sums);
            let at = b * ROWS;
            let dw = _mm512_loadu_ps(d.as_ptr().add(at));
            for (r, acc) in acc.iter_mut().enumerate() {
                let sum = _mm512_load_si512(sums.0.as_ptr().add(r * ROWS).cast());
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(t.d[b * ROWS + r]));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), dd, *acc);
            }
            if !m.is_empty() {
                let mw = _mm512_loadu_ps(m.as_ptr().add(at));
                for (r, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(t.s[b * ROWS + r]), *acc);
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(r * ROWS), *acc);
        }
    }

    /// The k-quants: per super-block, `sum = Σ sc_j · sum_j` over its sub-blocks in f32
    /// (`fma`, in order), and (with minimums) `msum = Σ m_j · a_j` (`a_j` the activations'
    /// sum over sub-block `j`) in int32; then `acc = fma(sum, d_w * d_a, acc)` and
    /// `acc = fnmadd(msum, dmin_w * d_a, acc)`. Each term of `sum` is exact in f32 (under
    /// 2^23 for every k-quant); the sum itself rounds once past 2^24, where llama.cpp's
    /// int32 sum would not (`vpmulld` for an int32 sum measured slower: docs/PERFORMANCE.md).
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni")]
    unsafe fn panel_k_quant(
        &self,
        tiles: &[u8],
        t: &Q8Tile,
        sc: &[i8],
        (d, dmin, min_pairs): (&[f32], &[f32], &[i32]),
        out: &mut [f32; ROWS * ROWS],
    ) {
        let subs = QK_K / self.block_len;
        let supers = self.blocks / subs;
        let with_min = !min_pairs.is_empty();
        assert!(t.d.len() >= supers * ROWS);
        assert!(!with_min || (subs == 8 && t.sums32.len() >= supers * ROWS * 8));
        let config = TileConfig::new(self.block_len);
        let mut sums = Sums([0; ROWS * ROWS]);
        let mut acc = [_mm512_setzero_ps(); ROWS];
        asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
        for s in 0..supers {
            let mut scaled = [_mm512_setzero_ps(); ROWS];
            for j in 0..subs {
                let b = s * subs + j;
                self.tile_product(tiles, b, t, &mut sums);
                let at = b * ROWS;
                let scale = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    sc.as_ptr().add(at).cast(),
                )));
                for (r, scaled) in scaled.iter_mut().enumerate() {
                    let sum = _mm512_load_si512(sums.0.as_ptr().add(r * ROWS).cast());
                    *scaled = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, *scaled);
                }
            }
            let at = s * ROWS;
            let dw = _mm512_loadu_ps(d.as_ptr().add(at));
            for (r, acc) in acc.iter_mut().enumerate() {
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(t.d[s * ROWS + r]));
                *acc = _mm512_fmadd_ps(scaled[r], dd, *acc);
            }
            if with_min {
                let dminw = _mm512_loadu_ps(dmin.as_ptr().add(at));
                let pairs: [__m512i; 4] = std::array::from_fn(|pair| {
                    _mm512_loadu_si512(min_pairs.as_ptr().add((s * 4 + pair) * ROWS).cast())
                });
                for (r, acc) in acc.iter_mut().enumerate() {
                    // The activation sums of sub-blocks 2p and 2p + 1, side by side.
                    let a = t.sums32.as_ptr().add((s * ROWS + r) * 8).cast::<i32>();
                    let mut msum = _mm512_setzero_si512();
                    for (pair, mins) in pairs.iter().enumerate() {
                        let a = _mm512_set1_epi32(a.add(pair).read_unaligned());
                        msum = _mm512_dpwssd_epi32(msum, *mins, a);
                    }
                    let dm = _mm512_mul_ps(dminw, _mm512_set1_ps(t.d[s * ROWS + r]));
                    *acc = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum), dm, *acc);
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(r * ROWS), *acc);
        }
    }

    /// Block `b` of a panel's `tiles` times the tile's activations of the same values, into
    /// `sums` (16 × 16 int32), with the tile configuration of [`TileConfig::new`] loaded.
    /// A block's activations are the 32-value chunk it lies in (or half of it): 16 rows
    /// `QK` bytes apart in the tile. (Two products in flight at once, on two sets of
    /// tiles, measured no faster: the scaling that follows each is what takes the time.)
    #[inline(always)]
    unsafe fn tile_product(&self, tiles: &[u8], b: usize, t: &Q8Tile, sums: &mut Sums) {
        let first = b * self.block_len;
        let a = t.qs.as_ptr().add((first / QK) * ROWS * QK + first % QK);
        let w = tiles.as_ptr().add(b * ROWS * self.block_len);
        let c = sums.0.as_mut_ptr();
        // tmm0: the activations (signed); tmm1: the weights; tmm2: their 16 × 16 sums.
        // The same steps but for the product: unsigned weights take `tdpbsud` (signed ×
        // unsigned), signed ones `tdpbssd`.
        macro_rules! block_product {
            ($product:literal) => {
                asm!(
                    "tilezero tmm2",
                    "tileloadd tmm0, [{a} + {a_stride} * 1]",
                    "tileloadd tmm1, [{w} + {w_stride} * 1]",
                    $product,
                    "tilestored [{c} + {c_stride} * 1], tmm2",
                    a = in(reg) a, a_stride = in(reg) QK,
                    w = in(reg) w, w_stride = in(reg) B_ROW_BYTES,
                    c = in(reg) c, c_stride = in(reg) C_ROW_BYTES,
                    options(nostack),
                )
            };
        }
        if self.unsigned {
            block_product!("tdpbsud tmm2, tmm0, tmm1");
        } else {
            block_product!("tdpbssd tmm2, tmm0, tmm1");
        }
    }
}

/// A C tile stored: 16 rows of 16 int32, aligned for AVX-512 loads.
#[repr(C, align(64))]
struct Sums([i32; ROWS * ROWS]);

/// `ldtilecfg`'s 64 bytes (palette 1) for blocks of `block_len` values: tmm0 16 rows ×
/// `block_len` bytes (a block of activations), tmm1 `block_len / 4` rows × 64 bytes (a
/// block of 16 weight rows, four values per row side by side), tmm2 16 rows × 64 bytes
/// (16 × 16 int32).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new(block_len: usize) -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut tile = |i: usize, rows: usize, bytes: usize| {
            c[16 + 2 * i..][..2].copy_from_slice(&(bytes as u16).to_le_bytes());
            c[48 + i] = rows as u8;
        };
        tile(0, ROWS, block_len);
        tile(1, block_len / 4, B_ROW_BYTES);
        tile(2, ROWS, C_ROW_BYTES);
        TileConfig(c)
    }
}

#[cfg(test)]
mod tests {
    use super::super::sample::{random_blocks, random_f32, FORMATS};
    use super::*;

    impl Packed {
        /// What [`Packed::panel_times_tile`] computes, in plain Rust from the repacked
        /// tiles (read as `tdpbssd`/`tdpbsud` read them) and the same f32 steps in the same
        /// order: so the repacking is checked on any CPU, and the tiles against it bit for
        /// bit where there are tiles.
        fn panel_times_tile_in_rust(&self, panel: usize, t: &Q8Tile) -> [f32; ROWS * ROWS] {
            let len = self.block_len;
            // Block `b`'s integer sum of activation row `r` and weight row `n`.
            let sum = |b: usize, r: usize, n: usize| -> i32 {
                let tile = &self.panels[panel].tiles[b * ROWS * len..][..ROWS * len];
                let first = b * len;
                let a = &t.qs[((first / QK) * ROWS + r) * QK + first % QK..][..len];
                (0..len)
                    .map(|k| {
                        let w = tile[(k / 4) * B_ROW_BYTES + n * 4 + k % 4];
                        let w = if self.unsigned {
                            w as i32
                        } else {
                            w as i8 as i32
                        };
                        a[k] as i32 * w
                    })
                    .sum()
            };
            let mut out = [0f32; ROWS * ROWS];
            for r in 0..ROWS {
                for n in 0..ROWS {
                    let acc = &mut out[r * ROWS + n];
                    match &self.panels[panel].scales {
                        Scales::Blocks { d, m } => {
                            for b in 0..self.blocks {
                                let at = b * ROWS + n;
                                let dd = d[at] * t.d[b * ROWS + r];
                                *acc = (sum(b, r, n) as f32).mul_add(dd, *acc);
                                if !m.is_empty() {
                                    *acc = m[at].mul_add(t.s[b * ROWS + r], *acc);
                                }
                            }
                        }
                        Scales::KQuant {
                            sc,
                            d,
                            dmin,
                            min_pairs,
                        } => {
                            let subs = QK_K / len;
                            let supers = self.blocks / subs;
                            for s in 0..supers {
                                let mut scaled = 0f32;
                                for j in 0..subs {
                                    let at = (s * subs + j) * ROWS + n;
                                    let sum = sum(s * subs + j, r, n) as f32;
                                    scaled = sum.mul_add(f32::from(sc[at]), scaled);
                                }
                                let at = s * ROWS + n;
                                let da = t.d[s * ROWS + r];
                                *acc = scaled.mul_add(d[at] * da, *acc);
                                if !min_pairs.is_empty() {
                                    let msum: i32 = (0..8)
                                        .map(|j| {
                                            let pair = min_pairs[(s * 4 + j / 2) * ROWS + n];
                                            let m = (pair >> (16 * (j % 2))) as i16;
                                            let a = t.sums32[(s * ROWS + r) * 8 + j];
                                            i32::from(m) * i32::from(a)
                                        })
                                        .sum();
                                    *acc = (-(msum as f32)).mul_add(dmin[at] * da, *acc);
                                }
                            }
                        }
                    }
                }
            }
            out
        }
    }

    /// The repacked weights, multiplied as the tiles multiply them, give the engine's
    /// products up to the order of the f32 steps (on any CPU); where the CPU has tiles,
    /// they give exactly that, bit for bit.
    #[test]
    fn repacked_weights_multiply_as_the_engines_and_the_tiles_as_the_rust() {
        for format in FORMATS {
            let (rows, cols, m) = (32, 512, 16);
            let data = random_blocks(format, rows, cols, 7);
            let w = QuantMatrix::from_bytes(format, rows, cols, data).unwrap();
            let xs = random_f32(m * cols, 8);
            let plain = w.products(&xs, &[m], true).unwrap();
            let acts = super::super::Q8Row::quantize_rows(&xs, cols, format.activation(), true);
            let tile = Q8Tile::new(&acts, ROWS);
            let packed = Packed::new(&w);
            let scale = plain.iter().fold(0f32, |a, v| a.max(v.abs()));
            for panel in 0..rows / ROWS {
                let rust = packed.panel_times_tile_in_rust(panel, &tile);
                for r in 0..m {
                    for n in 0..ROWS {
                        let (got, want) = (rust[r * ROWS + n], plain[r * rows + panel * ROWS + n]);
                        assert!(
                            (got - want).abs() <= scale * 1e-5,
                            "{format:?} row {r}, weight row {}: {got} against {want}",
                            panel * ROWS + n
                        );
                    }
                }
                if available() {
                    let mut tiles = [0f32; ROWS * ROWS];
                    // Safety: the CPU has AMX-INT8 and AVX-512 (`available()`).
                    unsafe { packed.panel_times_tile(panel, &tile, &mut tiles) };
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&tiles), bits(&rust), "{format:?} panel {panel}");
                }
            }
        }
    }

    /// The engine's products with AMX: rows of products of at least [`MIN_ROWS`] rows are
    /// the other kernels' up to the order of their f32 steps, and do not depend on their
    /// neighbours (the same row alone in a product of 8, or among others, gives the same
    /// bits); shorter products are the other kernels' bit for bit.
    #[test]
    fn amx_products_are_the_engines_up_to_rounding_and_do_not_depend_on_the_tile() {
        if !available() {
            eprintln!("skipped: this CPU (or OS) offers no AMX-INT8 tiles");
            return;
        }
        for format in FORMATS {
            let (rows, cols) = (48, 512);
            let data = random_blocks(format, rows, cols, 5);
            let w = QuantMatrix::from_bytes(format, rows, cols, data).unwrap();
            // A batch of a 1-row, a 19-row and an 8-row product.
            let segments = [1, 19, 8];
            let m: usize = segments.iter().sum();
            let xs = random_f32(m * cols, 6);
            let plain = w.products(&xs, &segments, true).unwrap();
            let got = w.products_on_amx(&xs, &segments).unwrap();
            assert_eq!(
                got[..rows],
                plain[..rows],
                "{format:?}: a single row is untouched"
            );
            let scale = plain.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (i, (g, p)) in got.iter().zip(&plain).enumerate() {
                assert!(
                    (g - p).abs() <= scale * 1e-5,
                    "{format:?} [{i}]: {g} against {p}"
                );
            }
            assert_ne!(got, plain, "{format:?}: the tiles' f32 order is their own");
            // The 8-row product's rows alone, and the last row of the 19 moved into a
            // product of 8 with others: the same bits.
            let last8 = w.products_on_amx(&xs[20 * cols..], &[8]).unwrap();
            assert_eq!(last8, got[20 * rows..]);
            let mut moved = xs[20 * cols..].to_vec();
            moved[..cols].copy_from_slice(&xs[19 * cols..20 * cols]);
            let again = w.products_on_amx(&moved, &[8]).unwrap();
            assert_eq!(again[..rows], got[19 * rows..20 * rows], "{format:?}");
        }
    }
}
