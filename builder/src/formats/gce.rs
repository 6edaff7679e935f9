//! The Google Compute Engine image: a gzip-compressed tar in the old GNU format with one sparse member, `disk.raw`,
//! whose size is a whole number of GiB (what `gcloud compute images create --source-uri` takes).
//!
//! The member is written in GNU's "old" sparse form: the header lists the data regions (offset, length) and only their
//! bytes follow, so the 2 GiB disk is stored as the few hundred MB it holds. Headers come from the `tar` crate's
//! GNU layout; the sparse map is filled in here because the crate reads sparse members but does not write them.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt as _;
use std::os::unix::io::AsRawFd as _;
use std::path::Path;

use anyhow::Context as _;
use flate2::{Compression, GzBuilder};
use tar::{EntryType, GnuExtSparseHeader, GnuSparseHeader, Header};

const GIB: u64 = 1 << 30;

/// The regions of `file` that hold data (SEEK_DATA/SEEK_HOLE); holes are left out.
pub fn data_regions(file: &File, len: u64) -> anyhow::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut regions = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on an open descriptor we own; no memory is touched.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole remains
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        regions.push((data as u64, (end - data) as u64));
        pos = end;
    }
    Ok(regions)
}

/// A 12-byte numeric field: octal when it fits, GNU's base-256 form (first byte 0x80) when it does not.
fn number(field: &mut [u8; 12], value: u64) {
    if value < 8u64.pow(11) {
        field.copy_from_slice(format!("{value:011o}\0").as_bytes());
    } else {
        *field = [0; 12];
        field[0] = 0x80;
        field[4..].copy_from_slice(&value.to_be_bytes());
    }
}

fn sparse_entry(entry: &mut GnuSparseHeader, (offset, length): (u64, u64)) {
    number(&mut entry.offset, offset);
    number(&mut entry.numbytes, length);
}

/// Reads the data regions of the file one after another: the member's stored bytes.
struct Regions<'a> {
    file: &'a File,
    regions: &'a [(u64, u64)],
    index: usize,
    done: u64,
}

impl Read for Regions<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while let Some(&(offset, length)) = self.regions.get(self.index) {
            if self.done == length {
                self.index += 1;
                self.done = 0;
                continue;
            }
            let want = buf.len().min((length - self.done) as usize);
            let n = self.file.read_at(&mut buf[..want], offset + self.done)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the raw disk shrank",
                ));
            }
            self.done += n as u64;
            return Ok(n);
        }
        Ok(0)
    }
}

/// Writes `raw` as `dest` (`.tar.gz`), the member's size rounded up to a whole GiB with a hole.
pub fn write(raw: &Path, dest: &Path, epoch: u64) -> anyhow::Result<()> {
    let file = File::open(raw).with_context(|| format!("cannot open {}", raw.display()))?;
    let len = file.metadata()?.len();
    let size = len.div_ceil(GIB) * GIB;
    let regions = data_regions(&file, len)?;
    let stored: u64 = regions.iter().map(|r| r.1).sum();
    // GNU tar ends the map of a file that ends in a hole with an empty region at its end, so the length is known.
    let mut map = regions.clone();
    map.push((size, 0));

    let mut header = Header::new_gnu();
    header.set_path("disk.raw")?;
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(epoch);
    header.set_entry_type(EntryType::GNUSparse);
    header.set_size(stored);
    let mut extensions: Vec<u8> = Vec::new();
    {
        let gnu = header.as_gnu_mut().expect("a GNU header");
        gnu.uname[..4].copy_from_slice(b"root");
        gnu.gname[..4].copy_from_slice(b"root");
        number(&mut gnu.realsize, size);
        let (first, rest) = map.split_at(map.len().min(gnu.sparse.len()));
        for (entry, region) in gnu.sparse.iter_mut().zip(first) {
            sparse_entry(entry, *region);
        }
        gnu.isextended[0] = u8::from(!rest.is_empty());
        let chunks: Vec<&[(u64, u64)]> = rest.chunks(21).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut ext = GnuExtSparseHeader::new();
            for (entry, region) in ext.sparse.iter_mut().zip(chunk.iter()) {
                sparse_entry(entry, *region);
            }
            ext.isextended[0] = u8::from(i + 1 < chunks.len());
            extensions.extend_from_slice(ext.as_bytes());
        }
    }
    header.set_cksum();

    let out = File::create(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    // No name and time 0 in the gzip header: the bytes depend on the disk alone. Level 1: measured on the 2 GiB
    // image, 2.2 s and 132 MB against level 6's 15.8 s and 113 MB.
    let gz = GzBuilder::new().mtime(0).write(out, Compression::fast());
    let mut builder = tar::Builder::new(gz);
    // The extension headers (whole blocks) sit between the header and the data, which is what `append` pads.
    let data = Regions {
        file: &file,
        regions: &regions,
        index: 0,
        done: 0,
    };
    builder
        .append(&header, extensions.as_slice().chain(data))
        .with_context(|| format!("cannot write {}", dest.display()))?;
    let gz = builder.into_inner()?;
    gz.finish()?.sync_all()?;
    Ok(())
}
