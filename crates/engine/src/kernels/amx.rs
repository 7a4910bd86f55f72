//! Prompt products on AMX int8 tiles (issue #17, item 5), for the 32-value block formats
//! (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), where the CPU has them and the node asks for them
//! (`shoal --amx`, which sets `SHOAL_AMX=1`).
//!
//! Intel's AMX (Sapphire Rapids and later) multiplies a tile of up to 16 rows × 64 bytes
//! of int8 by another in one instruction (`tdpbssd` signed × signed, `tdpbsud` signed ×
//! unsigned), into 16 × 16 int32. A product maps onto it one block at a time: A is 16
//! activation rows × 32 bytes (a [`Q8Tile`]'s block, already laid out so), B the block of
//! 16 weight rows, repacked once into AMX's layout (8 rows of 64 bytes: four consecutive
//! values of each weight row side by side), and C their 16 × 16 exact integer sums, which
//! AVX-512 scales by each pair's `d_w * d_a` into f32 accumulators (plus `m_w * s_a` for
//! the formats with a minimum), block after block.
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
//! block — 1.125 bytes per weight, 1.25 with minimums — kept beside the file's for the
//! decode kernels, made at a matrix's first long product (an LM head's only where a
//! prompt asks for every row's logits).

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::{pool, scalar, Format, OutPtr, Q8Tile, QuantMatrix, BLOCK_FORMATS, QK};

/// Weight rows per panel, activation rows per tile: AMX's 16 rows.
pub(super) const ROWS: usize = 16;
/// Products with fewer rows than this (decode, a verification's single rows, a prompt's
/// short last chunk) keep the engine's other kernels: the row count where llama.cpp's
/// Q6_K order changes too (kquant.rs) and the prefix cache's shortest reusable chunk.
pub(super) const MIN_ROWS: usize = crate::prefix_cache::MIN_CHUNK_ROWS;
/// Bytes of one block's B tile: 16 weight rows × 32 values.
const B_TILE: usize = ROWS * QK;
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
            tracing::info!("prompt products of the 32-value formats on AMX int8 tiles");
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

