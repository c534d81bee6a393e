# Shared by scripts/e2e-qemu and scripts/faults-qemu (sourced, bash):
# a network namespace with a bridge, dnsmasq (pxe/start) and `blockswarm
# serve` on 10.77.0.1, and QEMU PCs on taps. Nothing leaves the namespace.
#
#   qlab_init NAME         work dir, cleanup trap, root and tool checks
#   qlab_build [ARG...]    release agent, initramfs, bootable image (made by
#                          make-bootable-image ARG...) captured into
#                          $work/images/e2e (sets bin, t_build)
#   qlab_net TAP...        namespace, bridge, taps, DHCP/TFTP (E2E_PXE;
#                          pxe/start's extra arguments in qlab_pxe_args;
#                          sets qlab_pxe_pid)
#   qlab_accel             sets accel: kvm only if the firmware PXE-boots
#                          under it here (E2E_ACCEL=auto|tcg|kvm), else tcg
#   qlab_server CONF [N|none]  writes CONF (groups, jobs) after the common
#                          server settings to $work/server.toml, starts the
#                          server: with a deployment open to any PC that
#                          network-boots (serve --deploy N, the default 0),
#                          or none (an admin starts one: qlab_admin start)
#   qlab_admin ARGS...     `blockswarm admin` against the server, with its token
#   qemu_pc NAME ACCEL FW NIC MAC DISK-ARGS...   a PC (bios|uefi|uefi-sb: OVMF
#                          with Secure Boot enforced, Microsoft's keys) on tap<N>;
#                          its NIC boots at place $pc_nic_boot (bootindex: 2,
#                          after a disk given 1; 1: network first; empty: no
#                          bootindex); qemu_serial_append=1: the serial log
#                          is appended to, not started anew
#   disk FILE DEVICE SERIAL [BOOTINDEX]          its -drive/-device arguments
#   seen PC TEXT           whether PC's serial console printed TEXT
#   nsx CMD...             runs CMD in the namespace
# Environment: E2E_PXE=full|proxy, E2E_ACCEL, E2E_KEEP=1 (keep $work),
# E2E_BIN=path (use that binary instead of building target/release),
# E2E_SERVER_BIN=path (the server's binary, if not E2E_BIN's).

export PATH=$PATH:/usr/sbin:/sbin
net=10.77.0
srv=http://$net.1:8080
pc_nic_boot=2
pids=()
qlab_pxe_args=()
log() { printf '%s %s: %s\n' "$(date +%T)" "$qlab_name" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
nsx() { ip netns exec "$ns" "$@"; }
# A background process in the namespace; its pid is the program's own
# (ip netns exec execs it), so cleanup can stop it.
bgns() { ip netns exec "$ns" "$@" & pids+=($!); }

qlab_cleanup() {
  local rc=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  ip netns del "$ns" 2>/dev/null || true
  ip netns del "${ns}lab" 2>/dev/null || true
  if [ $rc != 0 ]; then
    for f in "$work"/*.log; do
      [ -f "$f" ] || continue
      echo "----- last lines of $(basename "$f")" >&2
      tail -n 25 "$f" | tr -d '\r' | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' >&2
    done
  fi
  if [ "${E2E_KEEP:-0}" = 1 ] || [ $rc != 0 ]; then
    rm -f "$work"/*.img "$work"/images/*/payload.bin
    log "logs kept in $work"
  else
    rm -rf "$work"
  fi
  exit $rc
}

qlab_init() {
  qlab_name=$1
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  ns=bsw-$1-$$
  work=$(mktemp -d "/tmp/bsw-$1.XXXXXX")
  chmod 755 "$work"    # dnsmasq's TFTP runs as nobody
  trap qlab_cleanup EXIT
  trap 'exit 130' INT TERM
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces, taps)"
  "$repo/scripts/install-deps"
  for t in qemu-system-x86_64 dnsmasq sha256sum ip curl sgdisk; do
    command -v $t >/dev/null || die "$t is missing"
  done
  [ -f /usr/share/OVMF/OVMF_CODE.fd ] || die "ovmf is not installed"
}

