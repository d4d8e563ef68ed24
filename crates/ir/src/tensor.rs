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
    /// A second handle for positional reads (`pread`), which need no lock: a writer
    /// copying one tensor through `file` never blocks another thread reading the next.
    pread: File,
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
        let pread = file.try_clone()?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            file: Mutex::new(file),
            pread,
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

impl MappedFile {
    /// Fills `buf` with the bytes at `offset` by a positional read (`pread`), which keeps
    /// them out of this process's resident memory, unlike touching the map.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.pread.read_exact_at(buf, offset).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{}: reading {} bytes at offset {offset}: {e}",
                    self.path.display(),
                    buf.len()
                ),
            )
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

/// Computes a derived tensor's bytes a band of whole rows at a time, from a source it reads
/// as it goes (a quantized weight produced from its mapped float weight when the writer
/// streams it). Wrapped in [`TensorData::Produced`].
pub trait RowProducer: Send + Sync {
    /// Total bytes produced (a whole number of rows).
    fn total_bytes(&self) -> u64;
    /// Bytes of one output row; bands are whole rows.
    fn row_bytes(&self) -> u64;
    /// Working memory one output row needs (source bytes read plus output), so bands stay
    /// within the band limit however much larger the source is than the output.
    fn row_work(&self) -> u64 {
        self.row_bytes()
    }
    /// Fills `out` (a whole number of rows, at most the band limit of work) with the rows
    /// from row `first` on.
    fn produce(&self, first: u64, out: &mut [u8]) -> io::Result<()>;
}

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
    /// `source` (row-major, shape `dims`, `elem`-byte elements) with its axes permuted by
    /// `perm`: output axis `j` is input axis `perm[j]` (ONNX `Transpose`). Computed band by
    /// band when streamed, so the transposed tensor is never held whole (except by
    /// [`TensorData::bytes`]). Built by [`TensorData::transposed`].
    Transposed {
        /// The tensor transposed.
        source: Arc<TensorData>,
        /// Shape of `source`.
        dims: Arc<[usize]>,
        /// Output axis `j` is input axis `perm[j]`.
        perm: Arc<[usize]>,
        /// Bytes per element.
        elem: usize,
    },
    /// Row-wise concatenation of `parts`, each `rows` rows of `part.len() / rows` bytes:
    /// output row `r` is row `r` of every part in turn (ONNX `Concat` along the last axis
    /// of tensors that agree on the others). Assembled band by band when streamed. Built by
    /// [`TensorData::concat_rows`].
    Concat {
        /// The tensors concatenated, in order.
        parts: Arc<[TensorData]>,
        /// Number of rows every part has.
        rows: u64,
    },
    /// Bytes computed band by band by a [`RowProducer`] when read or streamed (quantized
    /// weights, float16 conversions): never held whole, except by [`TensorData::bytes`].
    Produced(Arc<dyn RowProducer>),
}

/// Largest band of a [`TensorData::Transposed`] or [`TensorData::Concat`] computed at once
/// when streamed (the memory a streamed transformed tensor needs, twice over at most), and
/// the most working memory one band of a [`TensorData::Produced`] may take.
pub const BAND_BYTES: usize = 16 << 20;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn to_usize(v: u64) -> io::Result<usize> {
    usize::try_from(v).map_err(io::Error::other)
}

/// Checks that `perm` is a permutation of `0..rank`.
fn check_perm(perm: &[usize], rank: usize) -> io::Result<()> {
    let mut seen = vec![false; rank];
    for &a in perm {
        if a >= rank || std::mem::replace(&mut seen[a], true) {
            return Err(invalid(format!(
                "{perm:?} is not a permutation of {rank} axes"
            )));
        }
    }
    if perm.len() != rank {
        return Err(invalid(format!(
            "{perm:?} is not a permutation of {rank} axes"
        )));
    }
    Ok(())
}

/// Row-major transpose of `src` (shape `dims`, `elem`-byte elements) by `perm` into `out`
/// (same length). Axes of size 1 are dropped and runs of axes that stay adjacent merged;
/// what remains is copied as contiguous blocks when the innermost axis stays innermost, or
/// as cache-sized tiles of a 2-D transpose between the input's and the output's innermost
/// axes otherwise.
fn permute_into(src: &[u8], dims: &[usize], perm: &[usize], elem: usize, out: &mut [u8]) {
    let numel: usize = dims.iter().product();
    debug_assert_eq!(src.len(), numel * elem);
    debug_assert_eq!(out.len(), numel * elem);
    if numel == 0 {
        return;
    }
    // Drop size-1 axes, renumbering the rest.
    let kept: Vec<usize> = (0..dims.len()).filter(|&a| dims[a] != 1).collect();
    let renum = |a: usize| kept.iter().position(|&k| k == a);
    let p: Vec<usize> = perm.iter().filter_map(|&a| renum(a)).collect();
    let d: Vec<usize> = kept.iter().map(|&a| dims[a]).collect();
    // Merge input axes that are consecutive in the output too.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for &a in &p {
        match groups.last_mut() {
            Some(g) if g.last().is_some_and(|&l| l + 1 == a) => g.push(a),
            _ => groups.push(vec![a]),
        }
    }
    // Groups sorted by their first input axis give the merged input axes.
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by_key(|&g| groups[g][0]);
    let mdims: Vec<usize> = order
        .iter()
        .map(|&g| groups[g].iter().map(|&a| d[a]).product())
        .collect();
    // Output axis j is merged input axis mperm[j].
    let mperm: Vec<usize> = (0..groups.len())
        .map(|g| order.iter().position(|&o| o == g).unwrap_or(0))
        .collect();
    let rank = mdims.len();
    if rank <= 1 {
        out.copy_from_slice(src);
        return;
    }
    match elem {
        1 => permute_typed::<1>(src, &mdims, &mperm, out),
        2 => permute_typed::<2>(src, &mdims, &mperm, out),
        4 => permute_typed::<4>(src, &mdims, &mperm, out),
        8 => permute_typed::<8>(src, &mdims, &mperm, out),
        e => permute_generic(src, &mdims, &mperm, e, out),
    }
}

