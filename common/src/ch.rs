//! ClickHouse access over HTTP with the `clickhouse` crate, set up to work on 18.16 as well as
//! current servers: no compression, no schema validation (plain RowBinary), explicit casts in SQL.

use std::time::Duration;

#[derive(Clone)]
pub struct ChConfig {
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: String,
    /// Set when the schema is the cluster form (`tally_schemas::cluster`, issue 13).
    pub cluster: Option<Cluster>,
}

/// Never shows the password (a configuration printed in a log or an error stays safe).
impl std::fmt::Debug for ChConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChConfig")
            .field("url", &self.url)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &if self.password.is_empty() { "" } else { "<hidden>" })
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// A ClickHouse cluster of shards × replicas: `TALLY_CLICKHOUSE_CLUSTER` (its name in the servers'
/// `remote_servers`), `TALLY_CLICKHOUSE_SHARDS` (each shard's replica URLs, in `remote_servers`
/// order: `http://a:8123,http://b:8123;http://c:8123,http://d:8123`), and
/// `TALLY_CLICKHOUSE_INSERT_QUORUM` (replicas that must hold an insert before it is confirmed;
/// default: every replica of a shard). `url` stays the node that runs the migrations (and their
/// lock) and, for the query API and ingest, the node (or load balancer) they read through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub name: String,
    pub shards: Vec<Vec<String>>,
    pub insert_quorum: usize,
}

impl Cluster {
    /// Parses `TALLY_CLICKHOUSE_SHARDS`: shards separated by `;`, a shard's replicas by `,`.
    pub fn parse_shards(text: &str) -> Result<Vec<Vec<String>>, String> {
        let shards: Vec<Vec<String>> = text
            .split(';')
            .map(|shard| {
                shard.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect()
            })
            .filter(|replicas: &Vec<String>| !replicas.is_empty())
            .collect();
        if shards.is_empty() {
            return Err("no shard given: `url,url;url,url` (shards by `;`, replicas by `,`)".into());
        }
        if let Some(bad) =
            shards.iter().flatten().find(|u| !u.starts_with("http://") && !u.starts_with("https://"))
        {
            return Err(format!("{bad:?} is not an http(s) URL"));
        }
        Ok(shards)
    }
}

/// Tables whose rows are spread over the shards by org (`tally_schemas::cluster`); each has a
/// `<table>_all` Distributed table over the cluster.
pub const SHARDED_TABLES: [&str; 3] = tally_schemas::cluster::SHARDED;

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

    /// The table to read all of `table`'s rows from: on a cluster, a sharded table's Distributed
    /// `<table>_all` (every shard); otherwise `table` itself.
    pub fn read_table(&self, table: &str) -> String {
        match &self.cluster {
            Some(_) if SHARDED_TABLES.contains(&table) => format!("{}_all", self.table(table)),
            _ => self.table(table),
        }
    }

    /// The same settings for the server at `url` (a replica of a shard).
    pub fn at(&self, url: &str) -> ChConfig {
        ChConfig { url: url.to_owned(), ..self.clone() }
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