qlab_build() {
  local t0
  t0=$(date +%s)
  log "building blockswarm (release), the initramfs and the bootable test image"
  bin=${E2E_BIN:-$repo/target/release/blockswarm}
  [ -n "${E2E_BIN:-}" ] || (cd "$repo" && cargo build --release --locked --quiet) || die "cargo build failed"
  "$repo/initramfs/build" --agent "$bin" --out "$work/boot" 2>"$work/initramfs-build.log" \
    || { cat "$work/initramfs-build.log" >&2; die "initramfs/build failed"; }
  "$repo/scripts/make-bootable-image" "$work/master.img" "$@" 2>"$work/make-image.log" \
    || { cat "$work/make-image.log" >&2; die "make-bootable-image failed"; }
  "$bin" capture "$work/master.img" --out "$work/images/e2e" --store >"$work/capture.log" 2>&1 \
    || { cat "$work/capture.log" >&2; die "capture failed"; }
  t_build=$(( $(date +%s) - t0 ))
}

qlab_net() {
  local i
  ip netns add "$ns"
  nsx ip link set lo up
  nsx ip link add br0 type bridge
  nsx ip addr add $net.1/24 dev br0
  nsx ip link set br0 up
  for i in "$@"; do
    nsx ip tuntap add dev tap$i mode tap
    nsx ip link set tap$i master br0
    nsx ip link set tap$i up
  done
  if [ "${E2E_PXE:-full}" = proxy ]; then
    # The lab's own DHCP server (addresses only, no boot information), on
    # 10.77.0.2 in a namespace of its own, wired to the bridge.
    ip netns add "${ns}lab"
    nsx ip link add lab1 type veth peer name lab0 netns "${ns}lab"
    nsx ip link set lab1 master br0
    nsx ip link set lab1 up
    ip -n "${ns}lab" addr add $net.2/24 dev lab0
    ip -n "${ns}lab" link set lab0 up
    ip netns exec "${ns}lab" dnsmasq --keep-in-foreground --log-facility=- --port=0 \
      --interface=lab0 --bind-interfaces --dhcp-range=$net.100,$net.199,12h \
      --dhcp-leasefile="$work/lab-dhcp.leases" >"$work/lab-dhcp.log" 2>&1 &
    pids+=($!)
    bgns "$repo/pxe/start" br0 proxy --server "$srv" --state "$work/pxe" --log-dhcp \
      "${qlab_pxe_args[@]}" >"$work/dnsmasq.log" 2>&1
  else
    bgns "$repo/pxe/start" br0 full --server "$srv" --range $net.100,$net.199 \
      --state "$work/pxe" --log-dhcp "${qlab_pxe_args[@]}" >"$work/dnsmasq.log" 2>&1
  fi
  qlab_pxe_pid=${pids[-1]}
  sleep 1
  nsx curl -s --max-time 10 -o "$work/tftp-check" "tftp://$net.1/undionly.kpxe" \
    && cmp -s "$work/tftp-check" /usr/lib/ipxe/undionly.kpxe || die "TFTP does not serve undionly.kpxe"
}

