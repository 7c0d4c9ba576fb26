//! Failpoints for the chaos and exactly-once tests, compiled only with the `failpoints` feature
//! (release builds and `make up` leave it off, so a production binary holds none of this).
//! Each is a probability read from the environment at start.

use tally_common::config::{ConfigError, Env};

#[derive(Debug, Clone, Default)]
pub struct Failpoints {
    /// Probability of aborting the process between an insert and its commit, to exercise recovery
    /// (`TALLY_FAILPOINT_CRASH_AFTER_INSERT`).
    pub crash_after_insert: f64,
    /// Probability that an insert ClickHouse applied is reported as failed (as when the
    /// connection drops before the answer), to exercise the re-check and the rollup check
    /// (`TALLY_FAILPOINT_FAIL_AFTER_INSERT`).
    pub fail_after_insert: f64,
}

impl Failpoints {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Failpoints {
            crash_after_insert: env.parse("TALLY_FAILPOINT_CRASH_AFTER_INSERT", 0.0)?,
            fail_after_insert: env.parse("TALLY_FAILPOINT_FAIL_AFTER_INSERT", 0.0)?,
        })
    }

    /// After an applied insert: maybe pretend its answer was lost.
    pub fn lose_insert_answer(&self) -> Result<(), clickhouse::error::Error> {
        if self.fail_after_insert > 0.0 && rand::random::<f64>() < self.fail_after_insert {
            tracing::error!("failpoint: reporting an applied insert as failed");
            return Err(clickhouse::error::Error::Custom("failpoint: answer lost after the insert".into()));
        }
        Ok(())
    }

    /// Between an insert and its commit: maybe die.
    pub fn crash_before_commit(&self) {
        if self.crash_after_insert > 0.0 && rand::random::<f64>() < self.crash_after_insert {
            tracing::error!("failpoint: crashing between insert and commit");
            std::process::abort();
        }
    }
}
