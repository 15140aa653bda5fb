//! Components of several packages moved as one, the version lock that keeps every other dnf run
//! off the components' packages, and repositories given by mirrorlist or metalink; with real
//! rpmbuild, createrepo_c and dnf --installroot.

use std::path::{Path, PathBuf};

use nodekeeper_tests::rpmnode::{Node, one_component, run, transactions};
use nodekeeper_tests::{rpm_installed, rpm_repo};

/// The three packages' installed versions.
fn three(root: &Path) -> [Option<String>; 3] {
    ["nk-kube", "nk-kubeadm", "nk-ctr"].map(|p| rpm_installed(root, p))
}

/// A spec of the component "kube": nk-kube with nk-kubeadm at its version and nk-ctr at its own,
/// with a health check that passes when `healthy`.
fn kube_spec(n: &Node, version: &str, ctr: &str, healthy: bool) -> PathBuf {
    let check = if healthy { "/bin/true" } else { "/bin/false" };
    one_component(
        n,
        "kube",
        "nk-kube",
        version,
        &format!(
            "[[component.with_packages]]\npackage = \"nk-kubeadm\"\n\
             [[component.with_packages]]\npackage = \"nk-ctr\"\nversion = \"{ctr}\"\n\
             [component.health_check]\ncommand = [\"{check}\"]\ntimeout = \"2s\"\ndeadline = \"1s\"\n"
        ),
    )
}

#[test]
fn a_component_of_three_packages_is_upgraded_and_rolled_back_as_one() {
    let n = Node::new();
    let (code, out) = n.apply(&kube_spec(&n, "1.0-1", "1.5-1", true));
    assert_eq!(code, 0, "{out}");
    let old = [Some("0:1.0-1".to_owned()), Some("0:1.0-1".to_owned()), Some("0:1.5-1".to_owned())];
    assert_eq!(three(&n.root()), old);
    let one = |action: &str| vec![(action.to_owned(), "3".to_owned())];
    assert_eq!(transactions(&n.root()), one("Install"), "one transaction");

    // The new versions fail their health check: all three go back, in one transaction.
    let (code, out) = n.apply(&kube_spec(&n, "2.0-1", "1.6-1", false));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("upgrade nk-kube from 0:1.0-1 to 0:2.0-1, upgrade nk-kubeadm"), "{out}");
    assert!(out.contains("upgrade nk-ctr from 0:1.5-1 to 0:1.6-1"), "{out}");
    assert!(out.contains("ROLLED BACK"), "{out}");
    assert_eq!(three(&n.root()), old, "{out}");
    let back = transactions(&n.root());
    assert_eq!(back[..2], [one("Downgrade"), one("Upgrade")].concat(), "rolled back in one transaction: {back:?}");
    let mut check = std::process::Command::new("dnf");
    check.arg(format!("--installroot={}", n.root().display())).args(["--releasever=1", "-q", "check"]);
    let (clean, problems) = run(check);
    assert!(clean && problems.trim().is_empty(), "dnf check: {problems}");

    // Healthy: all three move, and a later pass has nothing to change.
    let (code, out) = n.apply(&kube_spec(&n, "2.0-1", "1.6-1", true));
    assert_eq!(code, 0, "{out}");
    let new = [Some("0:2.0-1".to_owned()), Some("0:2.0-1".to_owned()), Some("0:1.6-1".to_owned())];
    assert_eq!(three(&n.root()), new);
    let (code, out) = n.apply(&kube_spec(&n, "2.0-1", "1.6-1", true));
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("upgrade") && out.contains("converged"), "{out}");

    // A package claimed twice, or a with-package of a bad name, is a defect of the spec.
    let spec = kube_spec(&n, "2.0-1", "1.6-1", true);
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, text.replace("package = \"nk-ctr\"", "package = \"nk-kube\"")).unwrap();
    let (code, out) = n.apply(&spec);
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("package \"nk-kube\" is listed twice"), "{out}");
    std::fs::write(&spec, text.replace("package = \"nk-ctr\"", "package = \"nk-ctr;reboot\"")).unwrap();
    let (code, out) = n.apply(&spec);
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("invalid package name"), "{out}");
    assert_eq!(three(&n.root()), new);

    // Absent: every package of the component removed.
    std::fs::write(
        &spec,
        "[[component]]\nname = \"kube\"\npackage = \"nk-kube\"\nstate = \"absent\"\n\
         [[component.with_packages]]\npackage = \"nk-kubeadm\"\n[[component.with_packages]]\npackage = \"nk-ctr\"\n",
    )
    .unwrap();
    let (code, out) = n.apply(&spec);
    assert_eq!(code, 0, "{out}");
    assert_eq!(three(&n.root()), [None, None, None], "{out}");
}