qemu_pc() { # NAME ACCEL FIRMWARE(bios|uefi) NIC[,OPTS] MAC DISK-ARGS...
  local name=$1 acc=$2 fw=$3 nic=$4 mac=$5 tap=tap${1#pc}; shift 5
  local args=(-name "$name" -accel "$acc" -m 1024 -smp 1 -nographic -monitor none
    -chardev "file,id=ser0,path=$work/$name.log${qemu_serial_append:+,append=on}" -serial chardev:ser0
    -netdev "tap,id=n0,ifname=$tap,script=no,downscript=no"
    -device "$nic,netdev=n0,mac=$mac${pc_nic_boot:+,bootindex=$pc_nic_boot}")
  if [ "$fw" = uefi ] || [ "$fw" = uefi-sb ]; then
    local code=/usr/share/OVMF/OVMF_CODE.fd vars=/usr/share/OVMF/OVMF_VARS.fd machine=q35
    if [ "$fw" = uefi-sb ]; then
      # Secure Boot enforced: Debian's SMM build, whose variables hold
      # Microsoft's keys with Secure Boot on; only SMM may write the flash.
      code=/usr/share/OVMF/OVMF_CODE_4M.secboot.fd vars=/usr/share/OVMF/OVMF_VARS_4M.ms.fd
      machine=q35,smm=on
      args+=(-global driver=cfi.pflash01,property=secure,value=on)
    fi
    # Its NVRAM lives as long as $work: the boot order stays across reboots.
    [ -f "$work/$name-vars.fd" ] || cp "$vars" "$work/$name-vars.fd"
    # Network boot over IPv4 PXE only, as a room's firmware is set up: else,
    # once iPXE hands back, OVMF tries PXE and HTTP boot over IPv6 before
    # the disk (HTTP boot over IPv4 it still tries: about 60 s).
    args+=(-machine "$machine" -drive "if=pflash,format=raw,readonly=on,file=$code"
      -drive "if=pflash,format=raw,file=$work/$name-vars.fd"
      -fw_cfg name=opt/org.tianocore/IPv6Support,string=no
      -fw_cfg name=opt/org.tianocore/IPv6PXESupport,string=no)
  fi
  bgns qemu-system-x86_64 "${args[@]}" "$@" </dev/null 2>"$work/$name.qemu.err"
}
disk() { # FILE DEVICE SERIAL [BOOTINDEX]
  echo "-drive file=$1,format=raw,if=none,id=${3,,},cache=unsafe -device $2,drive=${3,,},serial=$3${4:+,bootindex=$4}"
}
seen() { grep -aq "$2" "$work/$1.log" 2>/dev/null; }

# KVM only if it PXE-boots the firmware here (nested KVM often hangs iPXE or
# crashes OVMF): a BIOS and a UEFI PC (taps 8, 9) must both reach iPXE's
# DHCP "ok" within 25 s. Runs before the server, so no probe gets a job.
qlab_accel() {
  accel=${E2E_ACCEL:-auto}
  [ "$accel" = auto ] || return 0
  accel=tcg
  [ -w /dev/kvm ] || { log "KVM probe: no /dev/kvm, using tcg"; return 0; }
  local i pc ok
  qemu_pc pc8 kvm bios virtio-net-pci 52:54:00:e2:e2:08
  qemu_pc pc9 kvm uefi virtio-net-pci 52:54:00:e2:e2:09
  local p8=${pids[-2]} p9=${pids[-1]}
  for i in $(seq 25); do
    sleep 1
    ok=0
    for pc in pc8 pc9; do seen $pc 'Configuring (net0.*ok' && ok=$((ok + 1)); done
    [ $ok = 2 ] && break
  done
  kill "$p8" "$p9" 2>/dev/null; wait "$p8" "$p9" 2>/dev/null || true
  for pc in pc8 pc9; do mv "$work/$pc.log" "$work/kvm-probe-$pc.log" 2>/dev/null || true; done
  [ $ok = 2 ] && accel=kvm
  log "KVM probe: using $accel"
}

# qlab_server EXTRA [DEPLOY-N|none]: the server with EXTRA (boot_args,
# groups, jobs) after the common settings; waits until it serves the boot
# files. Its log shows every boot decision (boot.rs logs disk boots at debug).
qlab_server() {
  local deploy=(--deploy "${2:-0}")
  [ "${2:-}" = none ] && deploy=()
  qlab_token=${qlab_token:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}
  cat >"$work/server.toml" <<CONF
listen = "$net.1:8080"
admin_token = "$qlab_token"
public_url = "$srv"
images = "$work/images"
state_dir = "$work/state"
seed_listen = "$net.1:6881"
boot_dir = "$work/boot"
$1
CONF
  bgns env RUST_LOG=info,blockswarm::server::boot=debug \
    "${E2E_SERVER_BIN:-$bin}" serve --config "$work/server.toml" "${deploy[@]}" >>"$work/server.log" 2>&1
  srv_pid=${pids[-1]}
  local i
  for i in $(seq 50); do
    nsx curl -sf --max-time 2 "$srv/boot.ipxe" -o "$work/boot.ipxe" && break
    sleep 0.2
  done
  # Without a MAC, the script that asks again with it.
  grep -qF "$srv/boot.ipxe?mac=" "$work/boot.ipxe" || die "the server does not serve /boot.ipxe"
}
qlab_admin() { nsx "$bin" admin --server "$srv" --token "$qlab_token" "$@"; }
