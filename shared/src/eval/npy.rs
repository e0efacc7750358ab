//! NumPy `.npy` files (format 1.0) of little-endian `f32`: what `amity embed` writes, so
//! features load with `numpy.load` and nothing else.

use std::path::Path;

/// Errors reading `.npy` files; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not an `.npy` of `f32` this reader understands.
    #[error("{path} is not a little-endian float32 .npy file: {reason}")]
    Format {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// The bytes of an `.npy` file holding `values` in C order with `shape`.
pub fn to_bytes(shape: &[usize], values: &[f32]) -> Vec<u8> {
    assert_eq!(
        shape.iter().product::<usize>(),
        values.len(),
        "shape and values agree"
    );
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * values.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes an `.npy` file.
pub fn write(path: &Path, shape: &[usize], values: &[f32]) -> Result<(), NpyError> {
    std::fs::write(path, to_bytes(shape, values)).map_err(|source| NpyError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Reads an `.npy` file of `<f4` in C order: shape and values.
pub fn read(path: &Path) -> Result<(Vec<usize>, Vec<f32>), NpyError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| NpyError::Io {
        path: name.clone(),
        source,
    })?;
    from_bytes(&bytes).map_err(|reason| NpyError::Format { path: name, reason })
}

fn from_bytes(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>), String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" || bytes[6] != 1 {
        return Err("no .npy 1.x magic".into());
    }
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = bytes
        .get(10..10 + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("truncated header")?;
    if !header.contains("'descr': '<f4'") || !header.contains("'fortran_order': False") {
        return Err(format!("unsupported header {header:?}"));
    }
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or("no shape")?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| format!("shape {shape_text:?}")))
        .collect::<Result<_, _>>()?;
    let data = &bytes[10 + hlen..];
    let n: usize = shape.iter().product();
    if data.len() != 4 * n {
        return Err(format!("{} data bytes for shape {shape:?}", data.len()));
    }
    let values = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((shape, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_aligns_the_header() {
        for shape in [vec![3usize], vec![2, 5], vec![2, 3, 4]] {
            let n = shape.iter().product::<usize>();
            let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 1.0).collect();
            let bytes = to_bytes(&shape, &values);
            let data_start = bytes.len() - 4 * n;
            assert_eq!(data_start % 64, 0);
            assert_eq!(from_bytes(&bytes).unwrap(), (shape, values));
        }
        assert!(from_bytes(b"\x93NUMPY\x01\x00\xff\xff").is_err());
    }
}
