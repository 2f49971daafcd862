//! Reading the golden files written by scripts/golden.py (safetensors, any dtype -> f32/i64).
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::Path;

pub struct Golden {
    pub f32s: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    pub i64s: BTreeMap<String, (Vec<usize>, Vec<i64>)>,
}

fn to_f32(v: &TensorView) -> Vec<f32> {
    let b = v.data();
    match v.dtype() {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        d => panic!("unexpected dtype {d:?}"),
    }
}

impl Golden {
    pub fn load(path: &Path) -> Golden {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut g = Golden {
            f32s: BTreeMap::new(),
            i64s: BTreeMap::new(),
        };
        for (name, v) in st.tensors() {
            let shape = v.shape().to_vec();
            match v.dtype() {
                Dtype::I64 => {
                    let d = v
                        .data()
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    g.i64s.insert(name, (shape, d));
                }
                _ => {
                    g.f32s.insert(name, (shape, to_f32(&v)));
                }
            }
        }
        g
    }
    pub fn f(&self, name: &str) -> &[f32] {
        &self
            .f32s
            .get(name)
            .unwrap_or_else(|| panic!("golden tensor {name} missing"))
            .1
    }
    pub fn shape(&self, name: &str) -> &[usize] {
        if let Some(t) = self.f32s.get(name) {
            return &t.0;
        }
        &self
            .i64s
            .get(name)
            .unwrap_or_else(|| panic!("golden tensor {name} missing"))
            .0
    }
    pub fn i(&self, name: &str) -> Vec<i32> {
        self.i64s
            .get(name)
            .unwrap_or_else(|| panic!("golden tensor {name} missing"))
            .1
            .iter()
            .map(|&x| x as i32)
            .collect()
    }
}
