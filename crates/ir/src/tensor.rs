//! Tensor bytes that stay borrowed from the checkpoint until a writer streams them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use memmap2::Mmap;

use crate::DType;

/// Bytes converted per step when a [`TensorData::Converted`] is written (256 KiB out).
const CONVERT_CHUNK: usize = 256 * 1024;

/// A read-only file mapped into memory, shared by every tensor that borrows from it.
pub struct MappedFile {
    path: PathBuf,
    map: Mmap,
    /// Handle used for in-kernel copies (`copy_file_range`), which move a byte range to the
    /// output without it ever being paged into this process.
    file: Mutex<File>,
}

impl MappedFile {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        // SAFETY: the map is read-only and private to this process; a checkpoint that another
        // process truncates while ferry runs is outside what ferry can defend against (the
        // same contract as every mmap-based safetensors reader).
        #[allow(unsafe_code)]
        let map = unsafe { Mmap::map(&file)? };
        Ok(Self {
            path: path.to_path_buf(),
            map,
            file: Mutex::new(file),
        })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Copies `len` bytes starting at `offset` to `out`. When `out` is a file (or a
    /// `BufWriter` over one) the standard library turns this into an in-kernel copy, so the
    /// bytes never pass through (or count against) this process's memory.
    pub fn copy_range_to<W: Write + ?Sized>(
        &self,
        offset: u64,
        len: u64,
        out: &mut W,
    ) -> io::Result<()> {
        let file = self
            .file
            .lock()
            .map_err(|_| io::Error::other("mapped file lock poisoned"))?;
        let mut handle: &File = &file;
        handle.seek(SeekFrom::Start(offset))?;
        let mut take = handle.take(len);
        let copied = io::copy(&mut take, out)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: expected {len} bytes at offset {offset}, file ended after {copied}",
                    self.path.display()
                ),
            ));
        }
        Ok(())
    }
}

impl MappedFile {
    /// Reads `len` bytes from `offset` in chunks of at most `chunk` bytes into a reused
    /// buffer, handing each to `f`. Positional reads (`pread`) keep the bytes out of this
    /// process's resident memory, unlike touching the map, so memory stays flat however
    /// large the tensor is.
    pub fn for_each_chunk(
        &self,
        offset: u64,
        len: u64,
        chunk: usize,
        mut f: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        use std::sync::mpsc::sync_channel;
        let guard = self
            .file
            .lock()
            .map_err(|_| io::Error::other("mapped file lock poisoned"))?;
        let file: &File = &guard;
        let chunk = chunk.max(1);
        let piece = |done: u64| usize::try_from(len - done).unwrap_or(usize::MAX).min(chunk);
        if len <= 2 * chunk as u64 {
            let mut buf = vec![0u8; piece(0)];
            let mut done = 0u64;
            while done < len {
                let n = piece(done);
                file.read_exact_at(&mut buf[..n], offset + done)?;
                f(&buf[..n])?;
                done += n as u64;
            }
            return Ok(());
        }
        // Large tensors: a reader thread fills buffers while `f` consumes the previous
        // ones, so the copy out of the page cache overlaps the consumer's own work.
        std::thread::scope(|s| {
            let (full_tx, full_rx) = sync_channel::<io::Result<(Vec<u8>, usize)>>(3);
            let (free_tx, free_rx) = sync_channel::<Vec<u8>>(4);
            for _ in 0..4 {
                let _ = free_tx.send(vec![0u8; chunk]);
            }
            s.spawn(move || {
                let mut done = 0u64;
                while done < len {
                    let Ok(mut buf) = free_rx.recv() else { return };
                    let n = piece(done);
                    let r = file
                        .read_exact_at(&mut buf[..n], offset + done)
                        .map(|()| (buf, n));
                    let failed = r.is_err();
                    if full_tx.send(r).is_err() || failed {
                        return;
                    }
                    done += n as u64;
                }
            });
            let mut done = 0u64;
            while done < len {
                let (buf, n) = full_rx
                    .recv()
                    .map_err(|_| io::Error::other("tensor reader stopped"))??;
                f(&buf[..n])?;
                done += n as u64;
                let _ = free_tx.send(buf);
            }
            Ok(())
        })
    }
}

impl fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedFile")
            .field("path", &self.path)
            .field("len", &self.map.len())
            .finish()
    }
}

/// Reads a tensor's bytes on demand (used for containers that cannot be mapped directly).
pub type LazyRead = Arc<dyn Fn() -> io::Result<Vec<u8>> + Send + Sync>;

