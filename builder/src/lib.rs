//! imagebuild: turns this repository into a bootable disk image. `build::build_image` is the whole pipeline;
//! the modules are its stages, the plan they share (`context`, made by `plan`), the components a machine is
//! assembled from (`components`) and the roles that list them (`roles`).

pub mod boot;
pub mod bootloader;
pub mod build;
pub mod cluster;
pub mod components;
pub mod config;
pub mod context;
pub mod disk;
pub mod formats;
pub mod initrd;
pub mod manifest;
pub mod normalize;
pub mod overlay;
pub mod plan;
pub mod process;
pub mod render;
pub mod roles;
pub mod rootfs;
pub mod smoke;
pub mod util;
pub mod verify;
