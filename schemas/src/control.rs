//! The control topic (`tally.control.v1`): what the ingest needs from the admin tables, so that it
//! can run with Kafka as its only peer (`TALLY_INGEST_CONTROL=kafka`). The consumers read
//! ClickHouse (every active API key's hash with its org and limits, and the model prices) and
//! publish a snapshot when it changes; the ingest reads the topic from its start and swaps in each
//! complete snapshot. One partition, `cleanup.policy=compact`: the log keeps the newest record per
//! key, so a starting ingest reads one snapshot, not the history.
//!
//! A snapshot is one JSON document cut into parts of at most [`PART_BYTES`] (a broker's default
//! record limit is 1 MB); part `i` is the record with key `snapshot/<i>` and the value
//! `<header JSON>\n<bytes of the document>`, the header naming the snapshot, the part, the count of
//! parts and the whole document's SHA-256. A reader assembles the parts of one snapshot id and
//! checks the digest before it uses them; parts of several publishers may interleave.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::plan::Plan;
use crate::pricing::ModelPrice;

pub const CONTROL_TOPIC: &str = "tally.control.v1";
/// The largest document part in one record.
pub const PART_BYTES: usize = 512 * 1024;
/// Snapshots being assembled at once (parts of publishers interleaving); older ones are dropped.
const PENDING_MAX: usize = 8;

/// One active API key: its SHA-256 and what it tells about its org.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    pub key_hash: String,
    pub org_id: String,
    pub name: String,
    pub plan: Plan,
    pub events_per_minute: u32,
    pub burst: u32,
}

/// What the ingest needs from the admin tables, at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlSnapshot {
    pub keys: Vec<KeyEntry>,
    pub prices: Vec<ModelPrice>,
}

impl ControlSnapshot {
    /// Sorted, so equal contents give equal documents and digests whatever order ClickHouse
    /// returned the rows in.
    pub fn normalized(mut self) -> Self {
        self.keys.sort_by(|a, b| a.key_hash.cmp(&b.key_hash));
        self.prices.sort_by(|a, b| {
            (&a.provider, &a.model, a.effective_from_ms).cmp(&(&b.provider, &b.model, b.effective_from_ms))
        });
        self
    }

    /// The document and its SHA-256 (hex): publishers compare digests to publish only changes.
    pub fn document(&self) -> (Vec<u8>, String) {
        let document = serde_json::to_vec(self).expect("a snapshot always serializes");
        let digest = hex::encode(Sha256::digest(&document));
        (document, digest)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PartHeader {
    snapshot: String,
    part: usize,
    parts: usize,
    sha256: String,
}

/// The records of one snapshot's `document` (with its `sha256`, both from
/// `ControlSnapshot::document`): (key, value) per part, in order. `snapshot_id` must be unique per
/// publication (e.g. the publisher's id and a sequence number).
pub fn encode(document: &[u8], sha256: &str, snapshot_id: &str) -> Vec<(String, Vec<u8>)> {
    let chunks: Vec<&[u8]> =
        if document.is_empty() { vec![document] } else { document.chunks(PART_BYTES).collect() };
    let parts = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(part, bytes)| {
            let header =
                PartHeader { snapshot: snapshot_id.to_owned(), part, parts, sha256: sha256.to_owned() };
            let mut value = serde_json::to_vec(&header).expect("a header always serializes");
            value.push(b'\n');
            value.extend_from_slice(bytes);
            (format!("snapshot/{part}"), value)
        })
        .collect()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("control record without a header line")]
    NoHeader,
    #[error("control record header unreadable: {0}")]
    Header(String),
    #[error("control snapshot {0}: its parts do not match their digest")]
    Digest(String),
    #[error("control snapshot {0}: unreadable document: {1}")]
    Document(String, String),
}

struct Pending {
    parts: Vec<Option<Vec<u8>>>,
    sha256: String,
    arrived: u64,
}

/// Collects parts as they are read and yields each snapshot once all its parts are in.
#[derive(Default)]
pub struct Assembler {
    pending: HashMap<String, Pending>,
    arrivals: u64,
}