/// Whether products of `w` can run on the tiles: a 32-value block format, whole panels.
pub(super) fn supports(w: &QuantMatrix) -> bool {
    BLOCK_FORMATS.contains(&w.format) && w.rows.is_multiple_of(ROWS)
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

/// A matrix repacked for the tiles: per panel of 16 rows, per block, its B tile and the
/// rows' scales `d` and (Q4_1, Q5_1) minimums `m`.
pub(super) struct Packed {
    /// Whether the weights are unsigned (the formats with a minimum).
    unsigned: bool,
    rows: usize,
    blocks: usize,
    tiles: Vec<u8>,
    d: Vec<f32>,
    /// Empty for the formats without a minimum.
    m: Vec<f32>,
}

impl Packed {
    /// Repacks `w`, which [`supports`] takes.
    pub(super) fn new(w: &QuantMatrix) -> Packed {
        assert!(supports(w));
        let blocks = w.cols / QK;
        let unsigned = matches!(w.format, Format::Q4_1 | Format::Q5_1);
        let mut p = Packed {
            unsigned,
            rows: w.rows,
            blocks,
            tiles: vec![0; w.rows / ROWS * blocks * B_TILE],
            d: vec![0.0; w.rows * blocks],
            m: vec![0.0; if unsigned { w.rows * blocks } else { 0 }],
        };
        let (row_bytes, block_bytes) = (w.row_bytes(), w.format.block_bytes());
        for r in 0..w.rows {
            let (panel, n) = (r / ROWS, r % ROWS);
            for b in 0..blocks {
                let block = &w.data[r * row_bytes + b * block_bytes..][..block_bytes];
                let Some((values, d, m)) = scalar::block_values(w.format, block) else {
                    unreachable!("supports() takes only the 32-value formats")
                };
                let at = (panel * blocks + b) * ROWS + n;
                p.d[at] = d;
                if unsigned {
                    p.m[at] = m;
                }
                let tile = &mut p.tiles[(panel * blocks + b) * B_TILE..][..B_TILE];
                for (k, &v) in values.iter().enumerate() {
                    // Signed values as two's complement bytes, unsigned ones (< 32) as they are.
                    tile[(k / 4) * B_ROW_BYTES + n * 4 + k % 4] = v as u8;
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
    /// `out[activation row * 16 + weight row]`. Each entry: for every block in order,
    /// `acc = fma(sum, d_w * d_a, acc)`, then `acc = fma(m_w, s_a, acc)` for the formats
    /// with a minimum.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq")]
    unsafe fn panel_times_tile(&self, panel: usize, t: &Q8Tile, out: &mut [f32; ROWS * ROWS]) {
        assert!(t.rows == ROWS && panel < self.rows / ROWS);
        assert!(t.d.len() >= self.blocks * ROWS && t.qs.len() >= self.blocks * ROWS * QK);
        assert!(!self.unsigned || t.s.len() >= self.blocks * ROWS);
        let config = TileConfig::new();
        let mut sums = Sums([0; ROWS * ROWS]);
        let mut acc = [_mm512_setzero_ps(); ROWS];
        asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
        for b in 0..self.blocks {
            let a = t.qs.as_ptr().add(b * ROWS * QK);
            let w = self.tiles.as_ptr().add((panel * self.blocks + b) * B_TILE);
            let c = sums.0.as_mut_ptr();
            // tmm0: the activations (signed); tmm1: the weights; tmm2: their 16 × 16 sums.
            // The same steps but for the product: the unsigned nibbles of Q4_1 and Q5_1
            // take `tdpbsud` (signed × unsigned), the signed values `tdpbssd`.
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
            let at = (panel * self.blocks + b) * ROWS;
            let dw = _mm512_loadu_ps(self.d.as_ptr().add(at));
            for (r, acc) in acc.iter_mut().enumerate() {
                let sum = _mm512_cvtepi32_ps(_mm512_load_si512(c.add(r * ROWS).cast()));
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(t.d[b * ROWS + r]));
                *acc = _mm512_fmadd_ps(sum, dd, *acc);
            }
            if self.unsigned {
                let mw = _mm512_loadu_ps(self.m.as_ptr().add(at));
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
}

/// A C tile stored: 16 rows of 16 int32, aligned for AVX-512 loads.
#[repr(C, align(64))]
struct Sums([i32; ROWS * ROWS]);

/// `ldtilecfg`'s 64 bytes (palette 1): tmm0 16 rows × 32 bytes (a block of activations),
/// tmm1 8 rows × 64 bytes (a block of 16 weight rows, four values per row side by side),
/// tmm2 16 rows × 64 bytes (16 × 16 int32).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut tile = |i: usize, rows: usize, bytes: usize| {
            c[16 + 2 * i..][..2].copy_from_slice(&(bytes as u16).to_le_bytes());
            c[48 + i] = rows as u8;
        };
        tile(0, ROWS, QK);
        tile(1, QK / 4, B_ROW_BYTES);
        tile(2, ROWS, C_ROW_BYTES);
        TileConfig(c)
    }
}

#[cfg(test)]
mod tests {
    use super::super::sample::{random_blocks, random_f32};
    use super::*;

    impl Packed {
        /// What [`Packed::panel_times_tile`] computes, in plain Rust from the repacked
        /// tiles (read as `tdpbssd`/`tdpbsud` read them) and the same f32 steps in the same
        /// order: so the repacking is checked on any CPU, and the tiles against it bit for
        /// bit where there are tiles.
        fn panel_times_tile_in_rust(&self, panel: usize, t: &Q8Tile) -> [f32; ROWS * ROWS] {
            let mut out = [0f32; ROWS * ROWS];
            for b in 0..self.blocks {
                let tile = &self.tiles[(panel * self.blocks + b) * B_TILE..][..B_TILE];
                let at = (panel * self.blocks + b) * ROWS;
                for r in 0..ROWS {
                    let a = &t.qs[(b * ROWS + r) * QK..][..QK];
                    for n in 0..ROWS {
                        let sum: i32 = (0..QK)
                            .map(|k| {
                                let w = tile[(k / 4) * B_ROW_BYTES + n * 4 + k % 4];
                                let w = if self.unsigned {
                                    w as i32
                                } else {
                                    w as i8 as i32
                                };
                                a[k] as i32 * w
                            })
                            .sum();
                        let acc = &mut out[r * ROWS + n];
                        *acc = (sum as f32).mul_add(self.d[at + n] * t.d[b * ROWS + r], *acc);
                        if self.unsigned {
                            *acc = self.m[at + n].mul_add(t.s[b * ROWS + r], *acc);
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
        for format in BLOCK_FORMATS {
            let (rows, cols, m) = (32, 256, 16);
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
        for format in BLOCK_FORMATS {
            let (rows, cols) = (48, 256);
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