/// The bytes of a tensor: borrowed from a mapped file, owned, or read on demand.
///
/// Cloning is cheap (reference counted); no variant copies weight bytes until asked.
#[derive(Clone)]
pub enum TensorData {
    /// A byte range of a mapped checkpoint file (zero copy).
    Mapped {
        /// The mapped file.
        file: Arc<MappedFile>,
        /// Offset of the first byte within the file.
        offset: u64,
        /// Number of bytes.
        len: u64,
    },
    /// Bytes held in memory (small constants, computed tensors).
    Owned(Arc<[u8]>),
    /// Bytes produced by a reader when needed, e.g. a tensor inside a `pytorch_model.bin`.
    Lazy {
        /// Number of bytes the reader returns.
        len: u64,
        /// The reader.
        read: LazyRead,
    },
    /// `source`'s elements converted from `from` to `to` as they are streamed, chunk by
    /// chunk (a half-precision checkpoint exported as float32): the converted tensor is
    /// never held in memory whole, except when [`TensorData::bytes`] is asked for it.
    /// Supported conversions: see [`TensorData::converted`].
    Converted {
        /// The stored bytes, in `from`.
        source: Arc<TensorData>,
        /// The element type of `source`.
        from: DType,
        /// The element type produced.
        to: DType,
    },
}

/// Whether [`TensorData::converted`] can convert `from` to `to`.
pub fn can_convert(from: DType, to: DType) -> bool {
    from == to || (matches!(from, DType::F16 | DType::BF16) && to == DType::F32)
}

/// Appends the conversion of `src` (whole `from` elements) to `out`.
fn convert_into(from: DType, to: DType, src: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    if !src.len().is_multiple_of(from.size()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "tensor length is not a multiple of {}-byte {from} elements",
                from.size()
            ),
        ));
    }
    match (from, to) {
        (a, b) if a == b => out.extend_from_slice(src),
        (DType::F16, DType::F32) => {
            for c in src.chunks_exact(2) {
                let v = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        (DType::BF16, DType::F32) => {
            for c in src.chunks_exact(2) {
                let v = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        (a, b) => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("cannot convert tensor data from {a} to {b}"),
            ));
        }
    }
    Ok(())
}

impl TensorData {
    /// Owned bytes.
    pub fn owned(bytes: Vec<u8>) -> Self {
        TensorData::Owned(bytes.into())
    }

