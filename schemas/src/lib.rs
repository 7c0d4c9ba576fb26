//! Tally's shared contracts: the normalized usage event and its validation bounds, the parsers of
//! the two SDK dialects, the Kafka record formats (events, dead letters, the control topic), pricing, API key hashing and the ClickHouse schema.

pub mod cluster;
pub mod control;
mod cursor;
pub mod event;
pub mod keys;
pub mod limits;
pub mod migrations;
pub mod parse;
pub mod plan;
pub mod pricing;
pub mod record;
pub mod row;
pub mod time;

pub use event::{CostSource, Event, Status};
pub use row::EventRow;
