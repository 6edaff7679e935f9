//! imagebuild: turns this repository into a bootable disk image. `build::build_image` is the whole pipeline;
//! the modules are its stages and the plan they share.

pub mod boot;
pub mod bootloader;
pub mod build;
pub mod config;
pub mod context;
pub mod disk;
pub mod formats;
pub mod initrd;
pub mod manifest;
pub mod normalize;
pub mod overlay;
pub mod process;
pub mod render;
pub mod rootfs;
pub mod smoke;
pub mod verify;
