//! The output format writers, each checked by a reader that is not ours: qemu-img with an explicit `-f`, GNU tar,
//! Python's XML parser; plus our own reading of the VHD footer. They run on a small sparse disk, so they are fast.

use std::path::{Path, PathBuf};
use std::process::Command;

use foobar_builder::formats::{self, Format, Stamp};

use crate::support::{self, sha256sum};

const MIB: u64 = 1 << 20;

/// A 64 MiB sparse disk with data in a few places, like a real one: start, middle, last sector.
fn small_disk(dir: &Path) -> PathBuf {
    use std::os::unix::fs::FileExt as _;
    let path = dir.join("disk.raw");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(64 * MIB).unwrap();
    file.write_all_at(b"first sector: a boot record stand-in", 0).unwrap();
    let block: Vec<u8> = (0..3 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    file.write_all_at(&block, 10 * MIB).unwrap();
    file.write_all_at(b"the backup GPT header stand-in", 64 * MIB - 512)
        .unwrap();
    path
}

fn stamp(dir: &Path) -> Stamp<'static> {
    Stamp {
        epoch: 1_700_000_000,
        seed: "test-seed",
        name: "foobar".to_string(),
        scratch: dir.join("scratch"),
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_img_info(format: &str, path: &Path) -> serde_json::Value {
    let text = run(
        "qemu-img",
        &["info", "-f", format, "--output", "json", path.to_str().unwrap()],
    );
    serde_json::from_str(&text).unwrap()
}

/// qemu-img reads `image` as `format` and finds the same disk as `raw` (beyond its end, only zeros).
fn assert_same_disk(raw: &Path, format: &str, image: &Path) {
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            format,
            raw.to_str().unwrap(),
            image.to_str().unwrap(),
        ],
    );
    assert!(out.contains("Images are identical"), "{out}");
}

/// Writes `format` twice into two directories and checks the bytes are equal: nothing random or time-dependent.
fn write_twice(format: Format, raw: &Path, dir: &Path, file: &str) -> PathBuf {
    let mut paths = Vec::new();
    for run in ["a", "b"] {
        let out = dir.join(run);
        std::fs::create_dir_all(&out).unwrap();
        let dest = out.join(file);
        formats::write(format, raw, &dest, &stamp(&out)).unwrap();
        paths.push(dest);
    }
    assert_eq!(sha256sum(&paths[0]), sha256sum(&paths[1]), "{file}: two writes differ");
    paths.remove(0)
}

