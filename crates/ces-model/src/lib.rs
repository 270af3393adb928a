//! The CES policy model and its typed primitives.
//!
//! `address`, `ports` and `schedule` parse and validate the values users write; `model` holds the compiled,
//! ordered policy that backends render and the evaluator decides flows from.

pub mod address;
pub mod model;
pub mod ports;
pub mod schedule;

pub use address::{AddressEntry, Destination};
pub use model::*;
pub use ports::{Bandwidth, PortRange, Protocol, parse_decimal, parse_port_list};
pub use schedule::{Schedule, TimeOfDay, UtcSpan, Window};
