#!/usr/bin/env bash
# Installs the Debian packages that building the image and running the tests need; does nothing when all are there.
set -euo pipefail

packages=(
  mariadb-server          # the throwaway MariaDB of the tests and the benchmark
  nginx-light             # `nginx -t` on the rendered site
  systemd                 # systemd-socket-activate, for the socket activation test
  wrk                     # load generator of `just bench-agent` and `just bench`
  socat                   # `just bench` presses the guest's power button through the QEMU monitor
  bc                      # `just bench` arithmetic
  mmdebstrap              # the root file system from the Debian archive
  e2fsprogs dosfstools mtools
  grub-pc-bin grub-efi-amd64-bin
  qemu-system-x86 qemu-utils ovmf
  fdisk                   # sfdisk, the independent GPT reader of the QEMU tier
  openssh-client openssl  # SSH into guests and read their TLS certificates
  python3                 # the stand-in app server of the agent's [app] tests
  dnsmasq-base            # the DNS server of the smoke DNS check test and of the ACME test
  pebble uacme curl       # the ACME test server, the client the image runs (its failure test), HTTPS checks
  haproxy                 # `haproxy -c` on a cluster node's rendered settings
  iproute2                # `imagebuild cluster`: the network namespace, bridge and taps
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
extra=()
if printf '%s\n' "${missing[@]}" | grep -qx qemu-system-x86; then
  # qemu-system-x86 breaks a newer qemu-utils (from backports): take the two at the same version.
  v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  extra=(--allow-downgrades "qemu-utils=$v")
  kept=()
  for p in "${missing[@]}"; do [ "$p" = qemu-utils ] || kept+=("$p"); done
  missing=("${kept[@]}")
fi
apt-get install -y -q --no-install-recommends "${missing[@]}" "${extra[@]}"
# Package scripts may start the system's own servers; the tests start their own and want none running.
for service in mariadb nginx haproxy; do
  service "$service" stop >/dev/null 2>&1 || true
done
