//! Writes an empty qcow2 overlay in-process: what `qemu-img create -f qcow2
//! -b BACKING -F FORMAT` makes, without starting a process per boot (that
//! exec was a measurable part of a snapshot restore).
//!
//! Layout (qcow2 version 3, 64 KiB clusters, 16-bit refcounts):
//!
//! ```text
//! cluster 0  header, backing-format extension, end marker, backing path
//! cluster 1  refcount table: one entry, pointing at cluster 2
//! cluster 2  refcount block: clusters 0..=3+ have refcount 1
//! cluster 3  L1 table (all zero: nothing allocated, every read falls
//!            through to the backing file)
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
const VERSION: u32 = 3;
const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
const REFCOUNT_ORDER: u32 = 4; // 16-bit refcounts
const HEADER_LENGTH: u32 = 104;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_END: u32 = 0;

/// The virtual size of `backing`: the size field of a qcow2 header, or the
/// length of a raw image.
pub fn virtual_size(backing: &Path, format: &str) -> io::Result<u64> {
    match format {
        "raw" => Ok(std::fs::metadata(backing)?.len()),
        "qcow2" => {
            let mut header = [0u8; 32];
            File::open(backing)?.read_exact(&mut header)?;
            if u32::from_be_bytes(header[0..4].try_into().unwrap()) != MAGIC {
                return Err(io::Error::other(format!(
                    "{} is not a qcow2 image",
                    backing.display()
                )));
            }
            Ok(u64::from_be_bytes(header[24..32].try_into().unwrap()))
        }
        other => Err(io::Error::other(format!(
            "unsupported backing format {other}"
        ))),
    }
}

/// Creates `overlay` (which must not exist) over `backing` (an absolute
/// path, `format` "raw" or "qcow2"), with the backing's virtual size.
pub fn create_overlay(backing: &Path, format: &str, overlay: &Path) -> io::Result<()> {
    if !backing.is_absolute() {
        return Err(io::Error::other("the backing path must be absolute"));
    }
    let size = virtual_size(backing, format)?;
    let backing = Backing {
        path: backing.as_os_str().as_encoded_bytes(),
        format,
    };
    write_new(overlay, &image_bytes(Some(backing), size)?)
}

/// Creates `path` (which must not exist): an empty qcow2 image of `size`
/// virtual bytes with no backing file (one is given when QEMU opens it:
/// the microVM volume slots, see `super::layers`).
pub fn create_empty(path: &Path, size: u64) -> io::Result<()> {
    write_new(path, &image_bytes(None, size)?)
}

fn write_new(path: &Path, image: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(image)
}

struct Backing<'a> {
    path: &'a [u8],
    format: &'a str,
}

