//! Private directories: where memory images and journals live. Memory images are secret, and a
//! journal decides what a restarted tether undoes: neither may sit where another user can
//! touch it.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and its parents) with mode 0700, or checks an existing one: it must be a real
/// directory (not a symbolic link) owned by this user; a mode wider than 0700 is narrowed.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) => {
            if !meta.file_type().is_dir() {
                return Err(io::Error::other(format!(
                    "{} exists and is not a directory",
                    dir.display()
                )));
            }
            let me = nix::unistd::geteuid().as_raw();
            if meta.uid() != me {
                return Err(io::Error::other(format!(
                    "{} is owned by uid {}, not by this user (uid {me}); refusing to keep \
                     images or journals there",
                    dir.display(),
                    meta.uid()
                )));
            }
            if meta.mode() & 0o077 != 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_narrows_and_refuses() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = t.path().join("a/b");
        private_dir(&d).expect("created");
        assert_eq!(std::fs::metadata(&d).expect("meta").mode() & 0o777, 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        private_dir(&d).expect("narrowed");
        assert_eq!(std::fs::metadata(&d).expect("meta").mode() & 0o777, 0o700);
        let f = t.path().join("file");
        std::fs::write(&f, b"x").expect("file");
        assert!(private_dir(&f).is_err());
        let l = t.path().join("link");
        std::os::unix::fs::symlink(&d, &l).expect("symlink");
        assert!(private_dir(&l).is_err(), "a symbolic link is refused");
    }
}
