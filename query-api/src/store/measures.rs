//! The measures the query API reads, one row each: the column of the hourly rollup that holds its
//! aggregate state, the state expression the rollup's materialized view builds it with (migration
//! 0002; a test below holds the two together), the -Merge expression that reads the rollup, and
//! the plain aggregate that gives the same value and type from raw rows.

/// One measure, selected under `alias` whichever source answers.
#[derive(Clone, Copy, Debug)]
pub struct Measure {
    /// The name the query returns it under (the field of the row type that reads it).
    pub alias: &'static str,
    /// Its column in `rollup_hourly`.
    pub column: &'static str,
    /// The state over raw rows, as the rollup's view builds it.
    pub state: &'static str,
    /// The final value from a column of states.
    pub merge: &'static str,
    /// The final value straight from raw rows (same type as `merge`).
    pub plain: &'static str,
}

pub const REQUESTS: Measure = Measure {
    alias: "requests",
    column: "events",
    state: "countState()",
    merge: "toUInt64(countMerge(events))",
    plain: "count()",
};
pub const ERRORS: Measure = Measure {
    alias: "errors",
    column: "errors",
    state: "sumState(toUInt64(status = 'error'))",
    merge: "sumMerge(errors)",
    plain: "toUInt64(countIf(status = 'error'))",
};
pub const PROMPT_TOKENS: Measure = Measure {
    alias: "prompt_tokens",
    column: "prompt_tokens_sum",
    state: "sumState(toUInt64(prompt_tokens))",
    merge: "sumMerge(prompt_tokens_sum)",
    plain: "sum(toUInt64(prompt_tokens))",
};
pub const COMPLETION_TOKENS: Measure = Measure {
    alias: "completion_tokens",
    column: "completion_tokens_sum",
    state: "sumState(toUInt64(completion_tokens))",
    merge: "sumMerge(completion_tokens_sum)",
    plain: "sum(toUInt64(completion_tokens))",
};
pub const TOKENS: Measure = Measure {
    alias: "tokens",
    column: "total_tokens_sum",
    state: "sumState(toUInt64(total_tokens))",
    merge: "sumMerge(total_tokens_sum)",
    plain: "sum(toUInt64(total_tokens))",
};
pub const COST: Measure = Measure {
    alias: "cost_nanos",
    column: "cost_nanos_sum",
    state: "sumState(cost_nanos)",
    merge: "sumMerge(cost_nanos_sum)",
    plain: "sum(cost_nanos)",
};
pub const INPUT_BYTES: Measure = Measure {
    alias: "input_bytes",
    column: "input_bytes_sum",
    state: "sumState(input_bytes)",
    merge: "sumMerge(input_bytes_sum)",
    plain: "sum(input_bytes)",
};
pub const OUTPUT_BYTES: Measure = Measure {
    alias: "output_bytes",
    column: "output_bytes_sum",
    state: "sumState(output_bytes)",
    merge: "sumMerge(output_bytes_sum)",
    plain: "sum(output_bytes)",
};
/// p50, p95 and p99 of the latency in ms.
pub const LATENCY: Measure = Measure {
    alias: "latency",
    column: "latency_quantiles",
    state: "quantilesTimingState(0.5, 0.95, 0.99)(latency_ms)",
    merge: "quantilesTimingMerge(0.5, 0.95, 0.99)(latency_quantiles)",
    plain: "quantilesTiming(0.5, 0.95, 0.99)(latency_ms)",
};

/// Every measure, in the rollup's column order.
pub const ALL: [Measure; 9] =
    [REQUESTS, ERRORS, PROMPT_TOKENS, COMPLETION_TOKENS, TOKENS, COST, INPUT_BYTES, OUTPUT_BYTES, LATENCY];

fn list(measures: &[Measure], item: impl Fn(&Measure) -> String) -> String {
    measures.iter().map(item).collect::<Vec<_>>().join(", ")
}

/// `<merge> AS <alias>, …`: final values from state columns.
pub fn merges(measures: &[Measure]) -> String {
    list(measures, |m| format!("{} AS {}", m.merge, m.alias))
}

/// `<plain> AS <alias>, …`: the same final values from raw rows.
pub fn plains(measures: &[Measure]) -> String {
    list(measures, |m| format!("{} AS {}", m.plain, m.alias))
}

/// `<state> AS <column>, …`: states from raw rows, shaped like the rollup's columns.
pub fn states(measures: &[Measure]) -> String {
    list(measures, |m| format!("{} AS {}", m.state, m.column))
}

/// `<column>, …`: the rollup's state columns as stored.
pub fn columns(measures: &[Measure]) -> String {
    list(measures, |m| m.column.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLLUPS: &str = include_str!("../../../schemas/migrations/0002_rollups.sql");

    /// The text of the first statement of migration 0002 that starts with `head`.
    fn statement(head: &str) -> String {
        let start = ROLLUPS.find(head).unwrap_or_else(|| panic!("migration 0002 has no {head}"));
        let text = &ROLLUPS[start..];
        let normalised: String =
            text[..text.find(';').unwrap_or(text.len())].split_whitespace().collect::<Vec<_>>().join(" ");
        normalised
    }

    #[test]
    fn every_measure_is_built_by_the_rollup_view_exactly_as_the_raw_side_builds_it() {
        let view = statement("CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.rollup_hourly_mv");
        for m in ALL {
            let built = format!("{} AS {}", m.state, m.column);
            assert!(view.contains(&built), "the hourly view does not build `{built}`:\n{view}");
        }
        // And the view builds nothing the table does not list here.
        assert_eq!(view.matches("State(").count(), ALL.len(), "{view}");
    }

    #[test]
    fn every_measure_has_its_column_in_the_rollup_table_in_order() {
        let table = statement("CREATE TABLE IF NOT EXISTS {db}.rollup_hourly");
        let state_columns: Vec<&str> = table
            .split(", ")
            .filter(|part| part.contains("AggregateFunction("))
            .map(|part| part.trim_start_matches("CREATE TABLE IF NOT EXISTS {db}.rollup_hourly ( "))
            .filter_map(|part| part.split(' ').next())
            .collect();
        let expected: Vec<&str> = ALL.iter().map(|m| m.column).collect();
        assert_eq!(state_columns, expected);
    }

    #[test]
    fn merge_and_plain_read_the_same_column_or_source() {
        for m in ALL {
            assert!(m.merge.contains(m.column), "{} does not merge {}", m.merge, m.column);
            let function = m.state.split("State").next().unwrap_or_default();
            assert!(m.merge.contains(&format!("{function}Merge")), "{m:?}");
        }
        assert_eq!(
            merges(&[REQUESTS, COST]),
            "toUInt64(countMerge(events)) AS requests, sumMerge(cost_nanos_sum) AS cost_nanos"
        );
        assert_eq!(states(&[ERRORS]), "sumState(toUInt64(status = 'error')) AS errors");
    }
}
