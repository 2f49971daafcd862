//! The kernel images build.rs compiled with NVRTC (cubins and PTX, embedded with
//! `include_bytes!`), and the choice of image for a device.
include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// What a device loads for one kernel file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Image {
    pub target: &'static str,
    pub bytes: &'static [u8],
    /// true: a cubin (SASS, loaded as is); false: PTX (compiled by the driver at load time).
    pub cubin: bool,
}

/// (kind, major, minor) of a target name: ("sm", 8, 0) for "sm_80", ("compute", 9, 0) for
/// "compute_90"; the last digit is the minor version.
fn parse(target: &str) -> Option<(bool, u32, u32)> {
    let (cubin, num) = if let Some(n) = target.strip_prefix("sm_") {
        (true, n)
    } else {
        (false, target.strip_prefix("compute_")?)
    };
    let num: u32 = num.trim_end_matches(|c: char| c.is_ascii_alphabetic()).parse().ok()?;
    Some((cubin, num / 10, num % 10))
}

/// The image of kernel file `module` for a device of compute capability (major, minor):
/// a cubin of the same major version and the highest minor not above the device's (SASS
/// is binary compatible within a major version: sm_80 runs on 8.6 and 8.9), else the PTX
/// of the highest compute capability not above the device's (JIT-compiled by the driver,
/// e.g. compute_90 on sm_100 and sm_120).
pub fn select(module: &str, major: u32, minor: u32) -> Option<Image> {
    select_from(IMAGES, module, major, minor)
}

pub fn select_from(
    images: &[(&'static str, &'static str, &'static [u8])], module: &str, major: u32, minor: u32,
) -> Option<Image> {
    let mut best_cubin: Option<(u32, Image)> = None;
    let mut best_ptx: Option<(u32, Image)> = None;
    for &(m, target, bytes) in images {
        if m != module {
            continue;
        }
        let Some((cubin, tmaj, tmin)) = parse(target) else {
            continue;
        };
        let img = Image { target, bytes, cubin };
        if cubin {
            if tmaj == major && tmin <= minor && best_cubin.is_none_or(|(v, _)| tmin > v) {
                best_cubin = Some((tmin, img));
            }
        } else {
            let v = tmaj * 10 + tmin;
            if v <= major * 10 + minor && best_ptx.is_none_or(|(b, _)| v > b) {
                best_ptx = Some((v, img));
            }
        }
    }
    best_cubin.or(best_ptx).map(|(_, i)| i)
}

/// The kernel files build.rs found (from the sources, so known even without NVRTC).
pub fn modules() -> impl Iterator<Item = &'static str> {
    ENTRY_POINTS.iter().map(|(m, _)| *m)
}

/// Every extern "C" entry point of every kernel file.
pub fn all_entry_points() -> impl Iterator<Item = &'static str> {
    ENTRY_POINTS.iter().flat_map(|(_, names)| names.iter().copied())
}
