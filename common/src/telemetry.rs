//! Logging: JSON lines (production) or text (a terminal), filtered by `TALLY_LOG` / `RUST_LOG`.

use std::str::FromStr;

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(LogFormat::Json),
            "text" => Ok(LogFormat::Text),
            other => Err(format!("expected json or text, got {other:?}")),
        }
    }
}

/// Installs the global subscriber; a second call (tests) is a no-op.
pub fn init(format: LogFormat, filter: Option<&str>) {
    let filter =
        EnvFilter::try_new(filter.unwrap_or("info,rdkafka=warn")).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(true);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