/// A plain `dnf upgrade` in the root, with the test repository configured as the node's own.
fn plain_dnf_upgrade(n: &Node) -> String {
    let mut c = std::process::Command::new("dnf");
    c.arg(format!("--installroot={}", n.root().display()))
        .args(["--releasever=1", "-y", "--setopt=install_weak_deps=False"])
        .arg(format!("--setopt=cachedir={}", n.path("plain-cache").display()))
        .arg("upgrade");
    let (ok, out) = run(c);
    assert!(ok, "dnf upgrade: {out}");
    out
}

#[test]
fn the_version_lock_holds_against_a_plain_dnf_upgrade() {
    let n = Node::new();
    // The node's own repository offers newer versions, and its dnf.conf has an exclude of the
    // operator's.
    std::fs::create_dir_all(n.root().join("etc/yum.repos.d")).unwrap();
    std::fs::write(
        n.root().join("etc/yum.repos.d/nk.repo"),
        format!("[nk-node]\nname=nk-node\nbaseurl={}\ngpgcheck=0\n", rpm_repo().url()),
    )
    .unwrap();
    std::fs::create_dir_all(n.root().join("etc/dnf")).unwrap();
    let conf = n.root().join("etc/dnf/dnf.conf");
    std::fs::write(&conf, "[main]\ngpgcheck=1\nexcludepkgs=nk-conflict\nbest=False\n").unwrap();

    let demo = |v: &str| one_component(&n, "demo", "nk-demo", v, "");
    let (code, out) = n.apply(&demo("1.0-1"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("version lock: nk-demo kept out of other dnf runs"), "{out}");
    let (code, out) = n.apply(&kube_spec(&n, "1.0-1", "1.5-1", true));
    assert_eq!(code, 0, "{out}");
    // Two components in one spec, the lock now covers the four packages.
    let both = n.path("both.toml");
    let text = std::fs::read_to_string(demo("1.0-1")).unwrap()
        + &std::fs::read_to_string(kube_spec(&n, "1.0-1", "1.5-1", true)).unwrap();
    std::fs::write(&both, text).unwrap();
    let (code, out) = n.apply(&both);
    assert_eq!(code, 0, "{out}");

    let upgraded = plain_dnf_upgrade(&n);
    assert_eq!(rpm_installed(&n.root(), "nk-demo").as_deref(), Some("0:1.0-1"), "{upgraded}");
    assert_eq!(three(&n.root())[0].as_deref(), Some("0:1.0-1"), "{upgraded}");
    assert_eq!(three(&n.root())[2].as_deref(), Some("0:1.5-1"), "{upgraded}");
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(text.contains("excludepkgs=nk-conflict,nk-ctr,nk-demo,nk-kube,nk-kubeadm\n"), "{text}");
    assert!(text.contains("gpgcheck=1\n") && text.contains("best=False\n"), "the rest is kept: {text}");

    // The agent's own transactions are not held by the lock (nor by the operator's exclude).
    let (code, out) = n.apply(&demo("1.1-1"));
    assert_eq!(code, 0, "{out}");
    assert_eq!(rpm_installed(&n.root(), "nk-demo").as_deref(), Some("0:1.1-1"));

    // A spec without the components lets go of their packages, not of the operator's exclude.
    std::fs::write(n.path("empty.toml"), "").unwrap();
    let (code, out) = n.apply(&n.path("empty.toml"));
    assert_eq!(code, 0, "{out}");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "[main]\nexcludepkgs=nk-conflict\ngpgcheck=1\nbest=False\n");
    let upgraded = plain_dnf_upgrade(&n);
    assert_eq!(rpm_installed(&n.root(), "nk-demo").as_deref(), Some("0:1.2-1"), "{upgraded}");
    assert_eq!(three(&n.root())[0].as_deref(), Some("0:2.0-1"), "{upgraded}");
}