    /// Owned little-endian f32 values.
    pub fn from_f32(values: &[f32]) -> Self {
        Self::owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// Owned little-endian i64 values.
    pub fn from_i64(values: &[i64]) -> Self {
        Self::owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// Number of bytes.
    pub fn len(&self) -> u64 {
        match self {
            TensorData::Mapped { len, .. } | TensorData::Lazy { len, .. } => *len,
            TensorData::Owned(b) => b.len() as u64,
            TensorData::Converted { source, from, to } => {
                source.len() / from.size() as u64 * to.size() as u64
            }
        }
    }

    /// `source` (elements of `from`) converted to `to` when streamed; `None` when ferry
    /// cannot convert between the two (see [`can_convert`]). Equal types return `source`.
    pub fn converted(source: TensorData, from: DType, to: DType) -> Option<Self> {
        if from == to {
            return Some(source);
        }
        can_convert(from, to).then(|| TensorData::Converted {
            source: Arc::new(source),
            from,
            to,
        })
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes: borrowed where possible, read when lazy.
    pub fn bytes(&self) -> io::Result<Cow<'_, [u8]>> {
        match self {
            TensorData::Mapped { file, offset, len } => {
                let start = usize::try_from(*offset).map_err(io::Error::other)?;
                let end = start + usize::try_from(*len).map_err(io::Error::other)?;
                file.bytes()
                    .get(start..end)
                    .map(Cow::Borrowed)
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("{}: tensor range out of bounds", file.path().display()),
                        )
                    })
            }
            TensorData::Owned(b) => Ok(Cow::Borrowed(b)),
            TensorData::Lazy { len, read } => {
                let v = read()?;
                if v.len() as u64 != *len {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("tensor reader returned {} bytes, expected {len}", v.len()),
                    ));
                }
                Ok(Cow::Owned(v))
            }
            TensorData::Converted { source, from, to } => {
                let src = source.bytes()?;
                let mut out = Vec::with_capacity(usize::try_from(self.len()).unwrap_or(0));
                convert_into(*from, *to, &src, &mut out)?;
                Ok(Cow::Owned(out))
            }
        }
    }

    /// Streams the bytes to `out`: an in-kernel copy for mapped data when `out` is a file.
    pub fn write_to<W: Write>(&self, out: &mut W) -> io::Result<()> {
        match self {
            TensorData::Mapped { file, offset, len } => file.copy_range_to(*offset, *len, out),
            TensorData::Converted { .. } => {
                self.for_each_chunk(CONVERT_CHUNK, |c| out.write_all(c))
            }
            _ => out.write_all(&self.bytes()?),
        }
    }

    /// Streams the bytes to `f` in chunks of at most `chunk` bytes, without mapping them
    /// into memory (for writers that must see the bytes, e.g. to checksum them).
    pub fn for_each_chunk(
        &self,
        chunk: usize,
        mut f: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.for_each_chunk_dyn(chunk, &mut f)
    }

    /// [`TensorData::for_each_chunk`] over a trait object (`Converted` recurses into its
    /// source, which a generic closure type cannot).
    fn for_each_chunk_dyn(
        &self,
        chunk: usize,
        f: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        match self {
            TensorData::Mapped { file, offset, len } => {
                file.for_each_chunk(*offset, *len, chunk, f)
            }
            TensorData::Converted { source, from, to } => {
                let (fs, ts) = (from.size(), to.size());
                // Source chunks of whole elements whose conversion is at most `chunk` bytes.
                let src_chunk = (chunk / ts).max(1) * fs;
                let mut carry: Vec<u8> = Vec::new();
                let mut buf: Vec<u8> = Vec::with_capacity(src_chunk / fs * ts);
                source.for_each_chunk_dyn(src_chunk, &mut |c: &[u8]| {
                    // Chunks normally hold whole elements; keep any split one for the next.
                    let mut c = c;
                    if !carry.is_empty() {
                        let need = fs - carry.len();
                        let take = need.min(c.len());
                        carry.extend_from_slice(&c[..take]);
                        c = &c[take..];
                        if carry.len() < fs {
                            return Ok(());
                        }
                        buf.clear();
                        convert_into(*from, *to, &carry, &mut buf)?;
                        carry.clear();
                        f(&buf)?;
                    }
                    let whole = c.len() / fs * fs;
                    buf.clear();
                    convert_into(*from, *to, &c[..whole], &mut buf)?;
                    carry.extend_from_slice(&c[whole..]);
                    if buf.is_empty() { Ok(()) } else { f(&buf) }
                })?;
                if carry.is_empty() {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("tensor length is not a multiple of {fs}-byte {from} elements"),
                    ))
                }
            }
            _ => {
                let b = self.bytes()?;
                for c in b.chunks(chunk.max(1)) {
                    f(c)?;
                }
                Ok(())
            }
        }
    }

    /// The values decoded as little-endian f32 (for tests and small constant folding).
    pub fn to_f32_vec(&self) -> io::Result<Vec<f32>> {
        let b = self.bytes()?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

impl fmt::Debug for TensorData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorData::Mapped { file, offset, len } => {
                write!(f, "Mapped({}@{offset}+{len})", file.path().display())
            }
            TensorData::Owned(b) => write!(f, "Owned({} bytes)", b.len()),
            TensorData::Lazy { len, .. } => write!(f, "Lazy({len} bytes)"),
            TensorData::Converted { source, from, to } => {
                write!(f, "Converted({from}->{to}, {source:?})")
            }
        }
    }
}

/// A named constant tensor of a graph (a weight or a folded constant).
#[derive(Debug, Clone)]
pub struct Initializer {
    /// Name the graph refers to it by.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub dims: Vec<i64>,
    /// Bytes, row-major, little-endian.
    pub data: TensorData,
}

impl Initializer {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().map(|&d| d.max(0) as u64).product()
    }
}

/// The tensors of a checkpoint by name, as the loader found them.
#[derive(Debug, Clone, Default)]
pub struct Weights {
    tensors: BTreeMap<String, Initializer>,
}

impl Weights {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a tensor.
    pub fn insert(&mut self, tensor: Initializer) {
        self.tensors.insert(tensor.name.clone(), tensor);
    }

    /// Looks a tensor up by its checkpoint name.
    pub fn get(&self, name: &str) -> Option<&Initializer> {
        self.tensors.get(name)
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All tensors, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Initializer> {
        self.tensors.values()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of bytes across all tensors.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.data.len()).sum()
    }

