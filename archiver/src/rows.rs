//! Archive files back into event rows: the inverse of `columns::Columns::append`, for `restore`.

use arrow_array::cast::AsArray;
use arrow_array::types::{Decimal128Type, TimestampMillisecondType, UInt16Type, UInt32Type, UInt64Type};
use arrow_array::{Array, RecordBatch};
use tally_schemas::row::Enum8;
use tally_schemas::{CostSource, EventRow, Status};

use crate::error::ArchiveError;

fn bad(reason: String) -> ArchiveError {
    ArchiveError::Manifest { key: "restore".into(), reason }
}

fn enum_named<T: Enum8>(name: &str) -> Result<T, ArchiveError> {
    T::VARIANTS
        .iter()
        .copied()
        .find(|v| v.name() == name)
        .ok_or_else(|| bad(format!("unknown value {name:?}")))
}

/// The rows of a batch read from an archive file (schema `columns::schema()`).
pub fn rows_of(batch: &RecordBatch) -> Result<Vec<EventRow>, ArchiveError> {
    let column = |name: &str| batch.column_by_name(name).ok_or_else(|| bad(format!("no column {name}")));
    let text = |name: &str| column(name).map(|c| c.as_string::<i32>().clone());
    let list = |name: &str| column(name).map(|c| c.as_list::<i32>().clone());
    let (org_id, provider, model) = (text("org_id")?, text("provider")?, text("model")?);
    let event_id = column("event_id")?.as_fixed_size_binary().clone();
    let timestamp = column("timestamp")?.as_primitive::<TimestampMillisecondType>().clone();
    let received_at = column("received_at")?.as_primitive::<TimestampMillisecondType>().clone();
    let u32s = |name: &str| column(name).map(|c| c.as_primitive::<UInt32Type>().clone());
    let u64s = |name: &str| column(name).map(|c| c.as_primitive::<UInt64Type>().clone());
    let u16s = |name: &str| column(name).map(|c| c.as_primitive::<UInt16Type>().clone());
    let (prompt, completion, total, latency) =
        (u32s("prompt_tokens")?, u32s("completion_tokens")?, u32s("total_tokens")?, u32s("latency_ms")?);
    let cost = column("cost")?.as_primitive::<Decimal128Type>().clone();
    let (cost_source, status, http_status) = (text("cost_source")?, text("status")?, u16s("http_status")?);
    let texts = ["error", "execution_id", "agent_id", "user_id", "service", "action", "request_id"]
        .map(text)
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let (input_bytes, output_bytes) = (u64s("input_bytes")?, u64s("output_bytes")?);
    let (keys, values) = (list("metadata_keys")?, list("metadata_values")?);
    let (partition, offset, index) = (u16s("kafka_partition")?, u64s("kafka_offset")?, u32s("kafka_index")?);
    let strings = |array: &std::sync::Arc<dyn Array>| -> Vec<String> {
        let items = array.as_string::<i32>();
        (0..items.len()).map(|i| items.value(i).to_owned()).collect()
    };
    let mut rows = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        let ms = timestamp.value(i);
        rows.push(EventRow {
            org_id: org_id.value(i).to_owned(),
            event_id: uuid::Uuid::from_slice(event_id.value(i)).map_err(|e| bad(e.to_string()))?,
            timestamp: u32::try_from(ms.div_euclid(1000)).map_err(|e| bad(e.to_string()))?,
            timestamp_ms: ms.rem_euclid(1000) as u16,
            received_at: u32::try_from(received_at.value(i).div_euclid(1000))
                .map_err(|e| bad(e.to_string()))?,
            provider: provider.value(i).to_owned(),
            model: model.value(i).to_owned(),
            prompt_tokens: prompt.value(i),
            completion_tokens: completion.value(i),
            total_tokens: total.value(i),
            cost_nanos: i64::try_from(cost.value(i)).map_err(|e| bad(e.to_string()))?,
            cost_source: enum_named::<CostSource>(cost_source.value(i))?,
            latency_ms: latency.value(i),
            status: enum_named::<Status>(status.value(i))?,
            http_status: http_status.value(i),
            error: texts[0].value(i).to_owned(),
            execution_id: texts[1].value(i).to_owned(),
            agent_id: texts[2].value(i).to_owned(),
            user_id: texts[3].value(i).to_owned(),
            service: texts[4].value(i).to_owned(),
            action: texts[5].value(i).to_owned(),
            request_id: texts[6].value(i).to_owned(),
            input_bytes: input_bytes.value(i),
            output_bytes: output_bytes.value(i),
            metadata_keys: strings(&keys.value(i)),
            metadata_values: strings(&values.value(i)),
            kafka_partition: partition.value(i),
            kafka_offset: offset.value(i),
            kafka_index: index.value(i),
        });
    }
    Ok(rows)
}
