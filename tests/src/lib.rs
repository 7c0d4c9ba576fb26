//! Workspace-level tests: what crosses more than one service (the end-to-end flow through the
//! real ingest, consumer and query API) lives here, so no service crate has another service as a
//! dependency. The tests are in `tests/`.
