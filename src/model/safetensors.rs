//! Reading and writing the safetensors format, with errors that say what is wrong with which file.
//!
//! Layout: `u64` little-endian header length `n`, `n` bytes of JSON
//! (`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {..}}`), then the
//! data section; offsets are relative to its start. The reader is strict about everything that
//! would make a view read the wrong bytes (bounds, overlaps, sizes) and lenient about gaps, which
//! do not.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use super::dtype::DType;
use crate::error::{Error, Result};

/// Largest header the reader accepts: far above any real checkpoint's, small enough to refuse
/// a corrupted length before allocating for it.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// One tensor's entry in a safetensors header, with offsets made absolute in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorEntry {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte range of the tensor's data within the file.
    pub start: usize,
    pub end: usize,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed and validated safetensors header.
#[derive(Clone, Debug)]
pub struct Header {
    pub tensors: BTreeMap<String, TensorEntry>,
    pub metadata: BTreeMap<String, String>,
}

/// Parses and validates the header of a safetensors file held in `bytes` (usually an mmap).
pub fn parse_header(bytes: &[u8], path: &Path) -> Result<Header> {
    let file_len = bytes.len() as u64;
    if file_len < 8 {
        return Err(Error::format(
            path,
            format!(
                "truncated safetensors: {file_len} bytes, too short for the 8-byte header length"
            ),
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES {
        return Err(Error::format(
            path,
            format!("safetensors header length {n} is implausibly large (corrupted file?)"),
        ));
    }
    if 8 + n > file_len {
        return Err(Error::format(
            path,
            format!(
                "safetensors header length {n} runs past the end of the file ({file_len} bytes)"
            ),
        ));
    }
    let data_start = 8 + n as usize;
    let json: Value = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| Error::format(path, format!("safetensors header is not valid JSON: {e}")))?;
    let Value::Object(obj) = json else {
        return Err(Error::format(
            path,
            "safetensors header is not a JSON object",
        ));
    };
    let data_len = bytes.len() - data_start;

    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            metadata = parse_metadata(&info, path)?;
            continue;
        }
        let (entry_dtype, shape, b, e) = parse_entry(&name, &info, path)?;
        // Checked: a product that wraps (to 0, say) would pass the size check below.
        let numel = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| {
                Error::format(path, format!("tensor `{name}`: shape {shape:?} overflows"))
            })?;
        if e < b {
            return Err(Error::format(
                path,
                format!("tensor `{name}`: data_offsets [{b}, {e}] end before they begin"),
            ));
        }
        if e > data_len {
            return Err(Error::format(
                path,
                format!(
                    "truncated or corrupted safetensors: tensor `{name}` data_offsets [{b}, {e}] \
                     run past the end of the data section ({data_len} bytes)"
                ),
            ));
        }
        let want = numel.checked_mul(entry_dtype.size()).ok_or_else(|| {
            Error::format(path, format!("tensor `{name}`: shape {shape:?} overflows"))
        })?;
        if e - b != want {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}`: data_offsets [{b}, {e}] hold {} bytes but shape {shape:?} of \
                     {} needs {want}",
                    e - b,
                    entry_dtype.safetensors_name()
                ),
            ));
        }
        tensors.insert(
            name,
            TensorEntry {
                dtype: entry_dtype,
                shape,
                start: data_start + b,
                end: data_start + e,
            },
        );
    }

    // Overlapping tensors would alias each other's bytes: refuse them.
    let mut by_start: Vec<(&String, &TensorEntry)> =
        tensors.iter().filter(|(_, t)| t.end > t.start).collect();
    by_start.sort_by_key(|(_, t)| t.start);
    for pair in by_start.windows(2) {
        let ((a, ta), (b, tb)) = (pair[0], pair[1]);
        if tb.start < ta.end {
            return Err(Error::format(
                path,
                format!(
                    "tensors `{a}` and `{b}` overlap (data_offsets [{}, {}] and [{}, {}])",
                    ta.start - data_start,
                    ta.end - data_start,
                    tb.start - data_start,
                    tb.end - data_start
                ),
            ));
        }
    }
    Ok(Header { tensors, metadata })
}

/// `(dtype, shape, begin, end)` of one header entry, offsets relative to the data section.
fn parse_entry(name: &str, info: &Value, path: &Path) -> Result<(DType, Vec<usize>, usize, usize)> {
    let bad = |what: &str| Error::format(path, format!("tensor `{name}`: {what}"));
    let obj = info
        .as_object()
        .ok_or_else(|| bad("header entry is not an object"))?;
    let dtype_name = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing `dtype`"))?;
    let dtype = DType::from_safetensors(dtype_name).ok_or_else(|| {
        bad(&format!(
            "dtype {dtype_name} is not supported (supported: F16, BF16, F32)"
        ))
    })?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing `shape`"))?
        .iter()
        .map(|d| d.as_u64().map(|x| x as usize))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("`shape` must be a list of non-negative integers"))?;
    let (begin, end) = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .and_then(|a| Some((a[0].as_u64()? as usize, a[1].as_u64()? as usize)))
        .ok_or_else(|| bad("`data_offsets` must be [begin, end]"))?;
    Ok((dtype, shape, begin, end))
}

fn parse_metadata(info: &Value, path: &Path) -> Result<BTreeMap<String, String>> {
    let obj = info
        .as_object()
        .ok_or_else(|| Error::format(path, "`__metadata__` is not an object"))?;
    obj.iter()
        .map(|(k, v)| {
            v.as_str()
                .map(|s| (k.clone(), s.to_string()))
                .ok_or_else(|| Error::format(path, format!("`__metadata__.{k}` is not a string")))
        })
        .collect()
}

/// What the writer needs to know about a tensor before its data exists.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Serialises a header for `specs` laid out contiguously in the given order. Returns the header
/// bytes (length prefix included, padded with spaces so that the data section is 8-byte aligned,
/// as the reference implementation does) and each tensor's offset within the data section.
pub fn build_header(
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
) -> (Vec<u8>, Vec<usize>) {
    build_header_aligned(specs, metadata, 8)
}

/// [`build_header`] with the JSON padded (with spaces, as the format allows) so that the data
/// starts at a multiple of `align` bytes (a power of two, at least 8).
pub fn build_header_aligned(
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
    align: usize,
) -> (Vec<u8>, Vec<usize>) {
    let mut obj = Map::new();
    if !metadata.is_empty() {
        let m: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        obj.insert("__metadata__".into(), Value::Object(m));
    }
    let mut offsets = Vec::with_capacity(specs.len());
    let mut at = 0usize;
    for s in specs {
        offsets.push(at);
        let end = at + s.nbytes();
        obj.insert(
            s.name.clone(),
            serde_json::json!({
                "dtype": s.dtype.safetensors_name(),
                "shape": s.shape,
                "data_offsets": [at, end],
            }),
        );
        at = end;
    }
    let mut json = serde_json::to_vec(&Value::Object(obj)).expect("a JSON map serialises");
    json.resize((8 + json.len()).next_multiple_of(align) - 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    (out, offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data_len));
        v
    }

    fn err(bytes: &[u8]) -> String {
        parse_header(bytes, Path::new("m.safetensors"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn written_header_parses_back() {
        let specs = vec![
            TensorSpec {
                name: "b".into(),
                dtype: DType::BF16,
                shape: vec![3],
            },
            TensorSpec {
                name: "a".into(),
                dtype: DType::F32,
                shape: vec![2, 2],
            },
        ];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let (mut bytes, offsets) = build_header(&specs, &meta);
        assert_eq!(bytes.len() % 8, 0);
        assert_eq!(offsets, [0, 6]);
        bytes.extend(std::iter::repeat_n(0u8, 22));
        let h = parse_header(&bytes, Path::new("x")).unwrap();
        assert_eq!(h.metadata, meta);
        assert_eq!(h.tensors["a"].shape, [2, 2]);
        assert_eq!(h.tensors["a"].end - h.tensors["a"].start, 16);
        assert_eq!(h.tensors["b"].dtype, DType::BF16);
    }

    #[test]
    fn corrupt_headers_are_named() {
        assert!(err(&[1, 2, 3]).contains("truncated"));
        let mut long = 1000u64.to_le_bytes().to_vec();
        long.extend_from_slice(b"{}");
        assert!(err(&long).contains("runs past the end"));
        let e = err(&file_with(
            r#"{"w":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
            8,
        ));
        assert!(e.contains("`w`") && e.contains("I64"), "{e}");
        let e = err(&file_with(
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            8,
        ));
        assert!(e.contains("truncated") && e.contains("`w`"), "{e}");
        let e = err(&file_with(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
        ));
        assert!(e.contains("overlap"), "{e}");
        let e = err(&file_with(
            r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
        ));
        assert!(e.contains("needs 12"), "{e}");
        assert!(err(&file_with("not json", 0)).contains("not valid JSON"));
    }
}
