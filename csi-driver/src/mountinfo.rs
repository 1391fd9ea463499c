//! Parser for `/proc/<pid>/mountinfo` (proc(5)).
//!
//! Owns turning the kernel's mount table text into [`MountEntry`] values; pure, so every
//! quirk (octal escapes, optional fields, the `-` separator) is unit-tested. It must not
//! perform mounts or decide policy: callers ask questions such as "is this path a mount
//! point, and of which filesystem type".

use std::path::{Path, PathBuf};

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Unique id of the mount.
    pub mount_id: u32,
    /// Id of the parent mount.
    pub parent_id: u32,
    /// `major:minor` of the device (FUSE connections get an anonymous one per superblock).
    pub major_minor: String,
    /// Directory of the filesystem that forms the root of this mount (`/` or a bind's subdir).
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `nosuid`, ...).
    pub mount_options: Vec<String>,
    /// Filesystem type, e.g. `fuse.juicefs`.
    pub fs_type: String,
    /// Filesystem-specific source, e.g. `JuiceFS:myfs`.
    pub source: String,
    /// Per-superblock options.
    pub super_options: Vec<String>,
}

impl MountEntry {
    /// True when the mount itself is read-only.
    pub fn is_read_only(&self) -> bool {
        self.mount_options.iter().any(|o| o == "ro")
    }

    /// True for a JuiceFS FUSE mount (`fuse.juicefs`).
    pub fn is_juicefs(&self) -> bool {
        self.fs_type == "fuse.juicefs"
    }
}

/// A malformed mountinfo line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseMountInfo {
    /// A line has fewer fields than proc(5) requires.
    #[error("mountinfo line {line}: expected at least 10 fields, found {found}")]
    TooFewFields { line: usize, found: usize },
    /// The optional-field list is not terminated by `-`.
    #[error("mountinfo line {line}: missing the '-' separator")]
    MissingSeparator { line: usize },
    /// A numeric id did not parse.
    #[error("mountinfo line {line}: bad {field} {value:?}")]
    BadNumber {
        line: usize,
        field: &'static str,
        value: String,
    },
}

/// Parses the full text of a mountinfo file.
///
/// Errors: the first malformed line; empty lines are skipped.
pub fn parse(text: &str) -> Result<Vec<MountEntry>, ParseMountInfo> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| parse_line(i + 1, l))
        .collect()
}

fn parse_line(line: usize, text: &str) -> Result<MountEntry, ParseMountInfo> {
    let fields: Vec<&str> = text.split(' ').collect();
    if fields.len() < 10 {
        return Err(ParseMountInfo::TooFewFields {
            line,
            found: fields.len(),
        });
    }
    let sep = fields
        .iter()
        .skip(6)
        .position(|f| *f == "-")
        .map(|p| p + 6)
        .ok_or(ParseMountInfo::MissingSeparator { line })?;
    if fields.len() < sep + 4 {
        return Err(ParseMountInfo::TooFewFields {
            line,
            found: fields.len(),
        });
    }
    let number = |field: &'static str, value: &str| {
        value.parse::<u32>().map_err(|_| ParseMountInfo::BadNumber {
            line,
            field,
            value: value.to_string(),
        })
    };
    Ok(MountEntry {
        mount_id: number("mount id", fields[0])?,
        parent_id: number("parent id", fields[1])?,
        major_minor: fields[2].to_string(),
        root: PathBuf::from(unescape(fields[3])),
        mount_point: PathBuf::from(unescape(fields[4])),
        mount_options: split_options(fields[5]),
        fs_type: unescape(fields[sep + 1]),
        source: unescape(fields[sep + 2]),
        super_options: split_options(fields[sep + 3]),
    })
}

fn split_options(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|o| !o.is_empty())
        .map(str::to_string)
        .collect()
}

/// Undoes the kernel's `\ooo` octal escaping of space, tab, newline and backslash.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(b) = u8::try_from(value) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads and parses `/proc/self/mountinfo`.
pub fn read_self() -> std::io::Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    parse(&text).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The last (top-most) mount at `path`, if any; later lines shadow earlier ones.
pub fn find<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    entries.iter().rev().find(|e| e.mount_point == path)
}

/// How many mounts are stacked at `path`.
pub fn count_at(entries: &[MountEntry], path: &Path) -> usize {
    entries.iter().filter(|e| e.mount_point == path).count()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
36 22 0:32 / /var/lib/kubelet/plugins/kubernetes.io/csi/csi.shoal.dev/abc/globalmount rw,relatime shared:40 - fuse.juicefs JuiceFS:shoal rw,user_id=0,group_id=0,default_permissions,allow_other
37 22 0:32 /pvc-1 /var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pvc-1/mount ro,relatime shared:40 - fuse.juicefs JuiceFS:shoal rw,user_id=0,group_id=0
38 22 0:33 / /mnt/with\\040space rw master:3 propagate_from:2 unbindable - tmpfs tmpfs rw
";

    #[test]
    fn parses_fields_of_a_juicefs_mount_and_its_bind() {
        let e = parse(SAMPLE).unwrap();
        assert_eq!(e.len(), 4);
        assert!(e[1].is_juicefs());
        assert_eq!(e[1].source, "JuiceFS:shoal");
        assert_eq!(e[1].major_minor, "0:32");
        assert!(!e[1].is_read_only());
        assert_eq!(e[2].root, PathBuf::from("/pvc-1"));
        assert!(e[2].is_read_only());
        assert_eq!(e[2].parent_id, 22);
        assert!(e[1].super_options.iter().any(|o| o == "allow_other"));
    }

    #[test]
    fn unescapes_octal_space_and_handles_many_optional_fields() {
        let e = parse(SAMPLE).unwrap();
        assert_eq!(e[3].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(e[3].fs_type, "tmpfs");
        assert_eq!(unescape("a\\134b\\011c\\012"), "a\\b\tc\n");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
        assert_eq!(unescape("\\999"), "\\999");
    }

    #[test]
    fn finds_the_topmost_mount_at_a_path() {
        let text = format!("{SAMPLE}39 36 0:40 / / rw - tmpfs t rw\n");
        let e = parse(&text).unwrap();
        assert_eq!(find(&e, Path::new("/")).unwrap().mount_id, 39);
        assert_eq!(count_at(&e, Path::new("/")), 2);
        assert!(find(&e, Path::new("/nope")).is_none());
    }

    #[test]
    fn rejects_malformed_lines_with_their_line_number() {
        assert_eq!(
            parse("1 2 3\n"),
            Err(ParseMountInfo::TooFewFields { line: 1, found: 3 })
        );
        assert_eq!(
            parse("\n1 2 0:1 / /a rw x y z w v\n"),
            Err(ParseMountInfo::MissingSeparator { line: 2 })
        );
        assert!(matches!(
            parse("x 2 0:1 / /a rw - tmpfs t rw"),
            Err(ParseMountInfo::BadNumber { line: 1, .. })
        ));
    }

    #[test]
    fn reads_this_process_mount_table() {
        let e = read_self().unwrap();
        assert!(e.iter().any(|m| m.mount_point == Path::new("/")));
    }
}
