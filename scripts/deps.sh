#!/usr/bin/env bash
# Installs the Debian packages the test suite needs (when root and missing). Sourced by
# scripts/test.sh and .ci/run; prints what it could not do instead of failing.
#   libelf-dev clang m4 libpcap-dev : build of xsk-rs' bundled libxdp/libbpf (AF_XDP transport)
#   redis-tools                      : redis-cli / redis-benchmark against the kv guest
#   etcd-server etcd-client          : the etcd arbiter tests
#   iproute2 nftables                : network namespaces, veth, TAP, link cuts
FTVM_PKGS=(libelf-dev clang m4 libpcap-dev redis-tools etcd-server etcd-client iproute2 nftables)
ftvm_missing=()
for p in "${FTVM_PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || ftvm_missing+=("$p")
done
if [ "${#ftvm_missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing ${ftvm_missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${ftvm_missing[@]}" >/dev/null
  else
    echo "WARNING: cannot install ${ftvm_missing[*]} (not root); tests that need them will SKIP"
  fi
fi
# The AF_XDP transport is a cargo feature: enabled when its build dependencies are present.
FTVM_FEATURES=""
if dpkg -s libelf-dev clang m4 libpcap-dev >/dev/null 2>&1; then
  FTVM_FEATURES="--features ftvm-channel/xdp,ftvm/xdp"
else
  echo "SKIP AF_XDP: the feature xdp is off, its build packages (libelf-dev clang m4 libpcap-dev) are missing"
fi
export FTVM_FEATURES