impl Assembler {
    /// Takes one record's value; returns the snapshot it completes, if any.
    pub fn push(&mut self, value: &[u8]) -> Result<Option<ControlSnapshot>, ControlError> {
        let newline = value.iter().position(|&b| b == b'\n').ok_or(ControlError::NoHeader)?;
        let header: PartHeader =
            serde_json::from_slice(&value[..newline]).map_err(|e| ControlError::Header(e.to_string()))?;
        if header.parts == 0 || header.part >= header.parts || header.parts > 4096 {
            return Err(ControlError::Header(format!("part {} of {}", header.part, header.parts)));
        }
        self.arrivals += 1;
        let arrived = self.arrivals;
        let pending = self.pending.entry(header.snapshot.clone()).or_insert_with(|| Pending {
            parts: vec![None; header.parts],
            sha256: header.sha256.clone(),
            arrived,
        });
        if pending.parts.len() != header.parts || pending.sha256 != header.sha256 {
            self.pending.remove(&header.snapshot);
            return Err(ControlError::Header(format!("snapshot {} changed shape mid-way", header.snapshot)));
        }
        pending.parts[header.part] = Some(value[newline + 1..].to_vec());
        if pending.parts.iter().any(Option::is_none) {
            self.forget_oldest();
            return Ok(None);
        }
        let pending = self.pending.remove(&header.snapshot).expect("present above");
        let document: Vec<u8> = pending.parts.into_iter().flatten().flatten().collect();
        if hex::encode(Sha256::digest(&document)) != pending.sha256 {
            return Err(ControlError::Digest(header.snapshot));
        }
        serde_json::from_slice(&document)
            .map(Some)
            .map_err(|e| ControlError::Document(header.snapshot, e.to_string()))
    }

    fn forget_oldest(&mut self) {
        while self.pending.len() > PENDING_MAX {
            let oldest = self.pending.iter().min_by_key(|(_, p)| p.arrived).map(|(id, _)| id.clone());
            if let Some(id) = oldest {
                self.pending.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(snapshot: &ControlSnapshot, id: &str) -> Vec<(String, Vec<u8>)> {
        let (document, sha256) = snapshot.document();
        encode(&document, &sha256, id)
    }

    fn snapshot(keys: usize) -> ControlSnapshot {
        ControlSnapshot {
            keys: (0..keys)
                .map(|i| KeyEntry {
                    key_hash: format!("{:064x}", i * 7919),
                    org_id: format!("org_{}", i % 13),
                    name: format!("Org {}", i % 13),
                    plan: Plan::Startup,
                    events_per_minute: 60_000,
                    burst: 0,
                })
                .collect(),
            prices: vec![ModelPrice {
                provider: "openai".into(),
                model: "gpt-4o".into(),
                effective_from_ms: 0,
                input_nanos_per_mtok: 2_500_000_000,
                output_nanos_per_mtok: 10_000_000_000,
            }],
        }
        .normalized()
    }

    #[test]
    fn a_large_snapshot_is_cut_into_parts_and_read_back_whole() {
        let big = snapshot(20_000);
        let records = records(&big, "p1-1");
        assert!(records.len() > 2, "{} parts", records.len());
        assert!(records.iter().all(|(_, v)| v.len() <= PART_BYTES + 200));
        assert_eq!(records[1].0, "snapshot/1");
        let mut assembler = Assembler::default();
        let (last, rest) = records.split_last().unwrap();
        for (_, value) in rest {
            assert_eq!(assembler.push(value), Ok(None));
        }
        assert_eq!(assembler.push(&last.1), Ok(Some(big)));
    }

    #[test]
    fn interleaved_publishers_each_complete_and_a_corrupt_part_is_refused() {
        let (a, b) = (snapshot(4000), snapshot(4001));
        let (ra, rb) = (records(&a, "a-1"), records(&b, "b-1"));
        assert_eq!((ra.len(), rb.len()), (2, 2));
        let mut assembler = Assembler::default();
        assert_eq!(assembler.push(&ra[0].1), Ok(None));
        assert_eq!(assembler.push(&rb[0].1), Ok(None));
        assert_eq!(assembler.push(&rb[1].1), Ok(Some(b)));
        assert_eq!(assembler.push(&ra[1].1), Ok(Some(a.clone())));

        let mut corrupt = records(&a, "a-2");
        let last = corrupt[1].1.len() - 2;
        corrupt[1].1[last] ^= 1;
        assert_eq!(assembler.push(&corrupt[0].1), Ok(None));
        assert_eq!(assembler.push(&corrupt[1].1), Err(ControlError::Digest("a-2".into())));
        assert_eq!(assembler.push(b"no header"), Err(ControlError::NoHeader));
    }

    #[test]
    fn equal_contents_in_another_order_have_one_digest() {
        let mut shuffled = snapshot(50);
        shuffled.keys.reverse();
        assert_ne!(shuffled.document().1, snapshot(50).document().1);
        assert_eq!(shuffled.normalized().document().1, snapshot(50).document().1);
        let empty = ControlSnapshot::default();
        let records = records(&empty, "e");
        assert_eq!(records.len(), 1);
        assert_eq!(Assembler::default().push(&records[0].1), Ok(Some(empty)));
    }
}
