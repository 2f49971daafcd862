//! One tensor-core product on the device (kernels/mma_probe.cu), for the tests that ask
//! what the hardware does with 16-bit inputs. CPU twin: cpu/mma_probe.rs.
use super::{check, Cuda};
use crate::backend::Precision;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// c [16 x 8] = a [16 x 16] b [16 x 8] (row-major, bit patterns of `p`), one mma.sync;
/// waits for the result.
pub fn mma_probe(cu: &Cuda, a: &[u16], b: &[u16], p: Precision) -> Vec<f32> {
    assert!(a.len() >= 256 && b.len() >= 128, "mma_probe: a 16 x 16, b 16 x 8");
    let fp16: i32 = match p {
        Precision::Fp16 => 1,
        Precision::Bf16 => 0,
        Precision::Fp32 => panic!("mma_probe: 16-bit inputs only"),
    };
    // from the backend's allocator (memory.rs), as every device buffer
    let da = check(cu.copy_of(&a[..256]), "mma_probe upload");
    let db = check(cu.copy_of(&b[..128]), "mma_probe upload");
    let mut dc = check(cu.zeros::<f32>(128), "mma_probe allocation");
    let mut l = cu.stream.launch_builder(cu.func("mma_probe_f32"));
    l.arg(&mut *dc).arg(&*da).arg(&*db).arg(&fp16);
    // SAFETY: (float* c, const unsigned short* a, const unsigned short* b, int fp16); one
    // warp reads a[..256] and b[..128] and writes c[..128], the sizes allocated above.
    check(
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            })
        },
        "mma_probe_f32",
    );
    let c = check(cu.stream.clone_dtoh(&*dc), "mma_probe download");
    cu.synchronize();
    c
}
