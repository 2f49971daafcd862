//! The `deepcut-fast` command line.
pub fn main() -> i32 {
    0
}
