//! What a container's dump leaves to its runtime, read off the running container: the
//! [`DumpScope`] runc's own `checkpoint` would give CRIU, so that runc's `restore` (under
//! `podman container restore`) accepts the images.
//!
//! - root: the container's root file system (`root.path` of its OCI spec);
//! - external mounts, by their path in the container: every bind mount of the spec (Podman's
//!   `/etc/hosts`, `/etc/resolv.conf`, `/run/.containerenv`, `/dev/shm`, the user's binds) and,
//!   on cgroup v1, each controller's mount under `/sys/fs/cgroup`; runc's restore maps each back
//!   to the destination's source by the same key;
//! - the network namespace, external (`net[<inode>]:extRootNetNS`): Podman makes a new one on
//!   the destination, with the same address, and runc hands it to CRIU under that key;
//! - its cgroups dumped (the restore puts it back in the cgroups runc makes for it); frozen by
//!   seizing its processes, not through its freezer cgroup (see [`of`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::podman::Inspected;
use super::ContainerError;
use crate::criu::DumpScope;

#[derive(Deserialize)]
struct Spec {
    root: SpecRoot,
    #[serde(default)]
    mounts: Vec<SpecMount>,
}

#[derive(Deserialize)]
struct SpecRoot {
    path: String,
}

#[derive(Deserialize)]
struct SpecMount {
    destination: String,
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    options: Vec<String>,
}

/// The dump scope of the running container `c`.
pub fn of(c: &Inspected) -> Result<DumpScope, ContainerError> {
    let text = std::fs::read_to_string(&c.oci_config).map_err(ContainerError::io(format!(
        "reading the container's OCI spec {}",
        c.oci_config.display()
    )))?;
    let spec: Spec = serde_json::from_str(&text).map_err(|e| ContainerError::Unsupported {
        name: c.name.clone(),
        detail: format!(
            "its OCI spec {} does not parse: {e}",
            c.oci_config.display()
        ),
    })?;
    let mountinfo = std::fs::read_to_string(format!("/proc/{}/mountinfo", c.pid))
        .map_err(ContainerError::io("reading the container's mounts"))?;
    let netns = std::fs::metadata(format!("/proc/{}/ns/net", c.pid)).map_err(
        ContainerError::io("reading the container's network namespace"),
    )?;
    let host_netns = std::fs::metadata("/proc/self/ns/net").map_err(ContainerError::io(
        "reading this process's network namespace",
    ))?;
    use std::os::unix::fs::MetadataExt;
    if netns.ino() == host_netns.ino() {
        return Err(ContainerError::Unsupported {
            name: c.name.clone(),
            detail: "it shares the host's network (--network host): its address cannot move \
                     with it; give it a network of its own (e.g. a macvlan on the LAN)"
                .into(),
        });
    }
    let mut external_mounts: Vec<String> = spec
        .mounts
        .iter()
        .filter(|m| m.kind == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind"))
        .map(|m| m.destination.clone())
        .collect();
    external_mounts.extend(cgroup_v1_mounts(&mountinfo));
    external_mounts.dedup();
    Ok(DumpScope {
        root: Some(spec.root.path),
        external_mounts,
        external: vec![format!("net[{}]:extRootNetNS", netns.ino())],
        // Not through its freezer cgroup, as runc has CRIU do: CRIU then polls the freezer in
        // 100 ms steps, and froze a container in 100 ms where seizing its processes one by one
        // (what it does for any process tree) takes a millisecond (64 MiB container: dump 276
        // ms with the freezer, 144 ms without).
        freeze_cgroup: None,
        manage_cgroups: true,
    })
}

/// The mount points of cgroup v1 controllers in a mountinfo (fifth field; file system type
/// after the ` - ` separator).
fn cgroup_v1_mounts(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let point = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next()? == "cgroup").then(|| point.to_string())
        })
        .collect()
}

/// The host path of the freezer cgroup in a `/proc/<pid>/cgroup`: the v1 `freezer` controller's
/// directory, or the v2 unified group's.
pub fn freezer(cgroups: &str) -> Option<PathBuf> {
    let mut unified = None;
    for l in cgroups.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let rel = path.trim_start_matches('/');
        if ctrls.split(',').any(|c| c == "freezer") {
            return Some(Path::new("/sys/fs/cgroup/freezer").join(rel));
        }
        if ctrls.is_empty() {
            unified = Some(Path::new("/sys/fs/cgroup").join(rel));
        }
    }
    unified
}

/// Freezes (`true`) or thaws the cgroup v1 freezer or v2 group at `dir`.
pub fn set_frozen(dir: &Path, frozen: bool) -> Result<(), ContainerError> {
    let (file, value) = if dir.join("freezer.state").exists() {
        ("freezer.state", if frozen { "FROZEN" } else { "THAWED" })
    } else {
        ("cgroup.freeze", if frozen { "1" } else { "0" })
    };
    std::fs::write(dir.join(file), value).map_err(ContainerError::io(format!(
        "writing {value} to {}",
        dir.join(file).display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_mounts_and_the_freezer_are_found() {
        let mi = "1 0 0:1 / / rw - overlay overlay rw\n\
                  2 1 0:2 /x /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer\n\
                  3 1 0:3 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n";
        assert_eq!(
            cgroup_v1_mounts(mi),
            vec!["/sys/fs/cgroup/freezer".to_string()]
        );
        let cg = "6:freezer:/libpod_parent/libpod-abc\n0::/libpod_parent/libpod-abc\n";
        assert_eq!(
            freezer(cg),
            Some(PathBuf::from(
                "/sys/fs/cgroup/freezer/libpod_parent/libpod-abc"
            ))
        );
        assert_eq!(
            freezer("0::/machine.slice/x.scope\n"),
            Some(PathBuf::from("/sys/fs/cgroup/machine.slice/x.scope"))
        );
        assert_eq!(freezer(""), None);
    }
}
