//! wallet-migrator: applies the schema (`apply`, `status`, `wait`) and runs the
//! operator that turns a `WalletMigration` resource into a migration Job.

pub mod crd;
pub mod migrate;
pub mod operator;

#[cfg(test)]
mod fixtures;