/// Element strides of a row-major shape.
fn strides_of(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// Calls `f(in_offset, out_offset)` (in elements) for every index of the axes not in
/// `skip`, in output order.
fn odometer(
    out_dims: &[usize],
    in_strides: &[usize],
    out_strides: &[usize],
    skip: &[usize],
    mut f: impl FnMut(usize, usize),
) {
    let axes: Vec<usize> = (0..out_dims.len()).filter(|a| !skip.contains(a)).collect();
    let mut idx = vec![0usize; axes.len()];
    let (mut i_off, mut o_off) = (0usize, 0usize);
    loop {
        f(i_off, o_off);
        let mut k = axes.len();
        loop {
            if k == 0 {
                return;
            }
            k -= 1;
            let ax = axes[k];
            idx[k] += 1;
            i_off += in_strides[ax];
            o_off += out_strides[ax];
            if idx[k] < out_dims[ax] {
                break;
            }
            i_off -= in_strides[ax] * out_dims[ax];
            o_off -= out_strides[ax] * out_dims[ax];
            idx[k] = 0;
        }
    }
}

/// [`permute_into`] on merged axes (rank ≥ 2, no two output-adjacent axes input-adjacent)
/// for `E`-byte elements.
fn permute_typed<const E: usize>(src: &[u8], dims: &[usize], perm: &[usize], out: &mut [u8]) {
    let rank = dims.len();
    let in_str = strides_of(dims);
    let out_dims: Vec<usize> = perm.iter().map(|&a| dims[a]).collect();
    let out_str = strides_of(&out_dims);
    // Input stride of each output axis.
    let istr: Vec<usize> = perm.iter().map(|&a| in_str[a]).collect();
    let src: &[[u8; E]] = as_elems(src);
    let out: &mut [[u8; E]] = as_elems_mut(out);
    let last = rank - 1;
    if perm[last] == rank - 1 {
        // The innermost axis stays innermost: contiguous blocks.
        let n = dims[rank - 1];
        odometer(&out_dims, &istr, &out_str, &[last], |ib, ob| {
            out[ob..ob + n].copy_from_slice(&src[ib..ib + n]);
        });
        return;
    }
    // The output axis that is the input's innermost one (stride 1 in the input).
    let jc = perm.iter().position(|&a| a == rank - 1).unwrap_or(0);
    let (nx, ny) = (out_dims[jc], out_dims[last]);
    let (osx, isy) = (out_str[jc], istr[last]);
    const TILE: usize = 32;
    odometer(&out_dims, &istr, &out_str, &[jc, last], |ib, ob| {
        for x0 in (0..nx).step_by(TILE) {
            let x1 = (x0 + TILE).min(nx);
            for y0 in (0..ny).step_by(TILE) {
                let y1 = (y0 + TILE).min(ny);
                for x in x0..x1 {
                    let o = ob + x * osx;
                    for y in y0..y1 {
                        out[o + y] = src[ib + y * isy + x];
                    }
                }
            }
        }
    });
}

/// [`permute_into`] for element sizes without a typed path: element by element.
fn permute_generic(src: &[u8], dims: &[usize], perm: &[usize], elem: usize, out: &mut [u8]) {
    let in_str = strides_of(dims);
    let out_dims: Vec<usize> = perm.iter().map(|&a| dims[a]).collect();
    let out_str = strides_of(&out_dims);
    let istr: Vec<usize> = perm.iter().map(|&a| in_str[a]).collect();
    odometer(&out_dims, &istr, &out_str, &[], |i, o| {
        out[o * elem..(o + 1) * elem].copy_from_slice(&src[i * elem..(i + 1) * elem]);
    });
}

fn as_elems<const E: usize>(b: &[u8]) -> &[[u8; E]] {
    let (chunks, rest) = b.as_chunks::<E>();
    debug_assert!(rest.is_empty());
    chunks
}

fn as_elems_mut<const E: usize>(b: &mut [u8]) -> &mut [[u8; E]] {
    let (chunks, rest) = b.as_chunks_mut::<E>();
    debug_assert!(rest.is_empty());
    chunks
}

/// Fills `out` with output rows `a0..a1` (along output axis 0) of `source` (shape `dims`)
/// transposed by `perm`: gathers the input slab those rows come from, then permutes it.
fn transposed_band(
    source: &TensorData,
    dims: &[usize],
    perm: &[usize],
    elem: usize,
    a0: u64,
    a1: u64,
    out: &mut [u8],
) -> io::Result<()> {
    // A large band is computed in two halves on two threads (gathering the slab and
    // permuting it are CPU-bound; the writer's own thread mostly waits on the kernel).
    if out.len() >= PARALLEL_BAND && a1 - a0 >= 2 && !matches!(source, TensorData::Lazy { .. }) {
        let mid = a0 + (a1 - a0) / 2;
        let split = to_usize((mid - a0) * (out.len() as u64 / (a1 - a0)))?;
        let (lo, hi) = out.split_at_mut(split);
        return std::thread::scope(|s| {
            let first = s.spawn(|| transposed_band_serial(source, dims, perm, elem, a0, mid, lo));
            let second = transposed_band_serial(source, dims, perm, elem, mid, a1, hi);
            first
                .join()
                .map_err(|_| io::Error::other("transpose thread panicked"))??;
            second
        });
    }
    transposed_band_serial(source, dims, perm, elem, a0, a1, out)
}

/// Elements a converted tensor's read converts at a time (1.5 MiB of buffers for
/// bfloat16 → float32).
const CONVERT_WINDOW: u64 = 1 << 18;

/// Bands at least this large are transposed on two threads.
const PARALLEL_BAND: usize = 4 << 20;

/// [`transposed_band`] on the calling thread.
fn transposed_band_serial(
    source: &TensorData,
    dims: &[usize],
    perm: &[usize],
    elem: usize,
    a0: u64,
    a1: u64,
    out: &mut [u8],
) -> io::Result<()> {
    let p = perm[0];
    let (a0, w) = (to_usize(a0)?, to_usize(a1 - a0)?);
    let full = dims[p];
    let inner: usize = dims[p + 1..].iter().product::<usize>() * elem;
    let outer: usize = dims[..p].iter().product();
    // The slab buffer is reused across bands and tensors of this thread (bands are at most
    // BAND_BYTES when streamed), so streaming many transposed weights does not allocate and
    // zero a fresh buffer for each.
    thread_local! {
        static SLAB: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    }
    let mut slab = SLAB.take();
    slab.resize(outer * w * inner, 0);
    let r = fill_and_permute(
        source,
        dims,
        perm,
        elem,
        (a0, w, full, inner, outer),
        &mut slab,
        out,
    );
    if slab.capacity() <= BAND_BYTES {
        SLAB.set(slab);
    }
    r
}

/// [`transposed_band`]'s work: gathers the slab (axis `perm[0]` restricted to `a0..a0 + w`)
/// into `slab`, then permutes it into `out`.
fn fill_and_permute(
    source: &TensorData,
    dims: &[usize],
    perm: &[usize],
    elem: usize,
    (a0, w, full, inner, outer): (usize, usize, usize, usize, usize),
    slab: &mut [u8],
    out: &mut [u8],
) -> io::Result<()> {
    let mut sub_dims = dims.to_vec();
    sub_dims[perm[0]] = w;
    if w == full {
        source.read_into(0, slab)?;
    } else if matches!(source, TensorData::Lazy { .. }) {
        // A lazy reader produces the whole tensor per read: read it once.
        let b = source.bytes()?;
        for o in 0..outer {
            let from = (o * full + a0) * inner;
            slab[o * w * inner..(o + 1) * w * inner].copy_from_slice(&b[from..from + w * inner]);
        }
    } else {
        for o in 0..outer {
            let from = ((o * full + a0) * inner) as u64;
            source.read_into(from, &mut slab[o * w * inner..(o + 1) * w * inner])?;
        }
    }
    permute_into(slab, &sub_dims, perm, elem, out);
    Ok(())
}

/// Fills `out` with rows `r0..r1` of the row-wise concatenation of `parts`.
fn concat_band(
    parts: &[TensorData],
    rows: u64,
    r0: u64,
    r1: u64,
    out: &mut [u8],
) -> io::Result<()> {
    let n = to_usize(r1 - r0)?;
    let width = out.len() / n.max(1);
    thread_local! {
        static PART: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    }
    let mut buf = PART.take();
    let r = interleave_parts(parts, rows, r0, n, width, &mut buf, out);
    if buf.capacity() <= BAND_BYTES {
        PART.set(buf);
    }
    r
}

/// [`concat_band`]'s work: each part's rows `r0..r0 + n` read into `buf`, then copied to
/// their columns of `out` (rows of `width` bytes).
fn interleave_parts(
    parts: &[TensorData],
    rows: u64,
    r0: u64,
    n: usize,
    width: usize,
    buf: &mut Vec<u8>,
    out: &mut [u8],
) -> io::Result<()> {
    let mut col = 0;
    for part in parts {
        let w = to_usize(part.len() / rows)?;
        buf.resize(n * w, 0);
        part.read_into(r0 * w as u64, buf)?;
        for (r, src) in buf.chunks_exact(w.max(1)).enumerate().take(n) {
            out[r * width + col..r * width + col + w].copy_from_slice(src);
        }
        col += w;
    }
    Ok(())
}

/// [`TensorData::read_into`] for a [`TensorData::Produced`]: the rows covering the range,
/// produced in bands of at most [`BAND_BYTES`] of work, straight into `out` when the range
/// is whole rows.
fn read_produced(p: &dyn RowProducer, offset: u64, out: &mut [u8]) -> io::Result<()> {
    let row = p.row_bytes().max(1);
    let len = out.len() as u64;
    let (r0, r1) = (offset / row, (offset + len).div_ceil(row));
    let band_rows = (BAND_BYTES as u64 / p.row_work().max(row)).max(1);
    let produce = |first: u64, buf: &mut [u8]| -> io::Result<()> {
        for (i, c) in buf.chunks_mut(to_usize(band_rows * row)?).enumerate() {
            p.produce(first + i as u64 * band_rows, c)?;
        }
        Ok(())
    };
    if offset == r0 * row && len == (r1 - r0) * row {
        return produce(r0, out);
    }
    // A partial first or last row: produce the covering rows a band at a time.
    let mut r = r0;
    let mut done = 0usize;
    let mut buf = Vec::new();
    while r < r1 {
        let n = band_rows.min(r1 - r);
        buf.resize(to_usize(n * row)?, 0);
        p.produce(r, &mut buf)?;
        let start = (r * row).max(offset);
        let end = ((r + n) * row).min(offset + len);
        let from = to_usize(start - r * row)?;
        let m = to_usize(end - start)?;
        out[done..done + m].copy_from_slice(&buf[from..from + m]);
        done += m;
        r += n;
    }
    Ok(())
}

/// Whether [`TensorData::converted`] can convert `from` to `to`.
pub fn can_convert(from: DType, to: DType) -> bool {
    let float = |d| matches!(d, DType::F32 | DType::F16 | DType::BF16);
    from == to || (float(from) && float(to))
}

/// Decodes one little-endian element of a float type ferry converts (see [`can_convert`]).
fn float_to_f32(dtype: DType, c: &[u8]) -> f32 {
    match (dtype, c) {
        (DType::F16, &[a, b]) => half::f16::from_le_bytes([a, b]).to_f32(),
        (DType::BF16, &[a, b]) => half::bf16::from_le_bytes([a, b]).to_f32(),
        (_, &[a, b, c, d]) => f32::from_le_bytes([a, b, c, d]),
        _ => f32::NAN,
    }
}

/// Encodes `v` as `dtype` (round to nearest even, as torch's `.to(dtype)` does).
fn extend_f32_as(dtype: DType, v: f32, out: &mut Vec<u8>) {
    match dtype {
        DType::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
        DType::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
        _ => out.extend_from_slice(&v.to_le_bytes()),
    }
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
        // The common upcasts (half-precision checkpoints exported as float32) in one pass
        // over a preallocated buffer: bfloat16 is the high half of a float32.
        (DType::BF16, DType::F32) => {
            let start = out.len();
            out.resize(start + src.len() * 2, 0);
            for (o, c) in out[start..].chunks_exact_mut(4).zip(src.chunks_exact(2)) {
                o.copy_from_slice(
                    &(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16).to_le_bytes(),
                );
            }
        }
        (DType::F16, DType::F32) => {
            let start = out.len();
            out.resize(start + src.len() * 2, 0);
            for (o, c) in out[start..].chunks_exact_mut(4).zip(src.chunks_exact(2)) {
                o.copy_from_slice(
                    &half::f16::from_le_bytes([c[0], c[1]])
                        .to_f32()
                        .to_le_bytes(),
                );
            }
        }
        (a, b) if can_convert(a, b) => {
            out.reserve(src.len() / a.size() * b.size());
            for c in src.chunks_exact(a.size()) {
                extend_f32_as(b, float_to_f32(a, c), out);
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
            TensorData::Transposed { source, .. } => source.len(),
            TensorData::Concat { parts, .. } => parts.iter().map(TensorData::len).sum(),
            TensorData::Produced(p) => p.total_bytes(),
        }
    }

    /// A tensor whose bytes `producer` computes band by band when read or streamed.
    pub fn produced(producer: impl RowProducer + 'static) -> Self {
        TensorData::Produced(Arc::new(producer))
    }

    /// `source` (row-major, shape `dims`, `elem`-byte elements) transposed by `perm` (output
    /// axis `j` is input axis `perm[j]`), computed only when read or streamed. An identity
    /// `perm` returns `source`; a transpose of a transpose becomes one transpose of the
    /// original. Errors when `perm` is not a permutation of the axes or `source` does not
    /// hold `dims` × `elem` bytes.
    pub fn transposed(
        source: TensorData,
        dims: &[usize],
        perm: &[usize],
        elem: usize,
    ) -> io::Result<Self> {
        check_perm(perm, dims.len())?;
        let bytes = dims
            .iter()
            .try_fold(elem as u64, |a, &d| a.checked_mul(d as u64));
        if elem == 0 || bytes != Some(source.len()) {
            return Err(invalid(format!(
                "a {dims:?} tensor of {elem}-byte elements cannot hold {} bytes",
                source.len()
            )));
        }
        if perm.iter().enumerate().all(|(j, &a)| j == a) {
            return Ok(source);
        }
        if let TensorData::Transposed {
            source: inner,
            dims: inner_dims,
            perm: inner_perm,
            elem: inner_elem,
        } = &source
            && *inner_elem == elem
        {
            let composed: Vec<usize> = perm.iter().map(|&a| inner_perm[a]).collect();
            return TensorData::transposed((**inner).clone(), inner_dims, &composed, elem);
        }
        // The transpose of a row-wise concatenation of transposes (a packed `[K, n0 + n1 + …]`
        // weight built from `[n_i, K]` weights) is those weights one after the other.
        if let (&[k, _], [1, 0], TensorData::Concat { parts, rows }) = (dims, perm, &source)
            && *rows == k as u64
        {
            let inner: Option<Vec<TensorData>> = parts
                .iter()
                .map(|p| match p {
                    TensorData::Transposed {
                        source,
                        dims: d,
                        perm: q,
                        elem: e,
                    } if *e == elem && d.len() == 2 && d[1] == k && **q == [1, 0] => {
                        Some((**source).clone())
                    }
                    _ => None,
                })
                .collect();
            if let Some(inner) = inner {
                return TensorData::concat_rows(inner, 1);
            }
        }
        Ok(TensorData::Transposed {
            source: Arc::new(source),
            dims: dims.into(),
            perm: perm.into(),
            elem,
        })
    }

    /// The row-wise concatenation of `parts`, each `rows` rows (see
    /// [`TensorData::Concat`]), assembled only when read or streamed. A single part is
    /// returned as is. Errors when a part's length is not a whole number of rows.
    pub fn concat_rows(parts: Vec<TensorData>, rows: u64) -> io::Result<Self> {
        for p in &parts {
            let whole = if rows == 0 {
                p.is_empty()
            } else {
                p.len().is_multiple_of(rows)
            };
            if !whole {
                return Err(invalid(format!(
                    "a part of {} bytes is not {rows} rows",
                    p.len()
                )));
            }
        }
        if parts.len() == 1 {
            return Ok(parts
                .into_iter()
                .next()
                .unwrap_or_else(|| Self::owned(Vec::new())));
        }
        Ok(TensorData::Concat {
            parts: parts.into(),
            rows,
        })
    }

    /// Whether the bytes are computed from another tensor's (a conversion, transpose or
    /// concatenation) rather than stored; writers may compute these ahead of time.
    pub fn is_derived(&self) -> bool {
        matches!(
            self,
            TensorData::Converted { .. }
                | TensorData::Transposed { .. }
                | TensorData::Concat { .. }
                | TensorData::Produced(_)
        )
    }

    /// Fills `out` with the bytes from `offset` on, reading (and for derived tensors
    /// computing) only what that range needs; mapped bytes are read with `pread`, so they
    /// do not count against this process's memory.
    pub fn read_into(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let len = out.len() as u64;
        let total = self.len();
        if offset.checked_add(len).is_none_or(|end| end > total) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("range {offset}+{len} is outside a tensor of {total} bytes"),
            ));
        }
        if out.is_empty() {
            return Ok(());
        }
        match self {
            TensorData::Mapped {
                file,
                offset: start,
                ..
            } => file.read_exact_at(start + offset, out),
            TensorData::Owned(b) => {
                let start = to_usize(offset)?;
                out.copy_from_slice(&b[start..start + out.len()]);
                Ok(())
            }
            TensorData::Lazy { .. } => {
                let b = self.bytes()?;
                let start = to_usize(offset)?;
                out.copy_from_slice(&b[start..start + out.len()]);
                Ok(())
            }
            TensorData::Converted { source, from, to } => {
                // Converted a window of elements at a time, so a large read (a whole
                // packed part, a band) needs no source-sized temporaries.
                let (fs, ts) = (from.size() as u64, to.size() as u64);
                let (e0, e1) = (offset / ts, (offset + len).div_ceil(ts));
                let window = CONVERT_WINDOW.min(e1 - e0);
                let mut src = vec![0u8; to_usize(window * fs)?];
                let mut conv = Vec::with_capacity(to_usize(window * ts)?);
                let mut e = e0;
                let mut done = 0usize;
                while e < e1 {
                    let n = window.min(e1 - e);
                    let src = &mut src[..to_usize(n * fs)?];
                    source.read_into(e * fs, src)?;
                    conv.clear();
                    convert_into(*from, *to, src, &mut conv)?;
                    let skip = to_usize(offset.saturating_sub(e * ts))?;
                    let m = (conv.len() - skip).min(out.len() - done);
                    out[done..done + m].copy_from_slice(&conv[skip..skip + m]);
                    done += m;
                    e += n;
                }
                Ok(())
            }
            TensorData::Transposed {
                source,
                dims,
                perm,
                elem,
            } => {
                if dims.is_empty() {
                    return source.read_into(offset, out);
                }
                let rb = self.len() / dims[perm[0]] as u64;
                let (a0, a1) = (offset / rb, (offset + len).div_ceil(rb));
                if offset == a0 * rb && len == (a1 - a0) * rb {
                    return transposed_band(source, dims, perm, *elem, a0, a1, out);
                }
                let mut band = vec![0u8; to_usize((a1 - a0) * rb)?];
                transposed_band(source, dims, perm, *elem, a0, a1, &mut band)?;
                let skip = to_usize(offset - a0 * rb)?;
                out.copy_from_slice(&band[skip..skip + out.len()]);
                Ok(())
            }
            TensorData::Concat { parts, rows: 1 } => {
                // Parts one after the other: each part's overlap with the range read
                // straight into `out` (no band buffer as large as a part).
                let (mut at, mut done) = (0u64, 0usize);
                for part in parts.iter() {
                    let plen = part.len();
                    let (lo, hi) = (offset.max(at), (offset + len).min(at + plen));
                    if lo < hi {
                        let m = to_usize(hi - lo)?;
                        part.read_into(lo - at, &mut out[done..done + m])?;
                        done += m;
                    }
                    at += plen;
                }
                Ok(())
            }
            TensorData::Concat { parts, rows } => {
                let width = self.len() / rows;
                let (r0, r1) = (offset / width, (offset + len).div_ceil(width));
                if offset == r0 * width && len == (r1 - r0) * width {
                    return concat_band(parts, *rows, r0, r1, out);
                }
                let mut band = vec![0u8; to_usize((r1 - r0) * width)?];
                concat_band(parts, *rows, r0, r1, &mut band)?;
                let skip = to_usize(offset - r0 * width)?;
                out.copy_from_slice(&band[skip..skip + out.len()]);
                Ok(())
            }
            TensorData::Produced(p) => read_produced(&**p, offset, out),
        }
    }

    /// Hands the bytes of a transposed or concatenated tensor to `f` in bands of about
    /// [`BAND_BYTES`] (whole output rows), computing one band at a time.
    fn for_each_band(&self, f: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        let total = self.len();
        let row = match self {
            TensorData::Transposed { dims, perm, .. } if !dims.is_empty() && total > 0 => {
                total / dims[perm[0]] as u64
            }
            // Parts one after the other read at any byte range: plain bands.
            TensorData::Concat { rows: 1, .. } => 1,
            TensorData::Concat { rows, .. } if *rows > 0 && total > 0 => total / rows,
            TensorData::Produced(p) => {
                let row = p.row_bytes().max(1);
                let rows = (BAND_BYTES as u64 / p.row_work().max(row)).max(1);
                let step = rows * row;
                let mut buf = vec![0u8; to_usize(step.min(total))?];
                let mut done = 0u64;
                while done < total {
                    let n = to_usize(step.min(total - done))?;
                    p.produce(done / row, &mut buf[..n])?;
                    f(&buf[..n])?;
                    done += n as u64;
                }
                return Ok(());
            }
            _ => total.max(1),
        };
        let step = (BAND_BYTES as u64 / row).max(1) * row;
        let mut buf = vec![0u8; to_usize(step.min(total))?];
        let mut done = 0u64;
        while done < total {
            let n = to_usize(step.min(total - done))?;
            self.read_into(done, &mut buf[..n])?;
            f(&buf[..n])?;
            done += n as u64;
        }
        Ok(())
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
            TensorData::Transposed { .. } | TensorData::Concat { .. } | TensorData::Produced(_) => {
                let mut out = vec![0u8; to_usize(self.len())?];
                self.read_into(0, &mut out)?;
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
            TensorData::Transposed { .. } | TensorData::Concat { .. } | TensorData::Produced(_) => {
                self.for_each_band(&mut |b| out.write_all(b))
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
            TensorData::Transposed { .. } | TensorData::Concat { .. } | TensorData::Produced(_) => {
                self.for_each_band(&mut |b| {
                    for c in b.chunks(chunk.max(1)) {
                        f(c)?;
                    }
                    Ok(())
                })
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
            TensorData::Transposed {
                source, dims, perm, ..
            } => write!(f, "Transposed({dims:?} by {perm:?}, {source:?})"),
            TensorData::Concat { parts, rows } => write!(f, "Concat({rows} rows, {parts:?})"),
            TensorData::Produced(p) => write!(f, "Produced({} bytes)", p.total_bytes()),
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
        // Saturating: absurd dims (a corrupt or hostile file) give u64::MAX, which no byte
        // length matches, rather than an overflow.
        self.dims
            .iter()
            .fold(1u64, |n, &d| n.saturating_mul(d.max(0) as u64))
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
        self.floats_as(DType::F32)
    }

    /// The same tensors with every float32/float16/bfloat16 tensor of another type
    /// converted to `dtype` as it streams (`--dtype fp16` of a float32 checkpoint); tensors
    /// already in `dtype`, and integer buffers, stay borrowed as they are.
    pub fn floats_as(&self, dtype: DType) -> Weights {
        let mut out = Weights::new();
        for t in self.tensors.values() {
            let mut t = t.clone();
            if t.dtype != dtype && can_convert(t.dtype, dtype) {
                let source = std::mem::replace(&mut t.data, TensorData::owned(Vec::new()));
                t.data = TensorData::Converted {
                    source: Arc::new(source),
                    from: t.dtype,
                    to: dtype,
                };
                t.dtype = dtype;
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
    fn float32_narrows_to_half_rounding_to_nearest() -> io::Result<()> {
        let values = [0.0f32, 1.0, -2.5, 0.1, 70000.0, -1e-3, 7.25, 1.0e-8];
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let bf16: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        for (to, want) in [(DType::F16, &f16), (DType::BF16, &bf16)] {
            let d = TensorData::converted(TensorData::owned(raw.clone()), DType::F32, to)
                .ok_or_else(|| io::Error::other("no conversion"))?;
            assert_eq!(d.len(), values.len() as u64 * 2);
            assert_eq!(&*d.bytes()?, want.as_slice());
            for chunk in [1, 2, 3, 6, 1000] {
                let mut got = Vec::new();
                d.for_each_chunk(chunk, |c| {
                    got.extend_from_slice(c);
                    Ok(())
                })?;
                assert_eq!(&got, want, "{to} chunk {chunk}");
            }
        }
        // float16 -> bfloat16 goes through float32 exactly.
        let d = TensorData::converted(TensorData::owned(f16.clone()), DType::F16, DType::BF16)
            .ok_or_else(|| io::Error::other("no conversion"))?;
        let via: Vec<u8> = f16
            .chunks_exact(2)
            .flat_map(|c| {
                half::bf16::from_f32(half::f16::from_le_bytes([c[0], c[1]]).to_f32()).to_le_bytes()
            })
            .collect();
        assert_eq!(&*d.bytes()?, via.as_slice());
        Ok(())
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
            TensorData::converted(TensorData::owned(vec![0; 8]), DType::I64, DType::F16).is_none()
        );
        let odd = TensorData::Converted {
            source: Arc::new(TensorData::owned(vec![0; 3])),
            from: DType::F16,
            to: DType::F32,
        };
        assert!(odd.write_to(&mut Vec::new()).is_err());
        Ok(())
    }

    /// Reference transpose: every output element found by index arithmetic.
    fn naive_transpose(src: &[u8], dims: &[usize], perm: &[usize], elem: usize) -> Vec<u8> {
        let numel: usize = dims.iter().product();
        let out_dims: Vec<usize> = perm.iter().map(|&a| dims[a]).collect();
        let in_str = strides_of(dims);
        let mut out = Vec::with_capacity(numel * elem);
        for o in 0..numel {
            let mut rem = o;
            let mut i = 0;
            for j in (0..out_dims.len()).rev() {
                i += (rem % out_dims[j]) * in_str[perm[j]];
                rem /= out_dims[j];
            }
            out.extend_from_slice(&src[i * elem..(i + 1) * elem]);
        }
        out
    }

    /// Every permutation of `0..n`.
    fn perms(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut all = Vec::new();
        for p in perms(n - 1) {
            for k in 0..=p.len() {
                let mut q = p.clone();
                q.insert(k, n - 1);
                all.push(q);
            }
        }
        all
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
            .collect()
    }

    #[test]
    fn transposed_matches_index_arithmetic_for_every_perm() -> io::Result<()> {
        let shapes: [&[usize]; 8] = [
            &[],
            &[5],
            &[3, 70],
            &[33, 65],
            &[2, 3, 4],
            &[1, 37, 1, 3],
            &[2, 0, 3],
            &[3, 2, 5, 7],
        ];
        for dims in shapes {
            for elem in [1, 2, 3, 4, 8] {
                let numel: usize = dims.iter().product();
                let src = pattern(numel * elem, dims.len() as u8);
                for perm in perms(dims.len()) {
                    let want = naive_transpose(&src, dims, &perm, elem);
                    let mut got = vec![0u8; want.len()];
                    permute_into(&src, dims, &perm, elem, &mut got);
                    assert_eq!(got, want, "{dims:?} {perm:?} {elem}");
                    let t =
                        TensorData::transposed(TensorData::owned(src.clone()), dims, &perm, elem)?;
                    assert_eq!(t.len(), want.len() as u64);
                    assert_eq!(&*t.bytes()?, &want[..], "{dims:?} {perm:?} {elem}");
                    let mut w = Vec::new();
                    t.write_to(&mut w)?;
                    assert_eq!(w, want);
                    // Any sub-range reads the same bytes.
                    for (off, len) in [(0, want.len()), (1, want.len() / 2), (want.len() / 3, 5)] {
                        let off = off.min(want.len());
                        let len = len.min(want.len() - off);
                        let mut part = vec![0u8; len];
                        t.read_into(off as u64, &mut part)?;
                        assert_eq!(part, want[off..off + len], "{dims:?} {perm:?} {off}+{len}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn transposed_streams_in_bands_from_a_mapped_file() -> io::Result<()> {
        // Larger than one band, so the output is produced from several input slabs.
        let dims = [3usize, 1100, 1300];
        let elem = 4;
        let src = pattern(dims.iter().product::<usize>() * elem, 7);
        let dir = std::env::temp_dir().join(format!("ferry-ir-band-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let p = dir.join("w.bin");
        let mut file_bytes = vec![9u8; 13];
        file_bytes.extend_from_slice(&src);
        std::fs::write(&p, &file_bytes)?;
        let mapped = TensorData::Mapped {
            file: Arc::new(MappedFile::open(&p)?),
            offset: 13,
            len: src.len() as u64,
        };
        for perm in [[2usize, 0, 1], [1, 2, 0], [2, 1, 0]] {
            let want = naive_transpose(&src, &dims, &perm, elem);
            let t = TensorData::transposed(mapped.clone(), &dims, &perm, elem)?;
            let mut got = Vec::new();
            t.for_each_chunk(1 << 20, |c| {
                assert!(c.len() <= 1 << 20);
                got.extend_from_slice(c);
                Ok(())
            })?;
            assert!(got == want, "{perm:?}");
        }
        std::fs::remove_dir_all(&dir)
    }

    #[test]
    fn transposes_compose_and_bad_ones_are_refused() -> io::Result<()> {
        let src = pattern(2 * 3 * 4 * 4, 1);
        let dims = [2usize, 3, 4];
        let t1 = TensorData::transposed(TensorData::owned(src.clone()), &dims, &[2, 0, 1], 4)?;
        let t2 = TensorData::transposed(t1.clone(), &[4, 2, 3], &[1, 2, 0], 4)?;
        // [2, 0, 1] then [1, 2, 0] is the identity.
        assert!(matches!(t2, TensorData::Owned(_)));
        assert_eq!(&*t2.bytes()?, &src[..]);
        let t3 = TensorData::transposed(t1.clone(), &[4, 2, 3], &[2, 0, 1], 4)?;
        let step = naive_transpose(&t1.bytes()?, &[4, 2, 3], &[2, 0, 1], 4);
        assert!(
            matches!(&t3, TensorData::Transposed { source, .. } if matches!(**source, TensorData::Owned(_)))
        );
        assert_eq!(&*t3.bytes()?, &step[..]);
        let own = || TensorData::owned(src.clone());
        assert!(TensorData::transposed(own(), &dims, &[0, 0, 1], 4).is_err());
        assert!(TensorData::transposed(own(), &dims, &[0, 1], 4).is_err());
        assert!(TensorData::transposed(own(), &dims, &[3, 0, 1], 4).is_err());
        assert!(TensorData::transposed(own(), &[2, 3, 5], &[2, 0, 1], 4).is_err());
        assert!(TensorData::transposed(own(), &dims, &[2, 0, 1], 0).is_err());
        let t = TensorData::transposed(own(), &dims, &[1, 0, 2], 4)?;
        assert!(t.read_into(t.len() - 2, &mut [0u8; 4]).is_err());
        Ok(())
    }

    /// The transpose of a packed `[K, n0 + n1]` concatenation of transposed `[n_i, K]`
    /// weights is the weights one after the other: no strided reads.
    #[test]
    fn transpose_of_concatenated_transposes_is_their_plain_concatenation() -> io::Result<()> {
        let (s0, s1) = (pattern(2 * 3 * 4, 1), pattern(3 * 4, 2));
        let t0 = TensorData::transposed(TensorData::owned(s0.clone()), &[2, 3], &[1, 0], 4)?;
        let t1 = TensorData::transposed(TensorData::owned(s1.clone()), &[1, 3], &[1, 0], 4)?;
        let packed = TensorData::concat_rows(vec![t0, t1], 3)?;
        let want = naive_transpose(&packed.bytes()?, &[3, 3], &[1, 0], 4);
        let back = TensorData::transposed(packed.clone(), &[3, 3], &[1, 0], 4)?;
        assert!(matches!(&back, TensorData::Concat { rows: 1, .. }));
        assert_eq!(&*back.bytes()?, &want[..]);
        assert_eq!(&*back.bytes()?, &[s0, s1].concat()[..]);
        // A part that is not a transpose keeps the general (banded) transpose.
        let plain = TensorData::concat_rows(vec![TensorData::owned(pattern(3 * 4, 3)), packed], 3)?;
        let t = TensorData::transposed(plain.clone(), &[3, 4], &[1, 0], 4)?;
        assert!(matches!(t, TensorData::Transposed { .. }));
        assert_eq!(
            &*t.bytes()?,
            &naive_transpose(&plain.bytes()?, &[3, 4], &[1, 0], 4)[..]
        );
        Ok(())
    }

    /// Parts one after the other (`rows` 1) and converted tensors larger than a conversion
    /// window read the same bytes at any range, streamed in bands or read whole.
    #[test]
    fn stacked_parts_and_windowed_conversions_read_at_any_range() -> io::Result<()> {
        let n = CONVERT_WINDOW as usize + 1001;
        let src: Vec<u8> = (0..n as u32)
            .flat_map(|i| ((i % 3000) as u16 + 0x3c00).to_le_bytes())
            .collect();
        let conv = TensorData::converted(TensorData::owned(src.clone()), DType::BF16, DType::F32)
            .ok_or_else(|| io::Error::other("bf16 → f32 not convertible"))?;
        let want_conv: Vec<u8> = src
            .chunks_exact(2)
            .flat_map(|c| (u32::from(u16::from_le_bytes([c[0], c[1]])) << 16).to_le_bytes())
            .collect();
        let a = pattern(4 * 10, 7);
        let cat = TensorData::Concat {
            parts: vec![TensorData::owned(a.clone()), conv.clone()].into(),
            rows: 1,
        };
        let want = [a, want_conv.clone()].concat();
        assert_eq!(&*conv.bytes()?, &want_conv[..]);
        assert_eq!(&*cat.bytes()?, &want[..]);
        let mut streamed = Vec::new();
        cat.write_to(&mut streamed)?;
        assert!(streamed == want);
        let edge = 40 + 4 * CONVERT_WINDOW as usize;
        for (off, len) in [
            (0, 41),
            (3, 4000),
            (38, 9),
            (edge - 5, 11),
            (edge + 2, 3),
            (1, want.len() - 2),
        ] {
            let mut part = vec![0u8; len];
            cat.read_into(off as u64, &mut part)?;
            assert!(part == want[off..off + len], "offset {off} length {len}");
        }
        Ok(())
    }

    #[test]
    fn concat_rows_interleaves_rows() -> io::Result<()> {
        let a = pattern(3 * 8, 1);
        let b = pattern(3 * 4, 2);
        // A transposed part, as the attention QKV packing builds.
        let c_src = pattern(3 * 2 * 4, 3);
        let c = TensorData::transposed(TensorData::owned(c_src.clone()), &[2, 3], &[1, 0], 4)?;
        let c_bytes = c.bytes()?.into_owned();
        let mut want = Vec::new();
        for r in 0..3 {
            want.extend_from_slice(&a[r * 8..(r + 1) * 8]);
            want.extend_from_slice(&b[r * 4..(r + 1) * 4]);
            want.extend_from_slice(&c_bytes[r * 8..(r + 1) * 8]);
        }
        let cat = TensorData::concat_rows(
            vec![
                TensorData::owned(a.clone()),
                TensorData::owned(b.clone()),
                c,
            ],
            3,
        )?;
        assert_eq!(cat.len(), want.len() as u64);
        assert_eq!(&*cat.bytes()?, &want[..]);
        let mut w = Vec::new();
        cat.write_to(&mut w)?;
        assert_eq!(w, want);
        for chunk in [1, 5, 20, 1000] {
            let mut got = Vec::new();
            cat.for_each_chunk(chunk, |c| {
                got.extend_from_slice(c);
                Ok(())
            })?;
            assert_eq!(got, want, "chunk {chunk}");
        }
        for off in 0..want.len() {
            let mut part = vec![0u8; (want.len() - off).min(7)];
            cat.read_into(off as u64, &mut part)?;
            assert_eq!(part, want[off..off + part.len()]);
        }
        assert!(
            TensorData::concat_rows(vec![TensorData::owned(a), TensorData::owned(vec![0; 5])], 3)
                .is_err()
        );
        let one = TensorData::concat_rows(vec![TensorData::owned(b)], 3)?;
        assert!(matches!(one, TensorData::Owned(_)));
        Ok(())
    }

    /// Rows of `width` bytes, byte `c` of row `r` a function of both; `work` bytes of working
    /// memory per row, so bands hold `BAND_BYTES / work` rows. Counts calls.
    struct Pattern {
        rows: u64,
        width: u64,
        work: u64,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl RowProducer for Pattern {
        fn total_bytes(&self) -> u64 {
            self.rows * self.width
        }
        fn row_bytes(&self) -> u64 {
            self.width
        }
        fn row_work(&self) -> u64 {
            self.work
        }
        fn produce(&self, first: u64, out: &mut [u8]) -> io::Result<()> {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            assert!((out.len() as u64).is_multiple_of(self.width), "whole rows");
            assert!(out.len() as u64 / self.width * self.work <= BAND_BYTES as u64);
            for (i, row) in out.chunks_mut(self.width as usize).enumerate() {
                let r = first + i as u64;
                assert!(r < self.rows);
                for (c, b) in row.iter_mut().enumerate() {
                    *b = (r as u8).wrapping_mul(7) ^ (c as u8).wrapping_mul(13);
                }
            }
            Ok(())
        }
    }

    #[test]
    fn produced_streams_in_bands_at_odd_boundaries() -> io::Result<()> {
        // 4 rows per band (work per row just over a fifth of the band limit), 23 rows of 7.
        let (rows, width) = (23u64, 7u64);
        let work = BAND_BYTES as u64 / 5 + 1;
        let want: Vec<u8> = (0..rows)
            .flat_map(|r| {
                (0..width).map(move |c| (r as u8).wrapping_mul(7) ^ (c as u8).wrapping_mul(13))
            })
            .collect();
        let p = Arc::new(Pattern {
            rows,
            width,
            work,
            calls: Default::default(),
        });
        let d = TensorData::Produced(p.clone());
        assert!(d.is_derived());
        assert_eq!(d.len(), want.len() as u64);
        assert_eq!(&*d.bytes()?, &want[..]);
        let mut w = Vec::new();
        d.write_to(&mut w)?;
        assert_eq!(w, want);
        for chunk in [1, 3, 7, 30, 1000] {
            let mut got = Vec::new();
            d.for_each_chunk(chunk, |c| {
                assert!(c.len() <= chunk);
                got.extend_from_slice(c);
                Ok(())
            })?;
            assert_eq!(got, want, "chunk {chunk}");
        }
        // Streaming is one band of 4 rows at a time: ceil(23 / 4) calls.
        p.calls.store(0, std::sync::atomic::Ordering::Relaxed);
        d.write_to(&mut Vec::new())?;
        assert_eq!(p.calls.load(std::sync::atomic::Ordering::Relaxed), 6);
        for off in 0..want.len() {
            for len in [0, 1, 6, 7, 8, 29, 40] {
                let len = len.min(want.len() - off);
                let mut part = vec![0u8; len];
                d.read_into(off as u64, &mut part)?;
                assert_eq!(part, want[off..off + len], "{off}+{len}");
            }
        }
        assert!(d.read_into(want.len() as u64 - 2, &mut [0u8; 3]).is_err());
        // A producer as the source of a transpose reads only what the bands need.
        let t = TensorData::transposed(d.clone(), &[23, 7], &[1, 0], 1)?;
        assert_eq!(
            &*t.bytes()?,
            &naive_transpose(&want, &[23, 7], &[1, 0], 1)[..]
        );
        Ok(())
    }

    #[test]
    fn converted_ranges_read_the_same_bytes() -> io::Result<()> {
        let h: Vec<u8> = [1.0f32, -2.0, 0.5, 3.25]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let d = TensorData::converted(TensorData::owned(h), DType::F16, DType::F32)
            .ok_or_else(|| io::Error::other("no conversion"))?;
        let all = d.bytes()?.into_owned();
        for off in 0..all.len() {
            for len in 0..=(all.len() - off) {
                let mut part = vec![0u8; len];
                d.read_into(off as u64, &mut part)?;
                assert_eq!(part, all[off..off + len]);
            }
        }
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
