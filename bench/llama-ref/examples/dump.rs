//! Dumps llama.cpp's intermediate f32 tensors (eval callback) for a token sequence into
//! a directory: one `NAME.bin` per tensor, little-endian f32 in ggml order (ne0 fastest),
//! with `NAME.shape` beside it. For locating where our engine's numbers part from
//! llama.cpp's. Usage: dump MODEL IDS_JSON OUT_DIR
use std::ffi::{c_void, CStr, CString};
use std::io::Write;

use llama_cpp_sys_2 as sys;

static mut OUT: Option<String> = None;

unsafe extern "C" fn eval(t: *mut sys::ggml_tensor, ask: bool, _: *mut c_void) -> bool {
    if ask {
        return true;
    }
    let t = &*t;
    if t.type_ != sys::GGML_TYPE_F32 {
        return true;
    }
    let name = CStr::from_ptr(t.name.as_ptr()).to_string_lossy().into_owned();
    let mut bytes = Vec::new();
    for i3 in 0..t.ne[3] as usize {
        for i2 in 0..t.ne[2] as usize {
            for i1 in 0..t.ne[1] as usize {
                for i0 in 0..t.ne[0] as usize {
                    let off = i0 * t.nb[0] + i1 * t.nb[1] + i2 * t.nb[2] + i3 * t.nb[3];
                    let v = *((t.data as *const u8).add(off) as *const f32);
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
    #[allow(static_mut_refs)]
    let dir = OUT.clone().unwrap_or_default();
    let safe = name.replace(['/', ' '], "_");
    let _ = std::fs::write(format!("{dir}/{safe}.bin"), &bytes);
    if let Ok(mut f) = std::fs::File::create(format!("{dir}/{safe}.shape")) {
        let _ = writeln!(f, "{} {} {} {}", t.ne[0], t.ne[1], t.ne[2], t.ne[3]);
    }
    true
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut ids: Vec<i32> = serde_json::from_str(&std::fs::read_to_string(&args[2]).unwrap()).unwrap();
    std::fs::create_dir_all(&args[3]).unwrap();
    unsafe {
        OUT = Some(args[3].clone());
        sys::llama_backend_init();
        let path = CString::new(args[1].clone()).unwrap();
        let model = sys::llama_model_load_from_file(path.as_ptr(), sys::llama_model_default_params());
        let mut p = sys::llama_context_default_params();
        p.n_ctx = 512;
        p.n_batch = 512;
        p.n_threads = 1;
        p.n_threads_batch = 1;
        p.flash_attn_type = 0;
        p.cb_eval = Some(eval);
        let ctx = sys::llama_init_from_model(model, p);
        let batch = sys::llama_batch_get_one(ids.as_mut_ptr(), ids.len() as i32);
        let rc = sys::llama_decode(ctx, batch);
        eprintln!("decode rc {rc}");
    }
}
