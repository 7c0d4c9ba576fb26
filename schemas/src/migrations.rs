//! The ClickHouse schema as ordered, versioned migrations. Each file's statements are separated by
//! `;` at the end of a line and name tables as `{db}.table`, so one schema serves any database
//! (tests each get their own). Every statement must run on ClickHouse 18.16 and a current version.

use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
    /// Checksums of earlier texts of this migration that remain valid once applied: edits that
    /// change only physical settings of new tables (a database made with the earlier text works
    /// as is). Any other edit needs a new migration.
    pub replaces: &'static [&'static str],
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events",
        sql: include_str!("../migrations/0001_events.sql"),
        replaces: &[],
    },
    Migration {
        version: 2,
        name: "rollups",
        sql: include_str!("../migrations/0002_rollups.sql"),
        // Before `index_granularity = 256` (2026-11-22).
        replaces: &["14da48f273c7a7f3e76d0ee62feb6b4f58342271be44958f4451c27859a6d499"],
    },
    Migration { version: 3, name: "admin", sql: include_str!("../migrations/0003_admin.sql"), replaces: &[] },
    Migration {
        version: 4,
        name: "seed_prices",
        sql: include_str!("../migrations/0004_seed_prices.sql"),
        replaces: &[],
    },
    Migration {
        version: 5,
        name: "admin_database",
        sql: include_str!("../migrations/0005_admin_database.sql"),
        replaces: &[],
    },
];

/// The database that holds the admin tables (orgs, API keys, budgets) of events database `db`:
/// one the read-only analyst user is not allowed to see.
pub fn admin_database(db: &str) -> String {
    format!("{db}_admin")
}

/// Where each table lives: the admin tables in `admin_database`, the others beside the events.
pub fn database_of(table: &str, db: &str) -> String {
    match table {
        "orgs" | "api_keys" | "budgets" => admin_database(db),
        _ => db.to_owned(),
    }
}

impl Migration {
    /// The statements of this migration for database `db` (and its admin database), comments
    /// removed.
    pub fn statements(&self, db: &str) -> Vec<String> {
        let without_comments: String = self
            .sql
            .lines()
            .filter(|line| !line.trim_start().starts_with("--"))
            .map(|line| format!("{line}\n"))
            .collect();
        without_comments
            .split(";\n")
            .map(|statement| statement.trim().trim_end_matches(';').trim())
            .filter(|statement| !statement.is_empty())
            .map(|statement| statement.replace("{admin}", &admin_database(db)).replace("{db}", db))
            .collect()
    }

    /// Hex SHA-256 of the file: the runner refuses to continue when an applied migration changed.
    pub fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }

    /// Whether a database that recorded `applied` for this migration has it.
    pub fn accepts(&self, applied: &str) -> bool {
        applied == self.checksum() || self.replaces.contains(&applied)
    }
}

/// A database name is spliced into DDL, so it must be a plain identifier (short enough that its
/// admin database's name is one too).
pub fn is_valid_database_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 58
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_ordered_and_statements_split() {
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].version < pair[1].version);
        }
        let statements = MIGRATIONS[1].statements("t1");
        assert_eq!(statements.len(), 4);
        assert!(statements.iter().all(|s| !s.contains("{db}") && !s.ends_with(';')));
        assert!(statements[1]
            .starts_with("CREATE MATERIALIZED VIEW IF NOT EXISTS t1.rollup_hourly_mv TO t1.rollup_hourly"));
    }

    #[test]
    fn the_admin_tables_move_to_the_admin_database() {
        let statements = MIGRATIONS[4].statements("t1");
        assert_eq!(statements[0], "CREATE DATABASE IF NOT EXISTS t1_admin");
        assert_eq!(statements[2], "RENAME TABLE t1.api_keys TO t1_admin.api_keys");
        for table in ["orgs", "api_keys", "budgets"] {
            assert_eq!(database_of(table, "t1"), "t1_admin");
            assert!(statements.iter().any(|s| s == &format!("RENAME TABLE t1.{table} TO t1_admin.{table}")));
        }
        for table in ["events", "rollup_hourly", "model_prices"] {
            assert_eq!(database_of(table, "t1"), "t1");
        }
    }

    #[test]
    fn database_names_are_plain_identifiers() {
        assert!(is_valid_database_name("tally_test_01"));
        assert!(!is_valid_database_name("x; DROP TABLE y"));
        assert!(!is_valid_database_name("1abc"));
        assert!(!is_valid_database_name(""));
    }
}