#[test]
fn fixed_vhd_has_a_valid_footer_and_qemu_reads_the_same_disk() {
    let dir = support::temp_dir("fmt-vhd");
    let raw = small_disk(&dir);
    let vhd = write_twice(Format::Vhd, &raw, &dir, "foobar.vhd");
    let bytes = std::fs::read(&vhd).unwrap();
    let footer = &bytes[bytes.len() - 512..];
    let size = (bytes.len() - 512) as u64;
    assert_eq!(size % MIB, 0, "virtual size a multiple of 1 MiB");
    assert!(size >= 64 * MIB);
    assert_eq!(&footer[0..8], b"conectix");
    assert_eq!(
        u32::from_be_bytes(footer[60..64].try_into().unwrap()),
        2,
        "disk type fixed"
    );
    assert_eq!(
        u64::from_be_bytes(footer[48..56].try_into().unwrap()),
        size,
        "current size"
    );
    assert_eq!(
        u64::from_be_bytes(footer[16..24].try_into().unwrap()),
        u64::MAX,
        "no data offset"
    );
    let stored = u32::from_be_bytes(footer[64..68].try_into().unwrap());
    let sum = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |acc, (_, b)| acc.wrapping_add(u32::from(*b)));
    assert_eq!(stored, !sum, "footer checksum");
    // The CHS geometry covers the disk exactly, so readers that use it and readers that use the size agree.
    let cylinders = u64::from(u16::from_be_bytes(footer[56..58].try_into().unwrap()));
    let (heads, sectors) = (u64::from(footer[58]), u64::from(footer[59]));
    assert_eq!(cylinders * heads * sectors * 512, size);

    let info = qemu_img_info("vpc", &vhd);
    assert_eq!(info["virtual-size"], size, "{info}");
    assert_same_disk(&raw, "vpc", &vhd);
    // A damaged footer is noticed by qemu-img, so the check above can fail.
    let mut damaged = bytes.clone();
    let n = damaged.len();
    damaged[n - 512..n - 504].copy_from_slice(b"notavhd!");
    let bad = dir.join("damaged.vhd");
    std::fs::write(&bad, &damaged).unwrap();
    let out = Command::new("qemu-img")
        .args(["info", "-f", "vpc"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn vhd_padding_keeps_chs_exact_for_common_sizes() {
    for mib in [64, 1024, 2048, 2049, 10 * 1024, 40 * 1024] {
        let padded = formats::vhd::padded_size(mib * MIB);
        assert!(padded >= mib * MIB && padded.is_multiple_of(MIB));
        assert!(padded - mib * MIB < 256 * MIB, "{mib} MiB padded to {padded}");
        let (c, h, s) = formats::vhd::geometry(padded / 512);
        assert_eq!(u64::from(c) * u64::from(h) * u64::from(s) * 512, padded, "{mib} MiB");
    }
}

#[test]
fn gce_archive_is_gnu_tar_with_one_sparse_disk_raw_of_whole_gib() {
    let dir = support::temp_dir("fmt-gce");
    let raw = small_disk(&dir);
    let archive = write_twice(Format::Gce, &raw, &dir, "foobar.tar.gz");
    let bytes = std::fs::read(&archive).unwrap();
    assert_eq!(&bytes[0..2], &[0x1f, 0x8b], "gzip");
    assert_eq!(&bytes[4..8], &[0, 0, 0, 0], "no time in the gzip header");
    // Small: only the data regions are stored.
    assert!(bytes.len() < 8 * MIB as usize, "{} bytes", bytes.len());

    let listing = run("tar", &["-tvzf", archive.to_str().unwrap()]);
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 1, "{listing}");
    assert!(lines[0].ends_with(" disk.raw"), "{listing}");
    assert!(lines[0].contains(" 1073741824 "), "the member is 1 GiB: {listing}");
    let header = run(
        "sh",
        &[
            "-c",
            &format!("gzip -dc '{}' | head -c 512 | od -An -c -j 156 -N 1", archive.display()),
        ],
    );
    assert_eq!(header.trim(), "S", "old GNU sparse member");
    let magic = run(
        "sh",
        &[
            "-c",
            &format!("gzip -dc '{}' | head -c 265 | tail -c 8", archive.display()),
        ],
    );
    assert_eq!(magic, "ustar  \0", "old GNU format magic");

    let out = dir.join("extracted");
    std::fs::create_dir_all(&out).unwrap();
    run("tar", &["-xzf", archive.to_str().unwrap(), "-C", out.to_str().unwrap()]);
    let disk = out.join("disk.raw");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 1 << 30);
    assert_same_disk(&raw, "raw", &disk);
}

#[test]
fn vmdk_is_stream_optimized_reproducible_and_names_itself() {
    let dir = support::temp_dir("fmt-vmdk");
    let raw = small_disk(&dir);
    let vmdk = write_twice(Format::Vmdk, &raw, &dir, "foobar.vmdk");
    let info = qemu_img_info("vmdk", &vmdk);
    assert_eq!(
        info["format-specific"]["data"]["create-type"], "streamOptimized",
        "{info}"
    );
    assert_eq!(info["virtual-size"], 64 * MIB);
    assert_same_disk(&raw, "vmdk", &vmdk);
    let head = std::fs::read(&vmdk).unwrap();
    let text = String::from_utf8_lossy(&head[..4096]);
    assert!(
        text.contains("\"foobar.vmdk\""),
        "the descriptor names the file: {text}"
    );
    assert!(text.contains("ddb.adapterType = \"lsilogic\""), "{text}");
}

