//! CES flow records (docs/flows.md): one attributed traffic log from both data planes.
//!
//! - [`record`]: the record, versioned, and the gateway's older packet lines mapped onto it;
//! - [`history`]: who held each address when, per tenant, so that late records name the right pod;
//! - [`filter`]: what to select (`ces flows`, reports, exporters, the UI);
//! - [`store`]: the embedded store (SQLite shards, rollups, retention), its writer and readers, reports.

pub mod afm;
pub mod attribute;
pub mod export;
pub mod filter;
pub mod history;
pub mod listen;
pub mod pipeline;
pub mod record;
pub mod rollup;
pub mod store;

pub use filter::Filter;
pub use record::{FlowRecord, Kind, Origin, Outcome, Verdict};
