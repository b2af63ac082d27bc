//! CRIU's images: page maps and their rebuild, the inventory and stats files.

#[path = "../../../migrator/src/criu/eager.rs"]
pub mod eager;
#[path = "../../../migrator/src/criu/images.rs"]
pub mod images;
#[path = "../../../migrator/src/criu/pages.rs"]
pub mod pages;
#[path = "../../../migrator/src/criu/rebuild.rs"]
pub mod rebuild;
#[path = "../../../migrator/src/criu/rpc.rs"]
pub mod rpc;
