#!/usr/bin/env bash
# Builds the nodekeeper-agent, nodekeeper-server and nodekeeper-storage RPMs from this checkout (packaging/nodekeeper.spec).
#
#   scripts/build-rpms.sh [--version V] [--release R] [--bin-dir DIR] [--out DIR]
#
# Without --bin-dir, builds the binaries first: the agent with the node-agent profile (small, it
# runs on every node), the rest with the release profile. --bin-dir packages binaries already built
# there (the tests package their debug build). The version defaults to the workspace's, the release
# to 1; the RPMs land in --out (default target/rpm). Needs rpmbuild (scripts/install-test-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
release=1
bin_dir=""
out=target/rpm
while [ $# -gt 0 ]; do
    case "$1" in
        --version) version=$2; shift 2 ;;
        --release) release=$2; shift 2 ;;
        --bin-dir) bin_dir=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "build-rpms.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
# The version and release reach rpmbuild's command line: allow only what RPM allows there.
for v in "$version" "$release"; do
    if ! [[ $v =~ ^[A-Za-z0-9._+~^]+$ ]]; then
        echo "build-rpms.sh: invalid version or release \"$v\"" >&2
        exit 2
    fi
done

cleanup=()
trap 'rm -rf "${cleanup[@]}"' EXIT
if [ -z "$bin_dir" ]; then
    echo "building binaries (agent: node-agent profile; services and CLI: release)"
    cargo build --locked --profile node-agent -p nodekeeper-agent
    cargo build --locked --release -p nodekeeper-eventcenter -p nodekeeper-detector -p nodekeeper-remediator -p nodekeeper-cli -p nodekeeper-storage
    bin_dir=$(mktemp -d)
    cleanup+=("$bin_dir")
    target=${CARGO_TARGET_DIR:-target}
    cp "$target/node-agent/nodekeeper-agent" "$bin_dir/"
    for b in nodekeeper-eventcenter nodekeeper-detector nodekeeper-remediator nodekeeper nodekeeper-storage; do
        cp "$target/release/$b" "$bin_dir/"
    done
fi
bin_dir=$(cd "$bin_dir" && pwd)
for b in nodekeeper-agent nodekeeper-eventcenter nodekeeper-detector nodekeeper-remediator nodekeeper nodekeeper-storage; do
    [ -x "$bin_dir/$b" ] || { echo "build-rpms.sh: $bin_dir/$b is missing" >&2; exit 1; }
done

mkdir -p "$out"
out=$(cd "$out" && pwd)
top=$(mktemp -d)
cleanup+=("$top")
echo "building RPMs $version-$release from $bin_dir"
rpmbuild --quiet -bb "$src/packaging/nodekeeper.spec" \
    --define "_topdir $top" \
    --define "nk_version $version" \
    --define "nk_release $release" \
    --define "nk_bindir $bin_dir" \
    --define "nk_src $src"
find "$top/RPMS" -name '*.rpm' -exec cp {} "$out/" \;
ls -1 "$out"/nodekeeper-*-"$version"-"$release".*.rpm
