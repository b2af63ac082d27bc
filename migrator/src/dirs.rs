//! Private directories: where memory images and journals live. Memory images are secret, and a
//! journal decides what a restarted tether undoes: neither may sit where another user can
//! touch it.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

/// Creates `dir` (and its parents) with mode 0700, or checks an existing one; then checks that
/// no other user can swap it, or anything on its path.
///
/// An existing `dir` must be a real directory (not a symbolic link), owned by this user, with
/// no permission for group or others: it is refused, not repaired, since someone else may have
/// made it first and put something in it. Every directory above it must belong to root or
/// this user and be writable by nobody else, unless sticky (like `/dev/shm` or `/tmp`, where
/// others cannot rename what is not theirs).
pub fn private_dir(dir: &Path) -> io::Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    match std::fs::symlink_metadata(dir) {
        Ok(meta) => {
            if !meta.file_type().is_dir() {
                let what = if meta.file_type().is_symlink() {
                    "a symbolic link"
                } else {
                    "not a directory"
                };
                return Err(refused(dir, format!("it is {what}")));
            }
            if meta.uid() != me {
                return Err(refused(
                    dir,
                    format!(
                        "it is owned by uid {}, not by this user (uid {me})",
                        meta.uid()
                    ),
                ));
            }
            if meta.mode() & 0o077 != 0 {
                return Err(refused(
                    dir,
                    format!(
                        "its mode is {:04o}; it must be 0700 (chmod 700 it, or remove it)",
                        meta.mode() & 0o7777
                    ),
                ));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?,
        Err(e) => return Err(e),
    }
    let real = dir.canonicalize()?;
    for up in real.ancestors().skip(1) {
        let meta = std::fs::metadata(up)?;
        if meta.uid() != 0 && meta.uid() != me {
            return Err(refused(
                dir,
                format!("{} above it is owned by uid {}", up.display(), meta.uid()),
            ));
        }
        let sticky = meta.mode() & 0o1000 != 0;
        if meta.mode() & 0o022 != 0 && !sticky {
            return Err(refused(
                dir,
                format!(
                    "{} above it is writable by others (mode {:04o})",
                    up.display(),
                    meta.mode() & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

fn refused(dir: &Path, why: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "refusing {} for memory images or journals: {why}",
            dir.display()
        ),
    )
}

/// Whether `dir` is on tmpfs (memory images there cost a memory copy, not a disk write).
pub fn on_tmpfs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_and_refuses_what_others_could_have_made() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = t.path().join("a/b");
        private_dir(&d).expect("created");
        assert_eq!(std::fs::metadata(&d).expect("meta").mode() & 0o777, 0o700);
        private_dir(&d).expect("an existing private directory is fine");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let e = private_dir(&d).expect_err("a wide mode is refused");
        assert!(
            e.to_string().contains("0755") && e.to_string().contains("a/b"),
            "{e}"
        );
        let f = t.path().join("file");
        std::fs::write(&f, b"x").expect("file");
        assert!(private_dir(&f).is_err());
        let l = t.path().join("link");
        std::os::unix::fs::symlink(&d, &l).expect("symlink");
        let e = private_dir(&l).expect_err("a symbolic link is refused");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // Under a directory others may write to (not sticky).
        let open = t.path().join("open");
        std::fs::create_dir(&open).expect("dir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = private_dir(&open.join("x")).expect_err("an unsafe parent is refused");
        assert!(e.to_string().contains("writable by others"), "{e}");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        private_dir(&open.join("y")).expect("a sticky parent is fine");
    }

    #[test]
    fn a_directory_another_user_made_first_is_refused() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "needs root (to make a directory owned by nobody): run the tests as root"
        );
        let t = tempfile::tempdir().expect("tempdir");
        let d = t.path().join("taken");
        std::fs::create_dir(&d).expect("dir");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let nobody = nix::unistd::Uid::from_raw(65534);
        nix::unistd::chown(&d, Some(nobody), None).expect("chown to nobody");
        let e = private_dir(&d).expect_err("refused");
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
    }
}
