#!/usr/bin/env bash
# Installs the system tools the test suite uses, when they are missing (Debian/Ubuntu, as root or
# with sudo). Each entry is "command:package". Safe to run again: it installs only what is absent.
set -euo pipefail

needs=(
    "kill:procps"                 # signals to the services under test (SIGTERM, SIGKILL)
    "systemd-analyze:systemd"     # verifies the unit files in systemd/
    "journalctl:systemd"          # the agent's journal source follows journalctl
    "/lib/systemd/systemd-journal-remote:systemd-journal-remote"  # writes real journal files for tests
    "rpm:rpm"                     # the component manager reads the RPM database
    "rpmbuild:rpm"                # the tests build real RPMs
    "dnf:dnf"                     # the component manager installs with dnf --installroot
    "createrepo_c:createrepo-c"   # the tests publish their RPMs as a repository
    "ip:iproute2"                 # the detector's tests put hosts in network namespaces
    "tc:iproute2"                 # and shape their links with netem
    "iptables:iptables"           # packet loss where the kernel has no netem
    "prometheus-alertmanager:prometheus-alertmanager"  # ops alerts and the business-health gate run against a real Alertmanager
    "promtool:prometheus"         # checks every service's /metrics output
    "strace:strace"               # the units' syscall filters are checked against the services' real syscalls
    "mkfs.ext4:e2fsprogs"         # the disk-full test runs the center on a small loop-mounted ext4
    "mount:mount"                 # and mounts it (loop devices)
    "fallocate:util-linux"        # and fills it
    "python3:python3"             # kubernetes-validate (below) checks the Kubernetes manifests
    "tgtd:tgt"                    # the storage syncer keeps a real iSCSI target's ACL (tgtadm)
    "iscsi-inq:libiscsi-bin"      # and a userspace initiator logs in to it
    "ganesha.nfsd:nfs-ganesha"    # and a real NFS server's export clients
    "nfs-ls:libnfs-utils"         # and a userspace NFS client lists the export
    "chromium:chromium"           # the dashboard's tests run in a real browser
    "chromedriver:chromium-driver" # driven through WebDriver
    "npm:npm"                     # axe-core (below) audits the pages' accessibility
    "/usr/lib/postgresql/15/bin/initdb:postgresql-15"  # the event center's PostgreSQL store runs against throwaway clusters
)

missing=()
for entry in "${needs[@]}"; do
    cmd=${entry%%:*}
    pkg=${entry#*:}
    if [[ $cmd == /* ]]; then
        [ -x "$cmd" ] || missing+=("$pkg")
    else
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
    fi
done
# ganesha's VFS backend (the export of a local directory) is a package of its own.
[ -n "$(ls /usr/lib/*/ganesha/libfsalvfs.so 2>/dev/null)" ] || missing+=("nfs-ganesha-vfs")
# ...in a venv of its own, which needs python3-venv.
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=("python3-venv")
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing test dependencies: ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# kubernetes-validate (PyPI; it carries the Kubernetes OpenAPI schemas, so the manifests are
# checked offline), in a venv of its own where tests/tests/manifests.rs looks for it.
tools="$HOME/.cache/nodekeeper-test-tools"
if [ ! -x "$tools/venv/bin/kubernetes-validate" ]; then
    echo "installing kubernetes-validate into $tools/venv"
    python3 -m venv "$tools/venv"
    "$tools/venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==1.37.0"
fi

# axe-core (npm), the accessibility audit the dashboard's tests run inside the browser.
if [ ! -f "$tools/axe/node_modules/axe-core/axe.min.js" ]; then
    echo "installing axe-core into $tools/axe"
    mkdir -p "$tools/axe"
    npm install --silent --no-audit --no-fund --prefix "$tools/axe" "axe-core@4.14.1"
fi