fn image_bytes(backing: Option<Backing<'_>>, size: u64) -> io::Result<Vec<u8>> {
    // Each L1 entry maps one L2 table: CLUSTER / 8 clusters of data.
    let per_l1_entry = CLUSTER * (CLUSTER / 8);
    let l1_entries = size.div_ceil(per_l1_entry).max(1);
    let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER);
    let clusters = 3 + l1_clusters;
    // One refcount block (CLUSTER / 2 entries) covers the image's clusters.
    if clusters > CLUSTER / 2 {
        return Err(io::Error::other(
            "virtual size too large for one refcount block",
        ));
    }
    let mut extensions = Vec::new();
    let mut push_extension = |kind: u32, data: &[u8]| {
        extensions.extend_from_slice(&kind.to_be_bytes());
        extensions.extend_from_slice(&(data.len() as u32).to_be_bytes());
        extensions.extend_from_slice(data);
        extensions.resize(extensions.len().next_multiple_of(8), 0);
    };
    if let Some(backing) = &backing {
        push_extension(EXT_BACKING_FORMAT, backing.format.as_bytes());
    }
    push_extension(EXT_END, &[]);
    let backing_path: &[u8] = backing.as_ref().map_or(&[], |b| b.path);
    // Offset 0 with length 0 is qcow2's "no backing file".
    let backing_offset = match backing {
        Some(_) => HEADER_LENGTH as u64 + extensions.len() as u64,
        None => 0,
    };
    if backing_offset + backing_path.len() as u64 > CLUSTER || backing_path.len() > 1023 {
        return Err(io::Error::other("backing path too long"));
    }

    let mut image = vec![0u8; (clusters * CLUSTER) as usize];
    let mut header = Vec::with_capacity(HEADER_LENGTH as usize);
    header.extend_from_slice(&MAGIC.to_be_bytes());
    header.extend_from_slice(&VERSION.to_be_bytes());
    header.extend_from_slice(&backing_offset.to_be_bytes());
    header.extend_from_slice(&(backing_path.len() as u32).to_be_bytes());
    header.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
    header.extend_from_slice(&size.to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes()); // no encryption
    header.extend_from_slice(&(l1_entries as u32).to_be_bytes());
    header.extend_from_slice(&(3 * CLUSTER).to_be_bytes()); // L1 table
    header.extend_from_slice(&CLUSTER.to_be_bytes()); // refcount table
    header.extend_from_slice(&1u32.to_be_bytes()); // its clusters
    header.extend_from_slice(&0u32.to_be_bytes()); // snapshots
    header.extend_from_slice(&0u64.to_be_bytes()); // snapshots offset
    header.extend_from_slice(&0u64.to_be_bytes()); // incompatible features
    header.extend_from_slice(&0u64.to_be_bytes()); // compatible features
    header.extend_from_slice(&0u64.to_be_bytes()); // autoclear features
    header.extend_from_slice(&REFCOUNT_ORDER.to_be_bytes());
    header.extend_from_slice(&HEADER_LENGTH.to_be_bytes());
    debug_assert_eq!(header.len(), HEADER_LENGTH as usize);

    image[..header.len()].copy_from_slice(&header);
    let at = HEADER_LENGTH as usize;
    image[at..at + extensions.len()].copy_from_slice(&extensions);
    let at = backing_offset as usize;
    image[at..at + backing_path.len()].copy_from_slice(backing_path);
    // Refcount table entry 0 → the refcount block in cluster 2.
    let table = CLUSTER as usize;
    image[table..table + 8].copy_from_slice(&(2 * CLUSTER).to_be_bytes());
    let block = 2 * CLUSTER as usize;
    for cluster in 0..clusters as usize {
        image[block + 2 * cluster..block + 2 * cluster + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `qemu-img check` and `qemu-img info` accept what we write, and see
    /// the backing file, its format and the size.
    #[test]
    fn qemu_img_accepts_the_overlay() {
        let Some(qemu_img) = crate::templates::find_in_path("qemu-img") else {
            println!("SKIP qemu_img_accepts_the_overlay: qemu-img is not installed");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("base.raw");
        std::fs::write(&raw, vec![7u8; 3 << 20]).unwrap();
        let first = dir.path().join("first.qcow2");
        create_overlay(&raw, "raw", &first).unwrap();
        // An overlay over an overlay, as a clone's disk over a snapshot's.
        let second = dir.path().join("second.qcow2");
        create_overlay(&first, "qcow2", &second).unwrap();
        for image in [&first, &second] {
            let check = std::process::Command::new(&qemu_img)
                .arg("check")
                .arg(image)
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "{}",
                String::from_utf8_lossy(&check.stdout)
            );
        }
        let info = std::process::Command::new(&qemu_img)
            .args(["info", "--output=json"])
            .arg(&second)
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["virtual-size"], 3 << 20, "{info}");
        assert_eq!(info["backing-filename"], first.display().to_string());
        assert_eq!(info["backing-filename-format"], "qcow2");
        // Reads fall through to the base.
        let out = dir.path().join("out.raw");
        let convert = std::process::Command::new(&qemu_img)
            .args(["convert", "-O", "raw"])
            .arg(&second)
            .arg(&out)
            .status()
            .unwrap();
        assert!(convert.success());
        assert_eq!(std::fs::read(&out).unwrap(), vec![7u8; 3 << 20]);
    }

    /// A standalone image: no backing, the size asked for, reads as zeros.
    #[test]
    fn qemu_img_accepts_an_empty_image() {
        let Some(qemu_img) = crate::templates::find_in_path("qemu-img") else {
            println!("SKIP qemu_img_accepts_an_empty_image: qemu-img is not installed");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("slot.qcow2");
        create_empty(&image, 1 << 20).unwrap();
        let check = std::process::Command::new(&qemu_img)
            .arg("check")
            .arg(&image)
            .output()
            .unwrap();
        assert!(check.status.success(), "{check:?}");
        let info = std::process::Command::new(&qemu_img)
            .args(["info", "--output=json"])
            .arg(&image)
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["virtual-size"], 1 << 20, "{info}");
        assert!(info.get("backing-filename").is_none(), "{info}");
        assert_eq!(virtual_size(&image, "qcow2").unwrap(), 1 << 20);
    }

    #[test]
    fn refuses_what_it_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        assert!(create_overlay(Path::new("relative"), "raw", &dir.path().join("o")).is_err());
        let raw = dir.path().join("base.raw");
        std::fs::write(&raw, b"x").unwrap();
        assert!(create_overlay(&raw, "vmdk", &dir.path().join("o")).is_err());
        assert!(virtual_size(&raw, "qcow2").is_err(), "not a qcow2 header");
    }
}