    /// The same table with every float16 and bfloat16 tensor as float32: each becomes a
    /// [`TensorData::Converted`] over the checkpoint's bytes, converted chunk by chunk when
    /// a writer streams it, so no weight is read here and no whole-model copy is ever made.
    /// Other tensors (float32, integer, float64) are shared unchanged. This is what
    /// `ferry export --dtype fp32` (the default) traces half-precision checkpoints from.
    pub fn upcast_to_f32(&self) -> Weights {
        let mut out = Weights::new();
        for t in self.tensors.values() {
            let mut t = t.clone();
            if matches!(t.dtype, DType::F16 | DType::BF16) {
                let source = std::mem::replace(&mut t.data, TensorData::owned(Vec::new()));
                t.data = TensorData::Converted {
                    source: Arc::new(source),
                    from: t.dtype,
                    to: DType::F32,
                };
                t.dtype = DType::F32;
            }
            out.insert(t);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_roundtrip_and_write() {
        let d = TensorData::from_f32(&[1.0, -2.5]);
        assert_eq!(d.len(), 8);
        assert_eq!(d.to_f32_vec().ok(), Some(vec![1.0, -2.5]));
        let mut out = Vec::new();
        assert!(d.write_to(&mut out).is_ok());
        assert_eq!(out.len(), 8);
    }

    #[test]
    fn converted_half_streams_as_f32_in_any_chunk_size() -> io::Result<()> {
        let values = [0.0f32, 1.0, -2.5, 0.333, 65504.0, -1e-3, 7.25];
        for from in [DType::F16, DType::BF16] {
            let (raw, want): (Vec<u8>, Vec<f32>) = if from == DType::F16 {
                let h: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
                (
                    h.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    h.iter().map(|v| v.to_f32()).collect(),
                )
            } else {
                let h: Vec<half::bf16> = values.iter().map(|&v| half::bf16::from_f32(v)).collect();
                (
                    h.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    h.iter().map(|v| v.to_f32()).collect(),
                )
            };
            let d = TensorData::converted(TensorData::owned(raw), from, DType::F32)
                .ok_or_else(|| io::Error::other("no conversion"))?;
            assert_eq!(d.len(), values.len() as u64 * 4);
            assert_eq!(d.to_f32_vec()?, want);
            let mut out = Vec::new();
            d.write_to(&mut out)?;
            assert_eq!(out, &*d.bytes()?);
            for chunk in [1, 3, 4, 5, 8, 1000] {
                let mut got = Vec::new();
                d.for_each_chunk(chunk, |c| {
                    assert!(c.len() <= chunk.max(4));
                    got.extend_from_slice(c);
                    Ok(())
                })?;
                assert_eq!(got, out, "chunk {chunk}");
            }
        }
        assert!(
            TensorData::converted(TensorData::owned(vec![0; 4]), DType::F32, DType::F16).is_none()
        );
        let odd = TensorData::Converted {
            source: Arc::new(TensorData::owned(vec![0; 3])),
            from: DType::F16,
            to: DType::F32,
        };
        assert!(odd.write_to(&mut Vec::new()).is_err());
        Ok(())
    }

    #[test]
    fn mapped_range_copies_exact_bytes() -> io::Result<()> {
        let dir = std::env::temp_dir().join(format!("ferry-ir-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let p = dir.join("f.bin");
        std::fs::write(&p, b"0123456789")?;
        let file = Arc::new(MappedFile::open(&p)?);
        let d = TensorData::Mapped {
            file,
            offset: 3,
            len: 4,
        };
        assert_eq!(&*d.bytes()?, b"3456");
        let mut out = Vec::new();
        d.write_to(&mut out)?;
        assert_eq!(out, b"3456");
        let bad = TensorData::Mapped {
            file: Arc::new(MappedFile::open(&p)?),
            offset: 8,
            len: 4,
        };
        assert!(bad.bytes().is_err());
        // Chunked reads, small and pipelined, see exactly the range.
        for chunk in [1, 3, 100] {
            let mut got = Vec::new();
            let d = TensorData::Mapped {
                file: Arc::new(MappedFile::open(&p)?),
                offset: 1,
                len: 8,
            };
            d.for_each_chunk(chunk, |c| {
                got.extend_from_slice(c);
                Ok(())
            })?;
            assert_eq!(got, b"12345678");
        }
        let mut calls = 0;
        let r = TensorData::Mapped {
            file: Arc::new(MappedFile::open(&p)?),
            offset: 0,
            len: 10,
        }
        .for_each_chunk(2, |_| {
            calls += 1;
            Err(io::Error::other("stop"))
        });
        assert!(r.is_err() && calls == 1);
        assert!(bad.write_to(&mut Vec::new()).is_err());
        std::fs::remove_dir_all(&dir)
    }
}
