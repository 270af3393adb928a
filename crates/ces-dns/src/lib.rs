//! DNS for CES, pure: nothing here reads a socket or a clock.
//!
//! - [`wire`]: DNS messages read defensively (hostile input: compression loops, lengths past the end, label bombs).
//! - [`answer`]: what a response teaches, following CNAME chains from the questions only.
//! - [`tcp`]: DNS-over-TCP streams put back together from the server's segments.
//! - [`cache`]: the learned addresses of the gateway's host-name rules, per tenant, with their lifetimes, limits and
//!   the kernel set changes they make.
//!
//! The gateway (`ces-nft`'s `dns` module) holds each DNS answer that crosses it in NFQUEUE, feeds it through these,
//! writes the resulting set elements to the kernel, and only then releases the answer: a connection the client opens
//! right after it gets the answer is decided by the name's rules (docs/nft.md, "Host names").

pub mod answer;
pub mod cache;
pub mod tcp;
pub mod wire;

pub use answer::{Learned, learned};
pub use cache::{Learner, Limits, Op, Target};

/// Reads one DNS message and says what it teaches.
pub fn learn_from(message: &[u8]) -> Result<Vec<Learned>, wire::Malformed> {
    Ok(learned(&wire::parse(message)?))
}
