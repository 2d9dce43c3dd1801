//! The checked-in CRD YAML must be exactly what `wallet-migrator crd` prints.

mod support;

use std::path::Path;

const FILES: [&str; 2] = [
    "charts/wallet/crds/walletmigrations.wallet.dev.yaml",
    "k8s/crds/walletmigrations.wallet.dev.yaml",
];

#[test]
fn checked_in_crds_match_the_rust_types() {
    let out = std::process::Command::new(support::BIN)
        .arg("crd")
        .output()
        .expect("run wallet-migrator crd");
    assert!(out.status.success(), "{}", support::describe(&out));
    let generated = String::from_utf8(out.stdout).expect("utf-8 YAML");
    assert_eq!(
        generated,
        wallet_migrator::crd::crd_yaml().expect("CRD serializes"),
        "the binary prints the library's CRD"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for file in FILES {
        let checked_in =
            std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("read {file}: {e}"));
        assert!(
            checked_in == generated,
            "{file} is out of date with the Rust types; regenerate it with:\n  cargo run -p wallet-migrator -- crd > {file}"
        );
    }
}
