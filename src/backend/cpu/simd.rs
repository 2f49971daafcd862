//! Wide-vector builds of the CPU backend's element-wise loops, picked at run time, and
//! the scalar math they share (exp, erf, lane-wise sum and max).
//!
//! A default Rust build targets baseline x86-64 (SSE2), so the binary runs on any x86-64
//! CPU, but then its loops use 4-wide vectors at best. [`multiversion!`] compiles a loop
//! three times (baseline, AVX2, AVX-512) and calls the widest the CPU has. The code is
//! the same plain Rust in every build: mul and add are never contracted into FMA, and
//! float sums keep their written order, so every build gives bit-identical results (a
//! run on an AVX-512 machine equals one on an SSE2 machine, and any thread count).
//!
//! [`exp`] and [`erf`] replace libm's scalar calls in the hot loops: written with
//! mul/add/compare/bit casts only, they vectorise. exp is within 1 ulp of the correctly
//! rounded value, erf within 4.2e-7 absolute (tests below).
use std::sync::OnceLock;

/// The widest vector extension this CPU supports, as the kernels use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Baseline,
    Avx2,
    Avx512,
}

impl Level {
    /// The build of the element-wise kernels in words (`devices`, the bench's JSON).
    pub fn name(self) -> &'static str {
        match self {
            Level::Baseline => "baseline",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

/// Detected once per process. `DEEPCUT_SIMD=baseline|avx2` caps it (to compare builds).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = std::env::var("DEEPCUT_SIMD").unwrap_or_default();
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl");
            match cap.as_str() {
                "baseline" => Level::Baseline,
                "avx2" if avx2 => Level::Avx2,
                _ if avx512 => Level::Avx512,
                _ if avx2 => Level::Avx2,
                _ => Level::Baseline,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = cap;
            Level::Baseline
        }
    })
}

/// Defines a function whose body is compiled for baseline, AVX2 and AVX-512 and runs in
/// the widest build the CPU supports ([`level`]). The body must only call functions
/// marked `#[inline(always)]` (they are then compiled with the wider target too); no
/// generics. Call it from inside a rayon task, not around one: a closure handed to
/// rayon is compiled on its own.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident : $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi1,bmi2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn wide512($($a: $t),*) $(-> $r)? {
                    body($($a),*)
                }
                #[target_feature(enable = "avx2,fma,bmi1,bmi2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn wide256($($a: $t),*) $(-> $r)? {
                    body($($a),*)
                }
                match $crate::backend::cpu::simd::level() {
                    // SAFETY: level() reported these features on this CPU.
                    $crate::backend::cpu::simd::Level::Avx512 => return unsafe { wide512($($a),*) },
                    // SAFETY: as above.
                    $crate::backend::cpu::simd::Level::Avx2 => return unsafe { wide256($($a),*) },
                    $crate::backend::cpu::simd::Level::Baseline => {}
                }
            }
            body($($a),*)
        }
    };
}
pub(crate) use multiversion;

/// Partial sums and maxima are kept in this many lanes (one AVX-512 register of f32).
pub const LANES: usize = 16;

/// sum of x in a fixed order: LANES interleaved partial sums (element i goes to lane
/// i % LANES), then the lanes added 0, 1, ... The order depends only on the length, so the
/// result is the same in every build and thread count; it vectorises where a left-to-right
/// sum cannot (each add would wait for the previous one).
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for ch in &mut chunks {
        for (a, v) in acc.iter_mut().zip(ch) {
            *a += v;
        }
    }
    for (a, v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += v;
    }
    let mut s = 0f32;
    for a in acc {
        s += a;
    }
    s
}

/// max of x (-inf for an empty slice); exact, so any order gives the same value.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for ch in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(ch) {
            *a = if v > *a { v } else { *a };
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a = if v > *a { v } else { *a };
    }
    let mut m = f32::NEG_INFINITY;
    for a in acc {
        m = if a > m { a } else { m };
    }
    m
}

/// e^x: 0 below -87.34 (where e^x stops being a normal f32), +inf above 88.72, NaN for
/// NaN. Cephes' expf: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-7 polynomial,
/// 2^n from exponent bits (as two factors, so n = 128 and n = -126 stay exact). Within
/// 1 ulp of the correctly rounded value (test below).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.722_83;
    let xc = x.clamp(LO, HI);
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let r2 = r * r;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r2 + r + 1.0;
    // n in [-126, 128]: 2^n = 2^n1 2^n2 with both halves in [-63, 64] (exact products).
    // n as an integer from the bits of `shifted` (its low mantissa bits hold n + 2^22):
    // `n as i32` would be a saturating, NaN-checked cast that does not vectorise.
    let ni = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let n1 = ni >> 1;
    let n2 = ni - n1;
    let t1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let t2 = f32::from_bits(((n2 + 127) as u32) << 23);
    let y = er * t1 * t2;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// erf(x) as a rational function of x on [-4, 4] (odd numerator of degree 13, even
/// denominator of degree 8: the single-precision approximation of Eigen, XLA and TVM),
/// x clamped to [-4, 4]. Within 4.2e-7 absolute of erf (7 ulp, the worst where erf is
/// within 1e-6 of +-1; test below), so GELU changes by under 3e-7 relative.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_6e-3;
    p = p * x2 + -1.609_603_3e-2;
    let p = p * x;
    let mut q = -1.456_607_2e-5f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329_4e-3;
    q = q * x2 + -1.426_474e-2;
    p / q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulp_diff(a: f32, b: f32) -> u32 {
        let (a, b) = (a.to_bits() as i64, b.to_bits() as i64);
        (a - b).unsigned_abs() as u32
    }

    #[test]
    fn exp_within_one_ulp_of_libm() {
        let mut worst = 0;
        let mut x = -87.3f32;
        while x < 88.72 {
            let (got, want) = (exp(x), (x as f64).exp() as f32);
            worst = worst.max(ulp_diff(got, want));
            x += 1e-3;
        }
        eprintln!("exp: {worst} ulp");
        assert!(worst <= 1, "exp: {worst} ulp");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn erf_close_to_libm() {
        let (mut worst_abs, mut worst_ulp) = (0f32, 0);
        let mut x = -6f32;
        while x < 6.0 {
            let (got, want) = (erf(x), libm::erf(x as f64) as f32);
            worst_abs = worst_abs.max((got - want).abs());
            if want.abs() > 1e-3 {
                worst_ulp = worst_ulp.max(ulp_diff(got, want));
            }
            x += 1e-3;
        }
        eprintln!("erf: {worst_abs:.2e} abs, {worst_ulp} ulp");
        assert!(
            worst_abs <= 4.5e-7 && worst_ulp <= 7,
            "erf: {worst_abs:.2e} abs, {worst_ulp} ulp"
        );
        assert_eq!(erf(0.0), 0.0);
        assert!((erf(10.0) - 1.0).abs() < 2e-7 && (erf(-10.0) + 1.0).abs() < 2e-7);
    }

    #[test]
    fn sum_and_max_in_lanes() {
        let x: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        for n in [0, 1, 15, 16, 17, 100, 1000] {
            let exact: f64 = x[..n].iter().map(|&v| v as f64).sum();
            assert_eq!(sum(&x[..n]) as f64, exact, "n = {n}");
            let m = x[..n].iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&x[..n]), m);
        }
    }
}
