//! ClickHouse access over HTTP with the `clickhouse` crate, set up to work on 18.16 as well as
//! current servers: no compression, no schema validation (plain RowBinary), explicit casts in SQL.

use std::time::Duration;

use crate::config::{ConfigError, Env};

#[derive(Debug, Clone)]
pub struct ChConfig {
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: String,
}

impl ChConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let database = env.string("TALLY_CLICKHOUSE_DATABASE", "tally");
        if !tally_schemas::migrations::is_valid_database_name(&database) {
            return Err(ConfigError::Invalid {
                key: "TALLY_CLICKHOUSE_DATABASE".into(),
                value: database,
                reason: "must be letters, digits and underscores, not starting with a digit".into(),
            });
        }
        Ok(ChConfig {
            url: env.string("TALLY_CLICKHOUSE_URL", "http://127.0.0.1:8123"),
            database,
            user: env.string("TALLY_CLICKHOUSE_USER", "default"),
            password: env.string("TALLY_CLICKHOUSE_PASSWORD", ""),
        })
    }

    /// A client whose statements name tables as `{database}.table` explicitly.
    pub fn client(&self) -> clickhouse::Client {
        clickhouse::Client::default()
            .with_url(&self.url)
            .with_user(&self.user)
            .with_password(&self.password)
            .with_compression(clickhouse::Compression::None)
            .with_validation(false)
    }

    /// `database.table`, for splicing into SQL (the database name is validated at start). The
    /// admin tables (orgs, API keys, budgets) are in the admin database (migration 0005).
    pub fn table(&self, table: &str) -> String {
        format!("{}.{}", tally_schemas::migrations::database_of(table, &self.database), table)
    }
}

/// The ClickHouse error code in a server error response ("Code: 57. DB::Exception: ..."), if any.
pub fn error_code(error: &clickhouse::error::Error) -> Option<u32> {
    let clickhouse::error::Error::BadResponse(message) = error else { return None };
    let rest = &message[message.find("Code: ")? + "Code: ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

pub const CODE_TABLE_ALREADY_EXISTS: u32 = 57;
pub const CODE_UNKNOWN_TABLE: u32 = 60;

/// Is the server reachable? A `SELECT 1` with a short timeout.
pub async fn ping(client: &clickhouse::Client) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), client.query("SELECT 1").execute()).await,
        Ok(Ok(()))
    )
}

/// `n` copies of `placeholder` joined by commas, for an `IN (…)` list bound with `bind_all`.
pub fn placeholders(n: usize, placeholder: &str) -> String {
    vec![placeholder; n].join(", ")
}

/// Binds every item of `values` in order (the `?`s of a `placeholders` list).
pub fn bind_all<T: clickhouse::sql::Bind>(
    query: clickhouse::query::Query,
    values: impl IntoIterator<Item = T>,
) -> clickhouse::query::Query {
    values.into_iter().fold(query, |query, value| query.bind(value))
}
