//! `access`: how operators get in. SSH with public keys only (the image's keys from the config and `--ssh-key`;
//! the cloud's at first boot), no root login, the `admin` user with passwordless sudo. Each instance makes its own
//! SSH host keys at first boot.

use std::path::Path;

use super::{write, Component};
use crate::context::{Context, Port};

pub const COMPONENT: Component = Component {
    name: "access",
    packages: &["openssh-server", "sudo"],
    instance_files: &[
        "etc/ssh/ssh_host_rsa_key",
        "etc/ssh/ssh_host_rsa_key.pub",
        "etc/ssh/ssh_host_ecdsa_key",
        "etc/ssh/ssh_host_ecdsa_key.pub",
        "etc/ssh/ssh_host_ed25519_key",
        "etc/ssh/ssh_host_ed25519_key.pub",
    ],
    ports: &[Port {
        number: 22,
        what: "SSH",
    }],
    install,
    ..super::NOTHING
};

fn install(ctx: &Context, root: &Path) -> anyhow::Result<()> {
    let keys: String = ctx.ssh_keys.iter().map(|k| format!("{k}\n")).collect();
    write(root, "etc/ssh/authorized_keys/admin", keys, 0o644)?;
    write(
        root,
        "etc/ssh/sshd_config.d/foobar.conf",
        "# foobar: public keys only, no root; the host keys first boot makes\nPermitRootLogin no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nAuthorizedKeysFile /etc/ssh/authorized_keys/%u .ssh/authorized_keys\nHostKey /etc/ssh/ssh_host_ed25519_key\nHostKey /etc/ssh/ssh_host_ecdsa_key\n",
        0o644,
    )?;
    write(
        root,
        "etc/sudoers.d/foobar-admin",
        "admin ALL=(ALL) NOPASSWD:ALL\n",
        0o440,
    )?;
    Ok(())
}
