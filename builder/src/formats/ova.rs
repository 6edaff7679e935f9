//! OVA (VMware): a ustar archive of the OVF descriptor, then the manifest (SHA256 lines), then the streamOptimized
//! VMDK, in that order (OVF 1.x requires the descriptor first).
//!
//! The virtual hardware is what the image's kernel (Debian's cloud kernel) has drivers for: VMware's paravirtual SCSI
//! controller and VMXNET3 network adapter. The cloud kernel has no LSI Logic or E1000 drivers, which other hypervisors
//! default to; see README.md for VirtualBox.

use std::fs::File;
use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;

use crate::util::{sha256_file, sha256_hex};

/// What the descriptor says about the machine.
pub struct Machine<'a> {
    pub name: &'a str,
    pub cpus: u32,
    pub memory_mib: u32,
    /// `bios` or `efi`: VMware's firmware setting (the image boots either way).
    pub firmware: &'a str,
}

/// The OVF descriptor for a disk of `capacity` bytes stored in `disk_file` (`disk_bytes` long).
pub fn descriptor(machine: &Machine, disk_file: &str, disk_bytes: u64, capacity: u64) -> String {
    let Machine {
        name,
        cpus,
        memory_mib,
        firmware,
    } = machine;
    let capacity_mib = capacity.div_ceil(1 << 20);
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- {name}: written by imagebuild -->
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="{disk_file}" ovf:id="file1" ovf:size="{disk_bytes}"/>
  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
    <Disk ovf:capacity="{capacity_mib}" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection>
    <Info>Logical networks</Info>
    <Network ovf:name="VM Network">
      <Description>The network the site is served on (DHCP)</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="{name}">
    <Info>The {name} web server</Info>
    <Name>{name}</Name>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian12_64Guest">
      <Info>The guest operating system</Info>
      <Description>Debian GNU/Linux 12 (64-bit)</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-14</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ElementName>{cpus} virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>{cpus}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory size</rasd:Description>
        <rasd:ElementName>{memory_mib} MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>{memory_mib}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SCSI controller</rasd:Description>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:Description>VmxNet3 ethernet adapter on "VM Network"</rasd:Description>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="{firmware}"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

fn append(
    builder: &mut tar::Builder<File>,
    name: &str,
    size: u64,
    epoch: u64,
    data: impl std::io::Read,
) -> anyhow::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_path(name)?;
    header.set_size(size);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(epoch);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    builder
        .append(&header, data)
        .with_context(|| format!("cannot add {name} to the OVA"))
}

/// Writes the OVA at `dest` from the streamOptimized VMDK at `vmdk` (named `disk_file` inside) of a disk of `capacity`.
pub fn write(
    dest: &Path,
    machine: &Machine,
    vmdk: &Path,
    disk_file: &str,
    capacity: u64,
    epoch: u64,
) -> anyhow::Result<()> {
    let disk_bytes = std::fs::metadata(vmdk)?.len();
    let ovf = descriptor(machine, disk_file, disk_bytes, capacity);
    let ovf_name = format!("{}.ovf", machine.name);
    let manifest = format!(
        "SHA256({ovf_name})= {}\nSHA256({disk_file})= {}\n",
        sha256_hex(ovf.as_bytes()),
        sha256_file(vmdk)?
    );
    let out = File::create(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let mut builder = tar::Builder::new(out);
    append(&mut builder, &ovf_name, ovf.len() as u64, epoch, ovf.as_bytes())?;
    let mf_name = format!("{}.mf", machine.name);
    append(
        &mut builder,
        &mf_name,
        manifest.len() as u64,
        epoch,
        manifest.as_bytes(),
    )?;
    let disk = File::open(vmdk).with_context(|| format!("cannot open {}", vmdk.display()))?;
    append(&mut builder, disk_file, disk_bytes, epoch, disk)?;
    let mut out = builder.into_inner()?;
    out.flush()?;
    out.sync_all()?;
    Ok(())
}
