//! ClickHouse access over HTTP with the `clickhouse` crate, set up to work on 18.16 as well as
//! current servers: no compression, no schema validation (plain RowBinary), explicit casts in SQL.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct ChConfig {
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: String,
}

impl ChConfig {
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
