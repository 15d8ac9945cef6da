//! Minimal NumPy `.npy` (format 1.0) writer, so a benchmark's inputs and outputs can be checked
//! with any tool. Everything is written as little-endian float32 or int32.

use std::io::Write;
use std::path::Path;

fn write(path: &Path, descr: &str, shape: &[usize], data: &[u8]) -> Result<(), String> {
    let shape_txt = match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Magic (6) + version (2) + header length (2) + header, padded with spaces to a multiple of
    // 64 and ended by a newline.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat(total.div_ceil(64) * 64 - total));
    header.push('\n');
    let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = Vec::with_capacity(10 + header.len() + data.len());
    buf.extend_from_slice(b"\x93NUMPY\x01\x00");
    buf.extend_from_slice(&(header.len() as u16).to_le_bytes());
    buf.extend_from_slice(header.as_bytes());
    buf.extend_from_slice(data);
    f.write_all(&buf)
        .map_err(|e| format!("{}: {e}", path.display()))
}

pub fn write_f32(path: &Path, shape: &[usize], v: &[f32]) -> Result<(), String> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    write(path, "<f4", shape, &bytes)
}

pub fn write_i32(path: &Path, shape: &[usize], v: &[i32]) -> Result<(), String> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    write(path, "<i4", shape, &bytes)
}
