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

#[cfg(test)]
mod tests {
    use super::*;

    /// The header is what NumPy's format 1.0 requires: magic, version, a little-endian header
    /// length, a dict literal padded with spaces so the data starts 64-byte aligned, a newline.
    #[test]
    fn npy_header_and_data_follow_format_1_0() {
        let dir = std::env::temp_dir().join(format!("flashinfer-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.npy");
        write_f32(&path, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, -6.5]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0, "data must start 64-byte aligned");
        let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
        assert!(
            header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"),
            "{header}"
        );
        assert!(header.ends_with('\n'));
        let data = &bytes[10 + hlen..];
        assert_eq!(data.len(), 24);
        assert_eq!(f32::from_le_bytes(data[20..24].try_into().unwrap()), -6.5);
        write_i32(&path, &[4], &[0, 1, -2, 7]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
        assert!(
            header.contains("'descr': '<i4'") && header.contains("'shape': (4,)"),
            "{header}"
        );
        assert_eq!(
            i32::from_le_bytes(bytes[10 + hlen + 8..10 + hlen + 12].try_into().unwrap()),
            -2
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
