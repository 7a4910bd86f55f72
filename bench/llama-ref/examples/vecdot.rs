//! Calls llama.cpp's own CPU dot product for one weight row and one activation row:
//! vecdot TYPE_ID WEIGHT_ROW.bin ACT_ROW.bin (f32). Prints the result with 9 digits.
use llama_cpp_sys_2 as sys;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let ty: u32 = a[1].parse().unwrap();
    let w = std::fs::read(&a[2]).unwrap();
    let xb = std::fs::read(&a[3]).unwrap();
    let x: Vec<f32> = xb.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    unsafe {
        sys::ggml_cpu_init();
        let tr = &*sys::ggml_get_type_traits_cpu(ty as _);
        let vt = &*sys::ggml_get_type_traits_cpu(tr.vec_dot_type);
        let mut q = vec![0u8; x.len() * 4];
        (vt.from_float.unwrap())(x.as_ptr(), q.as_mut_ptr() as *mut _, x.len() as i64);
        let mut s = 0f32;
        (tr.vec_dot.unwrap())(x.len() as i32, &mut s, 0, w.as_ptr() as *const _, 0, q.as_ptr() as *const _, 0, 1);
        println!("{s:.9e}");
    }
}
