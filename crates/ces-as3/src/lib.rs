//! The CES BIG-IP backend (AFM through AS3).
//!
//! - [`render`]: the policy model as one AS3 request document per tenant, with the original CES's object names
//!   (docs/as3.md lists every deviation).
//! - [`facts`]: what each AS3 version can express of what the renderer writes (from F5's schema files).
//! - [`schema`]: validation of every document against the official AS3 schema of its `schemaVersion`.
//! - [`shared`]: tenants several clusters declare into: each its own objects, the others' kept.
//! - [`client`]: the BIG-IP client (tokens, TLS, async tasks, retries) over HTTPS or a dry-run folder.
//! - [`backend`]: the sync loop's AS3 backend: reads, PATCHes address lists, POSTs tenants with optimistic locks.

pub mod backend;
pub mod client;
pub mod facts;
pub mod logs;
pub mod names;
pub mod render;
pub mod schema;
pub mod shared;

pub use backend::As3Backend;
pub use facts::Facts;
pub use render::{Binding, Rendered, render};
pub use schema::{Schema, SchemaError};