/// A spec of nk-demo at `version` from one repository given by `location` (TOML keys).
fn demo_from(n: &Node, version: &str, location: &str) -> PathBuf {
    let path = n.path("located.toml");
    std::fs::write(
        &path,
        format!(
            "[[component]]\nname = \"demo\"\npackage = \"nk-demo\"\nversion = \"{version}\"\n\
             [[component.repositories]]\nid = \"nk-located\"\n{location}\n"
        ),
    )
    .unwrap();
    path
}

/// A metalink for the test repository whose repomd.xml checksum is `sha256`.
fn metalink(n: &Node, sha256: &str) -> String {
    let repomd = rpm_repo().dir.join("repo/repodata/repomd.xml");
    let size = std::fs::metadata(&repomd).unwrap().len();
    let path = n.path(&format!("metalink-{}.xml", &sha256[..8]));
    std::fs::write(
        &path,
        format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<metalink version=\"3.0\" xmlns=\"http://www.metalinker.org/\">\n\
             <files><file name=\"repomd.xml\"><size>{size}</size>\
             <verification><hash type=\"sha256\">{sha256}</hash></verification>\
             <resources maxconnections=\"1\"><url protocol=\"file\" type=\"file\" location=\"XX\" preference=\"100\">file://{}</url></resources>\
             </file></files>\n</metalink>\n",
            repomd.display()
        ),
    )
    .unwrap();
    format!("metalink = \"file://{}\"", path.display())
}

#[test]
fn repositories_may_be_given_by_mirrorlist_or_metalink() {
    use sha2::Digest;
    let n = Node::new();
    let mirrors = n.path("mirrorlist");
    std::fs::write(&mirrors, format!("# mirrors\n{}\n", rpm_repo().url())).unwrap();
    let (code, out) = n.apply(&demo_from(&n, "1.0-1", &format!("mirrorlist = \"file://{}\"", mirrors.display())));
    assert_eq!(code, 0, "{out}");
    assert_eq!(n.installed().as_deref(), Some("0:1.0-1"));

    // A metalink is checked: repomd.xml must have the checksum it gives.
    let repomd = std::fs::read(rpm_repo().dir.join("repo/repodata/repomd.xml")).unwrap();
    let sum: String = sha2::Sha256::digest(&repomd).iter().map(|b| format!("{b:02x}")).collect();
    let (code, out) = n.apply(&demo_from(&n, "1.1-1", &metalink(&n, &"0".repeat(64))));
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("repository unreachable"), "{out}");
    assert_eq!(n.installed().as_deref(), Some("0:1.0-1"));
    let (code, out) = n.apply(&demo_from(&n, "1.1-1", &metalink(&n, &sum)));
    assert_eq!(code, 0, "{out}");
    assert_eq!(n.installed().as_deref(), Some("0:1.1-1"));

    // A repository without any location is a defect of the spec.
    let (code, out) = n.apply(&demo_from(&n, "1.1-1", "gpg_check = false"));
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("set base_url, mirrorlist or metalink"), "{out}");
}