#[test]
fn ova_holds_descriptor_manifest_and_disk_in_order_and_the_manifest_matches() {
    let dir = support::temp_dir("fmt-ova");
    let raw = small_disk(&dir);
    let ova = write_twice(Format::Ova, &raw, &dir, "foobar.ova");
    let listing = run("tar", &["-tf", ova.to_str().unwrap()]);
    assert_eq!(
        listing.lines().collect::<Vec<_>>(),
        ["foobar.ovf", "foobar.mf", "foobar-disk1.vmdk"]
    );
    let magic = &std::fs::read(&ova).unwrap()[257..263];
    assert_eq!(magic, b"ustar\0", "POSIX ustar, as OVF requires");
    let out = dir.join("extracted");
    std::fs::create_dir_all(&out).unwrap();
    run("tar", &["-xf", ova.to_str().unwrap(), "-C", out.to_str().unwrap()]);

    let manifest = std::fs::read_to_string(out.join("foobar.mf")).unwrap();
    for file in ["foobar.ovf", "foobar-disk1.vmdk"] {
        let line = format!("SHA256({file})= {}", sha256sum(&out.join(file)));
        assert!(manifest.lines().any(|l| l == line), "{line} not in:\n{manifest}");
    }
    let ovf = std::fs::read_to_string(out.join("foobar.ovf")).unwrap();
    // Well-formed XML, read by a parser that is not ours.
    run(
        "python3",
        &[
            "-c",
            "import sys, xml.etree.ElementTree as e; e.parse(sys.argv[1])",
            out.join("foobar.ovf").to_str().unwrap(),
        ],
    );
    let disk_bytes = std::fs::metadata(out.join("foobar-disk1.vmdk")).unwrap().len();
    for needle in [
        format!("ovf:href=\"foobar-disk1.vmdk\" ovf:id=\"file1\" ovf:size=\"{disk_bytes}\""),
        "ovf:capacity=\"64\" ovf:capacityAllocationUnits=\"byte * 2^20\"".to_string(),
        "<rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>\n        <rasd:ResourceType>6</rasd:ResourceType>"
            .to_string(),
        "<rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>".to_string(),
        "<rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>\n        <rasd:ResourceType>10</rasd:ResourceType>"
            .to_string(),
        "vmw:key=\"firmware\" vmw:value=\"bios\"".to_string(),
    ] {
        assert!(ovf.contains(&needle), "OVF lacks {needle}:\n{ovf}");
    }
    assert_same_disk(&raw, "vmdk", &out.join("foobar-disk1.vmdk"));
}

#[test]
fn each_format_is_chosen_by_extension_or_flag() {
    let out = Path::new("/tmp/x/foobar.qcow2");
    let all: Vec<String> = ["qcow2", "raw", "vmdk", "vhd", "tar.gz", "ova"]
        .map(String::from)
        .to_vec();
    let plan = formats::plan(out, &all).unwrap();
    let names: Vec<String> = plan
        .iter()
        .map(|(_, p)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "foobar.qcow2",
            "foobar.raw",
            "foobar.vmdk",
            "foobar.vhd",
            "foobar.tar.gz",
            "foobar.ova"
        ]
    );
    let plan = formats::plan(Path::new("/tmp/x/site.tar.gz"), &[]).unwrap();
    assert_eq!(plan[0].0, Format::Gce);
    let err = formats::plan(out, &["iso".to_string()]).unwrap_err().to_string();
    assert!(
        err.contains("unknown format `iso`") && err.contains("tar.gz (GCE)"),
        "{err}"
    );
}

#[test]
fn the_vmdk_content_id_is_rewritten_whole_even_when_qemu_img_wrote_it_short() {
    // qemu-img prints the random id without leading zeros: 7 digits one time in 16. The descriptor must stay intact.
    let dir = support::temp_dir("fmt-cid");
    let path = dir.join("d.vmdk");
    let text =
        "KDMV\n# Disk DescriptorFile\nversion=1\nCID=abc1234\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n";
    let mut bytes = text.as_bytes().to_vec();
    bytes.resize(4096, 0);
    std::fs::write(&path, &bytes).unwrap();
    formats::vmdk::set_cid(&path, 0xabcd).unwrap();
    let after = std::fs::read(&path).unwrap();
    assert_eq!(after.len(), 4096);
    let end = after.iter().position(|b| *b == 0).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&after[..end]),
        text.replace("CID=abc1234\n", "CID=0000abcd\n")
    );
    assert!(after[end..].iter().all(|b| *b == 0));
}
