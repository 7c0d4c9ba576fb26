//! Plans and their default ingest limits (seeds 000 and 003), counted in events per minute.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Plan {
    Free,
    Startup,
    Enterprise,
}

impl Plan {
    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "FREE",
            Plan::Startup => "STARTUP",
            Plan::Enterprise => "ENTERPRISE",
        }
    }

    /// Events per minute an org on this plan may send unless its row overrides it.
    pub fn default_events_per_minute(self) -> u32 {
        match self {
            Plan::Free => 100,
            Plan::Startup => 1_000,
            Plan::Enterprise => 10_000,
        }
    }
}

impl FromStr for Plan {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "FREE" => Ok(Plan::Free),
            "STARTUP" => Ok(Plan::Startup),
            "ENTERPRISE" => Ok(Plan::Enterprise),
            other => Err(format!("unknown plan {other:?}: expected FREE, STARTUP or ENTERPRISE")),
        }
    }
}
