//! The generated code in `src/gen` is committed (so no build script or protoc is needed to build
//! the workspace). This test regenerates it from `proto/` with protox and fails when the committed
//! copy is stale. Run with `NODEKEEPER_REGEN=1` to rewrite it.

use std::path::{Path, PathBuf};

use prost::Message;

fn generate(out_dir: &Path) -> Vec<u8> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files: Vec<PathBuf> = std::fs::read_dir(root.join("proto/nodekeeper/v1"))
        .expect("read proto dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    let mut files = files;
    files.sort();
    let fds = protox::compile(&files, [root.join("proto")]).expect("protox compiles the contract");
    let bytes = fds.encode_to_vec();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(out_dir)
        .compile_fds(fds)
        .expect("tonic-prost-build generates code");
    bytes
}

#[test]
fn generated_code_is_fresh() {
    let tmp = tempfile::tempdir().unwrap();
    let descriptor = generate(tmp.path());
    let committed_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gen");
    let pairs = [
        ("nodekeeper.v1.rs", std::fs::read(tmp.path().join("nodekeeper.v1.rs")).unwrap()),
        ("nodekeeper.v1.bin", descriptor),
    ];
    if std::env::var_os("NODEKEEPER_REGEN").is_some() {
        for (name, content) in &pairs {
            std::fs::write(committed_dir.join(name), content).unwrap();
        }
        return;
    }
    for (name, content) in &pairs {
        let committed = std::fs::read(committed_dir.join(name)).unwrap_or_default();
        assert!(
            committed == *content,
            "proto/src/gen/{name} is stale: run `NODEKEEPER_REGEN=1 cargo test -p nodekeeper-proto --test codegen`"
        );
    }
}
