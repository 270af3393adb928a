//! The CES API: the custom resources of the original F5 CES, field for field, plus the optional extensions this
//! project adds (priority, mode, schedule, selectors, status conditions).
//!
//! Every spec struct denies unknown fields, so a typo in a manifest is an error rather than a silently ignored
//! setting. The OpenAPI schema of the generated CRDs carries the same constraints the compiler checks, where
//! OpenAPI can express them (enums, patterns, lengths), so the API server rejects most bad input at admission.

mod crd;
mod status;
mod types;

pub use crd::{all_crds, crds_yaml};
pub use status::{CONDITION_ACCEPTED, Condition, Phase, ResourceStatus, accepted_status, rejected_status};
pub use types::*;
