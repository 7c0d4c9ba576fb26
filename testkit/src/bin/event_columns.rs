//! Prints the columns of `tally.events` as the one row type declares them (JSON): `dev/compat.py`
//! compares them with the table the migrations create on a current ClickHouse (chdb).

fn main() {
    let columns = tally_schemas::row::event_columns();
    println!("{}", serde_json::to_string_pretty(&columns).unwrap_or_default());
}
